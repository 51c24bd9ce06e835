//! Tensor-parallel MLP: `GeLU(x A) B` with `A` column-parallel and `B` row-parallel (GeLU exact,
//! or GPT-2's tanh approximation: [`Activation`]).
//!
//! Forward: f on the input (backward all-reduce), `[.., h] → [.., ffn/t]` locally, GeLU (local,
//! no communication between the two GEMMs), `[.., ffn/t] → [.., h]` partial sums, **one**
//! all-reduce (g), then the bias of `B`. Per rank: `A_r: [h, ffn/t]`, `B_r: [ffn/t, h]`.

use burn::config::Config;
use burn::module::Module;
use burn::tensor::Tensor;
use burn_parallel::activation::Activation;
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
}

/// `GeLU(x A + a) B + b`, split over the TP group.
#[derive(Module, Debug)]
pub struct ParallelMlp<B: ParallelBackend> {
    /// Column-parallel `h → ffn`.
    pub fc1: ColumnLinear<B>,
    /// Row-parallel `ffn → h`.
    pub fc2: RowLinear<B>,
    /// The activation between them.
    #[module(skip)]
    pub activation: Activation,
}

impl ParallelMlpConfig {
    /// Builds this rank's shard.
    pub fn init<B: ParallelBackend>(&self, tp: &Comm, init: &ParamInit, device: &B::Device) -> Result<ParallelMlp<B>, ConfigError> {
        Ok(ParallelMlp {
            fc1: ColumnLinearConfig::new(self.d_model, self.d_ff).with_init_std(self.init_std).init(tp, &init.child("fc1"), device)?,
            fc2: RowLinearConfig::new(self.d_ff, self.d_model).with_init_std(self.proj_init_std).init(tp, &init.child("fc2"), device)?,
            activation: self.activation,
        })
    }
}

impl<B: ParallelBackend> ParallelMlp<B> {
    /// `[b, s, h]` replicated → `[b, s, h]` replicated.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.fc2.forward(self.activation.forward(self.fc1.forward(x)))
    }

    /// Sequence parallel: `[b, s/t, h]` shard → all-gather → … → reduce-scatter → `[b, s/t, h]`.
    pub fn forward_sp(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.fc2.forward_sp(self.activation.forward(self.fc1.forward_sp(x)))
    }
}
