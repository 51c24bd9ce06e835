//! [`CollectiveBackend`]: collectives and Megatron's differentiable mappings on backend tensors.
//!
//! Every method has a default body that stages through the host and the [`Communicator`](crate::comm::Communicator), so an
//! inner backend is a one-line `impl`. The [`Autodiff`] implementation (written once, below)
//! records the mappings as autodiff ops with hand-written backward passes:
//!
//! | mapping | forward | backward |
//! |---|---|---|
//! | `copy_to_tp` (f) | identity | all-reduce (sum) |
//! | `reduce_from_tp` (g) | all-reduce (sum) | identity |
//! | `scatter` (to TP / to SP) | keep own slice of `dim` | all-gather `dim` |
//! | `gather_tp` (gather-from-TP) | all-gather `dim` | keep own slice of `dim` |
//! | `gather_sp` (gather-from-SP) | all-gather `dim` | reduce-scatter `dim` |
//! | `reduce_scatter` (to SP) | reduce-scatter `dim` | all-gather `dim` |
//!
//! The raw collectives (`collective_*`) are **not** differentiable: under autodiff their result is
//! a fresh untracked tensor. (Burn's own all-reduce has an all-reduce backward, which would
//! multiply TP gradients by the group size; these mappings are what TP needs.)
//!
//! Failures inside a mapping cannot be returned through Burn's forward/backward, so they panic
//! with the [`CommError`]'s text after recording it for [`take_comm_error`];
//! [`run_world`](crate::world::run_world) turns that back into a typed error.

use std::cell::RefCell;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{unary, Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{read_sync, Device, Slice, TensorMetadata};

use crate::comm::{Comm, RecvOp, ReduceOp, SendOp, TensorSpec};
use crate::error::CommError;

thread_local! {
    static LAST_COMM_ERROR: RefCell<Option<CommError>> = const { RefCell::new(None) };
}

/// Unwraps a communication result inside a forward/backward pass: on error, records it for
/// [`take_comm_error`] and panics with its message.
pub fn expect_comm<T>(r: Result<T, CommError>) -> T {
    match r {
        Ok(v) => v,
        Err(e) => {
            let msg = format!("burn-parallel collective failed: {e}");
            LAST_COMM_ERROR.with(|c| *c.borrow_mut() = Some(e));
            panic!("{msg}");
        }
    }
}

/// The communication error behind this thread's last panic from [`expect_comm`], if any.
pub fn take_comm_error() -> Option<CommError> {
    LAST_COMM_ERROR.with(|c| c.borrow_mut().take())
}

fn to_host<B: Backend>(x: FloatTensor<B>) -> Result<burn::tensor::TensorData, CommError> {
    read_sync(B::float_into_data(x)).map_err(|e| CommError::Backend(format!("reading a tensor: {e:?}")))
}

/// This rank's `1/size` slice of `x` along `dim` (no communication).
pub fn local_chunk<B: Backend>(x: FloatTensor<B>, dim: usize, comm: &Comm) -> Result<FloatTensor<B>, CommError> {
    let shape = x.shape();
    let n = comm.size();
    if dim >= shape.num_dims() || !shape[dim].is_multiple_of(n) {
        return Err(CommError::BadInput {
            group: comm.label().into(),
            op: format!("split(dim={dim})"),
            detail: format!("shape {:?} cannot be split in {n} along dim {dim}", shape.as_slice()),
        });
    }
    let chunk = shape[dim] / n;
    let slices: Vec<Slice> = (0..shape.num_dims())
        .map(|d| {
            let (s, e) = if d == dim { (comm.rank() * chunk, (comm.rank() + 1) * chunk) } else { (0, shape[d]) };
            Slice::new(s as isize, Some(e as isize), 1)
        })
        .collect();
    Ok(B::float_slice(x, &slices))
}

/// The host-staged collectives behind [`CollectiveBackend`]'s defaults: read the tensor, run the
/// [`Communicator`](crate::Communicator) on host data, upload the result. Backends that override
/// a method fall back to these for communicators they cannot drive.
pub mod staged {
    use super::*;

    /// All-reduce through the host.
    pub fn all_reduce<B: Backend>(x: FloatTensor<B>, op: ReduceOp, comm: &Comm) -> Result<FloatTensor<B>, CommError> {
        let dev = B::float_device(&x);
        Ok(B::float_from_data(comm.all_reduce(to_host::<B>(x)?, op)?, &dev))
    }
    /// All-gather through the host.
    pub fn all_gather<B: Backend>(x: FloatTensor<B>, dim: usize, comm: &Comm) -> Result<FloatTensor<B>, CommError> {
        let dev = B::float_device(&x);
        Ok(B::float_from_data(comm.all_gather(to_host::<B>(x)?, dim)?, &dev))
    }
    /// Reduce-scatter through the host.
    pub fn reduce_scatter<B: Backend>(x: FloatTensor<B>, dim: usize, op: ReduceOp, comm: &Comm) -> Result<FloatTensor<B>, CommError> {
        let dev = B::float_device(&x);
        Ok(B::float_from_data(comm.reduce_scatter(to_host::<B>(x)?, dim, op)?, &dev))
    }
    /// Broadcast through the host. A rank whose `x` has another shape or dtype than the root's
    /// gets an error (after taking part, so the others complete).
    pub fn broadcast<B: Backend>(x: FloatTensor<B>, root: usize, comm: &Comm) -> Result<FloatTensor<B>, CommError> {
        let (dev, shape, dtype) = (B::float_device(&x), x.shape(), x.dtype());
        let data = if comm.rank() == root { Some(to_host::<B>(x)?) } else { None };
        let got = comm.broadcast(data, root)?;
        if got.shape.as_slice() != shape.as_slice() || got.dtype != dtype {
            let detail =
                format!("root {root} sent {:?} {:?} but rank {} passed {:?} {dtype:?}", got.shape.as_slice(), got.dtype, comm.rank(), shape.as_slice());
            return Err(CommError::BadInput { group: comm.label().into(), op: format!("broadcast(root={root})"), detail });
        }
        Ok(B::float_from_data(got, &dev))
    }
    /// Batched point-to-point through the host.
    pub fn batch_p2p<B: Backend>(
        sends: Vec<(FloatTensor<B>, usize, u64)>,
        recvs: &[RecvOp],
        device: &Device<B>,
        comm: &Comm,
    ) -> Result<Vec<FloatTensor<B>>, CommError> {
        let sends = sends.into_iter().map(|(x, peer, tag)| Ok(SendOp { data: to_host::<B>(x)?, peer, tag })).collect::<Result<Vec<_>, CommError>>()?;
        Ok(comm.batch_p2p(sends, recvs)?.into_iter().map(|d| B::float_from_data(d, device)).collect())
    }
}

/// Layout changes around flat collectives (NCCL gathers and scatters contiguous rank-major
/// buffers); pure Burn ops, so CPU tests check the index math the CUDA path relies on.
pub mod layout {
    use burn::tensor::backend::Backend;
    use burn::tensor::ops::FloatTensor;
    use burn::tensor::{Shape, TensorMetadata};

    /// `[n, d0, .., dk]` (the n ranks' parts, rank-major, as an all-gather leaves them) → the
    /// parts concatenated along `dim`: `[d0, .., n·d_dim, .., dk]`.
    pub fn rank_major_to_concat<B: Backend>(x: FloatTensor<B>, dim: usize) -> FloatTensor<B> {
        let shape = x.shape();
        let dims = &shape.as_slice()[1..];
        let n = shape.as_slice()[0];
        let mut axes: Vec<usize> = (1..=dim).collect();
        axes.push(0);
        axes.extend(dim + 1..=dims.len());
        let moved = if dim == 0 { x } else { B::float_permute(x, &axes) };
        let mut out = dims.to_vec();
        out[dim] *= n;
        B::float_reshape(moved, Shape::from(out))
    }

    /// `[.., n·c, ..]` → `[n, .., c, ..]`: rank `i`'s slice along `dim` becomes row `i` (the
    /// input layout of a flat reduce-scatter). `dim` must be divisible by `n` (checked by callers).
    pub fn split_to_rank_major<B: Backend>(x: FloatTensor<B>, dim: usize, n: usize) -> FloatTensor<B> {
        let dims = x.shape().as_slice().to_vec();
        let mut expanded = dims[..dim].to_vec();
        expanded.push(n);
        expanded.push(dims[dim] / n);
        expanded.extend(&dims[dim + 1..]);
        let mut axes = vec![dim];
        axes.extend(0..dim);
        axes.extend(dim + 1..expanded.len());
        let rank_major = B::float_permute(B::float_reshape(x, Shape::from(expanded.clone())), &axes);
        let mut out = vec![n];
        out.extend(axes[1..].iter().map(|a| expanded[*a]));
        B::float_reshape(rank_major, Shape::from(out))
    }
}

/// Collectives and differentiable mappings on a backend's float tensors. See the module docs.
pub trait CollectiveBackend: Backend {
    /// All-reduce (not differentiable).
    fn collective_all_reduce(x: FloatTensor<Self>, op: ReduceOp, comm: &Comm) -> Result<FloatTensor<Self>, CommError> {
        staged::all_reduce::<Self>(x, op, comm)
    }
    /// All-gather along `dim` (not differentiable).
    fn collective_all_gather(x: FloatTensor<Self>, dim: usize, comm: &Comm) -> Result<FloatTensor<Self>, CommError> {
        staged::all_gather::<Self>(x, dim, comm)
    }
    /// Reduce-scatter along `dim` (not differentiable).
    fn collective_reduce_scatter(x: FloatTensor<Self>, dim: usize, op: ReduceOp, comm: &Comm) -> Result<FloatTensor<Self>, CommError> {
        staged::reduce_scatter::<Self>(x, dim, op, comm)
    }
    /// Broadcast from group rank `root` (not differentiable; `x` gives the shape elsewhere).
    fn collective_broadcast(x: FloatTensor<Self>, root: usize, comm: &Comm) -> Result<FloatTensor<Self>, CommError> {
        staged::broadcast::<Self>(x, root, comm)
    }
    /// Sends `x` to group rank `peer` under `tag`.
    fn collective_send(x: FloatTensor<Self>, peer: usize, tag: u64, comm: &Comm) -> Result<(), CommError> {
        let device = Self::float_device(&x);
        Self::collective_batch_p2p(vec![(x, peer, tag)], &[], &device, comm).map(|_| ())
    }
    /// Receives a tensor matching `spec` sent by group rank `peer` under `tag`.
    fn collective_recv(spec: &TensorSpec, device: &Device<Self>, peer: usize, tag: u64, comm: &Comm) -> Result<FloatTensor<Self>, CommError> {
        let recv = RecvOp { peer, tag, spec: spec.clone() };
        Ok(Self::collective_batch_p2p(Vec::new(), &[recv], device, comm)?.remove(0))
    }
    /// Sends and receives as one group (see [`Communicator::batch_p2p`](crate::Communicator::batch_p2p));
    /// returns the received tensors in the order of `recvs`.
    fn collective_batch_p2p(
        sends: Vec<(FloatTensor<Self>, usize, u64)>,
        recvs: &[RecvOp],
        device: &Device<Self>,
        comm: &Comm,
    ) -> Result<Vec<FloatTensor<Self>>, CommError> {
        staged::batch_p2p::<Self>(sends, recvs, device, comm)
    }

    /// Megatron's f: identity forward, all-reduce backward.
    fn map_copy_to_tp(x: FloatTensor<Self>, _comm: &Comm) -> FloatTensor<Self> {
        x
    }
    /// Megatron's g: all-reduce forward, identity backward.
    fn map_reduce_from_tp(x: FloatTensor<Self>, comm: &Comm) -> FloatTensor<Self> {
        expect_comm(Self::collective_all_reduce(x, ReduceOp::Sum, comm))
    }
    /// Keep own slice of `dim` forward, all-gather backward (scatter-to-TP / scatter-to-SP).
    fn map_scatter(x: FloatTensor<Self>, dim: usize, comm: &Comm) -> FloatTensor<Self> {
        expect_comm(local_chunk::<Self>(x, dim, comm))
    }
    /// All-gather forward, own slice backward (gather-from-TP).
    fn map_gather_tp(x: FloatTensor<Self>, dim: usize, comm: &Comm) -> FloatTensor<Self> {
        expect_comm(Self::collective_all_gather(x, dim, comm))
    }
    /// All-gather forward, reduce-scatter backward (gather-from-SP).
    fn map_gather_sp(x: FloatTensor<Self>, dim: usize, comm: &Comm) -> FloatTensor<Self> {
        expect_comm(Self::collective_all_gather(x, dim, comm))
    }
    /// Reduce-scatter forward, all-gather backward (reduce-scatter-to-SP).
    fn map_reduce_scatter(x: FloatTensor<Self>, dim: usize, comm: &Comm) -> FloatTensor<Self> {
        expect_comm(Self::collective_reduce_scatter(x, dim, ReduceOp::Sum, comm))
    }
}

impl CollectiveBackend for burn::backend::Flex {}

// `Fusion<B>` (burn's `Cuda`, `Wgpu`): see `fusion_bridge`. CUDA's `CubeBackend` drives NCCL on
// device pointers (`comm::nccl::device`); wgpu's stages through the host.
#[cfg(feature = "wgpu")]
impl<F: burn_cubecl::FloatElement, I: burn_cubecl::IntElement, BT: burn_cubecl::BoolElement> CollectiveBackend
    for burn_cubecl::CubeBackend<burn_cubecl::cubecl::wgpu::WgpuRuntime, F, I, BT>
{
}

/// Declares a backward op whose state is `(Comm, dim)` and whose gradient is `$bw(g, dim, comm)`.
macro_rules! backward_op {
    ($name:ident, |$g:ident, $dim:ident, $comm:ident| $body:expr) => {
        #[derive(Debug)]
        struct $name;
        impl<B: CollectiveBackend> Backward<B, 1> for $name {
            type State = (Comm, usize);
            fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
                let ($comm, $dim) = ops.state;
                unary::<B, _>(ops.parents, ops.node, grads, |$g| {
                    let _ = (&$comm, $dim);
                    $body
                });
            }
        }
    };
}

backward_op!(CopyToTpBw, |g, dim, comm| expect_comm(B::collective_all_reduce(g, ReduceOp::Sum, &comm)));
backward_op!(IdentityBw, |g, dim, comm| g);
backward_op!(ScatterBw, |g, dim, comm| expect_comm(B::collective_all_gather(g, dim, &comm)));
backward_op!(GatherTpBw, |g, dim, comm| expect_comm(local_chunk::<B>(g, dim, &comm)));
backward_op!(GatherSpBw, |g, dim, comm| expect_comm(B::collective_reduce_scatter(g, dim, ReduceOp::Sum, &comm)));

/// Records a one-input op: runs `fwd` on the inner tensor and attaches `bw` when `x` is tracked.
fn record<B, C, BW>(
    x: FloatTensor<Autodiff<B, C>>,
    bw: BW,
    state: (Comm, usize),
    fwd: impl FnOnce(FloatTensor<B>) -> FloatTensor<B>,
) -> FloatTensor<Autodiff<B, C>>
where
    B: CollectiveBackend,
    C: CheckpointStrategy,
    BW: Backward<B, 1, State = (Comm, usize)>,
{
    match bw.prepare::<C>([x.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish(state, fwd(x.primitive)),
        OpsKind::UnTracked(prep) => prep.finish(fwd(x.primitive)),
    }
}

impl<B: CollectiveBackend, C: CheckpointStrategy> CollectiveBackend for Autodiff<B, C> {
    fn collective_all_reduce(x: FloatTensor<Self>, op: ReduceOp, comm: &Comm) -> Result<FloatTensor<Self>, CommError> {
        Ok(Self::from_inner(B::collective_all_reduce(Self::inner(x), op, comm)?))
    }
    fn collective_all_gather(x: FloatTensor<Self>, dim: usize, comm: &Comm) -> Result<FloatTensor<Self>, CommError> {
        Ok(Self::from_inner(B::collective_all_gather(Self::inner(x), dim, comm)?))
    }
    fn collective_reduce_scatter(x: FloatTensor<Self>, dim: usize, op: ReduceOp, comm: &Comm) -> Result<FloatTensor<Self>, CommError> {
        Ok(Self::from_inner(B::collective_reduce_scatter(Self::inner(x), dim, op, comm)?))
    }
    fn collective_broadcast(x: FloatTensor<Self>, root: usize, comm: &Comm) -> Result<FloatTensor<Self>, CommError> {
        Ok(Self::from_inner(B::collective_broadcast(Self::inner(x), root, comm)?))
    }

    fn collective_batch_p2p(
        sends: Vec<(FloatTensor<Self>, usize, u64)>,
        recvs: &[RecvOp],
        device: &Device<Self>,
        comm: &Comm,
    ) -> Result<Vec<FloatTensor<Self>>, CommError> {
        let sends = sends.into_iter().map(|(x, p, t)| (Self::inner(x), p, t)).collect();
        Ok(B::collective_batch_p2p(sends, recvs, device, comm)?.into_iter().map(Self::from_inner).collect())
    }

    fn map_copy_to_tp(x: FloatTensor<Self>, comm: &Comm) -> FloatTensor<Self> {
        record::<B, C, _>(x, CopyToTpBw, (comm.clone(), 0), |p| p)
    }
    fn map_reduce_from_tp(x: FloatTensor<Self>, comm: &Comm) -> FloatTensor<Self> {
        record::<B, C, _>(x, IdentityBw, (comm.clone(), 0), |p| B::map_reduce_from_tp(p, comm))
    }
    fn map_scatter(x: FloatTensor<Self>, dim: usize, comm: &Comm) -> FloatTensor<Self> {
        record::<B, C, _>(x, ScatterBw, (comm.clone(), dim), |p| B::map_scatter(p, dim, comm))
    }
    fn map_gather_tp(x: FloatTensor<Self>, dim: usize, comm: &Comm) -> FloatTensor<Self> {
        record::<B, C, _>(x, GatherTpBw, (comm.clone(), dim), |p| B::map_gather_tp(p, dim, comm))
    }
    fn map_gather_sp(x: FloatTensor<Self>, dim: usize, comm: &Comm) -> FloatTensor<Self> {
        record::<B, C, _>(x, GatherSpBw, (comm.clone(), dim), |p| B::map_gather_sp(p, dim, comm))
    }
    fn map_reduce_scatter(x: FloatTensor<Self>, dim: usize, comm: &Comm) -> FloatTensor<Self> {
        record::<B, C, _>(x, ScatterBw, (comm.clone(), dim), |p| B::map_reduce_scatter(p, dim, comm))
    }
}
