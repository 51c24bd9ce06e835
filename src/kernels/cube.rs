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
//! The RMS norm runs `v4`'s kernels with their `rms` switch (one reduction per row, no β, no
//! `μ`) where `v4` takes the row, else the composed ops.
//!
//! Under `Fusion` (burn's default `Wgpu`/`Cuda`) the kernels are lazy custom operations of the
//! fusion stream (`fusion.rs`).

use burn::tensor::{DType, Shape, Tensor, TensorMetadata, TensorPrimitive};
use burn_cubecl::cubecl::{CubeCount, CubeDim};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};

use super::{cube_vec, LayerNormBackend, LnBackward, LnForward, RmsPair};

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

mod fusion;
pub(super) mod kernel;
pub(super) mod plan;
use plan::{backward_plan, forward_plan, partials_lanes, BackwardPlan, ForwardPlan, RowDevice};

/// The kernels index γ/β (and `dy`) by `x`'s width and read them as `x`'s dtype, without
/// CubeCL's bounds checks: anything else must stop here.
fn check_operands<R: CubeRuntime>(x: &CubeTensor<R>, params: &[(&str, &CubeTensor<R>)], like_x: &[(&str, &CubeTensor<R>)]) {
    let [_, h] = x.shape().dims::<2>();
    for (name, p) in params {
        assert!(
            p.shape().as_slice() == [h] && p.dtype == x.dtype,
            "norm kernels: {name} is {:?} {:?}, x {:?} {:?}",
            p.shape().as_slice(),
            p.dtype,
            x.shape().as_slice(),
            x.dtype
        );
    }
    for (name, t) in like_x {
        assert!(
            t.shape() == x.shape() && t.dtype == x.dtype,
            "norm kernels: {name} is {:?} {:?}, x {:?} {:?}",
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
            forward_v4(&x, &gamma, &beta, [&y, &mean, &rstd], epsilon, p, false);
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
            return fused_backward::<R, F, I, BT>(dy, x, gamma, mean, rstd, plan, false);
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

    fn rms_norm_fused(h: usize, dtype: DType, device: &R::Device) -> bool {
        let dev = RowDevice::of(&R::client(device));
        forward_plan(&dev, h, dtype).is_some() && backward_plan(&dev, h, dtype).is_some()
    }

    fn rms_norm_rows(x: CubeTensor<R>, gamma: CubeTensor<R>, epsilon: f32) -> RmsPair<Self> {
        let (x, gamma) = (into_contiguous(x), into_contiguous(gamma));
        check_operands(&x, &[("gamma", &gamma)], &[]);
        let [n, h] = x.shape().dims::<2>();
        let plan = forward_plan(&RowDevice::of(&x.client), h, x.dtype).filter(|_| u32::try_from(n).is_ok());
        let Some(p) = plan else { return super::composed_rms_norm_rows::<Self>(x, gamma, epsilon) };
        let y = empty(&x, x.shape(), x.dtype);
        let rstd = empty(&x, Shape::new([n, 1]), DType::F32);
        // The kernel reads no β and writes no μ under `rms`: γ and a one-element tensor stand in.
        let unused = empty(&x, Shape::new([1, 1]), DType::F32);
        forward_v4(&x, &gamma, &gamma, [&y, &unused, &rstd], epsilon, p, true);
        (y, rstd)
    }

    fn rms_norm_rows_backward(dy: CubeTensor<R>, x: CubeTensor<R>, gamma: CubeTensor<R>, rstd: CubeTensor<R>) -> RmsPair<Self> {
        let (dy, x, gamma, rstd) = (into_contiguous(dy), into_contiguous(x), into_contiguous(gamma), into_contiguous(rstd));
        check_operands(&x, &[("gamma", &gamma)], &[("dy", &dy)]);
        let h = x.shape().dims::<2>()[1];
        let Some(plan) = backward_plan(&RowDevice::of(&x.client), h, x.dtype) else {
            return super::composed_rms_norm_rows_backward::<Self>(dy, x, gamma, rstd);
        };
        // μ is loaded but unused under `rms`: r stands in (same shape, read-only).
        let (dx, dg, _) = fused_backward::<R, F, I, BT>(dy, x, gamma, rstd.clone(), rstd, plan, true);
        (dx, dg)
    }
}

/// `v4`'s forward launch (`outputs`: y, μ, r; with `rms` β is not read and μ not written).
fn forward_v4<R: CubeRuntime>(
    x: &CubeTensor<R>,
    gamma: &CubeTensor<R>,
    beta: &CubeTensor<R>,
    outputs: [&CubeTensor<R>; 3],
    epsilon: f32,
    p: ForwardPlan,
    rms: bool,
) {
    let [n, h] = x.shape().dims::<2>();
    let [y, mean, rstd] = outputs;
    // v4's forward takes the row count as a u32 argument (v1 reads it from the tensor).
    launch_v4!(cube_vec::ln_forward_vec_kernel;
        &x.client,
        rows_grid(n.div_ceil(p.rows)),
        CubeDim::new_2d(p.block as u32, p.rows as u32),
        p.vector,
        x.clone().into_tensor_arg(),
        gamma.clone().into_tensor_arg(),
        beta.clone().into_tensor_arg(),
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
        rms,
        x.dtype.into(),
    );
}

/// The one-pass `v4` backward ([`cube_vec::ln_backward_fused_vec_kernel`]): `dx` and f32 dγ/dβ
/// partials per cube, then [`partial_sums`]. Cubes: one per `backward_rows()` rows (default 64:
/// the partials, `2h` f32 per cube, stay small next to the rows' `3h` elements of traffic), but
/// at least two per multiprocessor. On the H200 (BENCHMARKS.md) 64 rows per cube beat 16 and 4
/// at [16384, 4096]; at [4096, 8192], 64 rows would leave 64 cubes for 132 multiprocessors.
/// With `rms`, the RMS norm's (μ loaded but unused; the third output is zeros).
fn fused_backward<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    dy: CubeTensor<R>,
    x: CubeTensor<R>,
    gamma: CubeTensor<R>,
    mean: CubeTensor<R>,
    rstd: CubeTensor<R>,
    plan: BackwardPlan,
    rms: bool,
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
        rms,
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
