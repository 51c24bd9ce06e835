//! Column-parallel linear layer (Megatron `ColumnParallelLinear`).
//!
//! `y = x A + b` with `A: [d_in, d_out]` split on its **output** dim: rank r holds
//! `A_r = A[:, r·d_out/t .. (r+1)·d_out/t]` and `b_r`. Forward: `x` (replicated, `[.., d_in]`)
//! enters through f (identity forward, **all-reduce backward**), giving `y_r = x A_r + b_r`
//! (`[.., d_out/t]`); with `gather_output`, `y = all-gather(y_r)` (`[.., d_out]`, backward keeps
//! the own slice). With t = 1 it equals `burn::nn::Linear` with the same weights.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::tensor::Tensor;
use burn_parallel::mappings::{copy_to_tp, gather_from_sp, gather_from_tp};
use burn_parallel::{Comm, ConfigError, ParallelBackend};

use crate::init::{check_divisible, param, shard, ParamInit};

/// Configuration of a [`ColumnLinear`].
#[derive(Config, Debug)]
pub struct ColumnLinearConfig {
    /// Input features (replicated).
    pub d_input: usize,
    /// Output features over all ranks (must be divisible by the TP size).
    pub d_output: usize,
    /// Learnable bias.
    #[config(default = true)]
    pub bias: bool,
    /// All-gather the output to `[.., d_output]` (else each rank keeps `[.., d_output/t]`).
    #[config(default = false)]
    pub gather_output: bool,
    /// Standard deviation of the normal weight init (bias starts at zero).
    #[config(default = 0.02)]
    pub init_std: f64,
}

/// Linear layer whose weight is split by output columns over the TP group.
#[derive(Module, Debug)]
pub struct ColumnLinear<B: ParallelBackend> {
    /// Local weight `[d_input, d_output/t]`.
    pub weight: Param<Tensor<B, 2>>,
    /// Local bias `[d_output/t]`.
    pub bias: Option<Param<Tensor<B, 1>>>,
    /// Gather the output over the group.
    pub gather_output: bool,
    /// The TP group.
    #[module(skip)]
    pub tp: Comm,
}

impl ColumnLinearConfig {
    /// This rank's shard of the whole weight `weight` (`[d_in, d_out]`; zero bias), e.g. a
    /// fused projection whose columns the caller has arranged.
    pub fn init_from<B: ParallelBackend>(&self, tp: &Comm, weight: burn::tensor::TensorData, device: &B::Device) -> Result<ColumnLinear<B>, ConfigError> {
        let local = check_divisible("column-parallel output features", self.d_output, tp)?;
        assert_eq!(weight.shape.as_slice(), [self.d_input, self.d_output], "ColumnLinearConfig::init_from: weight shape");
        let bias = self.bias.then(|| param(burn::tensor::TensorData::zeros::<f32, _>([local]), device));
        Ok(ColumnLinear { weight: param(shard(weight, 1, tp), device), bias, gather_output: self.gather_output, tp: tp.clone() })
    }

    /// Builds this rank's shard; `init` names the parameter stream.
    pub fn init<B: ParallelBackend>(&self, tp: &Comm, init: &ParamInit, device: &B::Device) -> Result<ColumnLinear<B>, ConfigError> {
        let local = check_divisible("column-parallel output features", self.d_output, tp)?;
        let w = init.child("weight").normal(&[self.d_input, self.d_output], self.init_std);
        let weight = param(shard(w, 1, tp), device);
        let bias = self.bias.then(|| param(burn::tensor::TensorData::zeros::<f32, _>([local]), device));
        Ok(ColumnLinear { weight, bias, gather_output: self.gather_output, tp: tp.clone() })
    }
}

impl<B: ParallelBackend> ColumnLinear<B> {
    /// `[.., d_input]` (replicated) → `[.., d_output/t]`, or `[.., d_output]` with `gather_output`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let x = copy_to_tp(x, &self.tp);
        self.forward_parallel_input(x)
    }

    /// Sequence-parallel input: `x` is this rank's sequence shard `[b, s/t, d_input]` (seq dim
    /// 1), all-gathered to `[b, s, d_input]` (backward: reduce-scatter) before the product.
    pub fn forward_sp(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.forward_parallel_input(gather_from_sp(x, 1, &self.tp))
    }

    /// The same without the f mapping: for inputs that already went through one (e.g. the
    /// sequence-parallel all-gather).
    pub fn forward_parallel_input<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let y = crate::init::linear_rows(x, self.weight.val(), self.bias.as_ref().map(|b| b.val()));
        if self.gather_output {
            gather_from_tp(y, &self.tp)
        } else {
            y
        }
    }
}
