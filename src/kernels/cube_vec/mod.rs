//! Vectorized row kernels (`v4`, the default): each unit caches its share of the row in registers
//! (`x`, and `dy` backward, read from global memory once), with 16-byte vector loads and stores
//! (`Vector<F, N>`: 4 × f32 or 8 × bf16/f16 where the runtime loads 128 bits), and the number of
//! units per row sized to the row (`block` = 32…1024 so that each unit caches ≤ 16 values,
//! several rows per cube when a row needs fewer than 256 units), so short rows (h = 768) do not
//! leave most of a 256-unit cube idle and long bf16 rows do not spill registers.
//!
//! Reductions are per row: with plane ops of exactly 32 lanes (CUDA) each plane sums its lanes and,
//! when a row spans several planes, the planes' partials meet in shared memory (one cube sync);
//! without plane ops (e.g. lavapipe), a shared-memory tree over the row's units. The layout of a
//! cube is `(block, rows)`: unit `(x, y)` works on row `cube × rows + y`, vector columns
//! `x, x + block, …`. Accumulation in f32 as in `v1`.
//!
//! The backward is one pass over `dy` and `x` ([`ln_backward_fused_vec_kernel`]: `dx` and f32
//! dγ/dβ partials per cube) and one column sum ([`ln_partials_sum_kernel`]): two launches. On the
//! H200 it beat the earlier two-kernel backward (`dx`, then dγ/dβ partials re-reading `dy` and
//! `x`) at every benchmarked shape (BENCHMARKS.md), which was removed.
//!
//! Every global and shared-memory access is guarded by an explicit bound (`valid`, `c < nv`,
//! `col < width`, …), so the kernels may launch without CubeCL's per-access bounds checks
//! (`launch_unchecked`, the default; see `set_bounds_checks`).

// `#[cube]` code expands operators, not `is_multiple_of`/`div_ceil` method calls; a comptime
// branch (`if comptime![..]`) stays apart from the runtime condition inside it.
#![allow(clippy::manual_is_multiple_of, clippy::manual_div_ceil, clippy::collapsible_if)]

use burn_cubecl::cubecl;
use cubecl::prelude::*;

mod backward;
mod forward;
pub use backward::{ln_backward_fused_vec_kernel, ln_partials_sum_kernel};
pub use forward::ln_forward_vec_kernel;

/// Launch geometry for rows of `h` elements in vectors of `vector` elements with at most
/// `max_units` units per cube: `(block, rows per cube, vectors per unit)`, or `None` if the row
/// is too wide (then `v1` runs: past `1024 × cache` elements). `block` is a
/// power of two from 32 (one CUDA plane). Each unit caches at most `cache` f32 values per cached
/// array — except, with `one_plane`, that a row fitting one 32-unit plane with ≤ 32 values per
/// unit stays in that plane (reductions without shared memory or cube syncs). Measured on the
/// H200 (BENCHMARKS.md): `cache` = 16 is fastest for h ≥ 4096 (more units in flight, no register
/// pressure: 32 values of bf16 × 8 vectors spilled), one plane for the forward at h ≤ 1024; the
/// one-pass backward, with four cached arrays, takes the plain cache.
pub fn geometry(h: usize, vector: usize, max_units: usize, cache: usize, one_plane: bool) -> Option<(usize, usize, usize)> {
    let nv = h / vector;
    if one_plane && nv.div_ceil(32) * vector <= 32 {
        return Some((32, rows_per_cube(32), nv.div_ceil(32).max(1)));
    }
    let max_per_unit = (cache / vector).max(1);
    let max_block = max_units.min(1024);
    let mut block = 32;
    while nv.div_ceil(block) > max_per_unit && block * 2 <= max_block {
        block *= 2;
    }
    let per_unit = nv.div_ceil(block).max(1);
    (per_unit <= max_per_unit).then_some((block, rows_per_cube(block), per_unit))
}

/// Rows per cube for `block` units per row: 256 units per cube where rows are short (the
/// kernels size their shared memory `block × rows` from this too).
pub fn rows_per_cube(block: usize) -> usize {
    (256 / block).max(1)
}

/// Sum over a plane of exactly 32 lanes: CubeCL's `plane_sum` (a loop over the plane size at
/// run time), or with `butterfly` five unrolled xor-shuffles.
#[cube]
fn plane_total(value: f32, #[comptime] butterfly: bool) -> f32 {
    let mut v = value;
    if comptime![butterfly] {
        v += plane_shuffle_xor(v, 16);
        v += plane_shuffle_xor(v, 8);
        v += plane_shuffle_xor(v, 4);
        v += plane_shuffle_xor(v, 2);
        v += plane_shuffle_xor(v, 1);
    } else {
        v = plane_sum(value);
    }
    v
}

/// Sum of `value` over the `block` units of this unit's row (cube layout `(block, rows)`); every
/// unit of the row gets the total. `smem` has `block × rows` slots. `plane`: 32-lane plane ops
/// (`butterfly`: see [`plane_total`]).
#[cube]
fn row_sum(smem: &mut SharedMemory<f32>, value: f32, #[comptime] block: usize, #[comptime] plane: bool, #[comptime] butterfly: bool) -> f32 {
    let tid = UNIT_POS_X as usize;
    let base = UNIT_POS_Y as usize * block;
    let mut total = f32::new(0.0);
    if comptime![plane] {
        let partial = plane_total(value, butterfly);
        if comptime![block == 32] {
            total = partial;
        } else {
            let planes = comptime![block / 32];
            if tid % 32 == 0 {
                smem[base + tid / 32] = partial;
            }
            sync_cube();
            #[unroll]
            for p in 0..planes {
                total += smem[base + p];
            }
            sync_cube();
        }
    } else {
        smem[base + tid] = value;
        sync_cube();
        let mut stride = CUBE_DIM_X as usize / 2;
        while stride > 0 {
            if tid < stride {
                let other = smem[base + tid + stride];
                smem[base + tid] += other;
            }
            sync_cube();
            stride /= 2;
        }
        total = smem[base];
        sync_cube();
    }
    total
}

/// Sum of a vector's lanes.
#[cube]
fn lanes_sum<N: Size>(v: Vector<f32, N>) -> f32 {
    let mut s = f32::new(0.0);
    #[unroll]
    for j in 0..v.vector_size() {
        s += v[j];
    }
    s
}

/// This unit's row (may be ≥ n in the last cube: such units still reach every cube sync).
#[cube]
fn my_row() -> usize {
    (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) as usize * CUBE_DIM_Y as usize + UNIT_POS_Y as usize
}
