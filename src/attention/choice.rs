//! Which attention core a layer runs: [`AttentionKernel`] (the user's choice, `--attention`),
//! resolved per backend, head width and dropout into an [`AttentionCore`].

use super::AttentionBackend;

/// Query rows per chunk of `chunked` without a number.
pub const DEFAULT_CHUNK_ROWS: usize = 256;

/// Which attention the GPT's layers run (resolved per backend into an [`AttentionCore`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize)]
pub enum AttentionKernel {
    /// The fused kernels where the backend has them and attention dropout is off, else composed.
    #[default]
    Auto,
    /// Composed Burn ops (the `s × s` scores kept for the backward).
    Composed,
    /// The fused kernels; a backend without them, or attention dropout > 0, is an error.
    Fused,
    /// Burn ops on this many query rows at a time
    /// ([`causal_attention_chunked`](super::causal_attention_chunked)): any backend, no `s × s`
    /// tensor kept; attention dropout > 0 is an error.
    Chunked(usize),
}

/// What a layer's attention core runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum AttentionCore {
    /// Masked softmax of Burn ops, with dropout; keeps the `s × s` tensors.
    #[default]
    Composed,
    /// The backend's fused kernels ([`causal_attention`](super::causal_attention)).
    Fused,
    /// [`causal_attention_chunked`](super::causal_attention_chunked) with this many query rows
    /// per chunk.
    Chunked(usize),
}

impl AttentionCore {
    /// Keeps `o` and the f32 `lse` instead of the `s × s` tensors (fused or chunked).
    pub fn keeps_lse_only(self) -> bool {
        self != Self::Composed
    }
}

impl From<AttentionCore> for AttentionKernel {
    /// The kernel choice that resolves to `core` (where the backend allows it).
    fn from(core: AttentionCore) -> Self {
        match core {
            AttentionCore::Composed => Self::Composed,
            AttentionCore::Fused => Self::Fused,
            AttentionCore::Chunked(rows) => Self::Chunked(rows),
        }
    }
}

/// An attention kernel name that does not exist.
#[derive(Debug, thiserror::Error)]
#[error("unknown attention kernel {0:?} (choose auto, composed, fused, chunked or chunked:ROWS with ROWS > 0)")]
pub struct UnknownAttentionKernel(pub String);

impl std::str::FromStr for AttentionKernel {
    type Err = UnknownAttentionKernel;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "composed" => Ok(Self::Composed),
            "fused" | "flash" => Ok(Self::Fused),
            "chunked" => Ok(Self::Chunked(DEFAULT_CHUNK_ROWS)),
            other => match other.strip_prefix("chunked:").map(str::parse::<usize>) {
                Some(Ok(rows)) if rows > 0 => Ok(Self::Chunked(rows)),
                _ => Err(UnknownAttentionKernel(other.to_string())),
            },
        }
    }
}

impl std::fmt::Display for AttentionKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Composed => f.write_str("composed"),
            Self::Fused => f.write_str("fused"),
            Self::Chunked(rows) => write!(f, "chunked:{rows}"),
        }
    }
}

impl AttentionKernel {
    /// The core that layers with heads of width `d_head` and attention dropout `dropout` run on
    /// `device`; `Err` (the reason, with the numbers) for `Fused` or `Chunked` where they cannot.
    pub fn resolve<B: AttentionBackend>(self, device: &B::Device, d_head: usize, dropout: f64) -> Result<AttentionCore, String> {
        self.resolve_with(|| B::fused_attention(device, d_head), dropout)
    }

    /// [`resolve`](Self::resolve) with the backend's answer to "are there fused kernels for
    /// this head width" given by `fused` (`Ok` or why not): for plans made without a backend.
    pub fn resolve_with(self, fused: impl FnOnce() -> Result<(), String>, dropout: f64) -> Result<AttentionCore, String> {
        let no_dropout = |what: &str| format!("{what} attention has no dropout: attention dropout is {dropout} (use 0, or the composed attention)");
        match self {
            Self::Composed => Ok(AttentionCore::Composed),
            Self::Auto if dropout != 0.0 => Ok(AttentionCore::Composed),
            Self::Auto => Ok(if fused().is_ok() { AttentionCore::Fused } else { AttentionCore::Composed }),
            Self::Fused if dropout != 0.0 => Err(no_dropout("fused")),
            Self::Fused => fused().map(|()| AttentionCore::Fused),
            Self::Chunked(_) if dropout != 0.0 => Err(no_dropout("chunked")),
            Self::Chunked(0) => Err("chunked attention needs at least one query row per chunk".into()),
            Self::Chunked(rows) => Ok(AttentionCore::Chunked(rows)),
        }
    }
}
