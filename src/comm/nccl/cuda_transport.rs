//! The real transport: cudarc's NCCL on this communicator's own CUDA stream, every call and wait
//! under the watchdog (see the module docs of [`super`]).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr};
use cudarc::nccl::{result, sys};

use super::raw::{nccl_dtype, nccl_op, Expire, RawComm, WatchGuard};
use super::transport::{Buf, Flat, OpInfo, Transport};
use super::{backend, NcclId, NcclOptions};
use crate::error::CommError;

pub(crate) struct CudaTransport {
    raw: Arc<RawComm>,
    lock: Mutex<()>,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    options: NcclOptions,
    info: OpInfo,
}

impl CudaTransport {
    /// Joins NCCL communicator `id` as `rank` of `size` on `options.device` (watchdog: exit).
    pub(crate) fn init(id: &NcclId, rank: usize, size: usize, info: OpInfo, options: &NcclOptions) -> Result<Self, CommError> {
        crate::cuda::nccl_version()?;
        // SAFETY: only tries to dlopen the CUDA driver.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(CommError::Backend("the CUDA driver (libcuda.so) cannot be loaded: install the NVIDIA driver or run on a GPU machine".into()));
        }
        let ctx = CudaContext::new(options.device).map_err(|e| backend(&format!("CUDA device {}", options.device), e))?;
        let stream = ctx.new_stream().map_err(|e| backend("creating a CUDA stream", e))?;
        ctx.bind_to_thread().map_err(|e| backend("binding the CUDA context", e))?;
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        let what = format!("rank {}: ncclCommInitRank of {} ({size} ranks)", info.me, info.label);
        let guard = WatchGuard::arm(what.clone(), options.timeout, Expire::Exit);
        // SAFETY: out-pointer to a local; the id is the same on every rank.
        let r = unsafe { result::comm_init_rank(&mut comm, size as i32, id.0, rank as i32) };
        drop(guard);
        r.map_err(|e| backend(&what, e))?;
        Ok(Self { raw: Arc::new(RawComm::new(comm)), lock: Mutex::new(()), ctx, stream, options: options.clone(), info })
    }

    /// Issues `op` on the stream.
    ///
    /// # Safety
    /// The pointers in `op` are valid device memory of this device, sized as `op` says.
    unsafe fn issue(&self, comm: sys::ncclComm_t, op: &Flat<'_>) -> Result<(), CommError> {
        let s = self.stream.cu_stream() as sys::cudaStream_t;
        let t = |d| nccl_dtype(d).map_err(CommError::Backend);
        let r = match *op {
            Flat::AllReduce { send, recv, count, dtype, op } => result::all_reduce(send as _, recv as _, count, t(dtype)?, nccl_op(op), comm, s),
            Flat::AllGather { send, recv, count, dtype } => result::all_gather(send as _, recv as _, count, t(dtype)?, comm, s),
            Flat::ReduceScatter { send, recv, count, dtype, op } => result::reduce_scatter(send as _, recv as _, count, t(dtype)?, nccl_op(op), comm, s),
            Flat::Broadcast { send, recv, count, dtype, root } => result::broadcast(send as _, recv as _, count, t(dtype)?, root as i32, comm, s),
            Flat::P2p { sends, recvs } => {
                // Types first: nothing may fail between group start and end.
                let typed = |ops: &[super::RawP2p]| ops.iter().map(|o| t(o.dtype).map(|d| (*o, d))).collect::<Result<Vec<_>, _>>();
                let (sends, recvs) = (typed(sends)?, typed(recvs)?);
                result::group_start().map_err(|e| backend("ncclGroupStart", e))?;
                let mut r = Ok(());
                for (o, d) in &sends {
                    r = r.and(result::send(o.ptr as _, o.count, *d, o.peer as i32, comm, s).map(|_| ()).map_err(|e| backend("ncclSend", e)));
                }
                for (o, d) in &recvs {
                    r = r.and(result::recv(o.ptr as _, o.count, *d, o.peer as i32, comm, s).map(|_| ()).map_err(|e| backend("ncclRecv", e)));
                }
                let end = result::group_end().map(|_| ()).map_err(|e| backend("ncclGroupEnd", e));
                return r.and(end);
            }
        };
        r.map(|_| ()).map_err(|e| backend("NCCL", e))
    }
}

impl Transport for CudaTransport {
    fn run(&self, name: &str, op: Flat<'_>) -> Result<(), CommError> {
        let _serial = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let info = &self.info;
        let comm =
            self.raw.get().ok_or_else(|| CommError::Backend(format!("{name} on {}: the communicator was aborted after an earlier failure", info.label)))?;
        self.ctx.bind_to_thread().map_err(|e| backend("binding the CUDA context", e))?;
        let start = Instant::now();
        let guard = WatchGuard::arm(format!("rank {}: {name} on {}", info.me, info.label), self.options.timeout, Expire::Abort(self.raw.clone()));
        // The watchdog marks `fired` only after `ncclCommAbort` returned, but the abort flag (and
        // the stopped kernels) come earlier: `get()` waits on the abort's lock, so "gone" is
        // decided reliably before any result is trusted.
        let gone = || guard.fired() || self.raw.get().is_none();
        // On any failure after issuing: abort (the communicator is unusable after a failed group)
        // and drain the stream, so the caller never releases buffers NCCL kernels still use.
        let fail = |e: CommError| {
            self.raw.abort();
            let _exit = WatchGuard::arm(
                format!("rank {}: draining the NCCL stream of {} after {name} failed", info.me, info.label),
                Duration::from_secs(60),
                Expire::Exit,
            );
            let _ = self.stream.synchronize();
            Err(e)
        };
        // SAFETY: the caller (NcclComm's unsafe raw methods) guarantees the pointers.
        let issued = unsafe { self.issue(comm, &op) };
        if gone() {
            return fail(info.timeout(name, start.elapsed()));
        }
        if let Err(e) = issued {
            return fail(e);
        }
        let done = match self.stream.record_event(None) {
            Ok(d) => d,
            Err(e) => return fail(backend("recording a CUDA event", e)),
        };
        let mut spins = 0u32;
        loop {
            match done.try_is_complete() {
                Ok(true) if gone() => return fail(info.timeout(name, start.elapsed())),
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => return fail(backend(&format!("{name} on {}", info.label), e)),
            }
            if gone() {
                return fail(info.timeout(name, start.elapsed()));
            }
            if let Some(e) = self.raw.async_error() {
                return fail(CommError::Backend(format!("rank {}: {name} on {} failed: NCCL reports {e} (a peer failed or exited?)", info.me, info.label)));
            }
            spins += 1;
            if spins > 1000 {
                std::thread::sleep(Duration::from_micros(50));
            } else {
                std::hint::spin_loop();
            }
        }
    }

    fn poison(&self) {
        self.raw.abort();
    }

    fn alloc(&self, bytes: usize) -> Result<Buf, CommError> {
        let s = self.stream.alloc_zeros::<u8>(bytes).map_err(|e| backend("allocating GPU memory", e))?;
        Ok(self.wrap(s, bytes))
    }

    fn upload(&self, bytes: &[u8]) -> Result<Buf, CommError> {
        let s = self.stream.clone_htod(bytes).map_err(|e| backend("copying to the GPU", e))?;
        Ok(self.wrap(s, bytes.len()))
    }

    fn download(&self, buf: &Buf) -> Result<Vec<u8>, CommError> {
        let slice = buf.keep.downcast_ref::<CudaSlice<u8>>().expect("a buffer of this transport");
        self.stream.clone_dtoh(slice).map_err(|e| backend("copying from the GPU", e))
    }

    fn new_id(&self) -> Result<[u8; 128], CommError> {
        let bytes = NcclId::new()?.to_bytes();
        Ok(bytes.try_into().expect("128 bytes"))
    }

    fn join(&self, id: &[u8; 128], rank: usize, size: usize, info: OpInfo) -> Result<Box<dyn Transport>, CommError> {
        Ok(Box::new(Self::init(&NcclId::from_bytes(id)?, rank, size, info, &self.options)?))
    }
}

impl CudaTransport {
    fn wrap(&self, s: CudaSlice<u8>, len: usize) -> Buf {
        let ptr = s.device_ptr(&self.stream).0;
        Buf { ptr, len, keep: Box::new(s) }
    }
}
