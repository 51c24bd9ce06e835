//! Named model shapes: GPT-2's four sizes (Radford et al. 2019; HuggingFace's `gpt2`…`gpt2-xl`
//! configs) and Llama 3's (Meta's `Llama-3.2-1B`, `-3B`, `Llama-3.1-8B`, `-70B`, `-405B`
//! `config.json`: grouped-query attention with 8 key/value heads, SwiGLU, RMS norms, RoPE with
//! θ = 500000 and Llama 3.1's frequency scaling, vocabulary 128256), for
//! `gpt_pretrain --model` and `burn-parallel memory --model`.
//!
//! ```
//! use burn_parallel::presets::ModelPreset;
//! let p: ModelPreset = "llama3.1-8b".parse().unwrap();
//! let shape = p.values().shape(4096);
//! assert_eq!((shape.hidden, shape.layers, shape.arch.kv_heads), (4096, 32, Some(8)));
//! assert_eq!(burn_parallel::memory::model::parameter_count(&shape), 8_030_261_248.0);
//! ```

use crate::activation::Activation;
use crate::arch::{Arch, RopeScaling, UnknownChoice};
use crate::memory::GptShape;

/// A named model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum ModelPreset {
    /// The example's default: d 128, 4 layers, 4 heads, context 64, byte tokens.
    Tiny,
    /// GPT-2 small: d 768, 12 layers, 12 heads.
    Gpt2_124m,
    /// GPT-2 medium: d 1024, 24 layers, 16 heads.
    Gpt2_350m,
    /// GPT-2 large: d 1280, 36 layers, 20 heads.
    Gpt2_774m,
    /// GPT-2 XL: d 1600, 48 layers, 25 heads.
    Gpt2_1_5b,
    /// Llama 3.2 1B: d 2048, 16 layers, 32 heads, tied embeddings.
    Llama3_2_1b,
    /// Llama 3.2 3B: d 3072, 28 layers, 24 heads, tied embeddings.
    Llama3_2_3b,
    /// Llama 3.1 8B: d 4096, 32 layers, 32 heads.
    Llama3_1_8b,
    /// Llama 3.1 70B: d 8192, 80 layers, 64 heads.
    Llama3_1_70b,
    /// Llama 3.1 405B: d 16384, 126 layers, 128 heads.
    Llama3_1_405b,
}

/// The Llama-style parts of a preset (Llama 3's block).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LlamaValues {
    /// Key/value heads (grouped-query attention).
    pub kv_heads: usize,
    /// RoPE's base.
    pub rope_theta: f64,
    /// Llama 3.1's long-context scaling (factor 8; 32 for Llama 3.2).
    pub rope_scaling: RopeScaling,
}

/// What a preset sets.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PresetValues {
    /// Width.
    pub d_model: usize,
    /// Blocks.
    pub layers: usize,
    /// Attention heads.
    pub heads: usize,
    /// MLP width.
    pub d_ff: usize,
    /// The model's own vocabulary (GPT-2's BPE: 50257; Llama 3's: 128256; byte tokens: 256).
    pub vocab: usize,
    /// Training context (GPT-2: 1024; Llama 3 pretrained at 8192).
    pub seq_len: usize,
    /// Tied embeddings.
    pub tie_embeddings: bool,
    /// The norms' ε.
    pub norm_eps: f64,
    /// Sequences per step per replica (the example's default for the size).
    pub batch_size: usize,
    /// Peak learning rate: GPT-3's for GPT-2's sizes (Brown et al. 2020, table 2.1); torchtitan's
    /// Llama 3 recipes (8B 3e-4, 70B 1.5e-4, 405B 8e-5, as the Llama 3 paper's); 1B and 3B
    /// take the 8B's.
    pub lr: f64,
    /// Llama's block (RMS norms, RoPE, SwiGLU, no biases, grouped-query attention); `None`:
    /// GPT-2's.
    pub llama: Option<LlamaValues>,
}

const NAMES: [(ModelPreset, &str); 10] = [
    (ModelPreset::Tiny, "tiny"),
    (ModelPreset::Gpt2_124m, "gpt2-124m"),
    (ModelPreset::Gpt2_350m, "gpt2-350m"),
    (ModelPreset::Gpt2_774m, "gpt2-774m"),
    (ModelPreset::Gpt2_1_5b, "gpt2-1.5b"),
    (ModelPreset::Llama3_2_1b, "llama3.2-1b"),
    (ModelPreset::Llama3_2_3b, "llama3.2-3b"),
    (ModelPreset::Llama3_1_8b, "llama3.1-8b"),
    (ModelPreset::Llama3_1_70b, "llama3.1-70b"),
    (ModelPreset::Llama3_1_405b, "llama3.1-405b"),
];

/// Every preset's name, as the flags take them.
pub const PRESET_NAMES: &str = "tiny, gpt2-124m, gpt2-350m, gpt2-774m, gpt2-1.5b, llama3.2-1b, llama3.2-3b, llama3.1-8b, llama3.1-70b, llama3.1-405b";

impl ModelPreset {
    /// Every preset.
    pub fn all() -> impl Iterator<Item = ModelPreset> {
        NAMES.iter().map(|(p, _)| *p)
    }

    /// The preset's numbers.
    pub fn values(self) -> PresetValues {
        let gpt2 = |d_model, layers, heads, lr| PresetValues {
            d_model,
            layers,
            heads,
            d_ff: 4 * d_model,
            vocab: 50257,
            seq_len: 1024,
            tie_embeddings: false,
            norm_eps: 1e-5,
            batch_size: 8,
            lr,
            llama: None,
        };
        let llama = |d_model, layers, heads, d_ff, tied, factor, lr| PresetValues {
            d_model,
            layers,
            heads,
            d_ff,
            vocab: 128256,
            seq_len: 8192,
            tie_embeddings: tied,
            norm_eps: 1e-5,
            batch_size: 8,
            lr,
            llama: Some(LlamaValues { kv_heads: 8, rope_theta: 500000.0, rope_scaling: RopeScaling { factor, ..RopeScaling::LLAMA3_1 } }),
        };
        match self {
            Self::Tiny => PresetValues { vocab: 256, seq_len: 64, batch_size: 16, ..gpt2(128, 4, 4, 3e-3) },
            Self::Gpt2_124m => gpt2(768, 12, 12, 6e-4),
            Self::Gpt2_350m => gpt2(1024, 24, 16, 3e-4),
            Self::Gpt2_774m => gpt2(1280, 36, 20, 2.5e-4),
            Self::Gpt2_1_5b => gpt2(1600, 48, 25, 2e-4),
            Self::Llama3_2_1b => llama(2048, 16, 32, 8192, true, 32.0, 3e-4),
            Self::Llama3_2_3b => llama(3072, 28, 24, 8192, true, 32.0, 3e-4),
            Self::Llama3_1_8b => llama(4096, 32, 32, 14336, false, 8.0, 3e-4),
            Self::Llama3_1_70b => llama(8192, 80, 64, 28672, false, 8.0, 1.5e-4),
            Self::Llama3_1_405b => llama(16384, 126, 128, 53248, false, 8.0, 8e-5),
        }
    }
}

impl PresetValues {
    /// The memory model's shape of this preset at `seq` tokens per sequence, with its own
    /// vocabulary.
    pub fn shape(&self, seq: usize) -> GptShape {
        let arch = match self.llama {
            Some(l) => Arch { kv_heads: Some(l.kv_heads), ..Arch::LLAMA },
            None => Arch::GPT2,
        };
        GptShape {
            vocab: self.vocab,
            seq,
            hidden: self.d_model,
            heads: self.heads,
            layers: self.layers,
            ffn: self.d_ff,
            tied_embeddings: self.tie_embeddings,
            activation: if self.llama.is_some() { Activation::SwiGlu } else { Activation::Gelu },
            arch,
        }
    }
}

impl std::str::FromStr for ModelPreset {
    type Err = UnknownChoice;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        NAMES.iter().find(|(_, n)| *n == s).map(|(p, _)| *p).ok_or_else(|| UnknownChoice { what: "model", got: s.into(), choices: PRESET_NAMES })
    }
}

impl std::fmt::Display for ModelPreset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(NAMES.iter().find(|(p, _)| p == self).map(|(_, n)| *n).expect("every preset is named"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::model::parameter_count;

    /// Each preset's parameter count (the memory model's, which `tests/memory.rs` checks against
    /// the model's own) is the published one: HuggingFace's GPT-2 checkpoints (124,439,808 …
    /// 1,557,611,200 with tied embeddings; ours untied adds `V·h`) and Llama 3's (1.24B, 3.21B,
    /// 8.03B, 70.6B, 405.9B).
    #[test]
    fn presets_have_the_published_parameter_counts() {
        let untied_head = |p: ModelPreset| (p.values().vocab * p.values().d_model) as f64;
        for (p, published) in [
            (ModelPreset::Gpt2_124m, 124_439_808.0),
            (ModelPreset::Gpt2_350m, 354_823_168.0),
            (ModelPreset::Gpt2_774m, 774_030_080.0),
            (ModelPreset::Gpt2_1_5b, 1_557_611_200.0),
        ] {
            let v = p.values();
            assert_eq!(parameter_count(&v.shape(v.seq_len)), published + untied_head(p), "{p}");
        }
        for (p, published) in [
            (ModelPreset::Llama3_2_1b, 1_235_814_400.0),
            (ModelPreset::Llama3_2_3b, 3_212_749_824.0),
            (ModelPreset::Llama3_1_8b, 8_030_261_248.0),
            (ModelPreset::Llama3_1_70b, 70_553_706_496.0),
            (ModelPreset::Llama3_1_405b, 405_853_388_800.0),
        ] {
            let v = p.values();
            assert_eq!(parameter_count(&v.shape(v.seq_len)), published, "{p}");
        }
    }

    /// Each Llama preset's block as Meta's config.json has it: 8 key/value heads, θ 500000,
    /// scaling factor 32 for 3.2 and 8 for 3.1 (low 1, high 4, original 8192), ε 1e-5, tied
    /// for 3.2 only; and its learning rate.
    #[test]
    fn llama_presets_have_metas_rope_and_norms() {
        for (p, factor, tied, lr) in [
            (ModelPreset::Llama3_2_1b, 32.0, true, 3e-4),
            (ModelPreset::Llama3_2_3b, 32.0, true, 3e-4),
            (ModelPreset::Llama3_1_8b, 8.0, false, 3e-4),
            (ModelPreset::Llama3_1_70b, 8.0, false, 1.5e-4),
            (ModelPreset::Llama3_1_405b, 8.0, false, 8e-5),
        ] {
            let v = p.values();
            let l = v.llama.expect("a Llama block");
            let scaling = RopeScaling { factor, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 8192 };
            assert_eq!((l.kv_heads, l.rope_theta, l.rope_scaling, v.norm_eps, v.tie_embeddings, v.lr), (8, 500000.0, scaling, 1e-5, tied, lr), "{p}");
            assert_eq!((v.vocab, v.seq_len), (128256, 8192), "{p}");
        }
        assert!(ModelPreset::all().filter(|p| p.values().llama.is_none()).all(|p| p.values().d_ff == 4 * p.values().d_model));
    }

    #[test]
    fn names_round_trip_and_unknown_names_list_the_choices() {
        for p in ModelPreset::all() {
            assert_eq!(p.to_string().parse::<ModelPreset>(), Ok(p));
        }
        let e = "llama2-7b".parse::<ModelPreset>().unwrap_err().to_string();
        assert!(e.starts_with("unknown model \"llama2-7b\" (choose tiny, gpt2-124m") && e.contains("llama3.1-405b"), "{e}");
    }
}
