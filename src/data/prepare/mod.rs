//! Preparing token shards from text, in bounded memory: documents are tokenized a piece at a
//! time into a staging file of raw tokens, which is then cut into `train_NNNNNN.bin` shards and
//! `val_000000.bin` (its last `val_fraction` of the tokens) without holding either. A corpus
//! larger than the host's memory prepares (Megatron's `preprocess_data.py`, llm.c's
//! `fineweb.py` likewise stream).
//!
//! Inputs ([`InputFormat`]): plain text files, each one document, read in pieces of about
//! [`PIECE_BYTES`] cut where the tokenizer cuts anyway — after a single `\n` that stands between
//! two printable ASCII characters (GPT-2's, cl100k's and Llama 3's pre-tokenizers all end a
//! piece there: no merge crosses it, and a whitespace run cannot), so the tokens equal the
//! whole document's (a text with no such place is read whole); or JSON Lines (Megatron's
//! input), one document per line in a string field (`text` by default).

mod staged;

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use super::shards::{io_error, ShardWriter};
use super::tokenizer::Tokenizer;
use super::ShardError;
use staged::{jsonl_documents, text_pieces, Staged};

/// About how many bytes of a text file are tokenized at a time.
pub const PIECE_BYTES: usize = 1 << 20;

/// What the input files hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InputFormat {
    /// Each file is one document of text.
    Text,
    /// JSON Lines: each line an object whose string field `key` is a document.
    Jsonl {
        /// The field.
        key: String,
    },
}

/// What [`prepare`] wrote.
#[derive(Debug, Clone, Default)]
pub struct Prepared {
    /// Shard files, in order.
    pub files: Vec<PathBuf>,
    /// Training tokens.
    pub train_tokens: usize,
    /// Validation tokens.
    pub val_tokens: usize,
}

/// The staging directory inside a prepare's output directory (a reader never takes it).
const STAGING: &str = ".partial";

/// How [`prepare_files`] (and [`prepare`]) tokenize and split.
#[derive(Debug, Clone, Copy)]
pub struct PrepareOptions {
    /// The tokenizer.
    pub tokenizer: Tokenizer,
    /// Tokens per training shard (llm.c: 100M).
    pub shard_tokens: usize,
    /// The last fraction of the tokens becomes the validation shard.
    pub val_fraction: f64,
    /// Tokenizer threads (memory: about this many pieces of text and their tokens at once).
    pub workers: usize,
}

impl PrepareOptions {
    /// `tokenizer`, shards of 100M tokens, the last 10% for validation, one worker.
    pub fn new(tokenizer: Tokenizer) -> Self {
        Self { tokenizer, shard_tokens: 100_000_000, val_fraction: 0.1, workers: 1 }
    }
}

/// Tokenizes `texts` (documents in memory, one thread; see [`prepare_files`]) into shards in
/// `out`.
pub fn prepare<T: AsRef<[u8]>>(texts: &[T], tokenizer: Tokenizer, out: &Path, shard_tokens: usize, val_fraction: f64) -> Result<Prepared, ShardError> {
    let o = PrepareOptions { shard_tokens, val_fraction, ..PrepareOptions::new(tokenizer) };
    stage_and_write(&o, out, |staged| texts.iter().try_for_each(|t| staged.document(|sink| sink(t.as_ref()))))
}

/// Tokenizes the documents of `files` (as bytes: the byte tokenizer takes them as they are;
/// GPT-2 puts `<|endoftext|>` before each, as nanoGPT does, Llama 3 `<|begin_of_text|>` before
/// and `<|end_of_text|>` after each, as torchtitan does), `o.workers` pieces at a time in
/// parallel, and writes into `out` (missing or empty: a reader takes every shard in it)
/// `train_NNNNNN.bin` shards of at most `o.shard_tokens` tokens and, from the last
/// `o.val_fraction` of the tokens, `val_000000.bin`. `out` is checked before anything is
/// tokenized. Everything is written and synced in `out/.partial`, then the shards are moved in
/// with the validation shard last: an interrupted prepare leaves no set a reader takes (no
/// `val` shard, or nothing at all), and a directory that holds only `.partial` counts as
/// empty; a failed one leaves no staged tokens. Memory: `o.workers` pieces of text and their
/// tokens, not the corpus.
pub fn prepare_files(files: &[PathBuf], format: &InputFormat, out: &Path, o: &PrepareOptions) -> Result<Prepared, ShardError> {
    stage_and_write(o, out, |staged| {
        for path in files {
            match format {
                InputFormat::Text => staged.document(|sink| text_pieces(path, PIECE_BYTES, sink))?,
                InputFormat::Jsonl { key } => jsonl_documents(path, key, staged)?,
            }
        }
        Ok(())
    })
}

/// Stages the tokens `documents` pushes, then writes the shards.
fn stage_and_write(o: &PrepareOptions, out: &Path, documents: impl FnOnce(&mut Staged) -> Result<(), ShardError>) -> Result<Prepared, ShardError> {
    let val_fraction = o.val_fraction;
    if !(val_fraction > 0.0 && val_fraction < 1.0) {
        return Err(ShardError::Invalid(format!("a validation fraction of {val_fraction} (it is above 0 and below 1)")));
    }
    check_out(out)?;
    let created = !out.exists();
    let staging = out.join(STAGING);
    std::fs::create_dir_all(&staging).map_err(io_error("create", &staging))?;
    let written = write_staged(o, out, &staging, documents);
    if written.is_err() {
        // Nothing half done stays: the staged tokens (up to the corpus's size), and `out`
        // where this call made it.
        let _ = std::fs::remove_dir_all(&staging);
        if created {
            let _ = std::fs::remove_dir(out);
        }
    }
    written
}

/// [`stage_and_write`] once `out/.partial` exists.
fn write_staged(o: &PrepareOptions, out: &Path, staging: &Path, documents: impl FnOnce(&mut Staged) -> Result<(), ShardError>) -> Result<Prepared, ShardError> {
    let (tokenizer, shard_tokens, val_fraction) = (o.tokenizer, o.shard_tokens, o.val_fraction);
    let mut staged = Staged::create(tokenizer, staging.join("tokens.u32"), o.workers)?;
    documents(&mut staged)?;
    let (raw, total) = staged.finish()?;
    let val = ((total as f64) * val_fraction) as usize;
    if val == 0 || val >= total {
        return Err(ShardError::Invalid(format!("{total} tokens cannot be split with a validation fraction of {val_fraction}")));
    }
    let train = total - val;
    let shard = shard_tokens.max(1);
    let mut names: Vec<(String, usize)> = (0..train.div_ceil(shard)).map(|i| (format!("train_{i:06}.bin"), shard.min(train - i * shard))).collect();
    names.push(("val_000000.bin".into(), val));
    let mut tokens = BufReader::new(File::open(&raw).map_err(io_error("open", &raw))?);
    for (name, count) in &names {
        let mut w = ShardWriter::create(&staging.join(name), *count, tokenizer.vocab_size())?;
        let (mut left, mut bytes) = (*count, vec![0u8; 4 << 16]);
        while left > 0 {
            let n = left.min(1 << 16);
            tokens.read_exact(&mut bytes[..4 * n]).map_err(io_error("read", &raw))?;
            let chunk: Vec<u32> = bytes[..4 * n].chunks_exact(4).map(|w| u32::from_le_bytes(w.try_into().expect("4 bytes"))).collect();
            w.push_all(&chunk)?;
            left -= n;
        }
        w.finish()?;
    }
    std::fs::remove_file(&raw).map_err(io_error("remove", &raw))?;
    sync_dir(staging)?;
    let mut report = Prepared { train_tokens: train, val_tokens: val, ..Default::default() };
    for (name, _) in &names {
        let to = out.join(name);
        std::fs::rename(staging.join(name), &to).map_err(io_error("move into place", &to))?;
        report.files.push(to);
    }
    sync_dir(out)?;
    std::fs::remove_dir(staging).map_err(io_error("remove", staging))?;
    Ok(report)
}

fn sync_dir(dir: &Path) -> Result<(), ShardError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_error("fsync", dir))
}

/// `out` is missing, or an empty directory (a stale `.partial` of an interrupted prepare is
/// removed).
fn check_out(out: &Path) -> Result<(), ShardError> {
    if !out.exists() {
        return Ok(());
    }
    if !out.is_dir() {
        return Err(ShardError::Invalid(format!("{} exists and is not a directory", out.display())));
    }
    let mut entries = Vec::new();
    for e in std::fs::read_dir(out).map_err(io_error("list", out))? {
        entries.push(e.map_err(io_error("list", out))?.file_name());
    }
    if entries.iter().any(|n| n != STAGING) {
        return Err(ShardError::Invalid(format!(
            "{} exists and is not empty: prepare writes a new set of shards (a reader takes every shard in it; an interrupted prepare leaves train shards without the val shard); remove it or choose another",
            out.display()
        )));
    }
    let staging = out.join(STAGING);
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(io_error("remove the interrupted", &staging))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::TokenShards;

    #[test]
    fn prepare_writes_a_new_directory_and_keeps_the_bytes() {
        let dir = std::env::temp_dir().join(format!("bp-prepare-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let out = dir.join("shards");
        // A stale staging directory of an interrupted prepare is replaced.
        let partial = out.join(".partial");
        std::fs::create_dir_all(&partial).unwrap();
        std::fs::write(partial.join("train_000009.bin"), b"stale").unwrap();
        // Bytes that are not UTF-8 stay themselves under the byte tokenizer.
        let text: Vec<u8> = b"caf\xe9 \xff\x00 ok".repeat(10);
        let r = prepare(std::slice::from_ref(&text), Tokenizer::Byte, &out, 64, 0.25).unwrap();
        assert_eq!((r.train_tokens + r.val_tokens, r.files.len()), (text.len(), 3), "{r:?}");
        let train = TokenShards::open_dir(&out, "train", 256).unwrap();
        let got: Vec<u8> = train.window(0, train.len()).unwrap().into_iter().map(|t| t as u8).collect();
        assert_eq!(got, text[..r.train_tokens]);
        assert!(!partial.exists(), "the staging directory is gone");
        // A second prepare into the same directory would mix two sets of shards: refused.
        let e = prepare(&[text], Tokenizer::Byte, &out, 1000, 0.25).unwrap_err().to_string();
        assert!(e.contains("exists and is not empty"), "{e}");
        assert_eq!(TokenShards::open_dir(&out, "train", 256).unwrap().len(), r.train_tokens, "untouched");
        // An empty directory is fine, also behind a symbolic link (or a mount point).
        let empty = dir.join("empty");
        std::fs::create_dir_all(&empty).unwrap();
        let link = dir.join("link");
        std::os::unix::fs::symlink(&empty, &link).unwrap();
        prepare(&["some text to split".to_string()], Tokenizer::Gpt2, &link, 1000, 0.25).unwrap();
        assert_eq!(TokenShards::open_dir(&empty, "val", 50257).unwrap().len(), 1);
        // A file is no directory.
        let e = prepare(&["text"], Tokenizer::Byte, &partial_file(&dir), 1000, 0.25).unwrap_err().to_string();
        assert!(e.contains("exists and is not a directory"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn partial_file(dir: &Path) -> PathBuf {
        let f = dir.join("a-file");
        std::fs::write(&f, b"x").unwrap();
        f
    }

    /// Text files and JSON Lines prepare the shards that the same documents in memory make; a
    /// bad line is an error naming the file and line.
    #[test]
    fn files_and_json_lines_prepare_what_documents_in_memory_do() {
        let dir = std::env::temp_dir().join(format!("bp-prepare-files-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let docs: Vec<String> = (0..30).map(|i| format!("Document {i}.\nIt has {} lines.\n", i % 4).repeat(1 + i % 3)).collect();
        let paths: Vec<PathBuf> = docs
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let p = dir.join(format!("doc{i}.txt"));
                std::fs::write(&p, d).unwrap();
                p
            })
            .collect();
        let jsonl = dir.join("docs.jsonl");
        let lines: Vec<String> = docs.iter().map(|d| serde_json::json!({"id": 1, "body": d}).to_string()).collect();
        std::fs::write(&jsonl, lines.join("\n\n") + "\n").unwrap();
        let read = |out: &Path| {
            let t = TokenShards::open_dir(out, "train", 50257).unwrap();
            let v = TokenShards::open_dir(out, "val", 50257).unwrap();
            (t.window(0, t.len()).unwrap(), v.window(0, v.len()).unwrap())
        };
        let memory = prepare(&docs, Tokenizer::Gpt2, &dir.join("memory"), 100, 0.1).unwrap();
        let o = PrepareOptions { shard_tokens: 100, ..PrepareOptions::new(Tokenizer::Gpt2) };
        let text = prepare_files(&paths, &InputFormat::Text, &dir.join("text"), &o).unwrap();
        // Three tokenizer threads, pieces of every size in flight: the same shards.
        let parallel = prepare_files(&paths, &InputFormat::Text, &dir.join("parallel"), &PrepareOptions { workers: 3, ..o }).unwrap();
        assert_eq!((parallel.train_tokens, parallel.val_tokens), (text.train_tokens, text.val_tokens));
        let json =
            prepare_files(std::slice::from_ref(&jsonl), &InputFormat::Jsonl { key: "body".into() }, &dir.join("json"), &PrepareOptions { workers: 2, ..o })
                .unwrap();
        for r in [&text, &json] {
            assert_eq!((r.train_tokens, r.val_tokens, r.files.len()), (memory.train_tokens, memory.val_tokens, memory.files.len()));
        }
        assert!(memory.files.len() > 3, "{memory:?}");
        assert_eq!(read(&dir.join("text")), read(&dir.join("memory")));
        assert_eq!(read(&dir.join("parallel")), read(&dir.join("memory")));
        assert_eq!(read(&dir.join("json")), read(&dir.join("memory")));
        std::fs::write(&jsonl, "{\"body\": \"a\"}\n{\"text\": \"b\"}\n").unwrap();
        let e = prepare_files(std::slice::from_ref(&jsonl), &InputFormat::Jsonl { key: "body".into() }, &dir.join("bad"), &o).unwrap_err().to_string();
        assert!(e.contains("docs.jsonl line 2: no string field \"body\""), "{e}");
        assert!(!dir.join("bad").exists(), "a failed prepare leaves no directory it made, nor staged tokens");
        std::fs::write(&jsonl, "{\"body\": \"a\"}\nnot json\n").unwrap();
        let e = prepare_files(&[jsonl], &InputFormat::Jsonl { key: "body".into() }, &dir.join("bad2"), &o).unwrap_err().to_string();
        assert!(e.contains("docs.jsonl line 2: not JSON"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
