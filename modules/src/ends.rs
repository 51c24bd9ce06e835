//! What runs before the first block and after the last one, shared by [`Gpt`](crate::Gpt),
//! the pipeline stages ([`crate::gpt_pipeline`]) and recompute ([`crate::recompute`]): the
//! embedding sum with its dropout, and the head (final norm, vocab-parallel logits with the
//! padded entries masked, cross-entropy).

use burn::module::Param;
use burn::tensor::{Int, Tensor};
use burn_parallel::mappings::{copy_to_tp, reduce_scatter_to_sp};
use burn_parallel::{Comm, ParallelBackend};

use crate::cross_entropy::vocab_parallel_cross_entropy;
use crate::dropout::ParallelDropout;
use crate::embedding::VocabParallelEmbedding;
use crate::layer_norm::ParallelLayerNorm;
use crate::tied_head::HeadWeight;

/// Embedding sum with dropout: `ids [b, s] → [b, s, h]`, or this rank's shard `[b, s/t, h]`
/// under sequence parallelism (the vocab-parallel partial sums are reduce-scattered along the
/// sequence, then this rank's positions added; `wpe` enters through f so its gradient is summed
/// over the TP group). Without `wpe` (RoPE) the token embedding alone. Under context parallelism
/// (`wte.cp`) `ids` are this rank's chunks and `wpe`'s rows are taken at their positions.
pub(crate) fn embed<B: ParallelBackend>(
    wte: &VocabParallelEmbedding<B>,
    wpe: Option<&Param<Tensor<B, 2>>>,
    drop: &ParallelDropout,
    ids: Tensor<B, 2, Int>,
    sequence_parallel: bool,
) -> Tensor<B, 3> {
    let [_, s] = ids.dims();
    let cp = wte.cp.as_ref().filter(|cp| cp.size() > 1);
    let positions: Vec<usize> = cp.map(|cp| cp.positions(s)).unwrap_or_default();
    if let Some(wpe) = wpe {
        let (max, longest) = (wpe.val().dims()[0], s * cp.map_or(1, |cp| cp.size()));
        assert!(longest <= max, "sequence length {longest} exceeds max_seq_len {max}");
    }
    // `wpe`'s rows at `positions[range]`: a slice of whole sequences, a gather of CP chunks.
    let rows = |w: Tensor<B, 2>, range: std::ops::Range<usize>| match cp {
        None => w.slice(range),
        Some(_) => {
            let at: Vec<i64> = positions[range].iter().map(|&p| p as i64).collect();
            let n = at.len();
            let device = w.device();
            w.select(0, Tensor::<B, 1, Int>::from_data(burn::tensor::TensorData::new(at, [n]), &device))
        }
    };
    if !sequence_parallel {
        let x = wte.forward(ids);
        return drop.forward(match wpe {
            Some(wpe) => x + rows(wpe.val(), 0..s).unsqueeze::<3>(),
            None => x,
        });
    }
    let (tp, t) = (&wte.tp, wte.tp.size());
    assert!(s % t == 0, "sequence length {s} is not divisible by tensor_parallel = {t} (sequence parallelism)");
    let (chunk, r) = (s / t, tp.rank());
    let x = reduce_scatter_to_sp(wte.forward_partial(ids), 1, tp);
    drop.forward(match wpe {
        Some(wpe) => x + rows(copy_to_tp(wpe.val(), tp), r * chunk..(r + 1) * chunk).unsqueeze::<3>(),
        None => x,
    })
}

/// Logits of padded vocabulary entries (ids ≥ the tokenizer's vocabulary): never sampled,
/// nothing in the softmax (`exp` underflows to 0), no gradient.
const PADDED_LOGIT: f32 = -1.0e30;

/// What runs after the last block: final layer norm, head, and where this rank's vocabulary
/// shard starts; `vocab_used` masks padded entries.
pub struct HeadRef<'a, B: ParallelBackend> {
    /// Final layer norm.
    pub ln_f: &'a ParallelLayerNorm<B>,
    /// Vocab-parallel head: its own weight, or the tied embedding's.
    pub head: HeadWeight<'a, B>,
    /// The TP group.
    pub tp: &'a Comm,
    /// First vocabulary id of this rank.
    pub vocab_start: usize,
    /// Ids from here on are padding (`None`: no padding).
    pub vocab_used: Option<usize>,
}

/// The head's vocab-parallel logits `[b, s, V/t]` of hidden states `x` (`[b, s, h]`, or a
/// `[b, s/t, h]` shard under SP, all-gathered along the sequence before the head); padded
/// entries masked.
pub(crate) fn head_logits<B: ParallelBackend>(h: &HeadRef<'_, B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
    let x = h.ln_f.forward(x);
    let logits = h.head.logits(x, h.ln_f.sequence_parallel, h.tp);
    let [b, s, v] = logits.dims();
    match h.vocab_used {
        Some(used) if used < h.vocab_start + v => {
            let ids = Tensor::<B, 1, Int>::arange(h.vocab_start as i64..(h.vocab_start + v) as i64, &logits.device());
            let pad = ids.greater_equal_elem(used as i64).reshape([1, 1, v]).expand([b, s, v]);
            logits.mask_fill(pad, PADDED_LOGIT)
        }
        _ => logits,
    }
}

/// Mean cross-entropy of the head's vocab-parallel logits for hidden states `x`; with `chunk`,
/// when no graph is recorded (a backend without autodiff, or a pipeline evaluation), `chunk`
/// token rows at a time (the f32 softmax of all `[b·s, V/t]` never exists; the value is the
/// same up to the order of the sum). Under autodiff the loss is whole: a chunked loss with a
/// graph keeps every chunk's softmax for the backward anyway, and Burn's slice backward fills
/// a full-size gradient per chunk (training chunks through `recompute`'s head instead).
pub(crate) fn head_loss<B: ParallelBackend>(h: &HeadRef<'_, B>, x: Tensor<B, 3>, targets: Tensor<B, 2, Int>, chunk: Option<usize>) -> Tensor<B, 1> {
    let logits = head_logits(h, x);
    let [b, s, v] = logits.dims();
    let untracked = !B::ad_enabled(&logits.device()) || burn_parallel::pipeline::evaluating();
    match chunk.filter(|_| untracked) {
        Some(rows) => crate::cross_entropy::chunked_loss_value(logits, targets.reshape([b * s]), h.vocab_start, h.tp, rows),
        None => vocab_parallel_cross_entropy(logits.reshape([b * s, v]), targets.reshape([b * s]), h.vocab_start, h.tp),
    }
}
