//! Point-to-point under NCCL's rules: batches, in-order matching, rendezvous completion.
//!
//! The [simulator](crate::simulate) treats sends as buffered. NCCL is stricter, and a plan that
//! is fine with buffered sends can hang on GPUs:
//!
//! - **Rendezvous.** An NCCL send completes only once the peer has posted the matching receive.
//!   Executors therefore issue each maximal run of consecutive `SEND`/`RECV` actions of a rank as
//!   one *batch* (`ncclGroupStart … ncclGroupEnd`, Megatron's `batch_isend_irecv`): every op of
//!   the batch is posted at once and the batch completes when every op in it found its
//!   counterpart. Two neighbours that send to each other then meet in their batches instead of
//!   each blocking in its send (the classic 1F1B deadlock).
//! - **In-order matching.** NCCL has no tags: the k-th send from rank `a` to rank `b` meets the
//!   k-th receive at `b` from `a`. Both ranks must list their messages of each ordered pair in the
//!   same order.
//!
//! [`check_rendezvous`] proves both for a plan (the executor's CPU world can also run with these
//! semantics, see `burn_parallel::LocalWorldOptions`); [`make_rendezvous_safe`] repairs a plan
//! that would hang, and [`place_for_rendezvous`] picks where sends and receives go so that
//! waiting for every batch costs (almost) nothing over buffered sends ([`rendezvous_makespan`]).

use std::collections::{HashMap, HashSet};

use crate::action::{Action, Op, Plan};
use crate::error::ScheduleError;

/// One step of a rank under batched communication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// A computation (`F`, `B`, `I`, `W`).
    Compute(Action),
    /// A maximal run of consecutive sends/receives, issued as one group.
    Batch(Vec<Action>),
}

/// Whether `op` moves data between ranks.
pub fn is_comm(op: Op) -> bool {
    matches!(op, Op::SendF | Op::RecvF | Op::SendB | Op::RecvB)
}

/// `actions` with each maximal run of communication actions folded into a [`Step::Batch`].
pub fn steps(actions: &[Action]) -> Vec<Step> {
    let mut out: Vec<Step> = Vec::new();
    for &a in actions {
        match (is_comm(a.op), out.last_mut()) {
            (true, Some(Step::Batch(batch))) => batch.push(a),
            (true, _) => out.push(Step::Batch(vec![a])),
            (false, _) => out.push(Step::Compute(a)),
        }
    }
    out
}

/// A message: `(kind, sending stage, micro-batch)`; kind is `SendF` or `SendB`.
type Msg = (Op, usize, usize);

/// The message a comm action moves, with its sending and receiving rank.
fn message(plan: &Plan, a: Action) -> (Msg, usize, usize) {
    let rank = |s: usize| plan.shape.rank_of(s);
    match a.op {
        Op::SendF => ((Op::SendF, a.stage, a.mb), rank(a.stage), rank(a.stage + 1)),
        Op::RecvF => ((Op::SendF, a.stage - 1, a.mb), rank(a.stage - 1), rank(a.stage)),
        Op::SendB => ((Op::SendB, a.stage, a.mb), rank(a.stage), rank(a.stage - 1)),
        Op::RecvB => ((Op::SendB, a.stage + 1, a.mb), rank(a.stage + 1), rank(a.stage)),
        _ => unreachable!("not a communication action: {a}"),
    }
}

fn is_send(op: Op) -> bool {
    matches!(op, Op::SendF | Op::SendB)
}

/// Checks that `plan` neither hangs nor mismatches messages under NCCL's rules (module docs).
pub fn check_rendezvous(plan: &Plan) -> Result<(), ScheduleError> {
    check_order(plan)?;
    check_progress(plan)
}

/// For every ordered pair of ranks, the sender's message order equals the receiver's.
fn check_order(plan: &Plan) -> Result<(), ScheduleError> {
    let mut sent: HashMap<(usize, usize), Vec<Msg>> = HashMap::new();
    let mut received: HashMap<(usize, usize), Vec<Msg>> = HashMap::new();
    for actions in &plan.ranks {
        for &a in actions.iter().filter(|a| is_comm(a.op)) {
            let (msg, from, to) = message(plan, a);
            let side = if is_send(a.op) { &mut sent } else { &mut received };
            side.entry((from, to)).or_default().push(msg);
        }
    }
    let pairs: HashSet<(usize, usize)> = sent.keys().chain(received.keys()).copied().collect();
    let mut pairs: Vec<_> = pairs.into_iter().collect();
    pairs.sort_unstable();
    for (from, to) in pairs {
        let (s, r) = (sent.get(&(from, to)), received.get(&(from, to)));
        if s != r {
            let show = |v: Option<&Vec<Msg>>| {
                v.map(|v| {
                    v.iter()
                        .map(|(k, st, mb)| format!("{}{mb}", if *k == Op::SendF { format!("{st}F") } else { format!("{st}B") }))
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_default()
            };
            return Err(ScheduleError::P2pOrder { from, to, sent: show(s), received: show(r) });
        }
    }
    Ok(())
}

/// Runs the ranks with batches that complete only when every op met its counterpart.
fn check_progress(plan: &Plan) -> Result<(), ScheduleError> {
    run_rendezvous(plan, &mut plan.ranks.iter().map(|a| steps(a)).collect::<Vec<_>>(), false, &crate::Costs::uniform()).map(|_| ())
}

/// `plan` with receives posted early where NCCL's rendezvous would otherwise hang: whenever
/// every unfinished rank is blocked, a receive that a blocked send waits for is moved from later
/// in its rank's plan into that rank's current batch (appended, so per-pair order is kept). A
/// receive only fills a buffer, so posting it earlier never breaks a data dependency; it costs
/// one activation-sized buffer held a little longer. Plans that need no repair come back
/// unchanged (GPipe and 1F1B do not; interleaved 1F1B does).
pub fn make_rendezvous_safe(plan: Plan) -> Result<Plan, ScheduleError> {
    let mut per_rank: Vec<Vec<Step>> = plan.ranks.iter().map(|a| steps(a)).collect();
    run_rendezvous(&plan, &mut per_rank, true, &crate::Costs::uniform())?;
    let ranks = per_rank
        .into_iter()
        .map(|steps| {
            steps
                .into_iter()
                .flat_map(|s| match s {
                    Step::Compute(a) => vec![a],
                    Step::Batch(b) => b,
                })
                .collect()
        })
        .collect();
    Ok(Plan { shape: plan.shape, ranks })
}

/// Moves the receive of a send blocked at `pos` of some rank into its receiver's current batch.
/// Returns false when no blocked send waits for a receive (a real deadlock).
fn prefetch_one(plan: &Plan, per_rank: &mut [Vec<Step>], pos: &[usize], posted: &HashMap<(Msg, bool), f64>) -> bool {
    for r in 0..per_rank.len() {
        let Some(Step::Batch(batch)) = per_rank[r].get(pos[r]) else { continue };
        let Some(send) = batch.iter().find(|a| is_send(a.op) && !posted.contains_key(&(message(plan, **a).0, false))) else { continue };
        let (msg, _, q) = message(plan, *send);
        // The receive sits later in q's plan (q is blocked at pos[q]).
        let later = pos[q] + 1;
        for i in later..per_rank[q].len() {
            let Step::Batch(b) = &mut per_rank[q][i] else { continue };
            let Some(j) = b.iter().position(|a| !is_send(a.op) && message(plan, *a).0 == msg) else { continue };
            let recv = b.remove(j);
            if b.is_empty() {
                per_rank[q].remove(i);
            }
            match per_rank[q].get_mut(pos[q]) {
                Some(Step::Batch(cur)) => cur.push(recv),
                _ => return false,
            }
            return true;
        }
    }
    false
}

/// The rendezvous run behind [`check_progress`], [`rendezvous_makespan`] and (with `repair`)
/// [`make_rendezvous_safe`]: computations take their cost; a batch posts all its ops and
/// completes when the last of them and their counterparts was posted (plus `costs.comm`).
/// Returns the makespan.
fn run_rendezvous(plan: &Plan, per_rank: &mut [Vec<Step>], repair: bool, costs: &crate::Costs) -> Result<f64, ScheduleError> {
    let n = per_rank.len();
    let (mut pos, mut clock) = (vec![0usize; n], vec![0.0f64; n]);
    // (message, is the send side) of every op posted so far, with its posting time.
    let mut posted: HashMap<(Msg, bool), f64> = HashMap::new();
    loop {
        let mut progressed = false;
        for (r, steps) in per_rank.iter().enumerate() {
            while let Some(step) = steps.get(pos[r]) {
                match step {
                    Step::Compute(a) => clock[r] += costs.of(a.op),
                    Step::Batch(batch) => {
                        for &a in batch {
                            if let std::collections::hash_map::Entry::Vacant(e) = posted.entry((message(plan, a).0, is_send(a.op))) {
                                e.insert(clock[r]);
                                progressed = true;
                            }
                        }
                        let peers: Option<Vec<f64>> = batch.iter().map(|&a| posted.get(&(message(plan, a).0, !is_send(a.op))).copied()).collect();
                        let Some(peers) = peers else { break };
                        clock[r] = peers.into_iter().fold(clock[r], f64::max) + costs.comm;
                    }
                }
                pos[r] += 1;
                progressed = true;
            }
        }
        if pos.iter().zip(per_rank.iter()).all(|(p, s)| *p == s.len()) {
            return Ok(clock.into_iter().fold(0.0, f64::max));
        }
        if !progressed && repair && prefetch_one(plan, per_rank, &pos, &posted) {
            continue;
        }
        if !progressed {
            let blocked: Vec<String> = per_rank
                .iter()
                .enumerate()
                .filter_map(|(r, s)| match s.get(pos[r]) {
                    Some(Step::Batch(b)) => {
                        let ops: Vec<String> = b.iter().map(|a| a.to_string()).collect();
                        Some(format!("rank {r} waits in batch [{}]", ops.join(" ")))
                    }
                    _ => None,
                })
                .collect();
            return Err(ScheduleError::Deadlock(format!("under NCCL rendezvous semantics: {}", blocked.join(", "))));
        }
    }
}

/// The makespan of `plan` under NCCL's rules with `costs` (see `run_rendezvous`); `None` if it
/// deadlocks. This is what ranks that wait for every batch (as the executor does) experience;
/// the buffered [`simulate`](crate::simulate) is a lower bound.
pub fn rendezvous_makespan(plan: &Plan, costs: &crate::Costs) -> Option<f64> {
    run_rendezvous(plan, &mut plan.ranks.iter().map(|a| steps(a)).collect::<Vec<_>>(), false, costs).ok()
}

/// Moves each `SEND_F` that is directly followed by a backward to just after that backward.
fn defer_sends(plan: &Plan) -> Plan {
    map_ranks(plan, |v| {
        let mut i = 0;
        while i < v.len() {
            if v[i].op == Op::SendF {
                if let Some(j) = (i + 1..v.len()).find(|&j| !is_comm(v[j].op)).filter(|&j| matches!(v[j].op, Op::B | Op::I)) {
                    let a = v.remove(i);
                    v.insert(j, a);
                    i = j;
                }
            }
            i += 1;
        }
    })
}

/// Moves each `RECV_B` that directly follows a forward to just before that forward.
fn prefetch_receives(plan: &Plan) -> Plan {
    map_ranks(plan, |v| {
        let mut i = v.len();
        while i > 0 {
            i -= 1;
            if v[i].op == Op::RecvB {
                if let Some(j) = (0..i).rev().find(|&j| !is_comm(v[j].op)).filter(|&j| v[j].op == Op::F) {
                    let a = v.remove(i);
                    v.insert(j, a);
                    i = j;
                }
            }
        }
    })
}

fn map_ranks(plan: &Plan, f: impl Fn(&mut Vec<Action>)) -> Plan {
    let ranks = plan
        .ranks
        .iter()
        .map(|a| {
            let mut v = a.clone();
            f(&mut v);
            v
        })
        .collect();
    Plan { shape: plan.shape, ranks }
}

/// Cost profiles a placement is judged on: backward twice the forward, split evenly into I and
/// W, or all in I (Burn 0.21 runs the whole backward in `I`); and backward equal to forward.
const PROFILES: [crate::Costs; 3] = [
    crate::Costs { forward: 1.0, backward: 2.0, backward_input: 1.0, backward_weight: 1.0, comm: 0.0 },
    crate::Costs { forward: 1.0, backward: 2.0, backward_input: 2.0, backward_weight: 0.0, comm: 0.0 },
    crate::Costs { forward: 1.0, backward: 1.0, backward_input: 0.5, backward_weight: 0.5, comm: 0.0 },
];

/// The worst ratio, over [`PROFILES`], of `plan`'s rendezvous makespan to `reference`'s buffered
/// makespan.
fn score(plan: &Plan, reference: &[f64]) -> f64 {
    PROFILES.iter().zip(reference).map(|(c, r)| rendezvous_makespan(plan, c).map_or(f64::INFINITY, |t| t / r)).fold(0.0, f64::max)
}

/// The best of four placements of `plan`'s communication under NCCL's rules: as lowered; with
/// sends deferred past the next backward; with gradient receives posted before the preceding
/// forward; both (Megatron's interleaved steady state: one group per forward–backward pair, in
/// which neighbours meet). Each is made safe with [`make_rendezvous_safe`] and judged by its
/// worst [`rendezvous_makespan`] over a few cost profiles relative to the buffered makespan of
/// `plan`; a variant must be strictly better to replace the plain lowering.
pub fn place_for_rendezvous(plan: Plan) -> Result<Plan, ScheduleError> {
    let reference: Vec<f64> = PROFILES.iter().map(|c| crate::simulate(&plan, c).map(|s| s.makespan)).collect::<Result<_, _>>()?;
    let variants = [defer_sends(&plan), prefetch_receives(&plan), prefetch_receives(&defer_sends(&plan))];
    let mut best = make_rendezvous_safe(plan)?;
    let mut best_score = score(&best, &reference);
    for v in variants {
        let Ok(v) = make_rendezvous_safe(v) else { continue };
        if crate::validate(&v).is_err() || check_rendezvous(&v).is_err() {
            continue;
        }
        let s = score(&v, &reference);
        if s < best_score - 1e-9 {
            (best, best_score) = (v, s);
        }
    }
    Ok(best)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::action::PipelineShape;

    fn plan(p: usize, m: usize, text: &str) -> Plan {
        Plan::parse(PipelineShape::new(p, 1, m), text).unwrap()
    }

    #[test]
    fn steps_fold_consecutive_comm() {
        let p = plan(2, 1, "0F0 0SEND_F0 0RECV_B0 0B0\n1RECV_F0 1F0 1B0 1SEND_B0");
        let s = steps(&p.ranks[0]);
        assert_eq!(s.len(), 3);
        assert!(matches!(&s[1], Step::Batch(b) if b.len() == 2));
    }

    /// Both neighbours send before they receive, with a computation in between (so in separate
    /// batches): fine with buffered sends, a hang with NCCL. Batched together, the same
    /// exchange completes.
    #[test]
    fn separate_send_then_recv_between_neighbours_deadlocks() {
        let text = "0F0 0SEND_F0 0F1 0SEND_F1 0I0 0RECV_B0 0B0 0RECV_B1 0B1\n\
                    1RECV_F0 1F0 1B0 1SEND_B0 1I0 1RECV_F1 1F1 1B1 1SEND_B1";
        let p = plan(2, 2, text);
        crate::simulate(&p, &crate::Costs::uniform()).unwrap();
        let e = check_rendezvous(&p).unwrap_err().to_string();
        assert!(e.contains("rank 0 waits in batch [0SEND_F1]") && e.contains("rank 1 waits in batch [1SEND_B0]"), "{e}");
        let batched = text.replace("0I0 ", "").replace("1I0 ", "");
        check_rendezvous(&plan(2, 2, &batched)).unwrap();
    }

    #[test]
    fn out_of_order_pair_is_reported() {
        let text = "0F0 0F1 0SEND_F1 0SEND_F0 0RECV_B0 0B0 0RECV_B1 0B1\n\
                    1RECV_F0 1RECV_F1 1F0 1F1 1B0 1B1 1SEND_B0 1SEND_B1";
        let e = check_rendezvous(&plan(2, 2, text)).unwrap_err();
        assert_eq!(e, ScheduleError::P2pOrder { from: 0, to: 1, sent: "0F1 0F0".into(), received: "0F0 0F1".into() });
    }
}
