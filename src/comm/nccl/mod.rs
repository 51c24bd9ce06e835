//! The NCCL communicator (feature `cuda`): one process per GPU, started by
//! `burn-parallel launch` (or torchrun/Slurm), bootstrapped by the TCP
//! [`rendezvous`](crate::launch::rendezvous).
//!
//! [`NcclComm`] implements [`Communicator`] on host [`TensorData`] (staged through device
//! buffers), and its `*_raw` methods take device pointers: the CUDA [`CollectiveBackend`]
//! (`collective::cuda`) uses those on burn-cuda tensors without touching the host.
//!
//! # Rules this relies on (see `shared/docs/burn-0.21.md` §4)
//! - NCCL runs on this communicator's own CUDA stream (cubecl exposes none of its streams), in the
//!   device's primary context, which is the one cubecl uses, so burn-cuda pointers are valid here.
//! - Callers make the inputs ready first (burn: `client.sync()`), and every operation waits for
//!   its stream to finish before returning, so results are visible to any stream afterwards.
//! - Buffers stay alive (burn: a `get_resource` pin) until the operation returned.
//! - Calls are serialised by a mutex; every rank issues the same collectives in the same order.
//! - Point-to-point: NCCL matches in order per pair and a send completes only when received, so
//!   [`batch_p2p`](Communicator::batch_p2p) issues one NCCL group, in which every payload is
//!   preceded by a 128-byte header (tag, dtype, shape) to the same peer; receivers size payloads
//!   from what they expect and check the headers afterwards (a wrong tag, shape or dtype is an
//!   error naming both ranks; sizes that differ may stall NCCL until the watchdog, whose error then
//!   reports the mismatch read from the header). One group per batch is what the schedules
//!   crate's rendezvous check models.
//!
//! # Never a silent hang
//! Every NCCL call and stream wait is armed on a watchdog: past the timeout the communicator is
//! aborted (`ncclCommAbort`) and the call fails with [`CommError::Timeout`] naming the rank, the
//! operation and the group (NCCL cannot tell which peer is missing: all others are listed). A
//! peer failure NCCL reports (`ncclCommGetAsyncError`) fails the call at once. Communicator
//! creation has nothing to abort: past the timeout the process prints why and exits with 124.

mod raw;

use std::any::Any;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use burn::tensor::{DType, TensorData};
use cudarc::nccl::{result, sys};

pub(crate) use raw::Header;
use raw::{nccl_dtype, HEADER_BYTES, HEADER_WORDS};

use super::host::{concat_along, split_along};
use super::{Comm, Communicator, RecvOp, ReduceOp, SendOp, TensorSpec};
use crate::error::CommError;
use crate::launch::{rendezvous, JobEnv};

/// An NCCL unique id: created by rank 0, shipped to every rank (128 bytes).
#[derive(Clone, Copy)]
pub struct NcclId(sys::ncclUniqueId);

impl NcclId {
    /// A fresh id (loads NCCL; fails clearly when it is missing).
    pub fn new() -> Result<Self, CommError> {
        crate::cuda::nccl_version()?;
        result::get_uniqueid().map(Self).map_err(|e| CommError::Backend(format!("ncclGetUniqueId: {e:?}")))
    }

    /// The bytes to ship to the other ranks.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.0.internal.iter().map(|c| *c as u8).collect()
    }

    /// The id rank 0 created.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CommError> {
        let mut id = sys::ncclUniqueId { internal: [0; 128] };
        if bytes.len() != id.internal.len() {
            return Err(CommError::Backend(format!("an NCCL unique id has 128 bytes, got {}", bytes.len())));
        }
        for (d, s) in id.internal.iter_mut().zip(bytes) {
            *d = *s as _;
        }
        Ok(Self(id))
    }
}

impl std::fmt::Debug for NcclId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NcclId(..)")
    }
}

/// Where and how long.
#[derive(Debug, Clone)]
pub struct NcclOptions {
    /// CUDA device ordinal (the local rank under `launch`).
    pub device: usize,
    /// How long any operation may take before the communicator is aborted.
    pub timeout: Duration,
}

/// A device pointer operand of [`NcclComm::p2p_raw`].
#[derive(Debug, Clone, Copy)]
pub struct RawP2p {
    /// Device pointer (`CUdeviceptr`).
    pub ptr: u64,
    /// Elements.
    pub count: usize,
    /// Element type.
    pub dtype: DType,
    /// Group rank of the peer.
    pub peer: usize,
}

/// One rank's NCCL communicator over one group. See the module docs.
pub struct NcclComm {
    t: Box<dyn Transport>,
    rank: usize,
    global_ranks: Vec<usize>,
    label: String,
    options: NcclOptions,
    seq: AtomicU64,
    host_calls: AtomicU64,
}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NcclComm({}, rank {}, device {})", self.label, self.rank, self.options.device)
    }
}

fn backend(what: &str, e: impl std::fmt::Debug) -> CommError {
    CommError::Backend(format!("{what}: {e:?}"))
}

impl NcclComm {
    /// Joins the NCCL communicator `id` as `rank` of `global_ranks.len()` ranks (blocks until all
    /// joined; exits the process after `options.timeout`, see the module docs).
    pub fn init(id: &NcclId, rank: usize, global_ranks: Vec<usize>, label: String, options: NcclOptions) -> Result<Self, CommError> {
        let info = OpInfo::new(&label, &global_ranks, rank);
        let t = CudaTransport::init(id, rank, global_ranks.len(), info, &options)?;
        Ok(Self::with_transport(Box::new(t), rank, global_ranks, label, options))
    }

    fn with_transport(t: Box<dyn Transport>, rank: usize, global_ranks: Vec<usize>, label: String, options: NcclOptions) -> Self {
        Self { t, rank, global_ranks, label, options, seq: AtomicU64::new(0), host_calls: AtomicU64::new(0) }
    }

    /// The world communicator of a launched job: rank 0 creates the id, the TCP rendezvous at
    /// `MASTER_ADDR:MASTER_PORT` ships it, each process uses GPU `LOCAL_RANK`.
    pub fn from_env(env: &JobEnv) -> Result<Comm, CommError> {
        let payload = if env.rank == 0 { Some(NcclId::new()?.to_bytes()) } else { None };
        let bytes = rendezvous(env, payload).map_err(|e| CommError::Backend(e.to_string()))?;
        let id = NcclId::from_bytes(&bytes)?;
        let label = format!("world[0..{}]", env.world_size);
        let options = NcclOptions { device: env.local_rank, timeout: env.timeout };
        Ok(Arc::new(Self::init(&id, env.rank, (0..env.world_size).collect(), label, options)?))
    }

    /// The CUDA device ordinal.
    pub fn device(&self) -> usize {
        self.options.device
    }

    /// Runs one flat operation through the transport (numbered for errors and checks).
    fn run(&self, op: &str, flat: Flat<'_>) -> Result<(), CommError> {
        let name = format!("{op} #{}", self.seq.fetch_add(1, Ordering::SeqCst));
        self.t.run(&name, flat)
    }

    /// All-reduce of `count` elements from `send` into `recv` (may be equal).
    ///
    /// # Safety
    /// Both pointers are device memory of this communicator's device holding `count` elements,
    /// alive and not written by others until this returns.
    pub unsafe fn all_reduce_raw(&self, send: u64, recv: u64, count: usize, dtype: DType, op: ReduceOp) -> Result<(), CommError> {
        nccl_dtype(dtype).map_err(CommError::Backend)?;
        self.run(&format!("all_reduce({op:?})"), Flat::AllReduce { send, recv, count, dtype, op })
    }

    /// All-gather: `recv` gets every rank's `send_count` elements, in rank order.
    ///
    /// # Safety
    /// As [`all_reduce_raw`](Self::all_reduce_raw); `recv` holds `size × send_count` elements.
    pub unsafe fn all_gather_raw(&self, send: u64, recv: u64, send_count: usize, dtype: DType) -> Result<(), CommError> {
        nccl_dtype(dtype).map_err(CommError::Backend)?;
        self.run("all_gather", Flat::AllGather { send, recv, count: send_count, dtype })
    }

    /// Reduce-scatter: `recv` gets this rank's `recv_count` elements of the reduction.
    ///
    /// # Safety
    /// As [`all_reduce_raw`](Self::all_reduce_raw); `send` holds `size × recv_count` elements.
    pub unsafe fn reduce_scatter_raw(&self, send: u64, recv: u64, recv_count: usize, dtype: DType, op: ReduceOp) -> Result<(), CommError> {
        nccl_dtype(dtype).map_err(CommError::Backend)?;
        self.run(&format!("reduce_scatter({op:?})"), Flat::ReduceScatter { send, recv, count: recv_count, dtype, op })
    }

    /// Broadcast of `count` elements from group rank `root`'s `send` into every rank's `recv`.
    ///
    /// # Safety
    /// As [`all_reduce_raw`](Self::all_reduce_raw).
    pub unsafe fn broadcast_raw(&self, send: u64, recv: u64, count: usize, dtype: DType, root: usize) -> Result<(), CommError> {
        nccl_dtype(dtype).map_err(CommError::Backend)?;
        self.run(&format!("broadcast(root={root})"), Flat::Broadcast { send, recv, count, dtype, root })
    }

    /// Sends and receives in one NCCL group (no headers: the caller knows the sizes).
    ///
    /// # Safety
    /// As [`all_reduce_raw`](Self::all_reduce_raw), for every operand.
    pub unsafe fn p2p_raw(&self, sends: &[RawP2p], recvs: &[RawP2p]) -> Result<(), CommError> {
        for o in sends.iter().chain(recvs) {
            if o.peer >= self.size() {
                return Err(CommError::BadInput {
                    group: self.label.clone(),
                    op: "p2p".into(),
                    detail: format!("peer {} outside a group of {}", o.peer, self.size()),
                });
            }
        }
        for o in sends.iter().chain(recvs) {
            nccl_dtype(o.dtype).map_err(CommError::Backend)?;
        }
        let peers: Vec<String> = sends.iter().map(|o| format!("→{}", o.peer)).chain(recvs.iter().map(|o| format!("←{}", o.peer))).collect();
        self.run(&format!("p2p[{}]", peers.join(" ")), Flat::P2p { sends, recvs })
    }

    /// One NCCL group of checked point-to-point messages: every send is preceded by its header
    /// and every receive by a header receive (NCCL matches a pair's messages in posting order, so
    /// headers meet headers). Payloads are bytes; receive sizes come from what the receiver
    /// expects. After the group the headers are checked against `recvs`; a group that times out
    /// reports a mismatch instead when a received header shows one (sizes that differ can stall
    /// NCCL until the watchdog fires).
    pub(crate) fn p2p_checked(&self, sends: &[(u64, Header, usize)], recvs: &[(u64, &RecvOp)]) -> Result<(), CommError> {
        let mut words = Vec::with_capacity(sends.len() * HEADER_WORDS);
        for (_, h, _) in sends {
            words.extend(h.encode().map_err(|d| self.bad("send", d))?);
        }
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        let hs = self.alloc_upload(&bytes)?;
        let hr = self.alloc(recvs.len() * HEADER_BYTES)?;
        let (hs_ptr, hr_ptr) = (self.ptr(&hs), self.ptr(&hr));
        let mut s_ops = Vec::with_capacity(2 * sends.len());
        for (i, (ptr, h, peer)) in sends.iter().enumerate() {
            s_ops.push(RawP2p { ptr: hs_ptr + (i * HEADER_BYTES) as u64, count: HEADER_BYTES, dtype: DType::U8, peer: *peer });
            s_ops.push(RawP2p { ptr: *ptr, count: h.bytes(), dtype: DType::U8, peer: *peer });
        }
        let mut r_ops = Vec::with_capacity(2 * recvs.len());
        for (i, (ptr, r)) in recvs.iter().enumerate() {
            let expect = Header { tag: r.tag, dtype: r.spec.dtype, shape: r.spec.shape.clone() };
            r_ops.push(RawP2p { ptr: hr_ptr + (i * HEADER_BYTES) as u64, count: HEADER_BYTES, dtype: DType::U8, peer: r.peer });
            r_ops.push(RawP2p { ptr: *ptr, count: expect.bytes(), dtype: DType::U8, peer: r.peer });
        }
        // SAFETY: header buffers are ours; payload pointers are the caller's (pinned, sized).
        let done = unsafe { self.p2p_raw(&s_ops, &r_ops) };
        // Each received header on its own: slots never filled (a stalled group) stay zero and are
        // skipped, so a mismatch that did arrive is still reported.
        let received: Vec<Option<Header>> = match self.download(&hr) {
            Ok(raw) => raw
                .chunks_exact(HEADER_BYTES)
                .take(recvs.len())
                .map(|c| {
                    let w: Vec<u64> = c.chunks_exact(8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes"))).collect();
                    (w.iter().any(|x| *x != 0)).then(|| Header::decode(&w).ok()).flatten()
                })
                .collect(),
            Err(_) => vec![None; recvs.len()],
        };
        let pairs: Vec<(Header, RecvOp)> = received.iter().zip(recvs).filter_map(|(h, (_, r))| h.clone().map(|h| (h, (*r).clone()))).collect();
        let (got, owned): (Vec<Header>, Vec<RecvOp>) = pairs.into_iter().unzip();
        let mismatch = self.check_received(&got, &owned);
        // A size mismatch may leave a pair's messages out of step: nothing can be trusted after.
        if got.iter().zip(&owned).any(|(h, r)| h.bytes() != r.spec.shape.iter().product::<usize>() * r.spec.dtype.size()) {
            self.t.poison();
        }
        match done {
            Ok(()) if received.iter().any(|h| h.is_none()) => {
                self.t.poison();
                Err(self.bad("recv", "a point-to-point header arrived corrupt (the peer is not running the same protocol)".into()))
            }
            Ok(()) => mismatch,
            Err(e) => mismatch.and(Err(e)),
        }
    }

    /// NCCL calls issued so far on this communicator.
    pub fn ops_issued(&self) -> u64 {
        self.seq.load(Ordering::SeqCst)
    }

    /// Host-data [`Communicator`] calls so far (tensors staged through the host); the device
    /// checks use it to prove that CUDA tensors took the device-pointer path.
    pub fn host_calls(&self) -> u64 {
        self.host_calls.load(Ordering::SeqCst)
    }

    fn count_host_call(&self) {
        self.host_calls.fetch_add(1, Ordering::SeqCst);
    }

    pub(crate) fn bad(&self, op: &str, detail: String) -> CommError {
        CommError::BadInput { group: self.label.clone(), op: op.into(), detail }
    }

    fn alloc_upload(&self, bytes: &[u8]) -> Result<Buf, CommError> {
        if bytes.is_empty() {
            self.alloc(1)
        } else {
            self.t.upload(bytes)
        }
    }

    fn alloc(&self, bytes: usize) -> Result<Buf, CommError> {
        self.t.alloc(bytes.max(1))
    }

    fn download(&self, buf: &Buf) -> Result<Vec<u8>, CommError> {
        self.t.download(buf)
    }

    fn ptr(&self, b: &Buf) -> u64 {
        b.ptr
    }
}

mod cuda_transport;
mod device;
pub mod emu;
mod host;
mod transport;

use cuda_transport::CudaTransport;
use transport::{Buf, Flat, OpInfo, Transport};

#[cfg(test)]
mod tests {
    use super::*;

    /// Without NCCL (CI) creating an id is a clear error, never cudarc's panic; with NCCL the id
    /// survives the byte round trip the rendezvous does.
    #[test]
    fn unique_id_or_a_clear_error() {
        match NcclId::new() {
            Ok(id) => {
                let bytes = id.to_bytes();
                assert_eq!(NcclId::from_bytes(&bytes).unwrap().to_bytes(), bytes);
            }
            Err(e) => assert!(e.to_string().contains("NCCL not found"), "{e}"),
        }
        let e = NcclId::from_bytes(&[1, 2, 3]).unwrap_err().to_string();
        assert!(e.contains("128 bytes, got 3"), "{e}");
    }

    /// `from_env` on a machine without NCCL fails before touching the network or the GPU.
    #[test]
    fn from_env_without_nccl_is_a_clear_error() {
        if crate::cuda::nccl_version().is_ok() {
            return; // the GPU machine: covered by `device_check nccl`
        }
        let env = JobEnv::from_lookup(|k| match k {
            "RANK" => Some("0".into()),
            "WORLD_SIZE" => Some("1".into()),
            _ => None,
        })
        .unwrap();
        let e = NcclComm::from_env(&env).unwrap_err().to_string();
        assert!(e.contains("NCCL not found") && e.contains("libnccl.so"), "{e}");
    }
}
