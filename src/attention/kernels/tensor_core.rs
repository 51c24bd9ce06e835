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
//! sequence length; fragment loads and stores touch shared memory only. Queries may sit at
//! positions `offset..offset + s_q` against `s_k` keys (context parallelism, as the FMA
//! kernels: module docs of [`super`]).

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
}

/// Rows `row0..row0 + n` of this head's `[s, d]` matrix of `x` into `tile` (row stride `hs`,
/// zeros past `s`), by all units of the cube.
#[cube]
pub(super) fn stage<F: Float>(x: &Tensor<F>, tile: &mut SharedMemory<F>, bh: usize, row0: usize, s: usize, #[comptime] n: usize, #[comptime] t: TcTiles) {
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

/// One plane's product `O[f, n·f] = A[f, k·f] · B[k·f, n·f]` of shared-memory operands into an
/// f32 scratch, `f × f × f` fragments; `B` given row-major, or (`bt`) as the rows of `Bᵀ` (a
/// staged `[n·f, k·f]` tile read column-major: `q·kᵀ`). Strides in elements; `*len` bound slices.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub struct Product {
    pub f: usize,
    /// Output fragments along the columns.
    pub n: usize,
    /// Fragment steps along the contracted dimension.
    pub k: usize,
    pub sa: usize,
    pub sb: usize,
    pub so: usize,
    pub bt: bool,
    pub alen: usize,
    pub blen: usize,
    pub olen: usize,
}

/// [`Product`] `g` with `A` at `a0` of `a`, `B` at `b0` of `b`, `O` at `o0` of `out`, by the
/// calling plane.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(super) fn plane_matmul<F: Float>(
    a: &SharedMemory<F>,
    a0: usize,
    b: &SharedMemory<F>,
    b0: usize,
    out: &mut SharedMemory<f32>,
    o0: usize,
    #[comptime] g: Product,
) {
    let (f, sb) = comptime![(g.f, g.sb)];
    #[unroll]
    for n in 0..comptime![g.n] {
        let acc = cmma::Matrix::<f32>::from_value(cmma::MatrixIdent::Accumulator, f, f, f, cmma::MatrixLayout::Undefined, f32::new(0.0));
        #[unroll]
        for kk in 0..comptime![g.k] {
            let am = cmma::Matrix::<F>::from_slice(
                cmma::MatrixIdent::A,
                f,
                f,
                f,
                cmma::MatrixLayout::RowMajor,
                &a.slice(a0 + kk * f, comptime![g.alen]),
                comptime![g.sa as u32],
            );
            if comptime![g.bt] {
                let bm = cmma::Matrix::<F>::from_slice(
                    cmma::MatrixIdent::B,
                    f,
                    f,
                    f,
                    cmma::MatrixLayout::ColMajor,
                    &b.slice(b0 + n * f * sb + kk * f, comptime![g.blen]),
                    comptime![sb as u32],
                );
                cmma::execute::<F, F, f32, f32>(&am, &bm, &acc, &acc);
            } else {
                let bm = cmma::Matrix::<F>::from_slice(
                    cmma::MatrixIdent::B,
                    f,
                    f,
                    f,
                    cmma::MatrixLayout::RowMajor,
                    &b.slice(b0 + kk * f * sb + n * f, comptime![g.blen]),
                    comptime![sb as u32],
                );
                cmma::execute::<F, F, f32, f32>(&am, &bm, &acc, &acc);
            }
        }
        cmma::store(&mut out.slice_mut(o0 + n * f, comptime![g.olen]), &acc, comptime![g.so as u32], cmma::MatrixLayout::RowMajor);
    }
}

impl TcTiles {
    /// `X[rows, ·] · Y[cols, ·]ᵀ` over the head: the plane's `[f, C]` scores from two staged
    /// tiles of `d` columns (`rows` and `cols` rows), into the f32 scratch.
    pub const fn scores(&self) -> Product {
        let (rows, hs, ss) = (self.rows(), self.hs(), self.ss());
        Product {
            f: self.f,
            n: self.cols / self.f,
            k: self.d / self.f,
            sa: hs,
            sb: hs,
            so: ss,
            bt: true,
            alen: rows * hs,
            blen: self.cols * hs,
            olen: rows * ss,
        }
    }
    /// `W[rows, C] · Y[C, d]`: the plane's `[f, d]` from a weight tile (`P`, `dS`: row stride
    /// `ps`) and a staged `[C, d]` tile, into the f32 scratch.
    pub const fn weighted(&self) -> Product {
        let (rows, hs, ss, ps) = (self.rows(), self.hs(), self.ss(), self.ps());
        Product {
            f: self.f,
            n: self.d / self.f,
            k: self.cols / self.f,
            sa: ps,
            sb: hs,
            so: ss,
            bt: false,
            alen: rows * ps,
            blen: self.cols * hs,
            olen: rows * ss,
        }
    }
}

/// Lanes `< f`: the online softmax of their rows of this plane's scores (keys `k0..k0 + C`,
/// causal and sequence masks: the plane's first query at position `pw`, `s` keys), `P` into
/// `sp`, `α` into `sa`; `m`, `l` updated.
#[cube]
#[allow(clippy::too_many_arguments)]
fn plane_softmax<F: Float>(
    ss: &SharedMemory<f32>,
    sp: &mut SharedMemory<F>,
    sa: &mut SharedMemory<f32>,
    m: &mut Array<f32>,
    l: &mut Array<f32>,
    pw: usize,
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
            let qi = pw + r;
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

/// The forward: `o` (q's dtype, any strides) and `lse: [b·H·s_q]` f32; `q, k, v` f16 or bf16,
/// queries at positions `offset..`.
#[cube(launch, launch_unchecked)]
pub fn attn_forward_tc_kernel<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    o: &mut Tensor<F>,
    lse: &mut Tensor<f32>,
    scale: f32,
    offset: u32,
    #[comptime] t: TcTiles,
    #[define(F)] _dtype: StorageType,
) {
    let (f, d, cols, lanes, sst) = comptime![(t.f, t.d, t.cols, t.lanes, t.ss())];
    let (rows, rpl, per_lane) = comptime![(t.rows(), t.rows_per_lane(), t.per_lane())];
    let (s, skl, off) = (q.shape(2), k.shape(2), offset as usize);
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
    let kend = min(skl, off + q0 + rows);
    for tile in 0..(kend + cols - 1) / cols {
        let k0 = tile * cols;
        stage::<F>(k, &mut sk, bh, k0, skl, cols, t);
        stage::<F>(v, &mut sv, bh, k0, skl, cols, t);
        sync_cube();
        plane_matmul::<F>(&sq, w * f * t.hs(), &sk, 0, &mut ss, w * f * sst, comptime![t.scores()]);
        sync_cube();
        plane_softmax::<F>(&ss, &mut sp, &mut sa, &mut m, &mut l, off + qw, k0, skl, scale, t);
        sync_cube();
        plane_matmul::<F>(&sp, w * f * t.ps(), &sv, 0, &mut ss, w * f * sst, comptime![t.weighted()]);
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
