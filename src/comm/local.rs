//! The local backend: N ranks as threads of one process, for any Burn backend.
//!
//! Collectives meet in numbered *rounds*: the k-th collective a rank issues on a group joins round
//! k of that group, deposits its contribution, and waits until every member has deposited. Each
//! rank then computes the result from all contributions in group order (so results are identical
//! on every rank). Waiting never hangs: it fails after the world's timeout naming the ranks that
//! never arrived, as soon as a missing rank is known to have failed or exited, or at once when two
//! ranks issue different collectives in the same round.
//!
//! Point-to-point has two modes ([`P2pMode`]): **buffered** (default; a send never blocks, a
//! receive takes the next tensor its peer sent under the same tag) and **rendezvous**, NCCL's
//! rules: messages of a pair match in order (a tag that differs from the receiver's is a
//! mismatch error, as NCCL would silently mix them up), and a send — alone or in a
//! [`batch_p2p`](Communicator::batch_p2p) — completes only once its receiver took it. Running the
//! pipeline tests in rendezvous mode proves the executor cannot hang on NCCL. Either way a
//! receive checks the shape and dtype.

use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use burn::tensor::TensorData;

use super::host::{concat_along, reduce_all, same_shapes, split_along};
use super::{Comm, Communicator, RecvOp, ReduceOp, SendOp, TensorSpec};
use crate::error::CommError;

const POLL: Duration = Duration::from_millis(20);

/// The smallest collective (its largest contribution, bytes) that ends on all ranks together
/// while memory is tracked (`LocalComm::complete`): gradient buckets do, activations of small
/// models do not.
pub const COMPLETE_BYTES: usize = 1 << 20;

/// Options of a [`LocalWorld`].
#[derive(Debug, Clone)]
pub struct LocalWorldOptions {
    /// How long any blocking operation waits before failing (default 300 s).
    pub timeout: Duration,
    /// Point-to-point semantics (default buffered).
    pub p2p: P2pMode,
}

impl Default for LocalWorldOptions {
    fn default() -> Self {
        Self { timeout: Duration::from_secs(300), p2p: P2pMode::Buffered }
    }
}

/// Point-to-point semantics of a [`LocalWorld`] (module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum P2pMode {
    /// Sends never block; receives match by tag.
    #[default]
    Buffered,
    /// NCCL's rules: in-order matching per pair, sends complete when received.
    Rendezvous,
}

/// One message in flight.
#[derive(Debug)]
struct Letter {
    id: u64,
    tag: u64,
    data: TensorData,
}

/// Mailboxes keyed by (group label, src, dst, tag — `None` in rendezvous mode), and the ids of
/// letters already taken.
#[derive(Debug, Default)]
struct Mailroom {
    boxes: HashMap<(String, usize, usize, Option<u64>), VecDeque<Letter>>,
    taken: std::collections::HashSet<u64>,
    next_id: u64,
}

#[derive(Debug, Clone)]
enum RankStatus {
    Running,
    Exited,
    Failed(String),
}

/// A sub-group's name and member ranks.
type GroupKey = (String, Vec<usize>);

#[derive(Debug)]
struct WorldShared {
    size: usize,
    timeout: Duration,
    p2p: P2pMode,
    status: Mutex<Vec<RankStatus>>,
    /// Sub-groups by (name, member ranks).
    groups: Mutex<HashMap<GroupKey, Arc<GroupState>>>,
    mail: Mutex<Mailroom>,
    mail_cv: Condvar,
}

impl WorldShared {
    /// Why a global rank can no longer take part, if it cannot.
    fn gone(&self, rank: usize) -> Option<String> {
        match &lock(&self.status)[rank] {
            RankStatus::Running => None,
            RankStatus::Exited => Some("it exited".into()),
            RankStatus::Failed(why) => Some(why.clone()),
        }
    }

    fn group(self: &Arc<Self>, name: &str, members: Vec<usize>) -> Arc<GroupState> {
        let label = format!("{name}[{}]", members.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(","));
        let mut groups = lock(&self.groups);
        groups
            .entry((name.to_string(), members.clone()))
            .or_insert_with(|| {
                Arc::new(GroupState {
                    label,
                    seqs: members.iter().map(|_| AtomicU64::new(0)).collect(),
                    members,
                    rounds: Mutex::new(HashMap::new()),
                    cv: Condvar::new(),
                })
            })
            .clone()
    }
}

#[derive(Debug)]
struct Round {
    ops: Vec<Option<String>>,
    data: Vec<Option<Arc<TensorData>>>,
    taken: usize,
    /// Set when a member gave up on this round (error): late arrivals fail instead of using it.
    failed: Option<(usize, String)>,
}

#[derive(Debug)]
struct GroupState {
    label: String,
    members: Vec<usize>,
    seqs: Vec<AtomicU64>,
    rounds: Mutex<HashMap<u64, Round>>,
    cv: Condvar,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A rank that panicked while holding a lock leaves plain data behind: keep going.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A world of ranks living in one process. Hand [`communicator`](Self::communicator)`(r)` to the
/// thread playing rank `r`; see [`run_world`](crate::world::run_world) for the usual driver.
#[derive(Debug, Clone)]
pub struct LocalWorld {
    shared: Arc<WorldShared>,
}

impl LocalWorld {
    /// A world of `size` ranks with default options.
    pub fn new(size: usize) -> Self {
        Self::with_options(size, LocalWorldOptions::default())
    }

    /// A world of `size` ranks.
    pub fn with_options(size: usize, options: LocalWorldOptions) -> Self {
        assert!(size > 0, "a world needs at least one rank");
        Self {
            shared: Arc::new(WorldShared {
                size,
                timeout: options.timeout,
                p2p: options.p2p,
                status: Mutex::new(vec![RankStatus::Running; size]),
                groups: Mutex::new(HashMap::new()),
                mail: Mutex::new(Mailroom::default()),
                mail_cv: Condvar::new(),
            }),
        }
    }

    /// Number of ranks.
    pub fn size(&self) -> usize {
        self.shared.size
    }

    /// The world communicator of `rank`.
    pub fn communicator(&self, rank: usize) -> Comm {
        assert!(rank < self.shared.size, "rank {rank} outside a world of {}", self.shared.size);
        let group = self.shared.group("world", (0..self.shared.size).collect());
        Arc::new(LocalComm { world: self.shared.clone(), group, rank })
    }

    /// Records that `rank` returned normally: peers waiting for it fail instead of timing out.
    pub fn mark_exited(&self, rank: usize) {
        lock(&self.shared.status)[rank] = RankStatus::Exited;
        self.shared.mail_cv.notify_all();
    }

    /// Records that `rank` failed: peers waiting for it fail with `reason`.
    pub fn mark_failed(&self, rank: usize, reason: impl Into<String>) {
        lock(&self.shared.status)[rank] = RankStatus::Failed(reason.into());
        self.shared.mail_cv.notify_all();
    }
}

/// One rank's handle on one group of a [`LocalWorld`].
#[derive(Debug)]
pub struct LocalComm {
    world: Arc<WorldShared>,
    group: Arc<GroupState>,
    rank: usize,
}

type Parts = Vec<Option<Arc<TensorData>>>;

impl LocalComm {
    fn bad(&self, op: &str, detail: String) -> CommError {
        CommError::BadInput { group: self.group.label.clone(), op: op.into(), detail }
    }

    /// Joins the next round of this group with `op` and `payload`; returns every contribution.
    /// A rank that fails a round marks it failed, so members arriving later fail too instead of
    /// completing it with a contribution its owner gave up on.
    fn exchange(&self, op: &str, payload: Option<TensorData>) -> Result<Parts, CommError> {
        let g = &self.group;
        let seq = g.seqs[self.rank].fetch_add(1, Ordering::SeqCst);
        let size = g.members.len();
        let me = g.members[self.rank];
        let start = Instant::now();
        let mut rounds = lock(&g.rounds);
        {
            let round = rounds.entry(seq).or_insert_with(|| Round { ops: vec![None; size], data: vec![None; size], taken: 0, failed: None });
            round.ops[self.rank] = Some(op.to_string());
            round.data[self.rank] = payload.map(Arc::new);
        }
        g.cv.notify_all();
        let (mut rounds, result) = self.wait_round(rounds, seq, op, start);
        match &result {
            Ok(_) => {
                let round = rounds.get_mut(&seq).expect("round present");
                round.taken += 1;
                if round.taken == size {
                    rounds.remove(&seq);
                }
            }
            Err(e) => {
                if let Some(round) = rounds.get_mut(&seq) {
                    round.failed.get_or_insert((me, e.to_string()));
                }
                g.cv.notify_all();
            }
        }
        result
    }

    /// Waits until every member joined round `seq` (or it cannot complete).
    fn wait_round<'a>(
        &self,
        mut rounds: MutexGuard<'a, HashMap<u64, Round>>,
        seq: u64,
        op: &str,
        start: Instant,
    ) -> (MutexGuard<'a, HashMap<u64, Round>>, Result<Parts, CommError>) {
        let g = &self.group;
        let me = g.members[self.rank];
        let name = || format!("{op} #{seq}");
        loop {
            let round = rounds.get(&seq).expect("round removed before every rank took it");
            if let Some((peer, reason)) = round.failed.clone() {
                let reason = format!("it abandoned this collective: {reason}");
                return (rounds, Err(CommError::PeerGone { op: name(), group: g.label.clone(), rank: me, peer, reason }));
            }
            if let Some((i, other)) = round.ops.iter().enumerate().find_map(|(i, o)| o.as_ref().filter(|o| *o != op).map(|o| (i, o))) {
                let err = CommError::Mismatch { group: g.label.clone(), rank: me, op: name(), other_rank: g.members[i], other_op: format!("{other} #{seq}") };
                return (rounds, Err(err));
            }
            let missing: Vec<usize> = (0..g.members.len()).filter(|&i| round.ops[i].is_none()).map(|i| g.members[i]).collect();
            if missing.is_empty() {
                let parts = round.data.clone();
                return (rounds, Ok(parts));
            }
            if let Some((peer, reason)) = missing.iter().find_map(|&r| self.world.gone(r).map(|w| (r, w))) {
                return (rounds, Err(CommError::PeerGone { op: name(), group: g.label.clone(), rank: me, peer, reason }));
            }
            let waited = start.elapsed();
            if waited >= self.world.timeout {
                return (rounds, Err(CommError::Timeout { op: name(), group: g.label.clone(), rank: me, missing, waited }));
            }
            rounds = g.cv.wait_timeout(rounds, POLL.min(self.world.timeout - waited)).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// Ends a collective as NCCL's does, on every rank together, where it matters: with the
    /// memory tracker installed and a contribution of at least [`COMPLETE_BYTES`], the ranks
    /// drop the shared contributions (`parts`) and meet once more before any returns, so no
    /// rank goes on while a slower peer still reads its buffer (held, and counted, on that rank:
    /// a thread-world artifact that NCCL's send buffers do not have; at dp 4 it put a gradient
    /// bucket on some ranks' peaks). Smaller collectives skip the meeting (one more lock and
    /// wake-up of every rank, where the example's thread ranks make dozens of activation
    /// all-reduces per step): what may linger is under `COMPLETE_BYTES` per rank. Results are
    /// the same either way. Every rank decides from the same parts and computes `out` from
    /// them, so all meet or none do.
    fn complete<T>(&self, op: &str, parts: Vec<Arc<TensorData>>, out: Result<T, CommError>) -> Result<T, CommError> {
        let largest = parts.iter().map(|p| p.as_bytes().len()).max().unwrap_or(0);
        drop(parts);
        if out.is_ok() && largest >= COMPLETE_BYTES && crate::memory::installed() {
            self.exchange(&format!("{op} completing"), None)?;
        }
        out
    }

    fn all_parts(&self, op: &str, data: TensorData) -> Result<Vec<Arc<TensorData>>, CommError> {
        let parts = self.exchange(op, Some(data))?;
        Ok(parts.into_iter().map(|p| p.expect("every rank contributed")).collect())
    }

    fn mailbox(&self, src: usize, dst: usize, tag: u64) -> (String, usize, usize, Option<u64>) {
        let tag = (self.world.p2p == P2pMode::Buffered).then_some(tag);
        (self.group.label.clone(), src, dst, tag)
    }

    /// Puts a letter in `dst`'s mailbox; returns its id.
    fn post(&self, data: TensorData, dst: usize, tag: u64) -> u64 {
        let mut mail = lock(&self.world.mail);
        let id = mail.next_id;
        mail.next_id += 1;
        let key = self.mailbox(self.global_rank(), dst, tag);
        mail.boxes.entry(key).or_default().push_back(Letter { id, tag, data });
        id
    }

    /// Rendezvous mode: waits until the receiver took letter `id`.
    fn wait_taken(&self, id: u64, dst: usize, tag: u64) -> Result<(), CommError> {
        let op = format!("send(to={dst}, tag={tag}) waiting to be received");
        self.wait_mail(&op, dst, |mail| mail.taken.remove(&id).then_some(()))
    }

    /// Polls `ready` under the mail lock until it returns a value, `peer` is gone, or the timeout.
    fn wait_mail<T>(&self, op: &str, peer: usize, mut ready: impl FnMut(&mut Mailroom) -> Option<T>) -> Result<T, CommError> {
        let me = self.global_rank();
        let start = Instant::now();
        let mut mail = lock(&self.world.mail);
        loop {
            if let Some(v) = ready(&mut mail) {
                return Ok(v);
            }
            let group = self.group.label.clone();
            if let Some(reason) = self.world.gone(peer) {
                return Err(CommError::PeerGone { op: op.into(), group, rank: me, peer, reason });
            }
            let waited = start.elapsed();
            if waited >= self.world.timeout {
                return Err(CommError::Timeout { op: op.into(), group, rank: me, missing: vec![peer], waited });
            }
            mail = self.world.mail_cv.wait_timeout(mail, POLL.min(self.world.timeout - waited)).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    fn peer_global(&self, peer: usize, op: &str) -> Result<usize, CommError> {
        self.group.members.get(peer).copied().ok_or_else(|| self.bad(op, format!("peer {peer} outside a group of {}", self.group.members.len())))
    }
}

mod mailbox;

impl Communicator for LocalComm {
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

    fn all_reduce(&self, data: TensorData, op: ReduceOp) -> Result<TensorData, CommError> {
        let name = format!("all_reduce({op:?})");
        let parts = self.all_parts(&name, data)?;
        let refs: Vec<&TensorData> = parts.iter().map(|p| p.as_ref()).collect();
        let out = reduce_all(&refs, op).map_err(|d| self.bad(&name, d));
        self.complete(&name, parts, out)
    }

    fn all_gather(&self, data: TensorData, dim: usize) -> Result<TensorData, CommError> {
        let name = format!("all_gather(dim={dim})");
        let parts = self.all_parts(&name, data)?;
        let refs: Vec<&TensorData> = parts.iter().map(|p| p.as_ref()).collect();
        // NCCL gathers equal counts: uneven parts, which concatenation alone would accept here,
        // must fail on thread ranks too.
        let out = same_shapes(&refs).and_then(|()| concat_along(&refs, dim)).map_err(|d| self.bad(&name, d));
        self.complete(&name, parts, out)
    }

    fn reduce_scatter(&self, data: TensorData, dim: usize, op: ReduceOp) -> Result<TensorData, CommError> {
        let name = format!("reduce_scatter({op:?}, dim={dim})");
        let parts = self.all_parts(&name, data)?;
        let refs: Vec<&TensorData> = parts.iter().map(|p| p.as_ref()).collect();
        let out = reduce_all(&refs, op).and_then(|full| split_along(&full, dim, self.size(), self.rank)).map_err(|d| self.bad(&name, d));
        self.complete(&name, parts, out)
    }

    fn broadcast(&self, data: Option<TensorData>, root: usize) -> Result<TensorData, CommError> {
        let name = format!("broadcast(root={root})");
        self.peer_global(root, &name)?;
        let payload = if self.rank == root { data } else { None };
        let parts = self.exchange(&name, payload)?;
        let out = parts[root].as_ref().map(|d| d.as_ref().clone()).ok_or_else(|| self.bad(&name, format!("root {root} passed no tensor")));
        self.complete(&name, parts.into_iter().flatten().collect(), out)
    }

    fn send(&self, data: TensorData, peer: usize, tag: u64) -> Result<(), CommError> {
        self.batch_p2p(vec![SendOp { data, peer, tag }], &[]).map(|_| ())
    }

    fn recv(&self, peer: usize, tag: u64, expect: &TensorSpec) -> Result<TensorData, CommError> {
        let mut got = self.batch_p2p(Vec::new(), &[RecvOp { peer, tag, spec: expect.clone() }])?;
        Ok(got.remove(0))
    }

    fn batch_p2p(&self, sends: Vec<SendOp>, recvs: &[RecvOp]) -> Result<Vec<TensorData>, CommError> {
        let mut ids = Vec::with_capacity(sends.len());
        for s in sends {
            let dst = self.peer_global(s.peer, "send")?;
            ids.push((self.post(s.data, dst, s.tag), dst, s.tag));
        }
        self.world.mail_cv.notify_all();
        // A message arrives in the sender's buffer: held here, counted here.
        let received: Vec<TensorData> = self.take_all(recvs)?.into_iter().map(crate::memory::adopt).collect();
        if self.world.p2p == P2pMode::Rendezvous {
            for (id, dst, tag) in ids {
                self.wait_taken(id, dst, tag)?;
            }
        }
        Ok(received)
    }

    fn barrier(&self) -> Result<(), CommError> {
        self.exchange("barrier", None).map(|_| ())
    }

    fn new_group(&self, name: &str, global_ranks: &[usize]) -> Result<Comm, CommError> {
        let rank = super::new_group_rank(name, global_ranks, &self.group.members, &self.group.label, self.global_rank())?;
        let group = self.world.group(name, global_ranks.to_vec());
        Ok(Arc::new(LocalComm { world: self.world.clone(), group, rank }))
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
