//! Causal attention over a fused projection: `qkv: [b, s, 3·H·d]`, columns grouped per head
//! `[q_j k_j v_j]` (`d` each; the attention layer's Megatron layout) → context `[b, s, H·d]`,
//! heads in order. Entry point [`causal_attention_qkv`].
//!
//! One op on `qkv` instead of three slices of it: the forward views `q, k, v: [b, H, s, d]` in
//! `qkv` (strided; the kernels read any strides) and merges `o` back to `[b, s, H·d]` (a view on
//! Cube backends, where `o` is stored `[b, s, H, d]`); the backward writes
//! `dqkv = cat(dq, dk, dv)` per head in one concatenation. Three tracked slices would instead
//! each fill a zero `[b, s, 3·H·d]` gradient, assign their part and add the three: on a GPU
//! about eight full-width passes of memory per layer where the concatenation writes one.
//!
//! Saved for the backward: the q, k, v views (or, where a view's offset is not aligned for a
//! buffer view, as on CUDA for `d·e` < 512 bytes, the copies the slices take: what the three
//! slices kept), the context (the buffer the output projection keeps anyway) and the f32 `lse`.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ops::FloatTensor;
use burn::tensor::Tensor;

use super::{prim, wrap, AttentionBackend, AttentionForward};

/// Head width of a `[b, s, 3·H·d]` projection with `heads` heads.
fn head_width(width: usize, heads: usize) -> usize {
    assert!(heads > 0 && width.is_multiple_of(3 * heads), "causal_attention_qkv: width {width} is not 3 × {heads} heads × a head width");
    width / (3 * heads)
}

/// `[q, k, v]`, each `[b, H, s, d]`, viewed in `qkv: [b, s, 3·H·d]`.
fn split<B: Backend>(qkv: Tensor<B, 3>, heads: usize) -> [Tensor<B, 4>; 3] {
    let [b, s, w] = qkv.dims();
    let d = head_width(w, heads);
    let grouped = qkv.reshape([b, s, heads, 3, d]);
    [0, 1, 2].map(|i| grouped.clone().slice([0..b, 0..s, 0..heads, i..i + 1, 0..d]).reshape([b, s, heads, d]).swap_dims(1, 2))
}

/// `[b, H, s, d]` → `[b, s, H·d]`.
fn merge<B: Backend>(o: Tensor<B, 4>) -> Tensor<B, 3> {
    let [b, h, s, d] = o.dims();
    o.swap_dims(1, 2).reshape([b, s, h * d])
}

/// `[b, s, H·d]` → `[b, H, s, d]`.
fn heads_of<B: Backend>(x: Tensor<B, 3>, heads: usize) -> Tensor<B, 4> {
    let [b, s, w] = x.dims();
    x.reshape([b, s, heads, w / heads]).swap_dims(1, 2)
}

/// `(q, k, v)` viewed in `qkv`, and `(context, lse)` of the backend's attention over them
/// (chunked with `Some(rows)`).
fn attend<B: AttentionBackend>(qkv: FloatTensor<B>, heads: usize, scale: f32, rows: Option<usize>) -> ([FloatTensor<B>; 3], AttentionForward<B>) {
    let [q, k, v] = split::<B>(wrap(qkv), heads).map(prim);
    let (o, lse) = match rows {
        Some(rows) => B::causal_attention_chunked(q.clone(), k.clone(), v.clone(), scale, rows),
        None => B::causal_attention(q.clone(), k.clone(), v.clone(), scale),
    };
    ([q, k, v], (prim(merge::<B>(wrap(o))), lse))
}

/// The default [`AttentionBackend::causal_attention_qkv`]: views, the backend's attention,
/// merge.
pub(super) fn forward<B: AttentionBackend>(qkv: FloatTensor<B>, heads: usize, scale: f32, rows: Option<usize>) -> AttentionForward<B> {
    attend::<B>(qkv, heads, scale, rows).1
}

#[derive(Debug)]
struct PackedBackwardOp {
    heads: usize,
    scale: f32,
    rows: Option<usize>,
}

impl<B: AttentionBackend> Backward<B, 1> for PackedBackwardOp {
    // q, k, v (views of qkv, or the copies a misaligned view takes), context, lse
    type State = ([FloatTensor<B>; 3], FloatTensor<B>, FloatTensor<B>);

    /// `dqkv [b, s, 3·H·d]`: the backend's `(dq, dk, dv)` concatenated per head.
    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [parent] = ops.parents;
        let d_context = grads.consume::<B>(&ops.node);
        let Some(node) = parent else { return };
        let ([q, k, v], context, lse) = ops.state;
        let [b, s, w] = wrap::<B, 3>(context.clone()).dims();
        let d = w / self.heads;
        let dout = prim(heads_of::<B>(wrap(d_context), self.heads));
        let o = prim(heads_of::<B>(wrap(context), self.heads));
        let (dq, dk, dv) = match self.rows {
            Some(rows) => B::causal_attention_chunked_backward(dout, q, k, v, o, lse, self.scale, rows),
            None => B::causal_attention_backward(dout, q, k, v, o, lse, self.scale),
        };
        let part = |g: FloatTensor<B>| wrap::<B, 4>(g).swap_dims(1, 2).reshape([b, s, self.heads, 1, d]);
        let dqkv = Tensor::cat(vec![part(dq), part(dk), part(dv)], 3).reshape([b, s, 3 * w]);
        grads.register::<B>(node.id, prim(dqkv));
    }
}

/// [`AttentionBackend::causal_attention_qkv`] under `Autodiff`: the inner backend's attention
/// over views of `qkv`, one tracked op with `qkv` its only parent.
pub(super) fn tracked<B: AttentionBackend, C: CheckpointStrategy>(
    qkv: FloatTensor<Autodiff<B, C>>,
    heads: usize,
    scale: f32,
    rows: Option<usize>,
) -> AttentionForward<Autodiff<B, C>> {
    let (qkv_views, (context, lse)) = attend::<B>(qkv.primitive.clone(), heads, scale, rows);
    let out = match (PackedBackwardOp { heads, scale, rows }).prepare::<C>([qkv.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish((qkv_views, context.clone(), lse.clone()), context),
        OpsKind::UnTracked(prep) => prep.finish(context),
    };
    (out, <Autodiff<B, C> as AutodiffBackend>::from_inner(lse))
}

/// Causal attention of a fused projection `qkv: [b, s, 3·H·d]` (columns grouped per head
/// `[q_j k_j v_j]`, see the module docs) with scores scaled by `scale`: context `[b, s, H·d]`.
/// `rows: None` runs the backend's [`causal_attention`](super::causal_attention) (the fused
/// kernels on Cube backends), `Some(rows)` the chunked op with that many query rows per chunk.
///
/// # Panics
/// If the width is not a multiple of `3 · heads`, or `rows` is `Some(0)`.
///
/// ```
/// use burn::backend::{Autodiff, Flex};
/// use burn::tensor::{Distribution, Tensor};
/// use burn_parallel::attention::causal_attention_qkv;
///
/// type B = Autodiff<Flex>;
/// let qkv = Tensor::<B, 3>::random([2, 5, 3 * 4 * 8], Distribution::Default, &Default::default()).require_grad();
/// let context = causal_attention_qkv(qkv.clone(), 4, 1.0 / 8f32.sqrt(), None);
/// assert_eq!(context.dims(), [2, 5, 32]);
/// assert_eq!(qkv.grad(&context.sum().backward()).unwrap().dims(), [2, 5, 96]);
/// ```
pub fn causal_attention_qkv<B: AttentionBackend>(qkv: Tensor<B, 3>, heads: usize, scale: f32, rows: Option<usize>) -> Tensor<B, 3> {
    head_width(qkv.dims()[2], heads);
    assert!(rows != Some(0), "chunked attention needs at least one query row per chunk");
    wrap(B::causal_attention_qkv(prim(qkv), heads, scale, rows).0)
}
