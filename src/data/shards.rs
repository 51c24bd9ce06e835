//! Token shards: binary files of `u16` (or `u32`) tokens, memory-mapped, read by global sample
//! index.
//!
//! Format (llm.c's, so its prepared FineWeb/TinyStories shards load as they are): a header of 256
//! little-endian `i32` — `[0]` magic 20240520, `[1]` version 1, `[2]` the token count, and ours
//! `[3]` the tokenizer's vocabulary (0 in llm.c's files: not checked) — then the tokens as
//! little-endian `u16`. A file's size must be `1024 + 2 · count`. Vocabularies past 65536
//! (Llama 3's 128256) take llm.c's Llama 3 format: magic 20240801, version 7, `u32` tokens,
//! `1024 + 4 · count` bytes (the same header otherwise). A set of shards
//! (`train_000000.bin`, `train_000001.bin`, …, or llm.c's `fineweb_train_000001.bin`,
//! `tiny_shakespeare_val.bin`) is read as one stream of tokens; a window may span two files.
//! Every token of a file is checked against the vocabulary once, when a window first reads
//! from that file (one pass at memory speed; a dataset of many files is not scanned up front).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

/// `header[0]` of a shard of u16 tokens (llm.c's GPT-2 shards).
pub const SHARD_MAGIC: i32 = 20240520;
/// `header[1]` of a shard of u16 tokens.
pub const SHARD_VERSION: i32 = 1;
/// `header[0]` of a shard of u32 tokens (llm.c's Llama 3 shards).
pub const SHARD_MAGIC_U32: i32 = 20240801;
/// `header[1]` of a shard of u32 tokens.
pub const SHARD_VERSION_U32: i32 = 7;
/// Bytes before the tokens.
pub const HEADER_BYTES: usize = 256 * 4;

/// A shard that cannot be written or read, naming the file and the numbers.
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    /// A file operation failed.
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        /// What was attempted.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// Not a token shard.
    #[error("{}: not a token shard (magic {magic}, expected {SHARD_MAGIC} or {SHARD_MAGIC_U32}; {bytes} bytes)", path.display())]
    Foreign {
        /// The file.
        path: PathBuf,
        /// Its first `i32` (or -1 when shorter than a header).
        magic: i64,
        /// Its size.
        bytes: u64,
    },
    /// Another shard version.
    #[error("{}: shard version {found} (this build reads {SHARD_VERSION}: u16 tokens, magic {SHARD_MAGIC}; {SHARD_VERSION_U32}: u32 tokens, magic {SHARD_MAGIC_U32})", path.display())]
    Version {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: i32,
    },
    /// The header's token count does not match the file's size.
    #[error("{}: the header says {count} tokens ({expected} bytes) but the file has {bytes} bytes (truncated?)", path.display())]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Tokens in the header.
        count: i64,
        /// The size the header implies.
        expected: u64,
        /// The actual size.
        bytes: u64,
    },
    /// A token outside the vocabulary.
    #[error("{}: token {token} at position {position} is outside the vocabulary of {vocab} (another tokenizer's shard?)", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Index of the token in the file.
        position: usize,
        /// The token.
        token: u32,
        /// The vocabulary.
        vocab: usize,
    },
    /// A shard written for another vocabulary (header word 3).
    #[error("{}: written by a tokenizer of vocabulary {found}, read as one of {expected} (another tokenizer's shard)", path.display())]
    Vocabulary {
        /// The file.
        path: PathBuf,
        /// The header's vocabulary.
        found: usize,
        /// The reader's.
        expected: usize,
    },
    /// No shard, or too few tokens.
    #[error("{0}")]
    Invalid(String),
}

/// Writes `tokens` (each `< vocab`) as one shard at `path` (fsynced), `vocab` in the header:
/// u16 tokens (magic 20240520, version 1) where `vocab ≤ 65536`, else u32 (20240801, 7).
pub fn write_shard(path: &Path, tokens: &[u32], vocab: usize) -> Result<(), ShardError> {
    let mut w = ShardWriter::create(path, tokens.len(), vocab)?;
    w.push_all(tokens)?;
    w.finish()
}

/// A shard of a known token count written block by block (the header first).
pub(crate) struct ShardWriter {
    path: PathBuf,
    out: std::io::BufWriter<File>,
    vocab: usize,
    wide: bool,
    count: usize,
    written: usize,
}

impl ShardWriter {
    /// Starts the shard `path` of `count` tokens, each `< vocab`.
    pub(crate) fn create(path: &Path, count: usize, vocab: usize) -> Result<Self, ShardError> {
        if vocab > i32::MAX as usize {
            return Err(ShardError::Invalid(format!("a vocabulary of {vocab} does not fit the header")));
        }
        let n = i32::try_from(count).map_err(|_| {
            ShardError::Invalid(format!("{}: {count} tokens do not fit one shard (at most {}: the header's count is an i32)", path.display(), i32::MAX))
        })?;
        let wide = vocab > 1 << 16;
        let (magic, version) = if wide { (SHARD_MAGIC_U32, SHARD_VERSION_U32) } else { (SHARD_MAGIC, SHARD_VERSION) };
        let mut out = std::io::BufWriter::new(File::create(path).map_err(io_error("create", path))?);
        for v in [magic, version, n, vocab as i32].into_iter().chain(std::iter::repeat_n(0, 252)) {
            out.write_all(&v.to_le_bytes()).map_err(io_error("write", path))?;
        }
        Ok(Self { path: path.to_path_buf(), out, vocab, wide, count, written: 0 })
    }

    /// The next tokens.
    pub(crate) fn push_all(&mut self, tokens: &[u32]) -> Result<(), ShardError> {
        if let Some((i, &t)) = tokens.iter().enumerate().find(|(_, &t)| t as usize >= self.vocab) {
            return Err(ShardError::Corrupt { path: self.path.clone(), position: self.written + i, token: t, vocab: self.vocab });
        }
        let bytes: Vec<u8> = match self.wide {
            true => tokens.iter().flat_map(|t| t.to_le_bytes()).collect(),
            false => tokens.iter().flat_map(|&t| (t as u16).to_le_bytes()).collect(),
        };
        self.out.write_all(&bytes).map_err(io_error("write", &self.path))?;
        self.written += tokens.len();
        Ok(())
    }

    /// Flushes and fsyncs the shard, which must hold the count it was created with.
    pub(crate) fn finish(self) -> Result<(), ShardError> {
        assert_eq!(self.written, self.count, "{}: a shard of {} tokens got {}", self.path.display(), self.count, self.written);
        let file = self.out.into_inner().map_err(|e| ShardError::Io { op: "write", path: self.path.clone(), source: e.into_error() })?;
        file.sync_all().map_err(io_error("fsync", &self.path))
    }
}

/// A set of shards read as one stream of tokens.
pub struct TokenShards {
    /// Each file, its map, token count and bytes per token.
    files: Vec<(PathBuf, Mmap, usize, usize)>,
    /// Each file's vocabulary check, done when a window first reads from it.
    checked: Vec<std::sync::OnceLock<Result<(), (usize, u32)>>>,
    /// Start of each file in the stream.
    starts: Vec<usize>,
    len: usize,
    vocab: usize,
}

impl std::fmt::Debug for TokenShards {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenShards").field("files", &self.files.len()).field("tokens", &self.len).finish()
    }
}

impl TokenShards {
    /// Opens `paths` (in order), checking each header and size; a file's tokens are checked
    /// against `vocab` when a window first reads from it.
    pub fn open(paths: &[PathBuf], vocab: usize) -> Result<Self, ShardError> {
        if paths.is_empty() {
            return Err(ShardError::Invalid("no token shards given".into()));
        }
        let (mut files, mut starts, mut len) = (Vec::new(), Vec::new(), 0);
        for p in paths {
            let (map, count, found, width) = map_shard(p)?;
            if found != 0 && found != vocab {
                return Err(ShardError::Vocabulary { path: p.clone(), found, expected: vocab });
            }
            starts.push(len);
            len += count;
            files.push((p.clone(), map, count, width));
        }
        let checked = files.iter().map(|_| std::sync::OnceLock::new()).collect();
        Ok(Self { files, checked, starts, len, vocab })
    }

    /// The shards of `split` in `DIR`: the `.bin` files whose name has `split` as one of its
    /// `_`-separated words (`train_000000.bin`, `fineweb_train_000001.bin`,
    /// `tiny_shakespeare_train.bin`), sorted by name.
    pub fn open_dir(dir: &Path, split: &str, vocab: usize) -> Result<Self, ShardError> {
        let entries = std::fs::read_dir(dir).map_err(|source| ShardError::Io { op: "list", path: dir.to_path_buf(), source })?;
        let of_split = |n: &str| n.strip_suffix(".bin").is_some_and(|stem| stem.split('_').any(|w| w == split));
        let mut paths: Vec<PathBuf> =
            entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(of_split)).collect();
        paths.sort();
        if paths.is_empty() {
            return Err(ShardError::Invalid(format!(
                "{}: no {split} shards (*_{split}_*.bin, {split}_*.bin, *_{split}.bin; prepare them with `burn-parallel prepare`)",
                dir.display()
            )));
        }
        Self::open(&paths, vocab)
    }

    /// Tokens in all shards.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there is no token.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Tokens `[start, start + n)` of the stream.
    pub fn window(&self, start: usize, n: usize) -> Result<Vec<u32>, ShardError> {
        if start + n > self.len {
            return Err(ShardError::Invalid(format!("window [{start}, {}) outside {} tokens", start + n, self.len)));
        }
        let mut out = Vec::with_capacity(n);
        let mut f = self.starts.partition_point(|&s| s <= start) - 1;
        let mut at = start - self.starts[f];
        while out.len() < n {
            self.check(f)?;
            let (_, map, count, width) = &self.files[f];
            let take = (n - out.len()).min(count - at);
            out.extend(tokens(&map[HEADER_BYTES + width * at..HEADER_BYTES + width * (at + take)], *width));
            (f, at) = (f + 1, 0);
        }
        Ok(out)
    }

    /// File `f`'s tokens are all inside the vocabulary (scanned once).
    fn check(&self, f: usize) -> Result<(), ShardError> {
        let (path, map, _, width) = &self.files[f];
        let vocab = self.vocab;
        let scan = || match tokens(&map[HEADER_BYTES..], *width).enumerate().find(|&(_, t)| t as usize >= vocab) {
            Some(bad) => Err(bad),
            None => Ok(()),
        };
        self.checked[f].get_or_init(scan).map_err(|(position, token)| ShardError::Corrupt { path: path.clone(), position, token, vocab })
    }
}

/// Little-endian tokens of `width` bytes (2 or 4).
fn tokens(bytes: &[u8], width: usize) -> impl Iterator<Item = u32> + '_ {
    bytes.chunks_exact(width).map(move |c| if width == 2 { u16::from_le_bytes([c[0], c[1]]) as u32 } else { u32::from_le_bytes([c[0], c[1], c[2], c[3]]) })
}

/// The file's map, token count, header vocabulary (0: not recorded) and bytes per token.
fn map_shard(path: &Path) -> Result<(Mmap, usize, usize, usize), ShardError> {
    let f = File::open(path).map_err(|source| ShardError::Io { op: "open", path: path.to_path_buf(), source })?;
    // SAFETY: the shard is only read, and shards are written once before training reads them.
    // A file truncated or rewritten by another process while mapped is undefined behaviour
    // (in practice SIGBUS on the first access past the new end): do not touch shards in use.
    let map = unsafe { Mmap::map(&f) }.map_err(|source| ShardError::Io { op: "map", path: path.to_path_buf(), source })?;
    let bytes = map.len() as u64;
    let word = |i: usize| i32::from_le_bytes(map[4 * i..4 * i + 4].try_into().expect("4 bytes"));
    if map.len() < HEADER_BYTES || (word(0) != SHARD_MAGIC && word(0) != SHARD_MAGIC_U32) {
        let magic = if map.len() >= 4 { word(0) as i64 } else { -1 };
        return Err(ShardError::Foreign { path: path.to_path_buf(), magic, bytes });
    }
    let width = match (word(0), word(1)) {
        (SHARD_MAGIC, SHARD_VERSION) => 2,
        (SHARD_MAGIC_U32, SHARD_VERSION_U32) => 4,
        (_, found) => return Err(ShardError::Version { path: path.to_path_buf(), found }),
    };
    let count = word(2) as i64;
    let expected = HEADER_BYTES as u64 + width as u64 * count.max(0) as u64;
    if count < 0 || expected != bytes {
        return Err(ShardError::Truncated { path: path.to_path_buf(), count, expected, bytes });
    }
    let vocab = word(3).max(0) as usize;
    Ok((map, count as usize, vocab, width))
}

pub(crate) fn io_error<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> ShardError + 'a {
    move |source| ShardError::Io { op, path: path.to_path_buf(), source }
}

#[cfg(test)]
mod tests {
    use super::super::prepare::prepare;
    use super::super::tokenizer::{Tokenizer, GPT2_EOT};
    use super::*;

    /// A vocabulary past 65536 (Llama 3's) is written as llm.c's u32 shards and read back
    /// exactly; tokens past the vocabulary are refused as in u16 shards.
    #[test]
    fn wide_vocabularies_use_u32_shards() {
        let dir = std::env::temp_dir().join(format!("burn-parallel-u32-shards-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let tokens: Vec<u32> = (0..1000u32).map(|i| (i * 7919) % 128256).collect();
        let path = dir.join("train_000000.bin");
        write_shard(&path, &tokens, 128256).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let word = |i: usize| i32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().unwrap());
        assert_eq!((bytes.len(), word(0), word(1)), (HEADER_BYTES + 4 * 1000, 20240801, 7), "llm.c's Llama 3 shard header");
        let shards = TokenShards::open(std::slice::from_ref(&path), 128256).unwrap();
        assert_eq!(shards.window(0, 1000).unwrap(), tokens);
        assert_eq!(shards.window(500, 3).unwrap(), tokens[500..503]);
        let e = write_shard(&path, &[128256], 128256).unwrap_err().to_string();
        assert!(e.contains("token 128256 at position 0 is outside the vocabulary of 128256"), "{e}");
        // The u16 reader's refusal of a version it does not know still names both.
        let mut odd = bytes.clone();
        odd[4..8].copy_from_slice(&3i32.to_le_bytes());
        std::fs::write(&path, odd).unwrap();
        let e = TokenShards::open(std::slice::from_ref(&path), 128256).unwrap_err().to_string();
        assert!(e.contains("shard version 3 (this build reads 1: u16 tokens, magic 20240520; 7: u32 tokens, magic 20240801)"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn shards_round_trip_across_files_and_refuse_bad_files() {
        let dir = std::env::temp_dir().join(format!("bp-shards-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let texts = vec!["To be, or not to be: that is the question.".to_string(), "Whether 'tis nobler in the mind to suffer".to_string()];
        let r = prepare(&texts, Tokenizer::Gpt2, &dir, 7, 0.2).unwrap();
        assert!(r.files.len() >= 3, "{:?}", r.files);
        let train = TokenShards::open_dir(&dir, "train", 50257).unwrap();
        assert_eq!(train.len(), r.train_tokens);
        let all: Vec<u32> = std::iter::once(GPT2_EOT).chain(Tokenizer::Gpt2.encode(&texts[0]).unwrap()).collect();
        assert_eq!(train.window(5, 6).unwrap(), all[5..11], "a window across two files");
        // Bad input: foreign file, truncated, another version, a token outside the vocabulary.
        let p = dir.join("train_000000.bin");
        let good = std::fs::read(&p).unwrap();
        std::fs::write(&p, b"not a shard at all").unwrap();
        assert!(TokenShards::open(std::slice::from_ref(&p), 50257).unwrap_err().to_string().contains("not a token shard"));
        std::fs::write(&p, &good[..good.len() - 2]).unwrap();
        let e = TokenShards::open(std::slice::from_ref(&p), 50257).unwrap_err().to_string();
        assert!(e.contains("the header says 7 tokens") && e.contains("truncated"), "{e}");
        let mut v9 = good.clone();
        v9[4] = 9;
        std::fs::write(&p, &v9).unwrap();
        assert!(TokenShards::open(std::slice::from_ref(&p), 50257).unwrap_err().to_string().contains("shard version 9"));
        // A u16 file marked as u32 tokens: its size is not the header's count of 4-byte tokens;
        // u16's version under u32's magic is neither.
        let mut wide = good.clone();
        wide[..8].copy_from_slice(&[20240801i32.to_le_bytes(), 7i32.to_le_bytes()].concat());
        std::fs::write(&p, &wide).unwrap();
        assert!(TokenShards::open(std::slice::from_ref(&p), 50257).unwrap_err().to_string().contains("truncated"));
        wide[4] = 1;
        std::fs::write(&p, &wide).unwrap();
        assert!(TokenShards::open(std::slice::from_ref(&p), 50257).unwrap_err().to_string().contains("shard version 1"));
        // A token outside the vocabulary, in a file that records none (llm.c's: header word 3 is 0).
        let mut unrecorded = good.clone();
        unrecorded[12..16].copy_from_slice(&0i32.to_le_bytes());
        std::fs::write(&p, &unrecorded).unwrap();
        let e = TokenShards::open(std::slice::from_ref(&p), 256).unwrap().window(0, 7).unwrap_err().to_string();
        assert!(e.contains("outside the vocabulary of 256") && e.contains("position 0"), "{e}");
        // The whole file is checked when a window first reads it: a bad token past the window.
        let mut late = good.clone();
        let at = HEADER_BYTES + 2 * 6;
        late[at..at + 2].copy_from_slice(&60000u16.to_le_bytes());
        std::fs::write(&p, &late).unwrap();
        let e = TokenShards::open(std::slice::from_ref(&p), 50257).unwrap().window(0, 2).unwrap_err().to_string();
        assert!(e.contains("token 60000 at position 6"), "{e}");
        std::fs::write(&p, &good).unwrap();
        // llm.c's names: the split is a word of the name.
        let llmc = dir.join("llmc");
        std::fs::create_dir_all(&llmc).unwrap();
        for n in ["fineweb_train_000001.bin", "fineweb_train_000002.bin", "tiny_shakespeare_val.bin", "interval_000000.bin"] {
            std::fs::write(llmc.join(n), &good).unwrap();
        }
        assert_eq!(TokenShards::open_dir(&llmc, "train", 50257).unwrap().len(), 14);
        // Another tokenizer's shard (header word 3); llm.c's files record none (0).
        let e = TokenShards::open_dir(&llmc, "train", 256).unwrap_err().to_string();
        assert!(e.contains("written by a tokenizer of vocabulary 50257, read as one of 256"), "{e}");
        std::fs::write(llmc.join("fineweb_train_000001.bin"), &unrecorded).unwrap();
        assert_eq!(TokenShards::open(&[llmc.join("fineweb_train_000001.bin")], 50257).unwrap().len(), 7);
        assert_eq!(TokenShards::open_dir(&llmc, "val", 50257).unwrap().len(), 7, "interval_* is not a val shard");
        let e = TokenShards::open_dir(&llmc, "test", 50257).unwrap_err().to_string();
        assert!(e.contains("no test shards"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
