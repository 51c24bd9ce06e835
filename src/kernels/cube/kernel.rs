//! `v1` kernels (one cube of `BLOCK` units per row, the row re-read from global memory for each
//! pass) and its dγ/dβ partials kernel; see the parent module.

use burn_cubecl::cubecl;
use cubecl::prelude::*;

/// Sum of `value` over the cube by a shared-memory tree (`smem` holds one slot per unit);
/// every unit gets the total.
#[cube]
fn block_sum(smem: &mut SharedMemory<f32>, value: f32) -> f32 {
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

#[cube(launch)]
pub fn ln_forward_kernel<F: Float>(
    x: &Tensor<F>,
    gamma: &Tensor<F>,
    beta: &Tensor<F>,
    y: &mut Tensor<F>,
    mean: &mut Tensor<f32>,
    rstd: &mut Tensor<f32>,
    epsilon: f32,
    #[comptime] block: u32,
    #[define(F)] _dtype: StorageType,
) {
    let row = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) as usize;
    if row >= x.shape(0) {
        terminate!();
    }
    let h = x.shape(1);
    let base = row * h;
    let tid = UNIT_POS_X as usize;
    let step = CUBE_DIM_X as usize;
    let mut smem = SharedMemory::<f32>::new(block as usize);
    let mut acc = f32::new(0.0);
    let mut c = tid;
    while c < h {
        acc += f32::cast_from(x[base + c]);
        c += step;
    }
    let m = block_sum(&mut smem, acc) / f32::cast_from(h as u32);
    let mut acc2 = f32::new(0.0);
    let mut c2 = tid;
    while c2 < h {
        let d = f32::cast_from(x[base + c2]) - m;
        acc2 += d * d;
        c2 += step;
    }
    let var = block_sum(&mut smem, acc2) / f32::cast_from(h as u32);
    let r = f32::new(1.0) / f32::sqrt(var + epsilon);
    let mut c3 = tid;
    while c3 < h {
        let v = (f32::cast_from(x[base + c3]) - m) * r * f32::cast_from(gamma[c3]) + f32::cast_from(beta[c3]);
        y[base + c3] = F::cast_from(v);
        c3 += step;
    }
    if tid == 0 {
        mean[row] = m;
        rstd[row] = r;
    }
}

#[cube(launch)]
pub fn ln_backward_dx_kernel<F: Float>(
    dy: &Tensor<F>,
    x: &Tensor<F>,
    gamma: &Tensor<F>,
    mean: &Tensor<f32>,
    rstd: &Tensor<f32>,
    dx: &mut Tensor<F>,
    #[comptime] block: u32,
    #[define(F)] _dtype: StorageType,
) {
    let row = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) as usize;
    if row >= x.shape(0) {
        terminate!();
    }
    let h = x.shape(1);
    let base = row * h;
    let tid = UNIT_POS_X as usize;
    let step = CUBE_DIM_X as usize;
    let m = mean[row];
    let r = rstd[row];
    let mut smem = SharedMemory::<f32>::new(block as usize);
    let mut sg = f32::new(0.0);
    let mut sgx = f32::new(0.0);
    let mut c = tid;
    while c < h {
        let g = f32::cast_from(dy[base + c]) * f32::cast_from(gamma[c]);
        let xhat = (f32::cast_from(x[base + c]) - m) * r;
        sg += g;
        sgx += g * xhat;
        c += step;
    }
    let hf = f32::cast_from(h as u32);
    let mean_g = block_sum(&mut smem, sg) / hf;
    let mean_gx = block_sum(&mut smem, sgx) / hf;
    let mut c2 = tid;
    while c2 < h {
        let g = f32::cast_from(dy[base + c2]) * f32::cast_from(gamma[c2]);
        let xhat = (f32::cast_from(x[base + c2]) - m) * r;
        dx[base + c2] = F::cast_from(r * (g - mean_g - xhat * mean_gx));
        c2 += step;
    }
}

#[cube(launch)]
pub fn ln_backward_params_kernel<F: Float>(
    dy: &Tensor<F>,
    x: &Tensor<F>,
    mean: &Tensor<f32>,
    rstd: &Tensor<f32>,
    partial: &mut Tensor<f32>,
    rows_per_chunk: u32,
    #[define(F)] _dtype: StorageType,
) {
    let h = x.shape(1);
    let n = x.shape(0);
    let col = (CUBE_POS_X * CUBE_DIM_X + UNIT_POS_X) as usize;
    let chunk = CUBE_POS_Y as usize;
    if col < h {
        let start = chunk * rows_per_chunk as usize;
        let mut end = start + rows_per_chunk as usize;
        if end > n {
            end = n;
        }
        let mut sg = f32::new(0.0);
        let mut sb = f32::new(0.0);
        let mut row = start;
        while row < end {
            let d = f32::cast_from(dy[row * h + col]);
            let xhat = (f32::cast_from(x[row * h + col]) - mean[row]) * rstd[row];
            sg += d * xhat;
            sb += d;
            row += 1;
        }
        partial[chunk * 2 * h + col] = sg;
        partial[chunk * 2 * h + h + col] = sb;
    }
}
