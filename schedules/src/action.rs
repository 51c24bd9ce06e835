//! The action IR: what one pipeline rank does, in order.
//!
//! Compact form as in torch.distributed.pipelining: `2F0` = stage 2 forward of micro-batch 0,
//! `1B3` full backward, `0I2` input-gradient backward, `0W2` weight-gradient backward,
//! `3SEND_F1` stage 3 sends micro-batch 1's activation to stage 4, `1RECV_B0` stage 1 receives
//! micro-batch 0's output gradient from stage 2.

use std::fmt;
use std::str::FromStr;

use crate::error::ScheduleError;

/// The kind of an action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    /// Forward of a stage.
    F,
    /// Full backward (input and weight gradients).
    B,
    /// Backward for the input gradient only (zero-bubble split).
    I,
    /// Backward for the weight gradient only (zero-bubble split).
    W,
    /// Send this stage's output activation to the next stage.
    SendF,
    /// Receive this stage's input activation from the previous stage.
    RecvF,
    /// Send the gradient of this stage's input to the previous stage.
    SendB,
    /// Receive the gradient of this stage's output from the next stage.
    RecvB,
}

impl Op {
    /// Forward or backward computation (not communication).
    pub fn is_compute(self) -> bool {
        matches!(self, Op::F | Op::B | Op::I | Op::W)
    }
}

/// One action of one rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Action {
    /// What.
    pub op: Op,
    /// Which (global) stage.
    pub stage: usize,
    /// Which micro-batch.
    pub mb: usize,
}

impl Action {
    /// `op` of `stage` on micro-batch `mb`.
    pub fn new(op: Op, stage: usize, mb: usize) -> Self {
        Self { op, stage, mb }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let op = match self.op {
            Op::F => "F",
            Op::B => "B",
            Op::I => "I",
            Op::W => "W",
            Op::SendF => "SEND_F",
            Op::RecvF => "RECV_F",
            Op::SendB => "SEND_B",
            Op::RecvB => "RECV_B",
        };
        write!(f, "{}{op}{}", self.stage, self.mb)
    }
}

impl FromStr for Action {
    type Err = ScheduleError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ScheduleError::Parse(format!("cannot parse action {s:?} (expected e.g. 2F0, 1B3, 0I2, 0W2, 3SEND_F1, 1RECV_B0)"));
        let s = s.trim();
        let digits_end = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        let tail_start = s.rfind(|c: char| !c.is_ascii_digit()).ok_or_else(bad)? + 1;
        if digits_end == 0 || tail_start >= s.len() || tail_start <= digits_end {
            return Err(bad());
        }
        let stage = s[..digits_end].parse().map_err(|_| bad())?;
        let mb = s[tail_start..].parse().map_err(|_| bad())?;
        let op = match &s[digits_end..tail_start] {
            "F" => Op::F,
            "B" => Op::B,
            "I" => Op::I,
            "W" => Op::W,
            "SEND_F" => Op::SendF,
            "RECV_F" => Op::RecvF,
            "SEND_B" => Op::SendB,
            "RECV_B" => Op::RecvB,
            _ => return Err(bad()),
        };
        Ok(Action { op, stage, mb })
    }
}

/// The layout of a pipeline: `ranks` ranks, `virtual_stages` model chunks per rank (stages
/// `ranks · virtual_stages` in all, stage `s` on rank `s % ranks`: chunk `c` of rank `r` is stage
/// `c·ranks + r`, Megatron's interleaved placement), and `microbatches` per step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PipelineShape {
    /// Pipeline ranks.
    pub ranks: usize,
    /// Chunks (stages) per rank.
    pub virtual_stages: usize,
    /// Micro-batches per step.
    pub microbatches: usize,
}

impl PipelineShape {
    /// A shape; see the type docs.
    pub fn new(ranks: usize, virtual_stages: usize, microbatches: usize) -> Self {
        Self { ranks, virtual_stages, microbatches }
    }

    /// Total stages.
    pub fn stages(&self) -> usize {
        self.ranks * self.virtual_stages
    }

    /// The rank that runs `stage`.
    pub fn rank_of(&self, stage: usize) -> usize {
        stage % self.ranks
    }

    /// The stages of `rank`, chunk order.
    pub fn stages_of(&self, rank: usize) -> Vec<usize> {
        (0..self.virtual_stages).map(|c| c * self.ranks + rank).collect()
    }

    /// Checks that every count is at least 1.
    pub fn check(&self) -> Result<(), ScheduleError> {
        if self.ranks == 0 || self.virtual_stages == 0 || self.microbatches == 0 {
            return Err(ScheduleError::InvalidShape(format!(
                "ranks {}, virtual stages {} and micro-batches {} must all be at least 1",
                self.ranks, self.virtual_stages, self.microbatches
            )));
        }
        Ok(())
    }
}

/// A complete plan: for each rank, its ordered actions (computation and communication).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The layout it is for.
    pub shape: PipelineShape,
    /// Per rank, the actions in execution order.
    pub ranks: Vec<Vec<Action>>,
}

impl Plan {
    /// Parses one line per rank of space-separated actions (e.g. `0F0 0SEND_F0 0RECV_B0 0B0`).
    pub fn parse(shape: PipelineShape, text: &str) -> Result<Self, ScheduleError> {
        let ranks = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let l = l.split_once(':').map_or(l, |(_, rest)| rest);
                l.split_whitespace().map(str::parse).collect::<Result<Vec<Action>, _>>()
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Plan { shape, ranks })
    }

    /// The computation actions of `rank` (no communication).
    pub fn compute(&self, rank: usize) -> Vec<Action> {
        self.ranks[rank].iter().copied().filter(|a| a.op.is_compute()).collect()
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (r, actions) in self.ranks.iter().enumerate() {
            let line: Vec<String> = actions.iter().map(|a| a.to_string()).collect();
            writeln!(f, "rank {r}: {}", line.join(" "))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_roundtrip_through_text() {
        for s in ["2F0", "1B3", "0I2", "0W12", "3SEND_F1", "1RECV_B0", "10RECV_F7", "0SEND_B4"] {
            assert_eq!(s.parse::<Action>().unwrap().to_string(), s);
        }
        for s in ["F0", "2X0", "2F", "", "SEND_F"] {
            assert!(s.parse::<Action>().is_err(), "{s}");
        }
        let shape = PipelineShape::new(2, 1, 1);
        let plan = Plan::parse(shape, "rank 0: 0F0 0SEND_F0 0RECV_B0 0B0\n1RECV_F0 1F0 1B0 1SEND_B0").unwrap();
        assert_eq!(plan.to_string(), "rank 0: 0F0 0SEND_F0 0RECV_B0 0B0\nrank 1: 1RECV_F0 1F0 1B0 1SEND_B0\n");
        assert_eq!(shape.stages_of(1), vec![1]);
        assert_eq!(PipelineShape::new(4, 2, 8).stages_of(1), vec![1, 5]);
    }
}
