//! Text data: the file given by `--data`, or a generated default corpus; byte-level tokens.

use std::ops::Range;

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use burn_parallel::data::GlobalSampler;
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

/// Byte-level tokens split into train (first 90%) and validation (last 10%).
pub struct Corpus {
    /// Training tokens.
    pub train: Vec<u8>,
    /// Validation tokens.
    pub val: Vec<u8>,
}

impl Corpus {
    /// Splits `text`; needs room for at least one `seq_len + 1` window in each part.
    pub fn new(text: &[u8], seq_len: usize) -> Result<Self, String> {
        let cut = text.len() * 9 / 10;
        let (train, val) = (text[..cut].to_vec(), text[cut..].to_vec());
        if val.len() <= seq_len + 1 {
            return Err(format!(
                "corpus of {} bytes is too small for --seq-len {seq_len}: the 10% validation part needs more than {} bytes",
                text.len(),
                seq_len + 1
            ));
        }
        Ok(Self { train, val })
    }

    /// The global samples `samples` of `split` (inputs, next-byte targets), `[n, seq]`: sample
    /// `i` is the window `sampler` draws for `i` (see [`GlobalSampler`]).
    pub fn samples<B: Backend>(
        split: &[u8],
        samples: Range<u64>,
        seq: usize,
        sampler: &GlobalSampler,
        device: &B::Device,
    ) -> (Tensor<B, 2, Int>, Tensor<B, 2, Int>) {
        let n = (samples.end - samples.start) as usize;
        let mut x = Vec::with_capacity(n * seq);
        let mut y = Vec::with_capacity(n * seq);
        for i in samples {
            let start = sampler.window_start(i, split.len(), seq + 1);
            x.extend(split[start..start + seq].iter().map(|&b| b as i64));
            y.extend(split[start + 1..start + seq + 1].iter().map(|&b| b as i64));
        }
        (Tensor::from_data(TensorData::new(x, [n, seq]), device), Tensor::from_data(TensorData::new(y, [n, seq]), device))
    }

    /// Evaluation batch `i` of `batch` samples of the stream `name` (the same on every rank).
    pub fn eval_batch<B: Backend>(split: &[u8], batch: usize, seq: usize, name: &str, i: usize, device: &B::Device) -> (Tensor<B, 2, Int>, Tensor<B, 2, Int>) {
        let first = (i * batch) as u64;
        Self::samples(split, first..first + batch as u64, seq, &GlobalSampler::new(0, name), device)
    }
}
