//! Layer norm as a backend extension: fused CubeCL kernels on Cube backends, composed Burn ops
//! elsewhere, one autodiff implementation for all.
//!
//! On rows `x: [n, h]`: forward `y = (x − μ)·r·γ + β` with `r = 1/√(var + ε)` (biased variance),
//! saving `μ, r: [n, 1]`; backward with `x̂ = (x − μ)·r`, `g = dy·γ`:
//! `dx = r·(g − mean_h(g) − x̂·mean_h(g·x̂))`, `dγ = Σ_n dy·x̂`, `dβ = Σ_n dy`.
//! The kernels accumulate in f32 whatever the storage dtype (f32, bf16, f16) and keep `μ, r` in
//! f32; the composed fallback computes in the tensor's dtype.

#[cfg(feature = "cube")]
mod cube;
#[cfg(feature = "cube")]
mod cube_vec;

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorPrimitive};

fn wrap<B: Backend, const D: usize>(p: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

fn prim<B: Backend, const D: usize>(t: Tensor<B, D>) -> FloatTensor<B> {
    t.into_primitive().tensor()
}

/// Which CubeCL row kernels run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LnKernel {
    /// `v1`: one cube of 256 units per row, the row re-read from global memory for each pass
    /// (any width; also the fallback of `v4` for rows wider than 16384, 32768 for a bf16/f16
    /// forward).
    Strided,
    /// `v4` (default): the row's share cached in registers, 128-bit vector loads/stores, units
    /// per row sized to the row (several rows per cube for short rows; ≤ 16 cached values per
    /// unit: 32 in the bf16/f16 forward, which caches the storage dtype) and plane reductions where
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
fn backward_cache() -> Option<usize> {
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
fn backward_rows() -> usize {
    BACKWARD_ROWS.load(Ordering::SeqCst)
}

/// The forward's register cache in values of an element of `size` bytes: the same bytes as
/// `vector_cache()` f32 values (the forward caches the row in its storage dtype: 32 bf16 values
/// by default; on the H200 that was 3–7% faster at [4096, 8192] bf16 than 16, and the same
/// elsewhere).
#[cfg(feature = "cube")]
fn forward_cache(size: usize) -> usize {
    vector_cache() * 4 / size.clamp(1, 4)
}

static FORWARD_ONE_REDUCTION: AtomicBool = AtomicBool::new(false);

/// Tuning option of `v4`'s forward: mean and variance from one reduction of sums shifted by the
/// row's first element (one exchange between a row's planes instead of two), instead of the
/// mean, then `Σ (x − μ)²`. Off by default until measured faster. For benchmarks.
#[doc(hidden)]
pub fn set_forward_one_reduction(on: bool) {
    FORWARD_ONE_REDUCTION.store(on, Ordering::SeqCst);
}

#[cfg(feature = "cube")]
fn forward_one_reduction() -> bool {
    FORWARD_ONE_REDUCTION.load(Ordering::SeqCst)
}

static FORWARD_STREAM: AtomicUsize = AtomicUsize::new(0);

/// Tuning option of `v4`'s forward: `cubes_per_sm` > 0 launches that many cubes per
/// multiprocessor, each walking row groups and loading the next group while it normalises the
/// current one; 0 (default): one row group per cube. For benchmarks.
#[doc(hidden)]
pub fn set_forward_stream(cubes_per_sm: usize) {
    FORWARD_STREAM.store(cubes_per_sm, Ordering::SeqCst);
}

#[cfg(feature = "cube")]
fn forward_stream() -> usize {
    FORWARD_STREAM.load(Ordering::SeqCst)
}

static BOUNDS_CHECKS: AtomicBool = AtomicBool::new(false);

/// Whether `v4` kernels launch with CubeCL's per-access bounds checks (default off: each access
/// is guarded explicitly). For benchmarks and debugging.
#[doc(hidden)]
pub fn set_bounds_checks(on: bool) {
    BOUNDS_CHECKS.store(on, Ordering::SeqCst);
}

#[cfg(feature = "cube")]
fn bounds_checks() -> bool {
    BOUNDS_CHECKS.load(Ordering::SeqCst)
}

/// `v4`'s register cache (f32 values per unit).
#[cfg(feature = "cube")]
fn vector_cache() -> usize {
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

/// Forward: `(y [n, h], mean [n, 1], rstd [n, 1])`.
pub type LnForward<B> = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>);
/// Backward: `(dx [n, h], dgamma [h], dbeta [h])`.
pub type LnBackward<B> = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>);

/// A backend's layer norm on rows (see the module docs). Default bodies compose Burn ops.
pub trait LayerNormBackend: Backend {
    /// Normalises each row of `x: [n, h]` with `gamma, beta: [h]`.
    fn layer_norm_rows(x: FloatTensor<Self>, gamma: FloatTensor<Self>, beta: FloatTensor<Self>, epsilon: f32) -> LnForward<Self> {
        let x = wrap::<Self, 2>(x);
        let (var, mean) = x.clone().var_mean_bias(1);
        let rstd = var.add_scalar(epsilon).sqrt().recip();
        let y = (x - mean.clone()) * rstd.clone() * wrap::<Self, 1>(gamma).unsqueeze() + wrap::<Self, 1>(beta).unsqueeze();
        (prim(y), prim(mean), prim(rstd))
    }

    /// Gradients of [`layer_norm_rows`](Self::layer_norm_rows) for the output gradient `dy`.
    fn layer_norm_rows_backward(
        dy: FloatTensor<Self>,
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        mean: FloatTensor<Self>,
        rstd: FloatTensor<Self>,
    ) -> LnBackward<Self> {
        let (dy, x) = (wrap::<Self, 2>(dy), wrap::<Self, 2>(x));
        let (mean, rstd) = (wrap::<Self, 2>(mean), wrap::<Self, 2>(rstd));
        let xhat = (x - mean) * rstd.clone();
        let dgamma = (dy.clone() * xhat.clone()).sum_dim(0).squeeze_dim::<1>(0);
        let dbeta = dy.clone().sum_dim(0).squeeze_dim::<1>(0);
        let g = dy * wrap::<Self, 1>(gamma).unsqueeze();
        let dx = rstd * (g.clone() - g.clone().mean_dim(1) - xhat.clone() * (g * xhat).mean_dim(1));
        (prim(dx), prim(dgamma), prim(dbeta))
    }
}

impl LayerNormBackend for burn::backend::Flex {}

#[derive(Debug)]
struct LayerNormBackward;

impl<B: LayerNormBackend> Backward<B, 3> for LayerNormBackward {
    // x, gamma, mean, rstd
    type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [px, pg, pb] = ops.parents;
        let dy = grads.consume::<B>(&ops.node);
        let (x, gamma, mean, rstd) = ops.state;
        let (dx, dg, db) = B::layer_norm_rows_backward(dy, x, gamma, mean, rstd);
        for (parent, grad) in [(px, dx), (pg, dg), (pb, db)] {
            if let Some(node) = parent {
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

impl<B: LayerNormBackend, C: CheckpointStrategy> LayerNormBackend for Autodiff<B, C> {
    fn layer_norm_rows(x: FloatTensor<Self>, gamma: FloatTensor<Self>, beta: FloatTensor<Self>, epsilon: f32) -> LnForward<Self> {
        let nodes = [x.node.clone(), gamma.node.clone(), beta.node.clone()];
        let (y, mean, rstd) = B::layer_norm_rows(x.primitive.clone(), gamma.primitive.clone(), beta.primitive, epsilon);
        let y = match LayerNormBackward.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((x.primitive, gamma.primitive, mean.clone(), rstd.clone()), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        };
        (y, <Self as AutodiffBackend>::from_inner(mean), <Self as AutodiffBackend>::from_inner(rstd))
    }

    fn layer_norm_rows_backward(
        dy: FloatTensor<Self>,
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        mean: FloatTensor<Self>,
        rstd: FloatTensor<Self>,
    ) -> LnBackward<Self> {
        let inner = |t: FloatTensor<Self>| <Self as AutodiffBackend>::inner(t);
        let (dx, dg, db) = B::layer_norm_rows_backward(inner(dy), inner(x), inner(gamma), inner(mean), inner(rstd));
        let outer = |t| <Self as AutodiffBackend>::from_inner(t);
        (outer(dx), outer(dg), outer(db))
    }
}

/// What a backend needs to run every parallel layer: collectives and the layer-norm op.
/// Implemented for every backend that has both (Flex, CUDA, and their `Autodiff`).
pub trait ParallelBackend: crate::CollectiveBackend + LayerNormBackend {}

impl<B: crate::CollectiveBackend + LayerNormBackend> ParallelBackend for B {}

/// Layer norm over the last dim of `x` (any rank) through the backend's [`LayerNormBackend`].
pub fn layer_norm<B: LayerNormBackend, const D: usize>(x: Tensor<B, D>, gamma: Tensor<B, 1>, beta: Tensor<B, 1>, epsilon: f32) -> Tensor<B, D> {
    let dims = x.dims();
    let h = dims[D - 1];
    let rows = x.reshape([dims.iter().product::<usize>() / h.max(1), h]);
    let (y, _, _) = B::layer_norm_rows(prim(rows), prim(gamma), prim(beta), epsilon);
    wrap::<B, 2>(y).reshape(dims)
}
