//! The MLP's activation: GeLU as Burn computes it (`x·Φ(x)`, with erf) or GPT-2's tanh
//! approximation (`0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`, HuggingFace's `gelu_new`,
//! Megatron's `--openai-gelu`), which pretrained GPT-2 weights expect.
//!
//! [`Activation::SwiGlu`] (Llama, Megatron's `--swiglu`) is gated: the MLP gets a second
//! column-parallel projection `gate` and computes `silu(x·G) ⊙ (x·A)` before its row-parallel
//! output; [`Activation::forward`] is the element-wise part, `silu`, applied to the gate.
//!
//! The approximation is composed of Burn's ops (Burn 0.21 has no fused kernel for it): under
//! autodiff it keeps two `[.., ffn/t]` tensors more per block than `Gelu` (the `tanh` output and
//! `1 + tanh`; `burn_parallel::memory` counts them).

use burn::tensor::activation::{gelu, gelu_approximate, silu};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

/// The activation between the MLP's two projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize)]
pub enum Activation {
    /// `x·Φ(x)` (erf): Burn's `gelu`.
    #[default]
    Gelu,
    /// GPT-2's tanh approximation (HuggingFace `gelu_new`): Burn's `gelu_approximate`.
    GeluTanh,
    /// Gated: `silu(x·G) ⊙ (x·A)` (the MLP holds the gate `G`); `forward` is `silu`.
    SwiGlu,
}

impl Activation {
    /// The activation of `x`, element-wise.
    pub fn forward<B: Backend, const D: usize>(self, x: Tensor<B, D>) -> Tensor<B, D> {
        match self {
            Self::Gelu => gelu(x),
            Self::GeluTanh => gelu_approximate(x),
            Self::SwiGlu => silu(x),
        }
    }

    /// Whether the MLP is gated (holds a `gate` projection).
    pub fn gated(self) -> bool {
        self == Self::SwiGlu
    }

    /// Its name in HuggingFace's configs (`GPT2Config::activation_function`, Llama's
    /// `hidden_act`).
    pub fn hf_name(self) -> &'static str {
        match self {
            Self::Gelu => "gelu",
            Self::GeluTanh => "gelu_new",
            Self::SwiGlu => "silu",
        }
    }
}

/// An activation name that does not exist.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown activation {0:?} (choose gelu, gelu-tanh or swiglu)")]
pub struct UnknownActivation(pub String);

impl std::str::FromStr for Activation {
    type Err = UnknownActivation;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "gelu" => Ok(Self::Gelu),
            "gelu-tanh" => Ok(Self::GeluTanh),
            "swiglu" => Ok(Self::SwiGlu),
            other => Err(UnknownActivation(other.to_string())),
        }
    }
}

impl std::fmt::Display for Activation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Gelu => "gelu",
            Self::GeluTanh => "gelu-tanh",
            Self::SwiGlu => "swiglu",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    #[test]
    fn names_and_values() {
        for a in [Activation::Gelu, Activation::GeluTanh, Activation::SwiGlu] {
            assert_eq!(a.to_string().parse::<Activation>(), Ok(a));
        }
        assert!("relu".parse::<Activation>().unwrap_err().to_string().contains("choose gelu, gelu-tanh or swiglu"));
        let x = Tensor::<Flex, 1>::from_floats([-2.0, -0.5, 0.0, 1.0, 3.0], &Default::default());
        let exact: Vec<f32> = Activation::Gelu.forward(x.clone()).into_data().to_vec().unwrap();
        let tanh: Vec<f32> = Activation::GeluTanh.forward(x).into_data().to_vec().unwrap();
        // GPT-2's formula by hand, and its distance from the erf GeLU (below 1e-3, not 0).
        for (v, (e, t)) in [-2.0f32, -0.5, 0.0, 1.0, 3.0].iter().zip(exact.iter().zip(&tanh)) {
            let by_hand = 0.5 * v * (1.0 + ((2.0 / std::f32::consts::PI).sqrt() * (v + 0.044715 * v * v * v)).tanh());
            assert!((t - by_hand).abs() < 1e-6, "{v}: {t} vs {by_hand}");
            assert!((e - t).abs() < 1e-3, "{v}: {e} vs {t}");
        }
        assert!((exact[0] - tanh[0]).abs() > 1e-5, "the two differ");
    }
}
