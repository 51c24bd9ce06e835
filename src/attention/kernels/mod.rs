//! The flash-attention kernels (CubeCL; see the parent module for the math), register-blocked.
//! One cube per `(batch·head, block of R rows)`; a `CubeDim(tx, ty)` of units, unit `(x, y)`
//! owning rows `y + ty·i` (`i < R/ty`), columns `x + tx·j` of each `[R, C]` score tile
//! (`j < C/tx`), and the head-column vectors `x + tx·k` (`k < d/(N·tx)`) of its rows' outputs.
//! Tiles of `q, k, v, dO` are staged in shared memory as f32 vectors of `N` (4 where `d` allows)
//! consecutive head columns, rows `d/N` vectors apart rounded up to odd (units reading different
//! rows hit different banks):
//!
//! - scores of a tile: `S_ij = Σ_x a_ix·b_jx` as outer products of vectors from shared memory:
//!   `R/ty + C/tx` vector loads for `(R/ty)·(C/tx)·N` FMAs (4 × 4 blocks of vectors of 4: 8
//!   loads for 64 FMAs; the first kernels, one row per unit and scalar loads: 2 loads per FMA);
//! - `acc_ik += Σ_j w_ij·v_jk`: `w` (`P` or `dS`) staged column by column as vectors of `M =
//!   R/ty` lanes, one per unit row (a unit's weights of column `j` in one vector load, shared by
//!   the `tx` units of its row group), `v` rows as vectors: per `j`, `1 + d/(N·tx)` vector loads
//!   for `(R/ty)·d/tx` FMAs (scalar weights took `R/ty` loads more).
//!
//! Every global access is guarded by the sequence length; inputs are read through their strides
//! (`[b, H, s, d]` views of any layout), outputs written through theirs.
//!
//! Context parallelism: `q` may hold `s_q` queries at positions `offset..offset + s_q` against
//! `s_k ≥ offset + s_q` keys at `0..s_k` (query `i` sees keys `j ≤ offset + i`; `offset = 0`,
//! `s_k = s_q`: one whole causal sequence). Forward and dq read key tiles up to their block's
//! last position; dk/dv's blocks start at the first query tile that sees them, and key rows past
//! the last query's position get zeros.
//!
//! - [`attn_forward_kernel`]: rows are queries; per key tile: scores, the tile's row maxima
//!   (per-unit partials met in shared memory), `P` into shared memory, then `acc += P·v`, the
//!   online softmax's running max `m` and per-unit partial sums `l` rescaled by `exp(m − m')`
//!   (the partial sums meet in shared memory at the end).
//! - [`attn_backward_dq_kernel`]: rows are queries; per key tile: `S` and `dP = dO·vᵀ`, `dS`
//!   into shared memory, then `dq += dS·k`.
//! - [`attn_backward_dkv_kernel`]: rows are keys; per query tile (from the key block's diagonal
//!   on): `Sᵀ` and `dPᵀ`, `P` and `dS` into shared memory, then `dv += Pᵀ·dO`, `dk += dSᵀ·q`.
//!
//! Forward and dq run their row blocks last first (late causal rows see the most tiles); dk/dv's
//! blocks are longest first already. `q` is staged multiplied by `scale`, so `S = q̃·k`,
//! `dk = Σ dS·q̃`, `dq = scale·Σ dS·k`.

// Tile counts are written `(n + c − 1) / c` (the cube macro expands arithmetic, not `div_ceil`).
#![allow(clippy::manual_div_ceil)]

use burn_cubecl::cubecl;
use cubecl::prelude::*;

use super::MASKED;

mod backward;
pub use backward::{attn_backward_dkv_kernel, attn_backward_dq_kernel};
mod tensor_core;
pub use tensor_core::{attn_forward_tc_kernel, TcTiles};
mod tensor_core_backward;
pub use tensor_core_backward::{attn_backward_dkv_tc_kernel, attn_backward_dq_tc_kernel};

/// The tile geometry of one kernel launch.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub struct Tiles {
    /// Head width.
    pub d: usize,
    /// Rows per cube (queries, or keys for `dkv`); a multiple of `ty`.
    pub rows: usize,
    /// Rows of the other operand per tile (keys, or queries for `dkv`); a multiple of `tx`.
    pub cols: usize,
    /// Units along the columns (divides the vectors per row, `d / vec`).
    pub tx: usize,
    /// Units along the rows.
    pub ty: usize,
    /// Floats per shared-memory vector (4, 2 or 1: divides `d`).
    pub vec: usize,
}

impl Tiles {
    /// Vectors per staged row.
    pub const fn vs(&self) -> usize {
        self.d / self.vec
    }
    /// Shared-memory row stride of the staged `[n, d]` tiles, in vectors: odd, so that units
    /// reading the same column of different rows hit different banks.
    pub const fn vstride(&self) -> usize {
        self.vs() | 1
    }
    /// Head-column vectors per unit (`x + tx·k`).
    pub const fn dnv(&self) -> usize {
        self.vs() / self.tx
    }
    /// Rows per unit.
    pub const fn rm(&self) -> usize {
        self.rows / self.ty
    }
    /// Tile columns per unit.
    pub const fn cn(&self) -> usize {
        self.cols / self.tx
    }
    /// Output columns (head dimensions) per unit.
    pub const fn dn(&self) -> usize {
        self.dnv() * self.vec
    }
    /// Units per cube.
    pub const fn units(&self) -> usize {
        self.tx * self.ty
    }
    /// Shared-memory stride of a weight tile's columns, in vectors of `rm` (one per unit row):
    /// odd, so that with `tx ≥ 8` the units of a quarter warp storing different columns hit
    /// different banks (narrower `tx`, d ≤ 16 or odd widths, store 2-way conflicted: one store
    /// per column per tile).
    pub const fn wstride(&self) -> usize {
        self.ty | 1
    }
}

/// `(batch, head)` of this cube and the offset of that head's `[s, d]` matrix in `x`.
#[cube]
fn head_base<F: Float>(x: &Tensor<F>, bh: usize) -> usize {
    let heads = x.shape(1);
    (bh / heads) * x.stride(0) + (bh % heads) * x.stride(1)
}

/// Rows `row0..row0 + n` of this head's `[s, d]` matrix of `x`, times `scale`, into `tile`
/// (vectors of `N` consecutive head columns, row stride `vstride`; zeros past `s`), by all units
/// of the cube.
#[cube]
#[allow(clippy::too_many_arguments)]
fn load_tile<F: Float, N: Size>(
    x: &Tensor<F>,
    tile: &mut SharedMemory<Vector<f32, N>>,
    bh: usize,
    row0: usize,
    s: usize,
    scale: f32,
    #[comptime] n: usize,
    #[comptime] t: Tiles,
) {
    let (vs, vst, nv, units) = comptime![(t.vs(), t.vstride(), t.vec, t.units())];
    let base = head_base::<F>(x, bh);
    let (rs, cs) = (x.stride(2), x.stride(3));
    let mut i = UNIT_POS as usize;
    while i < comptime![n * vs] {
        let rr = i / vs;
        let cv = i % vs;
        let row = row0 + rr;
        let mut val = Vector::<f32, N>::new(0.0);
        if row < s {
            #[unroll]
            for e in 0..nv {
                val[e] = f32::cast_from(x[base + row * rs + (cv * nv + e) * cs]) * scale;
            }
        }
        tile[rr * vst + cv] = val;
        i += units;
    }
}

/// This unit's `[R/ty, C/tx]` block of `a·bᵀ`: rows `y + ty·i` of `a` (`[R, d]` staged) against
/// rows `x + tx·j` of `b` (`[C, d]` staged), row-major into a new array; per `N` head columns,
/// `R/ty + C/tx` vector loads for `(R/ty)·(C/tx)·N` FMAs.
#[cube]
fn block_dot<N: Size>(a: &SharedMemory<Vector<f32, N>>, b: &SharedMemory<Vector<f32, N>>, #[comptime] t: Tiles) -> Array<f32> {
    let (rm, cn, tx, ty, vs, vst, nv) = comptime![(t.rm(), t.cn(), t.tx, t.ty, t.vs(), t.vstride(), t.vec)];
    let (ux, uy) = (UNIT_POS_X as usize, UNIT_POS_Y as usize);
    let mut out = zeros(comptime![rm * cn]);
    let mut ra = Array::<Vector<f32, N>>::new(rm);
    let mut rb = Array::<Vector<f32, N>>::new(cn);
    for xv in 0..vs {
        #[unroll]
        for i in 0..rm {
            ra[i] = a[(uy + i * ty) * vst + xv];
        }
        #[unroll]
        for j in 0..cn {
            rb[j] = b[(ux + j * tx) * vst + xv];
        }
        #[unroll]
        for i in 0..rm {
            let va = ra[i];
            #[unroll]
            for j in 0..cn {
                let vb = rb[j];
                let mut sum = out[i * cn + j];
                #[unroll]
                for e in 0..nv {
                    sum += va[e] * vb[e];
                }
                out[i * cn + j] = sum;
            }
        }
    }
    out
}

/// `acc[i, k] += w[jj, i] · v[jj, vector x + tx·k]` for this unit's rows `i` and head column
/// vectors `k` (`w`: a weight tile from [`store_weights`], `v`: a `[C, d]` staged tile): per
/// `jj`, one vector load of the unit's `R/ty` weights and `d/(N·tx)` of `v`.
#[cube]
fn block_acc<N: Size, M: Size>(
    acc: &mut Array<Vector<f32, N>>,
    w: &SharedMemory<Vector<f32, M>>,
    v: &SharedMemory<Vector<f32, N>>,
    jj: usize,
    #[comptime] t: Tiles,
) {
    let (rm, dnv, tx, vst, wst) = comptime![(t.rm(), t.dnv(), t.tx, t.vstride(), t.wstride())];
    let (ux, uy) = (UNIT_POS_X as usize, UNIT_POS_Y as usize);
    let wv = w[jj * wst + uy];
    let mut rv = Array::<Vector<f32, N>>::new(dnv);
    #[unroll]
    for k in 0..dnv {
        rv[k] = v[jj * vst + ux + k * tx];
    }
    #[unroll]
    for i in 0..rm {
        let wi = Vector::<f32, N>::new(wv[i]);
        #[unroll]
        for k in 0..dnv {
            acc[i * dnv + k] = acc[i * dnv + k] + wi * rv[k];
        }
    }
}

/// This unit's `[R/ty, C/tx]` block `vals` (row-major, as [`block_dot`] gives it) into the
/// weight tile `w`: column `x + tx·j` of the block at vector `(x + tx·j)·wstride + y`, lane `i`
/// the unit's row `y + ty·i`.
#[cube]
fn store_weights<M: Size>(w: &mut SharedMemory<Vector<f32, M>>, vals: &Array<f32>, #[comptime] t: Tiles) {
    let (rm, cn, tx, wst) = comptime![(t.rm(), t.cn(), t.tx, t.wstride())];
    let (ux, uy) = (UNIT_POS_X as usize, UNIT_POS_Y as usize);
    #[unroll]
    for j in 0..cn {
        let mut col = Vector::<f32, M>::new(0.0);
        #[unroll]
        for i in 0..rm {
            col[i] = vals[i * cn + j];
        }
        w[(ux + j * tx) * wst + uy] = col;
    }
}

/// Writes this unit's `acc[i, k] · factor[i]` at row `row0 + y + ty·i`, head columns
/// `N·(x + tx·k) + e` of this head in `out` (rows past `s` skipped).
#[cube]
fn store_block<F: Float, N: Size>(
    out: &mut Tensor<F>,
    acc: &Array<Vector<f32, N>>,
    factor: &Array<f32>,
    bh: usize,
    row0: usize,
    s: usize,
    #[comptime] t: Tiles,
) {
    let (rm, dnv, tx, ty, nv) = comptime![(t.rm(), t.dnv(), t.tx, t.ty, t.vec)];
    let (ux, uy) = (UNIT_POS_X as usize, UNIT_POS_Y as usize);
    let base = head_base::<F>(out, bh);
    let (rs, cs) = (out.stride(2), out.stride(3));
    #[unroll]
    for i in 0..rm {
        let row = row0 + uy + i * ty;
        if row < s {
            #[unroll]
            for k in 0..dnv {
                let a = acc[i * dnv + k];
                #[unroll]
                for e in 0..nv {
                    out[base + row * rs + ((ux + k * tx) * nv + e) * cs] = F::cast_from(a[e] * factor[i]);
                }
            }
        }
    }
}

/// This cube's row block, the last first: causal rows late in the sequence see the most tiles,
/// so the longest cubes start first and the short ones fill the tail (dk/dv's blocks already
/// run longest first).
/// (Host-side, CubeCL's builtins are placeholder constants that make this overflow: only the
/// kernel's expansion ever runs.)
#[cube]
#[allow(arithmetic_overflow)]
fn last_first_block() -> usize {
    (CUBE_COUNT_Y - 1 - CUBE_POS_Y) as usize
}

#[cube]
fn zeros(#[comptime] n: usize) -> Array<f32> {
    let mut a = Array::<f32>::new(n);
    #[unroll]
    for i in 0..n {
        a[i] = f32::new(0.0);
    }
    a
}

#[cube]
fn vzeros<N: Size>(#[comptime] n: usize) -> Array<Vector<f32, N>> {
    let mut a = Array::<Vector<f32, N>>::new(n);
    #[unroll]
    for i in 0..n {
        a[i] = Vector::<f32, N>::new(0.0);
    }
    a
}

#[cube]
fn filled(#[comptime] n: usize, value: f32) -> Array<f32> {
    let mut a = Array::<f32>::new(n);
    #[unroll]
    for i in 0..n {
        a[i] = value;
    }
    a
}

/// Row `i` of this unit's `part` (`[R/ty]`) summed or maxed over the `tx` units of its rows
/// through `red` (`[R, tx]`); `part` is replaced by the result. Syncs the cube once, between
/// the writes and the reads: callers sync again before `red` is written next.
#[cube]
fn across_units(part: &mut Array<f32>, red: &mut SharedMemory<f32>, #[comptime] take_max: bool, #[comptime] t: Tiles) {
    let (rm, tx, ty) = comptime![(t.rm(), t.tx, t.ty)];
    let (ux, uy) = (UNIT_POS_X as usize, UNIT_POS_Y as usize);
    #[unroll]
    for i in 0..rm {
        red[(uy + i * ty) * tx + ux] = part[i];
    }
    sync_cube();
    #[unroll]
    for i in 0..rm {
        let row = (uy + i * ty) * tx;
        let mut r = red[row];
        for x in 1..tx {
            if take_max {
                r = max(r, red[row + x]);
            } else {
                r += red[row + x];
            }
        }
        part[i] = r;
    }
}

/// The forward: `o` (q's dtype, any strides) and `lse: [b·H·s_q]` f32, queries at positions
/// `offset..` (module docs).
#[cube(launch, launch_unchecked)]
pub fn attn_forward_kernel<F: Float, N: Size, M: Size>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    o: &mut Tensor<F>,
    lse: &mut Tensor<f32>,
    scale: f32,
    offset: u32,
    #[comptime] t: Tiles,
    #[define(F)] _dtype: StorageType,
) {
    let (rows, cols, rm, cn, tx, ty, dnv) = comptime![(t.rows, t.cols, t.rm(), t.cn(), t.tx, t.ty, t.dnv())];
    let (s, sk, off) = (q.shape(2), k.shape(2), offset as usize);
    let bh = CUBE_POS_X as usize;
    let q0 = last_first_block() * rows;
    let (ux, uy) = (UNIT_POS_X as usize, UNIT_POS_Y as usize);
    let mut sq = SharedMemory::<Vector<f32, N>>::new(comptime![rows * t.vstride()]);
    let mut skt = SharedMemory::<Vector<f32, N>>::new(comptime![cols * t.vstride()]);
    let mut sv = SharedMemory::<Vector<f32, N>>::new(comptime![cols * t.vstride()]);
    let mut sp = SharedMemory::<Vector<f32, M>>::new(comptime![cols * t.wstride()]);
    let mut red = SharedMemory::<f32>::new(comptime![rows * tx]);
    load_tile::<F, N>(q, &mut sq, bh, q0, s, scale, rows, t);
    let mut acc = vzeros::<N>(comptime![rm * dnv]);
    let mut m = filled(rm, f32::new(MASKED));
    let mut l = zeros(rm);
    let mut mt = Array::<f32>::new(rm);
    // This unit's first query position.
    let p0 = off + q0 + uy;
    let kend = min(sk, off + q0 + rows);
    for tile in 0..(kend + cols - 1) / cols {
        let k0 = tile * cols;
        load_tile::<F, N>(k, &mut skt, bh, k0, sk, 1.0, cols, t);
        load_tile::<F, N>(v, &mut sv, bh, k0, sk, 1.0, cols, t);
        sync_cube();
        let mut sc = block_dot::<N>(&sq, &skt, t);
        #[unroll]
        for i in 0..rm {
            let pi = p0 + i * ty;
            let mut mx = f32::new(MASKED);
            #[unroll]
            for j in 0..cn {
                let kj = k0 + ux + j * tx;
                // Keys past `s_k` lie past every real query's position (`s_k ≥ offset + s_q`):
                // the causal mask covers them (padding rows past `s_q` are never stored).
                if kj > pi {
                    sc[i * cn + j] = f32::new(MASKED);
                }
                mx = max(mx, sc[i * cn + j]);
            }
            mt[i] = mx;
        }
        across_units(&mut mt, &mut red, true, t);
        #[unroll]
        for i in 0..rm {
            let mnew = max(m[i], mt[i]);
            let alpha = f32::exp(m[i] - mnew);
            let mut sum = l[i] * alpha;
            let valpha = Vector::<f32, N>::new(alpha);
            #[unroll]
            for kk in 0..dnv {
                acc[i * dnv + kk] = acc[i * dnv + kk] * valpha;
            }
            #[unroll]
            for j in 0..cn {
                let p = f32::exp(sc[i * cn + j] - mnew);
                sum += p;
                sc[i * cn + j] = p;
            }
            l[i] = sum;
            m[i] = mnew;
        }
        store_weights::<M>(&mut sp, &sc, t);
        sync_cube();
        for jj in 0..cols {
            block_acc::<N, M>(&mut acc, &sp, &sv, jj, t);
        }
        sync_cube();
    }
    across_units(&mut l, &mut red, false, t);
    let mut inv = Array::<f32>::new(rm);
    #[unroll]
    for i in 0..rm {
        inv[i] = f32::new(1.0) / l[i];
        let qi = q0 + uy + i * ty;
        if ux == 0 && qi < s {
            lse[bh * s + qi] = m[i] + f32::ln(l[i]);
        }
    }
    store_block::<F, N>(o, &acc, &inv, bh, q0, s, t);
}
