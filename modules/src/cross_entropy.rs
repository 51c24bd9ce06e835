//! Vocab-parallel cross-entropy (Megatron `vocab_parallel_cross_entropy`).
//!
//! Logits arrive split on the vocabulary, `z_r: [N, V/t]` (rank r holds ids
//! `[r·V/t, (r+1)·V/t)`), targets `[N]` replicated. Forward:
//! `m = all-reduce-max(max_j z_r)` (a constant: no gradient), `s = g(Σ_j exp(z_r − m))`,
//! `z_y = g(z_r[y] if y is local else 0)`, `loss_i = log s − (z_y − m)`, mean over `N`.
//! g is all-reduce forward / identity backward, so the backward is **local**:
//! `∂loss/∂z_r = (softmax − onehot)_r / N` on each rank's own shard. The full `[N, V]` logits are
//! never materialised. With t = 1 it equals `burn::nn::loss::CrossEntropyLoss`.

use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{IndexingUpdateOp, Int, Tensor};
use burn_parallel::collective::expect_comm;
use burn_parallel::comm::ops::all_reduce;
use burn_parallel::mappings::reduce_from_tp;
use burn_parallel::{Comm, ParallelBackend, ReduceOp};

/// Per-token losses `[N]` of vocab-parallel `logits: [N, V/t]` against `targets: [N]`; this rank
/// holds vocabulary ids `[vocab_start, vocab_start + V/t)`.
///
/// Every target must be a vocabulary id: there is no ignore index (as in Megatron; mask the loss
/// instead). A target outside `[0, V)` would silently count as `log Σ exp`; builds with debug
/// assertions check (one read of the targets) and panic naming it.
pub fn vocab_parallel_cross_entropy_per_token<B: ParallelBackend>(
    logits: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
    vocab_start: usize,
    tp: &Comm,
) -> Tensor<B, 1> {
    per_token_with_stats(logits, targets, vocab_start, tp).0
}

/// Per-token losses `[N]` and each row's softmax statistics: the global max `m` and
/// `s = Σ_V exp(z − m)` (`[N, 1]` f32 each, detached).
fn per_token_with_stats<B: ParallelBackend>(
    logits: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
    vocab_start: usize,
    tp: &Comm,
) -> (Tensor<B, 1>, Tensor<B, 2>, Tensor<B, 2>) {
    // Log-sum-exp in f32 whatever the compute dtype (no-op for f32 logits).
    let logits = burn_parallel::precision::to_f32(logits);
    let [_, v_local] = logits.dims();
    if cfg!(debug_assertions) {
        let vocab = (v_local * tp.size()) as i64;
        let ids = targets.clone().into_data().convert::<i64>().into_vec::<i64>().expect("integer targets");
        if let Some(t) = ids.iter().find(|&&t| !(0..vocab).contains(&t)) {
            panic!("vocab_parallel_cross_entropy: target {t} is outside the vocabulary [0, {vocab}) (no ignore index: mask the loss instead)");
        }
    }
    let local_max = logits.clone().detach().max_dim(1);
    let max = if tp.size() == 1 { local_max } else { expect_comm(all_reduce(local_max, ReduceOp::Max, tp)) };
    let shifted = logits - max.clone();
    let sum_exp = reduce_from_tp(shifted.clone().exp().sum_dim(1), tp);
    let local_t = targets.sub_scalar(vocab_start as i64);
    let outside = local_t.clone().lower_elem(0).bool_or(local_t.clone().greater_equal_elem(v_local as i64));
    let idx = local_t.mask_fill(outside.clone(), 0).unsqueeze_dim::<2>(1);
    let picked = shifted.gather(1, idx) * outside.bool_not().float().unsqueeze_dim::<2>(1);
    let target_logit = reduce_from_tp(picked, tp);
    let stats = sum_exp.clone().detach();
    ((sum_exp.log() - target_logit).squeeze_dim::<1>(1), max, stats)
}

/// Mean cross-entropy (a one-element tensor, replicated over the TP group).
pub fn vocab_parallel_cross_entropy<B: ParallelBackend>(logits: Tensor<B, 2>, targets: Tensor<B, 1, Int>, vocab_start: usize, tp: &Comm) -> Tensor<B, 1> {
    vocab_parallel_cross_entropy_per_token(logits, targets, vocab_start, tp).mean()
}

/// Each token row's softmax statistics over the whole vocabulary (all TP ranks), kept by
/// [`chunked_loss`] for [`chunked_loss_grad`]: `2 · N` f32.
#[derive(Debug, Clone)]
pub struct SoftmaxStats<B: Backend> {
    /// `m_i = max_j z_ij` (global), `[N]` f32.
    pub max: Tensor<B, 1>,
    /// `s_i = Σ_j exp(z_ij − m_i)` (global), `[N]` f32.
    pub sum_exp: Tensor<B, 1>,
}

impl<B: AutodiffBackend> SoftmaxStats<B> {
    /// The statistics on the inner backend.
    pub fn inner(self) -> SoftmaxStats<B::InnerBackend> {
        SoftmaxStats { max: self.max.inner(), sum_exp: self.sum_exp.inner() }
    }
}

/// Start and end of each `rows`-row chunk of `n` rows.
fn chunks(n: usize, rows: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    let rows = rows.max(1);
    (0..n).step_by(rows).map(move |r| r..(r + rows).min(n))
}

/// The mean loss of `logits [b, s, V/t]` (no graph), `rows` rows at a time: never more than
/// `rows × V/t` f32 values at once (a whole-batch cross-entropy holds `N × V/t` f32 for its
/// backward). The collectives run per chunk, in the same order on every TP rank.
pub fn chunked_loss_value<B: ParallelBackend>(logits: Tensor<B, 3>, targets: Tensor<B, 1, Int>, vocab_start: usize, tp: &Comm, rows: usize) -> Tensor<B, 1> {
    chunked_loss(logits, targets, vocab_start, tp, rows).0
}

/// [`chunked_loss_value`] and the rows' softmax statistics its gradient needs.
pub fn chunked_loss<B: ParallelBackend>(
    logits: Tensor<B, 3>,
    targets: Tensor<B, 1, Int>,
    vocab_start: usize,
    tp: &Comm,
    rows: usize,
) -> (Tensor<B, 1>, SoftmaxStats<B>) {
    let [b, s, v] = logits.dims();
    let n = b * s;
    let flat = logits.reshape([n, v]);
    let (mut losses, mut maxes, mut sums) = (Vec::new(), Vec::new(), Vec::new());
    for c in chunks(n, rows) {
        let (loss, max, sum) = per_token_with_stats(flat.clone().slice(c.clone()), targets.clone().slice(c), vocab_start, tp);
        losses.push(loss.sum());
        maxes.push(max.squeeze_dim::<1>(1));
        sums.push(sum.squeeze_dim::<1>(1));
    }
    let stats = SoftmaxStats { max: Tensor::cat(maxes, 0), sum_exp: Tensor::cat(sums, 0) };
    (Tensor::cat(losses, 0).sum().div_scalar(n as f32), stats)
}

/// The gradient `∂(loss_scale · mean loss)/∂logits` of [`chunked_loss`], `[b, s, V/t]` in the
/// logits' dtype, from the kept statistics, chunk by chunk and without communication (the
/// gradient is local, module docs): `(exp(z − m) · g/s − onehot_y · g)` with `g = loss_scale/N`
/// (the order in which autodiff of the loss computes it), written into one output buffer.
pub fn chunked_loss_grad<B: Backend>(
    logits: Tensor<B, 3>,
    targets: Tensor<B, 1, Int>,
    stats: &SoftmaxStats<B>,
    vocab_start: usize,
    rows: usize,
    loss_scale: f32,
) -> Tensor<B, 3> {
    let [b, s, v] = logits.dims();
    let (n, dtype, device) = (b * s, logits.dtype(), logits.device());
    let g = loss_scale / n as f32;
    let flat = logits.reshape([n, v]);
    // This rank's column of each target (0 where it lies on another rank) and −g there (0).
    let local = targets.sub_scalar(vocab_start as i64);
    let elsewhere = local.clone().lower_elem(0).bool_or(local.clone().greater_equal_elem(v as i64));
    let column = local.mask_fill(elsewhere.clone(), 0).reshape([n, 1]);
    let minus_g = elsewhere.bool_not().float().cast(burn::tensor::DType::F32).mul_scalar(-g).reshape([n, 1]);
    let mut out = Tensor::<B, 2>::empty([n, v], (&device, dtype));
    for c in chunks(n, rows) {
        let len = c.len();
        let z = burn_parallel::precision::to_f32(flat.clone().slice(c.clone()));
        let m = stats.max.clone().slice(c.clone()).reshape([len, 1]);
        let scale = stats.sum_exp.clone().slice(c.clone()).reshape([len, 1]).recip().mul_scalar(g);
        let grad = ((z - m).exp() * scale).scatter(1, column.clone().slice(c.clone()), minus_g.clone().slice(c.clone()), IndexingUpdateOp::Add);
        out = out.slice_assign([c, 0..v], grad.cast(dtype));
    }
    out.reshape([b, s, v])
}
