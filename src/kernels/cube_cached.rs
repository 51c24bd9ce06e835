//! Register-cached variants of the row kernels (`v2`): each unit keeps its `per_unit` strided
//! elements of the row in registers, so `x` (and `dy`) are read from global memory once instead
//! of two or three times. Rows up to `BLOCK × MAX_PER_UNIT` wide; wider rows use the `v1`
//! kernels. Same f32 accumulation as `v1`; `v3` replaces the shared-memory tree reductions by
//! plane (warp) reductions where the device has plane ops (CUDA; not lavapipe, where `v3` falls
//! back to `v2`, so `v3` has only been compiled, not run). Which variant runs is chosen by
//! [`set_variant`](super::set_variant) (default from `BURN_PARALLEL_LN_KERNEL`, else `v2`); the
//! GPU benchmark times both.

use burn_cubecl::cubecl;
use cubecl::prelude::*;

/// Most elements a unit caches (rows of up to `BLOCK × MAX_PER_UNIT`).
pub const MAX_PER_UNIT: usize = 32;

/// The comptime cache size for a row of `h` with `block` units: the next power of two ≥ h/block
/// (few distinct kernels), or `None` past [`MAX_PER_UNIT`].
pub fn per_unit(h: usize, block: usize) -> Option<usize> {
    let need = h.div_ceil(block).max(1).next_power_of_two();
    (need <= MAX_PER_UNIT).then_some(need)
}

/// Sum of `value` over the cube by a shared-memory tree (`smem` holds one slot per unit); every
/// unit gets the total. Shared with the v1 kernels.
#[cube]
pub fn block_sum(smem: &mut SharedMemory<f32>, value: f32) -> f32 {
    let tid = UNIT_POS_X as usize;
    smem[tid] = value;
    sync_cube();
    let mut stride = CUBE_DIM_X as usize / 2;
    while stride > 0 {
        if tid < stride {
            let other = smem[tid + stride];
            smem[tid] += other;
        }
        sync_cube();
        stride /= 2;
    }
    let total = smem[0];
    sync_cube();
    total
}

/// Block sum by plane (warp) reductions: each plane sums its values, lane 0 of each plane writes
/// the partial, every plane sums the partials (two cube syncs instead of log2(block)).
#[cube]
fn block_sum_plane(smem: &mut SharedMemory<f32>, value: f32) -> f32 {
    let lane = UNIT_POS_PLANE as usize;
    let plane = UNIT_POS_X as usize / PLANE_DIM as usize;
    let planes = CUBE_DIM_X as usize / PLANE_DIM as usize;
    let partial = plane_sum(value);
    if lane == 0 {
        smem[plane] = partial;
    }
    sync_cube();
    let mut v = f32::new(0.0);
    if lane < planes {
        v = smem[lane];
    }
    let total = plane_sum(v);
    sync_cube();
    total
}

/// [`block_sum`] or [`block_sum_plane`], chosen at compile time.
#[cube]
fn reduce(smem: &mut SharedMemory<f32>, value: f32, #[comptime] plane: bool) -> f32 {
    if comptime![plane] {
        block_sum_plane(smem, value)
    } else {
        block_sum(smem, value)
    }
}

#[cube(launch)]
pub fn ln_forward_cached_kernel<F: Float>(
    x: &Tensor<F>,
    gamma: &Tensor<F>,
    beta: &Tensor<F>,
    y: &mut Tensor<F>,
    mean: &mut Tensor<f32>,
    rstd: &mut Tensor<f32>,
    epsilon: f32,
    #[comptime] block: usize,
    #[comptime] per_unit: usize,
    #[comptime] plane: bool,
    #[define(F)] _dtype: StorageType,
) {
    let row = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) as usize;
    if row >= x.shape(0) {
        terminate!();
    }
    let h = x.shape(1);
    let base = row * h;
    let tid = UNIT_POS_X as usize;
    let mut smem = SharedMemory::<f32>::new(block);
    let mut vals = Array::<f32>::new(per_unit);
    let mut acc = f32::new(0.0);
    #[unroll]
    for k in 0..per_unit {
        let c = tid + k * block;
        let mut v = f32::new(0.0);
        if c < h {
            v = f32::cast_from(x[base + c]);
        }
        vals[k] = v;
        acc += v;
    }
    let hf = f32::cast_from(h as u32);
    let m = reduce(&mut smem, acc, plane) / hf;
    let mut acc2 = f32::new(0.0);
    #[unroll]
    for k in 0..per_unit {
        let c = tid + k * block;
        if c < h {
            let d = vals[k] - m;
            acc2 += d * d;
        }
    }
    let var = reduce(&mut smem, acc2, plane) / hf;
    let r = f32::new(1.0) / f32::sqrt(var + epsilon);
    #[unroll]
    for k in 0..per_unit {
        let c = tid + k * block;
        if c < h {
            y[base + c] = F::cast_from((vals[k] - m) * r * f32::cast_from(gamma[c]) + f32::cast_from(beta[c]));
        }
    }
    if tid == 0 {
        mean[row] = m;
        rstd[row] = r;
    }
}

#[cube(launch)]
pub fn ln_backward_dx_cached_kernel<F: Float>(
    dy: &Tensor<F>,
    x: &Tensor<F>,
    gamma: &Tensor<F>,
    mean: &Tensor<f32>,
    rstd: &Tensor<f32>,
    dx: &mut Tensor<F>,
    #[comptime] block: usize,
    #[comptime] per_unit: usize,
    #[comptime] plane: bool,
    #[define(F)] _dtype: StorageType,
) {
    let row = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) as usize;
    if row >= x.shape(0) {
        terminate!();
    }
    let h = x.shape(1);
    let base = row * h;
    let tid = UNIT_POS_X as usize;
    let m = mean[row];
    let r = rstd[row];
    let mut smem = SharedMemory::<f32>::new(block);
    let mut gs = Array::<f32>::new(per_unit);
    let mut xs = Array::<f32>::new(per_unit);
    let mut sg = f32::new(0.0);
    let mut sgx = f32::new(0.0);
    #[unroll]
    for k in 0..per_unit {
        let c = tid + k * block;
        let mut g = f32::new(0.0);
        let mut xhat = f32::new(0.0);
        if c < h {
            g = f32::cast_from(dy[base + c]) * f32::cast_from(gamma[c]);
            xhat = (f32::cast_from(x[base + c]) - m) * r;
        }
        gs[k] = g;
        xs[k] = xhat;
        sg += g;
        sgx += g * xhat;
    }
    let hf = f32::cast_from(h as u32);
    let mean_g = reduce(&mut smem, sg, plane) / hf;
    let mean_gx = reduce(&mut smem, sgx, plane) / hf;
    #[unroll]
    for k in 0..per_unit {
        let c = tid + k * block;
        if c < h {
            dx[base + c] = F::cast_from(r * (gs[k] - mean_g - xs[k] * mean_gx));
        }
    }
}
