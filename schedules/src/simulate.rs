//! Dry-run simulation: per-action costs in, makespan, bubble, peak activation memory out —
//! or a deadlock report naming each blocked rank and what it waits for.
//!
//! Model: each rank runs its actions in order. Computation takes its cost; a send never blocks
//! and delivers after `comm` time; a receive waits until its message has been delivered. A rank
//! holds a micro-batch's activations from its `F` until its `B` (or `W` when split): the peak of
//! that count is the activation-memory figure, in stage-micro-batches.

use std::collections::HashMap;

use crate::action::{Action, Op, Plan};
use crate::error::ScheduleError;

/// Cost of each action kind, in any time unit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Costs {
    /// Forward of one stage on one micro-batch.
    pub forward: f64,
    /// Full backward.
    pub backward: f64,
    /// Input-gradient backward (`I`).
    pub backward_input: f64,
    /// Weight-gradient backward (`W`).
    pub backward_weight: f64,
    /// Delivery time of a message.
    pub comm: f64,
}

impl Costs {
    /// Forward 1, backward 2 (= I 1 + W 1), free communication.
    pub fn uniform() -> Self {
        Self { forward: 1.0, backward: 2.0, backward_input: 1.0, backward_weight: 1.0, comm: 0.0 }
    }

    pub(crate) fn of(&self, op: Op) -> f64 {
        match op {
            Op::F => self.forward,
            Op::B => self.backward,
            Op::I => self.backward_input,
            Op::W => self.backward_weight,
            _ => 0.0,
        }
    }
}

/// One executed computation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Slot {
    /// The action.
    pub action: Action,
    /// Start time.
    pub start: f64,
    /// End time.
    pub end: f64,
}

/// What the simulation found.
#[derive(Debug, Clone, PartialEq)]
pub struct Simulation {
    /// Time from the first action to the last.
    pub makespan: f64,
    /// Computation time per rank.
    pub busy: Vec<f64>,
    /// Idle share of the step: `1 − Σ busy / (ranks · makespan)`.
    pub bubble_fraction: f64,
    /// Per rank, the most micro-batches whose activations were held at once.
    pub peak_in_flight: Vec<usize>,
    /// Per rank, the computations with their times.
    pub timeline: Vec<Vec<Slot>>,
}

/// Simulates `plan` with `costs`.
pub fn simulate(plan: &Plan, costs: &Costs) -> Result<Simulation, ScheduleError> {
    let n = plan.ranks.len();
    let (mut pos, mut clock) = (vec![0usize; n], vec![0.0f64; n]);
    let (mut busy, mut live, mut peak) = (vec![0.0f64; n], vec![0usize; n], vec![0usize; n]);
    let mut timeline = vec![Vec::new(); n];
    // (op of the message, sending stage, mb) -> delivery time
    let mut mail: HashMap<(Op, usize, usize), f64> = HashMap::new();
    loop {
        let mut progressed = false;
        for r in 0..n {
            while let Some(&a) = plan.ranks[r].get(pos[r]) {
                match a.op {
                    Op::RecvF | Op::RecvB => {
                        let key = if a.op == Op::RecvF { (Op::SendF, a.stage - 1, a.mb) } else { (Op::SendB, a.stage + 1, a.mb) };
                        match mail.get(&key) {
                            Some(&t) => clock[r] = clock[r].max(t),
                            None => break,
                        }
                    }
                    Op::SendF | Op::SendB => {
                        mail.insert((a.op, a.stage, a.mb), clock[r] + costs.comm);
                    }
                    op => {
                        let start = clock[r];
                        clock[r] += costs.of(op);
                        busy[r] += costs.of(op);
                        timeline[r].push(Slot { action: a, start, end: clock[r] });
                        match op {
                            Op::F => {
                                live[r] += 1;
                                peak[r] = peak[r].max(live[r]);
                            }
                            Op::B | Op::W => live[r] -= 1,
                            _ => {}
                        }
                    }
                }
                pos[r] += 1;
                progressed = true;
            }
        }
        if (0..n).all(|r| pos[r] == plan.ranks[r].len()) {
            break;
        }
        if !progressed {
            let blocked: Vec<String> =
                (0..n).filter(|&r| pos[r] < plan.ranks[r].len()).map(|r| format!("rank {r} waits in {}", plan.ranks[r][pos[r]])).collect();
            return Err(ScheduleError::Deadlock(blocked.join(", ")));
        }
    }
    let makespan = clock.iter().cloned().fold(0.0, f64::max);
    let total: f64 = busy.iter().sum();
    let bubble_fraction = if makespan > 0.0 { 1.0 - total / (n as f64 * makespan) } else { 0.0 };
    Ok(Simulation { makespan, busy, bubble_fraction, peak_in_flight: peak, timeline })
}

/// A text grid of the simulated timeline, one column per `unit` of time: `F3` forward of
/// micro-batch 3, `B3`/`I3`/`W3` backwards, `.` idle. Stage numbers are shown when a rank has
/// several (`F3.1` = micro-batch 3 of stage 1).
pub fn render_grid(plan: &Plan, sim: &Simulation, unit: f64) -> String {
    let cols = (sim.makespan / unit).ceil() as usize;
    let multi = plan.shape.virtual_stages > 1;
    let mut out = String::new();
    for (r, slots) in sim.timeline.iter().enumerate() {
        let mut cells = vec![".".to_string(); cols];
        for s in slots {
            let label = match (s.action.op, multi) {
                (op, false) => format!("{op:?}{}", s.action.mb),
                (op, true) => format!("{op:?}{}.{}", s.action.mb, s.action.stage),
            };
            let (a, b) = ((s.start / unit).round() as usize, (s.end / unit).round() as usize);
            for c in cells.iter_mut().take(b.min(cols)).skip(a) {
                c.clone_from(&label);
            }
        }
        let width = cells.iter().map(|c| c.len()).max().unwrap_or(1);
        let row: Vec<String> = cells.iter().map(|c| format!("{c:>width$}")).collect();
        out.push_str(&format!("rank {r} | {}\n", row.join(" ")));
    }
    out
}
