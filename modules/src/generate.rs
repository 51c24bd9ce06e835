//! Text generation with a [`Gpt`]: temperature sampling (greedy at 0) on every TP rank alike.

use burn::tensor::{Int, Tensor, TensorData};
use burn_parallel::rng::HostRng;
use burn_parallel::{ConfigError, ParallelBackend};

use crate::gpt::Gpt;

impl<B: ParallelBackend> Gpt<B> {
    /// Samples `n_new` tokens after `prompt` (temperature sampling; greedy when `temperature` is
    /// 0). Every TP rank must call it with the same arguments; all get the same tokens.
    /// Runs without sequence parallelism (any context length) and without context parallelism
    /// (each CP rank generates the whole sequence, as the TP ranks do). An empty prompt or a
    /// token id outside the vocabulary is an error.
    pub fn generate(&self, prompt: &[usize], n_new: usize, temperature: f64, seed: u64) -> Result<Vec<usize>, ConfigError> {
        // Padded ids (Megatron's divisible-by padding) are not tokens: refused like any other.
        let vocab = self.vocab_used.unwrap_or(self.wte.vocab_local * self.wte.tp.size());
        if prompt.is_empty() {
            return Err(ConfigError::Invalid("generate needs a prompt of at least one token (got none)".into()));
        }
        if let Some(&t) = prompt.iter().find(|&&t| t >= vocab) {
            return Err(ConfigError::Invalid(format!("prompt token {t} is outside the vocabulary of {vocab}")));
        }
        if self.sequence_parallel {
            return self.clone().with_sequence_parallel(false).generate(prompt, n_new, temperature, seed);
        }
        if self.wte.cp.is_some() {
            return self.clone().whole_sequences().generate(prompt, n_new, temperature, seed);
        }
        let device = self.wte.weight.val().device();
        let max = self.max_seq_len;
        let mut rng = HostRng::new(seed, "generate");
        let mut tokens = prompt.to_vec();
        for _ in 0..n_new {
            let ctx = &tokens[tokens.len().saturating_sub(max)..];
            let ids: Vec<i64> = ctx.iter().map(|&t| t as i64).collect();
            let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, ctx.len()]), &device);
            let logits = self.logits(ids);
            let [_, s, v] = logits.dims();
            let last: Vec<f32> = logits.slice([0..1, s - 1..s]).reshape([v]).into_data().convert::<f32>().to_vec().expect("f32 logits");
            tokens.push(sample(&last, temperature, &mut rng));
        }
        Ok(tokens)
    }
}

fn sample(logits: &[f32], temperature: f64, rng: &mut HostRng) -> usize {
    let argmax = || logits.iter().enumerate().fold(0, |best, (i, v)| if *v > logits[best] { i } else { best });
    if temperature <= 0.0 {
        return argmax();
    }
    let m = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let w: Vec<f64> = logits.iter().map(|&l| ((l as f64 - m) / temperature).exp()).collect();
    let mut u = rng.uniform() * w.iter().sum::<f64>();
    for (i, wi) in w.iter().enumerate() {
        u -= wi;
        if u <= 0.0 {
            return i;
        }
    }
    argmax()
}
