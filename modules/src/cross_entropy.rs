//! Vocab-parallel cross-entropy (Megatron `vocab_parallel_cross_entropy`).
//!
//! Logits arrive split on the vocabulary, `z_r: [N, V/t]` (rank r holds ids
//! `[r·V/t, (r+1)·V/t)`), targets `[N]` replicated. Forward:
//! `m = all-reduce-max(max_j z_r)` (a constant: no gradient), `s = g(Σ_j exp(z_r − m))`,
//! `z_y = g(z_r[y] if y is local else 0)`, `loss_i = log s − (z_y − m)`, mean over `N`.
//! g is all-reduce forward / identity backward, so the backward is **local**:
//! `∂loss/∂z_r = (softmax − onehot)_r / N` on each rank's own shard. The full `[N, V]` logits are
//! never materialised. With t = 1 it equals `burn::nn::loss::CrossEntropyLoss`.

use burn::tensor::{Int, Tensor};
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
    let shifted = logits - max;
    let sum_exp = reduce_from_tp(shifted.clone().exp().sum_dim(1), tp);
    let local_t = targets.sub_scalar(vocab_start as i64);
    let outside = local_t.clone().lower_elem(0).bool_or(local_t.clone().greater_equal_elem(v_local as i64));
    let idx = local_t.mask_fill(outside.clone(), 0).unsqueeze_dim::<2>(1);
    let picked = shifted.gather(1, idx) * outside.bool_not().float().unsqueeze_dim::<2>(1);
    let target_logit = reduce_from_tp(picked, tp);
    (sum_exp.log() - target_logit).squeeze_dim::<1>(1)
}

/// Mean cross-entropy (a one-element tensor, replicated over the TP group).
pub fn vocab_parallel_cross_entropy<B: ParallelBackend>(logits: Tensor<B, 2>, targets: Tensor<B, 1, Int>, vocab_start: usize, tp: &Comm) -> Tensor<B, 1> {
    vocab_parallel_cross_entropy_per_token(logits, targets, vocab_start, tp).mean()
}

/// The mean loss of `logits [N, V/t]` (no graph), `rows` rows at a time: never more than
/// `rows × V/t` f32 values at once (a whole-batch cross-entropy holds `N × V/t` f32 for its
/// backward). The collectives run per chunk, in the same order on every TP rank.
pub fn chunked_loss_value<B: ParallelBackend>(logits: Tensor<B, 3>, targets: Tensor<B, 1, Int>, vocab_start: usize, tp: &Comm, rows: usize) -> Tensor<B, 1> {
    let [b, s, v] = logits.dims();
    let n = b * s;
    let flat = logits.reshape([n, v]);
    let parts: Vec<Tensor<B, 1>> = (0..n)
        .step_by(rows.max(1))
        .map(|r| {
            let end = (r + rows.max(1)).min(n);
            vocab_parallel_cross_entropy_per_token(flat.clone().slice(r..end), targets.clone().slice(r..end), vocab_start, tp).sum().unsqueeze()
        })
        .collect();
    Tensor::cat(parts, 0).sum().div_scalar(n as f32)
}

/// The gradient `∂(loss_scale · mean loss)/∂logits` of [`chunked_loss_value`], `[b, s, V/t]` in
/// the logits' dtype, computed chunk by chunk (each chunk: a forward with a graph from a leaf,
/// then its backward; `before_backward` runs first, e.g. a TP barrier).
pub fn chunked_loss_grad<B, E>(
    logits: Tensor<B, 3>,
    targets: Tensor<B, 1, Int>,
    vocab_start: usize,
    tp: &Comm,
    rows: usize,
    loss_scale: f32,
    before_backward: impl Fn() -> Result<(), E>,
) -> Result<Tensor<B::InnerBackend, 3>, E>
where
    B: ParallelBackend + burn::tensor::backend::AutodiffBackend,
{
    let [b, s, v] = logits.dims();
    let n = b * s;
    let flat = logits.reshape([n, v]);
    let mut parts = Vec::new();
    for r in (0..n).step_by(rows.max(1)) {
        let end = (r + rows.max(1)).min(n);
        let leaf = flat.clone().slice(r..end).detach().require_grad();
        let loss = vocab_parallel_cross_entropy_per_token(leaf.clone(), targets.clone().slice(r..end), vocab_start, tp).sum().mul_scalar(loss_scale / n as f32);
        before_backward()?;
        let g = loss.backward();
        parts.push(leaf.grad(&g).expect("the loss uses its logits"));
    }
    Ok(Tensor::cat(parts, 0).reshape([b, s, v]))
}
