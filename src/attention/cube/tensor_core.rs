//! When the tensor-core kernels (`kernels/tensor_core*.rs`) run, their tiles and launches.
//!
//! They run for f16/bf16 inputs where the device has an `f × f × f` `dtype × dtype → f32`
//! cooperative-matrix configuration (16 on CUDA, 8 on Mesa ≥ 26's lavapipe) and a fixed plane
//! size, for heads that are a multiple of `f` up to 128; the backward where its own tiles fit too.
//! Elsewhere (f32, WGSL, older drivers) the FMA kernels run.

use burn::tensor::{DType, TensorMetadata};
use burn_cubecl::cubecl::client::ComputeClient;
use burn_cubecl::cubecl::ir::features::MmaConfig;
use burn_cubecl::cubecl::ir::StorageType;
use burn_cubecl::cubecl::CubeDim;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;

use super::{grid, kernels, Kernel, SHARED_TARGET};
use crate::attention::kernels::TcTiles;

/// Fragment edges, the first the device has wins.
const FRAGMENTS: [usize; 2] = [16, 8];
/// The widest head (the lanes' output registers: `f·d/lanes` per accumulator).
const MAX_TC_HEAD: usize = 128;

/// The tensor-core kernels' tiles on a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorCoreTiles {
    /// The forward's.
    pub forward: TcTiles,
    /// dq's and dk/dv's, where both fit (else the backward runs the FMA kernels).
    pub backward: Option<(TcTiles, TcTiles)>,
}

/// Shared bytes of a tensor-core kernel's launch (2-byte inputs): staged `[n, d + 8]` tiles of
/// the rows and the other operand, `[rows, C + 8]` weight tiles (`P`, `dS`), f32 `[rows, ss]`
/// scratches, and the f32 row factors (α) or statistics (lse, δ).
pub(in crate::attention) fn tc_shared_bytes(kernel: Kernel, t: TcTiles) -> usize {
    let (rows, cols, hs, ps, ss) = (t.rows(), t.cols, t.hs(), t.ps(), t.ss());
    let (staged, weights, scratch, stats) = match kernel {
        Kernel::Forward => (rows + 2 * cols, 1, 1, rows),
        Kernel::Dq => (2 * rows + 2 * cols, 1, 2, 2 * rows),
        Kernel::Dkv => (2 * rows + 2 * cols, 2, 2, 2 * cols),
    };
    2 * (staged * hs + weights * rows * ps) + 4 * (scratch * rows * ss + stats)
}

/// `kernel`'s tiles for heads of width `d` with `f × f × f` fragments and planes of `lanes`: 4,
/// 2 or 1 planes per cube and 64, 32, 16 or 8 rows of the other operand per tile (a multiple of
/// `f`), the first that fits the shared memory (`min(device, 110 KiB)`) and units; `None` where
/// `d` is not a multiple of `f` up to 128 or `lanes` does not divide `f·d` and `f·C`.
pub(in crate::attention) fn tc_tiles(kernel: Kernel, d: usize, f: usize, lanes: usize, shared: usize, units: usize) -> Option<TcTiles> {
    if d == 0 || !d.is_multiple_of(f) || d > MAX_TC_HEAD || lanes == 0 || !(f * d).is_multiple_of(lanes) {
        return None;
    }
    let limit = shared.min(SHARED_TARGET);
    let shapes = [4, 2, 1].into_iter().flat_map(|planes| [64, 32, 16, 8].map(|cols| (planes, cols)));
    shapes
        .filter(|&(_, cols): &(usize, usize)| cols.is_multiple_of(f) && (f * cols).is_multiple_of(lanes))
        .map(|(planes, cols)| TcTiles { d, f, planes, cols, lanes })
        .find(|&t| t.units() <= units && tc_shared_bytes(kernel, t) <= limit)
}

/// The tensor-core kernels' tiles for `dtype` inputs and heads of width `d` on this client's
/// device, or `None` where they do not run there (f32 inputs, no `f × f × f`
/// `dtype × dtype → f32` cooperative-matrix configuration, a plane size that varies, heads
/// [`tc_tiles`] refuses, or [`set_tensor_cores`](crate::attention::set_tensor_cores)`(false)`): the FMA kernels run instead.
pub fn tensor_core_tiles<R: CubeRuntime>(client: &ComputeClient<R>, dtype: DType, d: usize) -> Option<TensorCoreTiles> {
    plan(client, dtype, d).ok()
}

/// [`tensor_core_tiles`], or why there are none (in words).
fn plan<R: CubeRuntime>(client: &ComputeClient<R>, dtype: DType, d: usize) -> Result<TensorCoreTiles, String> {
    if !crate::attention::tensor_cores_enabled() {
        return Err("tensor cores switched off".into());
    }
    if !matches!(dtype, DType::F16 | DType::BF16) {
        return Err(format!("{dtype:?} inputs: tensor cores take f16/bf16"));
    }
    let (elem, acc): (StorageType, StorageType) = (dtype.into(), DType::F32.into());
    let (props, features) = (client.properties(), client.features());
    let hw = &props.hardware;
    if hw.plane_size_min != hw.plane_size_max {
        return Err(format!("planes of {} to {} lanes: the kernels need one plane size", hw.plane_size_min, hw.plane_size_max));
    }
    let has = |f: usize| {
        let f = f as u32;
        features.matmul.cmma.contains(&MmaConfig { a_type: elem, b_type: elem, cd_type: acc, m: f, n: f, k: f })
    };
    let f =
        FRAGMENTS.into_iter().find(|&f| has(f)).ok_or_else(|| format!("no {dtype:?} cooperative matrices of 16 or 8 with f32 accumulators on this device"))?;
    let pick = |kernel| tc_tiles(kernel, d, f, hw.plane_size_max as usize, hw.max_shared_memory_size, hw.max_units_per_cube as usize);
    let backward = pick(Kernel::Dq).zip(pick(Kernel::Dkv));
    let forward =
        pick(Kernel::Forward).ok_or_else(|| format!("heads of {d}: {f}×{f}×{f} fragments take a multiple of {f} up to {MAX_TC_HEAD} whose tiles fit"))?;
    Ok(TensorCoreTiles { forward, backward })
}

/// What fused attention of `dtype` inputs with heads of width `d` runs on this client's device,
/// in words (the kernels exist: [`AttentionBackend::fused_attention`](crate::attention::AttentionBackend::fused_attention)).
pub(super) fn describe<R: CubeRuntime>(client: &ComputeClient<R>, dtype: DType, d: usize) -> String {
    let tiles = |t: TcTiles| format!("{} planes × {} rows, {} per tile", t.planes, t.f, t.cols);
    match plan(client, dtype, d) {
        Ok(TensorCoreTiles { forward, backward }) => {
            let backward = match backward {
                Some((dq, dkv)) => format!("dq {}, dk/dv {}", tiles(dq), tiles(dkv)),
                None => "FMA kernels (its tiles do not fit)".into(),
            };
            let f = forward.f;
            format!("tensor cores ({f}×{f}×{f} {dtype:?} fragments, f32 accumulators): forward {}; backward {backward}", tiles(forward))
        }
        Err(why) => format!("FMA kernels ({why})"),
    }
}

fn cube_dim(t: TcTiles) -> CubeDim {
    CubeDim::new_2d(t.lanes as u32, t.planes as u32)
}

/// The forward: `[q, k, v, o, lse]`, queries at positions `offset..`.
pub(super) fn forward<R: CubeRuntime>(t: TcTiles, [q, k, v, o, lse]: [&CubeTensor<R>; 5], scale: f32, offset: usize) {
    let [b, h, s, _] = q.shape().dims::<4>();
    let client = q.client.clone();
    launch_attn!(kernels::attn_forward_tc_kernel;
        &client,
        grid(b * h, s, t.rows()),
        cube_dim(t),
        q.clone().into_tensor_arg(),
        k.clone().into_tensor_arg(),
        v.clone().into_tensor_arg(),
        o.clone().into_tensor_arg(),
        lse.clone().into_tensor_arg(),
        scale,
        super::offset_arg(offset),
        t,
        q.dtype.into(),
    );
}

/// The backward: `[dO, q, k, v, lse, delta, dq, dk, dv]` (`lse`, `delta` contiguous f32).
pub(super) fn backward<R: CubeRuntime>((tq, tkv): (TcTiles, TcTiles), tensors: [&CubeTensor<R>; 9], scale: f32, offset: usize) {
    let [dout, q, k, v, lse, delta, dq, dk, dv] = tensors.map(|t| t.clone());
    let ([b, h, s, _], sk) = (q.shape().dims::<4>(), k.shape()[2]);
    let (client, dtype) = (q.client.clone(), q.dtype);
    launch_attn!(kernels::attn_backward_dq_tc_kernel;
        &client,
        grid(b * h, s, tq.rows()),
        cube_dim(tq),
        dout.clone().into_tensor_arg(),
        q.clone().into_tensor_arg(),
        k.clone().into_tensor_arg(),
        v.clone().into_tensor_arg(),
        lse.clone().into_tensor_arg(),
        delta.clone().into_tensor_arg(),
        dq.into_tensor_arg(),
        scale,
        super::offset_arg(offset),
        tq,
        dtype.into(),
    );
    launch_attn!(kernels::attn_backward_dkv_tc_kernel;
        &client,
        grid(b * h, sk, tkv.rows()),
        cube_dim(tkv),
        dout.into_tensor_arg(),
        q.into_tensor_arg(),
        k.into_tensor_arg(),
        v.into_tensor_arg(),
        lse.into_tensor_arg(),
        delta.into_tensor_arg(),
        dk.into_tensor_arg(),
        dv.into_tensor_arg(),
        scale,
        super::offset_arg(offset),
        tkv,
        dtype.into(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The picker: an H100's and lavapipe's tiles, every pick within its budget and whole,
    /// heads it cannot take refused.
    #[test]
    fn tensor_core_tiles_fit_the_device_or_are_refused() {
        let h100 = |kernel, d| tc_tiles(kernel, d, 16, 32, 227 << 10, 1024);
        assert_eq!(h100(Kernel::Forward, 64).unwrap(), TcTiles { d: 64, f: 16, planes: 4, cols: 64, lanes: 32 });
        // q, k, v rows of 72 halves; f32 scratch rows of 68; P rows of 72 halves; α: 53.25 KiB
        // (ptxas reports the same for the compiled kernel: scripts/cuda-offline-check.sh).
        assert_eq!(tc_shared_bytes(Kernel::Forward, h100(Kernel::Forward, 64).unwrap()), 192 * 72 * 2 + 64 * 68 * 4 + 64 * 72 * 2 + 64 * 4);
        assert_eq!(tc_shared_bytes(Kernel::Forward, h100(Kernel::Forward, 128).unwrap()), 95488);
        assert_eq!(h100(Kernel::Dkv, 64).unwrap(), TcTiles { d: 64, f: 16, planes: 4, cols: 64, lanes: 32 });
        assert_eq!(tc_tiles(Kernel::Forward, 64, 8, 8, 32 << 10, 256).unwrap(), TcTiles { d: 64, f: 8, planes: 4, cols: 32, lanes: 8 });
        let kernels = [Kernel::Forward, Kernel::Dq, Kernel::Dkv];
        for (f, lanes, shared, units) in [(16, 32, 227 << 10, 1024), (16, 32, 48 << 10, 1024), (8, 8, 32 << 10, 256), (16, 8, 32 << 10, 256)] {
            for (kernel, d) in kernels.into_iter().flat_map(|k| [8, 16, 32, 48, 64, 80, 128].map(|d| (k, d))) {
                let Some(t) = tc_tiles(kernel, d, f, lanes, shared, units) else {
                    let smallest = TcTiles { d, f, planes: 1, cols: f, lanes };
                    let refusable = !d.is_multiple_of(f) || tc_shared_bytes(kernel, smallest) > shared.min(SHARED_TARGET);
                    assert!(refusable, "{kernel:?} d {d} f {f} lanes {lanes} shared {shared}: refused");
                    continue;
                };
                let whole = d.is_multiple_of(f) && t.cols.is_multiple_of(f) && (f * d).is_multiple_of(lanes) && (f * t.cols).is_multiple_of(lanes);
                assert!(whole && tc_shared_bytes(kernel, t) <= shared.min(SHARED_TARGET) && t.units() <= units, "{kernel:?} {t:?}");
            }
        }
        assert_eq!(h100(Kernel::Forward, 72), None);
        assert_eq!(h100(Kernel::Dq, 256), None);
        assert_eq!(tc_tiles(Kernel::Forward, 64, 16, 32, 8 << 10, 1024), None);
    }
}
