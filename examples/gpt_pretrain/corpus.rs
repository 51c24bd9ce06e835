//! Text data: the file given by `--data`, or a generated default corpus; byte-level tokens.

use std::ops::Range;

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use burn_parallel::data::{Blend, GlobalSampler, TokenShards, Tokenizer};
use burn_parallel::rng::HostRng;

const NAMES: [&str; 8] = ["ANNA", "BERTRAM", "CLEO", "DORIAN", "ELSPETH", "FALK", "GRETA", "HOLLIS"];
const ADJ: [&str; 16] = [
    "quiet", "golden", "bitter", "gentle", "ancient", "restless", "silver", "hollow", "bright", "weary", "noble", "cold", "patient", "wild", "honest",
    "distant",
];
const NOUN: [&str; 20] = [
    "king", "river", "garden", "sword", "letter", "tower", "winter", "promise", "harbour", "candle", "crown", "forest", "stranger", "bell", "road", "mirror",
    "orchard", "storm", "servant", "heart",
];
const VERB: [&str; 16] = [
    "remembers",
    "carries",
    "betrays",
    "follows",
    "keeps",
    "answers",
    "breaks",
    "guards",
    "forgets",
    "wakes",
    "seeks",
    "loves",
    "fears",
    "mends",
    "burns",
    "calls",
];
const OPEN: [&str; 6] = ["Alas,", "Hark!", "I swear", "Good friend,", "Tell me,", "Behold,"];

/// A generated play-like corpus of about `bytes` bytes (deterministic in `seed`): speakers,
/// sentences from a small grammar, so a byte-level model can clearly learn it.
pub fn generated(bytes: usize, seed: u64) -> String {
    let mut rng = HostRng::new(seed, "corpus");
    let mut pick = |n: usize| (rng.next_u64() % n as u64) as usize;
    let mut out = String::with_capacity(bytes + 256);
    while out.len() < bytes {
        out.push_str(NAMES[pick(NAMES.len())]);
        out.push_str(":\n");
        for _ in 0..1 + pick(3) {
            if pick(3) == 0 {
                out.push_str(OPEN[pick(OPEN.len())]);
                out.push(' ');
            }
            let s = format!(
                "the {} {} {} the {} {}",
                ADJ[pick(ADJ.len())],
                NOUN[pick(NOUN.len())],
                VERB[pick(VERB.len())],
                ADJ[pick(ADJ.len())],
                NOUN[pick(NOUN.len())]
            );
            out.push_str(&s);
            out.push_str(if pick(4) == 0 { "?\n" } else { ".\n" });
        }
        out.push('\n');
    }
    out
}

/// Inputs and targets `[n, seq]`.
pub type Batch<B> = (Tensor<B, 2, Int>, Tensor<B, 2, Int>);

/// One split's tokens: in memory (a tokenized text), memory-mapped shards, or several of
/// those blended by weight.
pub enum Split {
    /// Tokens in memory.
    Tokens(Vec<u32>),
    /// Prepared shards.
    Shards(TokenShards),
    /// Datasets blended by weight: sample `i` comes from part `blend.source(i)`.
    Blend(Vec<Split>, Blend),
}

impl Split {
    /// Tokens in the split (all parts of a blend).
    pub fn len(&self) -> usize {
        match self {
            Split::Tokens(t) => t.len(),
            Split::Shards(s) => s.len(),
            Split::Blend(parts, _) => parts.iter().map(Split::len).sum(),
        }
    }

    /// The split sample `index` is drawn from (itself but in a blend).
    pub fn part(&self, index: u64) -> &Split {
        match self {
            Split::Blend(parts, blend) => &parts[blend.source(index)],
            one => one,
        }
    }

    /// Tokens `[start, start + n)` (of a blend's first part).
    pub fn window(&self, start: usize, n: usize) -> Result<Vec<u32>, String> {
        match self {
            Split::Tokens(t) => Ok(t[start..start + n].to_vec()),
            Split::Shards(s) => s.window(start, n).map_err(|e| e.to_string()),
            Split::Blend(parts, _) => parts[0].window(start, n),
        }
    }
}

/// Training and validation tokens, and their tokenizer.
pub struct Corpus {
    /// Training tokens.
    pub train: Split,
    /// Validation tokens.
    pub val: Split,
    /// How they were made.
    pub tokenizer: Tokenizer,
}

impl Corpus {
    /// Tokenizes `text` (raw bytes for the byte tokenizer) and splits the tokens into train
    /// (first 90%) and validation (last 10%); each needs room for a `seq_len + 1` window.
    pub fn from_text(text: &[u8], tokenizer: Tokenizer, seq_len: usize) -> Result<Self, String> {
        let tokens = tokenizer.encode_bytes(text).map_err(|e| e.to_string())?;
        let cut = tokens.len() * 9 / 10;
        let val = tokens[cut..].to_vec();
        if val.len() <= seq_len + 1 {
            return Err(format!(
                "corpus of {} {tokenizer} tokens is too small for --seq-len {seq_len}: the 10% validation part needs more than {} tokens",
                tokens.len(),
                seq_len + 1
            ));
        }
        let mut train = tokens;
        train.truncate(cut);
        Ok(Self { train: Split::Tokens(train), val: Split::Tokens(val), tokenizer })
    }

    /// Prepared shards `DIR/train_*.bin` and `DIR/val_*.bin` of `tokenizer`, of one directory
    /// or several blended by weight (`(weight, DIR)`; train and validation blended alike).
    pub fn from_shards(dirs: &[(f64, String)], tokenizer: Tokenizer, seq_len: usize) -> Result<Self, String> {
        let mut parts = Vec::with_capacity(dirs.len());
        for (_, dir) in dirs {
            let open = |split| TokenShards::open_dir(dir.as_ref(), split, tokenizer.vocab_size()).map_err(|e| format!("--shards: {e}"));
            let (train, val) = (open("train")?, open("val")?);
            for (name, s) in [("train", &train), ("val", &val)] {
                if s.len() <= seq_len + 1 {
                    return Err(format!("--shards: the {name} shards of {dir} hold {} tokens, too few for --seq-len {seq_len}", s.len()));
                }
            }
            parts.push((Split::Shards(train), Split::Shards(val)));
        }
        if parts.len() == 1 {
            let (train, val) = parts.pop().expect("one part");
            return Ok(Self { train, val, tokenizer });
        }
        let weights: Vec<f64> = dirs.iter().map(|(w, _)| *w).collect();
        let blend = Blend::new(&weights).map_err(|e| format!("--shards: {e}"))?;
        let (train, val): (Vec<Split>, Vec<Split>) = parts.into_iter().unzip();
        Ok(Self { train: Split::Blend(train, blend.clone()), val: Split::Blend(val, blend), tokenizer })
    }

    /// The global samples `samples` of `split` (inputs, next-token targets), `[n, seq]`: sample
    /// `i` is the window `sampler` draws for `i` (see [`GlobalSampler`]).
    pub fn samples<B: Backend>(split: &Split, samples: Range<u64>, seq: usize, sampler: &GlobalSampler, device: &B::Device) -> Result<Batch<B>, String> {
        let n = (samples.end - samples.start) as usize;
        let mut x = Vec::with_capacity(n * seq);
        let mut y = Vec::with_capacity(n * seq);
        for i in samples {
            let part = split.part(i);
            let w = part.window(sampler.window_start(i, part.len(), seq + 1), seq + 1)?;
            x.extend(w[..seq].iter().map(|&t| t as i64));
            y.extend(w[1..].iter().map(|&t| t as i64));
        }
        Ok((Tensor::from_data(TensorData::new(x, [n, seq]), device), Tensor::from_data(TensorData::new(y, [n, seq]), device)))
    }

    /// The samples `samples` as `m` micro-batches of equal size, one after another.
    pub fn microbatches<B: Backend>(
        split: &Split,
        samples: Range<u64>,
        m: usize,
        seq: usize,
        sampler: &GlobalSampler,
        device: &B::Device,
    ) -> Result<Vec<Batch<B>>, String> {
        let (m, first, n) = (m as u64, samples.start, samples.end - samples.start);
        if m == 0 || !n.is_multiple_of(m) {
            return Err(format!("--batch-size {n} is not divisible by --microbatches {m}"));
        }
        let per = n / m;
        (0..m).map(|i| Self::samples::<B>(split, first + i * per..first + (i + 1) * per, seq, sampler, device)).collect()
    }

    /// Evaluation batch `i` of `batch` samples of the stream `name` (the same on every rank).
    pub fn eval_batch<B: Backend>(split: &Split, batch: usize, seq: usize, name: &str, i: usize, device: &B::Device) -> Result<Batch<B>, String> {
        let first = (i * batch) as u64;
        Self::samples(split, first..first + batch as u64, seq, &GlobalSampler::new(0, name), device)
    }
}
