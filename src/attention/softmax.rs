//! Softmax over the last dimension as one autodiff op: [`softmax`].

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorMetadata, TensorPrimitive};

use super::AttentionBackend;

/// Softmax over the last dimension of `x` (any rank), as one op under autodiff: the composed
/// attention core's softmax.
///
/// Forward `P = softmax(x)` by the inner backend's own op (Flex: one fused SIMD pass per row;
/// Cube backends: Burn's default composition, fused under `burn-fusion`); the op saves `P`
/// only (in f32 without dropout the matmul with `v` keeps that same buffer). Backward, from `dP`:
/// `dx = P ∘ (dP − Σ_j dP ∘ P)` (the sum over the last dimension, kept as `[.., 1]`).
///
/// Burn 0.21's autodiff backend has no softmax op of its own: it composes max, subtract, exp,
/// sum and divide, keeping `x − max`'s exponential and the division's inputs (two `s²` tensors
/// per attention core), and backpropagates through five ops whose broadcasts are slow on Flex.
/// Measured on Flex at `[8, 4, 64, 64]` f32 (one thread): forward 3.6 ms composed against
/// 0.6 ms here, forward and backward 9.7 against about 2.2 ms.
///
/// ```
/// use burn::backend::{Autodiff, Flex};
/// use burn::tensor::{Distribution, Tensor};
///
/// type B = Autodiff<Flex>;
/// let dev = Default::default();
/// let x = Tensor::<B, 2>::random([3, 5], Distribution::Default, &dev).require_grad();
/// let p = burn_parallel::attention::softmax(x.clone());
/// let reference = burn::tensor::activation::softmax(x.clone(), 1);
/// p.clone().into_data().assert_approx_eq::<f32>(&reference.into_data(), burn::tensor::Tolerance::absolute(1e-6));
/// let grads = (p * Tensor::arange(0..15, &dev).reshape([3, 5]).float()).sum().backward();
/// assert_eq!(x.grad(&grads).unwrap().dims(), [3, 5]);
/// ```
pub fn softmax<B: AttentionBackend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(B::softmax_last(x.into_primitive().tensor())))
}

/// The backward of the op: saves `P`.
#[derive(Debug)]
struct SoftmaxBackward;

impl<B: AttentionBackend> Backward<B, 1> for SoftmaxBackward {
    type State = FloatTensor<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dp = grads.consume::<B>(&ops.node);
        if let [Some(parent)] = ops.parents {
            grads.register::<B>(parent.id, softmax_grad::<B>(ops.state, dp));
        }
    }
}

/// `P ∘ (dP − Σ_last dP ∘ P)`.
fn softmax_grad<B: AttentionBackend>(p: FloatTensor<B>, dp: FloatTensor<B>) -> FloatTensor<B> {
    let last = p.shape().num_dims() - 1;
    let dot = B::float_sum_dim(B::float_mul(dp.clone(), p.clone()), last);
    B::float_mul(p, B::float_sub(dp, dot))
}

/// The op under autodiff: the inner backend's softmax, tracked with [`SoftmaxBackward`].
pub(super) fn tracked<B: AttentionBackend, C: CheckpointStrategy>(x: FloatTensor<Autodiff<B, C>>) -> FloatTensor<Autodiff<B, C>> {
    let p = B::softmax_last(x.primitive.clone());
    match SoftmaxBackward.prepare::<C>([x.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish(p.clone(), p),
        OpsKind::UnTracked(prep) => prep.finish(p),
    }
}
