//! Raw NCCL pieces: the communicator handle, dtype/op tables, message headers and the watchdog
//! that turns a blocked NCCL call into an error instead of a silent hang.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use burn::tensor::DType;
use cudarc::nccl::sys;

use crate::comm::ReduceOp;

/// An `ncclComm_t` that may be aborted from the watchdog thread. The flag's lock is held while
/// aborting and while polling the asynchronous error, so a poll never sees a freed handle; it is
/// **not** held during blocking NCCL calls (those are what an abort must interrupt).
#[derive(Debug)]
pub(crate) struct RawComm {
    ptr: AtomicPtr<sys::ncclComm>,
    aborted: RwLock<bool>,
}

impl RawComm {
    pub(crate) fn new(ptr: sys::ncclComm_t) -> Self {
        Self { ptr: AtomicPtr::new(ptr), aborted: RwLock::new(false) }
    }

    fn is_aborted(&self) -> bool {
        *self.aborted.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The handle, or `None` once aborted.
    pub(crate) fn get(&self) -> Option<sys::ncclComm_t> {
        (!self.is_aborted()).then(|| self.ptr.load(Ordering::SeqCst))
    }

    /// Aborts the communicator (NCCL kernels stop, blocked calls return); idempotent.
    pub(crate) fn abort(&self) {
        let mut aborted = self.aborted.write().unwrap_or_else(|e| e.into_inner());
        if !*aborted {
            *aborted = true;
            // SAFETY: the handle came from ncclCommInitRank and is aborted at most once.
            let _ = unsafe { cudarc::nccl::result::comm_abort(self.ptr.load(Ordering::SeqCst)) };
        }
    }

    /// The communicator's asynchronous error, if any (a peer failed, a network error).
    pub(crate) fn async_error(&self) -> Option<String> {
        let aborted = self.aborted.read().unwrap_or_else(|e| e.into_inner());
        if *aborted {
            return None;
        }
        let mut state = sys::ncclResult_t::ncclSuccess;
        // SAFETY: valid (not aborted: the read lock keeps it so) handle, out-pointer to a local.
        let r = unsafe { sys::ncclCommGetAsyncError(self.ptr.load(Ordering::SeqCst), &mut state) };
        match (r, state) {
            (sys::ncclResult_t::ncclSuccess, sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress) => None,
            (sys::ncclResult_t::ncclSuccess, e) => Some(format!("{e:?}")),
            (e, _) => Some(format!("ncclCommGetAsyncError failed: {e:?}")),
        }
    }
}

impl Drop for RawComm {
    /// Destroying may talk to the peers (NCCL ≥ 2.23 finalises): under the watchdog, like
    /// creation.
    fn drop(&mut self) {
        if !self.is_aborted() {
            let _guard = WatchGuard::arm("ncclCommDestroy".into(), Duration::from_secs(60), Expire::Exit);
            // SAFETY: owned handle, not aborted, destroyed once.
            let _ = unsafe { cudarc::nccl::result::comm_destroy(self.ptr.load(Ordering::SeqCst)) };
        }
    }
}

// SAFETY: NCCL communicators may be used from any thread as long as calls are serialised, which
// `NcclComm` does with a mutex; `ncclCommAbort` is documented as callable from another thread.
unsafe impl Send for RawComm {}
unsafe impl Sync for RawComm {}

/// NCCL's element type for a Burn dtype.
pub(crate) fn nccl_dtype(dtype: DType) -> Result<sys::ncclDataType_t, String> {
    use sys::ncclDataType_t as T;
    Ok(match dtype {
        DType::F32 | DType::Flex32 => T::ncclFloat32,
        DType::F16 => T::ncclFloat16,
        DType::BF16 => T::ncclBfloat16,
        DType::F64 => T::ncclFloat64,
        DType::I64 => T::ncclInt64,
        DType::I32 => T::ncclInt32,
        DType::I8 => T::ncclInt8,
        DType::U64 => T::ncclUint64,
        DType::U32 => T::ncclUint32,
        DType::U8 => T::ncclUint8,
        other => return Err(format!("dtype {other:?} has no NCCL equivalent")),
    })
}

/// NCCL's reduction for ours (`Mean` is `ncclAvg`, NCCL ≥ 2.10).
pub(crate) fn nccl_op(op: ReduceOp) -> sys::ncclRedOp_t {
    match op {
        ReduceOp::Sum => sys::ncclRedOp_t::ncclSum,
        ReduceOp::Max => sys::ncclRedOp_t::ncclMax,
        ReduceOp::Mean => sys::ncclRedOp_t::ncclAvg,
    }
}

/// The dtypes a header can name, by code.
const DTYPES: [DType; 10] = [DType::F32, DType::F16, DType::BF16, DType::F64, DType::I64, DType::I32, DType::I8, DType::U64, DType::U32, DType::U8];
const MAGIC: u64 = u64::from_le_bytes(*b"BURNPAR1");
/// Words of a header: magic, tag, dtype code, rank count, up to 12 dims.
pub(crate) const HEADER_WORDS: usize = 16;
/// Bytes of a header.
pub(crate) const HEADER_BYTES: usize = HEADER_WORDS * 8;
const MAX_DIMS: usize = HEADER_WORDS - 4;

/// What travels ahead of a point-to-point payload (and a host broadcast): tag, dtype, shape.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Header {
    pub tag: u64,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl Header {
    pub(crate) fn encode(&self) -> Result<[u64; HEADER_WORDS], String> {
        let code = DTYPES.iter().position(|d| *d == self.dtype).ok_or_else(|| format!("dtype {:?} cannot be sent", self.dtype))?;
        if self.shape.len() > MAX_DIMS {
            return Err(format!("tensors of rank {} > {MAX_DIMS} cannot be sent", self.shape.len()));
        }
        let mut w = [0u64; HEADER_WORDS];
        w[..4].copy_from_slice(&[MAGIC, self.tag, code as u64, self.shape.len() as u64]);
        for (i, d) in self.shape.iter().enumerate() {
            w[4 + i] = *d as u64;
        }
        Ok(w)
    }

    pub(crate) fn decode(w: &[u64]) -> Result<Self, String> {
        let (n, code) = (w[3] as usize, w[2] as usize);
        if w[0] != MAGIC || n > MAX_DIMS || code >= DTYPES.len() {
            return Err(format!("corrupt point-to-point header {:?} (the peer is not running the same protocol)", &w[..4]));
        }
        Ok(Self { tag: w[1], dtype: DTYPES[code], shape: w[4..4 + n].iter().map(|d| *d as usize).collect() })
    }

    pub(crate) fn bytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size()
    }
}

/// What the watchdog does when an armed call overruns.
pub(crate) enum Expire {
    /// Abort the communicator: the blocked call returns with an error.
    Abort(Arc<RawComm>),
    /// Nothing to abort (communicator creation): print why and exit the process with code 124,
    /// so the launcher stops the other ranks and reports this one.
    Exit,
}

struct Armed {
    deadline: Instant,
    what: String,
    expire: Expire,
    fired: Arc<AtomicBool>,
}

#[derive(Default)]
struct Watchdog {
    armed: Mutex<HashMap<u64, Armed>>,
    cv: Condvar,
    next: std::sync::atomic::AtomicU64,
}

fn watchdog() -> &'static Watchdog {
    static W: OnceLock<&'static Watchdog> = OnceLock::new();
    W.get_or_init(|| {
        let w: &'static Watchdog = Box::leak(Box::default());
        std::thread::Builder::new().name("nccl-watchdog".into()).spawn(move || w.run()).expect("spawn the NCCL watchdog");
        w
    })
}

impl Watchdog {
    fn run(&self) {
        let mut armed = self.armed.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let now = Instant::now();
            let expired: Vec<u64> = armed.iter().filter(|(_, a)| a.deadline <= now).map(|(id, _)| *id).collect();
            let expired: Vec<Armed> = expired.into_iter().map(|id| armed.remove(&id).expect("listed")).collect();
            if !expired.is_empty() {
                // Abort without holding the list (an abort may take long; guards keep arming and
                // disarming meanwhile), and mark `fired` only once the abort returned, so the
                // caller never releases buffers NCCL kernels may still write.
                drop(armed);
                for a in expired {
                    match a.expire {
                        Expire::Abort(comm) => {
                            tracing::error!("{} did not finish in time: aborting the NCCL communicator", a.what);
                            comm.abort();
                        }
                        Expire::Exit => {
                            eprintln!("burn-parallel: {} did not finish in time and cannot be interrupted; exiting with code 124", a.what);
                            // SAFETY: ends the process without running CUDA/NCCL exit handlers
                            // (which could block on the stuck call).
                            unsafe { libc::_exit(124) };
                        }
                    }
                    a.fired.store(true, Ordering::SeqCst);
                }
                armed = self.armed.lock().unwrap_or_else(|e| e.into_inner());
                continue;
            }
            let wait = armed.values().map(|a| a.deadline.saturating_duration_since(now)).min().unwrap_or(Duration::from_secs(3600));
            armed = self.cv.wait_timeout(armed, wait).unwrap_or_else(|e| e.into_inner()).0;
        }
    }
}

/// Disarms on drop; [`fired`](Self::fired) tells whether the deadline passed first.
pub(crate) struct WatchGuard {
    id: u64,
    fired: Arc<AtomicBool>,
}

impl WatchGuard {
    /// Arms the watchdog for `what` (e.g. `rank 3: all_reduce #12 on tp[2,3]`).
    pub(crate) fn arm(what: String, timeout: Duration, expire: Expire) -> Self {
        let w = watchdog();
        let id = w.next.fetch_add(1, Ordering::SeqCst);
        let fired = Arc::new(AtomicBool::new(false));
        let a = Armed { deadline: Instant::now() + timeout, what, expire, fired: fired.clone() };
        w.armed.lock().unwrap_or_else(|e| e.into_inner()).insert(id, a);
        w.cv.notify_all();
        Self { id, fired }
    }

    pub(crate) fn fired(&self) -> bool {
        self.fired.load(Ordering::SeqCst)
    }
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        watchdog().armed.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_roundtrip_and_reject_garbage() {
        let h = Header { tag: 77, dtype: DType::BF16, shape: vec![2, 3, 5] };
        let w = h.encode().unwrap();
        assert_eq!(Header::decode(&w).unwrap(), h);
        assert_eq!(h.bytes(), 60);
        assert!(Header::decode(&[0; HEADER_WORDS]).unwrap_err().contains("corrupt"));
        assert!(Header { shape: vec![1; 13], ..h }.encode().is_err());
    }

    #[test]
    fn every_float_dtype_maps_to_nccl() {
        for d in [DType::F32, DType::F16, DType::BF16, DType::F64] {
            nccl_dtype(d).unwrap();
        }
    }
}
