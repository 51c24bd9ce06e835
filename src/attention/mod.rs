//! Causal attention as a backend extension: fused flash-attention kernels (CubeCL) on Cube
//! backends, composed Burn ops elsewhere, one autodiff op for all. Entry points:
//! [`causal_attention`], [`causal_attention_chunked`] (Burn ops on query chunks, any
//! backend, the same memory as the kernels: `chunked.rs`), and [`causal_attention_qkv`] (either,
//! over a fused `[b, s, 3·H·d]` projection as one op: `packed.rs`); for context parallelism
//! [`causal_attention_at`] and [`causal_attention_chunked_at`] (queries at positions
//! `offset..offset + s_q` against keys `0..s_k`). Layers pick one through [`AttentionKernel`],
//! resolved per backend into an [`AttentionCore`].
//!
//! Per head, `q, k, v: [s, d]`, `S = scale·q·kᵀ` with the future masked (`j > i`), softmax rows
//! `P = exp(S − lse)` with `lse_i = log Σ_{j ≤ i} exp(S_ij)` (f32), `o = P·v`. The forward saves
//! only `o` and `lse` (no `s × s` tensor); the backward, with `D_i = Σ_x dO_ix·o_ix`:
//! `dP = dO·vᵀ`, `dS = P ∘ (dP − D)`, `dq = scale·dS·k`, `dk = scale·dSᵀ·q`, `dv = Pᵀ·dO`.
//!
//! Shapes: `q, k, v: [b, H, s, d]` (any strides), `o: [b, H, s, d]` in `q`'s dtype, `lse: [b, H, s]`
//! f32. Everything accumulates in f32 whatever the storage dtype. No dropout (the attention layer
//! keeps the composed path when attention dropout is on, see [`AttentionKernel`]).
//!
//! ```
//! use burn::backend::{Autodiff, Flex};
//! use burn::tensor::{Distribution, Tensor};
//! use burn_parallel::attention::causal_attention;
//!
//! type B = Autodiff<Flex>;
//! let dev = Default::default();
//! let [q, k, v] = [0, 1, 2].map(|_| Tensor::<B, 4>::random([2, 3, 5, 8], Distribution::Default, &dev).require_grad());
//! let o = causal_attention(q.clone(), k, v, 1.0 / 8f32.sqrt());
//! assert_eq!(o.dims(), [2, 3, 5, 8]);
//! let grads = o.sum().backward();
//! assert_eq!(q.grad(&grads).unwrap().dims(), [2, 3, 5, 8]);
//! ```

mod chunked;
pub use chunked::future_mask;
mod choice;
pub use choice::{AttentionCore, AttentionKernel, UnknownAttentionKernel, DEFAULT_CHUNK_ROWS};
mod packed;
pub use packed::causal_attention_qkv;
mod softmax;
pub use softmax::softmax;
#[cfg(feature = "cube")]
mod cube;
#[cfg(feature = "cuda-source")]
mod cuda_source;
#[cfg(feature = "cube")]
pub use cube::{tensor_core_tiles, TensorCoreTiles};
#[cfg(feature = "cuda-source")]
pub use cuda_source::attention_cuda_sources;
#[cfg(feature = "cube")]
mod kernels;
#[cfg(feature = "cube")]
pub use kernels::TcTiles;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Tensor, TensorPrimitive};
use std::sync::atomic::{AtomicBool, Ordering};

static TENSOR_CORES: AtomicBool = AtomicBool::new(true);

/// Whether f16/bf16 fused attention may run on tensor cores (the default, where the device has
/// them: `attention::tensor_core_tiles` with the `cube` feature); off,
/// it runs the FMA kernels as f32 inputs do. Process-wide; for benchmarks, tests and
/// `gpt_pretrain --attention-tensor-cores false`. No effect on backends without fused kernels.
pub fn set_tensor_cores(on: bool) {
    TENSOR_CORES.store(on, Ordering::SeqCst);
}

/// The switch of [`set_tensor_cores`].
pub fn tensor_cores_enabled() -> bool {
    TENSOR_CORES.load(Ordering::SeqCst)
}

/// Masked scores (`j > i`) before the softmax: `exp(MASKED − m) = 0` in f32 for any finite row max.
pub const MASKED: f32 = -1.0e30;

/// Forward: `(o [b, H, s, d], lse [b, H, s] f32)`.
pub type AttentionForward<B> = (FloatTensor<B>, FloatTensor<B>);
/// Backward: `(dq, dk, dv)`, each like its input.
pub type AttentionBackward<B> = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>);

fn wrap<B: Backend, const D: usize>(p: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

fn prim<B: Backend, const D: usize>(t: Tensor<B, D>) -> FloatTensor<B> {
    t.into_primitive().tensor()
}

/// A backend's causal attention (see the module docs). The default bodies compose Burn ops
/// (`chunked.rs`; `causal_attention` as one chunk of all rows, holding the `s × s` scores): the
/// reference of the kernels' tests, and what CPU backends run.
pub trait AttentionBackend: Backend {
    /// `Ok` where this backend has fused kernels for heads of width `d_head` on `device`; else
    /// why not (the attention layer then composes Burn ops, or refuses `AttentionKernel::Fused`).
    fn fused_attention(device: &Self::Device, d_head: usize) -> Result<(), String> {
        let _ = d_head;
        Err(format!("the {} backend has no fused attention kernels (CubeCL backends do)", Self::name(device)))
    }

    /// What fused attention of `dtype` inputs with heads of width `d_head` runs on `device`, in
    /// words for logs: the kernels and their tiles, or why there are none.
    fn fused_attention_kernels(device: &Self::Device, dtype: DType, d_head: usize) -> String {
        let _ = dtype;
        match Self::fused_attention(device, d_head) {
            Ok(()) => "fused kernels".into(),
            Err(why) => why,
        }
    }

    /// `(o, lse)` of causal attention with scores scaled by `scale`:
    /// [`causal_attention_at`](Self::causal_attention_at) at offset 0.
    fn causal_attention(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, scale: f32) -> AttentionForward<Self> {
        Self::causal_attention_at(q, k, v, scale, 0)
    }

    /// `(o, lse)` of queries at positions `offset..offset + s_q` against keys `0..s_k`
    /// (`s_k ≥ offset + s_q`; offset 0 and `s_k = s_q`: one causal sequence; context
    /// parallelism: a rank's chunk against the gathered keys). The autodiff op calls this pair:
    /// a backend with kernels overrides it, not the plain methods. Default: the chunked Burn ops
    /// with one chunk of all rows.
    fn causal_attention_at(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, scale: f32, offset: usize) -> AttentionForward<Self> {
        let rows = burn::tensor::TensorMetadata::shape(&q)[2].max(1);
        Self::causal_attention_chunked_at(q, k, v, scale, rows, offset)
    }

    /// `(dq, dk, dv)` of [`causal_attention`](Self::causal_attention) for the output gradient `dout`.
    fn causal_attention_backward(
        dout: FloatTensor<Self>,
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        o: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        scale: f32,
    ) -> AttentionBackward<Self> {
        Self::causal_attention_backward_at(dout, q, k, v, o, lse, scale, 0)
    }

    /// `(dq, dk, dv)` of [`causal_attention_at`](Self::causal_attention_at): `dk`, `dv` as long
    /// as `k` (zero past the last query's position).
    #[allow(clippy::too_many_arguments)]
    fn causal_attention_backward_at(
        dout: FloatTensor<Self>,
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        o: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        scale: f32,
        offset: usize,
    ) -> AttentionBackward<Self> {
        let rows = burn::tensor::TensorMetadata::shape(&q)[2].max(1);
        Self::causal_attention_chunked_backward_at(dout, q, k, v, o, lse, scale, rows, offset)
    }

    /// `(o, lse)` of causal attention computed `rows` queries at a time (Burn ops on any
    /// backend, no `s × s` tensor: see `chunked.rs`).
    fn causal_attention_chunked(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, scale: f32, rows: usize) -> AttentionForward<Self> {
        Self::causal_attention_chunked_at(q, k, v, scale, rows, 0)
    }

    /// [`causal_attention_chunked`](Self::causal_attention_chunked) of queries at positions
    /// `offset..offset + s_q` against keys `0..s_k` (context parallelism). The autodiff op calls
    /// this pair for every chunked attention: a backend overrides it, not the plain methods.
    fn causal_attention_chunked_at(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        scale: f32,
        rows: usize,
        offset: usize,
    ) -> AttentionForward<Self> {
        let (o, lse) = chunked::forward_at(wrap::<Self, 4>(q), wrap(k), wrap(v), scale, rows, offset);
        (prim(o), prim(lse))
    }

    /// `(dq, dk, dv)` of [`causal_attention_chunked`](Self::causal_attention_chunked).
    #[allow(clippy::too_many_arguments)]
    fn causal_attention_chunked_backward(
        dout: FloatTensor<Self>,
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        o: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        scale: f32,
        rows: usize,
    ) -> AttentionBackward<Self> {
        Self::causal_attention_chunked_backward_at(dout, q, k, v, o, lse, scale, rows, 0)
    }

    /// `(dq, dk, dv)` of [`causal_attention_chunked_at`](Self::causal_attention_chunked_at).
    #[allow(clippy::too_many_arguments)]
    fn causal_attention_chunked_backward_at(
        dout: FloatTensor<Self>,
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        o: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        scale: f32,
        rows: usize,
        offset: usize,
    ) -> AttentionBackward<Self> {
        let saved = chunked::Saved { q: wrap(q), k: wrap(k), v: wrap(v), o: wrap(o), lse: wrap(lse) };
        let [dq, dk, dv] = chunked::backward_at(wrap::<Self, 4>(dout), saved, scale, rows, offset);
        (prim(dq), prim(dk), prim(dv))
    }

    /// `(context [b, s, H·d], lse)` of causal attention over a fused projection
    /// `qkv: [b, s, 3·H·d]` grouped per head (`packed.rs`): q, k, v viewed in `qkv`,
    /// [`causal_attention`](Self::causal_attention) (the chunked op with `Some(rows)`), merged.
    fn causal_attention_qkv(qkv: FloatTensor<Self>, heads: usize, scale: f32, rows: Option<usize>) -> AttentionForward<Self> {
        packed::forward::<Self>(qkv, heads, scale, rows)
    }

    /// Softmax over the last dimension ([`softmax`]): the backend's own op; under autodiff one
    /// tracked op saving its output.
    fn softmax_last(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let last = burn::tensor::TensorMetadata::shape(&x).num_dims() - 1;
        Self::softmax(x, last)
    }
}

impl AttentionBackend for burn::backend::Flex {}

#[derive(Debug)]
struct AttentionBackwardOp {
    scale: f32,
    /// Query rows per chunk of the chunked path (`None`: the backend's fused or composed op).
    rows: Option<usize>,
    /// The queries' first position (chunked or fused; 0: one whole causal sequence).
    offset: usize,
}

impl<B: AttentionBackend> Backward<B, 3> for AttentionBackwardOp {
    // q, k, v, o, lse
    type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [pq, pk, pv] = ops.parents;
        let dout = grads.consume::<B>(&ops.node);
        let (q, k, v, o, lse) = ops.state;
        let (dq, dk, dv) = match self.rows {
            Some(rows) => B::causal_attention_chunked_backward_at(dout, q, k, v, o, lse, self.scale, rows, self.offset),
            None => B::causal_attention_backward_at(dout, q, k, v, o, lse, self.scale, self.offset),
        };
        for (parent, grad) in [(pq, dq), (pk, dk), (pv, dv)] {
            if let Some(node) = parent {
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

impl<B: AttentionBackend, C: CheckpointStrategy> AttentionBackend for Autodiff<B, C> {
    fn fused_attention(device: &Self::Device, d_head: usize) -> Result<(), String> {
        B::fused_attention(device, d_head)
    }

    fn fused_attention_kernels(device: &Self::Device, dtype: DType, d_head: usize) -> String {
        B::fused_attention_kernels(device, dtype, d_head)
    }

    fn causal_attention_at(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, scale: f32, offset: usize) -> AttentionForward<Self> {
        tracked::<B, C>(q, k, v, scale, None, offset)
    }

    fn causal_attention_chunked_at(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        scale: f32,
        rows: usize,
        offset: usize,
    ) -> AttentionForward<Self> {
        tracked::<B, C>(q, k, v, scale, Some(rows), offset)
    }

    #[allow(clippy::too_many_arguments)]
    fn causal_attention_chunked_backward_at(
        dout: FloatTensor<Self>,
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        o: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        scale: f32,
        rows: usize,
        offset: usize,
    ) -> AttentionBackward<Self> {
        let inner = |t: FloatTensor<Self>| <Self as AutodiffBackend>::inner(t);
        let (dq, dk, dv) = B::causal_attention_chunked_backward_at(inner(dout), inner(q), inner(k), inner(v), inner(o), inner(lse), scale, rows, offset);
        let outer = |t| <Self as AutodiffBackend>::from_inner(t);
        (outer(dq), outer(dk), outer(dv))
    }

    #[allow(clippy::too_many_arguments)]
    fn causal_attention_backward_at(
        dout: FloatTensor<Self>,
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        o: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        scale: f32,
        offset: usize,
    ) -> AttentionBackward<Self> {
        let inner = |t: FloatTensor<Self>| <Self as AutodiffBackend>::inner(t);
        let (dq, dk, dv) = B::causal_attention_backward_at(inner(dout), inner(q), inner(k), inner(v), inner(o), inner(lse), scale, offset);
        let outer = |t| <Self as AutodiffBackend>::from_inner(t);
        (outer(dq), outer(dk), outer(dv))
    }

    fn causal_attention_qkv(qkv: FloatTensor<Self>, heads: usize, scale: f32, rows: Option<usize>) -> AttentionForward<Self> {
        packed::tracked::<B, C>(qkv, heads, scale, rows)
    }

    fn softmax_last(x: FloatTensor<Self>) -> FloatTensor<Self> {
        softmax::tracked::<B, C>(x)
    }
}

/// The inner backend's attention at `offset` (chunked with `Some(rows)`) as one tracked op
/// saving `q, k, v, o, lse`.
fn tracked<B: AttentionBackend, C: CheckpointStrategy>(
    q: FloatTensor<Autodiff<B, C>>,
    k: FloatTensor<Autodiff<B, C>>,
    v: FloatTensor<Autodiff<B, C>>,
    scale: f32,
    rows: Option<usize>,
    offset: usize,
) -> AttentionForward<Autodiff<B, C>> {
    let nodes = [q.node.clone(), k.node.clone(), v.node.clone()];
    let (qi, ki, vi) = (q.primitive.clone(), k.primitive.clone(), v.primitive.clone());
    let (o, lse) = match rows {
        Some(rows) => B::causal_attention_chunked_at(qi, ki, vi, scale, rows, offset),
        None => B::causal_attention_at(qi, ki, vi, scale, offset),
    };
    let out = match (AttentionBackwardOp { scale, rows, offset }).prepare::<C>(nodes).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish((q.primitive, k.primitive, v.primitive, o.clone(), lse.clone()), o),
        OpsKind::UnTracked(prep) => prep.finish(o),
    };
    (out, <Autodiff<B, C> as AutodiffBackend>::from_inner(lse))
}

/// Causal attention of `q, k, v: [b, H, s, d]` (scores scaled by `scale`) through the backend's
/// [`AttentionBackend`]: `[b, H, s, d]` in `q`'s dtype.
///
/// # Panics
/// If `k` or `v` differs from `q` in shape or dtype (the kernels index them by `q`'s).
pub fn causal_attention<B: AttentionBackend>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, scale: f32) -> Tensor<B, 4> {
    causal_attention_lse(q, k, v, scale).0
}

/// `(o, lse)` of [`causal_attention`] (for tests and the device checks: `lse: [b, H, s]` f32).
pub fn causal_attention_lse<B: AttentionBackend>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, scale: f32) -> (Tensor<B, 4>, Tensor<B, 3>) {
    check_qkv(&q, &k, &v);
    let (o, lse) = B::causal_attention(prim(q), prim(k), prim(v), scale);
    (wrap(o), wrap(lse))
}

/// [`causal_attention`] computed `rows` queries at a time with Burn ops (any backend; keeps
/// `o` and the f32 `lse` like the kernels, one `[b, H, rows, ≤ s]` chunk of scores at a time).
///
/// # Panics
/// As [`causal_attention`], and if `rows` is 0.
pub fn causal_attention_chunked<B: AttentionBackend>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, scale: f32, rows: usize) -> Tensor<B, 4> {
    causal_attention_chunked_lse(q, k, v, scale, rows).0
}

/// `(o, lse)` of [`causal_attention_chunked`].
pub fn causal_attention_chunked_lse<B: AttentionBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    scale: f32,
    rows: usize,
) -> (Tensor<B, 4>, Tensor<B, 3>) {
    check_qkv(&q, &k, &v);
    assert!(rows > 0, "chunked attention needs at least one query row per chunk");
    let (o, lse) = B::causal_attention_chunked(prim(q), prim(k), prim(v), scale, rows);
    (wrap(o), wrap(lse))
}

fn check_qkv<B: Backend>(q: &Tensor<B, 4>, k: &Tensor<B, 4>, v: &Tensor<B, 4>) {
    for (name, t) in [("k", k), ("v", v)] {
        assert!(
            t.dims() == q.dims() && t.dtype() == q.dtype(),
            "causal_attention: {name} is {:?} {:?} but q {:?} {:?}",
            t.dims(),
            t.dtype(),
            q.dims(),
            q.dtype()
        );
    }
}

/// [`causal_attention`] of queries at positions `offset..offset + s_q` (`q: [b, H, s_q, d]`)
/// against keys and values at `0..s_k` (`[b, H, s_k, d]`): a context-parallel rank's chunk of
/// queries against the gathered sequence (keys past the last query's position: no gradient).
/// The backend's fused kernels where it has them.
///
/// # Panics
/// If `k` and `v` differ in shape or dtype, differ from `q` but in length, or `s_k < offset + s_q`.
pub fn causal_attention_at<B: AttentionBackend>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, scale: f32, offset: usize) -> Tensor<B, 4> {
    causal_attention_at_lse(q, k, v, scale, offset).0
}

/// `(o, lse)` of [`causal_attention_at`].
pub fn causal_attention_at_lse<B: AttentionBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    scale: f32,
    offset: usize,
) -> (Tensor<B, 4>, Tensor<B, 3>) {
    check_at("causal_attention_at", &q, &k, &v, offset);
    let (o, lse) = B::causal_attention_at(prim(q), prim(k), prim(v), scale, offset);
    (wrap(o), wrap(lse))
}

/// [`causal_attention_at`] through [`causal_attention_chunked`] (`rows` queries at a time).
///
/// # Panics
/// As [`causal_attention_at`], and if `rows` is 0.
pub fn causal_attention_chunked_at<B: AttentionBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    scale: f32,
    rows: usize,
    offset: usize,
) -> Tensor<B, 4> {
    check_at("causal_attention_chunked_at", &q, &k, &v, offset);
    assert!(rows > 0, "chunked attention needs at least one query row per chunk");
    wrap(B::causal_attention_chunked_at(prim(q), prim(k), prim(v), scale, rows, offset).0)
}

fn check_at<B: Backend>(what: &str, q: &Tensor<B, 4>, k: &Tensor<B, 4>, v: &Tensor<B, 4>, offset: usize) {
    let ([b, h, sq, d], [kb, kh, sk, kd]) = (q.dims(), k.dims());
    assert!(
        k.dims() == v.dims() && k.dtype() == v.dtype() && k.dtype() == q.dtype(),
        "{what}: k {:?} {:?}, v {:?} {:?}, q {:?}",
        k.dims(),
        k.dtype(),
        v.dims(),
        v.dtype(),
        q.dtype()
    );
    assert!([kb, kh, kd] == [b, h, d] && sk >= offset + sq, "{what}: q {:?} at {offset} against k {:?}", q.dims(), k.dims());
}

#[cfg(test)]
mod tests;
