//! The decisions of a multi-node job's launchers, made once, by node 0's launcher: torchrun's
//! rendezvous rounds, without elasticity (the node count is fixed).
//!
//! Every node's launcher reports what its ranks did ([`Report`]); the coordinator answers every
//! node at once ([`Cmd`]):
//! - a rank failed in round `r` → `Restart { round: r + 1 }` while restarts are left, else
//!   `Exit` with the rank's code. Every node stops its ranks on `Restart` (those waiting in a
//!   collective for the dead rank need not reach their own timeout), waits until they are gone
//!   and says `Ready`; once every node is ready (and after a pause) `Go` starts the round on all
//!   nodes, so every rank sees the same `TORCHELASTIC_RESTART_COUNT`;
//! - every node's ranks exited 0 → `Exit { code: 0 }`;
//! - a stop signal on any node → `Signal` (every node passes it on to its ranks, which save and
//!   exit); never a restart after it;
//! - a node's launcher gone (its connection closed, or silent past the heartbeat timeout), or
//!   not ready within the restart timeout → `Exit { code: 1 }` naming it: a job missing a node
//!   cannot go on.
//!
//! Reports of an older round (a rank that failed while its node was being stopped) are ignored.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// A node's launcher to the coordinator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "snake_case")]
pub(super) enum Report {
    /// The first message of a joining node.
    Hello(Hello),
    /// A rank of round `round` exited with `code` (this node's ranks were stopped).
    Failed { round: usize, rank: usize, code: i32 },
    /// Every rank of this node exited 0 in round `round`.
    Done { round: usize },
    /// This node's launcher got a stop signal and passed it on to its ranks.
    Signalled { signal: i32 },
    /// This node's ranks of the last round are gone: it may start round `round`.
    Ready { round: usize },
    /// A heartbeat.
    Ping,
}

/// A joining node's launcher introducing itself: the job it belongs to and the layout it was
/// started with (every node's must agree).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct Hello {
    /// [`HELLO_MAGIC`].
    pub magic: String,
    /// [`PROTOCOL_VERSION`].
    pub version: u32,
    /// The job id (empty: none).
    pub job_id: String,
    /// The node's index.
    pub node_rank: usize,
    /// `--nnodes`.
    pub nnodes: usize,
    /// `--nproc-per-node`.
    pub nproc_per_node: usize,
    /// `--max-restarts`.
    pub max_restarts: usize,
    /// `--rdzv-timeout-secs`.
    pub rdzv_timeout_secs: f64,
    /// `--node-timeout-secs` (the heartbeats' pace: every node must use the same).
    pub node_timeout_secs: f64,
}

/// Identifies the launchers' protocol.
pub(super) const HELLO_MAGIC: &str = "burn-parallel-launch";
/// Its version.
pub(super) const PROTOCOL_VERSION: u32 = 2;

/// The coordinator to every node's launcher.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "snake_case")]
pub(super) enum Cmd {
    /// Start the ranks of round `round` (`TORCHELASTIC_RESTART_COUNT`).
    Go { round: usize },
    /// Rank `rank` (on node `node`) failed with `code`: stop the ranks, then say `Ready` for
    /// `round`.
    Restart { round: usize, rank: usize, node: usize, code: i32 },
    /// The job is over: stop the ranks and exit with `code` (`why` says why, for the log).
    Exit { code: i32, why: String },
    /// Pass `signal` on to the ranks, give them the grace period, and exit.
    Signal { signal: i32 },
    /// This node may not join (the reason).
    Rejected { why: String },
    /// A heartbeat.
    Ping,
}

/// What reaches the coordinator from a node.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Input {
    /// A message.
    Report(Report),
    /// The node's launcher is gone (why).
    Lost(String),
}

/// The state of the job's rounds (see the module docs).
#[derive(Debug)]
pub(super) struct Coordinator {
    nodes: usize,
    max_restarts: usize,
    round: usize,
    /// While restarting: the nodes ready for `round`, and since when the restart waits.
    restarting: Option<(BTreeSet<usize>, Instant)>,
    done: BTreeSet<usize>,
    /// No more decisions: an `Exit` or `Signal` went out.
    ended: bool,
    /// How long the nodes may take to stop their ranks before the job fails.
    ready_timeout: Duration,
}

impl Coordinator {
    /// A job of `nodes` nodes that may restart `max_restarts` times.
    pub fn new(nodes: usize, max_restarts: usize, ready_timeout: Duration) -> Self {
        Self { nodes, max_restarts, round: 0, restarting: None, done: BTreeSet::new(), ended: false, ready_timeout }
    }

    /// The first command, once every node joined.
    pub fn start(&self) -> Cmd {
        Cmd::Go { round: 0 }
    }

    /// Whether the job is decided (nothing more will be sent).
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// The command for every node after `input` from `node`, if any. A `Go` after a restart is
    /// returned at once: the caller pauses before sending it.
    pub fn on(&mut self, node: usize, input: Input) -> Option<Cmd> {
        if self.ended {
            return None;
        }
        let cmd = match input {
            Input::Lost(why) => Some(self.exit(1, format!("node {node}'s launcher is gone ({why}): the job cannot go on without it"))),
            Input::Report(Report::Signalled { signal }) => Some(Cmd::Signal { signal }),
            Input::Report(Report::Failed { round, rank, code }) if round == self.round && self.restarting.is_none() => {
                Some(if self.round < self.max_restarts {
                    self.round += 1;
                    self.done.clear();
                    self.restarting = Some((BTreeSet::new(), Instant::now()));
                    Cmd::Restart { round: self.round, rank, node, code }
                } else {
                    let left = if self.max_restarts > 0 { format!(" and no restart is left ({} done)", self.round) } else { String::new() };
                    self.exit(code, format!("rank {rank} (node {node}) failed with exit code {code}{left}"))
                })
            }
            Input::Report(Report::Done { round }) if round == self.round && self.restarting.is_none() => {
                self.done.insert(node);
                (self.done.len() == self.nodes).then(|| self.exit(0, "every rank of every node exited 0".into()))
            }
            Input::Report(Report::Ready { round }) if round == self.round => {
                let (ready, _) = self.restarting.as_mut()?;
                ready.insert(node);
                (ready.len() == self.nodes).then(|| {
                    self.restarting = None;
                    Cmd::Go { round }
                })
            }
            // Heartbeats, hellos, and reports of an older round.
            Input::Report(_) => None,
        };
        self.ended |= matches!(cmd, Some(Cmd::Exit { .. } | Cmd::Signal { .. }));
        cmd
    }

    /// The command a restart that waited too long for some node ends with.
    pub fn tick(&mut self, now: Instant) -> Option<Cmd> {
        let (ready, since) = self.restarting.as_ref().filter(|_| !self.ended)?;
        if now.duration_since(*since) < self.ready_timeout {
            return None;
        }
        let missing: Vec<usize> = (0..self.nodes).filter(|n| !ready.contains(n)).collect();
        let why = format!("nodes {missing:?} did not stop their ranks within {:?} of restart {}", self.ready_timeout, self.round);
        Some(self.exit(1, why))
    }

    fn exit(&mut self, code: i32, why: String) -> Cmd {
        self.ended = true;
        Cmd::Exit { code, why }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed(round: usize, rank: usize, code: i32) -> Input {
        Input::Report(Report::Failed { round, rank, code })
    }

    fn report(r: Report) -> Input {
        Input::Report(r)
    }

    #[test]
    fn a_failure_restarts_every_node_once_all_are_ready() {
        let mut c = Coordinator::new(3, 2, Duration::from_secs(60));
        assert_eq!(c.start(), Cmd::Go { round: 0 });
        assert_eq!(c.on(2, failed(0, 5, 3)), Some(Cmd::Restart { round: 1, rank: 5, node: 2, code: 3 }));
        // Node 0's ranks, stopped meanwhile, fail too: an older round, ignored.
        assert_eq!(c.on(0, failed(0, 1, 137)), None);
        assert_eq!(c.on(0, report(Report::Ready { round: 1 })), None);
        assert_eq!(c.on(2, report(Report::Ready { round: 1 })), None);
        assert_eq!(c.on(1, report(Report::Ping)), None);
        assert_eq!(c.on(1, report(Report::Ready { round: 1 })), Some(Cmd::Go { round: 1 }));
        // Round 1 finishes on every node.
        assert_eq!(c.on(0, report(Report::Done { round: 1 })), None);
        assert_eq!(c.on(0, report(Report::Done { round: 1 })), None, "a node counts once");
        assert_eq!(c.on(1, report(Report::Done { round: 1 })), None);
        assert!(matches!(c.on(2, report(Report::Done { round: 1 })), Some(Cmd::Exit { code: 0, .. })));
        assert!(c.ended());
        assert_eq!(c.on(2, failed(1, 5, 3)), None, "nothing after the end");
    }

    #[test]
    fn the_last_failure_ends_the_job_with_its_code() {
        let mut c = Coordinator::new(2, 1, Duration::from_secs(60));
        assert!(matches!(c.on(1, failed(0, 3, 9)), Some(Cmd::Restart { round: 1, .. })));
        for n in 0..2 {
            c.on(n, report(Report::Ready { round: 1 }));
        }
        let Some(Cmd::Exit { code, why }) = c.on(0, failed(1, 0, 4)) else { panic!("no exit") };
        assert_eq!(code, 4);
        assert!(why.contains("rank 0 (node 0) failed with exit code 4 and no restart is left (1 done)"), "{why}");
        // Without restarts: the first failure.
        let mut c = Coordinator::new(2, 0, Duration::from_secs(60));
        assert_eq!(c.on(1, failed(0, 2, 7)), Some(Cmd::Exit { code: 7, why: "rank 2 (node 1) failed with exit code 7".into() }));
    }

    #[test]
    fn done_nodes_restart_too_and_a_signal_ends_every_decision() {
        let mut c = Coordinator::new(2, 3, Duration::from_secs(60));
        assert_eq!(c.on(0, report(Report::Done { round: 0 })), None);
        // Node 1 fails after node 0 finished: both start again, node 0's done is forgotten.
        assert!(matches!(c.on(1, failed(0, 3, 1)), Some(Cmd::Restart { round: 1, .. })));
        assert_eq!(c.on(0, report(Report::Done { round: 0 })), None);
        c.on(0, report(Report::Ready { round: 1 }));
        assert_eq!(c.on(1, report(Report::Ready { round: 1 })), Some(Cmd::Go { round: 1 }));
        assert_eq!(c.on(0, report(Report::Done { round: 1 })), None);
        assert_eq!(c.on(1, report(Report::Signalled { signal: 15 })), Some(Cmd::Signal { signal: 15 }));
        assert_eq!(c.on(0, failed(1, 0, 143)), None, "no restart after a stop signal");
        assert_eq!(c.on(1, report(Report::Signalled { signal: 15 })), None);
    }

    #[test]
    fn a_lost_node_or_a_slow_restart_fails_the_job_naming_it() {
        let mut c = Coordinator::new(3, 1, Duration::from_secs(60));
        let Some(Cmd::Exit { code: 1, why }) = c.on(2, Input::Lost("connection reset".into())) else { panic!() };
        assert!(why.contains("node 2's launcher is gone (connection reset)"), "{why}");
        let mut c = Coordinator::new(3, 1, Duration::from_secs(60));
        let t0 = Instant::now();
        c.on(1, failed(0, 4, 2));
        c.on(0, report(Report::Ready { round: 1 }));
        c.on(1, report(Report::Ready { round: 1 }));
        assert_eq!(c.tick(t0 + Duration::from_secs(1)), None);
        let Some(Cmd::Exit { code: 1, why }) = c.tick(t0 + Duration::from_secs(61)) else { panic!() };
        assert!(why.contains("nodes [2] did not stop their ranks within 60s of restart 1"), "{why}");
        assert!(c.ended() && c.tick(t0 + Duration::from_secs(99)).is_none());
    }

    #[test]
    fn messages_are_one_json_object_each() {
        let line = serde_json::to_string(&Cmd::Restart { round: 1, rank: 2, node: 1, code: 3 }).unwrap();
        assert_eq!(line, r#"{"msg":"restart","round":1,"rank":2,"node":1,"code":3}"#);
        let back: Report = serde_json::from_str(r#"{"msg":"failed","round":0,"rank":3,"code":-1}"#).unwrap();
        assert_eq!(back, Report::Failed { round: 0, rank: 3, code: -1 });
        assert!(serde_json::from_str::<Report>(r#"{"msg":"launch_everything"}"#).is_err());
    }
}
