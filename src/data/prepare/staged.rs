//! The input side of [`prepare_files`](super::prepare_files): documents read in pieces (text
//! files cut where the pre-tokenizers cut, JSON Lines), tokenized by worker threads in order,
//! appended to the staging file of raw tokens.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use super::super::shards::io_error;
use super::super::tokenizer::Tokenizer;
use super::super::ShardError;
use super::PIECE_BYTES;

/// What the documents are made of, in order: text is tokenized in batches (in parallel).
enum Item {
    /// A document begins (its start token).
    Start,
    /// A piece of its text.
    Text(Vec<u8>),
    /// It ends (its end token).
    End,
}

/// Tokens of every document, appended to a staging file of little-endian `u32`; text queued
/// until `workers` pieces' worth is there, then tokenized by `workers` threads.
pub(super) struct Staged {
    tokenizer: Tokenizer,
    path: PathBuf,
    out: BufWriter<File>,
    count: usize,
    workers: usize,
    pending: Vec<Item>,
    pending_bytes: usize,
    pending_texts: usize,
}

impl Staged {
    pub(super) fn create(tokenizer: Tokenizer, path: PathBuf, workers: usize) -> Result<Self, ShardError> {
        let out = BufWriter::new(File::create(&path).map_err(io_error("create", &path))?);
        Ok(Self { tokenizer, path, out, count: 0, workers: workers.max(1), pending: Vec::new(), pending_bytes: 0, pending_texts: 0 })
    }

    fn push(&mut self, tokens: impl IntoIterator<Item = u32>) -> Result<(), ShardError> {
        // Through a small buffer: one write per 16 Ki tokens, not per token.
        let (mut buf, mut n) = ([0u8; 1 << 16], 0);
        for t in tokens {
            buf[n..n + 4].copy_from_slice(&t.to_le_bytes());
            n += 4;
            if n == buf.len() {
                self.out.write_all(&buf).map_err(io_error("write", &self.path))?;
                (self.count, n) = (self.count + buf.len() / 4, 0);
            }
        }
        self.out.write_all(&buf[..n]).map_err(io_error("write", &self.path))?;
        self.count += n / 4;
        Ok(())
    }

    /// One document, its pieces handed over by `pieces` (called with a sink for each piece).
    pub(super) fn document(
        &mut self,
        pieces: impl FnOnce(&mut dyn FnMut(&[u8]) -> Result<(), ShardError>) -> Result<(), ShardError>,
    ) -> Result<(), ShardError> {
        self.queue(Item::Start)?;
        pieces(&mut |piece: &[u8]| self.queue(Item::Text(piece.to_vec())))?;
        self.queue(Item::End)
    }

    /// Queues `item`; tokenizes the queue once it holds a text per worker and half a piece of
    /// bytes per worker (a piece each, or many small documents).
    fn queue(&mut self, item: Item) -> Result<(), ShardError> {
        if let Item::Text(t) = &item {
            self.pending_bytes += t.len();
            self.pending_texts += 1;
        }
        self.pending.push(item);
        match self.pending_texts >= self.workers && self.pending_bytes >= self.workers * PIECE_BYTES / 2 {
            true => self.flush(),
            false => Ok(()),
        }
    }

    /// Tokenizes what is queued and appends it in order.
    fn flush(&mut self) -> Result<(), ShardError> {
        let items = std::mem::take(&mut self.pending);
        (self.pending_bytes, self.pending_texts) = (0, 0);
        let texts: Vec<&[u8]> = items.iter().filter_map(|i| if let Item::Text(t) = i { Some(t.as_slice()) } else { None }).collect();
        let mut tokens = encode_all(self.tokenizer, &texts, self.workers)?.into_iter();
        for item in &items {
            match item {
                Item::Start => self.push(self.tokenizer.document_start())?,
                Item::Text(_) => self.push(tokens.next().expect("tokens for every text"))?,
                Item::End => self.push(self.tokenizer.document_end())?,
            }
        }
        Ok(())
    }

    /// Flushes the queue and the file; the staging file's path and its token count.
    pub(super) fn finish(mut self) -> Result<(PathBuf, usize), ShardError> {
        self.flush()?;
        let path = self.path.clone();
        self.out.into_inner().map_err(|e| ShardError::Io { op: "write", path: path.clone(), source: e.into_error() })?;
        Ok((path, self.count))
    }
}

/// The tokens of each of `texts`, in order, by up to `workers` threads (contiguous groups of
/// about equal bytes).
fn encode_all(tokenizer: Tokenizer, texts: &[&[u8]], workers: usize) -> Result<Vec<Vec<u32>>, ShardError> {
    let encode = |t: &&[u8]| tokenizer.encode_bytes(t).map_err(|e| ShardError::Invalid(e.to_string()));
    if workers <= 1 || texts.len() <= 1 {
        return texts.iter().map(encode).collect();
    }
    // Text i goes to the worker whose share of the bytes holds its middle.
    let total = texts.iter().map(|t| t.len()).sum::<usize>().max(1);
    let mut bounds = vec![0usize; workers + 1];
    let mut before = 0;
    for (i, t) in texts.iter().enumerate() {
        let worker = ((before + t.len() / 2) * workers / total).min(workers - 1);
        bounds[worker + 1] = i + 1;
        before += t.len();
    }
    for w in 1..=workers {
        bounds[w] = bounds[w].max(bounds[w - 1]);
    }
    let groups: Vec<&[&[u8]]> = bounds.windows(2).map(|b| &texts[b[0]..b[1]]).filter(|g| !g.is_empty()).collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = groups.iter().map(|g| s.spawn(move || g.iter().map(encode).collect::<Result<Vec<_>, _>>())).collect();
        let mut out = Vec::with_capacity(texts.len());
        for h in handles {
            out.extend(h.join().expect("a tokenizer thread panicked")?);
        }
        Ok(out)
    })
}

/// Where `buf` may be cut for the tokenizer: the end of the last `\n` that stands between two
/// printable ASCII characters, at `from` or later (`buf[p]` the first byte after the cut).
fn cut(buf: &[u8], from: usize) -> Option<usize> {
    let graphic = |b: u8| (0x21..=0x7e).contains(&b);
    (from.max(2)..buf.len()).rev().find(|&p| buf[p - 1] == b'\n' && graphic(buf[p - 2]) && graphic(buf[p]))
}

/// The text file `path` in pieces of about `piece` bytes, cut where [`cut`] allows.
pub(super) fn text_pieces(path: &Path, piece: usize, sink: &mut dyn FnMut(&[u8]) -> Result<(), ShardError>) -> Result<(), ShardError> {
    let mut file = File::open(path).map_err(io_error("open", path))?;
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let start = buf.len();
        buf.resize(start + piece, 0);
        let n = file.read(&mut buf[start..]).map_err(io_error("read", path))?;
        buf.truncate(start + n);
        if n == 0 {
            return if buf.is_empty() { Ok(()) } else { sink(&buf) };
        }
        // (Places before `start` were looked at when they were read.)
        if buf.len() >= piece {
            if let Some(p) = cut(&buf, start) {
                sink(&buf[..p])?;
                buf.drain(..p);
            }
        }
    }
}

/// The documents of a JSON Lines file (field `key` of each non-empty line).
pub(super) fn jsonl_documents(path: &Path, key: &str, staged: &mut Staged) -> Result<(), ShardError> {
    let reader = BufReader::new(File::open(path).map_err(io_error("open", path))?);
    for (i, line) in reader.lines().enumerate() {
        let line = line.map_err(io_error("read", path))?;
        if line.trim().is_empty() {
            continue;
        }
        let bad = |why: String| ShardError::Invalid(format!("{} line {}: {why}", path.display(), i + 1));
        let value: serde_json::Value = serde_json::from_str(&line).map_err(|e| bad(format!("not JSON ({e})")))?;
        let text = value.get(key).and_then(|t| t.as_str()).ok_or_else(|| bad(format!("no string field {key:?}")))?;
        staged.document(|sink| sink(text.as_bytes()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A text of what pre-tokenizers treat specially: runs of newlines and spaces, CRLF,
    /// punctuation before a newline, contractions after one, digits, NBSP, CJK, invalid UTF-8.
    fn tricky() -> Vec<u8> {
        let lines = "Hello world.\nIt's here\n\n  indented\r\nCRLF line\n'tis\n123456\nnbsp\u{a0}x\n\u{4e2d}\u{6587}\nend!\n\t\ttab\ntrailing \nx\ntab\t\ny\npara\n\nnext\n";
        let mut t = Vec::new();
        for i in 0..40 {
            t.extend_from_slice(format!("{i}:{lines}").as_bytes());
            if i % 7 == 0 {
                t.extend_from_slice(b"caf\xe9\nbad\n");
            }
        }
        t
    }

    /// Cut into pieces of a few bytes, a text tokenizes as it does whole, for the byte
    /// tokenizer, GPT-2's and cl100k's pattern (Llama 3's format); and it is cut.
    #[test]
    fn pieces_tokenize_as_the_whole_document() {
        let dir = std::env::temp_dir().join(format!("bp-pieces-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (text, file, model) = (tricky(), dir.join("tricky.txt"), dir.join("tokenizer.model"));
        std::fs::write(&file, &text).unwrap();
        crate::data::write_cl100k_tiktoken(&model).unwrap();
        let llama: Tokenizer = format!("llama3:{}", model.display()).parse().unwrap();
        for tokenizer in [Tokenizer::Byte, Tokenizer::Gpt2, llama] {
            let whole = tokenizer.encode_bytes(&text).unwrap();
            for piece in [1, 5, 64] {
                let (mut got, mut bytes, mut pieces) = (Vec::new(), Vec::new(), 0);
                text_pieces(&file, piece, &mut |p: &[u8]| {
                    got.extend(tokenizer.encode_bytes(p).unwrap());
                    bytes.extend_from_slice(p);
                    pieces += 1;
                    Ok(())
                })
                .unwrap();
                assert_eq!(bytes, text, "the pieces are the text");
                assert!(pieces > 40, "{pieces} pieces of {piece} bytes");
                let first = got.iter().zip(&whole).position(|(a, b)| a != b);
                assert!(
                    got.len() == whole.len() && first.is_none(),
                    "{tokenizer} in pieces of {piece} bytes: from token {first:?} on ({} vs {})",
                    got.len(),
                    whole.len()
                );
            }
        }
        // A cut after a newline that follows a space or precedes one would change the tokens.
        assert_eq!(cut(b"ab \ncd", 0), None);
        assert_eq!(cut(b"ab\n cd", 0), None);
        assert_eq!(cut(b"ab\ncd\nef", 0), Some(6));
        assert_eq!(cut(b"ab\ncd\nef", 7), None);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
