//! The GPT under context parallelism (`burn_parallel::context`): switching a model to a
//! context-parallel group, back to whole sequences, and the sequence-length check.

use burn_parallel::{ConfigError, ParallelBackend};

use crate::block::TransformerBlock;
use crate::embedding::VocabParallelEmbedding;
use crate::gpt::{Gpt, GptConfig};

impl GptConfig {
    /// Checks a whole sequence length against `max_seq_len`, context parallelism's `2·cp`
    /// chunks and, under sequence parallelism, the TP size (of a rank's `seq_len / cp` tokens).
    pub fn check_seq_len_cp(&self, seq_len: usize, tp: usize, cp: usize) -> Result<(), ConfigError> {
        burn_parallel::context::check_seq_len(seq_len, cp)?;
        if cp <= 1 {
            return self.check_seq_len(seq_len, tp);
        }
        self.check_seq_len(seq_len, 1)?;
        if self.sequence_parallel && !(seq_len / cp).is_multiple_of(tp) {
            let (what, value, degree_name) = ("sequence length / context_parallel", seq_len / cp, "tensor_parallel (sequence parallelism)");
            return Err(ConfigError::NotDivisible { what, value, degree_name, degree: tp });
        }
        Ok(())
    }
}

impl<B: ParallelBackend> Gpt<B> {
    /// The same model with each sequence split over the context-parallel group `cp`
    /// (`burn_parallel::context`; a group of one: whole sequences): the `ids` and `targets` it
    /// is given are then this rank's chunks (`ContextParallel::split_data` of the whole
    /// `[b, s]`), its logits theirs, and its loss their mean; average the gradients over the DP
    /// group (which holds the CP ranks). Each block's keys and values are all-gathered over
    /// `cp`; every attention core takes them (the fused and chunked ones query chunk by query
    /// chunk at the chunk's positions).
    pub fn with_context_parallel(mut self, cp: burn_parallel::ContextParallel) -> Self {
        attach_context_parallel(Some(&mut self.wte), &mut self.blocks, cp);
        self
    }

    /// The same model without context parallelism (parameters shared): it takes whole
    /// sequences again (generation).
    pub(crate) fn whole_sequences(mut self) -> Self {
        self.wte.cp = None;
        for b in &mut self.blocks {
            b.attn.cp = None;
        }
        self
    }
}

/// Sets `cp` on the embedding (its positions) and on every block's attention (see
/// [`Gpt::with_context_parallel`]).
pub(crate) fn attach_context_parallel<B: ParallelBackend>(
    wte: Option<&mut VocabParallelEmbedding<B>>,
    blocks: &mut [TransformerBlock<B>],
    cp: burn_parallel::ContextParallel,
) {
    if let Some(wte) = wte {
        wte.cp = Some(cp.clone());
    }
    for b in blocks {
        b.attn.cp = Some(cp.clone());
    }
}
