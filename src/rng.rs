//! Deterministic host random numbers for initialisation and dropout masks.
//!
//! Burn's CPU backends draw from one process-global RNG, which ranks-as-threads would interleave
//! nondeterministically. Parameters are therefore generated on the host from `(seed, name)`: every
//! rank generates the full (unsharded) tensor and keeps its slice, so the shards of a tp=k model are
//! exactly the slices of the tp=1 model (Megatron's `--use-cpu-initialization` does the same).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// How many draws a named random stream has made (e.g. a dropout layer's mask calls): the
/// state a checkpoint saves so that a resumed run draws the same masks. Clones share the count.
#[derive(Debug, Clone)]
pub struct StreamCounter {
    name: String,
    count: Arc<AtomicU64>,
}

impl StreamCounter {
    /// A stream called `name` with no draws yet.
    pub fn new(name: impl Into<String>) -> Self {
        Self { name: name.into(), count: Arc::new(AtomicU64::new(0)) }
    }

    /// The stream's name (unique within a model).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Draws so far.
    pub fn get(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Sets the number of draws (restoring a checkpoint).
    pub fn set(&self, count: u64) {
        self.count.store(count, Ordering::Relaxed)
    }

    /// The number of this draw; counts it.
    pub fn next(&self) -> u64 {
        self.count.fetch_add(1, Ordering::Relaxed)
    }
}

/// A module that draws random numbers during training lists its streams, so that checkpoints
/// can save and restore where each stream is.
pub trait RandomStreams {
    /// Every stream of this module (and its submodules).
    fn random_streams(&self) -> Vec<StreamCounter>;
}

/// A counter-based generator (SplitMix64) seeded from a seed and a stream name.
#[derive(Debug, Clone)]
pub struct HostRng {
    state: u64,
}

impl HostRng {
    /// A stream identified by `seed` and `name` (e.g. a parameter path).
    pub fn new(seed: u64, name: &str) -> Self {
        // FNV-1a of the name, mixed with the seed.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in name.bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        let mut rng = Self { state: h ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) };
        rng.next_u64();
        rng
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// `n` normal samples with standard deviation `std` (Box–Muller).
    pub fn normal_vec(&mut self, n: usize, std: f64) -> Vec<f32> {
        let mut out = Vec::with_capacity(n + 1);
        while out.len() < n {
            let u1 = self.uniform().max(1e-300);
            let u2 = self.uniform();
            let r = (-2.0 * u1.ln()).sqrt() * std;
            let t = 2.0 * std::f64::consts::PI * u2;
            out.push((r * t.cos()) as f32);
            out.push((r * t.sin()) as f32);
        }
        out.truncate(n);
        out
    }

    /// An inverted-dropout mask: `0` with probability `p`, else `1/(1-p)`.
    pub fn dropout_mask(&mut self, n: usize, p: f64) -> Vec<f32> {
        let keep = (1.0 / (1.0 - p)) as f32;
        (0..n).map(|_| if self.uniform() < p { 0.0 } else { keep }).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_reproducible_and_distinct() {
        let a = HostRng::new(7, "w").normal_vec(1000, 1.0);
        assert_eq!(a, HostRng::new(7, "w").normal_vec(1000, 1.0));
        assert_ne!(a, HostRng::new(8, "w").normal_vec(1000, 1.0));
        assert_ne!(a, HostRng::new(7, "v").normal_vec(1000, 1.0));
        let mean = a.iter().map(|v| *v as f64).sum::<f64>() / 1000.0;
        let var = a.iter().map(|v| (*v as f64 - mean).powi(2)).sum::<f64>() / 1000.0;
        assert!(mean.abs() < 0.1 && (var - 1.0).abs() < 0.15, "mean {mean} var {var}");
        let m = HostRng::new(1, "d").dropout_mask(10_000, 0.25);
        let zeros = m.iter().filter(|v| **v == 0.0).count();
        assert!((2200..2800).contains(&zeros), "{zeros}");
    }
}
