//! Eager bridge between `Fusion<B>` (burn's default `Cuda`/`Wgpu`) and its inner backend, for
//! ops that must run in program order (NCCL on device pointers): inputs are
//! resolved to the inner backend's tensors (draining their fusion streams), the op runs, and
//! outputs come back through a zero-input custom op that registers them. Running eagerly keeps
//! collectives in program order on every rank (a lazy op could reorder them at flush time).

use burn::tensor::ops::FloatTensor;
use burn::tensor::{Device, TensorMetadata};
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{get_client, Client, Fusion, FusionBackend, FusionRuntime, FusionTensor};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, TensorIr};

use crate::comm::{Comm, RecvOp, ReduceOp};
use crate::error::CommError;
use crate::CollectiveBackend;

pub(crate) fn to_inner<B: FusionBackend>(t: FusionTensor<B::FusionRuntime>) -> FloatTensor<B> {
    t.client.clone().resolve_tensor_float::<B>(t)
}

#[derive(Debug)]
struct Import<B: FusionBackend> {
    desc: CustomOpIr,
    tensor: FloatTensor<B>,
}

impl<B: FusionBackend> Operation<B::FusionRuntime> for Import<B> {
    fn execute(&self, handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>) {
        let ([], [out]) = self.desc.as_fixed::<0, 1>();
        handles.register_float_tensor::<B>(&out.id, self.tensor.clone());
    }
}

pub(crate) fn from_inner<B: FusionBackend>(client: &Client<B::FusionRuntime>, tensor: FloatTensor<B>) -> FusionTensor<B::FusionRuntime> {
    let out = TensorIr::uninit(client.create_empty_handle(), tensor.shape(), tensor.dtype());
    let desc = CustomOpIr::new("burn-parallel-import", &[], &[out]);
    client.register(OperationStreams::default(), OperationIr::Custom(desc.clone()), Import::<B> { desc, tensor }).remove(0)
}

/// Collectives under `Fusion` run on the inner backend (NCCL on device pointers for CUDA).
impl<B: FusionBackend + CollectiveBackend> CollectiveBackend for Fusion<B> {
    fn collective_all_reduce(x: FusionTensor<B::FusionRuntime>, op: ReduceOp, comm: &Comm) -> Result<FusionTensor<B::FusionRuntime>, CommError> {
        let client = x.client.clone();
        Ok(from_inner::<B>(&client, B::collective_all_reduce(to_inner::<B>(x), op, comm)?))
    }
    fn collective_all_gather(x: FusionTensor<B::FusionRuntime>, dim: usize, comm: &Comm) -> Result<FusionTensor<B::FusionRuntime>, CommError> {
        let client = x.client.clone();
        Ok(from_inner::<B>(&client, B::collective_all_gather(to_inner::<B>(x), dim, comm)?))
    }
    fn collective_reduce_scatter(
        x: FusionTensor<B::FusionRuntime>,
        dim: usize,
        op: ReduceOp,
        comm: &Comm,
    ) -> Result<FusionTensor<B::FusionRuntime>, CommError> {
        let client = x.client.clone();
        Ok(from_inner::<B>(&client, B::collective_reduce_scatter(to_inner::<B>(x), dim, op, comm)?))
    }
    fn collective_broadcast(x: FusionTensor<B::FusionRuntime>, root: usize, comm: &Comm) -> Result<FusionTensor<B::FusionRuntime>, CommError> {
        let client = x.client.clone();
        Ok(from_inner::<B>(&client, B::collective_broadcast(to_inner::<B>(x), root, comm)?))
    }
    fn collective_batch_p2p(
        sends: Vec<(FusionTensor<B::FusionRuntime>, usize, u64)>,
        recvs: &[RecvOp],
        device: &Device<Self>,
        comm: &Comm,
    ) -> Result<Vec<FusionTensor<B::FusionRuntime>>, CommError> {
        let client = get_client::<B>(device);
        let sends = sends.into_iter().map(|(x, p, t)| (to_inner::<B>(x), p, t)).collect();
        let got = B::collective_batch_p2p(sends, recvs, device, comm)?;
        Ok(got.into_iter().map(|t| from_inner::<B>(&client, t)).collect())
    }
}
