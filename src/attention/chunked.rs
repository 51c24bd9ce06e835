//! Query-chunked causal attention: the default bodies of
//! [`AttentionBackend::causal_attention_chunked`](super::AttentionBackend::causal_attention_chunked)
//! and its backward, Burn ops on any backend (matmuls of the backend: tensor cores where it has
//! them), memory-efficient like the fused kernels.
//!
//! Queries are taken `rows` at a time (`c` rows `i ∈ [c0, c1)`); a chunk sees keys `j < c1` only
//! (causal: the later keys are masked for all of its rows, so they are not computed at all), so
//! its softmax is exact (no online rescaling): with `S_c = scale·q_c·k_{<c1}ᵀ` masked above the
//! diagonal, `lse_c = log Σ_j exp(S_c)`, `o_c = exp(S_c − lse_c)·v_{<c1}`. The forward keeps
//! `o` and `lse` only, like the kernels; the backward recomputes each chunk's `P` from `lse`:
//! `dv_{<c1} += Pᵀ·dO_c`, `dS = P ∘ (dO_c·v_{<c1}ᵀ − D_c)`, `dq_c = scale·dS·k_{<c1}`,
//! `dk_{<c1} += scale·dSᵀ·q_c` with `D = Σ_x dO ∘ o`.
//!
//! Precision, as the composed path and FlashAttention: the matmuls run in the inputs' dtype
//! (bf16 on tensor cores), the softmax statistics, `P` and `dS` in f32, cast to the inputs'
//! dtype as a matmul's operand (`P·v`, `Pᵀ·dO`, `dS·k`, `dSᵀ·q`); `D`, `lse` and the dk/dv
//! accumulators are f32. In f32 every cast is a no-op.
//!
//! Context parallelism (`offset` > 0 in [`forward_at`], [`backward_at`]): queries at positions
//! `offset..offset + s_q` against keys `0..s_k` (`s_k ≥ offset + s_q`), a chunk seeing keys
//! `j < offset + c1`; `dk`, `dv` are `s_k` long (zero past the last query's position).
//!
//! Memory: one chunk's `[b, H, c, ≤ s]` f32 scores/probabilities at a time instead of the
//! `[b, H, s, s]` ones, and no f32 copy of a whole `q, k, v, dO` or `o`; `o` is built as
//! `[b, s, H, d]` (what the attention layer reads after swapping the heads back: no copy there)
//! and returned as its `[b, H, s, d]` view.

use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Int, Tensor};

use super::MASKED;
use crate::precision::{cast_to, to_f32};

/// Rows `c0..c1` of the scores against keys `0..c1`: `scale·q_c·kᵀ` (the matmul in the inputs'
/// dtype) with `j > i` set to [`MASKED`], `[b, H, c1 − c0, c1]` f32.
fn chunk_scores<B: Backend>(qc: Tensor<B, 4>, kk: Tensor<B, 4>, c0: usize, scale: f32) -> Tensor<B, 4> {
    let (c1, c) = (kk.dims()[2], qc.dims()[2]);
    let device = qc.device();
    let scores = to_f32(qc.matmul(kk.swap_dims(2, 3))).mul_scalar(scale);
    scores.mask_fill(future_mask(c0, c, c1, &device), MASKED)
}

/// `[1, 1, c, c1]`: key `j` lies in the future of query `c0 + r` (true: masked). The causal
/// mask of a whole sequence is `future_mask(0, s, s)`.
pub fn future_mask<B: Backend>(c0: usize, c: usize, c1: usize, device: &B::Device) -> Tensor<B, 4, Bool> {
    let cols = Tensor::<B, 1, Int>::arange(0..c1 as i64, device).reshape([1, c1]).expand([c, c1]);
    let rows = Tensor::<B, 1, Int>::arange(c0 as i64..(c0 + c) as i64, device).reshape([c, 1]).expand([c, c1]);
    cols.greater(rows).reshape([1, 1, c, c1])
}

/// `[0, c0..c1)` chunks of `s` rows, `rows` at a time (`rows ≥ 1`).
fn chunks(s: usize, rows: usize) -> impl Iterator<Item = (usize, usize)> {
    assert!(rows > 0, "chunked attention needs at least one row per chunk");
    (0..s).step_by(rows).map(move |c0| (c0, (c0 + rows).min(s)))
}

/// Rows `a..b` of dimension 2 of a `[b, H, s, d]` tensor.
fn rows_of<B: Backend>(x: &Tensor<B, 4>, a: usize, b: usize) -> Tensor<B, 4> {
    let [n, h, _, d] = x.dims();
    x.clone().slice([0..n, 0..h, a..b, 0..d])
}

/// `(o [b, H, s, d] view of [b, s, H, d], lse [b, H, s] f32)` of queries at positions
/// `offset..offset + s_q` (0: the whole causal sequence; see the module docs).
pub fn forward_at<B: Backend>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, scale: f32, rows: usize, offset: usize) -> (Tensor<B, 4>, Tensor<B, 3>) {
    let s = q.dims()[2];
    let dtype = q.dtype();
    let (mut outs, mut lses) = (Vec::new(), Vec::new());
    for (c0, c1) in chunks(s, rows) {
        let scores = chunk_scores(rows_of(&q, c0, c1), rows_of(&k, 0, offset + c1), offset + c0, scale);
        let m = scores.clone().max_dim(3);
        let e = (scores - m.clone()).exp();
        let l = e.clone().sum_dim(3);
        let o = cast_to(e / l.clone(), v.dtype()).matmul(rows_of(&v, 0, offset + c1));
        outs.push(cast_to(o, dtype).swap_dims(1, 2));
        lses.push((m + l.log()).squeeze_dim::<3>(3));
    }
    (Tensor::cat(outs, 1).swap_dims(1, 2), Tensor::cat(lses, 2))
}

/// `acc[.., 0..n, ..] += part` (`part: [b, H, n, d]`, `acc: [b, H, s, d]`, none yet: zeros),
/// in place where `acc` is uniquely owned.
fn add_rows<B: Backend>(acc: Option<Tensor<B, 4>>, part: Tensor<B, 4>, s: usize) -> Tensor<B, 4> {
    let [b, h, n, d] = part.dims();
    match acc {
        None if n == s => part,
        None => Tensor::zeros([b, h, s, d], &part.device()).slice_assign([0..b, 0..h, 0..n, 0..d], part),
        Some(acc) if n == s => acc + part,
        Some(acc) => {
            let sum = rows_of(&acc, 0, n) + part;
            acc.slice_assign([0..b, 0..h, 0..n, 0..d], sum)
        }
    }
}

/// The saved state of a forward: `q, k, v, o [b, H, s, d]`, `lse [b, H, s]` f32.
pub struct Saved<B: Backend> {
    pub q: Tensor<B, 4>,
    pub k: Tensor<B, 4>,
    pub v: Tensor<B, 4>,
    pub o: Tensor<B, 4>,
    pub lse: Tensor<B, 3>,
}

/// `(dq, dk, dv)` of [`forward_at`], each in its input's dtype, for the output gradient
/// `dout`: `dk`, `dv` as long as `k`.
pub fn backward_at<B: Backend>(dout: Tensor<B, 4>, saved: Saved<B>, scale: f32, rows: usize, offset: usize) -> [Tensor<B, 4>; 3] {
    let Saved { q, k, v, o, lse } = saved;
    let (s, sk) = (q.dims()[2], k.dims()[2]);
    let (dq_dtype, k_dtype, v_dtype) = (q.dtype(), k.dtype(), v.dtype());
    let lse = lse.unsqueeze_dim::<4>(3);
    let (mut dk, mut dv, mut dqs) = (None, None, Vec::new());
    // Last chunk first: it sees every key up to the last query's position, so the dk/dv
    // accumulators start as its result (zero-padded only where `k` reaches past that
    // position), and the earlier chunks add into their first rows.
    let all: Vec<_> = chunks(s, rows).collect();
    for &(c0, c1) in all.iter().rev() {
        let (qc, doc, kk, vv) = (rows_of(&q, c0, c1), rows_of(&dout, c0, c1), rows_of(&k, 0, offset + c1), rows_of(&v, 0, offset + c1));
        let delta = (to_f32(doc.clone()) * to_f32(rows_of(&o, c0, c1))).sum_dim(3);
        let p = (chunk_scores(qc.clone(), kk.clone(), offset + c0, scale) - rows_of(&lse, c0, c1)).exp();
        let dp = to_f32(doc.clone().matmul(vv.swap_dims(2, 3)));
        dv = Some(add_rows(dv, to_f32(cast_to(p.clone(), doc.dtype()).swap_dims(2, 3).matmul(doc)), sk));
        let ds = (p * (dp - delta)).mul_scalar(scale);
        dqs.push(cast_to(cast_to(ds.clone(), kk.dtype()).matmul(kk), dq_dtype));
        dk = Some(add_rows(dk, to_f32(cast_to(ds, qc.dtype()).swap_dims(2, 3).matmul(qc)), sk));
    }
    let (dk, dv) = (dk.expect("s > 0: one chunk at least"), dv.expect("s > 0"));
    dqs.reverse();
    let dq = if dqs.len() == 1 { dqs.remove(0) } else { Tensor::cat(dqs, 2) };
    [dq, cast_to(dk, k_dtype), cast_to(dv, v_dtype)]
}
