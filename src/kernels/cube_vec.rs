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

use burn_cubecl::cubecl;
use cubecl::prelude::*;

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
    #[define(F)] _dtype: StorageType,
) {
    let row = my_row();
    let valid = row < x.shape(0);
    let h = x.shape(1);
    let nv = h / x.vector_size();
    let base = row * nv;
    let tid = UNIT_POS_X as usize;
    let mut smem = SharedMemory::<f32>::new(comptime![block * rows_per_cube(block)]);
    // The row's share in the storage dtype (half the registers of f32 for bf16/f16), cast to
    // f32 at each use. (Loading γ/β here too, before the reductions, was slower on the H200.)
    let mut vals = Array::<Vector<F, N>>::new(per_unit);
    let mut acc = f32::new(0.0);
    #[unroll]
    for k in 0..per_unit {
        let c = tid + k * block;
        let mut v = Vector::<F, N>::cast_from(Vector::<f32, N>::new(0.0));
        if valid && c < nv {
            v = x[base + c];
        }
        vals[k] = v;
        acc += lanes_sum::<N>(Vector::cast_from(v));
    }
    let hf = f32::cast_from(h as u32);
    let m = row_sum(&mut smem, acc, block, plane) / hf;
    let mut acc2 = f32::new(0.0);
    #[unroll]
    for k in 0..per_unit {
        let c = tid + k * block;
        if c < nv {
            let d = Vector::<f32, N>::cast_from(vals[k]) - Vector::new(m);
            acc2 += lanes_sum::<N>(d * d);
        }
    }
    let var = row_sum(&mut smem, acc2, block, plane) / hf;
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

/// The whole backward in one pass over `dy` and `x`: each cube visits row groups `cube, cube +
/// cubes, …` (grid-stride; `rows` rows per group, one per `UNIT_POS_Y`); per row, `Σ g` and
/// `Σ g·x̂` (`g = dy·γ`) over the row's units, then `dx`; and, since a unit owns the same vector
/// columns in every row it visits, it sums `dy·x̂` and `dy` for them in registers. At the end the cube's row
/// slots are summed in shared memory and written as f32 partials `[cubes, 2h]` (dγ's, then dβ's),
/// summed over cubes by [`ln_partials_sum_kernel`].
#[cube(launch, launch_unchecked)]
pub fn ln_backward_fused_vec_kernel<F: Float, N: Size>(
    dy: &Tensor<Vector<F, N>>,
    x: &Tensor<Vector<F, N>>,
    gamma: &Tensor<Vector<F, N>>,
    mean: &Tensor<f32>,
    rstd: &Tensor<f32>,
    dx: &mut Tensor<Vector<F, N>>,
    partial: &mut Tensor<Vector<f32, N>>,
    #[comptime] block: usize,
    #[comptime] per_unit: usize,
    #[comptime] plane: bool,
    #[define(F)] _dtype: StorageType,
) {
    let n = x.shape(0);
    let h = x.shape(1);
    let nv = h / x.vector_size();
    let tid = UNIT_POS_X as usize;
    let ty = UNIT_POS_Y as usize;
    let rows = comptime![rows_per_cube(block)];
    let cube = CUBE_POS_X as usize;
    let cubes = CUBE_COUNT_X as usize;
    let groups = (n + rows - 1) / rows;
    let hf = f32::cast_from(h as u32);
    let mut smem = SharedMemory::<f32>::new(comptime![block * rows_per_cube(block)]);
    let mut dgs = Array::<Vector<f32, N>>::new(per_unit);
    let mut dbs = Array::<Vector<f32, N>>::new(per_unit);
    #[unroll]
    for k in 0..per_unit {
        dgs[k] = Vector::new(0.0);
        dbs[k] = Vector::new(0.0);
    }
    let mut gs = Array::<Vector<f32, N>>::new(per_unit);
    let mut xs = Array::<Vector<f32, N>>::new(per_unit);
    let mut group = cube;
    // Uniform over the cube (every unit takes the same trips), so the syncs inside are safe.
    while group < groups {
        let row = group * rows + ty;
        let valid = row < n;
        let base = row * nv;
        let mut m = f32::new(0.0);
        let mut r = f32::new(0.0);
        if valid {
            m = mean[row];
            r = rstd[row];
        }
        let mut sg = f32::new(0.0);
        let mut sgx = f32::new(0.0);
        #[unroll]
        for k in 0..per_unit {
            let c = tid + k * block;
            let mut g = Vector::<f32, N>::new(0.0);
            let mut xhat = Vector::<f32, N>::new(0.0);
            if valid && c < nv {
                let d = Vector::<f32, N>::cast_from(dy[base + c]);
                xhat = (Vector::<f32, N>::cast_from(x[base + c]) - Vector::new(m)) * Vector::new(r);
                dgs[k] += d * xhat;
                dbs[k] += d;
                g = d * Vector::<f32, N>::cast_from(gamma[c]);
            }
            gs[k] = g;
            xs[k] = xhat;
            sg += lanes_sum::<N>(g);
            sgx += lanes_sum::<N>(g * xhat);
        }
        let mean_g = row_sum(&mut smem, sg, block, plane) / hf;
        let mean_gx = row_sum(&mut smem, sgx, block, plane) / hf;
        #[unroll]
        for k in 0..per_unit {
            let c = tid + k * block;
            if valid && c < nv {
                let d = Vector::new(r) * (gs[k] - Vector::new(mean_g) - xs[k] * Vector::new(mean_gx));
                dx[base + c] = Vector::cast_from(d);
            }
        }
        group += cubes;
    }
    let out = cube * 2 * nv;
    if comptime![rows_per_cube(block) == 1] {
        #[unroll]
        for k in 0..per_unit {
            let c = tid + k * block;
            if c < nv {
                partial[out + c] = dgs[k];
                partial[out + nv + c] = dbs[k];
            }
        }
    } else {
        // Sum the cube's row slots (same columns, different rows) before writing.
        let mut vsm = SharedMemory::<Vector<f32, N>>::new(comptime![block * rows_per_cube(block)]);
        #[unroll]
        for k in 0..per_unit {
            let c = tid + k * block;
            let sg = slot_sum::<N>(&mut vsm, dgs[k], block);
            let sb = slot_sum::<N>(&mut vsm, dbs[k], block);
            if ty == 0 && c < nv {
                partial[out + c] = sg;
                partial[out + nv + c] = sb;
            }
        }
    }
}

/// Sum of `value` over the cube's row slots of this unit's column (`UNIT_POS_Y` = 0..rows).
#[cube]
fn slot_sum<N: Size>(vsm: &mut SharedMemory<Vector<f32, N>>, value: Vector<f32, N>, #[comptime] block: usize) -> Vector<f32, N> {
    let tid = UNIT_POS_X as usize;
    vsm[UNIT_POS_Y as usize * block + tid] = value;
    sync_cube();
    let mut s = vsm[tid];
    #[unroll]
    for q in 1..comptime![rows_per_cube(block)] {
        s += vsm[q * block + tid];
    }
    sync_cube();
    s
}

/// Column sums of f32 partials `[chunks, 2h]` into `out: [2h]` in the storage dtype (dγ, then
/// dβ): cube `(32 columns, lanes over chunks)`, the lanes summed in shared memory (`lanes` a
/// power of two).
#[cube(launch, launch_unchecked)]
pub fn ln_partials_sum_kernel<F: Float>(partial: &Tensor<f32>, out: &mut Tensor<F>, #[comptime] lanes: usize, #[define(F)] _dtype: StorageType) {
    let chunks = partial.shape(0);
    let width = partial.shape(1);
    let tx = UNIT_POS_X as usize;
    let ty = UNIT_POS_Y as usize;
    let col = CUBE_POS_X as usize * 32 + tx;
    let mut smem = SharedMemory::<f32>::new(comptime![32 * lanes]);
    let mut s = f32::new(0.0);
    if col < width {
        let mut chunk = ty;
        while chunk < chunks {
            s += partial[chunk * width + col];
            chunk += lanes;
        }
    }
    smem[ty * 32 + tx] = s;
    sync_cube();
    let mut stride = CUBE_DIM_Y as usize / 2;
    while stride > 0 {
        if ty < stride {
            let other = smem[(ty + stride) * 32 + tx];
            smem[ty * 32 + tx] += other;
        }
        sync_cube();
        stride /= 2;
    }
    if ty == 0 && col < width {
        out[col] = F::cast_from(smem[tx]);
    }
}
