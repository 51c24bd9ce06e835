//! Llama 3's tokenizer from its `tokenizer.model` (the file Meta ships, and HuggingFace's hub
//! repositories under `original/`): tiktoken's format, one `base64(token bytes) rank` line per
//! token, ranks `0..n` (n = 128000). The BPE is `tiktoken-rs`'s `CoreBPE` with Meta's split
//! pattern (the same as tiktoken's `cl100k_base`) and Meta's 256 special tokens after the ranks
//! (`<|begin_of_text|>` = n, `<|end_of_text|>` = n + 1, `<|start_header_id|>`, … and
//! `<|reserved_special_token_K|>`): vocabulary n + 256. Text is encoded as ordinary text
//! (special tokens' names are not special), as GPT-2's tokenizer here does.

use std::path::{Path, PathBuf};

use base64::Engine;
use tiktoken_rs::CoreBPE;

use super::tokenizer::TokenizerError;

/// Meta's split pattern for Llama 3 (`llama/tokenizer.py`'s `pat_str`).
pub const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Special tokens after the ranks.
pub const SPECIAL_TOKENS: usize = 256;

/// Llama 3's named special tokens, in order from the first id after the ranks (Meta's
/// `tokenizer.py`, Llama 3.1); the rest are `<|reserved_special_token_K|>`, K from 2.
const NAMED: [&str; 11] = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
];

/// A loaded Llama 3 BPE (see the module docs).
pub struct Llama3Bpe {
    path: PathBuf,
    base: usize,
    bpe: CoreBPE,
}

impl std::fmt::Debug for Llama3Bpe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Llama3Bpe").field("path", &self.path).field("ranks", &self.base).finish()
    }
}

impl PartialEq for Llama3Bpe {
    fn eq(&self, other: &Self) -> bool {
        self.path == other.path && self.base == other.base
    }
}

impl Eq for Llama3Bpe {}

impl std::hash::Hash for Llama3Bpe {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        (&self.path, self.base).hash(h);
    }
}

impl Llama3Bpe {
    /// The tokenizer of the file at `path`, read once per process (later calls for the same
    /// file, however its path is written, get the same one).
    pub fn load(path: &Path) -> Result<&'static Self, TokenizerError> {
        static LOADED: std::sync::Mutex<Vec<&'static Llama3Bpe>> = std::sync::Mutex::new(Vec::new());
        // One tokenizer per file, however the path is spelled.
        let canonical =
            std::fs::canonicalize(path).map_err(|e| TokenizerError::File { path: path.display().to_string(), why: format!("cannot read it: {e}") })?;
        let mut loaded = LOADED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(bpe) = loaded.iter().find(|b| b.path == canonical) {
            return Ok(bpe);
        }
        let bpe: &'static Self = Box::leak(Box::new(Self::read(&canonical)?));
        loaded.push(bpe);
        Ok(bpe)
    }

    fn read(path: &Path) -> Result<Self, TokenizerError> {
        let fail = |why: String| TokenizerError::File { path: path.display().to_string(), why };
        let text = std::fs::read_to_string(path).map_err(|e| fail(format!("cannot read it: {e}")))?;
        let ranks = parse_ranks(&text).map_err(fail)?;
        let base = ranks.len();
        let specials = (0..SPECIAL_TOKENS).map(|i| (special_name(i), (base + i) as u32)).collect();
        let bpe = CoreBPE::new(ranks, specials, LLAMA3_PATTERN).map_err(|e| fail(e.to_string()))?;
        Ok(Self { path: path.to_path_buf(), base, bpe })
    }

    /// The file it was read from (its canonical path).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Ranks and special tokens.
    pub fn vocab_size(&self) -> usize {
        self.base + SPECIAL_TOKENS
    }

    /// `<|begin_of_text|>`'s id (the first after the ranks).
    pub fn begin_of_text(&self) -> u32 {
        self.base as u32
    }

    pub(super) fn bpe(&self) -> &CoreBPE {
        &self.bpe
    }
}

/// Writes `cl100k_base`'s ranks (shipped in tiktoken-rs; its split pattern is Llama 3's) as a
/// tiktoken file at `path`: a stand-in for Llama 3's `tokenizer.model` (100256 ranks instead of
/// 128000) in tests and examples, which cannot download Meta's.
#[doc(hidden)]
pub fn write_cl100k_tiktoken(path: &Path) -> Result<(), TokenizerError> {
    let fail = |why: String| TokenizerError::File { path: path.display().to_string(), why };
    let cl100k = tiktoken_rs::cl100k_base().map_err(|e| fail(e.to_string()))?;
    let mut lines = String::new();
    for rank in 0..100256u32 {
        let bytes: Vec<u8> = cl100k._decode_native_and_split(vec![rank]).flatten().collect();
        lines += &format!("{} {rank}\n", base64::engine::general_purpose::STANDARD.encode(bytes));
    }
    std::fs::write(path, lines).map_err(|e| fail(format!("cannot write it: {e}")))
}

/// The name of special token `i` (0: `<|begin_of_text|>`).
fn special_name(i: usize) -> String {
    NAMED.get(i).map_or_else(|| format!("<|reserved_special_token_{}|>", i - NAMED.len() + 2), |n| n.to_string())
}

/// The ranks of a tiktoken file: each line `base64 rank`, the ranks exactly `0..n` for `n`
/// lines (any order), each token once; errors name the line.
fn parse_ranks(text: &str) -> Result<rustc_hash::FxHashMap<Vec<u8>, u32>, String> {
    let mut ranks = rustc_hash::FxHashMap::default();
    let lines = text.lines().filter(|l| !l.trim().is_empty()).count();
    let mut seen = vec![false; lines];
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let bad = |why: &str| format!("line {}: {why} (a tiktoken file has one `base64 rank` per line)", i + 1);
        let mut parts = line.split_whitespace();
        let (Some(token), Some(rank), None) = (parts.next(), parts.next(), parts.next()) else { return Err(bad("not two fields")) };
        let token = base64::engine::general_purpose::STANDARD.decode(token).map_err(|e| bad(&format!("not base64: {e}")))?;
        let rank: u32 = rank.parse().map_err(|_| bad(&format!("rank {rank:?} is not a number")))?;
        if rank as usize >= lines {
            return Err(bad(&format!("rank {rank} is beyond the file's {lines} tokens")));
        }
        if std::mem::replace(&mut seen[rank as usize], true) || ranks.insert(token, rank).is_some() {
            return Err(bad(&format!("rank {rank} or its token appears twice")));
        }
    }
    if ranks.is_empty() {
        return Err("no tokens".into());
    }
    // Byte-level BPE needs every single byte as a token (tiktoken-rs panics on one missing).
    if let Some(b) = (0..=255u8).find(|b| !ranks.contains_key(&vec![*b])) {
        return Err(format!("the single byte {b:#04x} has no rank (a byte-level BPE ranks all 256 bytes)"));
    }
    Ok(ranks)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cl100k_file(dir: &Path) -> PathBuf {
        std::fs::create_dir_all(dir).unwrap();
        let path = dir.join("tokenizer.model");
        write_cl100k_tiktoken(&path).unwrap();
        path
    }

    /// Loaded from a file of `cl100k_base`'s ranks, the tokenizer encodes exactly as tiktoken-rs's
    /// `cl100k_base` (same ranks, same pattern), puts the 256 special tokens after the ranks,
    /// decodes back, and is loaded once.
    #[test]
    fn a_tiktoken_file_encodes_as_tiktoken_does() {
        let dir = std::env::temp_dir().join(format!("burn-parallel-llama3-bpe-{}", std::process::id()));
        let path = cl100k_file(&dir);
        let t: super::super::Tokenizer = format!("llama3:{}", path.display()).parse().unwrap();
        let text = "Hello world, O Romeo! 12345 numbers\n\n  spaced\tTABS don't I'LL résumé 東京 🎉 <|begin_of_text|>";
        let reference = tiktoken_rs::cl100k_base().unwrap().encode_ordinary(text);
        assert_eq!(t.encode(text).unwrap(), reference);
        assert!(reference.len() > 20 && reference.iter().any(|&r| r > 50000), "{reference:?}");
        assert_eq!((t.vocab_size(), t.document_start()), (100256 + 256, Some(100256)));
        assert_eq!(t.decode(&t.encode(text).unwrap()).unwrap(), text);
        assert_eq!(t.decode(&[100256, 100257, 100265]).unwrap(), "<|begin_of_text|><|end_of_text|><|eot_id|>");
        assert!(t.decode(&[100512]).unwrap_err().to_string().contains("outside the vocabulary of 100512"));
        let super::super::Tokenizer::Llama3(bpe) = t else { panic!("a Llama 3 tokenizer") };
        assert!(std::ptr::eq(bpe, Llama3Bpe::load(&path).unwrap()), "loaded once");
        let saved = serde_json::to_value(t).unwrap();
        assert_eq!(saved, serde_json::json!(format!("llama3:{}", path.display())));
        assert_eq!(serde_json::from_value::<super::super::Tokenizer>(saved).unwrap(), t);
        let e = "llama3:/nonexistent/tokenizer.model".parse::<super::super::Tokenizer>().unwrap_err().to_string();
        assert!(e.starts_with("llama3 tokenizer /nonexistent/tokenizer.model: cannot read it"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn special_tokens_follow_metas_list() {
        assert_eq!(special_name(0), "<|begin_of_text|>");
        assert_eq!(special_name(9), "<|eot_id|>");
        assert_eq!(special_name(11), "<|reserved_special_token_2|>");
        assert_eq!(special_name(255), "<|reserved_special_token_246|>");
    }

    #[test]
    fn bad_files_name_the_line() {
        let bytes: String = (0..=255u8).map(|b| format!("{} {b}\n", base64::engine::general_purpose::STANDARD.encode([b]))).collect();
        assert_eq!(parse_ranks(&format!("{bytes}YWI= 256\n")).unwrap().len(), 257);
        let e = parse_ranks("YQ== 0\nYg== 1\n").unwrap_err();
        assert_eq!(e, "the single byte 0x00 has no rank (a byte-level BPE ranks all 256 bytes)");
        assert!(parse_ranks("YQ== 0\nYg==\n").unwrap_err().starts_with("line 2: not two fields"));
        assert!(parse_ranks("YQ== 0\n!!! 1\n").unwrap_err().starts_with("line 2: not base64"));
        assert!(parse_ranks("YQ== 0\nYg== x\n").unwrap_err().contains("rank \"x\" is not a number"));
        assert!(parse_ranks("YQ== 0\nYg== 0\n").unwrap_err().contains("rank 0 or its token appears twice"));
        assert!(parse_ranks("YQ== 0\nYQ== 1\n").unwrap_err().contains("rank 1 or its token appears twice"));
        assert!(parse_ranks("YQ== 0\nYg== 2\n").unwrap_err().contains("rank 2 is beyond the file's 2 tokens"));
        assert_eq!(parse_ranks("\n").unwrap_err(), "no tokens");
    }
}
