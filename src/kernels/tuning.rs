//! Which layer-norm kernels run and their tuning knobs (process-wide). The knobs are for
//! benchmarks (`device_check ln-bench`/`ln-tune`); their defaults are what measured fastest on the
//! H200 (BENCHMARKS.md).

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};

/// Which CubeCL row kernels run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LnKernel {
    /// `v1`: one cube of 256 units per row, the row re-read from global memory for each pass
    /// (any width; also the fallback of `v4` for rows wider than 16384, 32768 for a bf16/f16
    /// forward).
    Strided,
    /// `v4` (default): the row's share cached in registers, 128-bit vector loads/stores, units
    /// per row sized to the row (several rows per cube for short rows; ≤ 16 cached values per
    /// unit: 32 in the bf16/f16 forward, as many as 16 f32 take bytes) and plane reductions where
    /// planes have 32 lanes (rows up to 1024 × 16 = 16384 wide; 32768 for a bf16/f16 forward).
    /// Fastest on the H200 at every benchmarked shape (BENCHMARKS.md; it superseded `v2`, the
    /// same register cache with scalar loads and 256 units per row, and `v3`, `v2` with plane
    /// reductions, which were removed).
    Vectorized,
}

static VARIANT: AtomicU8 = AtomicU8::new(0);

/// Selects the kernel variant for every later launch (process-wide).
pub fn set_variant(v: LnKernel) {
    let code = match v {
        LnKernel::Strided => 1,
        LnKernel::Vectorized => 4,
    };
    VARIANT.store(code, Ordering::SeqCst);
}

static VECTOR_CACHE: AtomicUsize = AtomicUsize::new(16);

/// Tuning knob of `v4`: how many f32 values each unit keeps in registers per cached array
/// (default 16; the row is spread over more units when it needs more). For benchmarks.
#[doc(hidden)]
pub fn set_vector_cache(values: usize) {
    VECTOR_CACHE.store(values.max(1), Ordering::SeqCst);
}

static BACKWARD_CACHE: AtomicUsize = AtomicUsize::new(0);

/// Tuning knob of `v4`'s backward: its register cache in f32 values per unit per array (`None`,
/// the default: the forward's, halved for rows that fill a 256-unit cube). For benchmarks.
#[doc(hidden)]
pub fn set_backward_cache(values: Option<usize>) {
    BACKWARD_CACHE.store(values.map_or(0, |v| v.max(1)), Ordering::SeqCst);
}

#[cfg(feature = "cube")]
pub(super) fn backward_cache() -> Option<usize> {
    Some(BACKWARD_CACHE.load(Ordering::SeqCst)).filter(|&v| v > 0)
}

static BACKWARD_ROWS: AtomicUsize = AtomicUsize::new(64);

/// Tuning knob of `v4`'s backward: rows per cube (fewer cubes → fewer f32 dγ/dβ partials to
/// write and sum; default 64, but at least two cubes per multiprocessor). For benchmarks.
#[doc(hidden)]
pub fn set_backward_rows(rows: usize) {
    BACKWARD_ROWS.store(rows.max(1), Ordering::SeqCst);
}

/// `v4`'s backward rows per cube.
#[cfg(feature = "cube")]
pub(super) fn backward_rows() -> usize {
    BACKWARD_ROWS.load(Ordering::SeqCst)
}

/// The forward's register cache in values of an element of `size` bytes: as many values as
/// `vector_cache()` f32 values take bytes (32 bf16 values by default, cached as f32 since the
/// lean forward; as bf16 storage that was 3–7% faster at [4096, 8192] bf16 than 16 values, and the
/// same elsewhere, on the H200).
#[cfg(feature = "cube")]
pub(super) fn forward_cache(size: usize) -> usize {
    vector_cache() * 4 / size.clamp(1, 4)
}

static BACKWARD_PREFETCH: AtomicBool = AtomicBool::new(false);

/// Experimental knob of `v4`'s backward (default off, not yet measured on a GPU): each cube
/// loads the next row group's `dy`, `x`, μ and r before computing the current one (twice the
/// bytes in flight per unit; the backward runs few cubes per multiprocessor, so its loads are
/// latency-bound). For `ln-tune`.
#[doc(hidden)]
pub fn set_backward_prefetch(on: bool) {
    BACKWARD_PREFETCH.store(on, Ordering::SeqCst);
}

#[cfg(feature = "cube")]
pub(super) fn backward_prefetch() -> bool {
    BACKWARD_PREFETCH.load(Ordering::SeqCst)
}

static BACKWARD_LEAN: AtomicBool = AtomicBool::new(false);

/// Experimental knob of `v4`'s backward (default off, not yet measured on a GPU): the forward's
/// lean row code — each unit keeps γ of its columns in registers as f32 for all the rows it
/// visits (instead of a load and a conversion per row), and plane sums are unrolled xor-shuffles
/// (CubeCL's `plane_sum` is a runtime loop). For `ln-tune`.
#[doc(hidden)]
pub fn set_backward_lean(on: bool) {
    BACKWARD_LEAN.store(on, Ordering::SeqCst);
}

#[cfg(feature = "cube")]
pub(super) fn backward_lean() -> bool {
    BACKWARD_LEAN.load(Ordering::SeqCst)
}

static AFFINE_STAGING: AtomicBool = AtomicBool::new(false);

/// Experimental knob of `v4`'s forward (default off, not yet measured on a GPU): where a cube
/// holds several rows (h ≤ 1024 with the default cache) and γ/β as f32 take ≤ 16 KiB, its units
/// first convert γ and β to f32 into shared memory (once per cube instead of once per row, loads
/// issued with the row's), and the rows' normalisation reads them from there. For `ln-tune`.
#[doc(hidden)]
pub fn set_affine_staging(on: bool) {
    AFFINE_STAGING.store(on, Ordering::SeqCst);
}

#[cfg(feature = "cube")]
pub(super) fn affine_staging() -> bool {
    AFFINE_STAGING.load(Ordering::SeqCst)
}

static BOUNDS_CHECKS: AtomicBool = AtomicBool::new(false);

/// Whether `v4` kernels launch with CubeCL's per-access bounds checks (default off: each access
/// is guarded explicitly). For benchmarks and debugging.
#[doc(hidden)]
pub fn set_bounds_checks(on: bool) {
    BOUNDS_CHECKS.store(on, Ordering::SeqCst);
}

#[cfg(feature = "cube")]
pub(crate) fn bounds_checks() -> bool {
    BOUNDS_CHECKS.load(Ordering::SeqCst)
}

/// `v4`'s register cache (f32 values per unit).
#[cfg(feature = "cube")]
pub(super) fn vector_cache() -> usize {
    VECTOR_CACHE.load(Ordering::SeqCst)
}

/// The selected variant: set by [`set_variant`], else `BURN_PARALLEL_LN_KERNEL=v1|v4`, else `v4`.
pub fn variant() -> LnKernel {
    match VARIANT.load(Ordering::SeqCst) {
        1 => LnKernel::Strided,
        4 => LnKernel::Vectorized,
        _ => {
            let v = match std::env::var("BURN_PARALLEL_LN_KERNEL").as_deref() {
                Ok("v1") => LnKernel::Strided,
                _ => LnKernel::Vectorized,
            };
            set_variant(v);
            v
        }
    }
}
