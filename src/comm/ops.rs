//! Collectives on Burn tensors (not differentiable: under autodiff the result is untracked).
//! These are what callers use; the backend decides how the bytes move.

use burn::tensor::{DType, Device, Tensor, TensorPrimitive};

use super::{Comm, RecvOp, ReduceOp, TensorSpec};
use crate::collective::CollectiveBackend;
use crate::error::CommError;

fn wrap<B: CollectiveBackend, const D: usize>(p: burn::tensor::ops::FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

/// One number reduced over the group on the host (flags, signals: no backend, no tensor);
/// every rank gets the result.
pub fn all_reduce_scalar(value: f32, op: ReduceOp, comm: &Comm) -> Result<f32, CommError> {
    let all = comm.all_reduce(burn::tensor::TensorData::new(vec![value], [1]), op)?;
    all.to_vec::<f32>().map(|v| v[0]).map_err(|e| CommError::Backend(format!("a reduced scalar: {e:?}")))
}

/// Element-wise reduction over the group; every rank gets the result.
pub fn all_reduce<B: CollectiveBackend, const D: usize>(x: Tensor<B, D>, op: ReduceOp, comm: &Comm) -> Result<Tensor<B, D>, CommError> {
    B::collective_all_reduce(x.into_primitive().tensor(), op, comm).map(wrap)
}

/// Concatenation of every rank's tensor along `dim`, in group order.
pub fn all_gather<B: CollectiveBackend, const D: usize>(x: Tensor<B, D>, dim: usize, comm: &Comm) -> Result<Tensor<B, D>, CommError> {
    B::collective_all_gather(x.into_primitive().tensor(), dim, comm).map(wrap)
}

/// Reduction, then this rank's slice along `dim`.
pub fn reduce_scatter<B: CollectiveBackend, const D: usize>(x: Tensor<B, D>, dim: usize, op: ReduceOp, comm: &Comm) -> Result<Tensor<B, D>, CommError> {
    B::collective_reduce_scatter(x.into_primitive().tensor(), dim, op, comm).map(wrap)
}

/// The root's tensor on every rank (`x` gives the shape elsewhere and is otherwise ignored).
pub fn broadcast<B: CollectiveBackend, const D: usize>(x: Tensor<B, D>, root: usize, comm: &Comm) -> Result<Tensor<B, D>, CommError> {
    B::collective_broadcast(x.into_primitive().tensor(), root, comm).map(wrap)
}

/// Sends `x` to group rank `peer` under `tag` (match it with a [`recv`] of the same tag).
pub fn send<B: CollectiveBackend, const D: usize>(x: Tensor<B, D>, peer: usize, tag: u64, comm: &Comm) -> Result<(), CommError> {
    B::collective_send(x.into_primitive().tensor(), peer, tag, comm)
}

/// Receives a `shape` tensor of the backend's default float dtype sent by group rank `peer`
/// under `tag`;
/// another shape or dtype is a [`CommError::P2pMismatch`].
pub fn recv<B: CollectiveBackend, const D: usize>(
    shape: [usize; D],
    device: &Device<B>,
    peer: usize,
    tag: u64,
    comm: &Comm,
) -> Result<Tensor<B, D>, CommError> {
    recv_as(shape, default_dtype::<B>(device), device, peer, tag, comm)
}

/// [`recv`] of a `dtype` tensor (e.g. bf16 activations).
pub fn recv_as<B: CollectiveBackend, const D: usize>(
    shape: [usize; D],
    dtype: DType,
    device: &Device<B>,
    peer: usize,
    tag: u64,
    comm: &Comm,
) -> Result<Tensor<B, D>, CommError> {
    let spec = TensorSpec { shape: shape.to_vec(), dtype };
    B::collective_recv(&spec, device, peer, tag, comm).map(wrap)
}

fn default_dtype<B: CollectiveBackend>(device: &Device<B>) -> DType {
    Tensor::<B, 1>::empty([0], device).dtype()
}

/// Sends `(tensor, peer, tag)` and receives `(peer, tag, shape)` messages as one group (NCCL
/// `ncclGroupStart … ncclGroupEnd`); returns the received tensors (backend's default float dtype)
/// in the order of `recvs`.
pub fn batch_p2p<B: CollectiveBackend, const D: usize>(
    sends: Vec<(Tensor<B, D>, usize, u64)>,
    recvs: &[(usize, u64, [usize; D])],
    device: &Device<B>,
    comm: &Comm,
) -> Result<Vec<Tensor<B, D>>, CommError> {
    batch_p2p_as(sends, recvs, default_dtype::<B>(device), device, comm)
}

/// [`batch_p2p`] receiving `dtype` tensors.
pub fn batch_p2p_as<B: CollectiveBackend, const D: usize>(
    sends: Vec<(Tensor<B, D>, usize, u64)>,
    recvs: &[(usize, u64, [usize; D])],
    dtype: DType,
    device: &Device<B>,
    comm: &Comm,
) -> Result<Vec<Tensor<B, D>>, CommError> {
    let recvs: Vec<RecvOp> = recvs.iter().map(|&(peer, tag, shape)| RecvOp { peer, tag, spec: TensorSpec { shape: shape.to_vec(), dtype } }).collect();
    let sends = sends.into_iter().map(|(x, p, t)| (x.into_primitive().tensor(), p, t)).collect();
    Ok(B::collective_batch_p2p(sends, &recvs, device, comm)?.into_iter().map(wrap).collect())
}
