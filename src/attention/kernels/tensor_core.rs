//! The tensor-core flash-attention forward: the products `S = q·kᵀ` and `P·v` as cooperative
//! matrix products (CubeCL `cmma`: wmma on CUDA, cooperative matrices on Vulkan) of f16/bf16
//! operands with f32 accumulators; the online softmax, its statistics and the output in f32.
//! Same outputs as [`super::attn_forward_kernel`] (`o` in q's dtype, `lse` f32), except that `P`
//! enters its product rounded to the inputs' dtype (as FlashAttention's does).
//!
//! One cube per `(batch·head, block of planes·f query rows)`, `f` the fragment edge (16 on CUDA,
//! 8 on lavapipe: the device's `f × f × f` configuration). Plane `w` (`UNIT_POS_Y`) owns rows
//! `w·f .. w·f + f` of the block. Per key tile of `C` keys, staged in shared memory with `q`'s
//! block (rows of `d + 8` elements):
//!
//! 1. each plane: `S = q·kᵀ` (`C/f · d/f` fragment products, `k` read column-major as `kᵀ`),
//!    stored to its f32 scratch `[f, C]`;
//! 2. lanes `< f` of each plane, one row each: the causal mask, the row max `m'`, `α = exp(m − m')`,
//!    `P = exp(scale·S − m')` into the plane's `[f, C]` tile (inputs' dtype), `l = α·l + Σ P`;
//!    `α` to shared memory;
//! 3. each plane: `P·v` (`d/f · C/f` fragment products) into its scratch `[f, d]`;
//! 4. every lane: its `f·d/lanes` output values (element `lane + lanes·i` of the plane's
//!    `[f, d]`, held in registers) `o = α·o + (P·v)`.
//!
//! Four cube syncs per tile (after staging, after each of 1–3). At the end `o/l` is written
//! through the output's strides and `lse = m + ln l`. Every global access is guarded by the
//! sequence length; fragment loads and stores touch shared memory only.

// Tile counts are written `(n + c − 1) / c` (the cube macro expands arithmetic, not `div_ceil`).
#![allow(clippy::manual_div_ceil)]

use burn_cubecl::cubecl;
use cubecl::prelude::*;

use super::{head_base, last_first_block};
use crate::attention::MASKED;

/// The geometry of one tensor-core forward launch.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub struct TcTiles {
    /// Head width (a multiple of `f`).
    pub d: usize,
    /// Fragment edge: every product is `f × f × f`.
    pub f: usize,
    /// Planes per cube; the cube's query rows are `planes · f`.
    pub planes: usize,
    /// Keys per tile (a multiple of `f`).
    pub cols: usize,
    /// Lanes per plane (the device's plane size; divides `f · d`).
    pub lanes: usize,
}

impl TcTiles {
    /// Query rows per cube.
    pub const fn rows(&self) -> usize {
        self.planes * self.f
    }
    /// Units per cube.
    pub const fn units(&self) -> usize {
        self.planes * self.lanes
    }
    /// Row stride of the staged `q, k, v` tiles, in elements (a multiple of 8: 16 bytes).
    pub const fn hs(&self) -> usize {
        self.d + 8
    }
    /// Row stride of the `P` tiles, in elements.
    pub const fn ps(&self) -> usize {
        self.cols + 8
    }
    /// Row stride of the f32 scratch (scores, then `P·v`), in floats (a multiple of 4).
    pub const fn ss(&self) -> usize {
        (if self.cols > self.d { self.cols } else { self.d }) + 4
    }
    /// Output values per lane.
    pub const fn per_lane(&self) -> usize {
        self.f * self.d / self.lanes
    }
    /// Softmax rows per lane (lanes `< f` own rows `lane + lanes·i`).
    pub const fn rows_per_lane(&self) -> usize {
        (self.f + self.lanes - 1) / self.lanes
    }
    /// Shared bytes of a launch with 2-byte inputs.
    pub const fn shared_bytes(&self) -> usize {
        let frows = self.planes * self.f;
        (self.rows() + 2 * self.cols) * self.hs() * 2 + frows * self.ss() * 4 + frows * self.ps() * 2 + frows * 4
    }
}

/// Rows `row0..row0 + n` of this head's `[s, d]` matrix of `x` into `tile` (row stride `hs`,
/// zeros past `s`), by all units of the cube.
#[cube]
fn stage<F: Float>(x: &Tensor<F>, tile: &mut SharedMemory<F>, bh: usize, row0: usize, s: usize, #[comptime] n: usize, #[comptime] t: TcTiles) {
    let (d, hs, units) = comptime![(t.d, t.hs(), t.units())];
    let base = head_base::<F>(x, bh);
    let (rs, cs) = (x.stride(2), x.stride(3));
    let mut i = UNIT_POS as usize;
    while i < comptime![n * d] {
        let r = i / d;
        let c = i % d;
        let row = row0 + r;
        let mut val = F::new(0.0);
        if row < s {
            val = x[base + row * rs + c * cs];
        }
        tile[r * hs + c] = val;
        i += units;
    }
}

/// This plane's `S = q·kᵀ` (`[f, C]`) into its rows of the scratch `ss`.
#[cube]
fn plane_scores<F: Float>(sq: &SharedMemory<F>, sk: &SharedMemory<F>, ss: &mut SharedMemory<f32>, #[comptime] t: TcTiles) {
    let (f, hs, sst) = comptime![(t.f, t.hs(), t.ss())];
    let (qlen, klen, slen) = comptime![(t.rows() * t.hs(), t.cols * t.hs(), t.rows() * t.ss())];
    let w = UNIT_POS_Y as usize;
    #[unroll]
    for n in 0..comptime![t.cols / t.f] {
        let acc = cmma::Matrix::<f32>::from_value(cmma::MatrixIdent::Accumulator, f, f, f, cmma::MatrixLayout::Undefined, f32::new(0.0));
        #[unroll]
        for kk in 0..comptime![t.d / t.f] {
            let a = cmma::Matrix::<F>::from_slice(
                cmma::MatrixIdent::A,
                f,
                f,
                f,
                cmma::MatrixLayout::RowMajor,
                &sq.slice(w * f * hs + kk * f, qlen),
                comptime![hs as u32],
            );
            let b = cmma::Matrix::<F>::from_slice(
                cmma::MatrixIdent::B,
                f,
                f,
                f,
                cmma::MatrixLayout::ColMajor,
                &sk.slice(n * f * hs + kk * f, klen),
                comptime![hs as u32],
            );
            cmma::execute::<F, F, f32, f32>(&a, &b, &acc, &acc);
        }
        cmma::store(&mut ss.slice_mut(w * f * sst + n * f, slen), &acc, comptime![sst as u32], cmma::MatrixLayout::RowMajor);
    }
}

/// This plane's `P·v` (`[f, d]`) into its rows of the scratch `ss`.
#[cube]
fn plane_values<F: Float>(sp: &SharedMemory<F>, sv: &SharedMemory<F>, ss: &mut SharedMemory<f32>, #[comptime] t: TcTiles) {
    let (f, hs, ps, sst) = comptime![(t.f, t.hs(), t.ps(), t.ss())];
    let (plen, vlen, slen) = comptime![(t.rows() * t.ps(), t.cols * t.hs(), t.rows() * t.ss())];
    let w = UNIT_POS_Y as usize;
    #[unroll]
    for c in 0..comptime![t.d / t.f] {
        let acc = cmma::Matrix::<f32>::from_value(cmma::MatrixIdent::Accumulator, f, f, f, cmma::MatrixLayout::Undefined, f32::new(0.0));
        #[unroll]
        for kk in 0..comptime![t.cols / t.f] {
            let a = cmma::Matrix::<F>::from_slice(
                cmma::MatrixIdent::A,
                f,
                f,
                f,
                cmma::MatrixLayout::RowMajor,
                &sp.slice(w * f * ps + kk * f, plen),
                comptime![ps as u32],
            );
            let b = cmma::Matrix::<F>::from_slice(
                cmma::MatrixIdent::B,
                f,
                f,
                f,
                cmma::MatrixLayout::RowMajor,
                &sv.slice(kk * f * hs + c * f, vlen),
                comptime![hs as u32],
            );
            cmma::execute::<F, F, f32, f32>(&a, &b, &acc, &acc);
        }
        cmma::store(&mut ss.slice_mut(w * f * sst + c * f, slen), &acc, comptime![sst as u32], cmma::MatrixLayout::RowMajor);
    }
}

/// Lanes `< f`: the online softmax of their rows of this plane's scores (keys `k0..k0 + C`,
/// causal and sequence masks), `P` into `sp`, `α` into `sa`; `m`, `l` updated.
#[cube]
#[allow(clippy::too_many_arguments)]
fn plane_softmax<F: Float>(
    ss: &SharedMemory<f32>,
    sp: &mut SharedMemory<F>,
    sa: &mut SharedMemory<f32>,
    m: &mut Array<f32>,
    l: &mut Array<f32>,
    qw: usize,
    k0: usize,
    s: usize,
    scale: f32,
    #[comptime] t: TcTiles,
) {
    let (f, cols, lanes, sst, ps) = comptime![(t.f, t.cols, t.lanes, t.ss(), t.ps())];
    let (lane, w) = (UNIT_POS_X as usize, UNIT_POS_Y as usize);
    #[unroll]
    for i in 0..comptime![t.rows_per_lane()] {
        let r = lane + lanes * i;
        if r < f {
            let qi = qw + r;
            let srow = (w * f + r) * sst;
            let prow = (w * f + r) * ps;
            let last = min(qi + 1, s); // keys k0..last are visible
            let mut mx = m[i];
            for j in 0..cols {
                if k0 + j < last {
                    mx = max(mx, ss[srow + j] * scale);
                }
            }
            let alpha = f32::exp(m[i] - mx);
            let mut sum = l[i] * alpha;
            for j in 0..cols {
                let mut p = f32::new(0.0);
                if k0 + j < last {
                    p = f32::exp(ss[srow + j] * scale - mx);
                }
                sum += p;
                sp[prow + j] = F::cast_from(p);
            }
            l[i] = sum;
            m[i] = mx;
            sa[w * f + r] = alpha;
        }
    }
}

/// The forward: `o` (q's dtype, any strides) and `lse: [b·H·s]` f32; `q, k, v` f16 or bf16.
#[cube(launch, launch_unchecked)]
pub fn attn_forward_tc_kernel<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    o: &mut Tensor<F>,
    lse: &mut Tensor<f32>,
    scale: f32,
    #[comptime] t: TcTiles,
    #[define(F)] _dtype: StorageType,
) {
    let (f, d, cols, lanes, sst) = comptime![(t.f, t.d, t.cols, t.lanes, t.ss())];
    let (rows, rpl, per_lane) = comptime![(t.rows(), t.rows_per_lane(), t.per_lane())];
    let s = q.shape(2);
    let bh = CUBE_POS_X as usize;
    let q0 = last_first_block() * rows;
    let (lane, w) = (UNIT_POS_X as usize, UNIT_POS_Y as usize);
    let qw = q0 + w * f;
    let mut sq = SharedMemory::<F>::new(comptime![t.rows() * t.hs()]);
    let mut sk = SharedMemory::<F>::new(comptime![t.cols * t.hs()]);
    let mut sv = SharedMemory::<F>::new(comptime![t.cols * t.hs()]);
    let mut sp = SharedMemory::<F>::new(comptime![t.rows() * t.ps()]);
    let mut ss = SharedMemory::<f32>::new(comptime![t.rows() * t.ss()]);
    let mut sa = SharedMemory::<f32>::new(rows);
    stage::<F>(q, &mut sq, bh, q0, s, rows, t);
    let mut m = Array::<f32>::new(rpl);
    let mut l = Array::<f32>::new(rpl);
    #[unroll]
    for i in 0..rpl {
        m[i] = f32::new(MASKED);
        l[i] = f32::new(0.0);
    }
    let mut acc = Array::<f32>::new(per_lane);
    #[unroll]
    for i in 0..per_lane {
        acc[i] = f32::new(0.0);
    }
    let kend = min(s, q0 + rows);
    for tile in 0..(kend + cols - 1) / cols {
        let k0 = tile * cols;
        stage::<F>(k, &mut sk, bh, k0, s, cols, t);
        stage::<F>(v, &mut sv, bh, k0, s, cols, t);
        sync_cube();
        plane_scores::<F>(&sq, &sk, &mut ss, t);
        sync_cube();
        plane_softmax::<F>(&ss, &mut sp, &mut sa, &mut m, &mut l, qw, k0, s, scale, t);
        sync_cube();
        plane_values::<F>(&sp, &sv, &mut ss, t);
        sync_cube();
        #[unroll]
        for i in 0..per_lane {
            let e = lane + lanes * i;
            let r = e / d;
            acc[i] = acc[i] * sa[w * f + r] + ss[(w * f + r) * sst + e % d];
        }
    }
    sync_cube();
    #[unroll]
    for i in 0..rpl {
        let r = lane + lanes * i;
        if r < f {
            sa[w * f + r] = f32::new(1.0) / l[i];
            if qw + r < s {
                lse[bh * s + qw + r] = m[i] + f32::ln(l[i]);
            }
        }
    }
    sync_cube();
    let base = head_base::<F>(o, bh);
    let (rs, cs) = (o.stride(2), o.stride(3));
    #[unroll]
    for i in 0..per_lane {
        let e = lane + lanes * i;
        let r = e / d;
        if qw + r < s {
            o[base + (qw + r) * rs + (e % d) * cs] = F::cast_from(acc[i] * sa[w * f + r]);
        }
    }
}
