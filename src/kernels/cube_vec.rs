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

use burn_cubecl::cubecl;
use cubecl::prelude::*;

/// Launch geometry for rows of `h` elements in vectors of `vector` elements with at most
/// `max_units` units per cube: `(block, rows per cube, vectors per unit)`, or `None` if the row
/// is too wide (then `v1` runs). `block` is a power of two from 32 (one CUDA plane). Each unit
/// caches at most `cache` f32 values per cached array — except that a row fitting one 32-unit
/// plane with ≤ 32 values per unit stays in that plane (reductions without shared memory or cube
/// syncs). Measured on the H200 (BENCHMARKS.md): `cache` = 16 is fastest for h ≥ 4096 (more
/// units in flight, no register pressure: 32 values of bf16 × 8 vectors spilled), one plane for
/// h ≤ 1024.
pub fn geometry(h: usize, vector: usize, max_units: usize, cache: usize) -> Option<(usize, usize, usize)> {
    let nv = h / vector;
    if nv.div_ceil(32) * vector <= 32 {
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

#[cube(launch)]
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
    let mut vals = Array::<Vector<f32, N>>::new(per_unit);
    let mut acc = f32::new(0.0);
    #[unroll]
    for k in 0..per_unit {
        let c = tid + k * block;
        let mut v = Vector::<f32, N>::new(0.0);
        if valid && c < nv {
            v = Vector::cast_from(x[base + c]);
        }
        vals[k] = v;
        acc += lanes_sum::<N>(v);
    }
    let hf = f32::cast_from(h as u32);
    let m = row_sum(&mut smem, acc, block, plane) / hf;
    let mut acc2 = f32::new(0.0);
    #[unroll]
    for k in 0..per_unit {
        let c = tid + k * block;
        if c < nv {
            let d = vals[k] - Vector::new(m);
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
            y[base + c] = Vector::cast_from((vals[k] - Vector::new(m)) * Vector::new(r) * g + b);
        }
    }
    if valid && tid == 0 {
        mean[row] = m;
        rstd[row] = r;
    }
}

#[cube(launch)]
pub fn ln_backward_dx_vec_kernel<F: Float, N: Size>(
    dy: &Tensor<Vector<F, N>>,
    x: &Tensor<Vector<F, N>>,
    gamma: &Tensor<Vector<F, N>>,
    mean: &Tensor<f32>,
    rstd: &Tensor<f32>,
    dx: &mut Tensor<Vector<F, N>>,
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
    let mut m = f32::new(0.0);
    let mut r = f32::new(0.0);
    if valid {
        m = mean[row];
        r = rstd[row];
    }
    let mut smem = SharedMemory::<f32>::new(comptime![block * rows_per_cube(block)]);
    let mut gs = Array::<Vector<f32, N>>::new(per_unit);
    let mut xs = Array::<Vector<f32, N>>::new(per_unit);
    let mut sg = f32::new(0.0);
    let mut sgx = f32::new(0.0);
    #[unroll]
    for k in 0..per_unit {
        let c = tid + k * block;
        let mut g = Vector::<f32, N>::new(0.0);
        let mut xhat = Vector::<f32, N>::new(0.0);
        if valid && c < nv {
            g = Vector::<f32, N>::cast_from(dy[base + c]) * Vector::<f32, N>::cast_from(gamma[c]);
            xhat = (Vector::<f32, N>::cast_from(x[base + c]) - Vector::new(m)) * Vector::new(r);
        }
        gs[k] = g;
        xs[k] = xhat;
        sg += lanes_sum::<N>(g);
        sgx += lanes_sum::<N>(g * xhat);
    }
    let hf = f32::cast_from(h as u32);
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
}

/// `dγ, dβ` partials: unit = one vector of columns, cube y = a chunk of `rows_per_chunk` rows;
/// writes f32 partials `[chunks, 2h]` (dγ's, then dβ's; summed over chunks by the caller in one
/// reduction).
#[cube(launch)]
pub fn ln_backward_params_vec_kernel<F: Float, N: Size>(
    dy: &Tensor<Vector<F, N>>,
    x: &Tensor<Vector<F, N>>,
    mean: &Tensor<f32>,
    rstd: &Tensor<f32>,
    partial: &mut Tensor<Vector<f32, N>>,
    rows_per_chunk: u32,
    #[define(F)] _dtype: StorageType,
) {
    let n = x.shape(0);
    let nv = x.shape(1) / x.vector_size();
    let col = (CUBE_POS_X * CUBE_DIM_X + UNIT_POS_X) as usize;
    let chunk = CUBE_POS_Y as usize;
    if col < nv {
        let start = chunk * rows_per_chunk as usize;
        let mut end = start + rows_per_chunk as usize;
        if end > n {
            end = n;
        }
        let mut sg = Vector::<f32, N>::new(0.0);
        let mut sb = Vector::<f32, N>::new(0.0);
        let mut row = start;
        while row < end {
            let d = Vector::<f32, N>::cast_from(dy[row * nv + col]);
            let xhat = (Vector::<f32, N>::cast_from(x[row * nv + col]) - Vector::new(mean[row])) * Vector::new(rstd[row]);
            sg += d * xhat;
            sb += d;
            row += 1;
        }
        partial[chunk * 2 * nv + col] = sg;
        partial[chunk * 2 * nv + nv + col] = sb;
    }
}
