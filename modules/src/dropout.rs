//! Dropout with Megatron's RNG rules for tensor parallelism.
//!
//! Masks come from the host generator ([`burn_parallel::rng::HostRng`]) keyed by
//! `(seed, layer name, call number)` — plus the TP rank for [`DropoutRegion::Sharded`] layers:
//! - **replicated** regions (embedding output, residual branches after g): every TP rank draws
//!   the same mask, so the replicated activations stay identical across the group;
//! - **sharded** regions (attention probabilities of this rank's heads): each rank draws its own.
//!
//! Active only when the backend tracks gradients (training), outside an evaluation scope
//! (`burn_parallel::pipeline::EvaluationScope`: pipelined evaluation) and with `prob > 0`. Calls are counted per
//! layer, so ranks running the same program draw the same sequence of masks.

use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorCreationOptions, TensorData};
use burn_parallel::rng::{HostRng, RandomStreams, StreamCounter};

/// Whether a dropout sits in a replicated or a TP-sharded region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropoutRegion {
    /// Same mask on every TP rank.
    Replicated,
    /// Own mask per TP rank.
    Sharded,
}

/// Dropout drawing reproducible masks per the TP rules above.
#[derive(Module, Debug, Clone)]
pub struct ParallelDropout {
    /// Drop probability.
    pub prob: f64,
    /// Mask stream name (seed, layer path, and the TP rank for sharded regions).
    pub stream: String,
    /// Run seed.
    pub seed: u64,
    #[module(skip)]
    calls: StreamCounter,
}

impl ParallelDropout {
    /// A dropout named `name` (its module path) in `region`; `tp_rank` matters for sharded ones.
    pub fn new(prob: f64, seed: u64, name: &str, region: DropoutRegion, tp_rank: usize) -> Self {
        let stream = match region {
            DropoutRegion::Replicated => format!("dropout:{name}"),
            DropoutRegion::Sharded => format!("dropout:{name}:tp{tp_rank}"),
        };
        let calls = StreamCounter::new(stream.clone());
        Self { prob, stream, seed, calls }
    }

    /// Applies inverted dropout (scale kept elements by `1/(1-p)`).
    pub fn forward<B: Backend, const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let device = x.device();
        if self.prob <= 0.0 || !B::ad_enabled(&device) || burn_parallel::pipeline::evaluating() {
            return x;
        }
        let call = self.calls.next();
        let shape = x.dims();
        let n = shape.iter().product();
        let mask = HostRng::new(self.seed, &format!("{}#{call}", self.stream)).dropout_mask(n, self.prob);
        // The mask in x's dtype (Burn 0.21 does not promote: an f32 mask on bf16 x is wrong).
        let options = TensorCreationOptions::new(device).with_dtype(x.dtype());
        x * Tensor::<B, D>::from_data(TensorData::new(mask, shape), options)
    }
}

impl RandomStreams for ParallelDropout {
    /// The mask stream (its count: masks drawn so far).
    fn random_streams(&self) -> Vec<StreamCounter> {
        vec![self.calls.clone()]
    }
}
