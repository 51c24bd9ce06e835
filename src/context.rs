//! Context parallelism: each sample's sequence split over the `C` ranks of a context-parallel
//! group (Megatron-Core's `--context-parallel-size`, torchtitan's context parallel), for
//! sequences whose activations do not fit one rank.
//!
//! **Layout** (Megatron's load balancing for causal attention): a sequence of `s` tokens is cut
//! into `2C` chunks of `s/(2C)`; rank `r` holds chunks `r` and `2C−1−r`, in that order
//! ([`chunk_positions`]), so every rank gets the same share of the causal triangle. Token-wise
//! layers (embeddings, norms, MLPs, the loss) run on the rank's `s/C` tokens unchanged; the
//! learned position embedding takes the rows of the rank's positions, RoPE rotates by them.
//!
//! **Attention** is where the ranks meet: each rank all-gathers the keys and values of the whole
//! sequence over the CP group ([`ContextParallel::gather`]: **all-gather forward,
//! reduce-scatter backward**, so every query's contribution to `dK`, `dV` reaches the rank
//! holding that token), and its queries `[b, H/t, s/C, d]` attend to the gathered `[b, H/t, s, d]`
//! under the causal mask of their positions (key position ≤ query position): the composed core's
//! `[b, H/t, s/C, s]` scores, or, on the keys put in position order, the chunked core (each query
//! chunk against the keys up to its end, `causal_attention_chunked_at`) or the fused flash
//! kernels (each of the rank's two chunks in one launch at its offset, `causal_attention_at`):
//! no `s/C × s` tensor.
//! This is the all-gather of keys and values that Llama 3's training used; Megatron overlaps a
//! ring of send/recv with the attention instead.
//!
//! **Loss and gradients**: a rank's loss is the mean over its `s/C` tokens, so the mean over the
//! group is the sample's; the parameters are replicated over the group and their gradients are
//! averaged together with the data-parallel replicas' (the DP group of
//! [`ProcessGroups`](crate::ProcessGroups) holds `D·C` ranks): the unsplit model's gradient.
//!
//! ```
//! use burn_parallel::context::chunk_positions;
//! // 16 tokens over 2 ranks: chunks of 4, rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2.
//! assert_eq!(chunk_positions(0, 2, 8), vec![0, 1, 2, 3, 12, 13, 14, 15]);
//! assert_eq!(chunk_positions(1, 2, 8), vec![4, 5, 6, 7, 8, 9, 10, 11]);
//! ```

use burn::tensor::backend::Backend;
use burn::tensor::{BasicOps, Tensor, TensorData};

use crate::collective::CollectiveBackend;
use crate::comm::{concat_along, split_along};
use crate::{Comm, ConfigError};

/// The positions (in the whole sequence) of the `local` tokens rank `rank` of `size` holds:
/// chunks `rank` and `2·size − 1 − rank` of `local / 2` tokens each; `0..local` for one rank.
///
/// # Panics
/// If `size > 1` and `local` is odd (see [`check_seq_len`]).
pub fn chunk_positions(rank: usize, size: usize, local: usize) -> Vec<usize> {
    if size <= 1 {
        return (0..local).collect();
    }
    assert!(local.is_multiple_of(2), "context parallelism: {local} tokens per rank cannot form two chunks");
    let n = local / 2;
    let late = 2 * size - 1 - rank;
    (rank * n..(rank + 1) * n).chain(late * n..(late + 1) * n).collect()
}

/// Checks that a sequence of `seq` tokens splits into the `2·cp` equal chunks of context
/// parallelism.
pub fn check_seq_len(seq: usize, cp: usize) -> Result<(), ConfigError> {
    if cp > 1 && !seq.is_multiple_of(2 * cp) {
        return Err(ConfigError::NotDivisible {
            what: "sequence length",
            value: seq,
            degree_name: "2 × context_parallel (two chunks per rank)",
            degree: 2 * cp,
        });
    }
    Ok(())
}

/// One rank's view of its context-parallel group (see the module docs).
#[derive(Clone)]
pub struct ContextParallel {
    comm: Comm,
}

impl std::fmt::Debug for ContextParallel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ContextParallel(rank {} of {})", self.comm.rank(), self.comm.size())
    }
}

impl ContextParallel {
    /// Context parallelism over `comm` (the CP group of [`ProcessGroups`](crate::ProcessGroups)).
    pub fn new(comm: Comm) -> Self {
        Self { comm }
    }

    /// The CP group.
    pub fn comm(&self) -> &Comm {
        &self.comm
    }

    /// The number of ranks sharing a sequence.
    pub fn size(&self) -> usize {
        self.comm.size()
    }

    /// This rank's index in the group.
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    /// Positions of this rank's `local` tokens ([`chunk_positions`]).
    pub fn positions(&self, local: usize) -> Vec<usize> {
        chunk_positions(self.rank(), self.size(), local)
    }

    /// Positions of the rows of a [`gather`](Self::gather)ed sequence: each rank's positions in
    /// rank order.
    pub fn gathered_positions(&self, local: usize) -> Vec<usize> {
        (0..self.size()).flat_map(|r| chunk_positions(r, self.size(), local)).collect()
    }

    /// This rank's chunks of whole-sequence host data (`dim`: the sequence), e.g. the token ids
    /// and targets `[b, s]` → `[b, s/C]`.
    pub fn split_data(&self, data: &TensorData, dim: usize) -> Result<TensorData, String> {
        let c = self.size();
        if c == 1 {
            return Ok(data.clone());
        }
        let s = data.shape[dim];
        check_seq_len(s, c).map_err(|e| e.to_string())?;
        let early = split_along(data, dim, 2 * c, self.rank())?;
        let late = split_along(data, dim, 2 * c, 2 * c - 1 - self.rank())?;
        concat_along(&[&early, &late], dim)
    }

    /// This rank's chunks of a whole-sequence tensor along `dim` (no communication; the
    /// gradient flows back into those rows).
    pub fn split<B: Backend, const D: usize, K: BasicOps<B>>(&self, x: Tensor<B, D, K>, dim: usize) -> Tensor<B, D, K> {
        let c = self.size();
        if c == 1 {
            return x;
        }
        let s = x.dims()[dim];
        assert!(s.is_multiple_of(2 * c), "context parallelism: {s} tokens do not split into {} chunks", 2 * c);
        let n = s / (2 * c);
        let (r, late) = (self.rank(), 2 * c - 1 - self.rank());
        Tensor::cat(vec![x.clone().narrow(dim, r * n, n), x.narrow(dim, late * n, n)], dim)
    }

    /// A [`gather`](Self::gather)ed tensor's rows put in position order along `dim` (chunk `j`
    /// is the first half of rank `j`'s rows for `j < C`, else the second half of rank
    /// `2C−1−j`'s); a copy, the gradient flows back.
    pub fn to_position_order<B: Backend, const D: usize, K: BasicOps<B>>(&self, x: Tensor<B, D, K>, dim: usize) -> Tensor<B, D, K> {
        let c = self.size();
        if c == 1 {
            return x;
        }
        let n = x.dims()[dim] / (2 * c);
        let at = |j: usize| if j < c { 2 * j * n } else { (2 * (2 * c - 1 - j) + 1) * n };
        Tensor::cat((0..2 * c).map(|j| x.clone().narrow(dim, at(j), n)).collect(), dim)
    }

    /// All-gather of every rank's rows along `dim` in rank order (rows at
    /// [`gathered_positions`](Self::gathered_positions)); backward: reduce-scatter.
    pub fn gather<B: CollectiveBackend, const D: usize>(&self, x: Tensor<B, D>, dim: usize) -> Tensor<B, D> {
        if self.size() == 1 {
            return x;
        }
        crate::mappings::gather_from_sp(x, dim, &self.comm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_position_once_and_equal_causal_work() {
        for c in [1, 2, 3, 4] {
            let local = 6;
            let all: Vec<usize> = (0..c).flat_map(|r| chunk_positions(r, c, local)).collect();
            let mut sorted = all.clone();
            sorted.sort();
            assert_eq!(sorted, (0..c * local).collect::<Vec<_>>(), "cp {c}");
            // Causal work of a rank: Σ (position + 1) over its queries, the same on every rank.
            let work: Vec<usize> = (0..c).map(|r| chunk_positions(r, c, local).iter().map(|p| p + 1).sum()).collect();
            assert!(work.iter().all(|w| *w == work[0]), "cp {c}: {work:?}");
        }
    }

    #[test]
    fn odd_chunks_are_refused() {
        assert!(check_seq_len(8, 2).is_ok() && check_seq_len(7, 1).is_ok());
        let e = check_seq_len(12, 4).unwrap_err().to_string();
        assert_eq!(e, "sequence length = 12 is not divisible by 2 × context_parallel (two chunks per rank) = 8");
    }
}
