//! What [`NcclComm`](super::NcclComm) needs from NCCL: flat operations on device pointers,
//! buffers, and creating sibling communicators. Implemented by the CUDA transport (cudarc NCCL)
//! and by an emulator on CPU threads ([`super::emu`]) that follows NCCL's semantics, so the
//! communicator's own logic (headers, layouts, groups) is tested with several ranks on CPU.

use std::any::Any;

use burn::tensor::DType;

use super::RawP2p;
use crate::comm::ReduceOp;
use crate::error::CommError;

/// A device buffer: its pointer and whatever keeps the memory alive.
pub(crate) struct Buf {
    pub ptr: u64,
    pub len: usize,
    #[allow(dead_code)] // held for its Drop
    pub keep: Box<dyn Any + Send + Sync>,
}

/// One NCCL operation on flat buffers (`count` in elements of `dtype`; NCCL's argument meaning:
/// all-gather's `count` is per rank, reduce-scatter's the result's).
pub(crate) enum Flat<'a> {
    AllReduce {
        send: u64,
        recv: u64,
        count: usize,
        dtype: DType,
        op: ReduceOp,
    },
    AllGather {
        send: u64,
        recv: u64,
        count: usize,
        dtype: DType,
    },
    ReduceScatter {
        send: u64,
        recv: u64,
        count: usize,
        dtype: DType,
        op: ReduceOp,
    },
    Broadcast {
        send: u64,
        recv: u64,
        count: usize,
        dtype: DType,
        root: usize,
    },
    /// One group: all sends, then all receives (each pair's messages match in posting order).
    P2p {
        sends: &'a [RawP2p],
        recvs: &'a [RawP2p],
    },
}

/// Who runs an operation, for error messages.
#[derive(Debug, Clone)]
pub(crate) struct OpInfo {
    pub label: String,
    pub me: usize,
    pub others: Vec<usize>,
}

impl OpInfo {
    pub fn new(label: &str, global_ranks: &[usize], rank: usize) -> Self {
        let me = global_ranks[rank];
        Self { label: label.to_string(), me, others: global_ranks.iter().copied().filter(|r| *r != me).collect() }
    }

    pub fn timeout(&self, name: &str, waited: std::time::Duration) -> CommError {
        CommError::Timeout { op: name.to_string(), group: self.label.clone(), rank: self.me, missing: self.others.clone(), waited }
    }
}

/// One rank's end of one NCCL communicator.
pub(crate) trait Transport: Send + Sync {
    /// Runs `op` and waits for it (errors name `name`).
    fn run(&self, name: &str, op: Flat<'_>) -> Result<(), CommError>;
    /// A zeroed buffer of `bytes` (> 0).
    fn alloc(&self, bytes: usize) -> Result<Buf, CommError>;
    /// A buffer holding `bytes` (non-empty).
    fn upload(&self, bytes: &[u8]) -> Result<Buf, CommError>;
    /// The buffer's bytes.
    fn download(&self, buf: &Buf) -> Result<Vec<u8>, CommError>;
    /// A fresh unique id for a new communicator.
    fn new_id(&self) -> Result<[u8; 128], CommError>;
    /// Makes the communicator unusable (after a point-to-point size mismatch a pair's stream of
    /// messages may be out of step: NCCL offers no way back).
    fn poison(&self);
    /// Joins the communicator `id` as `rank` of `size` (blocks until all joined), on the same
    /// device as this one.
    fn join(&self, id: &[u8; 128], rank: usize, size: usize, info: OpInfo) -> Result<Box<dyn Transport>, CommError>;
}
