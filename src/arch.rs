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
//!   angle `pos · θ^(−2i/d)`, `θ` = `rope_theta`, 10000 by default; [`Rope`]), with Llama
//!   3.1's long-context [`RopeScaling`] of the frequencies optionally.

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

/// Rotary embedding settings: the base `θ` and Llama 3.1's frequency scaling, if any.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Rope {
    /// The base: pair `i` of a `d`-wide head turns by `θ^(−2i/d)` per position.
    pub theta: f64,
    /// Long-context scaling of the frequencies (`None`: plain RoPE).
    pub scaling: Option<RopeScaling>,
}

impl Rope {
    /// Plain RoPE with base `theta`.
    pub fn new(theta: f64) -> Self {
        Self { theta, scaling: None }
    }

    /// The `d/2` inverse frequencies `θ^(−2i/d)` in f64, scaled where `scaling` says.
    pub fn inv_freq(&self, d: usize) -> Vec<f64> {
        let plain = (0..d / 2).map(|i| self.theta.powf(-2.0 * i as f64 / d as f64));
        plain.map(|f| self.scaling.map_or(f, |s| s.scale(f))).collect()
    }
}

/// Llama 3.1's RoPE scaling (HuggingFace `rope_type: "llama3"`; Meta's `apply_scaling`,
/// torchtitan's `scaled_rope`), for a frequency `f` of wavelength `λ = 2π/f`, with the
/// pretraining context `L` = `original_max_position_embeddings`:
/// - `λ < L/high_freq_factor` (fast pairs, short-range): `f` unchanged;
/// - `λ > L/low_freq_factor` (slow pairs): `f / factor`;
/// - between: `(1 − α)·f/factor + α·f` with `α = (L/λ − low) / (high − low)`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    /// How much longer the new context is (Llama 3.1: 8; Llama 3.2: 32).
    pub factor: f64,
    /// Frequencies of wavelength above `L/low_freq_factor` are divided by `factor` (Llama 3.1: 1).
    pub low_freq_factor: f64,
    /// Frequencies of wavelength below `L/high_freq_factor` are kept (Llama 3.1: 4).
    pub high_freq_factor: f64,
    /// The pretraining context `L` (Llama 3.1: 8192).
    pub original_max_position_embeddings: usize,
}

/// Scaling parameters that define no frequencies: what was given and what is needed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid RoPE scaling {got}: {need}")]
pub struct InvalidRopeScaling {
    /// The parameters (or the text) given.
    pub got: String,
    /// What they must satisfy.
    pub need: &'static str,
}

impl RopeScaling {
    /// Llama 3.1's (and 3.3's): factor 8, low 1, high 4, original context 8192.
    pub const LLAMA3_1: RopeScaling = RopeScaling { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 8192 };

    /// `f` scaled (see the type's formula).
    pub fn scale(&self, f: f64) -> f64 {
        let wavelen = 2.0 * std::f64::consts::PI / f;
        let context = self.original_max_position_embeddings as f64;
        if wavelen < context / self.high_freq_factor {
            f
        } else if wavelen > context / self.low_freq_factor {
            f / self.factor
        } else {
            let alpha = (context / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor);
            (1.0 - alpha) * f / self.factor + alpha * f
        }
    }

    /// Factor ≥ 1, `0 < low < high`, a context > 0, all finite.
    pub fn validate(&self) -> Result<(), InvalidRopeScaling> {
        let finite = [self.factor, self.low_freq_factor, self.high_freq_factor].iter().all(|v| v.is_finite());
        let ok = finite && self.factor >= 1.0 && self.low_freq_factor > 0.0 && self.high_freq_factor > self.low_freq_factor;
        if !ok || self.original_max_position_embeddings == 0 {
            return Err(InvalidRopeScaling { got: self.to_string(), need: "factor ≥ 1, 0 < low_freq_factor < high_freq_factor, original context > 0" });
        }
        Ok(())
    }
}

/// `llama3:factor,low,high,original` (the flag's form).
impl std::fmt::Display for RopeScaling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "llama3:{},{},{},{}", self.factor, self.low_freq_factor, self.high_freq_factor, self.original_max_position_embeddings)
    }
}

/// `llama3` (Llama 3.1's [`RopeScaling::LLAMA3_1`]) or `llama3:factor,low,high,original`
/// (Llama 3.2: `llama3:32,1,4,8192`), validated.
impl std::str::FromStr for RopeScaling {
    type Err = InvalidRopeScaling;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || InvalidRopeScaling { got: format!("{s:?}"), need: "write llama3 or llama3:FACTOR,LOW,HIGH,ORIGINAL_CONTEXT" };
        let scaling = match s.split_once(':') {
            None if s == "llama3" => Self::LLAMA3_1,
            Some(("llama3", rest)) => {
                let v: Vec<&str> = rest.split(',').map(str::trim).collect();
                let [factor, low, high, context] = v[..] else { return Err(bad()) };
                let num = |t: &str| t.parse::<f64>().map_err(|_| bad());
                Self {
                    factor: num(factor)?,
                    low_freq_factor: num(low)?,
                    high_freq_factor: num(high)?,
                    original_max_position_embeddings: context.parse().map_err(|_| bad())?,
                }
            }
            _ => return Err(bad()),
        };
        scaling.validate()?;
        Ok(scaling)
    }
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

    /// Llama 3.1's rule by hand at d = 128, θ = 500000 (Meta's `apply_scaling`): the fast pairs
    /// unchanged, the slow ones divided by 8, the middle ones interpolated (strictly between).
    #[test]
    fn llama3_scaling_keeps_fast_pairs_divides_slow_ones_and_blends_between() {
        let (d, theta) = (128, 500000.0f64);
        let plain = Rope::new(theta).inv_freq(d);
        let scaled = Rope { theta, scaling: Some(RopeScaling::LLAMA3_1) }.inv_freq(d);
        let (mut kept, mut divided, mut blended) = (0, 0, 0);
        for (i, (&f, &g)) in plain.iter().zip(&scaled).enumerate() {
            assert_eq!(f, theta.powf(-2.0 * i as f64 / d as f64));
            let wavelen = 2.0 * std::f64::consts::PI / f;
            if wavelen < 8192.0 / 4.0 {
                assert_eq!(g, f, "pair {i}");
                kept += 1;
            } else if wavelen > 8192.0 {
                assert_eq!(g, f / 8.0, "pair {i}");
                divided += 1;
            } else {
                let alpha = (8192.0 / wavelen - 1.0) / 3.0;
                assert!((g - ((1.0 - alpha) * f / 8.0 + alpha * f)).abs() <= 1e-15 * f);
                assert!(f / 8.0 < g && g < f, "pair {i}: {g} not between {} and {f}", f / 8.0);
                blended += 1;
            }
        }
        assert!(kept > 0 && divided > 0 && blended > 0, "{kept} {divided} {blended}");
    }

    #[test]
    fn rope_scaling_flags_parse_print_and_refuse() {
        assert_eq!("llama3".parse::<RopeScaling>(), Ok(RopeScaling::LLAMA3_1));
        let s: RopeScaling = "llama3:32,1,4,8192".parse().unwrap();
        assert_eq!((s.factor, s.original_max_position_embeddings), (32.0, 8192));
        assert_eq!(s.to_string().parse::<RopeScaling>(), Ok(s));
        assert_eq!(
            "yarn".parse::<RopeScaling>().unwrap_err().to_string(),
            "invalid RoPE scaling \"yarn\": write llama3 or llama3:FACTOR,LOW,HIGH,ORIGINAL_CONTEXT"
        );
        assert!("llama3:8,1,4".parse::<RopeScaling>().is_err());
        let e = "llama3:8,4,1,8192".parse::<RopeScaling>().unwrap_err().to_string();
        assert!(e.contains("llama3:8,4,1,8192") && e.contains("low_freq_factor < high_freq_factor"), "{e}");
        assert!("llama3:0.5,1,4,8192".parse::<RopeScaling>().is_err());
    }
}
