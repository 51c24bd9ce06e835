//! Pre-LN transformer block: `x + drop(attn(LN₁ x))`, then `x + drop(mlp(LN₂ x))`.
//!
//! Layer norms are replicated (every TP rank holds full `γ, β` and sees the full gradient, since
//! their outputs enter the TP region through f). Residual dropouts sit in the replicated region:
//! the same mask on every TP rank. Per layer and micro-batch: 2 all-reduces forward (after
//! attention and after the MLP) and 2 backward (the f of each sub-block).
//!
//! With `sequence_parallel`, the block maps `[b, s/t, h]` shards to shards: layer norms, residuals
//! and dropouts run on this rank's tokens only (activation memory of these regions ÷ t, own dropout
//! mask per rank); each sub-block all-gathers the sequence before its column-parallel linear and
//! reduce-scatters after its row-parallel linear — the same communication volume as the two
//! all-reduces. `γ, β` and the row-parallel biases get their gradients summed over the TP group
//! automatically (see [`ParallelLayerNorm`]).

use burn::config::Config;
use burn::module::Module;
use burn::tensor::Tensor;
use burn_parallel::rng::{RandomStreams, StreamCounter};
use burn_parallel::{Comm, ConfigError, ParallelBackend};

use crate::attention::{ParallelAttention, ParallelAttentionConfig};
use crate::dropout::{DropoutRegion, ParallelDropout};
use crate::init::ParamInit;
use crate::layer_norm::{ParallelLayerNorm, ParallelLayerNormConfig};
use crate::mlp::{ParallelMlp, ParallelMlpConfig};

/// Configuration of a [`TransformerBlock`].
#[derive(Config, Debug)]
pub struct TransformerBlockConfig {
    /// Model width.
    pub d_model: usize,
    /// Heads over all ranks.
    pub n_heads: usize,
    /// MLP inner width over all ranks.
    pub d_ff: usize,
    /// Dropout on attention probabilities and residual branches.
    #[config(default = 0.0)]
    pub dropout: f64,
    /// Init standard deviation.
    #[config(default = 0.02)]
    pub init_std: f64,
    /// Init standard deviation of the two output projections (GPT-2: `0.02/√(2L)`).
    #[config(default = 0.02)]
    pub proj_init_std: f64,
    /// Layer-norm epsilon.
    #[config(default = 1e-5)]
    pub layer_norm_eps: f64,
    /// Sequence parallelism: inputs and outputs are `[b, s/t, h]` shards.
    #[config(default = false)]
    pub sequence_parallel: bool,
    /// The attention core's kernel (see [`ParallelAttentionConfig::kernel`]).
    #[config(default = "burn_parallel::attention::AttentionKernel::Auto")]
    pub attention: burn_parallel::attention::AttentionKernel,
    /// The MLP's activation.
    #[config(default = "burn_parallel::activation::Activation::Gelu")]
    pub activation: burn_parallel::activation::Activation,
    /// Layer norms or RMS norms.
    #[config(default = "burn_parallel::arch::Norm::LayerNorm")]
    pub norm: burn_parallel::arch::Norm,
    /// Biases on the attention's and the MLP's projections.
    #[config(default = true)]
    pub bias: bool,
    /// RoPE's base `θ` and scaling in the attention (`None`: no rotary embedding).
    #[config(default = "None")]
    pub rope: Option<burn_parallel::arch::Rope>,
    /// Key/value heads (grouped-query attention; `None`: one per query head).
    #[config(default = "None")]
    pub kv_heads: Option<usize>,
}

/// One transformer layer, split over the TP group.
#[derive(Module, Debug)]
pub struct TransformerBlock<B: ParallelBackend> {
    /// Layer norm before attention (replicated).
    pub ln1: ParallelLayerNorm<B>,
    /// Self-attention.
    pub attn: ParallelAttention<B>,
    /// Layer norm before the MLP (replicated).
    pub ln2: ParallelLayerNorm<B>,
    /// Feed-forward.
    pub mlp: ParallelMlp<B>,
    /// Residual dropout after attention (replicated region).
    pub drop_attn: ParallelDropout,
    /// Residual dropout after the MLP (replicated region).
    pub drop_mlp: ParallelDropout,
    /// Inputs and outputs are sequence shards.
    pub sequence_parallel: bool,
}

impl TransformerBlockConfig {
    /// Builds this rank's shard.
    pub fn init<B: ParallelBackend>(&self, tp: &Comm, init: &ParamInit, device: &B::Device) -> Result<TransformerBlock<B>, ConfigError> {
        let ln = || {
            ParallelLayerNormConfig::new(self.d_model)
                .with_epsilon(self.layer_norm_eps)
                .with_sequence_parallel(self.sequence_parallel)
                .with_norm(self.norm)
                .init(tp, device)
        };
        let region = if self.sequence_parallel { DropoutRegion::Sharded } else { DropoutRegion::Replicated };
        let drop = |name: &str| ParallelDropout::new(self.dropout, init.seed, &init.child(name).path, region, tp.rank());
        Ok(TransformerBlock {
            ln1: ln(),
            attn: ParallelAttentionConfig::new(self.d_model, self.n_heads)
                .with_dropout(self.dropout)
                .with_init_std(self.init_std)
                .with_proj_init_std(self.proj_init_std)
                .with_kernel(self.attention)
                .with_bias(self.bias)
                .with_rope(self.rope)
                .with_kv_heads(self.kv_heads)
                .init(tp, &init.child("attn"), device)?,
            ln2: ln(),
            mlp: ParallelMlpConfig::new(self.d_model, self.d_ff)
                .with_init_std(self.init_std)
                .with_proj_init_std(self.proj_init_std)
                .with_activation(self.activation)
                .with_bias(self.bias)
                .init(tp, &init.child("mlp"), device)?,
            drop_attn: drop("drop_attn"),
            drop_mlp: drop("drop_mlp"),
            sequence_parallel: self.sequence_parallel,
        })
    }
}

impl<B: ParallelBackend> TransformerBlock<B> {
    /// The block's first part for selective recompute: `x →` layer norm → TP entry → this
    /// rank's fused q/k/v projection, `[b, s, (H + 2G)·d/t]` (`3h/t` without grouped-query
    /// attention).
    pub fn attn_in(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.attn.project_qkv(self.attn.enter(self.ln1.forward(x), self.sequence_parallel))
    }

    /// The attention core of a fused q/k/v projection (no parameters; its dropout stream is
    /// the attention's): context `[b, s, h/t]`.
    pub fn attn_core(&self, qkv: Tensor<B, 3>) -> Tensor<B, 3> {
        self.attn.core_qkv(qkv)
    }

    /// The rest of the block from its input `x` and the attention context: output projection,
    /// dropout and residual, then the MLP half.
    pub fn attn_out_and_mlp(&self, x: Tensor<B, 3>, context: Tensor<B, 3>) -> Tensor<B, 3> {
        let x = x + self.drop_attn.forward(self.attn.project(context, self.sequence_parallel));
        let mlp = if self.sequence_parallel { self.mlp.forward_sp(self.ln2.forward(x.clone())) } else { self.mlp.forward(self.ln2.forward(x.clone())) };
        x + self.drop_mlp.forward(mlp)
    }

    /// `[b, s, h]` → `[b, s, h]`, replicated over the TP group; with sequence parallelism
    /// `[b, s/t, h]` → `[b, s/t, h]` shards.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        if self.sequence_parallel {
            let x = x.clone() + self.drop_attn.forward(self.attn.forward_sp(self.ln1.forward(x)));
            return x.clone() + self.drop_mlp.forward(self.mlp.forward_sp(self.ln2.forward(x)));
        }
        let x = x.clone() + self.drop_attn.forward(self.attn.forward(self.ln1.forward(x)));
        x.clone() + self.drop_mlp.forward(self.mlp.forward(self.ln2.forward(x)))
    }
}

impl<B: ParallelBackend> RandomStreams for TransformerBlock<B> {
    fn random_streams(&self) -> Vec<StreamCounter> {
        [self.attn.random_streams(), self.drop_attn.random_streams(), self.drop_mlp.random_streams()].concat()
    }
}
