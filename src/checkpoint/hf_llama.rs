//! Llama in HuggingFace's layout (`transformers`' `LlamaForCausalLM`: `model.safetensors` and
//! `config.json`) ↔ this crate's export layout, for a GPT built with `--norm rms-norm --position
//! rope --activation swiglu --no-bias [--kv-heads G]`.
//!
//! | ours | HuggingFace | how |
//! | --- | --- | --- |
//! | `wte.weight [V, h]` | `model.embed_tokens.weight [V, h]` | the same (padded rows dropped on export) |
//! | `blocks.N.ln1.gamma` | `model.layers.N.input_layernorm.weight` | the same |
//! | `blocks.N.attn.qkv.weight [h, (H + 2G)·d]` | `…self_attn.{q,k,v}_proj.weight` `[H·d, h]`, `[G·d, h]` | transposed, fused per key/value group ([`crate::qkv`]) |
//! | `blocks.N.attn.output.weight [h, h]` | `…self_attn.o_proj.weight` | transposed (`nn.Linear` is `[out, in]`) |
//! | `blocks.N.ln2.gamma` | `…post_attention_layernorm.weight` | the same |
//! | `blocks.N.mlp.gate.weight [h, f]` | `…mlp.gate_proj.weight [f, h]` | transposed |
//! | `blocks.N.mlp.fc1.weight [h, f]` | `…mlp.up_proj.weight [f, h]` | transposed |
//! | `blocks.N.mlp.fc2.weight [f, h]` | `…mlp.down_proj.weight [h, f]` | transposed |
//! | `ln_f.gamma` | `model.norm.weight` | the same |
//! | `head.weight [h, V]` (untied) | `lm_head.weight [V, h]` | transposed; absent when tied |
//!
//! HuggingFace's rotary embedding rotates the pairs `(x_i, x_{i+d/2})` of the stored q/k
//! projections (its conversion script permutes Meta's weights into that order), as ours does:
//! the weights need no permutation. Llama 3.1's scaled frequencies (`rope_type: "llama3"`, in
//! `rope_scaling` or transformers 5's `rope_parameters`) become the model's
//! [`RopeScaling`] and are written back on export. Refused: another
//! `hidden_act` than `silu`, attention or MLP biases, other RoPE scalings (linear, dynamic,
//! yarn, …), a `head_dim` other than `hidden_size / num_attention_heads`.
//!
//! Mistral (`model_type: mistral`, `MistralForCausalLM`) has the same tensors and is read as
//! Llama where its `sliding_window` is null or no shorter than its context (Mistral 7B v0.2 and
//! v0.3); v0.1's 4096-token window is refused. It exports as Llama.

use std::collections::BTreeMap;

use burn::tensor::TensorData;
use serde::{Deserialize, Serialize};

use super::convert::{build_all, resolve, Recipe, Source};
use super::error::{CheckpointError, Result};
use crate::arch::RopeScaling;

/// The fields of HuggingFace's `LlamaConfig` the conversion reads and writes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HfLlamaConfig {
    /// Width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (`None`: one per query head).
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Blocks.
    pub num_hidden_layers: usize,
    /// Longest context it was trained for.
    pub max_position_embeddings: usize,
    /// Vocabulary (the tokenizer's).
    pub vocab_size: usize,
    /// RMS-norm epsilon (HuggingFace's default 1e-6).
    #[serde(default = "eps")]
    pub rms_norm_eps: f64,
    /// RoPE's base.
    #[serde(default = "theta")]
    pub rope_theta: f64,
    /// `silu` (SwiGLU's gate).
    #[serde(default = "silu")]
    pub hidden_act: String,
    /// Whether the head is the token embedding.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Biases on q/k/v/o (refused when true).
    #[serde(default)]
    pub attention_bias: bool,
    /// Biases on the MLP (refused when true).
    #[serde(default)]
    pub mlp_bias: bool,
    /// RoPE frequency scaling: absent, null, of type `default`, or `llama3` (Llama 3.1); other
    /// types are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<serde_json::Value>,
    /// transformers 5's RoPE settings (`rope_theta`, `rope_type`): read in place of the
    /// top-level fields where present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<serde_json::Value>,
    /// Beginning-of-text token(s) (exported: GPT-2's end-of-text for its vocabulary, Llama 3's
    /// `<|begin_of_text|>` for its, else null, so that no foreign id stops generation).
    #[serde(default)]
    pub bos_token_id: Option<serde_json::Value>,
    /// End-of-text token(s) (a number or a list; as `bos_token_id`).
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
    /// Mistral's attention window (absent or null: full causal attention, as ours; a window
    /// shorter than `max_position_embeddings` is refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<serde_json::Value>,
    /// Head width (must be `hidden_size / num_attention_heads` where given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// `llama`.
    #[serde(default = "llama")]
    pub model_type: String,
    /// `["LlamaForCausalLM"]`.
    #[serde(default)]
    pub architectures: Vec<String>,
}

fn eps() -> f64 {
    1e-6
}
fn theta() -> f64 {
    10000.0
}
fn silu() -> String {
    "silu".into()
}
fn llama() -> String {
    "llama".into()
}

/// `v` where it is a settings object with a type.
fn typed(v: &Option<serde_json::Value>) -> Option<&serde_json::Value> {
    v.as_ref().filter(|v| kind(v).is_some())
}

/// A RoPE settings object's type: `rope_type`, or the older `type`.
fn kind(v: &serde_json::Value) -> Option<String> {
    v.get("rope_type").or_else(|| v.get("type")).and_then(|t| t.as_str()).map(str::to_string)
}

impl HfLlamaConfig {
    /// Key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// RoPE's base: transformers 5's `rope_parameters.rope_theta`, else the top-level field.
    pub fn theta(&self) -> f64 {
        self.rope_parameters.as_ref().and_then(|p| p.get("rope_theta")).and_then(|v| v.as_f64()).unwrap_or(self.rope_theta)
    }

    /// The RoPE scaling's settings (`None`: plain RoPE): `rope_scaling` where it is given (as
    /// transformers reads a legacy config: `rope_scaling or rope_parameters`), else transformers
    /// 5's `rope_parameters`; a type (`rope_type`, or the older `type`) of `default` is plain.
    /// Both given with different settings is refused.
    fn rope_settings(&self) -> Result<Option<&serde_json::Value>> {
        let (legacy, v5) = (typed(&self.rope_scaling), typed(&self.rope_parameters));
        if let (Some(a), Some(b)) = (legacy, v5) {
            let numbers = ["factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"];
            if kind(a) != kind(b) || numbers.iter().any(|k| a.get(k).and_then(|x| x.as_f64()) != b.get(k).and_then(|x| x.as_f64())) {
                return Err(CheckpointError::Invalid(format!("Llama config: rope_scaling {a} and rope_parameters {b} disagree")));
            }
        }
        // A config with no type is GPT-NeoX-era plain RoPE (its `rope_parameters` may hold θ only).
        let any = legacy.or(v5).or(self.rope_scaling.as_ref().filter(|v| !v.is_null()));
        Ok(any.filter(|v| kind(v).as_deref() != Some("default")))
    }

    /// Llama 3.1's frequency scaling where the config asks for it (`rope_type: "llama3"` with
    /// its four numbers; the context a whole number); other scalings (linear, dynamic, yarn, …)
    /// are refused by name.
    pub fn scaling(&self) -> Result<Option<RopeScaling>> {
        let Some(v) = self.rope_settings()? else { return Ok(None) };
        let bad = |why: &str| CheckpointError::Invalid(format!("Llama config: RoPE scaling {v}: {why}"));
        if kind(v).as_deref() != Some("llama3") {
            return Err(bad("only the default and llama3 (Llama 3.1) frequencies are supported"));
        }
        let num = |k: &str| v.get(k).and_then(|x| x.as_f64()).ok_or_else(|| bad(&format!("no number {k}")));
        let context = v.get("original_max_position_embeddings").and_then(|x| x.as_u64().or_else(|| x.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as u64)));
        let scaling = RopeScaling {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: context.ok_or_else(|| bad("no whole number original_max_position_embeddings"))? as usize,
        };
        scaling.validate().map_err(|e| bad(&e.to_string()))?;
        Ok(Some(scaling))
    }

    /// The variants this conversion does not carry are refused, naming the field.
    pub fn check(&self) -> Result<()> {
        self.scaling()?;
        let heads = self.num_attention_heads.max(1);
        let problem = if self.hidden_act != "silu" {
            Some(format!("hidden_act {:?}: only silu (SwiGLU) is supported", self.hidden_act))
        } else if self.attention_bias || self.mlp_bias {
            Some(format!("attention_bias {} / mlp_bias {}: biases are not supported", self.attention_bias, self.mlp_bias))
        } else if self.kv_heads() == 0 || self.num_attention_heads == 0 {
            Some(format!("{} heads with {} key/value heads", self.num_attention_heads, self.kv_heads()))
        } else if let Some(w) = self.sliding_window.as_ref().filter(|w| !w.is_null() && w.as_u64().is_none_or(|w| (w as usize) < self.max_position_embeddings))
        {
            Some(format!(
                "sliding_window {w} below max_position_embeddings {}: attention over a sliding window is not supported (full causal attention differs past the window)",
                self.max_position_embeddings
            ))
        } else if self.head_dim.is_some_and(|d| d * heads != self.hidden_size) {
            Some(format!("head_dim {:?} is not hidden_size {} / {heads} heads", self.head_dim, self.hidden_size))
        } else if !self.num_attention_heads.is_multiple_of(self.kv_heads()) || !self.hidden_size.is_multiple_of(heads) {
            Some(format!("{} heads of {} key/value heads in width {}", self.num_attention_heads, self.kv_heads(), self.hidden_size))
        } else {
            None
        };
        problem.map_or(Ok(()), |p| Err(CheckpointError::Invalid(format!("Llama config: {p}"))))
    }

    /// This config as `GptConfig`'s fields (our export's `burn_parallel_model`).
    pub fn to_model_json(&self) -> Result<serde_json::Value> {
        self.check()?;
        Ok(serde_json::json!({
            "vocab_size": self.vocab_size,
            "max_seq_len": self.max_position_embeddings,
            "d_model": self.hidden_size,
            "n_heads": self.num_attention_heads,
            "kv_heads": (self.kv_heads() != self.num_attention_heads).then_some(self.kv_heads()),
            "n_layers": self.num_hidden_layers,
            "d_ff": self.intermediate_size,
            "layer_norm_eps": self.rms_norm_eps,
            "tie_embeddings": self.tie_word_embeddings,
            "activation": "SwiGlu",
            "norm": "RmsNorm",
            "position": "Rope",
            "rope_theta": self.theta(),
            "rope_scaling": self.scaling()?,
            "bias": false,
        }))
    }

    /// Whether the `GptConfig` JSON `model` is Llama-style (RMS norms, RoPE, SwiGLU, no biases).
    pub fn is_llama_style(model: &serde_json::Value) -> bool {
        let text = |k: &str| model.get(k).and_then(|v| v.as_str()).unwrap_or("").to_string();
        [("norm", "RmsNorm"), ("position", "Rope"), ("activation", "SwiGlu")].iter().all(|(k, v)| text(k) == *v)
            && model.get("bias").and_then(|v| v.as_bool()) == Some(false)
    }

    /// The config of a model whose `GptConfig` JSON is `model` (the tokenizer's vocabulary,
    /// `vocab_used`, not the padded one); a model that is not Llama-style is refused.
    pub fn from_model_json(model: &serde_json::Value) -> Result<Self> {
        if !Self::is_llama_style(model) {
            return Err(CheckpointError::Invalid(
                "the model is not Llama-style (it needs --norm rms-norm --position rope --activation swiglu --no-bias)".into(),
            ));
        }
        let field =
            |k: &str| model.get(k).and_then(|v| v.as_u64()).map(|v| v as usize).ok_or_else(|| CheckpointError::Invalid(format!("the model config has no {k}")));
        let heads = field("n_heads")?;
        let vocab = model.get("vocab_used").and_then(|v| v.as_u64()).map(|v| v as usize).map_or_else(|| field("vocab_size"), Ok)?;
        // GPT-2's end-of-text for its vocabulary, Llama 3's <|begin_of_text|>/<|end_of_text|> for
        // its; no id otherwise (LlamaConfig's defaults, 1 and 2, would stop generation at
        // ordinary tokens of ours).
        let (begin, end) = match vocab {
            50257 => (serde_json::json!(50256), serde_json::json!(50256)),
            128256 => (serde_json::json!(128000), serde_json::json!(128001)),
            _ => (serde_json::Value::Null, serde_json::Value::Null),
        };
        let rope_scaling = Self::scaling_json(model)?;
        // Scaled RoPE: at least the scaled context, factor × original (HuggingFace warns unless
        // above the original).
        let scaled = |v: &serde_json::Value| Some(v["original_max_position_embeddings"].as_u64()? as f64 * v["factor"].as_f64()?);
        let original = rope_scaling.as_ref().and_then(scaled).unwrap_or(0.0) as usize;
        Ok(Self {
            hidden_size: field("d_model")?,
            intermediate_size: field("d_ff")?,
            num_attention_heads: heads,
            num_key_value_heads: Some(model.get("kv_heads").and_then(|v| v.as_u64()).map_or(heads, |v| v as usize)),
            num_hidden_layers: field("n_layers")?,
            max_position_embeddings: field("max_seq_len")?.max(original),
            vocab_size: vocab,
            rms_norm_eps: model.get("layer_norm_eps").and_then(|v| v.as_f64()).unwrap_or(1e-5),
            rope_theta: model.get("rope_theta").and_then(|v| v.as_f64()).unwrap_or(10000.0),
            hidden_act: silu(),
            tie_word_embeddings: model.get("tie_embeddings").and_then(|v| v.as_bool()).unwrap_or(false),
            attention_bias: false,
            mlp_bias: false,
            rope_scaling,
            rope_parameters: None,
            bos_token_id: Some(begin),
            eos_token_id: Some(end),
            sliding_window: None,
            head_dim: None,
            model_type: llama(),
            architectures: vec!["LlamaForCausalLM".into()],
        })
    }

    /// `rope_scaling` as HuggingFace writes it (`rope_type: "llama3"`) from a `GptConfig`'s.
    fn scaling_json(model: &serde_json::Value) -> Result<Option<serde_json::Value>> {
        let Some(v) = model.get("rope_scaling").filter(|v| !v.is_null()) else { return Ok(None) };
        let scaling: RopeScaling = serde_json::from_value(v.clone()).map_err(|e| CheckpointError::Invalid(format!("the model's rope_scaling {v}: {e}")))?;
        let mut out = serde_json::to_value(scaling).expect("scaling serialises");
        out["rope_type"] = serde_json::json!("llama3");
        Ok(Some(out))
    }

    /// The `gpt_pretrain` flags of this model (its context length is not one: RoPE has no
    /// position table, pick `--seq-len`).
    pub fn flags(&self) -> String {
        let mut f = format!(
            "--d-model {} --heads {} --layers {} --d-ff {} --norm rms-norm --position rope --rope-theta {} --activation swiglu --no-bias",
            self.hidden_size,
            self.num_attention_heads,
            self.num_hidden_layers,
            self.intermediate_size,
            self.theta()
        );
        if self.kv_heads() != self.num_attention_heads {
            f += &format!(" --kv-heads {}", self.kv_heads());
        }
        if let Ok(Some(scaling)) = self.scaling() {
            f += &format!(" --rope-scaling {scaling}");
        }
        if self.rms_norm_eps != 1e-5 {
            f += &format!(" --norm-eps {:e}", self.rms_norm_eps);
        }
        if self.tie_word_embeddings {
            f += " --tie-embeddings";
        }
        f
    }
}

/// Renames of one block's tensors that are transposed: (ours, HuggingFace's, under
/// `model.layers.N.`).
const LINEARS: [(&str, &str); 4] = [
    ("attn.output.weight", "self_attn.o_proj.weight"),
    ("mlp.gate.weight", "mlp.gate_proj.weight"),
    ("mlp.fc1.weight", "mlp.up_proj.weight"),
    ("mlp.fc2.weight", "mlp.down_proj.weight"),
];

/// Renames kept as they are.
const NORMS: [(&str, &str); 2] = [("ln1.gamma", "input_layernorm.weight"), ("ln2.gamma", "post_attention_layernorm.weight")];

/// How each of our tensors (export names) is made from HuggingFace's in `src` (names with or
/// without `model.`).
pub fn import_plan(config: &HfLlamaConfig, src: &dyn Source) -> Result<Vec<(String, Recipe)>> {
    config.check()?;
    let name = |n: &str| {
        let missing = || format!("the HuggingFace Llama has no tensor {n} (config: {} layers)", config.num_hidden_layers);
        resolve(src, &[n.to_string(), n.strip_prefix("model.").unwrap_or(n).to_string()], missing)
    };
    let (heads, groups) = (config.num_attention_heads, config.kv_heads());
    let mut plan = vec![
        ("wte.weight".to_string(), Recipe::Copy(name("model.embed_tokens.weight")?)),
        ("ln_f.gamma".to_string(), Recipe::Copy(name("model.norm.weight")?)),
    ];
    for n in 0..config.num_hidden_layers {
        let layer = format!("model.layers.{n}.");
        for (ours, theirs) in NORMS {
            plan.push((format!("blocks.{n}.{ours}"), Recipe::Copy(name(&format!("{layer}{theirs}"))?)));
        }
        for (ours, theirs) in LINEARS {
            plan.push((format!("blocks.{n}.{ours}"), Recipe::Transpose(name(&format!("{layer}{theirs}"))?)));
        }
        let [q, k, v] = ["q", "k", "v"].map(|p| name(&format!("{layer}self_attn.{p}_proj.weight")));
        plan.push((format!("blocks.{n}.attn.qkv.weight"), Recipe::FuseQkv { q: q?, k: k?, v: v?, heads, groups }));
    }
    if !config.tie_word_embeddings {
        plan.push(("head.weight".into(), Recipe::Transpose(name("lm_head.weight")?)));
    }
    Ok(plan)
}

/// Our tensors (export names) of HuggingFace's `tensors` (names with or without `model.`), in
/// memory ([`super::hf::import_hf`] streams them to a file instead).
pub fn from_hf(tensors: &BTreeMap<String, TensorData>, config: &HfLlamaConfig) -> Result<BTreeMap<String, TensorData>> {
    build_all(&import_plan(config, tensors)?, tensors)
}

/// How each of HuggingFace's tensors (`save_pretrained`'s names: `model.` but for
/// `lm_head.weight`) is made from our export's (names without `model.`) for model config
/// `model`, and HuggingFace's config; padded vocabulary rows dropped.
pub fn export_plan(model: &serde_json::Value) -> Result<(Vec<(String, Recipe)>, HfLlamaConfig)> {
    let config = HfLlamaConfig::from_model_json(model)?;
    let vocab = |of: Recipe| Recipe::Rows { of: Box::new(of), n: config.vocab_size };
    let (heads, groups) = (config.num_attention_heads, config.kv_heads());
    let mut plan = vec![
        ("model.embed_tokens.weight".to_string(), vocab(Recipe::Copy("wte.weight".into()))),
        ("model.norm.weight".to_string(), Recipe::Copy("ln_f.gamma".into())),
    ];
    for n in 0..config.num_hidden_layers {
        let layer = format!("model.layers.{n}.");
        for (ours, theirs) in NORMS {
            plan.push((format!("{layer}{theirs}"), Recipe::Copy(format!("blocks.{n}.{ours}"))));
        }
        for (ours, theirs) in LINEARS {
            plan.push((format!("{layer}{theirs}"), Recipe::Transpose(format!("blocks.{n}.{ours}"))));
        }
        for (part, p) in ["q", "k", "v"].iter().enumerate() {
            let recipe = Recipe::SplitQkv { name: format!("blocks.{n}.attn.qkv.weight"), heads, groups, part };
            plan.push((format!("{layer}self_attn.{p}_proj.weight"), recipe));
        }
    }
    if !config.tie_word_embeddings {
        plan.push(("lm_head.weight".into(), vocab(Recipe::Transpose("head.weight".into()))));
    }
    Ok((plan, config))
}

/// HuggingFace's tensors and config of our export's `tensors` with model config `model`, in
/// memory ([`super::hf::export_hf`] streams them to a file instead).
pub fn to_hf(tensors: &BTreeMap<String, TensorData>, model: &serde_json::Value) -> Result<(BTreeMap<String, TensorData>, HfLlamaConfig)> {
    let (plan, config) = export_plan(model)?;
    Ok((build_all(&plan, tensors)?, config))
}
