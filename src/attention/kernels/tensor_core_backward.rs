//! The tensor-core backward (f16/bf16 inputs, f32 accumulation): `dq` (rows are queries) and
//! `dk, dv` (rows are keys), the same outputs as the FMA kernels of [`super::backward`] but for
//! `P` and `dS` rounded to the inputs' dtype before their products (as FlashAttention's).
//!
//! Geometry as the forward's ([`super::TcTiles`]): plane `w` owns `f` rows of the cube's block,
//! tiles of `C` rows of the other operand are staged in shared memory. No online rescaling: each
//! tile's partial product goes through the f32 scratch into the lanes' register accumulators
//! (element `lane + lanes·i` of the plane's `[f, d]`).
//!
//! - dq, per key tile: `S = q·kᵀ`, `dP = dO·vᵀ`; every lane, elementwise over the plane's `[f, C]`:
//!   `dS = P ∘ (dP − δ)`, `P = exp(scale·S − lse)` (masked: 0); `dq += dS·k`; at the end `scale·dq`.
//! - dk/dv, per query tile from the block's diagonal on: `Sᵀ = k·qᵀ`, `dPᵀ = v·dOᵀ`; `Pᵀ`, `dSᵀ`
//!   elementwise with the tile's `lse`, `δ` staged; `dv += Pᵀ·dO`, `dk += dSᵀ·q`; `dk` times
//!   `scale` at the end.
//!
//! Four cube syncs per tile; every global access guarded by the sequence length. Queries may sit
//! at positions `offset..offset + s_q` against `s_k` keys (module docs of [`super`]).

// Tile counts are written `(n + c − 1) / c` (the cube macro expands arithmetic, not `div_ceil`).
#![allow(clippy::manual_div_ceil)]

use burn_cubecl::cubecl;
use cubecl::prelude::*;

use super::tensor_core::{plane_matmul, stage, TcTiles};
use super::{head_base, last_first_block};

/// `n` values of the f32 `[b·H·s]` vector `x` from this head's row `row0` into `dst` (zeros
/// past `s`), by all units of the cube.
#[cube]
fn stage_stats(x: &Tensor<f32>, dst: &mut SharedMemory<f32>, bh: usize, row0: usize, s: usize, #[comptime] n: usize, #[comptime] units: usize) {
    let mut i = UNIT_POS as usize;
    while i < n {
        let mut val = f32::new(0.0);
        if row0 + i < s {
            val = x[bh * s + row0 + i];
        }
        dst[i] = val;
        i += units;
    }
}

/// `acc[i] += ss[row, col]` for this lane's elements `lane + lanes·i` of the plane's `[f, d]`.
#[cube]
fn accumulate(acc: &mut Array<f32>, ss: &SharedMemory<f32>, #[comptime] t: TcTiles) {
    let (f, d, lanes, sst) = comptime![(t.f, t.d, t.lanes, t.ss())];
    let (lane, w) = (UNIT_POS_X as usize, UNIT_POS_Y as usize);
    #[unroll]
    for i in 0..comptime![t.per_lane()] {
        let e = lane + lanes * i;
        acc[i] += ss[(w * f + e / d) * sst + e % d];
    }
}

/// Writes this lane's `acc[i] · factor` to row `row0 + w·f + e / d`, column `e % d` of `out`.
#[cube]
fn store_rows<F: Float>(out: &mut Tensor<F>, acc: &Array<f32>, factor: f32, bh: usize, row0: usize, s: usize, #[comptime] t: TcTiles) {
    let (f, d, lanes) = comptime![(t.f, t.d, t.lanes)];
    let (lane, w) = (UNIT_POS_X as usize, UNIT_POS_Y as usize);
    let base = head_base::<F>(out, bh);
    let (rs, cs) = (out.stride(2), out.stride(3));
    #[unroll]
    for i in 0..comptime![t.per_lane()] {
        let e = lane + lanes * i;
        let row = row0 + w * f + e / d;
        if row < s {
            out[base + row * rs + (e % d) * cs] = F::cast_from(acc[i] * factor);
        }
    }
}

#[cube]
fn zeroed(#[comptime] n: usize) -> Array<f32> {
    let mut a = Array::<f32>::new(n);
    #[unroll]
    for i in 0..n {
        a[i] = f32::new(0.0);
    }
    a
}

/// `dq` (any strides) from `dO`, `lse` and `delta = Σ_x dO·o` (`[b·H·s_q]` f32 each).
#[cube(launch, launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn attn_backward_dq_tc_kernel<F: Float>(
    dout: &Tensor<F>,
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    lse: &Tensor<f32>,
    delta: &Tensor<f32>,
    dq: &mut Tensor<F>,
    scale: f32,
    offset: u32,
    #[comptime] t: TcTiles,
    #[define(F)] _dtype: StorageType,
) {
    let (f, cols, lanes, sst, ps, rows) = comptime![(t.f, t.cols, t.lanes, t.ss(), t.ps(), t.rows())];
    let (s, skl, off) = (q.shape(2), k.shape(2), offset as usize);
    let bh = CUBE_POS_X as usize;
    let q0 = last_first_block() * rows;
    let (lane, w) = (UNIT_POS_X as usize, UNIT_POS_Y as usize);
    let mut sq = SharedMemory::<F>::new(comptime![t.rows() * t.hs()]);
    let mut sdo = SharedMemory::<F>::new(comptime![t.rows() * t.hs()]);
    let mut sk = SharedMemory::<F>::new(comptime![t.cols * t.hs()]);
    let mut sv = SharedMemory::<F>::new(comptime![t.cols * t.hs()]);
    let mut sds = SharedMemory::<F>::new(comptime![t.rows() * t.ps()]);
    let mut ss = SharedMemory::<f32>::new(comptime![t.rows() * t.ss()]);
    let mut sdp = SharedMemory::<f32>::new(comptime![t.rows() * t.ss()]);
    let mut sl = SharedMemory::<f32>::new(rows);
    let mut sd = SharedMemory::<f32>::new(rows);
    stage::<F>(q, &mut sq, bh, q0, s, rows, t);
    stage::<F>(dout, &mut sdo, bh, q0, s, rows, t);
    stage_stats(lse, &mut sl, bh, q0, s, rows, comptime![t.units()]);
    stage_stats(delta, &mut sd, bh, q0, s, rows, comptime![t.units()]);
    let mut acc = zeroed(comptime![t.per_lane()]);
    let kend = min(skl, off + q0 + rows);
    for tile in 0..(kend + cols - 1) / cols {
        let k0 = tile * cols;
        stage::<F>(k, &mut sk, bh, k0, skl, cols, t);
        stage::<F>(v, &mut sv, bh, k0, skl, cols, t);
        sync_cube();
        plane_matmul::<F>(&sq, w * f * t.hs(), &sk, 0, &mut ss, w * f * sst, comptime![t.scores()]);
        plane_matmul::<F>(&sdo, w * f * t.hs(), &sv, 0, &mut sdp, w * f * sst, comptime![t.scores()]);
        sync_cube();
        #[unroll]
        for i in 0..comptime![t.f * t.cols / t.lanes] {
            let e = lane + lanes * i;
            let (r, j) = (w * f + e / cols, e % cols);
            let (qi, kj) = (q0 + r, k0 + j);
            let mut ds = f32::new(0.0);
            if kj <= off + qi && kj < skl && qi < s {
                let p = f32::exp(ss[r * sst + j] * scale - sl[r]);
                ds = p * (sdp[r * sst + j] - sd[r]);
            }
            sds[r * ps + j] = F::cast_from(ds);
        }
        sync_cube();
        plane_matmul::<F>(&sds, w * f * ps, &sk, 0, &mut ss, w * f * sst, comptime![t.weighted()]);
        sync_cube();
        accumulate(&mut acc, &ss, t);
    }
    store_rows::<F>(dq, &acc, scale, bh, q0, s, t);
}

/// `dk`, `dv` (any strides, `s_k` rows) from `dO`, `lse` and `delta` (`[b·H·s_q]` f32 each); rows
/// are keys.
#[cube(launch, launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn attn_backward_dkv_tc_kernel<F: Float>(
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
    #[comptime] t: TcTiles,
    #[define(F)] _dtype: StorageType,
) {
    let (f, cols, lanes, sst, ps, rows) = comptime![(t.f, t.cols, t.lanes, t.ss(), t.ps(), t.rows())];
    let (s, skl, off) = (q.shape(2), k.shape(2), offset as usize);
    let bh = CUBE_POS_X as usize;
    let kb0 = CUBE_POS_Y as usize * rows;
    let (lane, w) = (UNIT_POS_X as usize, UNIT_POS_Y as usize);
    let mut sk = SharedMemory::<F>::new(comptime![t.rows() * t.hs()]);
    let mut sv = SharedMemory::<F>::new(comptime![t.rows() * t.hs()]);
    let mut sq = SharedMemory::<F>::new(comptime![t.cols * t.hs()]);
    let mut sdo = SharedMemory::<F>::new(comptime![t.cols * t.hs()]);
    let mut sp = SharedMemory::<F>::new(comptime![t.rows() * t.ps()]);
    let mut sds = SharedMemory::<F>::new(comptime![t.rows() * t.ps()]);
    let mut ss = SharedMemory::<f32>::new(comptime![t.rows() * t.ss()]);
    let mut sdp = SharedMemory::<f32>::new(comptime![t.rows() * t.ss()]);
    let mut sl = SharedMemory::<f32>::new(cols);
    let mut sd = SharedMemory::<f32>::new(cols);
    stage::<F>(k, &mut sk, bh, kb0, skl, rows, t);
    stage::<F>(v, &mut sv, bh, kb0, skl, rows, t);
    let mut acc_k = zeroed(comptime![t.per_lane()]);
    let mut acc_v = zeroed(comptime![t.per_lane()]);
    // The first query tile that sees key kb0 (position offset + i ≥ kb0).
    for tile in (max(kb0, off) - off) / cols..(s + cols - 1) / cols {
        let q0 = tile * cols;
        stage::<F>(q, &mut sq, bh, q0, s, cols, t);
        stage::<F>(dout, &mut sdo, bh, q0, s, cols, t);
        stage_stats(lse, &mut sl, bh, q0, s, cols, comptime![t.units()]);
        stage_stats(delta, &mut sd, bh, q0, s, cols, comptime![t.units()]);
        sync_cube();
        plane_matmul::<F>(&sk, w * f * t.hs(), &sq, 0, &mut ss, w * f * sst, comptime![t.scores()]);
        plane_matmul::<F>(&sv, w * f * t.hs(), &sdo, 0, &mut sdp, w * f * sst, comptime![t.scores()]);
        sync_cube();
        #[unroll]
        for i in 0..comptime![t.f * t.cols / t.lanes] {
            let e = lane + lanes * i;
            let (r, j) = (w * f + e / cols, e % cols);
            let (kj, qi) = (kb0 + r, q0 + j);
            let mut p = f32::new(0.0);
            let mut ds = f32::new(0.0);
            if kj <= off + qi && qi < s && kj < skl {
                p = f32::exp(ss[r * sst + j] * scale - sl[j]);
                ds = p * (sdp[r * sst + j] - sd[j]);
            }
            sp[r * ps + j] = F::cast_from(p);
            sds[r * ps + j] = F::cast_from(ds);
        }
        sync_cube();
        plane_matmul::<F>(&sp, w * f * ps, &sdo, 0, &mut ss, w * f * sst, comptime![t.weighted()]);
        plane_matmul::<F>(&sds, w * f * ps, &sq, 0, &mut sdp, w * f * sst, comptime![t.weighted()]);
        sync_cube();
        accumulate(&mut acc_v, &ss, t);
        accumulate(&mut acc_k, &sdp, t);
    }
    store_rows::<F>(dv, &acc_v, f32::new(1.0), bh, kb0, skl, t);
    store_rows::<F>(dk, &acc_k, scale, bh, kb0, skl, t);
}
