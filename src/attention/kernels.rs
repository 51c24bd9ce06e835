//! The flash-attention kernels (CubeCL; see the parent module for the math). One cube per
//! `(batch·head, block of rows)`; units `(u, r)` in a `CubeDim(c, rows)`: `r` is the row the unit
//! works for, `u` its lane among the row's `c` units. Tiles are staged in shared memory as f32
//! with a row stride of `d + 1` (no bank conflicts when lanes read different rows). Each unit
//! accumulates `d / c` output columns (`u, u + c, …`) in registers; dot products over `d` read
//! the shared tiles. Every global access is guarded by the sequence length; inputs are read
//! through their strides (`[b, H, s, d]` views of any layout), outputs written through theirs.
//!
//! - [`attn_forward_kernel`]: rows are queries; per key tile: scores into shared memory, then
//!   the online softmax (running max `m`, sum `l`, rescaled accumulators) and `P·v`.
//! - [`attn_backward_dq_kernel`]: rows are queries; per key tile: `dS` into shared memory, then
//!   `dq += dS·k`.
//! - [`attn_backward_dkv_kernel`]: rows are keys; per query tile (from the key block's diagonal
//!   on): `P` and `dS` into shared memory, then `dv += Pᵀ·dO`, `dk += dSᵀ·q`.
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
    /// Rows per cube (queries, or keys for `dkv`).
    pub rows: usize,
    /// Rows of the other operand per tile (keys, or queries for `dkv`).
    pub cols: usize,
    /// Units per row (divides `d`).
    pub lanes: usize,
}

impl Tiles {
    /// Shared-memory row stride.
    pub const fn stride(&self) -> usize {
        self.d + 1
    }
    /// Output columns per unit.
    pub const fn per_unit(&self) -> usize {
        self.d / self.lanes
    }
    /// Units per cube.
    pub const fn units(&self) -> usize {
        self.rows * self.lanes
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

/// `Σ_x a[ai + x]·b[bi + x]` over `d`.
#[cube]
fn dot(a: &SharedMemory<f32>, ai: usize, b: &SharedMemory<f32>, bi: usize, #[comptime] d: usize) -> f32 {
    let mut acc = f32::new(0.0);
    for x in 0..d {
        acc += a[ai + x] * b[bi + x];
    }
    acc
}

/// Writes this unit's columns `acc · factor` of row `row` of this head in `out`.
#[cube]
fn store_row<F: Float>(out: &mut Tensor<F>, acc: &Array<f32>, bh: usize, row: usize, factor: f32, #[comptime] t: Tiles) {
    let (lanes, per_unit) = comptime![(t.lanes, t.per_unit())];
    let heads = out.shape(1);
    let base = (bh / heads) * out.stride(0) + (bh % heads) * out.stride(1) + row * out.stride(2);
    let u = UNIT_POS_X as usize;
    #[unroll]
    for kx in 0..per_unit {
        out[base + (u + kx * lanes) * out.stride(3)] = F::cast_from(acc[kx] * factor);
    }
}

/// `acc += w · tile[row j]` at this unit's columns.
#[cube]
fn accumulate(acc: &mut Array<f32>, w: f32, tile: &SharedMemory<f32>, j: usize, #[comptime] t: Tiles) {
    let (lanes, per_unit, ds) = comptime![(t.lanes, t.per_unit(), t.stride())];
    let u = UNIT_POS_X as usize;
    #[unroll]
    for kx in 0..per_unit {
        acc[kx] += w * tile[j * ds + u + kx * lanes];
    }
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
    let (rows, cols, lanes, ds, d) = comptime![(t.rows, t.cols, t.lanes, t.stride(), t.d)];
    let s = q.shape(2);
    let bh = CUBE_POS_X as usize;
    let q0 = CUBE_POS_Y as usize * rows;
    let (r, u) = (UNIT_POS_Y as usize, UNIT_POS_X as usize);
    let qi = q0 + r;
    let mut sq = SharedMemory::<f32>::new(comptime![rows * (d + 1)]);
    let mut skv = SharedMemory::<f32>::new(comptime![cols * (d + 1)]);
    let mut ss = SharedMemory::<f32>::new(comptime![rows * cols]);
    load_tile::<F>(q, &mut sq, bh, q0, s, scale, rows, t);
    let mut acc = zeros(comptime![t.per_unit()]);
    let mut m = f32::new(MASKED);
    let mut l = f32::new(0.0);
    let kend = min(s, q0 + rows);
    for tile in 0..(kend + cols - 1) / cols {
        let k0 = tile * cols;
        load_tile::<F>(k, &mut skv, bh, k0, s, 1.0, cols, t);
        sync_cube();
        let mut jj = u;
        while jj < cols {
            let j = k0 + jj;
            let mut score = f32::new(MASKED);
            if j <= qi && j < s {
                score = dot(&sq, r * ds, &skv, jj * ds, d);
            }
            ss[r * cols + jj] = score;
            jj += lanes;
        }
        sync_cube();
        load_tile::<F>(v, &mut skv, bh, k0, s, 1.0, cols, t);
        sync_cube();
        let mut mt = m;
        for jj in 0..cols {
            mt = max(mt, ss[r * cols + jj]);
        }
        let alpha = f32::exp(m - mt);
        l *= alpha;
        #[unroll]
        for kx in 0..comptime![t.per_unit()] {
            acc[kx] *= alpha;
        }
        for jj in 0..cols {
            let p = f32::exp(ss[r * cols + jj] - mt);
            l += p;
            accumulate(&mut acc, p, &skv, jj, t);
        }
        m = mt;
        sync_cube();
    }
    if qi < s {
        store_row::<F>(o, &acc, bh, qi, f32::new(1.0) / l, t);
        if u == 0 {
            lse[bh * s + qi] = m + f32::ln(l);
        }
    }
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
    let (rows, cols, lanes, ds, d) = comptime![(t.rows, t.cols, t.lanes, t.stride(), t.d)];
    let s = q.shape(2);
    let bh = CUBE_POS_X as usize;
    let q0 = CUBE_POS_Y as usize * rows;
    let (r, u) = (UNIT_POS_Y as usize, UNIT_POS_X as usize);
    let qi = q0 + r;
    let mut sq = SharedMemory::<f32>::new(comptime![rows * (d + 1)]);
    let mut sdo = SharedMemory::<f32>::new(comptime![rows * (d + 1)]);
    let mut sk = SharedMemory::<f32>::new(comptime![cols * (d + 1)]);
    let mut sv = SharedMemory::<f32>::new(comptime![cols * (d + 1)]);
    let mut sds = SharedMemory::<f32>::new(comptime![rows * cols]);
    load_tile::<F>(q, &mut sq, bh, q0, s, scale, rows, t);
    load_tile::<F>(dout, &mut sdo, bh, q0, s, 1.0, rows, t);
    let (mut lse_r, mut delta_r) = (f32::new(0.0), f32::new(0.0));
    if qi < s {
        lse_r = lse[bh * s + qi];
        delta_r = delta[bh * s + qi];
    }
    let mut acc = zeros(comptime![t.per_unit()]);
    let kend = min(s, q0 + rows);
    for tile in 0..(kend + cols - 1) / cols {
        let k0 = tile * cols;
        load_tile::<F>(k, &mut sk, bh, k0, s, 1.0, cols, t);
        load_tile::<F>(v, &mut sv, bh, k0, s, 1.0, cols, t);
        sync_cube();
        let mut jj = u;
        while jj < cols {
            let j = k0 + jj;
            let mut ds_val = f32::new(0.0);
            if j <= qi && j < s && qi < s {
                let p = f32::exp(dot(&sq, r * ds, &sk, jj * ds, d) - lse_r);
                ds_val = p * (dot(&sdo, r * ds, &sv, jj * ds, d) - delta_r);
            }
            sds[r * cols + jj] = ds_val;
            jj += lanes;
        }
        sync_cube();
        for jj in 0..cols {
            accumulate(&mut acc, sds[r * cols + jj], &sk, jj, t);
        }
        sync_cube();
    }
    if qi < s {
        store_row::<F>(dq, &acc, bh, qi, scale, t);
    }
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
    let (rows, cols, lanes, ds, d) = comptime![(t.rows, t.cols, t.lanes, t.stride(), t.d)];
    let s = q.shape(2);
    let bh = CUBE_POS_X as usize;
    let j0 = CUBE_POS_Y as usize * rows;
    let (r, u) = (UNIT_POS_Y as usize, UNIT_POS_X as usize);
    let j = j0 + r;
    let mut sk = SharedMemory::<f32>::new(comptime![rows * (d + 1)]);
    let mut sv = SharedMemory::<f32>::new(comptime![rows * (d + 1)]);
    let mut sq = SharedMemory::<f32>::new(comptime![cols * (d + 1)]);
    let mut sdo = SharedMemory::<f32>::new(comptime![cols * (d + 1)]);
    let mut sp = SharedMemory::<f32>::new(comptime![rows * cols]);
    let mut sds = SharedMemory::<f32>::new(comptime![rows * cols]);
    let mut sstat = SharedMemory::<f32>::new(comptime![2 * cols]);
    let qt = qtile::<F>(k, v, &mut sk, &mut sv, bh, j0, s, t);
    let mut acc_k = zeros(comptime![t.per_unit()]);
    let mut acc_v = zeros(comptime![t.per_unit()]);
    for tile in qt..(s + cols - 1) / cols {
        let i0 = tile * cols;
        load_tile::<F>(q, &mut sq, bh, i0, s, scale, cols, t);
        load_tile::<F>(dout, &mut sdo, bh, i0, s, 1.0, cols, t);
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
        sync_cube();
        let mut ii = u;
        while ii < cols {
            let i = i0 + ii;
            let (mut p, mut ds_val) = (f32::new(0.0), f32::new(0.0));
            if j <= i && i < s {
                p = f32::exp(dot(&sq, ii * ds, &sk, r * ds, d) - sstat[ii]);
                ds_val = p * (dot(&sdo, ii * ds, &sv, r * ds, d) - sstat[cols + ii]);
            }
            sp[ii * rows + r] = p;
            sds[ii * rows + r] = ds_val;
            ii += lanes;
        }
        sync_cube();
        for ii in 0..cols {
            accumulate(&mut acc_v, sp[ii * rows + r], &sdo, ii, t);
            accumulate(&mut acc_k, sds[ii * rows + r], &sq, ii, t);
        }
        sync_cube();
    }
    if j < s {
        store_row::<F>(dk, &acc_k, bh, j, 1.0, t);
        store_row::<F>(dv, &acc_v, bh, j, 1.0, t);
    }
}

/// Stages the cube's key block `j0..j0 + rows` of `k` and `v`; returns the first query tile that
/// sees it (causal: queries `i ≥ j0`).
#[cube]
#[allow(clippy::too_many_arguments)]
fn qtile<F: Float>(
    k: &Tensor<F>,
    v: &Tensor<F>,
    sk: &mut SharedMemory<f32>,
    sv: &mut SharedMemory<f32>,
    bh: usize,
    j0: usize,
    s: usize,
    #[comptime] t: Tiles,
) -> usize {
    load_tile::<F>(k, sk, bh, j0, s, 1.0, comptime![t.rows], t);
    load_tile::<F>(v, sv, bh, j0, s, 1.0, comptime![t.rows], t);
    j0 / comptime![t.cols]
}
