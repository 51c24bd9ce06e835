//! Training data: tokenizers (bytes, GPT-2's BPE, Llama 3's from its file), token shards, and the data position as a
//! global sample counter.
//!
//! Training consumes samples `0, 1, 2, ...` of one global stream; sample `i` is a window of a
//! token sequence whose start is drawn from `(seed, stream, i)` alone. A step of a data-parallel
//! run with `d` replicas of `b` samples each takes the next `d·b` samples, replica `r` the
//! `r`-th block of `b`: so the data a step sees depends only on the counter and the global batch
//! size, not on how it is split, and a checkpoint that stores the counter
//! ([`TrainState::samples_seen`](crate::checkpoint::TrainState)) resumes the data order at any
//! data-parallel degree (Megatron's consumed-samples counter). With several datasets, [`Blend`]
//! says which one sample `i` comes from, by their weights, from `i` alone.

mod blend;
mod llama3;
mod prepare;
pub mod shards;
pub mod tokenizer;

use std::ops::Range;

pub use blend::{Blend, BlendError};
#[doc(hidden)]
pub use llama3::write_cl100k_tiktoken;
pub use prepare::{prepare, prepare_files, InputFormat, PrepareOptions, Prepared, PIECE_BYTES};
pub use shards::{write_shard, ShardError, TokenShards};
pub use tokenizer::{padded_vocab, Llama3Bpe, Tokenizer, TokenizerError};

use crate::rng::HostRng;

/// Draws the window of each global sample index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlobalSampler {
    /// Run seed.
    pub seed: u64,
    /// Stream name (e.g. `train`, `val`): different splits draw independently.
    pub stream: String,
}

impl GlobalSampler {
    /// A sampler of `stream` under `seed`.
    pub fn new(seed: u64, stream: impl Into<String>) -> Self {
        Self { seed, stream: stream.into() }
    }

    /// The start of sample `index`'s window of `window` tokens in a sequence of `len` tokens
    /// (uniform over the `len - window + 1` starts). Panics if `len < window`.
    pub fn window_start(&self, index: u64, len: usize, window: usize) -> usize {
        assert!(len >= window, "a sequence of {len} tokens holds no window of {window}");
        let starts = (len - window + 1) as u64;
        (HostRng::new(self.seed, &format!("{}:{index}", self.stream)).next_u64() % starts) as usize
    }

    /// The samples data-parallel replica `dp_rank` takes in a step that starts at global
    /// counter `samples_seen`, `per_replica` samples per replica.
    pub fn replica_samples(samples_seen: u64, per_replica: usize, dp_rank: usize) -> Range<u64> {
        let start = samples_seen + (dp_rank * per_replica) as u64;
        start..start + per_replica as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicas_split_the_global_stream_the_same_way_at_any_degree() {
        // Two replicas of 4 take the same 8 samples as one replica of 8.
        let one = GlobalSampler::replica_samples(16, 8, 0);
        let (a, b) = (GlobalSampler::replica_samples(16, 4, 0), GlobalSampler::replica_samples(16, 4, 1));
        assert_eq!(one, 16..24);
        assert_eq!((a, b), (16..20, 20..24));
        let s = GlobalSampler::new(3, "train");
        let starts: Vec<usize> = (0..200).map(|i| s.window_start(i, 100, 10)).collect();
        assert!(starts.iter().all(|&x| x <= 90));
        let distinct: std::collections::BTreeSet<usize> = starts.iter().copied().collect();
        assert!(distinct.len() > 60, "{} distinct starts of 91", distinct.len());
        assert_ne!(starts, (0..200).map(|i| GlobalSampler::new(4, "train").window_start(i, 100, 10)).collect::<Vec<_>>());
        assert_eq!(s.window_start(5, 11, 11), 0);
    }
}
