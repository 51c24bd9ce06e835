//! Megatron's differentiable mappings on Burn tensors (see [`crate::collective`] for the table).
//!
//! Shapes: `x` is this rank's tensor. TP mappings act on the **last** dimension; SP mappings on
//! the sequence dimension `dim` you pass (`1` for the `[batch, seq, hidden]` layout this project
//! uses). With a group of size 1 every mapping is the identity and records nothing.

use burn::tensor::{Tensor, TensorPrimitive};

use crate::collective::CollectiveBackend;
use crate::comm::Comm;

fn lift<B: CollectiveBackend, const D: usize>(
    x: Tensor<B, D>,
    comm: &Comm,
    f: impl FnOnce(burn::tensor::ops::FloatTensor<B>) -> burn::tensor::ops::FloatTensor<B>,
) -> Tensor<B, D> {
    if comm.size() == 1 {
        return x;
    }
    Tensor::from_primitive(TensorPrimitive::Float(f(x.into_primitive().tensor())))
}

/// f — copy to the TP region: forward identity, backward all-reduce (sum). Put it where a
/// replicated activation enters column-parallel layers.
pub fn copy_to_tp<B: CollectiveBackend, const D: usize>(x: Tensor<B, D>, comm: &Comm) -> Tensor<B, D> {
    lift(x, comm, |p| B::map_copy_to_tp(p, comm))
}

/// g — reduce from the TP region: forward all-reduce (sum), backward identity. Put it where
/// row-parallel partial sums leave the TP region.
pub fn reduce_from_tp<B: CollectiveBackend, const D: usize>(x: Tensor<B, D>, comm: &Comm) -> Tensor<B, D> {
    lift(x, comm, |p| B::map_reduce_from_tp(p, comm))
}

/// Scatter to TP: forward keeps this rank's slice of the last dim (`[.., n] → [.., n/t]`),
/// backward all-gathers it.
pub fn scatter_to_tp<B: CollectiveBackend, const D: usize>(x: Tensor<B, D>, comm: &Comm) -> Tensor<B, D> {
    lift(x, comm, |p| B::map_scatter(p, D - 1, comm))
}

/// Gather from TP: forward all-gathers the last dim (`[.., n/t] → [.., n]`), backward keeps this
/// rank's slice.
pub fn gather_from_tp<B: CollectiveBackend, const D: usize>(x: Tensor<B, D>, comm: &Comm) -> Tensor<B, D> {
    lift(x, comm, |p| B::map_gather_tp(p, D - 1, comm))
}

/// Scatter to SP: forward keeps this rank's slice of `dim` (`s → s/t`), backward all-gathers.
pub fn scatter_to_sp<B: CollectiveBackend, const D: usize>(x: Tensor<B, D>, dim: usize, comm: &Comm) -> Tensor<B, D> {
    lift(x, comm, |p| B::map_scatter(p, dim, comm))
}

/// Gather from SP: forward all-gathers `dim` (`s/t → s`), backward reduce-scatters (the
/// consumers are TP-sharded, so each rank holds a partial gradient of the full sequence).
pub fn gather_from_sp<B: CollectiveBackend, const D: usize>(x: Tensor<B, D>, dim: usize, comm: &Comm) -> Tensor<B, D> {
    lift(x, comm, |p| B::map_gather_sp(p, dim, comm))
}

/// Reduce-scatter to SP: forward reduce-scatters partial sums along `dim` (`s → s/t`), backward
/// all-gathers.
pub fn reduce_scatter_to_sp<B: CollectiveBackend, const D: usize>(x: Tensor<B, D>, dim: usize, comm: &Comm) -> Tensor<B, D> {
    lift(x, comm, |p| B::map_reduce_scatter(p, dim, comm))
}
