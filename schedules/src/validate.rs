//! The validator: structural rules every plan must satisfy before it runs.
//!
//! 1. The plan has one action list per rank; each action's stage lives on that rank; micro-batch
//!    ids are below `m`.
//! 2. Every stage runs `F` exactly once per micro-batch, and either `B` once or `I` and `W` once.
//! 3. On a rank, `B`/`I` of `(stage, mb)` come after its `F`; `W` after its `I`; when two
//!    consecutive stages share a rank, `F(s+1)` follows `F(s)` and `B(s)` follows `B(s+1)`.
//! 4. Every cross-rank dependency has its receive before the action on the receiving rank and its
//!    send after the producing action; every send has exactly one matching receive and vice versa.
//!
//! Timing (whether ranks wait forever) is the simulator's job ([`crate::simulate`]).

use std::collections::{HashMap, HashSet};

use crate::action::{Action, Op, Plan};
use crate::error::ScheduleError;

fn err(msg: String) -> ScheduleError {
    ScheduleError::Invalid(msg)
}

/// Checks the rules above.
pub fn validate(plan: &Plan) -> Result<(), ScheduleError> {
    let shape = plan.shape;
    shape.check()?;
    if plan.ranks.len() != shape.ranks {
        return Err(err(format!("{} action lists for {} ranks", plan.ranks.len(), shape.ranks)));
    }
    let last = shape.stages() - 1;
    let mut seen: HashMap<(Op, usize, usize), usize> = HashMap::new();
    for (r, actions) in plan.ranks.iter().enumerate() {
        let mut done: HashSet<(Op, usize, usize)> = HashSet::new();
        for a in actions {
            check_action(plan, r, a)?;
            let needs: Vec<(Op, usize)> = match a.op {
                Op::F if a.stage > 0 && shape.rank_of(a.stage - 1) != r => vec![(Op::RecvF, a.stage)],
                Op::F if a.stage > 0 => vec![(Op::F, a.stage - 1)],
                Op::B | Op::I => {
                    let mut n = vec![(Op::F, a.stage)];
                    if a.stage < last {
                        n.push(if shape.rank_of(a.stage + 1) != r { (Op::RecvB, a.stage) } else { (backward_of(&done, a.stage + 1, a.mb), a.stage + 1) });
                    }
                    n
                }
                Op::W => vec![(Op::I, a.stage)],
                Op::SendF => vec![(Op::F, a.stage)],
                Op::SendB => vec![(backward_of(&done, a.stage, a.mb), a.stage)],
                _ => vec![],
            };
            for (op, stage) in needs {
                if !done.contains(&(op, stage, a.mb)) {
                    return Err(err(format!("rank {r}: {a} comes before {}", Action::new(op, stage, a.mb))));
                }
            }
            if !done.insert((a.op, a.stage, a.mb)) {
                return Err(err(format!("rank {r}: {a} appears twice")));
            }
            *seen.entry((a.op, a.stage, a.mb)).or_default() += 1;
        }
    }
    check_counts(plan, &seen)
}

/// `B` if the rank ran a full backward of `(stage, mb)`, else `I`.
fn backward_of(done: &HashSet<(Op, usize, usize)>, stage: usize, mb: usize) -> Op {
    if done.contains(&(Op::I, stage, mb)) {
        Op::I
    } else {
        Op::B
    }
}

fn check_action(plan: &Plan, r: usize, a: &Action) -> Result<(), ScheduleError> {
    let shape = plan.shape;
    if a.stage >= shape.stages() || shape.rank_of(a.stage) != r {
        return Err(err(format!("rank {r}: {a} names stage {} which is not on this rank", a.stage)));
    }
    if a.mb >= shape.microbatches {
        return Err(err(format!("rank {r}: {a} names micro-batch {} of {}", a.mb, shape.microbatches)));
    }
    let last = shape.stages() - 1;
    let bad_edge = match a.op {
        Op::RecvF => a.stage == 0,
        Op::SendB => a.stage == 0,
        Op::SendF | Op::RecvB => a.stage == last,
        _ => false,
    };
    if bad_edge {
        return Err(err(format!("rank {r}: {a} has no peer stage")));
    }
    Ok(())
}

fn check_counts(plan: &Plan, seen: &HashMap<(Op, usize, usize), usize>) -> Result<(), ScheduleError> {
    let shape = plan.shape;
    let has = |op, s, mb| seen.contains_key(&(op, s, mb));
    for s in 0..shape.stages() {
        for mb in 0..shape.microbatches {
            if !has(Op::F, s, mb) {
                return Err(err(format!("stage {s} never runs F of micro-batch {mb}")));
            }
            match (has(Op::B, s, mb), has(Op::I, s, mb), has(Op::W, s, mb)) {
                (true, false, false) | (false, true, true) => {}
                (false, false, false) => return Err(err(format!("stage {s} never runs the backward of micro-batch {mb}"))),
                _ => return Err(err(format!("stage {s}, micro-batch {mb}: backward must be one B, or one I and one W"))),
            }
        }
    }
    for (&(op, s, mb), _) in seen.iter().filter(|((op, ..), _)| matches!(op, Op::SendF | Op::SendB)) {
        let (peer_op, peer_stage) = if op == Op::SendF { (Op::RecvF, s + 1) } else { (Op::RecvB, s - 1) };
        if !has(peer_op, peer_stage, mb) {
            return Err(err(format!("{} has no matching {}", Action::new(op, s, mb), Action::new(peer_op, peer_stage, mb))));
        }
    }
    for (&(op, s, mb), _) in seen.iter().filter(|((op, ..), _)| matches!(op, Op::RecvF | Op::RecvB)) {
        let (peer_op, peer_stage) = if op == Op::RecvF { (Op::SendF, s - 1) } else { (Op::SendB, s + 1) };
        if !has(peer_op, peer_stage, mb) {
            return Err(err(format!("{} has no matching {}", Action::new(op, s, mb), Action::new(peer_op, peer_stage, mb))));
        }
    }
    Ok(())
}
