//! Schedules: per-rank orders of forward/backward actions, chosen at run time by name.

use std::fmt::Debug;

use crate::action::{Action, Op, PipelineShape, Plan};
use crate::error::ScheduleError;
use crate::lower::lower;
use crate::p2p::{check_rendezvous, place_for_rendezvous};
use crate::simulate::{simulate, Costs};
use crate::validate::validate;

/// A pipeline schedule (object-safe: pick one at run time with [`schedule_by_name`]).
pub trait Schedule: Debug + Send + Sync {
    /// The look-up name, e.g. `"1f1b"`.
    fn name(&self) -> &'static str;

    /// Whether the schedule splits backward into input (`I`) and weight (`W`) gradients.
    fn splits_backward(&self) -> bool {
        false
    }

    /// Per rank, the order of computation actions (no communication).
    fn compute_order(&self, shape: &PipelineShape) -> Result<Vec<Vec<Action>>, ScheduleError>;

    /// The complete plan: computation order plus the sends and receives, validated and checked
    /// by a dry run to never deadlock (with non-blocking sends, progress does not depend on the
    /// costs, so one run with unit costs decides it), with sends and receives placed for NCCL's
    /// rendezvous point-to-point (never hanging, and costing as little as possible with F = 1,
    /// B = 2), checked again under those rules ([`crate::p2p`]).
    fn plan(&self, shape: &PipelineShape) -> Result<Plan, ScheduleError> {
        shape.check()?;
        let plan = lower(shape, self.compute_order(shape)?);
        validate(&plan)?;
        simulate(&plan, &Costs::uniform())?;
        let plan = place_for_rendezvous(plan)?;
        validate(&plan)?;
        simulate(&plan, &Costs::uniform())?;
        check_rendezvous(&plan)?;
        Ok(plan)
    }
}

fn need_microbatches(name: &str, shape: &PipelineShape, needed: usize) -> Result<(), ScheduleError> {
    if shape.microbatches < needed {
        return Err(ScheduleError::TooFewMicrobatches { schedule: name.into(), microbatches: shape.microbatches, ranks: shape.ranks, needed });
    }
    Ok(())
}

fn single_chunk(name: &str, shape: &PipelineShape) -> Result<(), ScheduleError> {
    if shape.virtual_stages != 1 {
        return Err(ScheduleError::InvalidShape(format!("{name} runs one stage per rank; got {} virtual stages (use interleaved-1f1b)", shape.virtual_stages)));
    }
    Ok(())
}

/// GPipe: all forwards, then all backwards. Peak in-flight micro-batches: m on every rank.
#[derive(Debug, Clone, Copy, Default)]
pub struct GPipe;

impl Schedule for GPipe {
    fn name(&self) -> &'static str {
        "gpipe"
    }
    fn compute_order(&self, shape: &PipelineShape) -> Result<Vec<Vec<Action>>, ScheduleError> {
        single_chunk(self.name(), shape)?;
        let m = shape.microbatches;
        Ok((0..shape.ranks).map(|r| (0..m).map(|i| Action::new(Op::F, r, i)).chain((0..m).map(|i| Action::new(Op::B, r, i))).collect()).collect())
    }
}

/// 1F1B (PipeDream-Flush): `min(p−r−1, m)` warm-up forwards on rank r, then one forward / one
/// backward, then the remaining backwards. Peak in-flight on rank r: `min(p−r, m)`.
#[derive(Debug, Clone, Copy, Default)]
pub struct OneFOneB;

impl Schedule for OneFOneB {
    fn name(&self) -> &'static str {
        "1f1b"
    }
    fn compute_order(&self, shape: &PipelineShape) -> Result<Vec<Vec<Action>>, ScheduleError> {
        single_chunk(self.name(), shape)?;
        need_microbatches(self.name(), shape, shape.ranks)?;
        let (p, m) = (shape.ranks, shape.microbatches);
        Ok((0..p).map(|r| one_f_one_b(r, (p - r - 1).min(m), m, |s, i| vec![Action::new(Op::B, s, i)])).collect())
    }
}

/// The 1F1B order of rank `r` (one stage) with `warmup` forwards; `bwd` expands a backward.
fn one_f_one_b(r: usize, warmup: usize, m: usize, bwd: impl Fn(usize, usize) -> Vec<Action>) -> Vec<Action> {
    let mut out: Vec<Action> = (0..warmup).map(|i| Action::new(Op::F, r, i)).collect();
    for i in 0..m - warmup {
        out.push(Action::new(Op::F, r, warmup + i));
        out.extend(bwd(r, i));
    }
    for i in m - warmup..m {
        out.extend(bwd(r, i));
    }
    out
}

/// Interleaved 1F1B (Megatron's virtual pipeline): rank r holds chunks `c = 0..v` = stages
/// `c·p + r`. Forwards go in groups of p micro-batches, chunk by chunk; backwards likewise with
/// chunks reversed, in rounds of `g ≥ p` micro-batches (`g = p` when p divides m). Warm-up on rank
/// r: `2(p−r−1) + (v−1)·g` chunk-forwards. Bubble `(p−1)/(v·m+p−1)`. Needs m ≥ p.
#[derive(Debug, Clone, Copy, Default)]
pub struct Interleaved1F1B;

/// Sizes of the rounds of micro-batches: `⌊m/p⌋` rounds of `p` or `p+1` (the remainder is spread
/// over the first rounds), so every round has at least `p` micro-batches (torch's
/// `microbatches_per_round`; Megatron's groups when p divides m).
fn rounds(p: usize, m: usize) -> Vec<usize> {
    let k = (m / p).max(1);
    (0..k).map(|i| m / k + usize::from(i < m % k)).collect()
}

/// (chunk, micro-batch) pairs in Megatron's order: round by round, chunk by chunk.
fn interleaved_order(p: usize, v: usize, m: usize, backward: bool) -> Vec<(usize, usize)> {
    let mut out = Vec::with_capacity(m * v);
    let mut start = 0;
    for size in rounds(p, m) {
        for c in 0..v {
            let chunk = if backward { v - 1 - c } else { c };
            out.extend((start..start + size).map(|mb| (chunk, mb)));
        }
        start += size;
    }
    out
}

impl Schedule for Interleaved1F1B {
    fn name(&self) -> &'static str {
        "interleaved-1f1b"
    }
    fn compute_order(&self, shape: &PipelineShape) -> Result<Vec<Vec<Action>>, ScheduleError> {
        need_microbatches(self.name(), shape, shape.ranks)?;
        if shape.virtual_stages == 1 {
            // One chunk per rank is 1F1B (the interleaved warm-up, 2(p−r−1), would hold twice
            // the micro-batches for the same bubble).
            return OneFOneB.compute_order(shape);
        }
        let (p, v, m) = (shape.ranks, shape.virtual_stages, shape.microbatches);
        let fwd = interleaved_order(p, v, m, false);
        let bwd = interleaved_order(p, v, m, true);
        let total = m * v;
        Ok((0..p)
            .map(|r| {
                let stage = |c: usize| c * p + r;
                let warmup = (2 * (p - r - 1) + (v - 1) * rounds(p, m)[0]).min(total);
                let f = |k: usize| Action::new(Op::F, stage(fwd[k].0), fwd[k].1);
                let b = |k: usize| Action::new(Op::B, stage(bwd[k].0), bwd[k].1);
                let mut out: Vec<Action> = (0..warmup).map(f).collect();
                for i in 0..total - warmup {
                    out.push(f(warmup + i));
                    out.push(b(i));
                }
                out.extend((total - warmup..total).map(b));
                out
            })
            .collect())
    }
}

/// ZB-H1 (Qi et al. 2023): each backward split into `I` (input gradient, on the critical path)
/// and `W` (weight gradient), ordered by a greedy list scheduler over unit costs: a rank runs a
/// ready `I` first, then a forward while it holds fewer than 1F1B's `min(p−r, m)` micro-batches
/// (counted until their `W`), and fills any remaining gap with a pending `W`. Peak activation
/// memory therefore never exceeds 1F1B's; the bubble shrinks because gradients travel upstream
/// without waiting for weight gradients. Needs m ≥ p.
///
/// At unit costs its bubble is (p−1)(F+I) per rank, **2/3 of 1F1B's**, not the paper's
/// (p−1)(F+I−W) (a third): the paper's ZB-H1 defers weight gradients on later ranks into the
/// tail (up to p micro-batches held there), which this greedy does not do. With Burn 0.21 the
/// executor computes every gradient in `I` anyway (`W` only adds the stashed ones), so on real
/// runs `zb-h1` behaves like 1F1B with early gradient sends.
#[derive(Debug, Clone, Copy, Default)]
pub struct ZeroBubbleH1;

impl Schedule for ZeroBubbleH1 {
    fn name(&self) -> &'static str {
        "zb-h1"
    }
    fn splits_backward(&self) -> bool {
        true
    }
    fn compute_order(&self, shape: &PipelineShape) -> Result<Vec<Vec<Action>>, ScheduleError> {
        single_chunk(self.name(), shape)?;
        need_microbatches(self.name(), shape, shape.ranks)?;
        Ok(greedy_zero_bubble(shape.ranks, shape.microbatches))
    }
}

/// The greedy list scheduler behind [`ZeroBubbleH1`] (unit costs for F, I and W).
fn greedy_zero_bubble(p: usize, m: usize) -> Vec<Vec<Action>> {
    let mut f_end = vec![vec![None::<u64>; m]; p];
    let mut i_end = vec![vec![None::<u64>; m]; p];
    let (mut next_f, mut next_i, mut clock) = (vec![0usize; p], vec![0usize; p], vec![0u64; p]);
    let mut pending: Vec<std::collections::VecDeque<usize>> = vec![Default::default(); p];
    let mut order = vec![Vec::new(); p];
    let done = |r: usize, nf: &[usize], ni: &[usize], pw: &[std::collections::VecDeque<usize>]| nf[r] == m && ni[r] == m && pw[r].is_empty();
    loop {
        // Each rank's best next action and its start time; the earliest start is committed.
        let mut best: Option<(u64, usize, Op, usize)> = None;
        for r in 0..p {
            if done(r, &next_f, &next_i, &pending) {
                continue;
            }
            let held = next_f[r] - (next_i[r] - pending[r].len());
            let i_ready = (next_i[r] < m)
                .then(|| {
                    let mb = next_i[r];
                    let own = f_end[r][mb]?;
                    let down = if r + 1 < p { i_end[r + 1][mb]? } else { 0 };
                    Some((clock[r].max(own).max(down), Op::I, mb))
                })
                .flatten();
            let f_ready = (next_f[r] < m && held < (p - r).min(m))
                .then(|| {
                    let mb = next_f[r];
                    let up = if r > 0 { f_end[r - 1][mb]? } else { 0 };
                    Some((clock[r].max(up), Op::F, mb))
                })
                .flatten();
            let now: Vec<_> = [i_ready, f_ready].into_iter().flatten().filter(|c| c.0 <= clock[r]).collect();
            let pick = match (now.first(), pending[r].front()) {
                (Some(&c), _) => Some(c),
                (None, Some(&mb)) => Some((clock[r], Op::W, mb)),
                (None, None) => [i_ready, f_ready].into_iter().flatten().min_by_key(|c| c.0),
            };
            if let Some((t, op, mb)) = pick {
                if best.is_none_or(|b| t < b.0) {
                    best = Some((t, r, op, mb));
                }
            }
        }
        let Some((t, r, op, mb)) = best else { break };
        clock[r] = t + 1;
        match op {
            Op::F => {
                f_end[r][mb] = Some(t + 1);
                next_f[r] += 1;
            }
            Op::I => {
                i_end[r][mb] = Some(t + 1);
                next_i[r] += 1;
                pending[r].push_back(mb);
            }
            _ => {
                pending[r].pop_front();
            }
        }
        order[r].push(Action::new(op, r, mb));
    }
    order
}

/// Names accepted by [`schedule_by_name`].
pub const SCHEDULE_NAMES: [&str; 4] = ["gpipe", "1f1b", "interleaved-1f1b", "zb-h1"];

/// The schedule called `name` (case-insensitive; `"interleaved"` and `"zbh1"` also accepted).
pub fn schedule_by_name(name: &str) -> Result<Box<dyn Schedule>, ScheduleError> {
    match name.to_ascii_lowercase().as_str() {
        "gpipe" => Ok(Box::new(GPipe)),
        "1f1b" | "one-f-one-b" => Ok(Box::new(OneFOneB)),
        "interleaved-1f1b" | "interleaved" => Ok(Box::new(Interleaved1F1B)),
        "zb-h1" | "zbh1" => Ok(Box::new(ZeroBubbleH1)),
        _ => Err(ScheduleError::UnknownSchedule { name: name.into(), known: SCHEDULE_NAMES.join(", ") }),
    }
}
