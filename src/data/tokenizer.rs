//! Tokenizers: bytes, GPT-2's BPE (tiktoken's `r50k_base` ranks, shipped inside the
//! `tiktoken-rs` crate: nothing is downloaded), or Llama 3's BPE read from its `tokenizer.model`
//! ([`Llama3Bpe`]).

use std::str::FromStr;

pub use super::llama3::Llama3Bpe;

/// A tokenizer by name (`byte`, `gpt2`, `llama3:PATH`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Tokenizer {
    /// Every byte is a token (vocabulary 256).
    #[default]
    Byte,
    /// GPT-2's byte-level BPE (vocabulary 50257, `<|endoftext|>` = 50256).
    Gpt2,
    /// Llama 3's BPE from a `tokenizer.model` (vocabulary 128256: 128000 ranks and 256 special
    /// tokens, `<|begin_of_text|>` = 128000), loaded once per process.
    Llama3(&'static Llama3Bpe),
}

/// A tokenizer name that does not exist, or a text it cannot encode or decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenizerError {
    /// Unknown name.
    #[error("unknown tokenizer {0:?} (choose byte, gpt2 or llama3:PATH to Llama 3's tokenizer.model)")]
    Unknown(String),
    /// A Llama 3 tokenizer file that cannot be read or is not one.
    #[error("llama3 tokenizer {path}: {why}")]
    File {
        /// The file.
        path: String,
        /// What is wrong (with the line number where one is at fault).
        why: String,
    },
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
            other => match other.strip_prefix("llama3:") {
                Some(path) => Ok(Self::Llama3(Llama3Bpe::load(std::path::Path::new(path))?)),
                None => Err(TokenizerError::Unknown(other.into())),
            },
        }
    }
}

impl std::fmt::Display for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Byte => f.write_str("byte"),
            Self::Gpt2 => f.write_str("gpt2"),
            Self::Llama3(bpe) => write!(f, "llama3:{}", bpe.path().display()),
        }
    }
}

/// As saved before Llama 3 (`"Byte"`, `"Gpt2"`), and `"llama3:PATH"`.
impl serde::Serialize for Tokenizer {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Byte => s.serialize_str("Byte"),
            Self::Gpt2 => s.serialize_str("Gpt2"),
            Self::Llama3(_) => s.serialize_str(&self.to_string()),
        }
    }
}

/// Either spelling (`"Gpt2"` or `"gpt2"`); `"llama3:PATH"` loads the file.
impl<'de> serde::Deserialize<'de> for Tokenizer {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        match name.as_str() {
            "Byte" => Ok(Self::Byte),
            "Gpt2" => Ok(Self::Gpt2),
            other => other.parse().map_err(serde::de::Error::custom),
        }
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
            Self::Llama3(bpe) => bpe.vocab_size(),
        }
    }

    /// The token that starts each document of a prepared corpus: GPT-2's `<|endoftext|>` (as
    /// nanoGPT puts it), Llama 3's `<|begin_of_text|>`; none for bytes.
    pub fn document_start(self) -> Option<u32> {
        match self {
            Self::Byte => None,
            Self::Gpt2 => Some(GPT2_EOT),
            Self::Llama3(bpe) => Some(bpe.begin_of_text()),
        }
    }

    /// The token that ends each document of a prepared corpus: Llama 3's `<|end_of_text|>`
    /// (torchtitan encodes documents with both ends; generation stops there); none for GPT-2
    /// (its `<|endoftext|>` starts the next) and bytes.
    pub fn document_end(self) -> Option<u32> {
        match self {
            Self::Llama3(bpe) => Some(bpe.begin_of_text() + 1),
            _ => None,
        }
    }

    /// The token ids of `text` (special tokens are ordinary text).
    pub fn encode(self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        match self {
            Self::Byte => Ok(text.bytes().map(u32::from).collect()),
            Self::Gpt2 => Ok(bpe()?.encode_ordinary(text)),
            Self::Llama3(bpe) => Ok(bpe.bpe().encode_ordinary(text)),
        }
    }

    /// The tokens of `bytes`: the byte tokenizer takes them as they are (any bytes), the BPEs
    /// their UTF-8 text (invalid sequences replaced by U+FFFD).
    pub fn encode_bytes(self, bytes: &[u8]) -> Result<Vec<u32>, TokenizerError> {
        match self {
            Self::Byte => Ok(bytes.iter().map(|&b| u32::from(b)).collect()),
            _ => self.encode(&String::from_utf8_lossy(bytes)),
        }
    }

    /// The text of `tokens` (lossy where the BPE's bytes are not UTF-8; special tokens by name).
    pub fn decode(self, tokens: &[u32]) -> Result<String, TokenizerError> {
        let core = match self {
            Self::Byte => return Ok(String::from_utf8_lossy(&tokens.iter().map(|&t| t as u8).collect::<Vec<_>>()).into_owned()),
            Self::Gpt2 => bpe()?,
            Self::Llama3(bpe) => bpe.bpe(),
        };
        if let Some(t) = tokens.iter().find(|&&t| t as usize >= self.vocab_size()) {
            return Err(TokenizerError::Bpe(format!("token {t} is outside the vocabulary of {} ({self})", self.vocab_size())));
        }
        let bytes = core._decode_native_and_split(tokens.to_vec()).flatten().collect::<Vec<u8>>();
        Ok(String::from_utf8_lossy(&bytes).into_owned())
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
        assert_eq!(
            "bpe".parse::<Tokenizer>().unwrap_err().to_string(),
            "unknown tokenizer \"bpe\" (choose byte, gpt2 or llama3:PATH to Llama 3's tokenizer.model)"
        );
        for t in [Tokenizer::Byte, Tokenizer::Gpt2] {
            let saved = serde_json::to_value(t).unwrap();
            assert_eq!(serde_json::from_value::<Tokenizer>(saved).unwrap(), t);
            assert_eq!(t.to_string().parse::<Tokenizer>().unwrap(), t);
        }
        assert_eq!(serde_json::to_value(Tokenizer::Gpt2).unwrap(), serde_json::json!("Gpt2"), "as saved before Llama 3");
    }
}
