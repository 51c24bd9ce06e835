//! Tensor-parallel MLP: `GeLU(x A) B` with `A` column-parallel and `B` row-parallel (GeLU exact,
//! or GPT-2's tanh approximation: [`Activation`]).
//!
//! Forward: f on the input (backward all-reduce), `[.., h] → [.., ffn/t]` locally, GeLU (local,
//! no communication between the two GEMMs), `[.., ffn/t] → [.., h]` partial sums, **one**
//! all-reduce (g), then the bias of `B`. Per rank: `A_r: [h, ffn/t]`, `B_r: [ffn/t, h]`.
//!
//! SwiGLU ([`Activation::SwiGlu`], Llama): a second column-parallel projection `G` (the gate,
//! `G_r: [h, ffn/t]`, stream `mlp.gate`) and `silu(x G) ⊙ (x A)` between the GEMMs; `x` enters
//! through one f (or one SP all-gather) shared by `G` and `A`, so the backward still
//! all-reduces once. `bias = false` drops every bias (Llama).

use burn::config::Config;
use burn::module::Module;
use burn::tensor::Tensor;
use burn_parallel::activation::Activation;
use burn_parallel::mappings::{copy_to_tp, gather_from_sp};
use burn_parallel::{Comm, ConfigError, ParallelBackend};

use crate::column_linear::{ColumnLinear, ColumnLinearConfig};
use crate::init::ParamInit;
use crate::row_linear::{RowLinear, RowLinearConfig};

/// Configuration of a [`ParallelMlp`].
#[derive(Config, Debug)]
pub struct ParallelMlpConfig {
    /// Model width.
    pub d_model: usize,
    /// Inner width over all ranks.
    pub d_ff: usize,
    /// Init standard deviation of the first layer.
    #[config(default = 0.02)]
    pub init_std: f64,
    /// Init standard deviation of the output projection.
    #[config(default = 0.02)]
    pub proj_init_std: f64,
    /// The activation between the projections.
    #[config(default = "burn_parallel::activation::Activation::Gelu")]
    pub activation: Activation,
    /// Biases on the projections.
    #[config(default = true)]
    pub bias: bool,
}

/// `GeLU(x A + a) B + b`, split over the TP group.
#[derive(Module, Debug)]
pub struct ParallelMlp<B: ParallelBackend> {
    /// Column-parallel `h → ffn`.
    pub fc1: ColumnLinear<B>,
    /// Row-parallel `ffn → h`.
    pub fc2: RowLinear<B>,
    /// Column-parallel gate `h → ffn` (SwiGLU only).
    pub gate: Option<ColumnLinear<B>>,
    /// The activation between them.
    #[module(skip)]
    pub activation: Activation,
}

impl ParallelMlpConfig {
    /// Builds this rank's shard.
    pub fn init<B: ParallelBackend>(&self, tp: &Comm, init: &ParamInit, device: &B::Device) -> Result<ParallelMlp<B>, ConfigError> {
        let column = ColumnLinearConfig::new(self.d_model, self.d_ff).with_init_std(self.init_std).with_bias(self.bias);
        Ok(ParallelMlp {
            fc1: column.init(tp, &init.child("fc1"), device)?,
            fc2: RowLinearConfig::new(self.d_ff, self.d_model).with_init_std(self.proj_init_std).with_bias(self.bias).init(tp, &init.child("fc2"), device)?,
            gate: self.activation.gated().then(|| column.init(tp, &init.child("gate"), device)).transpose()?,
            activation: self.activation,
        })
    }
}

impl<B: ParallelBackend> ParallelMlp<B> {
    /// `[b, s, h]` replicated → `[b, s, h]` replicated.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.fc2.forward(self.inner(copy_to_tp(x, &self.fc1.tp)))
    }

    /// Sequence parallel: `[b, s/t, h]` shard → all-gather → … → reduce-scatter → `[b, s/t, h]`.
    pub fn forward_sp(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.fc2.forward_sp(self.inner(gather_from_sp(x, 1, &self.fc1.tp)))
    }

    /// `[.., h]` after the TP entry → the activation `[.., ffn/t]` (gated with SwiGLU).
    fn inner(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let up = self.fc1.forward_parallel_input(x.clone());
        match &self.gate {
            Some(gate) => self.activation.forward(gate.forward_parallel_input(x)) * up,
            None => self.activation.forward(up),
        }
    }
}
