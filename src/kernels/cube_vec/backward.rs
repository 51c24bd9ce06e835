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
        let mean_g = row_sum(&mut smem, sg, block, plane, false) / hf;
        let mean_gx = row_sum(&mut smem, sgx, block, plane, false) / hf;
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
