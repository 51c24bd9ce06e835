//! The CubeCL kernels (wgpu, CUDA, …) behind [`LayerNormBackend`] for `CubeBackend`: `v4`
//! (`cube_vec/`, the default) where the row fits its register cache, else `v1` here:
//!
//! - forward: one cube per row, `BLOCK` units stride over the row; mean and variance by two
//!   shared-memory tree reductions in f32 (two passes over the row, numerically like the
//!   composed reference); writes `y`, `μ`, `r`.
//! - backward `dx`: one cube per row; reductions of `Σ g` and `Σ g·x̂`, then `dx`.
//! - backward `dγ, dβ`: cubes over (column block × row chunk); each unit sums its column over the
//!   chunk's rows (coalesced reads), writing f32 partials `[chunks, 2h]` (dγ's, then dβ's),
//!   summed over chunks by the same column-sum kernel as `v4`'s.
//!
//! Under `Fusion` (burn's default `Wgpu`/`Cuda`) the kernels are lazy custom operations of the
//! fusion stream (see the impl below).

use burn::tensor::{DType, Shape, Tensor, TensorMetadata, TensorPrimitive};
use burn_cubecl::cubecl::{CubeCount, CubeDim};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};

use std::marker::PhantomData;

use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{Fusion, FusionBackend, FusionRuntime, FusionTensor};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, TensorIr};

use super::{cube_vec, LayerNormBackend, LnBackward, LnForward};

pub(super) const BLOCK: u32 = 256;
const ROWS_PER_CHUNK: usize = 64;
/// Cubes per grid dimension (wgpu's usual `max_compute_workgroups_per_dimension`).
const MAX_GRID: usize = 65535;

/// Launches a `v4` kernel without CubeCL's per-access bounds checks unless
/// `set_bounds_checks(true)`.
macro_rules! launch_v4 {
    ($($seg:ident)::+; $($arg:expr),* $(,)?) => {
        if super::bounds_checks() {
            $($seg)::+::launch::<R>($($arg),*)
        } else {
            // SAFETY: every access of the `v4` kernels is guarded by an explicit bound (module
            // docs of `cube_vec`); the kernels' loops are bounded by tensor shapes.
            unsafe { $($seg)::+::launch_unchecked::<R>($($arg),*) }
        }
    };
}

/// The device's multiprocessors (128 where the runtime does not say, e.g. lavapipe).
fn multiprocessors<R: CubeRuntime>(t: &CubeTensor<R>) -> usize {
    t.client.properties().hardware.num_streaming_multiprocessors.unwrap_or(128) as usize
}

/// One cube per row, spread over x and y so that any row count fits the grid limits.
fn rows_grid(n: usize) -> CubeCount {
    let x = n.clamp(1, MAX_GRID);
    CubeCount::Static(x as u32, n.div_ceil(x).max(1) as u32, 1)
}

pub(super) mod kernel;
pub(super) mod plan;
use plan::{backward_plan, forward_plan, partials_lanes, BackwardPlan, RowDevice};

/// The kernels index γ/β (and `dy`) by `x`'s width and read them as `x`'s dtype, without
/// CubeCL's bounds checks: anything else must stop here.
fn check_operands<R: CubeRuntime>(x: &CubeTensor<R>, params: &[(&str, &CubeTensor<R>)], like_x: &[(&str, &CubeTensor<R>)]) {
    let [_, h] = x.shape().dims::<2>();
    for (name, p) in params {
        assert!(
            p.shape().as_slice() == [h] && p.dtype == x.dtype,
            "layer norm: {name} is {:?} {:?}, x {:?} {:?}",
            p.shape().as_slice(),
            p.dtype,
            x.shape().as_slice(),
            x.dtype
        );
    }
    for (name, t) in like_x {
        assert!(
            t.shape() == x.shape() && t.dtype == x.dtype,
            "layer norm: {name} is {:?} {:?}, x {:?} {:?}",
            t.shape().as_slice(),
            t.dtype,
            x.shape().as_slice(),
            x.dtype
        );
    }
}

fn empty<R: CubeRuntime>(like: &CubeTensor<R>, shape: Shape, dtype: DType) -> CubeTensor<R> {
    empty_device_contiguous_dtype(like.client.clone(), like.device.clone(), shape, dtype)
}

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> LayerNormBackend for CubeBackend<R, F, I, BT> {
    fn layer_norm_rows(x: CubeTensor<R>, gamma: CubeTensor<R>, beta: CubeTensor<R>, epsilon: f32) -> LnForward<Self> {
        let (x, gamma, beta) = (into_contiguous(x), into_contiguous(gamma), into_contiguous(beta));
        check_operands(&x, &[("gamma", &gamma), ("beta", &beta)], &[]);
        let [n, h] = x.shape().dims::<2>();
        let y = empty(&x, x.shape(), x.dtype);
        let mean = empty(&x, Shape::new([n, 1]), DType::F32);
        let rstd = empty(&x, Shape::new([n, 1]), DType::F32);
        let dtype = x.dtype;
        // v4's forward takes the row count as a u32 argument (v1 reads it from the tensor).
        let plan = forward_plan(&RowDevice::of(&x.client), h, dtype).filter(|_| u32::try_from(n).is_ok());
        if let Some(p) = plan {
            launch_v4!(cube_vec::ln_forward_vec_kernel;
                &x.client,
                rows_grid(n.div_ceil(p.rows)),
                CubeDim::new_2d(p.block as u32, p.rows as u32),
                p.vector,
                x.clone().into_tensor_arg(),
                gamma.into_tensor_arg(),
                beta.into_tensor_arg(),
                y.clone().into_tensor_arg(),
                mean.clone().into_tensor_arg(),
                rstd.clone().into_tensor_arg(),
                n as u32,
                (h / p.vector) as u32,
                1.0 / h as f32,
                epsilon,
                p.block,
                p.rows,
                p.per_unit,
                p.plane,
                p.stage,
                dtype.into(),
            );
            return (y, mean, rstd);
        }
        kernel::ln_forward_kernel::launch::<R>(
            &x.client,
            rows_grid(n),
            CubeDim::new_1d(BLOCK),
            x.clone().into_tensor_arg(),
            gamma.into_tensor_arg(),
            beta.into_tensor_arg(),
            y.clone().into_tensor_arg(),
            mean.clone().into_tensor_arg(),
            rstd.clone().into_tensor_arg(),
            epsilon,
            BLOCK,
            dtype.into(),
        );
        (y, mean, rstd)
    }

    fn layer_norm_rows_backward(dy: CubeTensor<R>, x: CubeTensor<R>, gamma: CubeTensor<R>, mean: CubeTensor<R>, rstd: CubeTensor<R>) -> LnBackward<Self> {
        let (dy, x, gamma) = (into_contiguous(dy), into_contiguous(x), into_contiguous(gamma));
        let (mean, rstd) = (into_contiguous(mean), into_contiguous(rstd));
        check_operands(&x, &[("gamma", &gamma)], &[("dy", &dy)]);
        let [n, h] = x.shape().dims::<2>();
        let dtype = x.dtype;
        // v4: the one-pass backward (see `backward_plan`).
        if let Some(plan) = backward_plan(&RowDevice::of(&x.client), h, dtype) {
            return fused_backward::<R, F, I, BT>(dy, x, gamma, mean, rstd, plan);
        }
        let dx = empty(&x, x.shape(), dtype);
        kernel::ln_backward_dx_kernel::launch::<R>(
            &x.client,
            rows_grid(n),
            CubeDim::new_1d(BLOCK),
            dy.clone().into_tensor_arg(),
            x.clone().into_tensor_arg(),
            gamma.into_tensor_arg(),
            mean.clone().into_tensor_arg(),
            rstd.clone().into_tensor_arg(),
            dx.clone().into_tensor_arg(),
            BLOCK,
            dtype.into(),
        );
        let chunks = n.div_ceil(ROWS_PER_CHUNK).clamp(1, MAX_GRID);
        let rows_per_chunk = n.div_ceil(chunks).max(1);
        let partial = empty(&x, Shape::new([chunks, 2 * h]), DType::F32);
        let client = x.client.clone();
        kernel::ln_backward_params_kernel::launch::<R>(
            &client,
            CubeCount::Static((h as u32).div_ceil(BLOCK), chunks as u32, 1),
            CubeDim::new_1d(BLOCK),
            dy.into_tensor_arg(),
            x.into_tensor_arg(),
            mean.into_tensor_arg(),
            rstd.into_tensor_arg(),
            partial.clone().into_tensor_arg(),
            rows_per_chunk as u32,
            dtype.into(),
        );
        let (dg, db) = partial_sums::<R, F, I, BT>(partial, dtype);
        (dx, dg, db)
    }
}

/// The one-pass `v4` backward ([`cube_vec::ln_backward_fused_vec_kernel`]): `dx` and f32 dγ/dβ
/// partials per cube, then [`partial_sums`]. Cubes: one per `backward_rows()` rows (default 64:
/// the partials, `2h` f32 per cube, stay small next to the rows' `3h` elements of traffic), but
/// at least two per multiprocessor. On the H200 (BENCHMARKS.md) 64 rows per cube beat 16 and 4
/// at [16384, 4096]; at [4096, 8192], 64 rows would leave 64 cubes for 132 multiprocessors.
fn fused_backward<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    dy: CubeTensor<R>,
    x: CubeTensor<R>,
    gamma: CubeTensor<R>,
    mean: CubeTensor<R>,
    rstd: CubeTensor<R>,
    plan: BackwardPlan,
) -> LnBackward<CubeBackend<R, F, I, BT>> {
    let [n, h] = x.shape().dims::<2>();
    let dtype = x.dtype;
    let BackwardPlan { vector, block, per_unit, plane, prefetch, lean } = plan;
    let rows = cube_vec::rows_per_cube(block);
    let sms = multiprocessors(&x);
    let cubes = n.div_ceil(super::backward_rows()).max(2 * sms).min(n.div_ceil(rows)).clamp(1, MAX_GRID);
    let dx = empty(&x, x.shape(), dtype);
    let partial = empty(&x, Shape::new([cubes, 2 * h]), DType::F32);
    launch_v4!(cube_vec::ln_backward_fused_vec_kernel;
        &x.client,
        CubeCount::Static(cubes as u32, 1, 1),
        CubeDim::new_2d(block as u32, rows as u32),
        vector,
        dy.into_tensor_arg(),
        x.clone().into_tensor_arg(),
        gamma.into_tensor_arg(),
        mean.into_tensor_arg(),
        rstd.into_tensor_arg(),
        dx.clone().into_tensor_arg(),
        partial.clone().into_tensor_arg(),
        block,
        per_unit,
        plane,
        prefetch,
        lean,
        dtype.into(),
    );
    let (dg, db) = partial_sums::<R, F, I, BT>(partial, dtype);
    (dx, dg, db)
}

/// `(dγ, dβ)` in `dtype` from f32 partials `[chunks, 2h]`: one column-sum kernel writing `[2h]`
/// (sum and cast in one launch: launches dominate narrow rows), returned as two views.
fn partial_sums<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(partial: CubeTensor<R>, dtype: DType) -> (CubeTensor<R>, CubeTensor<R>) {
    let width = partial.shape().dims::<2>()[1];
    let lanes = partials_lanes(&RowDevice::of(&partial.client));
    let out = empty(&partial, Shape::new([width]), dtype);
    launch_v4!(cube_vec::ln_partials_sum_kernel;
        &partial.client,
        CubeCount::Static((width as u32).div_ceil(32), 1, 1),
        CubeDim::new_2d(32, lanes as u32),
        partial.clone().into_tensor_arg(),
        out.clone().into_tensor_arg(),
        lanes,
        dtype.into(),
    );
    let both = Tensor::<CubeBackend<R, F, I, BT>, 1>::from_primitive(TensorPrimitive::Float(out));
    let half = |range| both.clone().slice([range]).into_primitive().tensor();
    (half(0..width / 2), half(width / 2..width))
}

/// Under `Fusion` (burn's default `Wgpu` and `Cuda`) the kernels are lazy custom operations of
/// the fusion stream: registered with their inputs and outputs (no flush of the stream, no wait),
/// run on the inner backend's tensors when the stream executes.
impl<B: FusionBackend + LayerNormBackend> LayerNormBackend for Fusion<B> {
    fn layer_norm_rows(
        x: FusionTensor<B::FusionRuntime>,
        gamma: FusionTensor<B::FusionRuntime>,
        beta: FusionTensor<B::FusionRuntime>,
        epsilon: f32,
    ) -> LnForward<Self> {
        let n = x.shape[0];
        let outputs = [(x.shape.clone(), x.dtype), (Shape::new([n, 1]), DType::F32), (Shape::new([n, 1]), DType::F32)];
        let [y, mean, rstd] = LnFusionOp::<B>::register([x, gamma, beta], outputs, Some(epsilon));
        (y, mean, rstd)
    }

    fn layer_norm_rows_backward(
        dy: FusionTensor<B::FusionRuntime>,
        x: FusionTensor<B::FusionRuntime>,
        gamma: FusionTensor<B::FusionRuntime>,
        mean: FusionTensor<B::FusionRuntime>,
        rstd: FusionTensor<B::FusionRuntime>,
    ) -> LnBackward<Self> {
        let (h, dtype) = (gamma.shape.clone(), gamma.dtype);
        let outputs = [(x.shape.clone(), x.dtype), (h.clone(), dtype), (h, dtype)];
        let [dx, dg, db] = LnFusionOp::<B>::register([dy, x, gamma, mean, rstd], outputs, None);
        (dx, dg, db)
    }
}

/// The layer-norm forward (`epsilon: Some`, inputs `x, γ, β`) or backward (`None`, inputs
/// `dy, x, γ, μ, r`) as a fusion-stream operation with three outputs.
#[derive(Debug)]
struct LnFusionOp<B> {
    desc: CustomOpIr,
    epsilon: Option<f32>,
    _b: PhantomData<B>,
}

impl<B: FusionBackend + LayerNormBackend> LnFusionOp<B> {
    /// Registers the operation on the inputs' stream; returns its outputs (shape, dtype each).
    fn register<const N: usize>(
        inputs: [FusionTensor<B::FusionRuntime>; N],
        outputs: [(Shape, DType); 3],
        epsilon: Option<f32>,
    ) -> [FusionTensor<B::FusionRuntime>; 3] {
        let client = inputs[0].client.clone();
        let streams = OperationStreams::with_inputs(&inputs);
        let outputs = outputs.map(|(shape, dtype)| TensorIr::uninit(client.create_empty_handle(), shape, dtype));
        let name = if epsilon.is_some() { "burn-parallel-layer-norm" } else { "burn-parallel-layer-norm-backward" };
        let desc = CustomOpIr::new(name, &inputs.map(|t| t.into_ir()), &outputs);
        let op = Self { desc: desc.clone(), epsilon, _b: PhantomData };
        client.register(streams, OperationIr::Custom(desc), op).try_into().expect("three outputs")
    }
}

impl<B: FusionBackend + LayerNormBackend> Operation<B::FusionRuntime> for LnFusionOp<B> {
    fn execute(&self, handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>) {
        let mut inputs = self.desc.inputs.iter().map(|t| handles.get_float_tensor::<B>(t)).collect::<Vec<_>>().into_iter();
        let mut next = || inputs.next().expect("as registered");
        let (a, b, c) = match self.epsilon {
            Some(epsilon) => B::layer_norm_rows(next(), next(), next(), epsilon),
            None => B::layer_norm_rows_backward(next(), next(), next(), next(), next()),
        };
        for (ir, tensor) in self.desc.outputs.iter().zip([a, b, c]) {
            handles.register_float_tensor::<B>(&ir.id, tensor);
        }
    }
}
