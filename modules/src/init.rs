//! Deterministic, shard-consistent parameter initialisation.
//!
//! Every parameter is generated **in full** on the host from `(seed, path)` and each rank keeps its
//! slice, so a tp=k model's shards are exactly the slices of the tp=1 model: changing `tp` does not
//! change the run.

use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use burn_parallel::comm::split_along;
use burn_parallel::rng::HostRng;
use burn_parallel::{Comm, ConfigError};

/// Where a parameter's random stream comes from: the run seed and the parameter's path.
#[derive(Debug, Clone)]
pub struct ParamInit {
    /// Run seed.
    pub seed: u64,
    /// Module path, e.g. `blocks.0.attn.qkv`.
    pub path: String,
}

impl ParamInit {
    /// The root of a model seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self { seed, path: String::new() }
    }

    /// The init of a submodule or parameter called `name`.
    pub fn child(&self, name: impl std::fmt::Display) -> Self {
        let path = if self.path.is_empty() { name.to_string() } else { format!("{}.{name}", self.path) };
        Self { seed: self.seed, path }
    }

    /// The full (unsharded) tensor `N(0, std²)` of this path.
    pub fn normal(&self, shape: &[usize], std: f64) -> TensorData {
        let n = shape.iter().product();
        TensorData::new(HostRng::new(self.seed, &self.path).normal_vec(n, std), shape.to_vec())
    }
}

/// This rank's slice along `dim` of a full tensor (the whole tensor for a group of one).
pub fn shard(full: TensorData, dim: usize, comm: &Comm) -> TensorData {
    if comm.size() == 1 {
        return full;
    }
    split_along(&full, dim, comm.size(), comm.rank()).expect("divisibility is validated by the config")
}

/// A trainable parameter from host data.
pub fn param<B: Backend, const D: usize>(data: TensorData, device: &B::Device) -> Param<Tensor<B, D>> {
    Param::from_tensor(Tensor::from_data(data, device))
}

/// Checks `value % comm.size() == 0`.
pub fn check_divisible(what: &'static str, value: usize, comm: &Comm) -> Result<usize, ConfigError> {
    let t = comm.size();
    if !value.is_multiple_of(t) {
        return Err(ConfigError::NotDivisible { what, value, degree_name: "tensor_parallel", degree: t });
    }
    Ok(value / t)
}

/// `x·W + b` over the last dimension, with `x` flattened to rows `[n, d_in]` first. Burn 0.21's
/// `linear` on a 3-D `x` computes the weight gradient as a batched matmul `[b, d_in, d_out]`
/// summed over `b`: a transient of `b` weight copies in every backward (8 × 9.4 MB for a GPT-2
/// MLP weight at b = 8). On rows it is one `[d_in, d_out]` matmul.
pub fn linear_rows<B: Backend, const D: usize>(x: Tensor<B, D>, weight: Tensor<B, 2>, bias: Option<Tensor<B, 1>>) -> Tensor<B, D> {
    if D <= 2 {
        return burn::tensor::module::linear(x, weight, bias);
    }
    let dims = x.dims();
    let d_out = weight.dims()[1];
    let rows = dims[..D - 1].iter().product::<usize>();
    let y = burn::tensor::module::linear(x.reshape([rows, dims[D - 1]]), weight, bias);
    let mut out = dims;
    out[D - 1] = d_out;
    y.reshape(out)
}
