//! Mixed precision: what runs in which dtype.
//!
//! Burn 0.21 has no autocast and no dtype promotion (an op on two dtypes is wrong in release
//! builds), so every cast is explicit. With [`Precision::Bf16`], as Megatron's bf16 recipe:
//! - parameters are stored and used in bf16 (matmuls, activations, attention, the
//!   communication of activations), cast once after the f32 initialisation ([`cast_params`]);
//! - the optimizer keeps the f32 master weights and AdamW moments, and gradients are accumulated
//!   and reduced in f32 ([`crate::optim::DistAdamW`]);
//! - layer norm computes its statistics in f32 (the kernels, and the composed path for half
//!   types); softmax and the cross-entropy's log-sum-exp run in f32 ([`to_f32`], [`like`]).

use burn::module::{AutodiffModule, Module, ModuleMapper, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Tensor};

/// The compute precision of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize)]
pub enum Precision {
    /// Everything in f32.
    #[default]
    F32,
    /// bf16 parameters and activations, f32 master weights, optimizer state and reductions.
    Bf16,
}

/// A precision name that does not exist, or a dtype the backend cannot run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrecisionError {
    /// Unknown name.
    #[error("unknown precision {0:?} (choose f32 or bf16)")]
    Unknown(String),
    /// The backend lacks the dtype.
    #[error("precision {precision}: the {backend} backend cannot compute in {dtype:?} on this device (use --precision f32)")]
    Unsupported {
        /// The precision asked for.
        precision: &'static str,
        /// The backend's name.
        backend: String,
        /// The missing dtype.
        dtype: DType,
    },
}

impl std::str::FromStr for Precision {
    type Err = PrecisionError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "f32" | "fp32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            other => Err(PrecisionError::Unknown(other.to_string())),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Precision {
    /// `f32` or `bf16`.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
        }
    }

    /// The dtype of parameters and activations.
    pub fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::Bf16 => DType::BF16,
        }
    }

    /// Checks that backend `B` computes in this precision on `device`.
    pub fn check<B: Backend>(self, device: &B::Device) -> Result<(), PrecisionError> {
        let dtype = self.dtype();
        if B::supports_dtype(device, dtype) {
            return Ok(());
        }
        Err(PrecisionError::Unsupported { precision: self.name(), backend: B::name(device), dtype })
    }
}

/// `x` in `dtype` (no op, and no autodiff node, when it already is).
pub fn cast_to<B: Backend, const D: usize>(x: Tensor<B, D>, dtype: DType) -> Tensor<B, D> {
    if x.dtype() == dtype {
        x
    } else {
        x.cast(dtype)
    }
}

/// `x` in f32 (for softmax, log-sum-exp, statistics).
pub fn to_f32<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    cast_to(x, DType::F32)
}

/// `x` in the dtype of `like`.
pub fn like<B: Backend, const D: usize, const E: usize>(x: Tensor<B, D>, like: &Tensor<B, E>) -> Tensor<B, D> {
    cast_to(x, like.dtype())
}

struct CastParams(DType);

impl<B: Backend> ModuleMapper<B> for CastParams {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let dtype = self.0;
        let require_grad = param.is_require_grad();
        param.map(|t| {
            let t = cast_to(t, dtype).detach();
            if require_grad {
                t.require_grad()
            } else {
                t
            }
        })
    }
}

/// `grads` of `module` with every half-precision gradient cast to f32 (for accumulation over
/// micro-batches in f32, as Megatron's main grads).
pub fn grads_to_f32<B: AutodiffBackend, M: AutodiffModule<B>>(module: &M, mut grads: GradientsParams) -> GradientsParams {
    struct Up<'a>(&'a mut GradientsParams);
    impl<B: AutodiffBackend> ModuleVisitor<B> for Up<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let Some(g) = self.0.remove::<B::InnerBackend, D>(param.id) {
                self.0.register::<B::InnerBackend, D>(param.id, to_f32(g));
            }
        }
    }
    module.visit(&mut Up(&mut grads));
    grads
}

/// `module` with every float parameter in `dtype` (ids and `require_grad` kept).
pub fn cast_params<B: Backend, M: Module<B>>(module: M, dtype: DType) -> M {
    module.map(&mut CastParams(dtype))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_support() {
        assert_eq!("bf16".parse::<Precision>(), Ok(Precision::Bf16));
        assert_eq!("fp8".parse::<Precision>().unwrap_err().to_string(), "unknown precision \"fp8\" (choose f32 or bf16)");
        Precision::Bf16.check::<burn::backend::Flex>(&Default::default()).unwrap();
        let e = PrecisionError::Unsupported { precision: "bf16", backend: "wgpu".into(), dtype: DType::BF16 };
        assert!(e.to_string().contains("cannot compute in BF16"));
    }
}
