//! [`CollectiveBackend`] for burn-cuda's `CubeBackend<CudaRuntime>`: with an [`NcclComm`], the
//! collectives run on the tensors' device pointers (no host copy); with any other communicator
//! they stage through the host. Under `Fusion` (burn's `Cuda`), `fusion_bridge` resolves to this.
//!
//! Per operation (module docs of [`super`]): make inputs contiguous and allocate outputs (an
//! all-reduce of a buffer the caller owns alone runs in place: no output allocated), pin
//! both (`get_resource`), drain burn's stream for this thread (`client.sync()`), run NCCL on the
//! communicator's stream and wait for it, release the pins. Layouts ([`layout`], tested on CPU):
//! all-gather along `dim` gathers into `[n, ..shape]` and moves the rank axis next to `dim`;
//! reduce-scatter first moves the `n` chunks of `dim` to the front, so every rank's slice is
//! contiguous.

use burn::tensor::{read_sync, DType, Device, Shape, TensorMetadata};
use burn_cubecl::cubecl::cuda::CudaRuntime;
use burn_cubecl::cubecl::Runtime;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, FloatElement, IntElement};

use super::{backend, Header, NcclComm};
use crate::collective::{layout, staged};
use crate::comm::{Comm, Communicator, RecvOp, ReduceOp};
use crate::error::CommError;
use crate::CollectiveBackend;

type T = CubeTensor<CudaRuntime>;

fn nccl(comm: &Comm) -> Option<&NcclComm> {
    comm.as_any().downcast_ref::<NcclComm>()
}

fn empty(client_of: &T, shape: Shape, dtype: DType) -> T {
    empty_device_contiguous_dtype(client_of.client.clone(), client_of.device.clone(), shape, dtype)
}

/// Pins `ts`, drains burn's stream, runs `f` on their device pointers, unpins.
fn with_ptrs<R>(ts: &[&T], f: impl FnOnce(&[u64]) -> Result<R, CommError>) -> Result<R, CommError> {
    let pins = ts.iter().map(|t| t.client.get_resource(t.handle.clone())).collect::<Result<Vec<_>, _>>().map_err(|e| backend("pinning a CUDA buffer", e))?;
    let ptrs: Vec<u64> = pins.iter().map(|p| p.resource().ptr).collect();
    if let Some(t) = ts.first() {
        read_sync(t.client.sync()).map_err(|e| backend("synchronising burn's CUDA stream", e))?;
    }
    let r = f(&ptrs);
    drop(pins);
    r
}

impl<F: FloatElement, I: IntElement, BT: BoolElement> CollectiveBackend for CubeBackend<CudaRuntime, F, I, BT> {
    fn collective_all_reduce(x: T, op: ReduceOp, comm: &Comm) -> Result<T, CommError> {
        let Some(nccl) = nccl(comm) else { return staged::all_reduce::<Self>(x, op, comm) };
        check_device(nccl, &x.device)?;
        let x = into_contiguous(x);
        let (n, dtype) = (x.shape().num_elements(), x.dtype);
        if x.can_mut() && x.is_contiguous_buffer() {
            // In place (NCCL allows sendbuff == recvbuff): nobody else holds this buffer (a
            // gradient bucket, a fresh result), so no copy and no second allocation.
            // SAFETY: a pinned contiguous buffer of exactly n elements, owned by `x` alone.
            with_ptrs(&[&x], |p| unsafe { nccl.all_reduce_raw(p[0], p[0], n, dtype, op) })?;
            return Ok(x);
        }
        let out = empty(&x, x.shape(), x.dtype);
        // SAFETY: pinned contiguous buffers of n elements on the communicator's device.
        with_ptrs(&[&x, &out], |p| unsafe { nccl.all_reduce_raw(p[0], p[1], n, dtype, op) })?;
        Ok(out)
    }

    fn collective_all_gather(x: T, dim: usize, comm: &Comm) -> Result<T, CommError> {
        let Some(nccl) = nccl(comm) else { return staged::all_gather::<Self>(x, dim, comm) };
        check_device(nccl, &x.device)?;
        let x = into_contiguous(x);
        let dims = x.shape().as_slice().to_vec();
        if dim >= dims.len() {
            return Err(nccl.bad("all_gather", format!("dim {dim} out of range for shape {dims:?}")));
        }
        let size = nccl.size();
        let gathered = empty(&x, Shape::from([vec![size], dims].concat()), x.dtype);
        let (n, dtype) = (x.shape().num_elements(), x.dtype);
        // SAFETY: n-element source, size×n-element destination, pinned.
        with_ptrs(&[&x, &gathered], |p| unsafe { nccl.all_gather_raw(p[0], p[1], n, dtype) })?;
        Ok(layout::rank_major_to_concat::<Self>(gathered, dim))
    }

    fn collective_reduce_scatter(x: T, dim: usize, op: ReduceOp, comm: &Comm) -> Result<T, CommError> {
        let Some(nccl) = nccl(comm) else { return staged::reduce_scatter::<Self>(x, dim, op, comm) };
        check_device(nccl, &x.device)?;
        let dims = x.shape().as_slice().to_vec();
        let size = nccl.size();
        if dim >= dims.len() || !dims[dim].is_multiple_of(size) {
            return Err(nccl.bad("reduce_scatter", format!("shape {dims:?} cannot be split in {size} along dim {dim}")));
        }
        let mut split = dims;
        split[dim] /= size;
        let x = into_contiguous(layout::split_to_rank_major::<Self>(x, dim, size));
        let out = empty(&x, Shape::from(split), x.dtype);
        let (count, dtype) = (out.shape().num_elements(), x.dtype);
        // SAFETY: size×count-element source, count-element destination, pinned.
        with_ptrs(&[&x, &out], |p| unsafe { nccl.reduce_scatter_raw(p[0], p[1], count, dtype, op) })?;
        Ok(out)
    }

    fn collective_broadcast(x: T, root: usize, comm: &Comm) -> Result<T, CommError> {
        let Some(nccl) = nccl(comm) else { return staged::broadcast::<Self>(x, root, comm) };
        check_device(nccl, &x.device)?;
        if root >= nccl.size() {
            return Err(nccl.bad("broadcast", format!("root {root} outside a group of {}", nccl.size())));
        }
        let x = into_contiguous(x);
        let out = empty(&x, x.shape(), x.dtype);
        let (n, dtype) = (x.shape().num_elements(), x.dtype);
        // SAFETY: pinned buffers of n elements (the shape is the same on every rank).
        with_ptrs(&[&x, &out], |p| unsafe { nccl.broadcast_raw(p[0], p[1], n, dtype, root) })?;
        Ok(out)
    }

    fn collective_batch_p2p(sends: Vec<(T, usize, u64)>, recvs: &[RecvOp], device: &Device<Self>, comm: &Comm) -> Result<Vec<T>, CommError> {
        let Some(nccl) = nccl(comm) else { return staged::batch_p2p::<Self>(sends, recvs, device, comm) };
        check_device(nccl, device)?;
        let sends: Vec<(T, usize, u64)> = sends.into_iter().map(|(x, p, t)| (into_contiguous(x), p, t)).collect();
        let client = CudaRuntime::client(device);
        let outs: Vec<T> =
            recvs.iter().map(|r| empty_device_contiguous_dtype(client.clone(), device.clone(), Shape::from(r.spec.shape.clone()), r.spec.dtype)).collect();
        let all: Vec<&T> = sends.iter().map(|(x, _, _)| x).chain(outs.iter()).collect();
        with_ptrs(&all, |p| {
            let s_ops: Vec<(u64, Header, usize)> = sends
                .iter()
                .enumerate()
                .map(|(i, (x, peer, tag))| (p[i], Header { tag: *tag, dtype: x.dtype, shape: x.shape().as_slice().to_vec() }, *peer))
                .collect();
            let r_ops: Vec<(u64, &RecvOp)> = recvs.iter().enumerate().map(|(i, r)| (p[sends.len() + i], r)).collect();
            nccl.p2p_checked(&s_ops, &r_ops)
        })?;
        Ok(outs)
    }
}

/// Tensors must live on the communicator's GPU.
fn check_device(nccl: &NcclComm, device: &Device<CubeBackend<CudaRuntime, f32, i32, u8>>) -> Result<(), CommError> {
    if device.index != nccl.device() {
        return Err(nccl.bad("p2p", format!("tensor on CUDA device {} but the communicator drives device {}", device.index, nccl.device())));
    }
    Ok(())
}
