//! `v4`'s backward: the one-pass kernel (`dx` and per-cube f32 dγ/dβ partials) and the column
//! sum of the partials (also used by `v1`). Shares the row reductions of the parent module.

// `#[cube]` code expands operators, not `is_multiple_of`/`div_ceil` method calls.
#![allow(clippy::manual_is_multiple_of, clippy::manual_div_ceil)]

use burn_cubecl::cubecl;
use cubecl::prelude::*;

use super::{lanes_sum, row_sum, rows_per_cube};

/// The whole backward in one pass over `dy` and `x`: each cube visits row groups `cube, cube +
/// cubes, …` (grid-stride; `rows` rows per group, one per `UNIT_POS_Y`); per row, `Σ g` and
/// `Σ g·x̂` (`g = dy·γ`) over the row's units, then `dx`; and, since a unit owns the same vector
/// columns in every row it visits, it sums `dy·x̂` and `dy` for them in registers. At the end the cube's row
/// slots are summed in shared memory and written as f32 partials `[cubes, 2h]` (dγ's, then dβ's),
/// summed over cubes by [`ln_partials_sum_kernel`].
///
/// With `rms`, the RMS norm's backward (`x̂ = x·r`, `dx = r·(g − x̂·mean(g·x̂))`: one reduction
/// per row; `mean[row]` is loaded but unused, pass any `[n, 1]` f32 tensor; the dβ partials are
/// zeros).
///
/// Experimental, off by default and not yet timed on a GPU: `prefetch` loads the next row
/// group's `dy`, `x`, μ, r before the current group is computed (the kernel runs ~2 cubes per
/// multiprocessor, so its loads are latency-bound); `lean` keeps γ of the unit's columns in
/// registers as f32 for all its rows and sums planes by unrolled xor-shuffles.
#[cube(launch, launch_unchecked)]
#[allow(clippy::too_many_arguments)]
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
    #[comptime] prefetch: bool,
    #[comptime] lean: bool,
    #[comptime] rms: bool,
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
    // With `lean`, γ of this unit's columns as f32 (the same in every row it visits).
    let mut gam = Array::<Vector<f32, N>>::new(comptime![if lean { per_unit } else { 1 }]);
    if comptime![lean] {
        #[unroll]
        for k in 0..per_unit {
            let c = tid + k * block;
            let mut v = Vector::<f32, N>::new(0.0);
            if c < nv {
                v = Vector::<f32, N>::cast_from(gamma[c]);
            }
            gam[k] = v;
        }
    }
    let mut gs = Array::<Vector<f32, N>>::new(per_unit);
    let mut xs = Array::<Vector<f32, N>>::new(per_unit);
    // The row's `dy`, `x` (this unit's share) and μ, r, loaded into `next_*`: with `prefetch`,
    // the next group's are loaded there before this one is computed (twice the bytes in flight).
    let mut dys = Array::<Vector<F, N>>::new(per_unit);
    let mut xr = Array::<Vector<F, N>>::new(per_unit);
    let mut next_dy = Array::<Vector<F, N>>::new(per_unit);
    let mut next_x = Array::<Vector<F, N>>::new(per_unit);
    // μ, r of the row in `next_mr` (an array: a `let` of a mutable scalar would alias it).
    let mut next_mr = Array::<f32>::new(2usize);
    let mut group = cube;
    if comptime![prefetch] {
        fetch_row::<F, N>(dy, x, mean, rstd, &mut next_dy, &mut next_x, &mut next_mr, group * rows + ty, n, nv, block, per_unit);
    }
    // Uniform over the cube (every unit takes the same trips), so the syncs inside are safe.
    while group < groups {
        let row = group * rows + ty;
        let valid = row < n;
        let base = row * nv;
        if comptime![!prefetch] {
            fetch_row::<F, N>(dy, x, mean, rstd, &mut next_dy, &mut next_x, &mut next_mr, row, n, nv, block, per_unit);
        }
        // (Register moves: without `prefetch` the compiler renames them away.)
        #[unroll]
        for k in 0..per_unit {
            dys[k] = next_dy[k];
            xr[k] = next_x[k];
        }
        let mut m = next_mr[0];
        if comptime![rms] {
            m = f32::new(0.0);
        }
        let r = next_mr[1];
        if comptime![prefetch] {
            fetch_row::<F, N>(dy, x, mean, rstd, &mut next_dy, &mut next_x, &mut next_mr, (group + cubes) * rows + ty, n, nv, block, per_unit);
        }
        let mut sg = f32::new(0.0);
        let mut sgx = f32::new(0.0);
        #[unroll]
        for k in 0..per_unit {
            let c = tid + k * block;
            let mut g = Vector::<f32, N>::new(0.0);
            let mut xhat = Vector::<f32, N>::new(0.0);
            if valid && c < nv {
                let d = Vector::<f32, N>::cast_from(dys[k]);
                xhat = (Vector::<f32, N>::cast_from(xr[k]) - Vector::new(m)) * Vector::new(r);
                dgs[k] += d * xhat;
                if comptime![!rms] {
                    dbs[k] += d;
                }
                if comptime![lean] {
                    g = d * gam[k];
                } else {
                    g = d * Vector::<f32, N>::cast_from(gamma[c]);
                }
            }
            gs[k] = g;
            xs[k] = xhat;
            sg += lanes_sum::<N>(g);
            sgx += lanes_sum::<N>(g * xhat);
        }
        let mut mean_g = f32::new(0.0);
        if comptime![!rms] {
            mean_g = row_sum(&mut smem, sg, block, plane, lean) / hf;
        }
        let mean_gx = row_sum(&mut smem, sgx, block, plane, lean) / hf;
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

/// Loads this unit's share of `row`'s `dy` and `x` (zeros past the row or the tensor) and its
/// `[μ, r]` into `mr` (zeros past the tensor).
#[cube]
#[allow(clippy::too_many_arguments)]
fn fetch_row<F: Float, N: Size>(
    dy: &Tensor<Vector<F, N>>,
    x: &Tensor<Vector<F, N>>,
    mean: &Tensor<f32>,
    rstd: &Tensor<f32>,
    dys: &mut Array<Vector<F, N>>,
    xs: &mut Array<Vector<F, N>>,
    mr: &mut Array<f32>,
    row: usize,
    n: usize,
    nv: usize,
    #[comptime] block: usize,
    #[comptime] per_unit: usize,
) {
    let valid = row < n;
    let base = row * nv;
    let tid = UNIT_POS_X as usize;
    let mut m = f32::new(0.0);
    let mut r = f32::new(0.0);
    if valid {
        m = mean[row];
        r = rstd[row];
    }
    #[unroll]
    for k in 0..per_unit {
        let c = tid + k * block;
        let mut d = Vector::<F, N>::new(F::new(0.0));
        let mut v = Vector::<F, N>::new(F::new(0.0));
        if valid && c < nv {
            d = dy[base + c];
            v = x[base + c];
        }
        dys[k] = d;
        xs[k] = v;
    }
    mr[0] = m;
    mr[1] = r;
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
