//! Vocab-parallel embedding (Megatron `VocabParallelEmbedding`).
//!
//! The table `E: [V, h]` is split on the vocabulary: rank r holds rows
//! `[r·V/t, (r+1)·V/t)`. Forward on token ids `[b, s]` (replicated): ids outside the local range
//! are looked up as row 0 and their output rows zeroed; the partial outputs are summed by g
//! (**all-reduce forward**, identity backward) into the replicated `[b, s, h]`. Each rank's
//! gradient touches only its own rows. With t = 1 it equals `burn::nn::Embedding`.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::tensor::module::embedding;
use burn::tensor::{Int, Tensor};
use burn_parallel::mappings::reduce_from_tp;
use burn_parallel::{Comm, ConfigError, ParallelBackend};

use crate::init::{check_divisible, param, shard, ParamInit};

/// Configuration of a [`VocabParallelEmbedding`].
#[derive(Config, Debug)]
pub struct VocabParallelEmbeddingConfig {
    /// Vocabulary size over all ranks (must be divisible by the TP size).
    pub n_embedding: usize,
    /// Embedding width.
    pub d_model: usize,
    /// Standard deviation of the normal init.
    #[config(default = 0.02)]
    pub init_std: f64,
}

/// Embedding table split by vocabulary rows over the TP group.
#[derive(Module, Debug)]
pub struct VocabParallelEmbedding<B: ParallelBackend> {
    /// Local rows `[V/t, h]`.
    pub weight: Param<Tensor<B, 2>>,
    /// First vocabulary id held here.
    pub vocab_start: usize,
    /// Number of ids held here.
    pub vocab_local: usize,
    /// The TP group.
    #[module(skip)]
    pub tp: Comm,
    /// The context-parallel group the model's sequences are split over (`None`: whole
    /// sequences): the position embedding takes this rank's positions. Set by
    /// `Gpt::with_context_parallel`.
    #[module(skip)]
    pub cp: Option<burn_parallel::ContextParallel>,
}

impl VocabParallelEmbeddingConfig {
    /// Builds this rank's shard.
    pub fn init<B: ParallelBackend>(&self, tp: &Comm, init: &ParamInit, device: &B::Device) -> Result<VocabParallelEmbedding<B>, ConfigError> {
        let local = check_divisible("vocab size", self.n_embedding, tp)?;
        let w = init.child("weight").normal(&[self.n_embedding, self.d_model], self.init_std);
        Ok(VocabParallelEmbedding { weight: param(shard(w, 0, tp), device), vocab_start: tp.rank() * local, vocab_local: local, tp: tp.clone(), cp: None })
    }
}

impl<B: ParallelBackend> VocabParallelEmbedding<B> {
    /// Token ids `[b, s]` → embeddings `[b, s, h]` (replicated).
    pub fn forward(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        if self.tp.size() == 1 {
            return embedding(self.weight.val(), ids);
        }
        reduce_from_tp(self.forward_partial(ids), &self.tp)
    }

    /// This rank's partial embeddings `[b, s, h]` (rows of ids it does not hold are zero), before
    /// any reduction — sequence parallelism reduce-scatters them instead.
    pub fn forward_partial(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        if self.tp.size() == 1 {
            return embedding(self.weight.val(), ids);
        }
        let local = ids.sub_scalar(self.vocab_start as i64);
        let outside = local.clone().lower_elem(0).bool_or(local.clone().greater_equal_elem(self.vocab_local as i64));
        let local = local.mask_fill(outside.clone(), 0);
        let weight = self.weight.val();
        let keep = burn_parallel::precision::like(outside.bool_not().float(), &weight).unsqueeze_dim::<3>(2);
        embedding(weight, local) * keep
    }
}
