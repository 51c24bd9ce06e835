//! The output head of a GPT with tied embeddings (GPT-2's, Megatron's default): logits are
//! `x · Eᵀ`, where `E [V, h]` is the token embedding.
//!
//! Per TP rank the head uses the embedding's vocabulary shard `E_r [V/t, h]` (rows
//! `[r·V/t, (r+1)·V/t)`): `logits_r = f(x) · E_rᵀ`, `[b, s, h] → [b, s, V/t]`, exactly the
//! column-parallel head with `W_r = E_rᵀ` (f: identity forward, all-reduce backward; under
//! sequence parallelism the all-gather along the sequence, reduce-scatter backward).
//!
//! Where the model is whole on a rank (no pipeline) the head reads the embedding's own parameter
//! ([`HeadWeight::Tied`]): autodiff sums the lookup's and the head's gradients into it. A
//! pipeline's last stage holds a **replica**, [`TiedHead`], initialised from the same stream as
//! the embedding; its gradient is summed with the first stage's after the DP reduction
//! (`DistAdamW::tie`, or `PipelineExecutor::all_reduce_tied_grads`) so both take the same steps. `burn_parallel::sharding::is_stage_replica` names it:
//! the global gradient norm counts it once and checkpoints hold only the first stage's copy
//! (the replica loads it back as `wte.weight`).

use burn::module::{Module, Param};
use burn::tensor::Tensor;
use burn_parallel::mappings::{copy_to_tp, gather_from_sp};
use burn_parallel::{Comm, ConfigError, ParallelBackend};

use crate::column_linear::ColumnLinear;
use crate::embedding::VocabParallelEmbeddingConfig;
use crate::init::ParamInit;

/// The last pipeline stage's replica of the tied token embedding: `[V/t, h]`, this TP rank's
/// vocabulary rows.
#[derive(Module, Debug)]
pub struct TiedHead<B: ParallelBackend> {
    /// Local rows `[V/t, h]`, equal to the first stage's `wte.weight`.
    pub weight: Param<Tensor<B, 2>>,
}

impl<B: ParallelBackend> TiedHead<B> {
    /// The replica of the embedding `config` builds from `init` (the same stream, so the same
    /// values as the first stage's).
    pub fn init(config: &VocabParallelEmbeddingConfig, tp: &Comm, init: &ParamInit, device: &B::Device) -> Result<Self, ConfigError> {
        Ok(Self { weight: config.init::<B>(tp, init, device)?.weight })
    }
}

/// The weight of a GPT head: its own column-parallel linear (untied), or the token embedding's
/// table (tied: the embedding's parameter itself, or a pipeline stage's replica of it).
#[derive(Debug, Clone, Copy)]
pub enum HeadWeight<'a, B: ParallelBackend> {
    /// An untied head `[h, V/t]`.
    Own(&'a ColumnLinear<B>),
    /// The embedding table `[V/t, h]`, used transposed.
    Tied(&'a Param<Tensor<B, 2>>),
}

impl<B: ParallelBackend> HeadWeight<'_, B> {
    /// This rank's logits `[b, s, V/t]` of `x`: replicated `[b, s, h]`, or under sequence
    /// parallelism (`sp`) this rank's shard `[b, s/t, h]`, all-gathered along the sequence first.
    pub fn logits(&self, x: Tensor<B, 3>, sp: bool, tp: &Comm) -> Tensor<B, 3> {
        match self {
            HeadWeight::Own(head) if sp => head.forward_sp(x),
            HeadWeight::Own(head) => head.forward(x),
            HeadWeight::Tied(table) => {
                let x = if sp { gather_from_sp(x, 1, tp) } else { copy_to_tp(x, tp) };
                crate::init::linear_rows(x, table.val().transpose(), None)
            }
        }
    }
}
