//! Architecture choices of the GPT family beyond GPT-2: the normalisation and the position
//! encoding (with [`Activation::SwiGlu`](crate::activation::Activation) and linears without
//! biases, a Llama-style block: `--norm rms-norm --position rope --activation swiglu
//! --no-bias`).
//!
//! - [`Norm::LayerNorm`]: `(x − μ)·r·γ + β`; [`Norm::RmsNorm`]: `x·r·γ` with `r = 1/√(mean(x²) +
//!   ε)`, no `β` (Llama, Megatron's `--normalization RMSNorm`). Both replicated over TP, their
//!   `γ` gradients summed over the TP group under sequence parallelism; both one autodiff op
//!   keeping `x` and the f32 statistics ([`crate::kernels::rms_norm`]).
//! - Grouped-query attention (`kv_heads`): fewer key/value heads than query heads, each shared
//!   by `heads / kv_heads` query heads (Llama 2 70B, Llama 3; `kv_heads` divisible by TP).
//! - [`Position::Learned`]: a `[max_seq_len, h]` table added to the token embedding (GPT-2);
//!   [`Position::Rope`]: rotary position embedding on each head's query and key (no parameters;
//!   Megatron's and HuggingFace's rotate-half convention: the pairs are `(x_i, x_{i+d/2})`,
//!   angle `pos · θ^(−2i/d)`, `θ` = `rope_theta`, 10000 by default).

use serde::{Deserialize, Serialize};

/// The blocks' (and the final) normalisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum Norm {
    /// Layer norm with `γ` and `β` (GPT-2).
    #[default]
    LayerNorm,
    /// Root-mean-square norm with `γ` only (Llama).
    RmsNorm,
}

/// Where positions enter the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum Position {
    /// A learned position embedding `wpe` added to the token embedding (GPT-2).
    #[default]
    Learned,
    /// Rotary position embedding of queries and keys, no `wpe` (Llama).
    Rope,
}

/// An architecture name that does not exist: what was asked and the choices.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} {got:?} (choose {choices})")]
pub struct UnknownChoice {
    /// What was being named (`norm`, `position`).
    pub what: &'static str,
    /// The name given.
    pub got: String,
    /// The names that exist.
    pub choices: &'static str,
}

impl std::str::FromStr for Norm {
    type Err = UnknownChoice;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "layer-norm" => Ok(Self::LayerNorm),
            "rms-norm" => Ok(Self::RmsNorm),
            other => Err(UnknownChoice { what: "norm", got: other.into(), choices: "layer-norm or rms-norm" }),
        }
    }
}

impl std::fmt::Display for Norm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::LayerNorm => "layer-norm",
            Self::RmsNorm => "rms-norm",
        })
    }
}

impl std::str::FromStr for Position {
    type Err = UnknownChoice;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "learned" => Ok(Self::Learned),
            "rope" => Ok(Self::Rope),
            other => Err(UnknownChoice { what: "position", got: other.into(), choices: "learned or rope" }),
        }
    }
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Learned => "learned",
            Self::Rope => "rope",
        })
    }
}

/// The architecture choices the memory model needs (the activation is `GptShape`'s own field).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Arch {
    /// The normalisation.
    pub norm: Norm,
    /// The position encoding.
    pub position: Position,
    /// Linears without biases (attention and MLP; Llama).
    pub no_bias: bool,
    /// Key/value heads of grouped-query attention (`None`: one per query head).
    pub kv_heads: Option<usize>,
}

impl Arch {
    /// GPT-2's: layer norms, learned positions, biases (the default).
    pub const GPT2: Arch = Arch { norm: Norm::LayerNorm, position: Position::Learned, no_bias: false, kv_heads: None };
    /// Llama's: RMS norms, rotary positions, no biases (with `Activation::SwiGlu`; its
    /// grouped-query attention: set `kv_heads`).
    pub const LLAMA: Arch = Arch { norm: Norm::RmsNorm, position: Position::Rope, no_bias: true, kv_heads: None };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_say_the_choices() {
        for n in [Norm::LayerNorm, Norm::RmsNorm] {
            assert_eq!(n.to_string().parse::<Norm>(), Ok(n));
        }
        for p in [Position::Learned, Position::Rope] {
            assert_eq!(p.to_string().parse::<Position>(), Ok(p));
        }
        assert_eq!("alibi".parse::<Position>().unwrap_err().to_string(), "unknown position \"alibi\" (choose learned or rope)");
        assert_eq!("batch-norm".parse::<Norm>().unwrap_err().to_string(), "unknown norm \"batch-norm\" (choose layer-norm or rms-norm)");
    }
}
