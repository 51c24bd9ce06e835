//! Tensor-parallel causal self-attention: heads split over the TP group.
//!
//! Query, key and value come from one fused column-parallel projection `h → 3h` whose columns are
//! grouped by head, `[q₀ k₀ v₀ | q₁ k₁ v₁ | …]` (`d_head` each; Megatron's layout; grouped-query
//! attention below groups them per key/value head): a contiguous
//! TP split holds whole heads, so rank r computes heads `[r·H/t, (r+1)·H/t)`, `[b, s, 3h/t]`,
//! after one f whose backward all-reduces; attention runs locally on those `H/t` heads, through
//! the core [`ParallelAttentionConfig::kernel`] resolves to: composed (`[b, H/t, s, s]` scores,
//! causal mask, softmax, dropout with a per-rank mask), the fused flash-attention kernels, or the
//! chunked op (both: no `s × s` tensor kept, no dropout); the output projection is
//! row-parallel `h → h` with one all-reduce (g).
//! Grouped-query attention (`kv_heads` G < H, Llama 2 70B / Llama 3): G key/value heads, each
//! shared by `r = H/G` query heads; the fused projection `h → (H + 2G)·d` is grouped per key/value
//! group, `[q_{g,0} … q_{g,r−1} k_g v_g | …]` (Megatron's layout), so a contiguous TP split holds
//! whole groups (G must be divisible by the TP size); the core repeats each key/value head for
//! its `r` query heads (the repeat's backward sums their gradients).
//! With `rope`, queries and keys are rotated ([`crate::rope`]) right after the projection;
//! `bias = false` drops the projections' biases (Llama).
//! With context parallelism ([`ParallelAttention::cp`], `burn_parallel::context`) the layer
//! sees this rank's `s/C` tokens: queries and keys are rotated by their positions, keys and
//! values are all-gathered over the CP group (backward: reduce-scatter) and the composed core
//! masks by position, `[b, H/t, s/C, s]` scores; the fused and chunked cores put the keys in
//! position order and run each of the rank's two query chunks at its offset against the keys up
//! to its end (no `s/C × s` tensor kept).
//! With t = 1 and dropout 0 it equals `burn::nn::attention::MultiHeadAttention` with an
//! autoregressive mask.

use burn::config::Config;
use burn::module::Module;
use burn::tensor::{Tensor, TensorData};
use burn_parallel::attention::{
    causal_attention, causal_attention_at, causal_attention_chunked, causal_attention_chunked_at, causal_attention_qkv, AttentionCore, AttentionKernel,
};
use burn_parallel::mappings::{copy_to_tp, gather_from_sp};
use burn_parallel::precision::{like, to_f32};
use burn_parallel::rng::{RandomStreams, StreamCounter};
use burn_parallel::{Comm, ConfigError, ParallelBackend};

use crate::column_linear::{ColumnLinear, ColumnLinearConfig};
use crate::dropout::{DropoutRegion, ParallelDropout};
use crate::init::{check_divisible, ParamInit};
use crate::row_linear::{RowLinear, RowLinearConfig};

/// Masked scores get this value before the softmax (as burn-nn's `min_float`).
const MASK_VALUE: f32 = -1.0e4;

/// Configuration of a [`ParallelAttention`].
#[derive(Config, Debug)]
pub struct ParallelAttentionConfig {
    /// Model width.
    pub d_model: usize,
    /// Heads over all ranks (must be divisible by the TP size).
    pub n_heads: usize,
    /// Dropout on the attention probabilities.
    #[config(default = 0.0)]
    pub dropout: f64,
    /// Init standard deviation of query/key/value.
    #[config(default = 0.02)]
    pub init_std: f64,
    /// Init standard deviation of the output projection.
    #[config(default = 0.02)]
    pub proj_init_std: f64,
    /// The attention core (`burn_parallel::attention`): `Auto` (fused where the backend has the
    /// kernels and dropout is 0, else composed), `Composed`, `Fused` (or an error) or
    /// `Chunked(rows)` (Burn ops on query chunks, any backend, no dropout).
    #[config(default = "burn_parallel::attention::AttentionKernel::Auto")]
    pub kernel: AttentionKernel,
    /// Biases on the q/k/v and output projections.
    #[config(default = true)]
    pub bias: bool,
    /// Rotary position embedding of queries and keys with this base `θ` and frequency scaling
    /// (`None`: none).
    #[config(default = "None")]
    pub rope: Option<burn_parallel::arch::Rope>,
    /// Key/value heads over all ranks (grouped-query attention; `None`: one per query head).
    /// Must divide `n_heads` and be divisible by the TP size.
    #[config(default = "None")]
    pub kv_heads: Option<usize>,
}

/// Causal multi-head self-attention with heads split over the TP group.
#[derive(Module, Debug)]
pub struct ParallelAttention<B: ParallelBackend> {
    /// Fused column-parallel q/k/v projection `[h, (H + 2G)·d/t]`, columns grouped by head
    /// (or key/value group; see the module docs; [`fuse_qkv_grouped`] builds it from separate
    /// q, k, v).
    pub qkv: ColumnLinear<B>,
    /// Row-parallel output projection.
    pub output: RowLinear<B>,
    /// Dropout on attention probabilities (sharded region: own mask per rank).
    pub dropout: ParallelDropout,
    /// Heads on this rank.
    pub local_heads: usize,
    /// Width of one head.
    pub d_head: usize,
    /// What the core runs ([`ParallelAttentionConfig::kernel`], resolved at init).
    #[module(skip)]
    pub core: AttentionCore,
    /// RoPE's base and scaling (`None`: no rotary embedding).
    #[module(skip)]
    pub rope: Option<burn_parallel::arch::Rope>,
    /// Key/value heads on this rank (`local_heads` without grouped-query attention).
    #[module(skip)]
    pub local_groups: usize,
    /// The context-parallel group this rank's sequence chunks belong to (`None`: whole
    /// sequences; set by `Gpt::with_context_parallel`).
    #[module(skip)]
    pub cp: Option<burn_parallel::ContextParallel>,
}

impl ParallelAttentionConfig {
    /// Builds this rank's shard.
    pub fn init<B: ParallelBackend>(&self, tp: &Comm, init: &ParamInit, device: &B::Device) -> Result<ParallelAttention<B>, ConfigError> {
        if self.n_heads == 0 || !self.d_model.is_multiple_of(self.n_heads) {
            return Err(ConfigError::NotDivisible { what: "hidden size", value: self.d_model, degree_name: "attention heads", degree: self.n_heads });
        }
        let local_heads = check_divisible("attention heads", self.n_heads, tp)?;
        let d_head = self.d_model / self.n_heads;
        let core = self.kernel.resolve::<B>(device, d_head, self.dropout).map_err(ConfigError::Invalid)?;
        if self.rope.is_some() && !d_head.is_multiple_of(2) {
            return Err(ConfigError::Invalid(format!("rotary position embedding needs an even head width, got {d_head}")));
        }
        let groups = self.kv_heads.unwrap_or(self.n_heads);
        if groups == 0 || !self.n_heads.is_multiple_of(groups) {
            return Err(ConfigError::NotDivisible { what: "attention heads", value: self.n_heads, degree_name: "key/value heads", degree: groups });
        }
        let local_groups = check_divisible("key/value heads", groups, tp)?;
        // q, k and v are generated as separate h → h (k, v: h → G·d) weights (their own init
        // streams, as the unfused model's) and fused per head or group.
        let part = |name: &str, width: usize| init.child(name).child("weight").normal(&[self.d_model, width], self.init_std);
        let kv = groups * d_head;
        let weights = fuse_qkv_grouped(&part("query", self.d_model), &part("key", kv), &part("value", kv), self.n_heads, groups);
        Ok(ParallelAttention {
            qkv: ColumnLinearConfig::new(self.d_model, self.d_model + 2 * kv).with_bias(self.bias).init_from(tp, weights, device)?,
            output: RowLinearConfig::new(self.d_model, self.d_model).with_init_std(self.proj_init_std).with_bias(self.bias).init(
                tp,
                &init.child("output"),
                device,
            )?,
            dropout: ParallelDropout::new(self.dropout, init.seed, &init.child("dropout").path, DropoutRegion::Sharded, tp.rank()),
            local_heads,
            d_head,
            core,
            rope: self.rope,
            local_groups,
            cp: None,
        })
    }
}

impl<B: ParallelBackend> ParallelAttention<B> {
    /// `[b, s, h]` replicated → `[b, s, h]` replicated, causal.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let x = copy_to_tp(x, &self.qkv.tp);
        self.forward_parallel_input(x)
    }

    /// Sequence parallel: `[b, s/t, h]` shard → all-gather (backward reduce-scatter) → attention
    /// over the full causal sequence → row-parallel output reduce-scattered to `[b, s/t, h]`.
    pub fn forward_sp(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let context = self.context(gather_from_sp(x, 1, &self.qkv.tp));
        self.output.forward_sp(context)
    }

    /// The same for an input that already went through f (or the SP all-gather).
    pub fn forward_parallel_input(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let context = self.context(x);
        self.output.forward(context)
    }

    /// Attention of this rank's heads: `[b, s, h]` (after f / all-gather) → `[b, s, h/t]`.
    fn context(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.core_qkv(self.project_qkv(x))
    }

    /// The TP entry of the attention input: f (`[b, s, h]`, backward all-reduce) or, under
    /// sequence parallelism, the all-gather of the `[b, s/t, h]` shard.
    pub fn enter(&self, x: Tensor<B, 3>, sequence_parallel: bool) -> Tensor<B, 3> {
        if sequence_parallel {
            gather_from_sp(x, 1, &self.qkv.tp)
        } else {
            copy_to_tp(x, &self.qkv.tp)
        }
    }

    /// This rank's fused projection of an entered input, `[b, s, (H + 2G)·d/t]` grouped by head
    /// (`3h/t` without grouped-query attention) or key/value group (queries and keys rotated
    /// with RoPE).
    pub fn project_qkv(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let qkv = self.qkv.forward_parallel_input(x);
        let Some(rope) = &self.rope else { return qkv };
        let (groups, r, d) = (self.local_groups, self.local_heads / self.local_groups, self.d_head);
        match self.context_parallel() {
            Some(cp) => {
                let positions = cp.positions(qkv.dims()[1]);
                crate::rope::rope_qkv_at(qkv, groups, r, d, rope, &positions)
            }
            None => crate::rope::rope_qkv(qkv, groups, r, d, rope),
        }
    }

    /// Query `[b, s, h/t]` (heads in order), key and value `[b, s, G·d/t]` (groups in order)
    /// of a fused projection.
    pub fn split_qkv(&self, fused: Tensor<B, 3>) -> [Tensor<B, 3>; 3] {
        let [b, s, _] = fused.dims();
        let (gl, d) = (self.local_groups, self.d_head);
        let r = self.local_heads / gl;
        let grouped = fused.reshape([b, s, gl, r + 2, d]);
        let part = |parts: std::ops::Range<usize>| {
            let n = parts.len();
            grouped.clone().slice([0..b, 0..s, 0..gl, parts, 0..d]).reshape([b, s, gl * n * d])
        };
        [part(0..r), part(r..r + 1), part(r + 1..r + 2)]
    }

    /// The attention core of a fused projection `[b, s, (H + 2G)·d/t]` → context `[b, s, h/t]`:
    /// with a fused or chunked [`core`](Self::core) and one key/value head per head, one op on
    /// the projection ([`causal_attention_qkv`]: no slices of it, its gradient written by one
    /// concatenation); composed, or grouped-query, [`split_qkv`](Self::split_qkv) then
    /// [`core`](Self::core).
    pub fn core_qkv(&self, qkv: Tensor<B, 3>) -> Tensor<B, 3> {
        let scale = 1.0 / (self.d_head as f32).sqrt();
        if self.local_groups != self.local_heads || self.context_parallel().is_some() {
            // Grouped-query attention: q and the repeated k, v as separate heads; context
            // parallelism: k, v gathered.
            let [q, k, v] = self.split_qkv(qkv);
            return self.core(q, k, v);
        }
        match self.core {
            AttentionCore::Fused => causal_attention_qkv(qkv, self.local_heads, scale, None),
            AttentionCore::Chunked(rows) => causal_attention_qkv(qkv, self.local_heads, scale, Some(rows)),
            AttentionCore::Composed => {
                let [q, k, v] = self.split_qkv(qkv);
                self.core(q, k, v)
            }
        }
    }

    /// The attention core (no parameters): `q [b, s, h/t]`, `k, v [b, s, G·d/t]` (each key/value
    /// head repeated for its query heads) → context `[b, s, h/t]`:
    /// scores `[b, H/t, s, s]`, causal mask, softmax in f32, dropout, weighted sum. Selective
    /// recompute runs this part again in the backward instead of keeping its `s × s` tensors.
    /// With a fused or chunked [`core`](Self::core) one attention op (`burn_parallel::attention`):
    /// no `s × s` tensor kept, `o` and the f32 log-sum-exp saved for the backward.
    /// Under context parallelism `q, k, v` hold this rank's `s/C` tokens: `k` and `v` are
    /// all-gathered to the whole `s` and masked by position.
    pub fn core(&self, q: Tensor<B, 3>, k: Tensor<B, 3>, v: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, s, _] = q.dims();
        let (k, v) = match self.context_parallel() {
            // The fused and chunked cores take the keys in position order (before any
            // repetition for grouped-query attention: the copy is of the key/value heads only).
            Some(cp) if self.core.keeps_lse_only() => (cp.to_position_order(cp.gather(k, 1), 1), cp.to_position_order(cp.gather(v, 1), 1)),
            Some(cp) => (cp.gather(k, 1), cp.gather(v, 1)),
            None => (k, v),
        };
        let sk = k.dims()[1];
        let (hl, gl, d) = (self.local_heads, self.local_groups, self.d_head);
        let q = q.reshape([b, s, hl, d]).swap_dims(1, 2);
        let kv = |t: Tensor<B, 3>| {
            let t = t.reshape([b, sk, gl, d]).swap_dims(1, 2);
            if gl == hl {
                return t;
            }
            t.unsqueeze_dim::<5>(2).expand([b, gl, hl / gl, sk, d]).reshape([b, hl, sk, d])
        };
        let (k, v) = (kv(k), kv(v));
        let scale = 1.0 / (self.d_head as f32).sqrt();
        let merge = |o: Tensor<B, 4>| o.swap_dims(1, 2).reshape([b, s, self.local_heads * self.d_head]);
        match self.context_parallel() {
            Some(cp) if self.core.keeps_lse_only() => return merge(context_parallel_core(q, k, v, scale, self.core, cp)),
            _ => {}
        }
        match self.core {
            AttentionCore::Fused => return merge(causal_attention(q, k, v, scale)),
            AttentionCore::Chunked(rows) => return merge(causal_attention_chunked(q, k, v, scale, rows)),
            AttentionCore::Composed => {}
        }
        let scores = q.matmul(k.swap_dims(2, 3)).div_scalar((self.d_head as f32).sqrt());
        let mask = match self.context_parallel() {
            Some(cp) => position_mask::<B>(&cp.positions(s), &cp.gathered_positions(s), &scores.device()),
            None => burn_parallel::attention::future_mask::<B>(0, s, s, &scores.device()),
        };
        let scores = scores.mask_fill(mask, MASK_VALUE);
        // Softmax in f32 whatever the compute dtype (no-op for f32), as Megatron's fused softmax;
        // one autodiff op saving only its output (`burn_parallel::attention::softmax`).
        let probs = self.dropout.forward(like(burn_parallel::attention::softmax(to_f32(scores.clone())), &scores));
        merge(probs.matmul(v))
    }

    /// The context-parallel group when it splits the sequence (more than one rank).
    pub fn context_parallel(&self) -> Option<&burn_parallel::ContextParallel> {
        self.cp.as_ref().filter(|cp| cp.size() > 1)
    }

    /// The row-parallel output projection of a context: all-reduced `[b, s, h]`, or
    /// reduce-scattered `[b, s/t, h]` under sequence parallelism.
    pub fn project(&self, context: Tensor<B, 3>, sequence_parallel: bool) -> Tensor<B, 3> {
        if sequence_parallel {
            self.output.forward_sp(context)
        } else {
            self.output.forward(context)
        }
    }
}

impl<B: ParallelBackend> RandomStreams for ParallelAttention<B> {
    fn random_streams(&self) -> Vec<StreamCounter> {
        self.dropout.random_streams()
    }
}

/// Context parallelism through the fused or chunked core: `q [b, H, s/C, d]` (this rank's chunks
/// `r` and `2C−1−r`), the gathered `k, v [b, H, s, d]` in position order; each query chunk of
/// `n` attends at its offset to the keys up to its end ([`causal_attention_at`]: the kernels;
/// [`causal_attention_chunked_at`]: Burn ops).
fn context_parallel_core<B: ParallelBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    scale: f32,
    core: AttentionCore,
    cp: &burn_parallel::ContextParallel,
) -> Tensor<B, 4> {
    let (c, r, n) = (cp.size(), cp.rank(), q.dims()[2] / 2);
    // Both chunks take the whole `k`, `v` (one saved copy; keys past a chunk's end are never
    // read, their gradient rows are zero), so every rank holds and returns the same sizes.
    let half = |i: usize, chunk: usize| {
        let q = q.clone().narrow(2, i * n, n);
        match core {
            AttentionCore::Chunked(rows) => causal_attention_chunked_at(q, k.clone(), v.clone(), scale, rows, chunk * n),
            _ => causal_attention_at(q, k.clone(), v.clone(), scale, chunk * n),
        }
    };
    Tensor::cat(vec![half(0, r), half(1, 2 * c - 1 - r)], 2)
}

/// `[1, 1, queries, keys]`: key position > query position (true: masked), the causal mask of
/// tokens at any positions (context parallelism's chunks).
fn position_mask<B: burn::tensor::backend::Backend>(queries: &[usize], keys: &[usize], device: &B::Device) -> Tensor<B, 4, burn::tensor::Bool> {
    let int = |p: &[usize]| Tensor::<B, 1, burn::tensor::Int>::from_data(TensorData::new(p.iter().map(|&x| x as i64).collect::<Vec<_>>(), [p.len()]), device);
    let (nq, nk) = (queries.len(), keys.len());
    let q = int(queries).reshape([nq, 1]).expand([nq, nk]);
    int(keys).reshape([1, nk]).expand([nq, nk]).greater(q).reshape([1, 1, nq, nk])
}

/// The fused `[h, 3h]` weight (or `[3h]` bias) of separate q, k, v `[h_in, h]` tensors: columns
/// grouped per head, `[q_j k_j v_j]` for head `j` (each `h / heads` wide).
pub fn fuse_qkv(q: &TensorData, k: &TensorData, v: &TensorData, heads: usize) -> TensorData {
    fuse_qkv_grouped(q, k, v, heads, heads)
}

pub use burn_parallel::qkv::fuse_qkv_grouped;
