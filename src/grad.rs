//! Backward from a non-scalar tensor with a given upstream gradient (torch's `y.backward(g)`).
//!
//! Burn's `backward()` seeds the root with ones, so `(y * g).sum().backward()` is the usual way to
//! push a gradient `g` into `y`: it runs a multiply and a sum forward, and backward materialises
//! the sum's gradient and multiplies again — two to three extra passes over `y`. [`backward_with`]
//! hands `g` to `y`'s node directly: a one-element root whose backward registers `g` for `y`.
//!
//! ```
//! use burn::backend::{Autodiff, Flex};
//! use burn::tensor::Tensor;
//! let dev = Default::default();
//! let x = Tensor::<Autodiff<Flex>, 2>::from_floats([[1.0, 2.0], [3.0, 4.0]], &dev).require_grad();
//! let y = x.clone() * 3.0;
//! let g = Tensor::<Flex, 2>::from_floats([[1.0, 0.0], [0.5, 2.0]], &dev);
//! let grads = burn_parallel::backward_with(y, g).unwrap();
//! assert_eq!(x.grad(&grads).unwrap().into_data().to_vec::<f32>().unwrap(), vec![3.0, 0.0, 1.5, 6.0]);
//! ```

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Tensor, TensorMetadata, TensorPrimitive};

/// The upstream gradient does not fit the tensor.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("backward_with: gradient of shape {grad_shape:?} ({grad_dtype:?}) for a tensor of shape {shape:?} ({dtype:?})")]
pub struct GradMismatch {
    /// The tensor's shape.
    pub shape: Vec<usize>,
    /// The tensor's dtype.
    pub dtype: DType,
    /// The gradient's shape.
    pub grad_shape: Vec<usize>,
    /// The gradient's dtype.
    pub grad_dtype: DType,
}

#[derive(Debug)]
struct Seed;

impl<B: Backend> Backward<B, 1> for Seed {
    type State = FloatTensor<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let _ = grads.consume::<B>(&ops.node);
        if let [Some(parent)] = ops.parents {
            grads.register::<B>(parent.id, ops.state);
        }
    }
}

/// Backpropagates `grad` (same shape and dtype as `y`) from `y`: the gradients of every tracked
/// tensor `y` depends on, as `(y · grad).sum().backward()` would give them, without the multiply,
/// the sum and the sum's materialised gradient.
pub fn backward_with<B: Backend, C: CheckpointStrategy, const D: usize>(y: Tensor<Autodiff<B, C>, D>, grad: Tensor<B, D>) -> Result<Gradients, GradMismatch> {
    let (yp, gp) = (y.into_primitive().tensor(), grad.into_primitive().tensor());
    let (shape, grad_shape) = (yp.primitive.shape(), gp.shape());
    let (dtype, grad_dtype) = (yp.primitive.dtype(), gp.dtype());
    if shape != grad_shape || dtype != grad_dtype {
        return Err(GradMismatch { shape: shape.to_vec(), dtype, grad_shape: grad_shape.to_vec(), grad_dtype });
    }
    let device = B::float_device(&yp.primitive);
    let root = Tensor::<B, 1>::zeros([1], &device).into_primitive().tensor();
    let root = match Seed.prepare::<C>([yp.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish(gp, root),
        OpsKind::UnTracked(prep) => prep.finish(root),
    };
    Ok(Tensor::<Autodiff<B, C>, 1>::from_primitive(TensorPrimitive::Float(root)).backward())
}

/// [`backward_with`] for generic code: every `Autodiff<B, C>` (Burn's autodiff backends).
pub trait BackwardWith: AutodiffBackend {
    /// See [`backward_with`].
    fn backward_with<const D: usize>(y: Tensor<Self, D>, grad: Tensor<Self::InnerBackend, D>) -> Result<Self::Gradients, GradMismatch>;
}

impl<B: Backend, C: CheckpointStrategy> BackwardWith for Autodiff<B, C> {
    fn backward_with<const D: usize>(y: Tensor<Self, D>, grad: Tensor<B, D>) -> Result<Gradients, GradMismatch> {
        backward_with(y, grad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::{Distribution, TensorData};

    type A = Autodiff<Flex>;

    #[test]
    fn equals_the_product_sum_backward() {
        let dev = Default::default();
        let x = Tensor::<A, 3>::random([2, 3, 5], Distribution::Normal(0.0, 1.0), &dev).require_grad();
        let w = Tensor::<A, 1>::random([5], Distribution::Normal(0.0, 1.0), &dev).require_grad();
        let g = Tensor::<Flex, 3>::random([2, 3, 5], Distribution::Normal(0.0, 1.0), &dev);
        let f = |x: Tensor<A, 3>, w: Tensor<A, 1>| (x.clone() * w.unsqueeze::<3>()).tanh() + x;
        let want = (f(x.clone(), w.clone()) * Tensor::from_inner(g.clone())).sum().backward();
        let got = backward_with(f(x.clone(), w.clone()), g).unwrap();
        let tol = burn::tensor::Tolerance::absolute(1e-5);
        x.grad(&got).unwrap().into_data().assert_approx_eq::<f32>(&x.grad(&want).unwrap().into_data(), tol);
        w.grad(&got).unwrap().into_data().assert_approx_eq::<f32>(&w.grad(&want).unwrap().into_data(), tol);
    }

    #[test]
    fn a_wrong_shape_is_an_error_with_both_shapes() {
        let dev = Default::default();
        let y = Tensor::<A, 2>::zeros([2, 3], &dev).require_grad();
        let Err(err) = backward_with(y, Tensor::<Flex, 2>::zeros([3, 2], &dev)) else { panic!("accepted a [3, 2] gradient for [2, 3]") };
        assert_eq!((err.shape.clone(), err.grad_shape.clone()), (vec![2, 3], vec![3, 2]));
        assert!(err.to_string().contains("[3, 2]") && err.to_string().contains("[2, 3]"), "{err}");
    }

    #[test]
    fn an_untracked_tensor_gives_no_gradients() {
        let dev = Default::default();
        let x = Tensor::<A, 1>::from_data(TensorData::from([1.0f32, 2.0]), &dev);
        let grads = backward_with(x.clone() * 2.0, Tensor::<Flex, 1>::ones([2], &dev)).unwrap();
        assert!(x.grad(&grads).is_none());
    }
}
