//! The [`Communicator`] trait and its tensor-level API.
//!
//! A communicator is one rank's handle on one group of ranks. It is object-safe and carried as
//! [`Comm`] (`Arc<dyn Communicator>`) inside modules and autodiff ops. Its methods move host
//! [`TensorData`]; the tensor functions in [`ops`] (`all_reduce`, `all_gather`, …) lift them to
//! Burn tensors through [`CollectiveBackend`](crate::collective::CollectiveBackend), whose
//! per-backend implementation may bypass the host (an NCCL communicator on CUDA device pointers)
//! without any caller changing.
//!
//! Every blocking operation fails with a [`CommError`] instead of hanging: a timeout names the
//! operation, the group and the ranks that never arrived.

mod host;
mod local;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod ops;
mod tcp;

use std::any::Any;
use std::fmt::Debug;
use std::sync::Arc;

use burn::tensor::{DType, TensorData};

use crate::error::CommError;

pub use host::{concat_along, reduce_all, split_along};
pub use local::{LocalWorld, LocalWorldOptions, P2pMode};
pub use tcp::TcpComm;

/// The caller's rank in a new group of `global_ranks` (a subset of `parent`'s members, listing
/// the caller `me` once): the checks every communicator's `new_group` makes.
pub(crate) fn new_group_rank(name: &str, global_ranks: &[usize], parent: &[usize], parent_label: &str, me: usize) -> Result<usize, CommError> {
    let mut seen = std::collections::HashSet::new();
    if let Some(d) = global_ranks.iter().find(|r| !seen.insert(**r)) {
        return Err(CommError::InvalidGroup(format!("{name}: rank {d} listed twice in {global_ranks:?}")));
    }
    if let Some(r) = global_ranks.iter().find(|r| !parent.contains(r)) {
        return Err(CommError::InvalidGroup(format!("{name}: rank {r} is not in the parent group {parent_label}")));
    }
    global_ranks.iter().position(|&r| r == me).ok_or_else(|| CommError::InvalidGroup(format!("{name}: rank {me} creates {global_ranks:?} without being in it")))
}

/// Shared handle on a communicator.
pub type Comm = Arc<dyn Communicator>;

/// Reduction applied by all-reduce and reduce-scatter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    /// Element-wise sum.
    Sum,
    /// Element-wise maximum.
    Max,
    /// Element-wise mean (sum / group size).
    Mean,
}

/// What a receiver expects: a mismatch with what the sender sent is an error naming both ranks.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    /// Expected shape.
    pub shape: Vec<usize>,
    /// Expected dtype.
    pub dtype: DType,
}

/// A send in a [`Communicator::batch_p2p`].
#[derive(Debug, Clone)]
pub struct SendOp {
    /// The tensor.
    pub data: TensorData,
    /// Group rank of the receiver.
    pub peer: usize,
    /// Message tag (checked by the receiver).
    pub tag: u64,
}

/// A receive in a [`Communicator::batch_p2p`].
#[derive(Debug, Clone)]
pub struct RecvOp {
    /// Group rank of the sender.
    pub peer: usize,
    /// Message tag.
    pub tag: u64,
    /// Expected shape and dtype.
    pub spec: TensorSpec,
}

/// One rank's handle on a group of ranks. Ranks passed to and returned by its methods are
/// **group ranks** (`0..size()`), except [`global_ranks`](Self::global_ranks).
pub trait Communicator: Send + Sync + Debug + 'static {
    /// This rank's index in the group.
    fn rank(&self) -> usize;
    /// Number of ranks in the group.
    fn size(&self) -> usize;
    /// Global ranks of the members, in group order.
    fn global_ranks(&self) -> &[usize];
    /// A label for errors and logs, e.g. `tp[0,1]`.
    fn label(&self) -> &str;

    /// Element-wise reduction of every rank's tensor; every rank gets the result. All ranks
    /// receive bit-identical results.
    fn all_reduce(&self, data: TensorData, op: ReduceOp) -> Result<TensorData, CommError>;
    /// Concatenation of every rank's tensor along `dim`, in group order.
    fn all_gather(&self, data: TensorData, dim: usize) -> Result<TensorData, CommError>;
    /// Reduction, then this rank's `1/size` slice along `dim` (which must divide evenly).
    fn reduce_scatter(&self, data: TensorData, dim: usize, op: ReduceOp) -> Result<TensorData, CommError>;
    /// The root's tensor on every rank (`data` is only read on the root).
    fn broadcast(&self, data: Option<TensorData>, root: usize) -> Result<TensorData, CommError>;
    /// Sends a tensor to `peer` under `tag`; the shape and dtype travel with it.
    fn send(&self, data: TensorData, peer: usize, tag: u64) -> Result<(), CommError>;
    /// Receives the next tensor `peer` sent under `tag` and checks it against `expect`.
    /// (Tags keep messages of different kinds between the same two ranks apart, e.g. activations
    /// and gradients of interleaved pipeline stages.)
    fn recv(&self, peer: usize, tag: u64, expect: &TensorSpec) -> Result<TensorData, CommError>;
    /// Sends and receives issued as one group (NCCL `ncclGroupStart … ncclGroupEnd`, Megatron's
    /// `batch_isend_irecv`); returns the received tensors in the order of `recvs`. With NCCL a
    /// lone send blocks until its receiver posts the receive, so two ranks that exchange tensors
    /// must put both directions in one batch (see `burn_parallel_schedules::p2p`). The default
    /// sends, then receives.
    fn batch_p2p(&self, sends: Vec<SendOp>, recvs: &[RecvOp]) -> Result<Vec<TensorData>, CommError> {
        for s in sends {
            self.send(s.data, s.peer, s.tag)?;
        }
        recvs.iter().map(|r| self.recv(r.peer, r.tag, &r.spec)).collect()
    }
    /// Returns once every rank of the group has called it.
    fn barrier(&self) -> Result<(), CommError>;
    /// A communicator over a subset of this group, given by **global** ranks (which must include
    /// the caller). Every member must create the same groups in the same order.
    fn new_group(&self, name: &str, global_ranks: &[usize]) -> Result<Comm, CommError>;
    /// For backends that bypass the host path (downcast to the concrete communicator).
    fn as_any(&self) -> &dyn Any;

    /// This rank's global index.
    fn global_rank(&self) -> usize {
        self.global_ranks()[self.rank()]
    }
}
