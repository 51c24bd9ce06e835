//! `v4`'s forward: each unit caches its share of a row in registers as f32 (16-byte vector
//! loads, converted once; `block` units per row, `rows` rows per cube), the row's mean and
//! biased variance from reductions over the row's units, then `y = (x − μ)·r·γ + β` and per-row
//! f32 `μ` and `r = 1/√(σ² + ε)` (`rsqrt`).
//!
//! At short rows (h ≤ 1024, one plane per row) the kernel is bound by instruction issue, not
//! memory (Nsight Compute on the H200, [8192, 1024] bf16: 2 waves of cubes at 50% occupancy, 27%
//! of DRAM bandwidth, 10 cycles per issued instruction with 8 warps per scheduler), so the row
//! code is kept lean: the row count and width come as scalar arguments (no dependent load of the
//! tensors' metadata before the row's loads), plane sums are five unrolled xor-shuffles, means
//! are `× 1/h`, and each value is converted to f32 once (caching the storage dtype converted it
//! at each of three uses). Together 3–9% faster at h ≤ 1024 and the same or faster elsewhere
//! (BENCHMARKS.md).
//!
//! Experimental, off by default and not yet timed on a GPU (`set_affine_staging`): where a cube
//! holds several rows, γ/β are converted to f32 once per cube into shared memory (their loads
//! issued with the row's, one cube sync), saving each row two conversions per element and the
//! γ/β loads after its reductions.

use burn_cubecl::cubecl;
use cubecl::prelude::*;

use super::{lanes_sum, my_row, row_sum};

/// A row's layout in the cube (`block` units per row, `per_unit` vectors per unit; `plane`:
/// 32-lane plane reductions; `stage`: γ/β staged in shared memory as f32, see
/// [`stage_affine`]; `rms`: the RMS norm, see [`ln_forward_vec_kernel`]).
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
struct RowGeometry {
    block: usize,
    per_unit: usize,
    plane: bool,
    stage: bool,
    rms: bool,
}

/// The forward over `[n_rows, n_vec × N]` (`inv_h = 1/h`, rounded to f32), `rows` rows per cube.
/// With `rms`, the RMS norm `y = x·r·γ`, `r = 1/√(mean(x²) + ε)`: one reduction, β not read
/// (pass any `[h]` tensor of the dtype), `mean` not written (pass any f32 tensor).
#[cube(launch, launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn ln_forward_vec_kernel<F: Float, N: Size>(
    x: &Tensor<Vector<F, N>>,
    gamma: &Tensor<Vector<F, N>>,
    beta: &Tensor<Vector<F, N>>,
    y: &mut Tensor<Vector<F, N>>,
    mean: &mut Tensor<f32>,
    rstd: &mut Tensor<f32>,
    n_rows: u32,
    n_vec: u32,
    inv_h: f32,
    epsilon: f32,
    #[comptime] block: usize,
    #[comptime] rows: usize,
    #[comptime] per_unit: usize,
    #[comptime] plane: bool,
    #[comptime] stage: bool,
    #[comptime] rms: bool,
    #[define(F)] _dtype: StorageType,
) {
    let mut smem = SharedMemory::<f32>::new(comptime![block * rows]);
    let geo = comptime![RowGeometry { block, per_unit, plane, stage, rms }];
    let (n, nv) = (n_rows as usize, n_vec as usize);
    let row = my_row();
    let mut vals = Array::<Vector<f32, N>>::new(per_unit);
    load_row::<F, N>(x, &mut vals, row, n, nv, geo);
    let mut affine = SharedMemory::<Vector<f32, N>>::new(comptime![if stage { 2 * block * per_unit } else { 1 }]);
    if comptime![stage] {
        stage_affine::<F, N>(gamma, beta, &mut affine, nv, comptime![block * rows], geo);
        sync_cube();
    }
    normalize_row::<F, N>(&vals, row, n, nv, inv_h, gamma, beta, &affine, y, mean, rstd, epsilon, &mut smem, geo);
}

/// γ then β as f32 into `affine` (`2 × block × per_unit` vectors, γ's at `c`, β's at
/// `block × per_unit + c`), by all `units` units of the cube; the caller syncs the cube.
#[cube]
fn stage_affine<F: Float, N: Size>(
    gamma: &Tensor<Vector<F, N>>,
    beta: &Tensor<Vector<F, N>>,
    affine: &mut SharedMemory<Vector<f32, N>>,
    nv: usize,
    #[comptime] units: usize,
    #[comptime] geo: RowGeometry,
) {
    let cap = comptime![geo.block * geo.per_unit];
    let t = UNIT_POS as usize;
    #[unroll]
    for k in 0..comptime![(2 * cap + units - 1) / units] {
        let i = t + k * units;
        if i < cap {
            if i < nv {
                affine[i] = Vector::<f32, N>::cast_from(gamma[i]);
            }
        } else if i < 2 * cap {
            if i - cap < nv {
                affine[i] = Vector::<f32, N>::cast_from(beta[i - cap]);
            }
        }
    }
}

/// Loads this unit's share of `row` into `vals` as f32 (zeros past the row or the tensor).
#[cube]
fn load_row<F: Float, N: Size>(x: &Tensor<Vector<F, N>>, vals: &mut Array<Vector<f32, N>>, row: usize, n: usize, nv: usize, #[comptime] geo: RowGeometry) {
    let (block, per_unit) = comptime![(geo.block, geo.per_unit)];
    let valid = row < n;
    let base = row * nv;
    let tid = UNIT_POS_X as usize;
    #[unroll]
    for k in 0..per_unit {
        let c = tid + k * block;
        let mut v = Vector::<f32, N>::new(0.0);
        if valid && c < nv {
            v = Vector::<f32, N>::cast_from(x[base + c]);
        }
        vals[k] = v;
    }
}

/// Mean and (biased) variance of the row from the units' shares: the mean, then `Σ (x − μ)²`
/// from the registers (two reductions). With `geo.rms`: 0 and `mean(x²)` (one reduction).
#[cube]
fn row_stats<N: Size>(vals: &Array<Vector<f32, N>>, nv: usize, inv_h: f32, smem: &mut SharedMemory<f32>, #[comptime] geo: RowGeometry) -> (f32, f32) {
    let (block, per_unit, plane) = comptime![(geo.block, geo.per_unit, geo.plane)];
    let tid = UNIT_POS_X as usize;
    let mut m = f32::new(0.0);
    if comptime![!geo.rms] {
        let mut acc = f32::new(0.0);
        #[unroll]
        for k in 0..per_unit {
            acc += lanes_sum::<N>(vals[k]);
        }
        m = row_sum(smem, acc, block, plane, true) * inv_h;
    }
    let mut acc2 = f32::new(0.0);
    #[unroll]
    for k in 0..per_unit {
        if tid + k * block < nv {
            let d = vals[k] - Vector::new(m);
            acc2 += lanes_sum::<N>(d * d);
        }
    }
    (m, row_sum(smem, acc2, block, plane, true) * inv_h)
}

/// Normalises `row` from the units' cached shares `vals` (every unit of the cube calls this,
/// whether its row exists or not: it syncs), with γ/β from `affine` if staged there.
#[cube]
#[allow(clippy::too_many_arguments)]
fn normalize_row<F: Float, N: Size>(
    vals: &Array<Vector<f32, N>>,
    row: usize,
    n: usize,
    nv: usize,
    inv_h: f32,
    gamma: &Tensor<Vector<F, N>>,
    beta: &Tensor<Vector<F, N>>,
    affine: &SharedMemory<Vector<f32, N>>,
    y: &mut Tensor<Vector<F, N>>,
    mean: &mut Tensor<f32>,
    rstd: &mut Tensor<f32>,
    epsilon: f32,
    smem: &mut SharedMemory<f32>,
    #[comptime] geo: RowGeometry,
) {
    let (block, per_unit) = comptime![(geo.block, geo.per_unit)];
    let valid = row < n;
    let base = row * nv;
    let tid = UNIT_POS_X as usize;
    let (m, var) = row_stats::<N>(vals, nv, inv_h, smem, geo);
    let r = f32::inverse_sqrt(var + epsilon);
    #[unroll]
    for k in 0..per_unit {
        let c = tid + k * block;
        if valid && c < nv {
            let xhat = (vals[k] - Vector::new(m)) * Vector::new(r);
            if comptime![geo.rms] {
                if comptime![geo.stage] {
                    y[base + c] = Vector::cast_from(xhat * affine[c]);
                } else {
                    y[base + c] = Vector::cast_from(xhat * Vector::<f32, N>::cast_from(gamma[c]));
                }
            } else if comptime![geo.stage] {
                y[base + c] = Vector::cast_from(xhat * affine[c] + affine[comptime![block * per_unit] + c]);
            } else {
                let g = Vector::<f32, N>::cast_from(gamma[c]);
                let b = Vector::<f32, N>::cast_from(beta[c]);
                y[base + c] = Vector::cast_from(xhat * g + b);
            }
        }
    }
    if valid && tid == 0 {
        if comptime![!geo.rms] {
            mean[row] = m;
        }
        rstd[row] = r;
    }
}
