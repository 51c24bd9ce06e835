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
//! (no `s²` tensor kept) it reruns nothing.

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
}

/// A recompute mode name that does not exist.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown recompute mode {0:?} (choose none, selective or full)")]
pub struct UnknownRecompute(pub String);

impl std::str::FromStr for Recompute {
    type Err = UnknownRecompute;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(Self::None),
            "selective" => Ok(Self::Selective),
            "full" => Ok(Self::Full),
            other => Err(UnknownRecompute(other.to_string())),
        }
    }
}

impl std::fmt::Display for Recompute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::None => "none",
            Self::Selective => "selective",
            Self::Full => "full",
        })
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
        assert_eq!("some".parse::<Recompute>().unwrap_err().to_string(), "unknown recompute mode \"some\" (choose none, selective or full)");
        let s = StreamCounter::new("x");
        s.set(3);
        let snap = StreamSnapshot::take(vec![s.clone()]);
        s.next();
        snap.restore();
        assert_eq!(s.get(), 3);
    }
}
