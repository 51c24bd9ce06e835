//! Row-parallel linear layer (Megatron `RowParallelLinear`).
//!
//! `y = x A + b` with `A: [d_in, d_out]` split on its **input** dim: rank r holds
//! `A_r = A[r·d_in/t .. (r+1)·d_in/t, :]`. Forward: the input is `x_r` (`[.., d_in/t]`, already
//! parallel, e.g. a column-parallel output) — or, without `input_is_parallel`, a replicated `x`
//! scattered to its slice (backward all-gather); partial sums `x_r A_r` are reduced by g
//! (**all-reduce forward**, identity backward), and the replicated bias `b` is added **once, after
//! the reduction**. Output `[.., d_out]`, replicated. With t = 1 it equals `burn::nn::Linear`.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::tensor::{Tensor, TensorData};
use burn_parallel::mappings::{copy_to_tp, reduce_from_tp, reduce_scatter_to_sp, scatter_to_tp};
use burn_parallel::{Comm, ConfigError, ParallelBackend};

use crate::init::{check_divisible, param, shard, ParamInit};

/// Configuration of a [`RowLinear`].
#[derive(Config, Debug)]
pub struct RowLinearConfig {
    /// Input features over all ranks (must be divisible by the TP size).
    pub d_input: usize,
    /// Output features (replicated).
    pub d_output: usize,
    /// Learnable bias (replicated, added after the reduction).
    #[config(default = true)]
    pub bias: bool,
    /// The input is already split over the group (`[.., d_input/t]`).
    #[config(default = true)]
    pub input_is_parallel: bool,
    /// Standard deviation of the normal weight init (bias starts at zero).
    #[config(default = 0.02)]
    pub init_std: f64,
}

/// Linear layer whose weight is split by input rows over the TP group.
#[derive(Module, Debug)]
pub struct RowLinear<B: ParallelBackend> {
    /// Local weight `[d_input/t, d_output]`.
    pub weight: Param<Tensor<B, 2>>,
    /// Replicated bias `[d_output]`.
    pub bias: Option<Param<Tensor<B, 1>>>,
    /// Whether the input arrives split.
    pub input_is_parallel: bool,
    /// The TP group.
    #[module(skip)]
    pub tp: Comm,
}

impl RowLinearConfig {
    /// Builds this rank's shard; `init` names the parameter stream.
    pub fn init<B: ParallelBackend>(&self, tp: &Comm, init: &ParamInit, device: &B::Device) -> Result<RowLinear<B>, ConfigError> {
        check_divisible("row-parallel input features", self.d_input, tp)?;
        let w = init.child("weight").normal(&[self.d_input, self.d_output], self.init_std);
        let weight = param(shard(w, 0, tp), device);
        let bias = self.bias.then(|| param(TensorData::zeros::<f32, _>([self.d_output]), device));
        Ok(RowLinear { weight, bias, input_is_parallel: self.input_is_parallel, tp: tp.clone() })
    }
}

impl<B: ParallelBackend> RowLinear<B> {
    /// `[.., d_input/t]` (or replicated `[.., d_input]`) → `[.., d_output]` replicated.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let partial = self.forward_partial(x);
        self.add_bias(reduce_from_tp(partial, &self.tp))
    }

    /// The local partial product `x_r A_r` before any reduction (sequence parallelism reduces it
    /// with a reduce-scatter instead); add the bias with [`add_bias`](Self::add_bias) afterwards.
    pub fn forward_partial<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let x = if self.input_is_parallel { x } else { scatter_to_tp(x, &self.tp) };
        crate::init::linear_rows(x, self.weight.val(), None)
    }

    /// Sequence-parallel output: partial sums are reduce-scattered along the sequence (dim 1) to
    /// this rank's shard `[b, s/t, d_output]` (backward: all-gather); the bias then meets only
    /// this rank's tokens, so it enters through f and its gradient is summed over the TP group.
    pub fn forward_sp(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let y = reduce_scatter_to_sp(self.forward_partial(x), 1, &self.tp);
        match &self.bias {
            Some(b) => y + copy_to_tp(b.val(), &self.tp).unsqueeze(),
            None => y,
        }
    }

    /// Adds the replicated bias (once, after the reduction).
    pub fn add_bias<const D: usize>(&self, y: Tensor<B, D>) -> Tensor<B, D> {
        match &self.bias {
            Some(b) => y + b.val().unsqueeze(),
            None => y,
        }
    }
}
