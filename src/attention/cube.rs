//! [`AttentionBackend`] for `CubeBackend` (the kernels of `kernels/`) and for `Fusion` (lazy
//! custom operations of the fusion stream, as the layer norm's). f16/bf16 inputs run the
//! tensor-core kernels where [`tensor_core_tiles`] finds them (`cube/tensor_core.rs`); the rest,
//! the FMA kernels, tiled as below.
//!
//! The FMA kernels' tiles: shared-memory vectors of 4, 2 or 1 floats (the widest dividing `d`); `tx` units along a
//! tile's columns (the largest of 16, 8, 4, 2, 1 dividing `d`'s vectors with at most 32 head
//! columns per unit; narrower only where nothing else fits), `ty = 16` along its rows (fewer only
//! where the device's units or shared memory demand), and 4, 2 or 1 rows and columns per unit:
//! the largest blocks whose registers (≤ 32 accumulators each) and shared memory
//! (`min(device limit, 110 KiB)`; lavapipe's 32 KiB gives smaller tiles) fit. On an H100 at
//! `d = 64`: `64 × 64` tiles of 256 units, 4 × 4 scores per unit, vectors of 4; 72, 85 and
//! 102.5 KiB for forward, dq and dk/dv, and (ptxas for sm_90a, `scripts/cuda-offline-check.sh`)
//! about 100, 128 and 128 registers per unit: two cubes per multiprocessor each, the forward held
//! there by its registers (shared memory would allow three; cubecl-cuda gives no minimum-blocks
//! hint).

use std::marker::PhantomData;

use burn::tensor::{DType, Shape, Tensor, TensorMetadata, TensorPrimitive};
use burn_cubecl::cubecl::{CubeCount, CubeDim};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{Fusion, FusionBackend, FusionRuntime, FusionTensor};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, TensorIr};

use super::kernels::{self, Tiles};
use super::{AttentionBackend, AttentionBackward, AttentionForward};

/// The widest head the kernels take (registers: at most 32 head columns per unit, `tx` ≤ 16).
pub const MAX_HEAD: usize = 256;
/// Shared memory a cube may use (bytes), below the device's limit.
const SHARED_TARGET: usize = 110 << 10;
/// Cubes per grid dimension (wgpu's usual limit).
const MAX_GRID: usize = 65535;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kernel {
    Forward,
    Dq,
    Dkv,
}

impl Kernel {
    #[cfg_attr(not(feature = "cuda-source"), allow(dead_code))]
    pub(super) fn name(self) -> &'static str {
        match self {
            Kernel::Forward => "forward",
            Kernel::Dq => "dq",
            Kernel::Dkv => "dkv",
        }
    }
}

/// Shared bytes of a kernel's tiles (f32; staged rows of `vstride` vectors, weight tiles of
/// `C` columns of `wstride` vectors of `rm`).
pub(super) fn shared_bytes(kernel: Kernel, t: Tiles) -> usize {
    let (r, c, row, wcol) = (t.rows, t.cols, t.vstride() * t.vec, t.wstride() * t.rm());
    4 * match kernel {
        Kernel::Forward => (r + 2 * c) * row + c * wcol + r * t.tx,
        Kernel::Dq => (2 * r + 2 * c) * row + c * wcol,
        Kernel::Dkv => (2 * r + 2 * c) * row + 2 * c * wcol + 2 * c,
    }
}

/// Most accumulators of one kind per unit (`rows per unit × head columns per unit`).
const MAX_ACC: usize = 32;

/// The tiles of `kernel` for heads of width `d` on a device with `shared` bytes and `units` per
/// cube, or why none fit: vectors of 4, 2 or 1 floats (the widest dividing `d`), the widest `tx`
/// (16, 8, 4, 2, 1: dividing the vectors per row, at most 32 head columns per unit unless none
/// does) with the first `(ty, rows and columns per unit)` of (16, 4), (16, 2), (16, 1), (8, 1),
/// (4, 1), (2, 1), (1, 1) that fits.
pub(super) fn tiles(kernel: Kernel, d: usize, shared: usize, units: usize) -> Result<Tiles, String> {
    if d == 0 || d > MAX_HEAD {
        return Err(format!("fused attention takes heads of width 1..={MAX_HEAD}, not {d}"));
    }
    let limit = shared.min(SHARED_TARGET);
    let blocks = [(16, 4), (16, 2), (16, 1), (8, 1), (4, 1), (2, 1), (1, 1)];
    let vec = [4, 2, 1].into_iter().find(|n| d.is_multiple_of(*n)).unwrap_or(1);
    let vs = d / vec;
    let divides = [16, 8, 4, 2, 1].into_iter().filter(|x| vs.is_multiple_of(*x));
    let mut widths = divides.clone().filter(|x| vs / x * vec <= MAX_ACC).collect::<Vec<_>>();
    if widths.is_empty() {
        widths.extend(divides.take(1)); // odd widths over 32: correct, registers spill
    }
    for tx in widths {
        for (ty, per_unit) in blocks {
            let t = Tiles { d, rows: ty * per_unit, cols: tx * per_unit, tx, ty, vec };
            if t.units() <= units && (per_unit == 1 || per_unit * t.dn() <= MAX_ACC) && shared_bytes(kernel, t) <= limit {
                return Ok(t);
            }
        }
    }
    Err(format!("fused attention with heads of width {d} needs more shared memory than the device's {shared} bytes"))
}

fn device_tiles<R: CubeRuntime>(client: &burn_cubecl::cubecl::client::ComputeClient<R>, kernel: Kernel, d: usize) -> Result<Tiles, String> {
    let hw = &client.properties().hardware;
    tiles(kernel, d, hw.max_shared_memory_size, hw.max_units_per_cube as usize)
}

/// One cube per (batch·head, block of `rows` rows of `s`).
fn grid(bh: usize, s: usize, rows: usize) -> CubeCount {
    assert!(bh <= MAX_GRID, "fused attention: batch × heads = {bh} exceeds {MAX_GRID} cubes");
    CubeCount::Static(bh as u32, s.div_ceil(rows).max(1) as u32, 1)
}

/// Launches without CubeCL's per-access bounds checks unless the layer norm's
/// `set_bounds_checks(true)` (every access of the kernels is guarded by the sequence length).
macro_rules! launch_attn {
    ($($seg:ident)::+; $($arg:expr),* $(,)?) => {
        if crate::kernels::kernel_bounds_checks() {
            $($seg)::+::launch::<R>($($arg),*)
        } else {
            // SAFETY: every global access of the kernels is guarded by `s` (module docs of
            // `kernels`), shared accesses are within the comptime tile sizes.
            unsafe { $($seg)::+::launch_unchecked::<R>($($arg),*) }
        }
    };
}

mod tensor_core;
#[cfg(feature = "cuda-source")]
pub(super) use tensor_core::{tc_shared_bytes, tc_tiles};
pub use tensor_core::{tensor_core_tiles, TensorCoreTiles};

/// A `[b, H, s, d]` output stored as `[b, s, H, d]` (what the attention layer's projection reads
/// after swapping back: no copy there), returned as the `[b, H, s, d]` view.
fn output_like<R: CubeRuntime>(x: &CubeTensor<R>) -> CubeTensor<R> {
    let [b, h, s, d] = x.shape().dims::<4>();
    let t = empty_device_contiguous_dtype(x.client.clone(), x.device.clone(), Shape::new([b, s, h, d]), x.dtype);
    burn_cubecl::ops::permute(t, &[0, 2, 1, 3])
}

/// A tensor's shape and dtype, as [`check_same`] reads them.
type Meta = (Shape, DType);

/// `others` like `q` (`like_q`) or like `k`; `k` as `q` but in length, `s_k ≥ offset + s_q`.
/// Checked when an op is called (the Fusion impl too, before the stream runs it).
fn check_same(q: Meta, k: Meta, offset: usize, others: &[(&str, Meta, bool)]) {
    let ([b, h, sq, d], [kb, kh, sk, kd]) = (q.0.dims::<4>(), k.0.dims::<4>());
    assert!(
        [kb, kh, kd] == [b, h, d] && sk >= offset + sq && k.1 == q.1,
        "fused attention: q {:?} {:?} at {offset} against k {:?} {:?}",
        q.0.as_slice(),
        q.1,
        k.0.as_slice(),
        k.1
    );
    for (name, t, like_q) in others {
        let want = if *like_q { &q.0 } else { &k.0 };
        assert!(&t.0 == want && t.1 == q.1, "fused attention: {name} is {:?} {:?}, expected {:?} {:?}", t.0.as_slice(), t.1, want.as_slice(), q.1);
    }
}

/// An offset as the kernels' `u32` scalar.
fn offset_arg(offset: usize) -> u32 {
    u32::try_from(offset).unwrap_or_else(|_| panic!("fused attention: query offset {offset} exceeds u32"))
}

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> AttentionBackend for CubeBackend<R, F, I, BT> {
    fn fused_attention(device: &Self::Device, d_head: usize) -> Result<(), String> {
        let client = R::client(device);
        for kernel in [Kernel::Forward, Kernel::Dq, Kernel::Dkv] {
            device_tiles(&client, kernel, d_head)?;
        }
        Ok(())
    }

    fn fused_attention_kernels(device: &Self::Device, dtype: DType, d_head: usize) -> String {
        match Self::fused_attention(device, d_head) {
            Ok(()) => tensor_core::describe(&R::client(device), dtype, d_head),
            Err(why) => why,
        }
    }

    fn causal_attention_at(q: CubeTensor<R>, k: CubeTensor<R>, v: CubeTensor<R>, scale: f32, offset: usize) -> AttentionForward<Self> {
        let m = |t: &CubeTensor<R>| (t.shape(), t.dtype);
        check_same(m(&q), m(&k), offset, &[("v", m(&v), false)]);
        let [b, h, s, d] = q.shape().dims::<4>();
        let o = output_like(&q);
        let lse = empty_device_contiguous_dtype(q.client.clone(), q.device.clone(), Shape::new([b, h, s]), DType::F32);
        let client = q.client.clone();
        if let Some(t) = tensor_core_tiles(&client, q.dtype, d) {
            tensor_core::forward(t.forward, [&q, &k, &v, &o, &lse], scale, offset);
            return (o, lse);
        }
        let t = device_tiles(&q.client, Kernel::Forward, d).unwrap_or_else(|e| panic!("{e}"));
        launch_attn!(kernels::attn_forward_kernel;
            &client,
            grid(b * h, s, t.rows),
            CubeDim::new_2d(t.tx as u32, t.ty as u32),
            t.vec,
            t.rm(),
            q.clone().into_tensor_arg(),
            k.into_tensor_arg(),
            v.into_tensor_arg(),
            o.clone().into_tensor_arg(),
            lse.clone().into_tensor_arg(),
            scale,
            offset_arg(offset),
            t,
            q.dtype.into(),
        );
        (o, lse)
    }

    fn causal_attention_backward_at(
        dout: CubeTensor<R>,
        q: CubeTensor<R>,
        k: CubeTensor<R>,
        v: CubeTensor<R>,
        o: CubeTensor<R>,
        lse: CubeTensor<R>,
        scale: f32,
        offset: usize,
    ) -> AttentionBackward<Self> {
        let m = |t: &CubeTensor<R>| (t.shape(), t.dtype);
        check_same(m(&q), m(&k), offset, &[("v", m(&v), false), ("dO", m(&dout), true), ("o", m(&o), true)]);
        let ([b, h, s, d], sk) = (q.shape().dims::<4>(), k.shape()[2]);
        let delta = delta::<R, F, I, BT>(dout.clone(), o);
        let lse = into_contiguous(lse);
        let (dq, dk, dv) = (output_like(&q), output_like(&k), output_like(&v));
        let client = q.client.clone();
        if let Some(tiles) = tensor_core_tiles(&client, q.dtype, d).and_then(|t| t.backward) {
            tensor_core::backward(tiles, [&dout, &q, &k, &v, &lse, &delta, &dq, &dk, &dv], scale, offset);
            return (dq, dk, dv);
        }
        let (tq, tkv) = [Kernel::Dq, Kernel::Dkv].map(|kernel| device_tiles(&q.client, kernel, d).unwrap_or_else(|e| panic!("{e}"))).into();
        launch_attn!(kernels::attn_backward_dq_kernel;
            &client,
            grid(b * h, s, tq.rows),
            CubeDim::new_2d(tq.tx as u32, tq.ty as u32),
            tq.vec,
            tq.rm(),
            dout.clone().into_tensor_arg(),
            q.clone().into_tensor_arg(),
            k.clone().into_tensor_arg(),
            v.clone().into_tensor_arg(),
            lse.clone().into_tensor_arg(),
            delta.clone().into_tensor_arg(),
            dq.clone().into_tensor_arg(),
            scale,
            offset_arg(offset),
            tq,
            q.dtype.into(),
        );
        launch_attn!(kernels::attn_backward_dkv_kernel;
            &client,
            grid(b * h, sk, tkv.rows),
            CubeDim::new_2d(tkv.tx as u32, tkv.ty as u32),
            tkv.vec,
            tkv.rm(),
            dout.into_tensor_arg(),
            q.clone().into_tensor_arg(),
            k.into_tensor_arg(),
            v.into_tensor_arg(),
            lse.into_tensor_arg(),
            delta.into_tensor_arg(),
            dk.clone().into_tensor_arg(),
            dv.clone().into_tensor_arg(),
            scale,
            offset_arg(offset),
            tkv,
            q.dtype.into(),
        );
        (dq, dk, dv)
    }
}

/// `D = Σ_x dO·o` in f32, `[b, H, s]` contiguous (Burn ops: one fused elementwise-and-sum).
fn delta<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(dout: CubeTensor<R>, o: CubeTensor<R>) -> CubeTensor<R> {
    type T<R, F, I, BT> = Tensor<CubeBackend<R, F, I, BT>, 4>;
    let f = |x: CubeTensor<R>| T::<R, F, I, BT>::from_primitive(TensorPrimitive::Float(x)).cast(DType::F32);
    into_contiguous((f(dout) * f(o)).sum_dim(3).into_primitive().tensor())
}

/// Under `Fusion` the kernels are lazy custom operations of the fusion stream (registered with
/// their inputs and outputs, run on the inner backend's tensors when the stream executes).
impl<B: FusionBackend + AttentionBackend> AttentionBackend for Fusion<B> {
    fn fused_attention(device: &Self::Device, d_head: usize) -> Result<(), String> {
        B::fused_attention(device, d_head)
    }

    fn fused_attention_kernels(device: &Self::Device, dtype: DType, d_head: usize) -> String {
        B::fused_attention_kernels(device, dtype, d_head)
    }

    fn causal_attention_at(
        q: FusionTensor<B::FusionRuntime>,
        k: FusionTensor<B::FusionRuntime>,
        v: FusionTensor<B::FusionRuntime>,
        scale: f32,
        offset: usize,
    ) -> AttentionForward<Self> {
        let m = |t: &FusionTensor<B::FusionRuntime>| (t.shape.clone(), t.dtype);
        check_same(m(&q), m(&k), offset, &[("v", m(&v), false)]);
        let stats = Shape::from(q.shape.as_slice()[..3].to_vec());
        let outputs = vec![(q.shape.clone(), q.dtype), (stats, DType::F32)];
        let mut out = AttentionFusionOp::<B>::register(vec![q, k, v], outputs, scale, offset, false).into_iter();
        (out.next().expect("o"), out.next().expect("lse"))
    }

    #[allow(clippy::too_many_arguments)]
    fn causal_attention_backward_at(
        dout: FusionTensor<B::FusionRuntime>,
        q: FusionTensor<B::FusionRuntime>,
        k: FusionTensor<B::FusionRuntime>,
        v: FusionTensor<B::FusionRuntime>,
        o: FusionTensor<B::FusionRuntime>,
        lse: FusionTensor<B::FusionRuntime>,
        scale: f32,
        offset: usize,
    ) -> AttentionBackward<Self> {
        let m = |t: &FusionTensor<B::FusionRuntime>| (t.shape.clone(), t.dtype);
        check_same(m(&q), m(&k), offset, &[("v", m(&v), false), ("dO", m(&dout), true), ("o", m(&o), true)]);
        let outputs = [&q, &k, &v].map(|t| (t.shape.clone(), t.dtype)).to_vec();
        let mut out = AttentionFusionOp::<B>::register(vec![dout, q, k, v, o, lse], outputs, scale, offset, true).into_iter();
        let mut next = || out.next().expect("three gradients");
        (next(), next(), next())
    }
}

/// The attention forward (inputs `q, k, v`; outputs `o, lse`) or backward (inputs
/// `dO, q, k, v, o, lse`; outputs `dq, dk, dv`) as a fusion-stream operation.
#[derive(Debug)]
struct AttentionFusionOp<B> {
    desc: CustomOpIr,
    scale: f32,
    /// The queries' first position (context parallelism; 0: one causal sequence).
    offset: usize,
    backward: bool,
    _b: PhantomData<B>,
}

impl<B: FusionBackend + AttentionBackend> AttentionFusionOp<B> {
    fn register(
        inputs: Vec<FusionTensor<B::FusionRuntime>>,
        outputs: Vec<(Shape, DType)>,
        scale: f32,
        offset: usize,
        backward: bool,
    ) -> Vec<FusionTensor<B::FusionRuntime>> {
        let client = inputs[0].client.clone();
        let streams = OperationStreams::with_inputs(&inputs);
        let outputs = outputs.into_iter().map(|(shape, dtype)| TensorIr::uninit(client.create_empty_handle(), shape, dtype)).collect::<Vec<_>>();
        let name = if backward { "burn-parallel-attention-backward" } else { "burn-parallel-attention" };
        let inputs = inputs.into_iter().map(|t| t.into_ir()).collect::<Vec<_>>();
        let desc = CustomOpIr::new(name, &inputs, &outputs);
        let op = Self { desc: desc.clone(), scale, offset, backward, _b: PhantomData };
        client.register(streams, OperationIr::Custom(desc), op)
    }
}

impl<B: FusionBackend + AttentionBackend> Operation<B::FusionRuntime> for AttentionFusionOp<B> {
    fn execute(&self, handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>) {
        let mut inputs = self.desc.inputs.iter().map(|t| handles.get_float_tensor::<B>(t)).collect::<Vec<_>>().into_iter();
        let mut next = || inputs.next().expect("as registered");
        let outputs = if self.backward {
            let (dq, dk, dv) = B::causal_attention_backward_at(next(), next(), next(), next(), next(), next(), self.scale, self.offset);
            vec![dq, dk, dv]
        } else {
            let (o, lse) = B::causal_attention_at(next(), next(), next(), self.scale, self.offset);
            vec![o, lse]
        };
        for (ir, tensor) in self.desc.outputs.iter().zip(outputs) {
            handles.register_float_tensor::<B>(&ir.id, tensor);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_fit_the_device_or_say_why() {
        for kernel in [Kernel::Forward, Kernel::Dq, Kernel::Dkv] {
            for d in [8, 16, 48, 64, 80, 128, 256, 33] {
                for shared in [32 << 10, 48 << 10, 227 << 10] {
                    let t = tiles(kernel, d, shared, 256).unwrap();
                    let fits = shared_bytes(kernel, t) <= shared && t.units() <= 256;
                    let whole = d.is_multiple_of(t.vec) && t.vs().is_multiple_of(t.tx) && t.rows.is_multiple_of(t.ty) && t.cols.is_multiple_of(t.tx);
                    assert!(fits && whole && (t.rm() == 1 || t.rm() * t.dn() <= MAX_ACC), "{kernel:?} d {d} shared {shared}: {t:?}");
                }
            }
        }
        // An H100 at d 64 and 128; lavapipe (32 KiB) at d 64; d 8 takes 4 × 4 blocks there too.
        let h100 = |kernel, d| tiles(kernel, d, 227 << 10, 1024).unwrap();
        assert_eq!(h100(Kernel::Forward, 64), Tiles { d: 64, rows: 64, cols: 64, tx: 16, ty: 16, vec: 4 });
        assert_eq!(h100(Kernel::Dkv, 64), Tiles { d: 64, rows: 64, cols: 64, tx: 16, ty: 16, vec: 4 });
        assert_eq!(h100(Kernel::Dkv, 128), Tiles { d: 128, rows: 32, cols: 32, tx: 16, ty: 16, vec: 4 });
        assert_eq!(tiles(Kernel::Forward, 64, 32 << 10, 256).unwrap(), Tiles { d: 64, rows: 32, cols: 32, tx: 16, ty: 16, vec: 4 });
        assert_eq!(tiles(Kernel::Dkv, 8, 32 << 10, 256).unwrap(), Tiles { d: 8, rows: 64, cols: 8, tx: 2, ty: 16, vec: 4 });
        // Cubes per H100 multiprocessor that shared memory allows (228 KiB, 1 KiB reserved per
        // cube) at d 64: 3, 2, 2 (ptxas's registers allow 2, 2, 2: cuda-offline-check.sh).
        for (kernel, cubes) in [(Kernel::Forward, 3), (Kernel::Dq, 2), (Kernel::Dkv, 2)] {
            assert_eq!((228 << 10) / (shared_bytes(kernel, h100(kernel, 64)) + 1024), cubes, "{kernel:?}");
        }
        assert!(tiles(Kernel::Forward, 512, 227 << 10, 1024).unwrap_err().contains("width 1..=256, not 512"));
        assert!(tiles(Kernel::Dkv, 256, 16 << 10, 1024).unwrap_err().contains("more shared memory"));
    }
}
