//! The TCP communicator: one process per rank on CPUs, started by `burn-parallel launch` (or
//! torchrun/Slurm) — torch.distributed's gloo role, where [`NcclComm`](crate::NcclComm) is NCCL's.
//!
//! [`TcpComm::from_env`] joins the job's [`rendezvous`](crate::launch::rendezvous) and connects
//! every pair of ranks (a full mesh, [`mesh`]). Each connection has a reader thread that files
//! incoming frames ([`wire`]) by (sender, group, collective number or tag); operations write their
//! frames and wait for the ones they need.
//!
//! # Collectives: the thread world's results, bit for bit
//! Members reduce what they received in group order with the same host functions as
//! [`LocalWorld`](crate::LocalWorld): results are identical on every rank and to a thread
//! world's (so a job's losses do not depend on whether its ranks are threads or processes).
//! Reduce-scatter sends each member its slice; a large all-reduce (≥ 256 KiB, > 2 members) is a
//! reduce-scatter of the flat elements and an all-gather of the reduced runs (`2 (n − 1)/n ×` the
//! tensor per rank, as a ring), a small one one exchange of whole tensors; all-gather and
//! broadcast send the whole tensor to every member. Direct connections,
//! no pipelining: meant for CPU jobs and tests, not to compete with NCCL.
//!
//! # Point-to-point
//! Buffered, as gloo: a send returns once its bytes are written; a receive takes the next tensor
//! its peer sent under the same tag on the same group and checks its shape and dtype.
//!
//! # Never a silent hang
//! A rank whose process exits or is killed closes its connections: a peer waiting for it fails
//! at once with [`CommError::PeerGone`] naming it (frames it sent before are still delivered).
//! A rank that fails an operation sends every peer an abort frame with its error (and
//! [`TcpComm::abort`] does so for any other error, e.g. the example's on every failing rank):
//! peers waiting for it fail naming it and that error, and a collective it gave up on is not
//! completed with its frame (once the abort has arrived: nothing waits for an acknowledgement).
//! A rank that is alive but never arrives fails the waiter after the job's timeout
//! ([`CommError::Timeout`], naming the ranks whose frames are missing); a write that cannot
//! proceed for that long (a stopped process) fails likewise. Ranks calling different collectives
//! at the same point fail with [`CommError::Mismatch`]; a tensor a frame cannot carry (bool,
//! more than 255 dimensions) with [`CommError::BadInput`].
//!
//! Each rank holds two descriptors per peer (a writer and its reader's clone): a world of 64
//! needs ~130 per process, a [`loopback_world`](TcpComm::loopback_world) of `n` ranks in one
//! process ~`2n²` (the usual 1024-descriptor limit allows about 22).

mod mesh;
#[cfg(test)]
mod tests;
mod wire;

use std::any::Any;
use std::collections::HashMap;
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use burn::tensor::TensorData;

use super::host::{concat_along, reduce_all, same_shapes, split_along};
use super::{Comm, Communicator, ReduceOp, TensorSpec};
use crate::error::CommError;
use crate::launch::JobEnv;
use wire::{Frame, Head, Inbox, Kind, WaitError};

/// One group's name, members and collective counter (shared by every handle on it).
#[derive(Debug)]
struct Group {
    label: String,
    members: Vec<usize>,
    seq: AtomicU64,
}

/// From this size on (and with more than two members) an all-reduce is a reduce-scatter and an
/// all-gather (`benches/collectives.rs`: at 4 ranks on 2 cores, 0.63× the direct exchange's time
/// at 64 MiB; below 256 KiB the second round trip costs more than the bytes it saves).
const SPLIT_ALL_REDUCE_BYTES: usize = 256 << 10;

/// How long an abort frame may wait for a peer that does not read (the rank is failing anyway).
const ABORT_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// A group's name and members.
type GroupKey = (String, Vec<usize>);

/// One process's connections.
#[derive(Debug)]
struct Shared {
    me: usize,
    timeout: Duration,
    writers: Vec<Option<Mutex<TcpStream>>>,
    inbox: Arc<Inbox>,
    groups: Mutex<HashMap<GroupKey, Arc<Group>>>,
    /// Set once this rank told every peer it failed.
    aborted: AtomicBool,
}

impl Shared {
    fn group(&self, name: &str, members: Vec<usize>) -> Arc<Group> {
        let label = format!("{name}[{}]", members.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(","));
        let mut groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
        groups.entry((name.to_string(), members.clone())).or_insert_with(|| Arc::new(Group { label, members, seq: AtomicU64::new(0) })).clone()
    }
}

impl Drop for Shared {
    /// Closes every connection (the peers' readers see the end; ours stop).
    fn drop(&mut self) {
        for w in self.writers.iter().flatten() {
            let _ = w.lock().unwrap_or_else(|e| e.into_inner()).shutdown(Shutdown::Both);
        }
    }
}

/// One rank's handle on one group of a multi-process job over TCP. See the module docs.
pub struct TcpComm {
    shared: Arc<Shared>,
    group: Arc<Group>,
    rank: usize,
}

impl std::fmt::Debug for TcpComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TcpComm({}, rank {})", self.group.label, self.rank)
    }
}

/// Files what `peer` sends until its connection ends, then records why it ended. What it
/// receives is counted as rank `me`'s memory (`crate::memory`).
fn spawn_reader(me: usize, peer: usize, stream: TcpStream, inbox: Arc<Inbox>) -> std::io::Result<()> {
    std::thread::Builder::new().name(format!("tcp-from-{peer}")).spawn(move || {
        crate::memory::set_rank(Some(me));
        let mut r = std::io::BufReader::with_capacity(1 << 16, stream);
        let why = loop {
            match wire::read_frame(&mut r) {
                Ok(Some(f)) if f.kind == Kind::Abort => inbox.mark_aborted(peer, f.group, f.key, format!("it failed: {}", f.op)),
                Ok(Some(f)) => inbox.push(peer, f),
                Ok(None) => break "its connection closed (the process exited or was killed)".to_string(),
                Err(e) => break closed_why(&e),
            }
        };
        inbox.mark_gone(peer, why);
    })?;
    Ok(())
}

/// Why a connection that failed while reading ended.
fn closed_why(e: &std::io::Error) -> String {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
    match e.kind() {
        // A process killed with unread data on its socket resets the connection.
        ConnectionReset | ConnectionAborted | BrokenPipe => "its connection was reset (the process exited or was killed)".into(),
        UnexpectedEof => "its connection closed mid-message (the process exited or was killed)".into(),
        _ => format!("its connection failed: {e}"),
    }
}

impl TcpComm {
    /// Joins the job `env` describes (rank, world size, `MASTER_ADDR:MASTER_PORT`; `env.timeout`
    /// bounds the connection and every later operation) and returns the world communicator.
    pub fn from_env(env: &JobEnv) -> Result<Comm, CommError> {
        let streams = mesh::connect_mesh(env)?;
        let inbox = Arc::new(Inbox::default());
        let io = |e: std::io::Error| CommError::Backend(format!("tcp, rank {}: {e}", env.rank));
        let readers = streams
            .iter()
            .map(|s| s.as_ref().map(|s| s.set_write_timeout(Some(env.timeout.max(Duration::from_millis(1)))).and_then(|_| s.try_clone())).transpose())
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(io)?;
        for (peer, r) in readers.into_iter().enumerate() {
            if let Some(r) = r {
                if let Err(e) = spawn_reader(env.rank, peer, r, inbox.clone()) {
                    // The readers started so far must not keep their peers' connections open.
                    streams.iter().flatten().for_each(|s| drop(s.shutdown(Shutdown::Both)));
                    return Err(io(e));
                }
            }
        }
        let writers = streams.into_iter().map(|s| s.map(Mutex::new)).collect();
        let shared =
            Arc::new(Shared { me: env.rank, timeout: env.timeout, writers, inbox, groups: Mutex::new(HashMap::new()), aborted: AtomicBool::new(false) });
        let group = shared.group("world", (0..env.world_size).collect());
        Ok(Arc::new(TcpComm { shared, group, rank: env.rank }))
    }

    /// `size` ranks of one job inside this process, each with its own connections over loopback
    /// (hand each communicator to its own thread): for tests, as `NcclComm::emulated_world`.
    pub fn loopback_world(size: usize, timeout: Duration) -> Result<Vec<Comm>, CommError> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| CommError::Backend(format!("tcp: no free loopback port: {e}")))?
            .port();
        let env = |rank| JobEnv {
            rank,
            world_size: size,
            local_rank: rank,
            local_world_size: size,
            master_addr: "127.0.0.1".into(),
            master_port: port,
            timeout,
            job_id: String::new(),
        };
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..size).map(|r| s.spawn(move || Self::from_env(&env(r)))).collect();
            handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(CommError::Backend("tcp: a connecting thread panicked".into())))).collect()
        })
    }

    fn me(&self) -> usize {
        self.shared.me
    }

    fn bad(&self, op: &str, detail: String) -> CommError {
        CommError::BadInput { group: self.group.label.clone(), op: op.into(), detail }
    }

    /// Sends one frame to global rank `dst` (to ourselves: straight into the inbox).
    fn send_frame(&self, dst: usize, head: Head<'_>, data: Option<&TensorData>, name: &str) -> Result<(), CommError> {
        if let Some(d) = data {
            wire::check_sendable(d).map_err(|why| self.bad(name, why))?;
        }
        if dst == self.me() {
            let f = Frame { kind: head.kind, group: head.group.into(), key: head.key, op: head.op.into(), data: data.cloned() };
            self.shared.inbox.push(dst, f);
            return Ok(());
        }
        let w = self.shared.writers[dst].as_ref().expect("a connection to every other rank");
        let mut stream = w.lock().unwrap_or_else(|e| e.into_inner());
        let Err(e) = wire::write_frame(&mut *stream, head, data) else { return Ok(()) };
        let (group, rank) = (self.group.label.clone(), self.me());
        let stalled = matches!(e.kind(), std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock);
        if stalled {
            // Before the shutdown, whose end our reader would take for the peer's death.
            let why = format!("it stopped reading: rank {rank} could not send to it for {:?} (a stopped or hung process?)", self.shared.timeout);
            self.shared.inbox.mark_gone(dst, why);
        }
        // A frame cut short leaves the stream out of step: nothing more goes over it.
        let _ = stream.shutdown(Shutdown::Both);
        drop(stream);
        if stalled {
            return Err(CommError::Timeout { op: format!("{name} (sending)"), group, rank, missing: vec![dst], waited: self.shared.timeout });
        }
        let reason = self.shared.inbox.gone_reason(dst, Duration::from_millis(500)).unwrap_or_else(|| format!("sending to it failed: {e}"));
        Err(CommError::PeerGone { op: name.into(), group, rank, peer: dst, reason })
    }

    /// Tells every peer (once, best effort, a few seconds each at most) that this rank failed
    /// with `e` and gave up on collective `seq` of this group (if any), so none of them waits
    /// for it or completes that collective (they fail naming it and `e`, as a thread world's
    /// peers do); returns `e`.
    fn fail(&self, e: CommError, seq: Option<u64>) -> CommError {
        self.announce(&e.to_string(), seq);
        e
    }

    fn announce(&self, text: &str, seq: Option<u64>) {
        if self.shared.aborted.swap(true, Ordering::SeqCst) {
            return;
        }
        let head = Head { kind: Kind::Abort, group: &self.group.label, key: seq.unwrap_or(wire::NO_COLLECTIVE), op: text };
        let tell = |stream: &mut TcpStream| {
            let _ = stream.set_write_timeout(Some(ABORT_WRITE_TIMEOUT.min(self.shared.timeout.max(Duration::from_millis(1)))));
            if wire::write_frame(&mut *stream, head, None).is_err() {
                // Half a frame must not be read as the next one.
                let _ = stream.shutdown(Shutdown::Both);
            }
            let _ = stream.set_write_timeout(Some(self.shared.timeout.max(Duration::from_millis(1))));
        };
        // First the peers whose connection is free (another thread may be blocked writing to a
        // stopped peer), then the others.
        let mut busy = Vec::new();
        for w in self.shared.writers.iter().flatten() {
            match w.try_lock() {
                Ok(mut stream) => tell(&mut stream),
                Err(std::sync::TryLockError::Poisoned(p)) => tell(&mut p.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) => busy.push(w),
            }
        }
        for w in busy {
            tell(&mut w.lock().unwrap_or_else(|e| e.into_inner()));
        }
    }

    /// Tells every other rank that this one failed (`reason`), so that none waits for it: their
    /// waits fail naming this rank and `reason` instead of "its connection closed". Call it
    /// before a rank exits with an error that is not a communication error (a checkpoint write,
    /// bad data); communication errors announce themselves. Once per communicator world.
    pub fn abort(&self, reason: &str) {
        self.announce(reason, None);
    }

    /// Takes frames for `slots`, mapping a failed wait to the error naming who is missing. For
    /// collective `(op, seq)` a peer's frame of another operation is a mismatch, even where a
    /// peer abandoned it.
    fn take(&self, slots: &[wire::Slot], name: &str, collective: Option<(&str, u64)>) -> Result<Vec<Frame>, CommError> {
        let start = Instant::now();
        let (group, rank) = (self.group.label.clone(), self.me());
        self.shared.inbox.take(slots, self.shared.timeout).map_err(|e| match e {
            WaitError::Timeout(missing) => CommError::Timeout { op: name.into(), group, rank, missing, waited: start.elapsed() },
            WaitError::Gone(peer, reason) => CommError::PeerGone { op: name.into(), group, rank, peer, reason },
            WaitError::Abandoned(peer, reason, ops) => {
                let other = collective.and_then(|(op, seq)| ops.into_iter().find(|(_, o)| o != op).map(|(r, o)| (r, format!("{o} #{seq}"))));
                match other {
                    Some((other_rank, other_op)) => CommError::Mismatch { group, rank, op: name.into(), other_rank, other_op },
                    None => CommError::PeerGone { op: name.into(), group, rank, peer, reason },
                }
            }
        })
    }

    /// The group's next collective `op`: sends `out(i)` to every other member `i` and returns
    /// what each sent (by group rank; `None` at our own index and where nothing was sent).
    fn exchange<'a>(&self, op: &str, out: impl Fn(usize) -> Option<&'a TensorData>) -> Result<Vec<Option<TensorData>>, CommError> {
        let g = &self.group;
        let seq = g.seq.fetch_add(1, Ordering::SeqCst);
        let name = format!("{op} #{seq}");
        let head = Head { kind: Kind::Collective, group: &g.label, key: seq, op };
        for (i, &dst) in g.members.iter().enumerate() {
            if i != self.rank {
                self.send_frame(dst, head, out(i), &name).map_err(|e| self.fail(e, Some(seq)))?;
            }
        }
        let others: Vec<usize> = g.members.iter().copied().filter(|&r| r != self.me()).collect();
        let slots: Vec<wire::Slot> = others.iter().map(|&src| (src, Kind::Collective, g.label.clone(), seq)).collect();
        let frames = self.take(&slots, &name, Some((op, seq))).map_err(|e| self.fail(e, Some(seq)))?;
        let mut parts: Vec<Option<TensorData>> = g.members.iter().map(|_| None).collect();
        for (f, src) in frames.into_iter().zip(others) {
            if f.op != op {
                let other_op = format!("{} #{seq}", f.op);
                return Err(self.fail(CommError::Mismatch { group: g.label.clone(), rank: self.me(), op: name, other_rank: src, other_op }, Some(seq)));
            }
            parts[g.members.iter().position(|&m| m == src).expect("a member")] = f.data;
        }
        Ok(parts)
    }

    /// Every member's tensor, ours included, in group order.
    fn gather_parts(&self, op: &str, data: TensorData) -> Result<Vec<TensorData>, CommError> {
        let mut parts = self.exchange(op, |_| Some(&data))?;
        parts[self.rank] = Some(data);
        self.every(op, parts)
    }

    /// The parts of an exchange (ours filled in), each member's present.
    fn every(&self, op: &str, parts: Vec<Option<TensorData>>) -> Result<Vec<TensorData>, CommError> {
        parts.into_iter().map(|p| p.ok_or_else(|| self.bad(op, "a member sent no tensor".into()))).collect()
    }
}

impl Communicator for TcpComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.group.members.len()
    }

    fn global_ranks(&self) -> &[usize] {
        &self.group.members
    }

    fn label(&self) -> &str {
        &self.group.label
    }

    /// Small tensors and two members: every member sends its tensor to every other and reduces
    /// all of them (one round trip). Otherwise a reduce-scatter of the flat elements (member `i`
    /// reduces the `i`-th of `n` near-equal runs, in group order), then an all-gather of the
    /// reduced runs: `2 (n − 1)/n ×` the tensor sent per rank, as a ring. Either way element for
    /// element the thread world's reduction. The shape and dtype travel in the operation's name:
    /// members that disagree fail with a mismatch.
    fn all_reduce(&self, data: TensorData, op: ReduceOp) -> Result<TensorData, CommError> {
        let name = format!("all_reduce({op:?}) of {:?} {:?}", data.shape.as_slice(), data.dtype);
        let (n, count, width) = (self.size(), data.num_elements(), data.dtype.size());
        if n <= 2 || count * width < SPLIT_ALL_REDUCE_BYTES {
            let parts = self.gather_parts(&name, data)?;
            return reduce_all(&parts.iter().collect::<Vec<_>>(), op).map_err(|d| self.bad(&name, d));
        }
        let bound = |j: usize| count * j / n;
        let run = |j: usize| {
            let bytes = data.as_bytes()[bound(j) * width..bound(j + 1) * width].to_vec();
            TensorData::from_bytes_vec(bytes, [bound(j + 1) - bound(j)], data.dtype)
        };
        let mut runs: Vec<TensorData> = (0..n).map(run).collect();
        let mut parts = self.exchange(&format!("{name}: reduce"), |i| Some(&runs[i]))?;
        parts[self.rank] = Some(runs.swap_remove(self.rank));
        let parts = self.every(&name, parts)?;
        let mine = reduce_all(&parts.iter().collect::<Vec<_>>(), op).map_err(|d| self.bad(&name, d))?;
        let mut reduced = self.exchange(&format!("{name}: gather"), |_| Some(&mine))?;
        reduced[self.rank] = Some(mine);
        let mut bytes = Vec::with_capacity(count * width);
        for r in self.every(&name, reduced)? {
            bytes.extend_from_slice(r.as_bytes());
        }
        if bytes.len() != count * width {
            return Err(self.bad(&name, format!("the reduced runs hold {} bytes, not {}", bytes.len(), count * width)));
        }
        Ok(TensorData::from_bytes_vec(bytes, data.shape.clone(), data.dtype))
    }

    fn all_gather(&self, data: TensorData, dim: usize) -> Result<TensorData, CommError> {
        let name = format!("all_gather(dim={dim})");
        let parts = self.gather_parts(&name, data)?;
        let refs: Vec<&TensorData> = parts.iter().collect();
        same_shapes(&refs).map_err(|d| self.bad(&name, d))?;
        concat_along(&refs, dim).map_err(|d| self.bad(&name, d))
    }

    fn reduce_scatter(&self, data: TensorData, dim: usize, op: ReduceOp) -> Result<TensorData, CommError> {
        let name = format!("reduce_scatter({op:?}, dim={dim})");
        let n = self.size();
        // A bad input fails here, before the exchange: the peers are told (not left waiting).
        let mut pieces = (0..n).map(|j| split_along(&data, dim, n, j)).collect::<Result<Vec<_>, _>>().map_err(|d| self.fail(self.bad(&name, d), None))?;
        let mut parts = self.exchange(&name, |i| Some(&pieces[i]))?;
        parts[self.rank] = Some(pieces.swap_remove(self.rank));
        let parts = self.every(&name, parts)?;
        // Element-wise in group order: the slice of the thread world's full reduction, bit for bit.
        reduce_all(&parts.iter().collect::<Vec<_>>(), op).map_err(|d| self.bad(&name, d))
    }

    fn broadcast(&self, data: Option<TensorData>, root: usize) -> Result<TensorData, CommError> {
        let name = format!("broadcast(root={root})");
        if root >= self.size() {
            return Err(self.fail(self.bad(&name, format!("root {root} outside a group of {}", self.size())), None));
        }
        let mine = if self.rank == root { data } else { None };
        let mut parts = self.exchange(&name, |_| mine.as_ref())?;
        let got = if self.rank == root { mine } else { parts[root].take() };
        got.ok_or_else(|| self.bad(&name, format!("root {root} passed no tensor")))
    }

    fn send(&self, data: TensorData, peer: usize, tag: u64) -> Result<(), CommError> {
        let name = format!("send(to={peer}, tag={tag})");
        let dst = *self.group.members.get(peer).ok_or_else(|| self.fail(self.bad(&name, format!("peer {peer} outside a group of {}", self.size())), None))?;
        self.send_frame(dst, Head { kind: Kind::P2p, group: &self.group.label, key: tag, op: "send" }, Some(&data), &name).map_err(|e| self.fail(e, None))
    }

    fn recv(&self, peer: usize, tag: u64, expect: &TensorSpec) -> Result<TensorData, CommError> {
        let name = format!("recv(from={peer}, tag={tag}, {:?} {:?})", expect.shape, expect.dtype);
        let src = *self.group.members.get(peer).ok_or_else(|| self.fail(self.bad(&name, format!("peer {peer} outside a group of {}", self.size())), None))?;
        let frame = self.take(&[(src, Kind::P2p, self.group.label.clone(), tag)], &name, None).map_err(|e| self.fail(e, None))?.remove(0);
        let data = frame.data.ok_or_else(|| self.bad(&name, "a message without a tensor".into()))?;
        if data.shape.as_slice() != expect.shape.as_slice() || data.dtype != expect.dtype {
            return Err(self.fail(
                CommError::P2pMismatch {
                    sender: src,
                    receiver: self.me(),
                    sent_shape: data.shape.to_vec(),
                    sent_dtype: format!("{:?}", data.dtype),
                    expected_shape: expect.shape.clone(),
                    expected_dtype: format!("{:?}", expect.dtype),
                },
                None,
            ));
        }
        Ok(data)
    }

    fn barrier(&self) -> Result<(), CommError> {
        self.exchange("barrier", |_| None).map(|_| ())
    }

    fn new_group(&self, name: &str, global_ranks: &[usize]) -> Result<Comm, CommError> {
        let rank = super::new_group_rank(name, global_ranks, &self.group.members, &self.group.label, self.global_rank())?;
        let group = self.shared.group(name, global_ranks.to_vec());
        Ok(Arc::new(TcpComm { shared: self.shared.clone(), group, rank }))
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
