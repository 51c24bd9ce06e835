//! Tokenizers: bytes, or GPT-2's BPE (tiktoken's `r50k_base` ranks, shipped inside the
//! `tiktoken-rs` crate: nothing is downloaded).

use std::str::FromStr;

/// A tokenizer by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize)]
pub enum Tokenizer {
    /// Every byte is a token (vocabulary 256).
    #[default]
    Byte,
    /// GPT-2's byte-level BPE (vocabulary 50257, `<|endoftext|>` = 50256).
    Gpt2,
}

/// A tokenizer name that does not exist, or a text it cannot encode or decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenizerError {
    /// Unknown name.
    #[error("unknown tokenizer {0:?} (choose byte or gpt2)")]
    Unknown(String),
    /// The BPE could not be built or could not decode.
    #[error("gpt2 tokenizer: {0}")]
    Bpe(String),
}

impl FromStr for Tokenizer {
    type Err = TokenizerError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "byte" => Ok(Self::Byte),
            "gpt2" => Ok(Self::Gpt2),
            other => Err(TokenizerError::Unknown(other.into())),
        }
    }
}

impl std::fmt::Display for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Byte => "byte",
            Self::Gpt2 => "gpt2",
        })
    }
}

/// GPT-2's end-of-text token.
pub const GPT2_EOT: u32 = 50256;

impl Tokenizer {
    /// Tokens of the vocabulary (before padding).
    pub fn vocab_size(self) -> usize {
        match self {
            Self::Byte => 256,
            Self::Gpt2 => 50257,
        }
    }

    /// The token ids of `text` (GPT-2: special tokens are ordinary text).
    pub fn encode(self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        match self {
            Self::Byte => Ok(text.bytes().map(u32::from).collect()),
            Self::Gpt2 => Ok(bpe()?.encode_ordinary(text)),
        }
    }

    /// The tokens of `bytes`: the byte tokenizer takes them as they are (any bytes), GPT-2's
    /// BPE their UTF-8 text (invalid sequences replaced by U+FFFD).
    pub fn encode_bytes(self, bytes: &[u8]) -> Result<Vec<u32>, TokenizerError> {
        match self {
            Self::Byte => Ok(bytes.iter().map(|&b| u32::from(b)).collect()),
            Self::Gpt2 => self.encode(&String::from_utf8_lossy(bytes)),
        }
    }

    /// The text of `tokens` (lossy where the BPE's bytes are not UTF-8).
    pub fn decode(self, tokens: &[u32]) -> Result<String, TokenizerError> {
        match self {
            Self::Byte => Ok(String::from_utf8_lossy(&tokens.iter().map(|&t| t as u8).collect::<Vec<_>>()).into_owned()),
            Self::Gpt2 => {
                if let Some(t) = tokens.iter().find(|&&t| t as usize >= self.vocab_size()) {
                    return Err(TokenizerError::Bpe(format!("token {t} is outside GPT-2's vocabulary of {}", self.vocab_size())));
                }
                let bytes = bpe()?._decode_native_and_split(tokens.to_vec()).flatten().collect::<Vec<u8>>();
                Ok(String::from_utf8_lossy(&bytes).into_owned())
            }
        }
    }
}

fn bpe() -> Result<&'static tiktoken_rs::CoreBPE, TokenizerError> {
    static BPE: std::sync::OnceLock<Result<tiktoken_rs::CoreBPE, String>> = std::sync::OnceLock::new();
    BPE.get_or_init(|| tiktoken_rs::r50k_base().map_err(|e| e.to_string())).as_ref().map_err(|e| TokenizerError::Bpe(e.clone()))
}

/// `vocab` rounded up to a multiple of `128 × tp` (Megatron's make-vocab-size-divisible-by):
/// each TP rank's share of the head is a multiple of 128.
pub fn padded_vocab(vocab: usize, tp: usize) -> usize {
    let m = 128 * tp.max(1);
    vocab.div_ceil(m) * m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_bpe_round_trips_and_pads() {
        let t = Tokenizer::Gpt2;
        let ids = t.encode("Hello world, O Romeo!").unwrap();
        assert_eq!(&ids[..2], &[15496, 995], "GPT-2's ids of 'Hello' and ' world'");
        assert_eq!(t.decode(&ids).unwrap(), "Hello world, O Romeo!");
        assert_eq!(Tokenizer::Byte.encode("ab").unwrap(), [97, 98]);
        assert_eq!(padded_vocab(50257, 1), 50304);
        assert_eq!(padded_vocab(50257, 4), 50688);
        assert_eq!(padded_vocab(256, 2), 256);
        assert_eq!("bpe".parse::<Tokenizer>().unwrap_err().to_string(), "unknown tokenizer \"bpe\" (choose byte or gpt2)");
    }
}
