//! An NCCL emulator on CPU threads, for testing [`NcclComm`]'s own logic (staging, layouts,
//! headers, groups, the p2p protocol) with several ranks where no GPU (or only one) exists.
//!
//! Semantics follow NCCL: collectives of a communicator meet in call order and must agree on the
//! operation and sizes; point-to-point messages of a pair match in posting order, a group posts
//! all its sends first and completes when every send was received and every receive filled; a
//! receive of another size than the matching send never completes (NCCL would hang: here the
//! wait times out). "Device pointers" are `(buffer id << 32) | offset` into the rank's memory.
//! Not emulated: device-pointer tensors (`CollectiveBackend` for CUDA), streams, the watchdog.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use burn::tensor::{DType, TensorData};

use super::transport::{Buf, Flat, OpInfo, Transport};
use super::{NcclComm, NcclOptions, RawP2p};
use crate::comm::host::{reduce_all, split_along};
use crate::comm::Comm;
use crate::error::CommError;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One rank's memory: buffers by id.
#[derive(Default)]
struct Memory {
    bufs: Mutex<HashMap<u64, Vec<u8>>>,
    next: AtomicU64,
}

impl Memory {
    fn read(&self, ptr: u64, len: usize) -> Vec<u8> {
        let (id, off) = (ptr >> 32, (ptr & 0xffff_ffff) as usize);
        lock(&self.bufs).get(&id).expect("emulated pointer to a live buffer")[off..off + len].to_vec()
    }

    fn write(&self, ptr: u64, bytes: &[u8]) {
        let (id, off) = (ptr >> 32, (ptr & 0xffff_ffff) as usize);
        lock(&self.bufs).get_mut(&id).expect("emulated pointer to a live buffer")[off..off + bytes.len()].copy_from_slice(bytes);
    }
}

/// Frees an emulated buffer when its [`Buf`] drops.
struct Free(Arc<Memory>, u64);

impl Drop for Free {
    fn drop(&mut self) {
        lock(&self.0.bufs).remove(&self.1);
    }
}

/// One collective in progress: each rank's (description, send bytes).
type Round = Vec<Option<(String, Vec<u8>)>>;

/// The shared state of one emulated communicator.
struct Group {
    size: usize,
    joined: Mutex<usize>,
    joined_cv: Condvar,
    state: Mutex<GroupState>,
    cv: Condvar,
}

/// A posted message: (id, bytes).
type Message = (u64, Vec<u8>);

#[derive(Default)]
struct GroupState {
    rounds: HashMap<u64, (Round, usize)>,
    /// (src, dst) -> messages (id, bytes) in posting order.
    queues: HashMap<(usize, usize), VecDeque<Message>>,
    received: std::collections::HashSet<u64>,
    next_msg: u64,
}

/// Communicators by unique id (emulated `ncclCommInitRank`).
fn registry() -> &'static Mutex<HashMap<[u8; 128], Arc<Group>>> {
    static R: std::sync::OnceLock<Mutex<HashMap<[u8; 128], Arc<Group>>>> = std::sync::OnceLock::new();
    R.get_or_init(Default::default)
}

struct EmuTransport {
    /// Set by a timeout or [`Transport::poison`]: like an aborted NCCL communicator, it refuses
    /// every later operation.
    aborted: std::sync::atomic::AtomicBool,
    group: Arc<Group>,
    rank: usize,
    seq: AtomicU64,
    mem: Arc<Memory>,
    timeout: Duration,
    info: OpInfo,
}

fn fresh_id() -> [u8; 128] {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let mut id = [0u8; 128];
    id[..8].copy_from_slice(&NEXT.fetch_add(1, Ordering::SeqCst).to_le_bytes());
    id[8..12].copy_from_slice(&std::process::id().to_le_bytes());
    id
}

impl EmuTransport {
    fn join(id: [u8; 128], rank: usize, size: usize, mem: Arc<Memory>, timeout: Duration, info: OpInfo) -> Result<Self, CommError> {
        let group = lock(registry())
            .entry(id)
            .or_insert_with(|| Arc::new(Group { size, joined: Mutex::new(0), joined_cv: Condvar::new(), state: Mutex::default(), cv: Condvar::new() }))
            .clone();
        let start = Instant::now();
        let mut joined = lock(&group.joined);
        *joined += 1;
        group.joined_cv.notify_all();
        while *joined < size {
            if start.elapsed() >= timeout {
                return Err(info.timeout("emulated ncclCommInitRank", start.elapsed()));
            }
            joined = group.joined_cv.wait_timeout(joined, Duration::from_millis(10)).unwrap_or_else(|e| e.into_inner()).0;
        }
        drop(joined);
        Ok(Self { aborted: Default::default(), group, rank, seq: AtomicU64::new(0), mem, timeout, info })
    }

    /// Waits on the group state until `ready` gives a value (or the timeout).
    fn wait<T>(&self, name: &str, mut ready: impl FnMut(&mut GroupState) -> Option<T>) -> Result<T, CommError> {
        let start = Instant::now();
        let mut st = lock(&self.group.state);
        loop {
            if let Some(v) = ready(&mut st) {
                self.group.cv.notify_all();
                return Ok(v);
            }
            if start.elapsed() >= self.timeout {
                self.aborted.store(true, Ordering::SeqCst);
                return Err(self.info.timeout(name, start.elapsed()));
            }
            st = self.group.cv.wait_timeout(st, Duration::from_millis(5)).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// Deposits this rank's part of the next collective and returns every rank's parts.
    fn collective(&self, name: &str, what: String, bytes: Vec<u8>) -> Result<Vec<Vec<u8>>, CommError> {
        let seq = self.seq.fetch_add(1, Ordering::SeqCst);
        {
            let mut st = lock(&self.group.state);
            let round = st.rounds.entry(seq).or_insert_with(|| (vec![None; self.group.size], 0));
            round.0[self.rank] = Some((what.clone(), bytes));
            self.group.cv.notify_all();
        }
        let parts = self.wait(name, |st| {
            let round = &st.rounds.get(&seq)?.0;
            round.iter().all(|p| p.is_some()).then(|| round.iter().map(|p| p.clone().expect("all arrived")).collect::<Vec<_>>())
        })?;
        if let Some((other, _)) = parts.iter().find(|(w, _)| *w != what) {
            return Err(CommError::Backend(format!("{name}: ranks disagree ({what} vs {other}): NCCL would hang or corrupt")));
        }
        let mut st = lock(&self.group.state);
        let round = st.rounds.get_mut(&seq).expect("round");
        round.1 += 1;
        if round.1 == self.group.size {
            st.rounds.remove(&seq);
        }
        Ok(parts.into_iter().map(|(_, b)| b).collect())
    }

    fn p2p(&self, name: &str, sends: &[RawP2p], recvs: &[RawP2p]) -> Result<(), CommError> {
        let mut ids = Vec::new();
        {
            let mut st = lock(&self.group.state);
            for o in sends {
                let id = st.next_msg;
                st.next_msg += 1;
                let bytes = self.mem.read(o.ptr, o.count * o.dtype.size());
                st.queues.entry((self.rank, o.peer)).or_default().push_back((id, bytes));
                ids.push(id);
            }
            self.group.cv.notify_all();
        }
        // The group's receives are posted together (NCCL progresses them independently): each
        // takes its peer's next message as soon as it is there, in order per peer only. A size
        // mismatch leaves the message queued (NCCL would hang): the wait times out.
        // (Each message lands in memory as it is taken: a caller that times out on a later one
        // can still read the earlier, e.g. a header.)
        let mut done = vec![false; recvs.len()];
        while done.contains(&false) {
            self.wait(name, |st| {
                let mut progress = false;
                for (i, o) in recvs.iter().enumerate() {
                    if done[i] || (0..i).any(|j| !done[j] && recvs[j].peer == o.peer) {
                        continue;
                    }
                    let Some(q) = st.queues.get_mut(&(o.peer, self.rank)) else { continue };
                    if q.front().is_none_or(|(_, b)| b.len() != o.count * o.dtype.size()) {
                        continue;
                    }
                    let (id, bytes) = q.pop_front().expect("front");
                    st.received.insert(id);
                    self.mem.write(o.ptr, &bytes);
                    done[i] = true;
                    progress = true;
                }
                progress.then_some(())
            })?;
        }
        for id in ids {
            self.wait(name, |st| st.received.remove(&id).then_some(()))?;
        }
        Ok(())
    }
}

/// `count` elements of `dtype` from raw bytes, as host data of shape `[count]`.
fn flat(bytes: Vec<u8>, count: usize, dtype: DType) -> TensorData {
    TensorData::from_bytes_vec(bytes, [count], dtype)
}

impl Transport for EmuTransport {
    fn run(&self, name: &str, op: Flat<'_>) -> Result<(), CommError> {
        if self.aborted.load(Ordering::SeqCst) {
            return Err(CommError::Backend(format!("{name} on {}: the communicator was aborted after an earlier failure", self.info.label)));
        }
        let bad = |d: String| CommError::Backend(format!("{name}: {d}"));
        let n = self.group.size;
        match op {
            Flat::AllReduce { send, recv, count, dtype, op } => {
                let parts = self.collective(name, format!("all_reduce {op:?} {count} {dtype:?}"), self.mem.read(send, count * dtype.size()))?;
                let parts: Vec<TensorData> = parts.into_iter().map(|b| flat(b, count, dtype)).collect();
                let out = reduce_all(&parts.iter().collect::<Vec<_>>(), op).map_err(bad)?;
                self.mem.write(recv, out.as_bytes());
            }
            Flat::AllGather { send, recv, count, dtype } => {
                let parts = self.collective(name, format!("all_gather {count} {dtype:?}"), self.mem.read(send, count * dtype.size()))?;
                self.mem.write(recv, &parts.concat());
            }
            Flat::ReduceScatter { send, recv, count, dtype, op } => {
                let parts = self.collective(name, format!("reduce_scatter {op:?} {count} {dtype:?}"), self.mem.read(send, n * count * dtype.size()))?;
                let parts: Vec<TensorData> = parts.into_iter().map(|b| flat(b, n * count, dtype)).collect();
                let sum = reduce_all(&parts.iter().collect::<Vec<_>>(), op).map_err(bad)?;
                self.mem.write(recv, split_along(&sum, 0, n, self.rank).map_err(bad)?.as_bytes());
            }
            Flat::Broadcast { send, recv, count, dtype, root } => {
                let mine = if self.rank == root { self.mem.read(send, count * dtype.size()) } else { Vec::new() };
                let parts = self.collective(name, format!("broadcast {root} {count} {dtype:?}"), mine)?;
                self.mem.write(recv, &parts[root]);
            }
            Flat::P2p { sends, recvs } => self.p2p(name, sends, recvs)?,
        }
        Ok(())
    }

    fn alloc(&self, bytes: usize) -> Result<Buf, CommError> {
        let id = self.mem.next.fetch_add(1, Ordering::SeqCst) + 1;
        lock(&self.mem.bufs).insert(id, vec![0; bytes]);
        Ok(Buf { ptr: id << 32, len: bytes, keep: Box::new(Free(self.mem.clone(), id)) })
    }

    fn upload(&self, bytes: &[u8]) -> Result<Buf, CommError> {
        let b = self.alloc(bytes.len())?;
        self.mem.write(b.ptr, bytes);
        Ok(b)
    }

    fn download(&self, buf: &Buf) -> Result<Vec<u8>, CommError> {
        Ok(self.mem.read(buf.ptr, buf.len))
    }

    fn new_id(&self) -> Result<[u8; 128], CommError> {
        Ok(fresh_id())
    }

    fn poison(&self) {
        self.aborted.store(true, Ordering::SeqCst);
    }

    fn join(&self, id: &[u8; 128], rank: usize, size: usize, info: OpInfo) -> Result<Box<dyn Transport>, CommError> {
        Ok(Box::new(EmuTransport::join(*id, rank, size, self.mem.clone(), self.timeout, info)?))
    }
}

impl NcclComm {
    /// A world of `size` emulated NCCL ranks (one communicator per rank; hand each to its own
    /// thread). For tests: see the module docs.
    pub fn emulated_world(size: usize, timeout: Duration) -> Vec<Comm> {
        let id = fresh_id();
        let label = format!("world[0..{size}]");
        let handles: Vec<_> = (0..size)
            .map(|rank| {
                let label = label.clone();
                std::thread::spawn(move || {
                    let info = OpInfo::new(&label, &(0..size).collect::<Vec<_>>(), rank);
                    let t = EmuTransport::join(id, rank, size, Arc::new(Memory::default()), timeout, info).expect("emulated init");
                    let options = NcclOptions { device: 0, timeout };
                    Arc::new(NcclComm::with_transport(Box::new(t), rank, (0..size).collect(), label, options)) as Comm
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("emulated init thread")).collect()
    }
}
