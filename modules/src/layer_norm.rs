//! Layer norm usable inside and outside sequence-parallel regions.
//!
//! `y = (x − mean) / √(var + ε) · γ + β` over the last dim, computed by the backend's
//! [`LayerNormBackend`](burn_parallel::LayerNormBackend): fused CubeCL kernels (forward and
//! backward) on Cube backends, composed Burn ops on CPU. Outside SP, `x` is the full replicated
//! `[b, s, h]` and every TP rank sees the full gradient of `γ, β`. Inside SP, `x` is this rank's
//! sequence shard `[b, s/t, h]`, so `γ, β` only see that rank's tokens: they enter the op through
//! f (`copy_to_tp`: identity forward, **all-reduce backward**), which sums their gradients over the
//! TP group during the backward itself (Megatron-LM#1446) — nothing to remember after backward.
//!
//! With [`Norm::RmsNorm`] it is Llama's RMS norm, `x / √(mean(x²) + ε) · γ` (no `β`), through
//! [`rms_norm`]; the same SP rule.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::tensor::{Tensor, TensorData};
use burn_parallel::arch::Norm;
use burn_parallel::kernels::{layer_norm, rms_norm};
use burn_parallel::mappings::copy_to_tp;
use burn_parallel::{Comm, ParallelBackend};

use crate::init::param;

/// Configuration of a [`ParallelLayerNorm`].
#[derive(Config, Debug)]
pub struct ParallelLayerNormConfig {
    /// Normalised width.
    pub d_model: usize,
    /// ε.
    #[config(default = 1e-5)]
    pub epsilon: f64,
    /// Whether inputs are sequence shards (γ, β gradients summed over the TP group).
    #[config(default = false)]
    pub sequence_parallel: bool,
    /// Layer norm, or RMS norm (no `β`).
    #[config(default = "burn_parallel::arch::Norm::LayerNorm")]
    pub norm: Norm,
}

/// Layer norm with replicated `γ, β` (see the module docs for the SP rule).
#[derive(Module, Debug)]
pub struct ParallelLayerNorm<B: ParallelBackend> {
    /// Scale `[h]` (starts at 1).
    pub gamma: Param<Tensor<B, 1>>,
    /// Shift `[h]` (starts at 0); none in an RMS norm.
    pub beta: Option<Param<Tensor<B, 1>>>,
    /// ε.
    pub epsilon: f64,
    /// Inputs are sequence shards.
    pub sequence_parallel: bool,
    /// The TP group.
    #[module(skip)]
    pub tp: Comm,
    /// Layer norm or RMS norm.
    #[module(skip)]
    pub norm: Norm,
}

impl ParallelLayerNormConfig {
    /// Builds the (replicated) layer norm.
    pub fn init<B: ParallelBackend>(&self, tp: &Comm, device: &B::Device) -> ParallelLayerNorm<B> {
        ParallelLayerNorm {
            gamma: param(TensorData::ones::<f32, _>([self.d_model]), device),
            beta: (self.norm == Norm::LayerNorm).then(|| param(TensorData::zeros::<f32, _>([self.d_model]), device)),
            epsilon: self.epsilon,
            sequence_parallel: self.sequence_parallel,
            tp: tp.clone(),
            norm: self.norm,
        }
    }
}

impl<B: ParallelBackend> ParallelLayerNorm<B> {
    /// Normalises the last dim of `x` (`[b, s, h]`, or `[b, s/t, h]` under SP).
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let rep = |p: Tensor<B, 1>| if self.sequence_parallel { copy_to_tp(p, &self.tp) } else { p };
        let gamma = rep(self.gamma.val());
        if self.norm == Norm::RmsNorm {
            return rms_norm(x, gamma, self.epsilon as f32);
        }
        let beta = match &self.beta {
            Some(b) => rep(b.val()),
            None => Tensor::zeros(gamma.dims(), (&gamma.device(), gamma.dtype())),
        };
        layer_norm(x, gamma, beta, self.epsilon as f32)
    }
}
