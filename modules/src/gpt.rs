//! A GPT whose every layer is tensor-parallel.
//!
//! `ids [b, s] → wte (vocab-parallel) + wpe (replicated) → dropout → N × pre-LN block → LN →
//! head (column-parallel over the vocabulary) → logits [b, s, V/t] → vocab-parallel CE`.
//!
//! The head is **untied** by default: its own column-parallel `[h, V]` weight, `V·h` more
//! parameters than GPT-2, whose head is the token embedding (`GptConfig::tie_embeddings`: logits
//! `x · Eᵀ` on the embedding's vocabulary shard, see [`crate::tied_head`]; split into a pipeline,
//! the last stage holds a replica whose gradient is summed with the first stage's).
//! Initialisation is seeded per parameter path (see [`crate::init`]); the output projections of
//! each block use `0.02/√(2L)` as in GPT-2.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::ElementConversion;
use burn::tensor::{Int, Tensor};
use burn_parallel::mappings::gather_from_tp;
use burn_parallel::precision::{cast_params, Precision};
use burn_parallel::recompute::Recompute;
use burn_parallel::{BackwardWith, CommError};

use crate::recompute::{self, Output, Pieces, Tokens};
use burn_parallel::rng::{RandomStreams, StreamCounter};
use burn_parallel::{Comm, ConfigError, ModelDims, ParallelBackend, ParallelConfig};

use crate::block::{TransformerBlock, TransformerBlockConfig};
use crate::column_linear::{ColumnLinear, ColumnLinearConfig};
use crate::dropout::{DropoutRegion, ParallelDropout};
use crate::embedding::{VocabParallelEmbedding, VocabParallelEmbeddingConfig};
use crate::init::{param, ParamInit};
use crate::layer_norm::{ParallelLayerNorm, ParallelLayerNormConfig};
use crate::tied_head::HeadWeight;

pub use crate::ends::HeadRef;
pub(crate) use crate::ends::{embed, head_logits, head_loss};

/// Token embedding, position embedding (none with RoPE) and their dropout (what runs before
/// the first block).
type Embedding<B> = (VocabParallelEmbedding<B>, Option<Param<Tensor<B, 2>>>, ParallelDropout);

/// Configuration of a [`Gpt`].
#[derive(Config, Debug)]
pub struct GptConfig {
    /// Vocabulary size (divisible by the TP size).
    pub vocab_size: usize,
    /// Longest sequence (position embeddings).
    pub max_seq_len: usize,
    /// Model width (divisible by heads and by the TP size).
    pub d_model: usize,
    /// Attention heads (divisible by the TP size).
    pub n_heads: usize,
    /// Transformer blocks.
    pub n_layers: usize,
    /// MLP inner width (divisible by the TP size).
    pub d_ff: usize,
    /// Dropout probability (embedding, attention, residual branches).
    #[config(default = 0.0)]
    pub dropout: f64,
    /// Seed of the parameter initialisation and dropout masks.
    #[config(default = 42)]
    pub seed: u64,
    /// Layer-norm epsilon.
    #[config(default = 1e-5)]
    pub layer_norm_eps: f64,
    /// Sequence parallelism over the TP group: layer norms, dropouts and residuals run on
    /// `[b, s/t, h]` shards (the sequence length must be divisible by the TP size).
    #[config(default = false)]
    pub sequence_parallel: bool,
    /// Compute precision: with `Bf16` the parameters are initialised in f32 and stored in bf16
    /// (the optimizer keeps f32 master weights, see `burn_parallel::optim`).
    #[config(default = "burn_parallel::precision::Precision::F32")]
    pub precision: Precision,
    /// Activation recompute in training steps ([`Gpt::forward_backward`], pipeline stages):
    /// none, selective (attention core) or full (whole blocks). See [`crate::recompute`].
    #[config(default = "burn_parallel::recompute::Recompute::None")]
    pub recompute: Recompute,
    /// The tokenizer's vocabulary when `vocab_size` is padded beyond it (Megatron's
    /// make-vocab-size-divisible-by): the padded entries' logits are masked.
    #[config(default = "None")]
    pub vocab_used: Option<usize>,
    /// The cross-entropy is computed this many token rows at a time, in training and in
    /// [`Gpt::loss`] (its f32 softmax never whole: `crate::cross_entropy::chunked_loss`);
    /// `None`: in one piece.
    #[config(default = "None")]
    pub loss_chunk: Option<usize>,
    /// The attention core (see `ParallelAttentionConfig::kernel`): `Auto` (fused kernels where
    /// the backend has them and dropout is 0, else composed), `Composed`, `Fused` (or an
    /// error), `Chunked(rows)`.
    #[config(default = "burn_parallel::attention::AttentionKernel::Auto")]
    pub attention: burn_parallel::attention::AttentionKernel,
    /// Tied embeddings (GPT-2; Megatron's default): the head's weight is the token embedding
    /// `[V, h]` transposed, no `head` parameter. See [`crate::tied_head`].
    #[config(default = false)]
    pub tie_embeddings: bool,
    /// The MLPs' activation: GeLU, GPT-2's tanh approximation (what pretrained GPT-2 weights
    /// expect), or SwiGLU (Llama: the MLP gets a gate projection).
    #[config(default = "burn_parallel::activation::Activation::Gelu")]
    pub activation: burn_parallel::activation::Activation,
    /// Layer norms (GPT-2) or RMS norms (Llama), in the blocks and before the head.
    #[config(default = "burn_parallel::arch::Norm::LayerNorm")]
    pub norm: burn_parallel::arch::Norm,
    /// A learned position embedding `wpe` (GPT-2), or rotary embedding of queries and keys
    /// (Llama: no `wpe`).
    #[config(default = "burn_parallel::arch::Position::Learned")]
    pub position: burn_parallel::arch::Position,
    /// RoPE's base `θ` (with `Position::Rope`).
    #[config(default = 10000.0)]
    pub rope_theta: f64,
    /// Llama 3.1's long-context scaling of RoPE's frequencies (with `Position::Rope`; `None`:
    /// plain RoPE).
    #[config(default = "None")]
    pub rope_scaling: Option<burn_parallel::arch::RopeScaling>,
    /// Biases on the attention's and the MLPs' projections (Llama has none).
    #[config(default = true)]
    pub bias: bool,
    /// Key/value heads: grouped-query attention with this many (dividing `n_heads`, divisible
    /// by the TP size); `None`: one per query head.
    #[config(default = "None")]
    pub kv_heads: Option<usize>,
}

/// A GPT split over a TP group (a group of one gives the plain model).
#[derive(Module, Debug)]
pub struct Gpt<B: ParallelBackend> {
    /// Token embedding, vocab-parallel.
    pub wte: VocabParallelEmbedding<B>,
    /// Position embedding `[max_seq_len, h]`, replicated (`None` with RoPE).
    pub wpe: Option<Param<Tensor<B, 2>>>,
    /// Dropout on the embedding sum (replicated region).
    pub drop: ParallelDropout,
    /// Transformer blocks.
    pub blocks: Vec<TransformerBlock<B>>,
    /// Final layer norm, replicated.
    pub ln_f: ParallelLayerNorm<B>,
    /// Output head `h → V/t`, column-parallel over the vocabulary; `None` with tied embeddings
    /// (the head is `wte`'s table).
    pub head: Option<ColumnLinear<B>>,
    /// Sequence parallelism on.
    pub sequence_parallel: bool,
    /// Activation recompute of [`Gpt::forward_backward`].
    #[module(skip)]
    pub recompute: Recompute,
    /// Vocabulary ids from here on are padding (masked in the logits).
    #[module(skip)]
    pub vocab_used: Option<usize>,
    /// Cross-entropy rows per chunk in [`Gpt::forward_backward`].
    #[module(skip)]
    pub loss_chunk: Option<usize>,
    /// Longest sequence (the generation window).
    #[module(skip)]
    pub max_seq_len: usize,
}

impl GptConfig {
    /// The dimensions TP splits.
    pub fn dims(&self) -> ModelDims {
        ModelDims { hidden: self.d_model, heads: self.n_heads, ffn: self.d_ff, vocab: self.vocab_size }
    }

    /// Checks this configuration for a TP group of `tp` ranks: every size at least 1 (sequence,
    /// layers, loss chunk), the dropout a probability below 1, the sizes tensor parallelism
    /// splits ([`ParallelConfig::validate_model`]), then key/value heads and RoPE's head width.
    pub fn validate(&self, tp: usize) -> Result<(), ConfigError> {
        for (what, value) in [("max_seq_len", self.max_seq_len), ("layers", self.n_layers), ("loss chunk rows", self.loss_chunk.unwrap_or(1))] {
            if value == 0 {
                return Err(ConfigError::ZeroSize { what });
            }
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(ConfigError::Invalid(format!("dropout {} is not a probability in [0, 1)", self.dropout)));
        }
        ParallelConfig::new().with_tensor_parallel(tp).validate_model(&self.dims())?;
        self.validate_arch(tp)
    }

    /// Grouped-query heads (dividing the heads, divisible by `tp`) and RoPE's even head width.
    fn validate_arch(&self, tp: usize) -> Result<(), ConfigError> {
        if let Some(g) = self.kv_heads {
            if g == 0 || !self.n_heads.is_multiple_of(g) {
                return Err(ConfigError::NotDivisible { what: "attention heads", value: self.n_heads, degree_name: "key/value heads", degree: g });
            }
            if !g.is_multiple_of(tp) {
                return Err(ConfigError::NotDivisible { what: "key/value heads", value: g, degree_name: "tensor_parallel", degree: tp });
            }
        }
        if self.rope_scaling.is_some() && self.position != burn_parallel::arch::Position::Rope {
            return Err(ConfigError::Invalid("RoPE scaling needs rotary positions (position Rope)".into()));
        }
        if self.position == burn_parallel::arch::Position::Rope {
            let d_head = self.d_model / self.n_heads.max(1);
            if !(d_head.is_multiple_of(2) && self.rope_theta > 0.0 && self.rope_theta.is_finite()) {
                return Err(ConfigError::Invalid(format!(
                    "rotary position embedding needs an even head width and θ > 0: head width {d_head}, θ {}",
                    self.rope_theta
                )));
            }
            if let Some(scaling) = &self.rope_scaling {
                scaling.validate().map_err(|e| ConfigError::Invalid(e.to_string()))?;
            }
        }
        Ok(())
    }

    /// Builds this rank's shard of the model for the TP group `tp`.
    pub fn init<B: ParallelBackend>(&self, tp: &Comm, device: &B::Device) -> Result<Gpt<B>, ConfigError> {
        self.validate(tp.size())?;
        let (wte, wpe, drop) = self.init_embedding(tp, device)?;
        let (ln_f, head) = self.init_head(tp, device)?;
        let blocks = self.init_blocks(0..self.n_layers, tp, device)?;
        Ok(self.in_precision(Gpt {
            wte,
            wpe,
            drop,
            blocks,
            ln_f,
            head,
            sequence_parallel: self.sequence_parallel,
            recompute: self.recompute,
            vocab_used: self.vocab_used,
            loss_chunk: self.loss_chunk,
            max_seq_len: self.max_seq_len,
        }))
    }

    /// Token and position embeddings and their dropout (what runs before the first block).
    pub(crate) fn init_embedding<B: ParallelBackend>(&self, tp: &Comm, device: &B::Device) -> Result<Embedding<B>, ConfigError> {
        let init = ParamInit::new(self.seed);
        Ok((
            VocabParallelEmbeddingConfig::new(self.vocab_size, self.d_model).init(tp, &init.child("wte"), device)?,
            (self.position == burn_parallel::arch::Position::Learned)
                .then(|| param(init.child("wpe").child("weight").normal(&[self.max_seq_len, self.d_model], 0.02), device)),
            ParallelDropout::new(self.dropout, self.seed, "drop", self.dropout_region(), tp.rank()),
        ))
    }

    /// Blocks `layers` (global indices: the same parameters in any split).
    pub(crate) fn init_blocks<B: ParallelBackend>(
        &self,
        layers: std::ops::Range<usize>,
        tp: &Comm,
        device: &B::Device,
    ) -> Result<Vec<TransformerBlock<B>>, ConfigError> {
        let init = ParamInit::new(self.seed);
        let proj_std = 0.02 / ((2 * self.n_layers.max(1)) as f64).sqrt();
        let block = TransformerBlockConfig::new(self.d_model, self.n_heads, self.d_ff)
            .with_dropout(self.dropout)
            .with_proj_init_std(proj_std)
            .with_layer_norm_eps(self.layer_norm_eps)
            .with_sequence_parallel(self.sequence_parallel)
            .with_attention(self.attention)
            .with_activation(self.activation)
            .with_norm(self.norm)
            .with_bias(self.bias)
            .with_rope(self.rope())
            .with_kv_heads(self.kv_heads);
        layers.map(|i| block.init(tp, &init.child("blocks").child(i), device)).collect()
    }

    /// Final layer norm and the vocab-parallel head (what runs after the last block; no head of
    /// its own with tied embeddings).
    pub(crate) fn init_head<B: ParallelBackend>(&self, tp: &Comm, device: &B::Device) -> Result<(ParallelLayerNorm<B>, Option<ColumnLinear<B>>), ConfigError> {
        let init = ParamInit::new(self.seed);
        let head = ColumnLinearConfig::new(self.d_model, self.vocab_size).with_bias(false);
        Ok((
            ParallelLayerNormConfig::new(self.d_model)
                .with_epsilon(self.layer_norm_eps)
                .with_sequence_parallel(self.sequence_parallel)
                .with_norm(self.norm)
                .init(tp, device),
            (!self.tie_embeddings).then(|| head.init(tp, &init.child("head"), device)).transpose()?,
        ))
    }
}

impl GptConfig {
    /// `module` with its parameters in this config's precision (a no-op for f32).
    pub fn in_precision<B: ParallelBackend, M: Module<B>>(&self, module: M) -> M {
        match self.precision {
            Precision::F32 => module,
            p => cast_params(module, p.dtype()),
        }
    }

    /// RoPE's base and scaling where positions are rotary.
    pub fn rope(&self) -> Option<burn_parallel::arch::Rope> {
        let rope = burn_parallel::arch::Rope { theta: self.rope_theta, scaling: self.rope_scaling };
        (self.position == burn_parallel::arch::Position::Rope).then_some(rope)
    }

    fn dropout_region(&self) -> DropoutRegion {
        if self.sequence_parallel {
            DropoutRegion::Sharded
        } else {
            DropoutRegion::Replicated
        }
    }

    /// Checks a sequence length against `max_seq_len` and, under sequence parallelism, the TP size.
    pub fn check_seq_len(&self, seq_len: usize, tp: usize) -> Result<(), ConfigError> {
        if seq_len > self.max_seq_len {
            return Err(ConfigError::Invalid(format!("sequence length {seq_len} exceeds max_seq_len {}", self.max_seq_len)));
        }
        if self.sequence_parallel && !seq_len.is_multiple_of(tp) {
            return Err(ConfigError::NotDivisible {
                what: "sequence length",
                value: seq_len,
                degree_name: "tensor_parallel (sequence parallelism)",
                degree: tp,
            });
        }
        Ok(())
    }
}

impl<B: ParallelBackend> Gpt<B> {
    /// The TP group.
    pub fn tp(&self) -> &Comm {
        &self.wte.tp
    }

    /// Output of the last block: `[b, s] → [b, s, h]` (replicated), or this rank's sequence
    /// shard `[b, s/t, h]` under sequence parallelism.
    pub fn hidden(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let mut x = embed(&self.wte, self.wpe.as_ref(), &self.drop, ids, self.sequence_parallel);
        for block in &self.blocks {
            x = block.forward(x);
        }
        x
    }

    /// This rank's logits `[b, s, V/t]` (vocabulary ids `[r·V/t, (r+1)·V/t)`).
    pub fn forward(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        head_logits(&self.head_ref(), self.hidden(ids))
    }

    /// Full logits `[b, s, V]` (all-gathered over the vocabulary).
    pub fn logits(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        gather_from_tp(self.forward(ids), self.tp())
    }

    /// Mean next-token cross-entropy of `ids [b, s]` against `targets [b, s]` (replicated).
    /// With `GptConfig::loss_chunk`, on a backend without autodiff (evaluation through
    /// `valid()`) it is computed that many rows at a time, as training does: evaluation never
    /// holds the whole f32 softmax either. Under autodiff it is whole (see `forward_backward`
    /// for the chunked training path).
    pub fn loss(&self, ids: Tensor<B, 2, Int>, targets: Tensor<B, 2, Int>) -> Tensor<B, 1> {
        head_loss(&self.head_ref(), self.hidden(ids), targets, self.loss_chunk)
    }

    /// The head's pieces.
    pub fn head_ref(&self) -> HeadRef<'_, B> {
        let head = match &self.head {
            Some(head) => HeadWeight::Own(head),
            None => HeadWeight::Tied(&self.wte.weight),
        };
        HeadRef { ln_f: &self.ln_f, head, tp: self.tp(), vocab_start: self.wte.vocab_start, vocab_used: self.vocab_used }
    }

    /// The pieces recompute walks.
    pub fn pieces(&self) -> Pieces<'_, B> {
        Pieces {
            embed: Some((&self.wte, self.wpe.as_ref(), &self.drop)),
            blocks: &self.blocks,
            head: Some(self.head_ref()),
            sequence_parallel: self.sequence_parallel,
            tp: self.tp(),
            cp: self.wte.cp.as_ref().map(|cp| cp.comm()),
        }
    }

    /// One training forward and backward: the loss (its value) and every parameter gradient,
    /// with the model's activation recompute (`GptConfig::recompute`; `None`: the plain
    /// `loss(..).backward()`).
    pub fn forward_backward(&self, ids: Tensor<B, 2, Int>, targets: Tensor<B, 2, Int>) -> Result<(f32, GradientsParams), CommError>
    where
        B: AutodiffBackend + BackwardWith,
        B::InnerBackend: ParallelBackend,
    {
        self.forward_backward_scaled(ids, targets, 1.0)
    }

    /// Gradient accumulation (Megatron's micro-batches without a pipeline): the forward and
    /// backward of each `(ids, targets)` micro-batch in turn, its loss scaled by `1/m` (as the
    /// pipeline executor scales each micro-batch), one micro-batch's activations alive at a
    /// time; the gradients summed, half-precision ones in f32 (Megatron's main grads). Returns
    /// the mean of the micro-batch losses and the summed gradients: for micro-batches of equal
    /// size, the loss and gradient of the whole batch (within rounding). One micro-batch is
    /// exactly [`forward_backward`](Self::forward_backward).
    ///
    /// # Panics
    /// If `microbatches` is empty.
    pub fn forward_backward_accumulated(&self, microbatches: Vec<(Tensor<B, 2, Int>, Tensor<B, 2, Int>)>) -> Result<(f32, GradientsParams), CommError>
    where
        B: AutodiffBackend + BackwardWith,
        B::InnerBackend: ParallelBackend,
    {
        let m = microbatches.len();
        assert!(m > 0, "gradient accumulation needs at least one micro-batch");
        if m == 1 {
            let (ids, targets) = microbatches.into_iter().next().expect("one micro-batch");
            let _t = burn_parallel::timing::span!(burn_parallel::timing::phase::FORWARD_BACKWARD, mb = 0).entered();
            return self.forward_backward(ids, targets);
        }
        let half = matches!(self.wte.weight.val().dtype(), burn::tensor::DType::BF16 | burn::tensor::DType::F16);
        let (mut acc, mut total) = (burn::optim::GradientsAccumulator::new(), 0.0f32);
        for (mb, (ids, targets)) in microbatches.into_iter().enumerate() {
            let _t = burn_parallel::timing::span!(burn_parallel::timing::phase::FORWARD_BACKWARD, mb = mb).entered();
            let (loss, grads) = self.forward_backward_scaled(ids, targets, 1.0 / m as f32)?;
            acc.accumulate(self, if half { burn_parallel::precision::grads_to_f32(self, grads) } else { grads });
            total += loss;
        }
        Ok((total / m as f32, acc.grads()))
    }

    /// [`forward_backward`](Self::forward_backward) with the loss scaled by `scale` in the
    /// backward (the value returned is unscaled).
    fn forward_backward_scaled(&self, ids: Tensor<B, 2, Int>, targets: Tensor<B, 2, Int>, scale: f32) -> Result<(f32, GradientsParams), CommError>
    where
        B: AutodiffBackend + BackwardWith,
        B::InnerBackend: ParallelBackend,
    {
        if self.recompute == Recompute::None && self.loss_chunk.is_none() {
            let loss = self.loss(ids, targets);
            let value = loss.clone().into_scalar().elem::<f32>();
            let loss = if scale == 1.0 { loss } else { loss.mul_scalar(scale) };
            return Ok((value, GradientsParams::from_grads(loss.backward(), self)));
        }
        let pieces = self.pieces();
        let (out, tape) = recompute::forward(&pieces, None, Tokens { ids: Some(ids), targets: Some(targets) }, self.recompute, self.loss_chunk);
        let value = match out {
            Output::Loss(l) => l.into_scalar().elem::<f32>(),
            Output::Activation(_) => unreachable!("the whole model ends with its loss"),
        };
        let (_, grads) = recompute::backward(&pieces, self, tape, None, scale)?;
        Ok((value, grads))
    }

    /// The same model with sequence parallelism switched on or off (parameters shared), for
    /// evaluation: the dropout mask streams stay as built (per-rank under sequence parallelism,
    /// replicated otherwise), so train a model in the mode it was configured with.
    pub fn with_sequence_parallel(mut self, on: bool) -> Self {
        self.sequence_parallel = on;
        self.ln_f.sequence_parallel = on;
        for b in &mut self.blocks {
            b.sequence_parallel = on;
            b.ln1.sequence_parallel = on;
            b.ln2.sequence_parallel = on;
        }
        self
    }
}

impl<B: ParallelBackend> RandomStreams for Gpt<B> {
    /// The embedding dropout's and every block's mask streams.
    fn random_streams(&self) -> Vec<StreamCounter> {
        let mut out = self.drop.random_streams();
        out.extend(self.blocks.iter().flat_map(|b| b.random_streams()));
        out
    }
}
