//! Vectorized row kernels (`v4`, the default): each unit caches its share of the row in registers
//! (`x`, and `dy` backward, read from global memory once), with 16-byte vector loads and stores
//! (`Vector<F, N>`: 4 × f32 or 8 × bf16/f16 where the runtime loads 128 bits), and the number of
//! units per row sized to the row (`block` = 32…1024 so that each unit caches ≤ 16 values,
//! several rows per cube when a row needs fewer than 256 units), so short rows (h = 768) do not
//! leave most of a 256-unit cube idle and long bf16 rows do not spill registers.
//!
//! Reductions are per row: with plane ops of exactly 32 lanes (CUDA) each plane sums its lanes and,
//! when a row spans several planes, the planes' partials meet in shared memory (one cube sync);
//! without plane ops (e.g. lavapipe), a shared-memory tree over the row's units. The layout of a
//! cube is `(block, rows)`: unit `(x, y)` works on row `cube × rows + y`, vector columns
//! `x, x + block, …`. Accumulation in f32 as in `v1`.
//!
//! The backward is one pass over `dy` and `x` ([`ln_backward_fused_vec_kernel`]: `dx` and f32
//! dγ/dβ partials per cube) and one column sum ([`ln_partials_sum_kernel`]): two launches. On the
//! H200 it beat the earlier two-kernel backward (`dx`, then dγ/dβ partials re-reading `dy` and
//! `x`) at every benchmarked shape (BENCHMARKS.md), which was removed.
//!
//! Every global and shared-memory access is guarded by an explicit bound (`valid`, `c < nv`,
//! `col < width`, …), so the kernels may launch without CubeCL's per-access bounds checks
//! (`launch_unchecked`, the default; see `set_bounds_checks`).

// `#[cube]` code expands operators, not `is_multiple_of`/`div_ceil` method calls; a comptime
// branch (`if comptime![..]`) stays apart from the runtime condition inside it.
#![allow(clippy::manual_is_multiple_of, clippy::manual_div_ceil, clippy::collapsible_if)]

use burn_cubecl::cubecl;
use cubecl::prelude::*;

mod backward;
pub use backward::{ln_backward_fused_vec_kernel, ln_partials_sum_kernel};

/// Launch geometry for rows of `h` elements in vectors of `vector` elements with at most
/// `max_units` units per cube: `(block, rows per cube, vectors per unit)`, or `None` if the row
/// is too wide (then `v1` runs: past `1024 × cache` elements). `block` is a
/// power of two from 32 (one CUDA plane). Each unit caches at most `cache` f32 values per cached
/// array — except, with `one_plane`, that a row fitting one 32-unit plane with ≤ 32 values per
/// unit stays in that plane (reductions without shared memory or cube syncs). Measured on the
/// H200 (BENCHMARKS.md): `cache` = 16 is fastest for h ≥ 4096 (more units in flight, no register
/// pressure: 32 values of bf16 × 8 vectors spilled), one plane for the forward at h ≤ 1024; the
/// one-pass backward, with four cached arrays, takes the plain cache.
pub fn geometry(h: usize, vector: usize, max_units: usize, cache: usize, one_plane: bool) -> Option<(usize, usize, usize)> {
    let nv = h / vector;
    if one_plane && nv.div_ceil(32) * vector <= 32 {
        return Some((32, rows_per_cube(32), nv.div_ceil(32).max(1)));
    }
    let max_per_unit = (cache / vector).max(1);
    let max_block = max_units.min(1024);
    let mut block = 32;
    while nv.div_ceil(block) > max_per_unit && block * 2 <= max_block {
        block *= 2;
    }
    let per_unit = nv.div_ceil(block).max(1);
    (per_unit <= max_per_unit).then_some((block, rows_per_cube(block), per_unit))
}

/// Rows per cube for `block` units per row: 256 units per cube where rows are short (the
/// kernels size their shared memory `block × rows` from this too).
pub fn rows_per_cube(block: usize) -> usize {
    (256 / block).max(1)
}

/// Sum of `value` over the `block` units of this unit's row (cube layout `(block, rows)`); every
/// unit of the row gets the total. `smem` has `block × rows` slots. `plane`: 32-lane plane ops.
#[cube]
fn row_sum(smem: &mut SharedMemory<f32>, value: f32, #[comptime] block: usize, #[comptime] plane: bool) -> f32 {
    let tid = UNIT_POS_X as usize;
    let base = UNIT_POS_Y as usize * block;
    let mut total = f32::new(0.0);
    if comptime![plane] {
        let partial = plane_sum(value);
        if comptime![block == 32] {
            total = partial;
        } else {
            let planes = comptime![block / 32];
            if tid % 32 == 0 {
                smem[base + tid / 32] = partial;
            }
            sync_cube();
            #[unroll]
            for p in 0..planes {
                total += smem[base + p];
            }
            sync_cube();
        }
    } else {
        smem[base + tid] = value;
        sync_cube();
        let mut stride = CUBE_DIM_X as usize / 2;
        while stride > 0 {
            if tid < stride {
                let other = smem[base + tid + stride];
                smem[base + tid] += other;
            }
            sync_cube();
            stride /= 2;
        }
        total = smem[base];
        sync_cube();
    }
    total
}

/// [`row_sum`] of two values at once (one exchange through shared memory, `smem` with
/// `2 × block × rows` slots).
#[cube]
fn row_sum2(smem: &mut SharedMemory<f32>, a: f32, b: f32, #[comptime] block: usize, #[comptime] plane: bool) -> (f32, f32) {
    let tid = UNIT_POS_X as usize;
    let base = UNIT_POS_Y as usize * block;
    let second = comptime![block * rows_per_cube(block)];
    let mut ta = f32::new(0.0);
    let mut tb = f32::new(0.0);
    if comptime![plane] {
        let pa = plane_sum(a);
        let pb = plane_sum(b);
        if comptime![block == 32] {
            ta = pa;
            tb = pb;
        } else {
            if tid % 32 == 0 {
                smem[base + tid / 32] = pa;
                smem[second + base + tid / 32] = pb;
            }
            sync_cube();
            #[unroll]
            for p in 0..comptime![block / 32] {
                ta += smem[base + p];
                tb += smem[second + base + p];
            }
            sync_cube();
        }
    } else {
        smem[base + tid] = a;
        smem[second + base + tid] = b;
        sync_cube();
        let mut stride = CUBE_DIM_X as usize / 2;
        while stride > 0 {
            if tid < stride {
                let oa = smem[base + tid + stride];
                let ob = smem[second + base + tid + stride];
                smem[base + tid] += oa;
                smem[second + base + tid] += ob;
            }
            sync_cube();
            stride /= 2;
        }
        ta = smem[base];
        tb = smem[second + base];
        sync_cube();
    }
    (ta, tb)
}

/// Sum of a vector's lanes.
#[cube]
fn lanes_sum<N: Size>(v: Vector<f32, N>) -> f32 {
    let mut s = f32::new(0.0);
    #[unroll]
    for j in 0..v.vector_size() {
        s += v[j];
    }
    s
}

/// This unit's row (may be ≥ n in the last cube: such units still reach every cube sync).
#[cube]
fn my_row() -> usize {
    (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) as usize * CUBE_DIM_Y as usize + UNIT_POS_Y as usize
}

/// The forward. Without `stream`, one row group per cube. With `stream` (a tuning option,
/// `set_forward_stream`), a fixed grid of cubes walks the row groups (grid-stride) and loads the
/// next group's row while it normalises the current one (two register caches), so loads stay in
/// flight through the reductions and the writes.
#[cube(launch, launch_unchecked)]
pub fn ln_forward_vec_kernel<F: Float, N: Size>(
    x: &Tensor<Vector<F, N>>,
    gamma: &Tensor<Vector<F, N>>,
    beta: &Tensor<Vector<F, N>>,
    y: &mut Tensor<Vector<F, N>>,
    mean: &mut Tensor<f32>,
    rstd: &mut Tensor<f32>,
    epsilon: f32,
    #[comptime] block: usize,
    #[comptime] per_unit: usize,
    #[comptime] plane: bool,
    #[comptime] one_reduction: bool,
    #[comptime] stream: bool,
    #[define(F)] _dtype: StorageType,
) {
    // Two slots per unit for `row_sum2` (one reduction of two sums), else one (as `row_sum`).
    let mut smem = SharedMemory::<f32>::new(comptime![(if one_reduction { 2 } else { 1 }) * block * rows_per_cube(block)]);
    // The row's share in the storage dtype (half the registers of f32 for bf16/f16), cast to
    // f32 at each use. (Loading γ/β here too, before the reductions, was slower on the H200.)
    let mut vals = Array::<Vector<F, N>>::new(per_unit);
    if comptime![stream] {
        let rows = comptime![rows_per_cube(block)];
        let ty = UNIT_POS_Y as usize;
        let groups = (x.shape(0) + rows - 1) / rows;
        let cubes = CUBE_COUNT_X as usize;
        let mut group = CUBE_POS_X as usize;
        let mut next = Array::<Vector<F, N>>::new(per_unit);
        let mut shift = load_row::<F, N>(x, &mut vals, group * rows + ty, block, per_unit, one_reduction);
        // Uniform over the cube (every unit takes the same trips), so the syncs inside are safe.
        while group < groups {
            let next_shift = load_row::<F, N>(x, &mut next, (group + cubes) * rows + ty, block, per_unit, one_reduction);
            normalize_row::<F, N>(&vals, shift, group * rows + ty, gamma, beta, y, mean, rstd, epsilon, &mut smem, block, per_unit, plane, one_reduction);
            #[unroll]
            for k in 0..per_unit {
                vals[k] = next[k];
            }
            shift = next_shift;
            group += cubes;
        }
    } else {
        let row = my_row();
        let shift = load_row::<F, N>(x, &mut vals, row, block, per_unit, one_reduction);
        normalize_row::<F, N>(&vals, shift, row, gamma, beta, y, mean, rstd, epsilon, &mut smem, block, per_unit, plane, one_reduction);
    }
}

/// Loads this unit's share of `row` into `vals` (zeros past the row or the tensor). Returns the
/// row's first element with `with_shift` (the shift of the one-reduction variance), else 0 (and
/// 0 past the tensor).
#[cube]
fn load_row<F: Float, N: Size>(
    x: &Tensor<Vector<F, N>>,
    vals: &mut Array<Vector<F, N>>,
    row: usize,
    #[comptime] block: usize,
    #[comptime] per_unit: usize,
    #[comptime] with_shift: bool,
) -> f32 {
    let valid = row < x.shape(0);
    let nv = x.shape(1) / x.vector_size();
    let base = row * nv;
    let tid = UNIT_POS_X as usize;
    #[unroll]
    for k in 0..per_unit {
        let c = tid + k * block;
        let mut v = Vector::<F, N>::cast_from(Vector::<f32, N>::new(0.0));
        if valid && c < nv {
            v = x[base + c];
        }
        vals[k] = v;
    }
    let mut shift = f32::new(0.0);
    if comptime![with_shift] {
        if valid {
            shift = f32::cast_from(x[base][0]);
        }
    }
    shift
}

/// Mean and (biased) variance of the row from the units' shares: the mean, then `Σ (x − μ)²`
/// from the registers (two reductions).
#[cube]
fn row_stats<F: Float, N: Size>(
    vals: &Array<Vector<F, N>>,
    nv: usize,
    hf: f32,
    smem: &mut SharedMemory<f32>,
    #[comptime] block: usize,
    #[comptime] per_unit: usize,
    #[comptime] plane: bool,
) -> (f32, f32) {
    let tid = UNIT_POS_X as usize;
    let mut acc = f32::new(0.0);
    #[unroll]
    for k in 0..per_unit {
        acc += lanes_sum::<N>(Vector::cast_from(vals[k]));
    }
    let m = row_sum(smem, acc, block, plane) / hf;
    let mut acc2 = f32::new(0.0);
    #[unroll]
    for k in 0..per_unit {
        if tid + k * block < nv {
            let d = Vector::<f32, N>::cast_from(vals[k]) - Vector::new(m);
            acc2 += lanes_sum::<N>(d * d);
        }
    }
    (m, row_sum(smem, acc2, block, plane) / hf)
}

/// [`row_stats`] from one reduction of `Σ (x − s)` and `Σ (x − s)²`, shifted by the row's first
/// element `s`: `var = E[(x−s)²] − E[x−s]²`, whose relative rounding error is of order
/// `ε·(1 + (μ − s)²/σ²)`, not `ε·μ²/σ²` as without the shift: `(μ − s)²/σ²` is about 1 for a
/// typical first element and at most `h − 1` (an extreme outlier: ≈ 1e-3 at h = 16384).
#[cube]
fn row_stats_shifted<F: Float, N: Size>(
    vals: &Array<Vector<F, N>>,
    shift: f32,
    nv: usize,
    hf: f32,
    smem: &mut SharedMemory<f32>,
    #[comptime] block: usize,
    #[comptime] per_unit: usize,
    #[comptime] plane: bool,
) -> (f32, f32) {
    let tid = UNIT_POS_X as usize;
    let mut acc = f32::new(0.0);
    let mut acc2 = f32::new(0.0);
    #[unroll]
    for k in 0..per_unit {
        if tid + k * block < nv {
            let d = Vector::<f32, N>::cast_from(vals[k]) - Vector::new(shift);
            acc += lanes_sum::<N>(d);
            acc2 += lanes_sum::<N>(d * d);
        }
    }
    let (s1, s2) = row_sum2(smem, acc, acc2, block, plane);
    let d = s1 / hf;
    (shift + d, f32::max(s2 / hf - d * d, 0.0))
}

/// Normalises `row` from the units' cached shares `vals` (every unit of the cube calls this,
/// whether its row exists or not: it syncs): [`row_stats`], or [`row_stats_shifted`] with
/// `one_reduction`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn normalize_row<F: Float, N: Size>(
    vals: &Array<Vector<F, N>>,
    shift: f32,
    row: usize,
    gamma: &Tensor<Vector<F, N>>,
    beta: &Tensor<Vector<F, N>>,
    y: &mut Tensor<Vector<F, N>>,
    mean: &mut Tensor<f32>,
    rstd: &mut Tensor<f32>,
    epsilon: f32,
    smem: &mut SharedMemory<f32>,
    #[comptime] block: usize,
    #[comptime] per_unit: usize,
    #[comptime] plane: bool,
    #[comptime] one_reduction: bool,
) {
    let valid = row < y.shape(0);
    let h = y.shape(1);
    let nv = h / y.vector_size();
    let base = row * nv;
    let tid = UNIT_POS_X as usize;
    let hf = f32::cast_from(h as u32);
    let (m, var) = if comptime![one_reduction] {
        row_stats_shifted::<F, N>(vals, shift, nv, hf, smem, block, per_unit, plane)
    } else {
        row_stats::<F, N>(vals, nv, hf, smem, block, per_unit, plane)
    };
    let r = f32::new(1.0) / f32::sqrt(var + epsilon);
    #[unroll]
    for k in 0..per_unit {
        let c = tid + k * block;
        if valid && c < nv {
            let g = Vector::<f32, N>::cast_from(gamma[c]);
            let b = Vector::<f32, N>::cast_from(beta[c]);
            y[base + c] = Vector::cast_from((Vector::<f32, N>::cast_from(vals[k]) - Vector::new(m)) * Vector::new(r) * g + b);
        }
    }
    if valid && tid == 0 {
        mean[row] = m;
        rstd[row] = r;
    }
}
