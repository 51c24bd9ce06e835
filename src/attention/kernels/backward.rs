//! The backward kernels: `dq` (rows are queries) and `dk, dv` (rows are keys); the module docs
//! of [`super`] give the tiling, the parent module's the math.

// Tile counts are written `(n + c − 1) / c` (the cube macro expands arithmetic, not `div_ceil`).
#![allow(clippy::manual_div_ceil)]

use burn_cubecl::cubecl;
use cubecl::prelude::*;

use super::{block_acc, block_dot, filled, last_first_block, load_tile, store_block, store_weights, vzeros, zeros, Tiles};

/// `dq` (any strides) from `dO`, `lse` and `delta = Σ_x dO·o` (`[b·H·s_q]` f32 each), queries at
/// positions `offset..` (module docs of [`super`]).
#[cube(launch, launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn attn_backward_dq_kernel<F: Float, N: Size, M: Size>(
    dout: &Tensor<F>,
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    lse: &Tensor<f32>,
    delta: &Tensor<f32>,
    dq: &mut Tensor<F>,
    scale: f32,
    offset: u32,
    #[comptime] t: Tiles,
    #[define(F)] _dtype: StorageType,
) {
    let (rows, cols, rm, cn, tx, ty, dnv) = comptime![(t.rows, t.cols, t.rm(), t.cn(), t.tx, t.ty, t.dnv())];
    let (s, skl, off) = (q.shape(2), k.shape(2), offset as usize);
    let bh = CUBE_POS_X as usize;
    let q0 = last_first_block() * rows;
    let (ux, uy) = (UNIT_POS_X as usize, UNIT_POS_Y as usize);
    let mut sq = SharedMemory::<Vector<f32, N>>::new(comptime![rows * t.vstride()]);
    let mut sdo = SharedMemory::<Vector<f32, N>>::new(comptime![rows * t.vstride()]);
    let mut sk = SharedMemory::<Vector<f32, N>>::new(comptime![cols * t.vstride()]);
    let mut sv = SharedMemory::<Vector<f32, N>>::new(comptime![cols * t.vstride()]);
    let mut sds = SharedMemory::<Vector<f32, M>>::new(comptime![cols * t.wstride()]);
    load_tile::<F, N>(q, &mut sq, bh, q0, s, scale, rows, t);
    load_tile::<F, N>(dout, &mut sdo, bh, q0, s, 1.0, rows, t);
    let mut lse_r = zeros(rm);
    let mut delta_r = zeros(rm);
    #[unroll]
    for i in 0..rm {
        let qi = q0 + uy + i * ty;
        if qi < s {
            lse_r[i] = lse[bh * s + qi];
            delta_r[i] = delta[bh * s + qi];
        }
    }
    let mut acc = vzeros::<N>(comptime![rm * dnv]);
    let kend = min(skl, off + q0 + rows);
    for tile in 0..(kend + cols - 1) / cols {
        let k0 = tile * cols;
        load_tile::<F, N>(k, &mut sk, bh, k0, skl, 1.0, cols, t);
        load_tile::<F, N>(v, &mut sv, bh, k0, skl, 1.0, cols, t);
        sync_cube();
        let mut ds = block_dot::<N>(&sq, &sk, t);
        let dp = block_dot::<N>(&sdo, &sv, t);
        #[unroll]
        for i in 0..rm {
            let qi = q0 + uy + i * ty;
            #[unroll]
            for j in 0..cn {
                let kj = k0 + ux + j * tx;
                let mut ds_val = f32::new(0.0);
                // `kj ≤ offset + qi < s_k` for real queries: keys past `s_k` are masked too.
                if kj <= off + qi && qi < s {
                    ds_val = f32::exp(ds[i * cn + j] - lse_r[i]) * (dp[i * cn + j] - delta_r[i]);
                }
                ds[i * cn + j] = ds_val;
            }
        }
        store_weights::<M>(&mut sds, &ds, t);
        sync_cube();
        for jj in 0..cols {
            block_acc::<N, M>(&mut acc, &sds, &sk, jj, t);
        }
        sync_cube();
    }
    let factor = filled(rm, scale);
    store_block::<F, N>(dq, &acc, &factor, bh, q0, s, t);
}

/// `dk, dv` (any strides, `s_k` rows); rows are keys, tiles are queries.
#[cube(launch, launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn attn_backward_dkv_kernel<F: Float, N: Size, M: Size>(
    dout: &Tensor<F>,
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    lse: &Tensor<f32>,
    delta: &Tensor<f32>,
    dk: &mut Tensor<F>,
    dv: &mut Tensor<F>,
    scale: f32,
    offset: u32,
    #[comptime] t: Tiles,
    #[define(F)] _dtype: StorageType,
) {
    let (rows, cols, rm, cn, tx, ty, dnv) = comptime![(t.rows, t.cols, t.rm(), t.cn(), t.tx, t.ty, t.dnv())];
    let (s, skl, off) = (q.shape(2), k.shape(2), offset as usize);
    let bh = CUBE_POS_X as usize;
    let j0 = CUBE_POS_Y as usize * rows;
    let (ux, uy) = (UNIT_POS_X as usize, UNIT_POS_Y as usize);
    let mut sk = SharedMemory::<Vector<f32, N>>::new(comptime![rows * t.vstride()]);
    let mut sv = SharedMemory::<Vector<f32, N>>::new(comptime![rows * t.vstride()]);
    let mut sq = SharedMemory::<Vector<f32, N>>::new(comptime![cols * t.vstride()]);
    let mut sdo = SharedMemory::<Vector<f32, N>>::new(comptime![cols * t.vstride()]);
    let mut sp = SharedMemory::<Vector<f32, M>>::new(comptime![cols * t.wstride()]);
    let mut sds = SharedMemory::<Vector<f32, M>>::new(comptime![cols * t.wstride()]);
    let mut sstat = SharedMemory::<f32>::new(comptime![2 * cols]);
    load_tile::<F, N>(k, &mut sk, bh, j0, skl, 1.0, rows, t);
    load_tile::<F, N>(v, &mut sv, bh, j0, skl, 1.0, rows, t);
    let mut acc_k = vzeros::<N>(comptime![rm * dnv]);
    let mut acc_v = vzeros::<N>(comptime![rm * dnv]);
    // The first query tile that sees key j0 (position offset + i ≥ j0).
    for tile in (max(j0, off) - off) / cols..(s + cols - 1) / cols {
        let i0 = tile * cols;
        load_tile::<F, N>(q, &mut sq, bh, i0, s, scale, cols, t);
        load_tile::<F, N>(dout, &mut sdo, bh, i0, s, 1.0, cols, t);
        load_stats(lse, delta, &mut sstat, bh, i0, s, t);
        sync_cube();
        let mut pt = block_dot::<N>(&sk, &sq, t);
        let mut ds = block_dot::<N>(&sv, &sdo, t);
        #[unroll]
        for i in 0..rm {
            let kj = j0 + uy + i * ty;
            #[unroll]
            for j in 0..cn {
                let qc = ux + j * tx;
                let (mut p, mut ds_val) = (f32::new(0.0), f32::new(0.0));
                if kj <= off + i0 + qc && i0 + qc < s {
                    p = f32::exp(pt[i * cn + j] - sstat[qc]);
                    ds_val = p * (ds[i * cn + j] - sstat[cols + qc]);
                }
                pt[i * cn + j] = p;
                ds[i * cn + j] = ds_val;
            }
        }
        store_weights::<M>(&mut sp, &pt, t);
        store_weights::<M>(&mut sds, &ds, t);
        sync_cube();
        for jj in 0..cols {
            block_acc::<N, M>(&mut acc_v, &sp, &sdo, jj, t);
            block_acc::<N, M>(&mut acc_k, &sds, &sq, jj, t);
        }
        sync_cube();
    }
    let one = filled(rm, f32::new(1.0));
    store_block::<F, N>(dk, &acc_k, &one, bh, j0, skl, t);
    store_block::<F, N>(dv, &acc_v, &one, bh, j0, skl, t);
}

/// `lse` and `delta` of queries `i0..i0 + C` into `sstat[0..C]` and `sstat[C..2C]` (zeros past
/// `s`), by all units of the cube.
#[cube]
fn load_stats(lse: &Tensor<f32>, delta: &Tensor<f32>, sstat: &mut SharedMemory<f32>, bh: usize, i0: usize, s: usize, #[comptime] t: Tiles) {
    let cols = comptime![t.cols];
    let mut x = UNIT_POS as usize;
    while x < cols {
        let (mut a, mut b) = (f32::new(0.0), f32::new(0.0));
        if i0 + x < s {
            a = lse[bh * s + i0 + x];
            b = delta[bh * s + i0 + x];
        }
        sstat[x] = a;
        sstat[cols + x] = b;
        x += comptime![t.units()];
    }
}
