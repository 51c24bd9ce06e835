//! The flash-attention kernels (CubeCL; see the parent module for the math), register-blocked.
//! One cube per `(batch·head, block of R rows)`; a `CubeDim(tx, ty)` of units, unit `(x, y)`
//! owning rows `y + ty·i` (`i < R/ty`), columns `x + tx·j` of each `[R, C]` score tile
//! (`j < C/tx`), and head dimensions `x + tx·k` (`k < d/tx`) of its rows' outputs:
//!
//! - scores of a tile: `S_ij = Σ_x a_ix·b_jx` as outer products from shared memory, `R/ty + C/tx`
//!   loads for `(R/ty)·(C/tx)` FMAs per `x` (the old one-row-per-unit kernels: 2 loads per FMA);
//! - `acc_ik += Σ_j w_ij·v_jk` the same way, `w` through shared memory.
//!
//! Tiles are staged in shared memory as f32 with a row stride of `d + 1` (no bank conflicts when
//! units read different rows); weight tiles with a row stride of `C + 1` (or `R + 1`). Every
//! global access is guarded by the sequence length; inputs are read through their strides
//! (`[b, H, s, d]` views of any layout), outputs written through theirs.
//!
//! - [`attn_forward_kernel`]: rows are queries; per key tile: scores, the tile's row maxima
//!   (per-unit partials met in shared memory), `P` into shared memory, then `acc += P·v`, the
//!   online softmax's running max `m` and per-unit partial sums `l` rescaled by `exp(m − m')`
//!   (the partial sums meet in shared memory at the end).
//! - [`attn_backward_dq_kernel`]: rows are queries; per key tile: `S` and `dP = dO·vᵀ`, `dS`
//!   into shared memory (`v`'s buffer, free by then), then `dq += dS·k`.
//!
//! Forward and dq run their row blocks last first (late causal rows see the most tiles).
//! - [`attn_backward_dkv_kernel`]: rows are keys; per query tile (from the key block's diagonal
//!   on): `Sᵀ` and `dPᵀ`, `P` and `dS` into shared memory, then `dv += Pᵀ·dO`, `dk += dSᵀ·q`.
//!
//! `q` is staged multiplied by `scale`, so `S = q̃·k`, `dk = Σ dS·q̃`, `dq = scale·Σ dS·k`.

// Tile counts are written `(n + c − 1) / c` (the cube macro expands arithmetic, not `div_ceil`).
#![allow(clippy::manual_div_ceil)]

use burn_cubecl::cubecl;
use cubecl::prelude::*;

use super::MASKED;

/// The tile geometry of one kernel launch.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub struct Tiles {
    /// Head width.
    pub d: usize,
    /// Rows per cube (queries, or keys for `dkv`); a multiple of `ty`.
    pub rows: usize,
    /// Rows of the other operand per tile (keys, or queries for `dkv`); a multiple of `tx`.
    pub cols: usize,
    /// Units along the columns (divides `d`).
    pub tx: usize,
    /// Units along the rows.
    pub ty: usize,
}

impl Tiles {
    /// Shared-memory row stride of the staged `[n, d]` tiles.
    pub const fn stride(&self) -> usize {
        self.d + 1
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
        self.d / self.tx
    }
    /// Units per cube.
    pub const fn units(&self) -> usize {
        self.tx * self.ty
    }
}

/// `(batch, head)` of this cube and the offset of that head's `[s, d]` matrix in `x`.
#[cube]
fn head_base<F: Float>(x: &Tensor<F>, bh: usize) -> usize {
    let heads = x.shape(1);
    (bh / heads) * x.stride(0) + (bh % heads) * x.stride(1)
}

/// Rows `row0..row0 + n` of this head's `[s, d]` matrix of `x`, times `scale`, into `tile`
/// (row stride `d + 1`; zeros past `s`), by all units of the cube.
#[cube]
fn load_tile<F: Float>(x: &Tensor<F>, tile: &mut SharedMemory<f32>, bh: usize, row0: usize, s: usize, scale: f32, #[comptime] n: usize, #[comptime] t: Tiles) {
    let (d, ds, units) = comptime![(t.d, t.stride(), t.units())];
    let base = head_base::<F>(x, bh);
    let (rs, cs) = (x.stride(2), x.stride(3));
    let mut i = UNIT_POS as usize;
    while i < comptime![n * d] {
        let rr = i / d;
        let cc = i % d;
        let row = row0 + rr;
        let mut val = f32::new(0.0);
        if row < s {
            val = f32::cast_from(x[base + row * rs + cc * cs]) * scale;
        }
        tile[rr * ds + cc] = val;
        i += units;
    }
}

/// This unit's `[R/ty, C/tx]` block of `a·bᵀ`: rows `y + ty·i` of `a` (`[R, d]` staged) against
/// rows `x + tx·j` of `b` (`[C, d]` staged), row-major into a new array.
#[cube]
fn block_dot(a: &SharedMemory<f32>, b: &SharedMemory<f32>, #[comptime] t: Tiles) -> Array<f32> {
    let (rm, cn, tx, ty, ds) = comptime![(t.rm(), t.cn(), t.tx, t.ty, t.stride())];
    let (ux, uy) = (UNIT_POS_X as usize, UNIT_POS_Y as usize);
    let mut out = zeros(comptime![rm * cn]);
    let mut ra = Array::<f32>::new(rm);
    let mut rb = Array::<f32>::new(cn);
    let d = comptime![t.d];
    for x in 0..d {
        #[unroll]
        for i in 0..rm {
            ra[i] = a[(uy + i * ty) * ds + x];
        }
        #[unroll]
        for j in 0..cn {
            rb[j] = b[(ux + j * tx) * ds + x];
        }
        #[unroll]
        for i in 0..rm {
            #[unroll]
            for j in 0..cn {
                out[i * cn + j] += ra[i] * rb[j];
            }
        }
    }
    out
}

/// `acc[i, k] += w[w0 + i·wstep] · v[jj, x + tx·k]` for this unit's rows `i` and head columns `k`
/// (`v`: a `[C, d]` staged tile).
#[cube]
fn block_acc(acc: &mut Array<f32>, w: &SharedMemory<f32>, w0: usize, #[comptime] wstep: usize, v: &SharedMemory<f32>, jj: usize, #[comptime] t: Tiles) {
    let (rm, dn, tx, ds) = comptime![(t.rm(), t.dn(), t.tx, t.stride())];
    let ux = UNIT_POS_X as usize;
    let mut rv = Array::<f32>::new(dn);
    #[unroll]
    for k in 0..dn {
        rv[k] = v[jj * ds + ux + k * tx];
    }
    #[unroll]
    for i in 0..rm {
        let wi = w[w0 + i * wstep];
        #[unroll]
        for k in 0..dn {
            acc[i * dn + k] += wi * rv[k];
        }
    }
}

/// Writes this unit's `acc[i, k] · factor[i]` at row `row0 + y + ty·i`, columns `x + tx·k` of
/// this head in `out` (rows past `s` skipped).
#[cube]
fn store_block<F: Float>(out: &mut Tensor<F>, acc: &Array<f32>, factor: &Array<f32>, bh: usize, row0: usize, s: usize, #[comptime] t: Tiles) {
    let (rm, dn, tx, ty) = comptime![(t.rm(), t.dn(), t.tx, t.ty)];
    let (ux, uy) = (UNIT_POS_X as usize, UNIT_POS_Y as usize);
    let base = head_base::<F>(out, bh);
    let (rs, cs) = (out.stride(2), out.stride(3));
    #[unroll]
    for i in 0..rm {
        let row = row0 + uy + i * ty;
        if row < s {
            #[unroll]
            for k in 0..dn {
                out[base + row * rs + (ux + k * tx) * cs] = F::cast_from(acc[i * dn + k] * factor[i]);
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

/// The forward: `o` (q's dtype, any strides) and `lse: [b·H·s]` f32.
#[cube(launch, launch_unchecked)]
pub fn attn_forward_kernel<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    o: &mut Tensor<F>,
    lse: &mut Tensor<f32>,
    scale: f32,
    #[comptime] t: Tiles,
    #[define(F)] _dtype: StorageType,
) {
    let (rows, cols, rm, cn, tx, ty, dn) = comptime![(t.rows, t.cols, t.rm(), t.cn(), t.tx, t.ty, t.dn())];
    let ps = comptime![cols + 1];
    let s = q.shape(2);
    let bh = CUBE_POS_X as usize;
    let q0 = last_first_block() * rows;
    let (ux, uy) = (UNIT_POS_X as usize, UNIT_POS_Y as usize);
    let mut sq = SharedMemory::<f32>::new(comptime![rows * (t.d + 1)]);
    let mut sk = SharedMemory::<f32>::new(comptime![cols * (t.d + 1)]);
    let mut sv = SharedMemory::<f32>::new(comptime![cols * (t.d + 1)]);
    let mut sp = SharedMemory::<f32>::new(comptime![rows * (cols + 1)]);
    let mut red = SharedMemory::<f32>::new(comptime![rows * tx]);
    load_tile::<F>(q, &mut sq, bh, q0, s, scale, rows, t);
    let mut acc = zeros(comptime![rm * dn]);
    let mut m = filled(rm, f32::new(MASKED));
    let mut l = zeros(rm);
    let mut mt = Array::<f32>::new(rm);
    let kend = min(s, q0 + rows);
    for tile in 0..(kend + cols - 1) / cols {
        let k0 = tile * cols;
        load_tile::<F>(k, &mut sk, bh, k0, s, 1.0, cols, t);
        load_tile::<F>(v, &mut sv, bh, k0, s, 1.0, cols, t);
        sync_cube();
        let mut sc = block_dot(&sq, &sk, t);
        #[unroll]
        for i in 0..rm {
            let qi = q0 + uy + i * ty;
            let mut mx = f32::new(MASKED);
            #[unroll]
            for j in 0..cn {
                let kj = k0 + ux + j * tx;
                if kj > qi || kj >= s {
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
            #[unroll]
            for kk in 0..dn {
                acc[i * dn + kk] *= alpha;
            }
            #[unroll]
            for j in 0..cn {
                let p = f32::exp(sc[i * cn + j] - mnew);
                sum += p;
                sp[(uy + i * ty) * ps + ux + j * tx] = p;
            }
            l[i] = sum;
            m[i] = mnew;
        }
        sync_cube();
        for jj in 0..cols {
            block_acc(&mut acc, &sp, uy * ps + jj, comptime![ty * ps], &sv, jj, t);
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
    store_block::<F>(o, &acc, &inv, bh, q0, s, t);
}

/// `dq` (any strides) from `dO`, `lse` and `delta = Σ_x dO·o` (`[b·H·s]` f32 each).
#[cube(launch, launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn attn_backward_dq_kernel<F: Float>(
    dout: &Tensor<F>,
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    lse: &Tensor<f32>,
    delta: &Tensor<f32>,
    dq: &mut Tensor<F>,
    scale: f32,
    #[comptime] t: Tiles,
    #[define(F)] _dtype: StorageType,
) {
    let (rows, cols, rm, cn, tx, ty, dn) = comptime![(t.rows, t.cols, t.rm(), t.cn(), t.tx, t.ty, t.dn())];
    let ps = comptime![cols + 1];
    let s = q.shape(2);
    let bh = CUBE_POS_X as usize;
    let q0 = last_first_block() * rows;
    let (ux, uy) = (UNIT_POS_X as usize, UNIT_POS_Y as usize);
    let mut sq = SharedMemory::<f32>::new(comptime![rows * (t.d + 1)]);
    let mut sdo = SharedMemory::<f32>::new(comptime![rows * (t.d + 1)]);
    let mut sk = SharedMemory::<f32>::new(comptime![cols * (t.d + 1)]);
    // `v`'s tile, then (once `dP` is in registers) `dS`'s: one buffer of the larger size.
    let mut svds = SharedMemory::<f32>::new(comptime![(cols * (t.d + 1)).max(rows * (cols + 1))]);
    load_tile::<F>(q, &mut sq, bh, q0, s, scale, rows, t);
    load_tile::<F>(dout, &mut sdo, bh, q0, s, 1.0, rows, t);
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
    let mut acc = zeros(comptime![rm * dn]);
    let kend = min(s, q0 + rows);
    for tile in 0..(kend + cols - 1) / cols {
        let k0 = tile * cols;
        load_tile::<F>(k, &mut sk, bh, k0, s, 1.0, cols, t);
        load_tile::<F>(v, &mut svds, bh, k0, s, 1.0, cols, t);
        sync_cube();
        let sc = block_dot(&sq, &sk, t);
        let dp = block_dot(&sdo, &svds, t);
        sync_cube();
        #[unroll]
        for i in 0..rm {
            let qi = q0 + uy + i * ty;
            #[unroll]
            for j in 0..cn {
                let kj = k0 + ux + j * tx;
                let mut ds_val = f32::new(0.0);
                if kj <= qi && kj < s && qi < s {
                    ds_val = f32::exp(sc[i * cn + j] - lse_r[i]) * (dp[i * cn + j] - delta_r[i]);
                }
                svds[(uy + i * ty) * ps + ux + j * tx] = ds_val;
            }
        }
        sync_cube();
        for jj in 0..cols {
            block_acc(&mut acc, &svds, uy * ps + jj, comptime![ty * ps], &sk, jj, t);
        }
        sync_cube();
    }
    let factor = filled(rm, scale);
    store_block::<F>(dq, &acc, &factor, bh, q0, s, t);
}

/// `dk, dv` (any strides); rows are keys, tiles are queries.
#[cube(launch, launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn attn_backward_dkv_kernel<F: Float>(
    dout: &Tensor<F>,
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    lse: &Tensor<f32>,
    delta: &Tensor<f32>,
    dk: &mut Tensor<F>,
    dv: &mut Tensor<F>,
    scale: f32,
    #[comptime] t: Tiles,
    #[define(F)] _dtype: StorageType,
) {
    let (rows, cols, rm, cn, tx, ty, dn) = comptime![(t.rows, t.cols, t.rm(), t.cn(), t.tx, t.ty, t.dn())];
    let ps = comptime![rows + 1];
    let s = q.shape(2);
    let bh = CUBE_POS_X as usize;
    let j0 = CUBE_POS_Y as usize * rows;
    let (ux, uy) = (UNIT_POS_X as usize, UNIT_POS_Y as usize);
    let mut sk = SharedMemory::<f32>::new(comptime![rows * (t.d + 1)]);
    let mut sv = SharedMemory::<f32>::new(comptime![rows * (t.d + 1)]);
    let mut sq = SharedMemory::<f32>::new(comptime![cols * (t.d + 1)]);
    let mut sdo = SharedMemory::<f32>::new(comptime![cols * (t.d + 1)]);
    let mut sp = SharedMemory::<f32>::new(comptime![cols * (rows + 1)]);
    let mut sds = SharedMemory::<f32>::new(comptime![cols * (rows + 1)]);
    let mut sstat = SharedMemory::<f32>::new(comptime![2 * cols]);
    load_tile::<F>(k, &mut sk, bh, j0, s, 1.0, rows, t);
    load_tile::<F>(v, &mut sv, bh, j0, s, 1.0, rows, t);
    let mut acc_k = zeros(comptime![rm * dn]);
    let mut acc_v = zeros(comptime![rm * dn]);
    for tile in j0 / cols..(s + cols - 1) / cols {
        let i0 = tile * cols;
        load_tile::<F>(q, &mut sq, bh, i0, s, scale, cols, t);
        load_tile::<F>(dout, &mut sdo, bh, i0, s, 1.0, cols, t);
        load_stats(lse, delta, &mut sstat, bh, i0, s, t);
        sync_cube();
        let sc = block_dot(&sk, &sq, t);
        let dp = block_dot(&sv, &sdo, t);
        #[unroll]
        for i in 0..rm {
            let kj = j0 + uy + i * ty;
            #[unroll]
            for j in 0..cn {
                let qc = ux + j * tx;
                let (mut p, mut ds_val) = (f32::new(0.0), f32::new(0.0));
                if kj <= i0 + qc && i0 + qc < s {
                    p = f32::exp(sc[i * cn + j] - sstat[qc]);
                    ds_val = p * (dp[i * cn + j] - sstat[cols + qc]);
                }
                sp[qc * ps + uy + i * ty] = p;
                sds[qc * ps + uy + i * ty] = ds_val;
            }
        }
        sync_cube();
        for jj in 0..cols {
            block_acc(&mut acc_v, &sp, jj * ps + uy, ty, &sdo, jj, t);
            block_acc(&mut acc_k, &sds, jj * ps + uy, ty, &sq, jj, t);
        }
        sync_cube();
    }
    let one = filled(rm, f32::new(1.0));
    store_block::<F>(dk, &acc_k, &one, bh, j0, s, t);
    store_block::<F>(dv, &acc_v, &one, bh, j0, s, t);
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
