//! Layer norm as a backend extension: fused CubeCL kernels on Cube backends, composed Burn ops
//! elsewhere, one autodiff implementation for all.
//!
//! On rows `x: [n, h]`: forward `y = (x − μ)·r·γ + β` with `r = 1/√(var + ε)` (biased variance),
//! saving `μ, r: [n, 1]`; backward with `x̂ = (x − μ)·r`, `g = dy·γ`:
//! `dx = r·(g − mean_h(g) − x̂·mean_h(g·x̂))`, `dγ = Σ_n dy·x̂`, `dβ = Σ_n dy`.
//! The kernels accumulate in f32 whatever the storage dtype (f32, bf16, f16) and keep `μ, r` in
//! f32; so does the composed fallback (half-precision inputs are computed in f32).
//!
//! RMS norm ([`rms_norm`], Llama's): `y = x·r·γ` with `r = 1/√(mean_h(x²) + ε)`, saving `r`;
//! backward with `x̂ = x·r`, `g = dy·γ`: `dx = r·(g − x̂·mean_h(g·x̂))`, `dγ = Σ_n dy·x̂`. One
//! autodiff op keeping `x` and `r` only, as the layer norm does: on Cube backends the layer
//! norm's `v4` kernels with their `rms` switch (one reduction per row, no β; where `v4` takes
//! the row, see [`LayerNormBackend::rms_norm_fused`]), composed Burn ops elsewhere (statistics
//! in f32).

#[cfg(feature = "cube")]
mod cube;
#[cfg(feature = "cube")]
mod cube_vec;
#[cfg(feature = "cuda-source")]
mod cuda_source;
mod tuning;
#[cfg(feature = "cuda-source")]
pub use cuda_source::layer_norm_cuda_sources;
#[cfg(feature = "cube")]
pub(crate) use tuning::bounds_checks as kernel_bounds_checks;

#[cfg(feature = "cube")]
use tuning::{affine_staging, backward_cache, backward_lean, backward_prefetch, backward_rows, bounds_checks, forward_cache, vector_cache};
pub use tuning::{
    set_affine_staging, set_backward_cache, set_backward_lean, set_backward_prefetch, set_backward_rows, set_bounds_checks, set_variant, set_vector_cache,
    variant, LnKernel,
};

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

/// Forward: `(y [n, h], mean [n, 1], rstd [n, 1])`.
pub type LnForward<B> = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>);
/// Backward: `(dx [n, h], dgamma [h], dbeta [h])`.
pub type LnBackward<B> = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>);
/// RMS norm forward `(y [n, h], rstd [n, 1])`, or backward `(dx [n, h], dgamma [h])`.
pub type RmsPair<B> = (FloatTensor<B>, FloatTensor<B>);

/// A backend's layer norm on rows (see the module docs). Default bodies compose Burn ops.
pub trait LayerNormBackend: Backend {
    /// Normalises each row of `x: [n, h]` with `gamma, beta: [h]`.
    fn layer_norm_rows(x: FloatTensor<Self>, gamma: FloatTensor<Self>, beta: FloatTensor<Self>, epsilon: f32) -> LnForward<Self> {
        let x = wrap::<Self, 2>(x);
        let dtype = x.dtype();
        let (x, gamma, beta) = (stat(x), stat(wrap::<Self, 1>(gamma)), stat(wrap::<Self, 1>(beta)));
        let (var, mean) = x.clone().var_mean_bias(1);
        let rstd = var.add_scalar(epsilon).sqrt().recip();
        let y = (x - mean.clone()) * rstd.clone() * gamma.unsqueeze() + beta.unsqueeze();
        (prim(crate::precision::cast_to(y, dtype)), prim(mean), prim(rstd))
    }

    /// Gradients of [`layer_norm_rows`](Self::layer_norm_rows) for the output gradient `dy`.
    fn layer_norm_rows_backward(
        dy: FloatTensor<Self>,
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        mean: FloatTensor<Self>,
        rstd: FloatTensor<Self>,
    ) -> LnBackward<Self> {
        let (dy, x, gamma) = (wrap::<Self, 2>(dy), wrap::<Self, 2>(x), wrap::<Self, 1>(gamma));
        let (x_dtype, g_dtype) = (x.dtype(), gamma.dtype());
        let (dy, x, gamma) = (stat(dy), stat(x), stat(gamma));
        let (mean, rstd) = (wrap::<Self, 2>(mean), wrap::<Self, 2>(rstd));
        let xhat = (x - mean) * rstd.clone();
        let dgamma = (dy.clone() * xhat.clone()).sum_dim(0).squeeze_dim::<1>(0);
        let dbeta = dy.clone().sum_dim(0).squeeze_dim::<1>(0);
        let g = dy * gamma.unsqueeze();
        let dx = rstd * (g.clone() - g.clone().mean_dim(1) - xhat.clone() * (g * xhat).mean_dim(1));
        use crate::precision::cast_to;
        (prim(cast_to(dx, x_dtype)), prim(cast_to(dgamma, g_dtype)), prim(cast_to(dbeta, g_dtype)))
    }

    /// RMS-normalises each row of `x: [n, h]` with `gamma: [h]`: `(y, rstd [n, 1] f32)`.
    fn rms_norm_rows(x: FloatTensor<Self>, gamma: FloatTensor<Self>, epsilon: f32) -> RmsPair<Self> {
        composed_rms_norm_rows::<Self>(x, gamma, epsilon)
    }

    /// Gradients `(dx, dgamma)` of [`rms_norm_rows`](Self::rms_norm_rows) for `dy`.
    fn rms_norm_rows_backward(dy: FloatTensor<Self>, x: FloatTensor<Self>, gamma: FloatTensor<Self>, rstd: FloatTensor<Self>) -> RmsPair<Self> {
        composed_rms_norm_rows_backward::<Self>(dy, x, gamma, rstd)
    }

    /// Whether the RMS norm of rows `h` wide in `dtype` runs fused kernels on `device` (forward
    /// and backward), not composed ops.
    fn rms_norm_fused(h: usize, dtype: burn::tensor::DType, device: &Self::Device) -> bool {
        let _ = (h, dtype, device);
        false
    }
}

/// The RMS norm's forward in Burn ops (statistics in f32): the default, and the Cube backends'
/// fallback for rows their kernels do not take.
fn composed_rms_norm_rows<B: Backend>(x: FloatTensor<B>, gamma: FloatTensor<B>, epsilon: f32) -> RmsPair<B> {
    let x = wrap::<B, 2>(x);
    let dtype = x.dtype();
    let (x, gamma) = (stat(x), stat(wrap::<B, 1>(gamma)));
    let rstd = x.clone().square().mean_dim(1).add_scalar(epsilon).sqrt().recip();
    let y = x * rstd.clone() * gamma.unsqueeze();
    (prim(crate::precision::cast_to(y, dtype)), prim(rstd))
}

/// The RMS norm's backward in Burn ops (see [`composed_rms_norm_rows`]).
fn composed_rms_norm_rows_backward<B: Backend>(dy: FloatTensor<B>, x: FloatTensor<B>, gamma: FloatTensor<B>, rstd: FloatTensor<B>) -> RmsPair<B> {
    let (dy, x, gamma) = (wrap::<B, 2>(dy), wrap::<B, 2>(x), wrap::<B, 1>(gamma));
    let (x_dtype, g_dtype) = (x.dtype(), gamma.dtype());
    let (dy, x, gamma, rstd) = (stat(dy), stat(x), stat(gamma), wrap::<B, 2>(rstd));
    let xhat = x * rstd.clone();
    let dgamma = (dy.clone() * xhat.clone()).sum_dim(0).squeeze_dim::<1>(0);
    let g = dy * gamma.unsqueeze();
    let dx = rstd * (g.clone() - xhat.clone() * (g * xhat).mean_dim(1));
    use crate::precision::cast_to;
    (prim(cast_to(dx, x_dtype)), prim(cast_to(dgamma, g_dtype)))
}

/// Half-precision values in f32 for the composed path's statistics (f32 and f64 unchanged).
fn stat<B: Backend, const D: usize>(t: Tensor<B, D>) -> Tensor<B, D> {
    match t.dtype() {
        burn::tensor::DType::F16 | burn::tensor::DType::BF16 => t.cast(burn::tensor::DType::F32),
        _ => t,
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

#[derive(Debug)]
struct RmsNormBackward;

impl<B: LayerNormBackend> Backward<B, 2> for RmsNormBackward {
    // x, gamma, rstd
    type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [px, pg] = ops.parents;
        let dy = grads.consume::<B>(&ops.node);
        let (x, gamma, rstd) = ops.state;
        let (dx, dg) = B::rms_norm_rows_backward(dy, x, gamma, rstd);
        for (parent, grad) in [(px, dx), (pg, dg)] {
            if let Some(node) = parent {
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

impl<B: LayerNormBackend, C: CheckpointStrategy> LayerNormBackend for Autodiff<B, C> {
    fn rms_norm_rows(x: FloatTensor<Self>, gamma: FloatTensor<Self>, epsilon: f32) -> RmsPair<Self> {
        let nodes = [x.node.clone(), gamma.node.clone()];
        let (y, rstd) = B::rms_norm_rows(x.primitive.clone(), gamma.primitive.clone(), epsilon);
        let y = match RmsNormBackward.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((x.primitive, gamma.primitive, rstd.clone()), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        };
        (y, <Self as AutodiffBackend>::from_inner(rstd))
    }

    fn rms_norm_fused(h: usize, dtype: burn::tensor::DType, device: &Self::Device) -> bool {
        B::rms_norm_fused(h, dtype, device)
    }

    fn rms_norm_rows_backward(dy: FloatTensor<Self>, x: FloatTensor<Self>, gamma: FloatTensor<Self>, rstd: FloatTensor<Self>) -> RmsPair<Self> {
        let inner = |t: FloatTensor<Self>| <Self as AutodiffBackend>::inner(t);
        let (dx, dg) = B::rms_norm_rows_backward(inner(dy), inner(x), inner(gamma), inner(rstd));
        let outer = |t| <Self as AutodiffBackend>::from_inner(t);
        (outer(dx), outer(dg))
    }

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

/// What a backend needs to run every parallel layer: collectives, the layer-norm op and the
/// attention op. Implemented for every backend that has them (Flex, CUDA, wgpu, and their
/// `Autodiff`).
pub trait ParallelBackend: crate::CollectiveBackend + LayerNormBackend + crate::attention::AttentionBackend {}

impl<B: crate::CollectiveBackend + LayerNormBackend + crate::attention::AttentionBackend> ParallelBackend for B {}

/// Layer norm over the last dim of `x` (any rank) through the backend's [`LayerNormBackend`].
///
/// # Panics
/// If `γ` or `β` is not `[h]` (`h`: the last dim of `x`) or not in `x`'s dtype (like Burn's
/// own shape checks: the kernels would read past γ/β or reinterpret them).
pub fn layer_norm<B: LayerNormBackend, const D: usize>(x: Tensor<B, D>, gamma: Tensor<B, 1>, beta: Tensor<B, 1>, epsilon: f32) -> Tensor<B, D> {
    let dims = x.dims();
    let h = dims[D - 1];
    for (name, p) in [("gamma", &gamma), ("beta", &beta)] {
        assert!(
            p.dims() == [h] && p.dtype() == x.dtype(),
            "layer_norm: {name} is {:?} {:?} but x {:?} {:?} needs [{h}] {:?}",
            p.dims(),
            p.dtype(),
            dims,
            x.dtype(),
            x.dtype()
        );
    }
    let rows = x.reshape([dims.iter().product::<usize>() / h.max(1), h]);
    let (y, _, _) = B::layer_norm_rows(prim(rows), prim(gamma), prim(beta), epsilon);
    wrap::<B, 2>(y).reshape(dims)
}

/// RMS norm over the last dim of `x` (any rank) with `γ: [h]` through the backend's
/// [`LayerNormBackend`] (see the module docs).
///
/// # Panics
/// If `γ` is not `[h]` or not in `x`'s dtype.
pub fn rms_norm<B: LayerNormBackend, const D: usize>(x: Tensor<B, D>, gamma: Tensor<B, 1>, epsilon: f32) -> Tensor<B, D> {
    let dims = x.dims();
    let h = dims[D - 1];
    assert!(
        gamma.dims() == [h] && gamma.dtype() == x.dtype(),
        "rms_norm: gamma is {:?} {:?} but x {:?} {:?} needs [{h}]",
        gamma.dims(),
        gamma.dtype(),
        dims,
        x.dtype()
    );
    let rows = x.reshape([dims.iter().product::<usize>() / h.max(1), h]);
    let (y, _) = B::rms_norm_rows(prim(rows), prim(gamma), epsilon);
    wrap::<B, 2>(y).reshape(dims)
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::{Tensor, TensorData};

    use super::layer_norm;

    type A = Autodiff<Flex>;

    fn t<const D: usize>(v: Vec<f32>, shape: [usize; D]) -> Tensor<A, D> {
        Tensor::from_data(TensorData::new(v, shape), &Default::default())
    }

    #[test]
    #[should_panic(expected = "layer_norm: gamma is [1] F32 but x [4, 8] F32 needs [8] F32")]
    fn affine_parameters_of_another_width_are_refused() {
        let x = t((0..32).map(|i| i as f32).collect(), [4, 8]);
        drop(layer_norm(x, t(vec![1.0], [1]), t(vec![0.0; 8], [8]), 1e-5));
    }

    /// Only some inputs tracked (γ frozen, β frozen, or `x` untracked): the tracked ones get the
    /// same gradients as with everything tracked.
    #[test]
    fn gradients_with_frozen_inputs() {
        let xs: Vec<f32> = (0..24).map(|i| ((i * 7) % 11) as f32 - 5.0).collect();
        let gs: Vec<f32> = (0..8).map(|i| 1.0 + i as f32 / 8.0).collect();
        let w = t((0..24).map(|i| (i % 5) as f32 - 2.0).collect(), [3, 8]);
        let grads = |track: [bool; 3]| {
            let leaf = |v: Tensor<A, 1>, on: bool| if on { v.require_grad() } else { v };
            let x = if track[0] { t(xs.clone(), [3, 8]).require_grad() } else { t(xs.clone(), [3, 8]) };
            let (g, b) = (leaf(t(gs.clone(), [8]), track[1]), leaf(t(vec![0.5; 8], [8]), track[2]));
            let gr = (layer_norm(x.clone(), g.clone(), b.clone(), 1e-5) * w.clone()).sum().backward();
            [x.grad(&gr).map(|d| d.into_data()), g.grad(&gr).map(|d| d.into_data()), b.grad(&gr).map(|d| d.into_data())]
        };
        let all = grads([true; 3]);
        assert!(all.iter().all(Option::is_some));
        for track in [[true, false, true], [true, true, false], [false, true, true]] {
            let some = grads(track);
            for i in 0..3 {
                assert_eq!(some[i], if track[i] { all[i].clone() } else { None }, "input {i} with tracking {track:?}");
            }
        }
    }

    /// The RMS-norm op's output and gradients equal autodiff through burn-nn's formula
    /// (`x / √(mean(x²) + ε) · γ`, composed ops), in f32; in bf16 within bf16's precision.
    #[test]
    fn rms_norm_equals_the_composed_formula() {
        use super::rms_norm;
        let xs: Vec<f32> = (0..40).map(|i| ((i * 7) % 13) as f32 / 3.0 - 2.0).collect();
        let gs: Vec<f32> = (0..8).map(|i| 0.5 + i as f32 / 5.0).collect();
        let w = t((0..40).map(|i| ((i * 3) % 7) as f32 - 3.0).collect(), [5, 8]);
        let run = |op: bool| {
            let (x, g) = (t(xs.clone(), [5, 8]).require_grad(), t(gs.clone(), [8]).require_grad());
            let y = if op { rms_norm(x.clone(), g.clone(), 1e-5) } else { x.clone() / (x.clone().square().mean_dim(1) + 1e-5).sqrt() * g.clone().unsqueeze() };
            let gr = (y.clone() * w.clone()).sum().backward();
            [y.into_data(), x.grad(&gr).unwrap().into_data(), g.grad(&gr).unwrap().into_data()]
        };
        let (ours, theirs) = (run(true), run(false));
        for (what, (a, b)) in ["y", "dx", "dgamma"].iter().zip(ours.iter().zip(&theirs)) {
            a.assert_approx_eq::<f32>(b, burn::tensor::Tolerance::absolute(2e-6));
            assert!(a.to_vec::<f32>().unwrap().iter().any(|v| v.abs() > 0.1), "{what} is not trivially zero");
        }
        // bf16 storage, f32 statistics: within bf16's rounding of the f32 result.
        let xb = t(xs.clone(), [5, 8]).cast(burn::tensor::DType::BF16);
        let yb = rms_norm(xb, t(gs.clone(), [8]).cast(burn::tensor::DType::BF16), 1e-5).cast(burn::tensor::DType::F32);
        yb.into_data().assert_approx_eq::<f32>(&ours[0], burn::tensor::Tolerance::absolute(3e-2));
    }
}
