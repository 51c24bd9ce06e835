//! Activation recompute: what a forward keeps for the backward.
//!
//! Burn 0.21 recomputes only single memory-bound ops (`BalancedCheckpointing`); it cannot rerun
//! a region inside another backward (a nested `backward()` would lock the graph it runs in). So
//! block recompute is a **chain of VJPs**, as the pipeline executor backpropagates a stage: the
//! forward runs each recomputed region without an autodiff graph (detached inputs and
//! parameters, [`detached`]) and keeps its input; the backward walks the regions in reverse,
//! reruns each with a graph from its saved input (a fresh leaf), and backpropagates the
//! received gradient through it ([`crate::backward_with`]). Dropout masks are replayed: each
//! region's random-stream counters are saved before its first run, and the rerun draws from
//! them ([`StreamSnapshot::replay`], which then puts the counters back, so micro-batches in
//! flight in between keep their own masks): both runs draw the same masks and the gradients
//! equal those without recompute, bit for bit.
//!
//! Modes (Megatron's): [`Recompute::Full`] keeps only each transformer block's input
//! (`2·s·b·h` bytes in bf16) and reruns the whole block (+1 forward of the blocks);
//! [`Recompute::Selective`] keeps everything but the attention core (scores, softmax,
//! dropout: the `5·a·s²·b` term) and reruns only the core; with a fused or chunked core
//! (no `s²` tensor kept) it reruns nothing. [`Recompute::Blocks`]`(n)` (`full:N`, Megatron's
//! `--recompute-method block --recompute-num-layers N`) recomputes the first `n` blocks of each
//! pipeline stage (of each model chunk with virtual stages) as `Full` and keeps the others'
//! graphs: between none and full, memory for compute, one block at a time.

use burn::module::{AutodiffModule, Module, ModuleMapper, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;

use crate::rng::StreamCounter;

/// What to recompute in the backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize)]
pub enum Recompute {
    /// Keep every activation the graph needs.
    #[default]
    None,
    /// Rerun the attention core (scores, softmax, dropout) of each block.
    Selective,
    /// Keep each block's input only; rerun the whole block.
    Full,
    /// `Full` for the first `n` blocks of each stage (each model chunk); the others keep their
    /// whole graph (`n` past the stage's blocks: `Full`; 0: `None`).
    Blocks(usize),
}

impl Recompute {
    /// The mode of block `i` (0-based, within its stage or model chunk): never `Blocks`.
    pub fn for_block(self, i: usize) -> Recompute {
        match self {
            Self::Blocks(n) if i < n => Self::Full,
            Self::Blocks(_) => Self::None,
            mode => mode,
        }
    }
}

/// A recompute mode name that does not exist.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown recompute mode {0:?} (choose none, selective, full, or full:N for the first N blocks of each stage)")]
pub struct UnknownRecompute(pub String);

impl std::str::FromStr for Recompute {
    type Err = UnknownRecompute;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(Self::None),
            "selective" => Ok(Self::Selective),
            "full" => Ok(Self::Full),
            other => match other.strip_prefix("full:").map(str::parse) {
                Some(Ok(n)) => Ok(Self::Blocks(n)),
                _ => Err(UnknownRecompute(other.to_string())),
            },
        }
    }
}

impl std::fmt::Display for Recompute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::None => f.write_str("none"),
            Self::Selective => f.write_str("selective"),
            Self::Full => f.write_str("full"),
            Self::Blocks(n) => write!(f, "full:{n}"),
        }
    }
}

/// The counts of some random streams at one moment, to replay their draws.
#[derive(Debug, Clone)]
pub struct StreamSnapshot(Vec<(StreamCounter, u64)>);

impl StreamSnapshot {
    /// The current counts of `streams`.
    pub fn take(streams: Vec<StreamCounter>) -> Self {
        Self(streams.into_iter().map(|s| (s.clone(), s.get())).collect())
    }

    /// Sets every stream back to its count in the snapshot.
    pub fn restore(&self) {
        for (s, n) in &self.0 {
            s.set(*n);
        }
    }

    /// Runs `rerun` with the streams at their snapshot counts (so it draws the masks the first
    /// run drew), then puts the streams back where they were: draws made since the snapshot
    /// (other micro-batches in flight) are neither repeated nor skipped.
    pub fn replay<R>(&self, rerun: impl FnOnce() -> R) -> R {
        let now = StreamSnapshot(self.0.iter().map(|(s, _)| (s.clone(), s.get())).collect());
        self.restore();
        let out = rerun();
        now.restore();
        out
    }
}

struct Detach;

impl<B: Backend> ModuleMapper<B> for Detach {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        param.map(|t| t.detach()).set_require_grad(false)
    }
}

/// A shallow copy of `module` whose parameters record no autodiff graph (a recomputed
/// region's first, graph-free run).
pub fn detached<B: Backend, M: Module<B>>(module: &M) -> M {
    module.clone().map(&mut Detach)
}

/// Moves the gradients of `module`'s parameters from `from` into `into` (adding where both
/// have one).
pub fn merge_grads<B: AutodiffBackend, M: AutodiffModule<B>>(module: &M, into: &mut GradientsParams, mut from: GradientsParams) {
    struct Merge<'a> {
        into: &'a mut GradientsParams,
        from: &'a mut GradientsParams,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Merge<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let Some(g) = self.from.remove::<B::InnerBackend, D>(param.id) {
                let g = match self.into.remove::<B::InnerBackend, D>(param.id) {
                    Some(prev) => prev + g,
                    None => g,
                };
                self.into.register::<B::InnerBackend, D>(param.id, g);
            }
        }
    }
    module.visit(&mut Merge { into, from: &mut from });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!("selective".parse::<Recompute>(), Ok(Recompute::Selective));
        assert_eq!("full:2".parse::<Recompute>(), Ok(Recompute::Blocks(2)));
        assert_eq!(Recompute::Blocks(3).to_string(), "full:3");
        for bad in ["some", "full:", "full:-1", "full:x"] {
            let e = bad.parse::<Recompute>().unwrap_err().to_string();
            assert_eq!(e, format!("unknown recompute mode {bad:?} (choose none, selective, full, or full:N for the first N blocks of each stage)"));
        }
        let modes: Vec<_> = (0..4).map(|i| Recompute::Blocks(2).for_block(i)).collect();
        assert_eq!(modes, [Recompute::Full, Recompute::Full, Recompute::None, Recompute::None]);
        assert_eq!(Recompute::Selective.for_block(5), Recompute::Selective);
        let s = StreamCounter::new("x");
        s.set(3);
        let snap = StreamSnapshot::take(vec![s.clone()]);
        s.next();
        snap.restore();
        assert_eq!(s.get(), 3);
    }
}
