//! GPT-2 in HuggingFace's layout (`transformers`' `GPT2LMHeadModel`: the `model.safetensors` and
//! `config.json` of the `gpt2` hub repositories) ↔ this crate's export layout
//! ([`export_model`](super::export_model), what `--init-from` reads).
//!
//! | ours | HuggingFace | how |
//! | --- | --- | --- |
//! | `wte.weight [V, h]` | `wte.weight [V, h]` | the same (ours: padded rows dropped on export) |
//! | `wpe [s, h]` | `wpe.weight [s, h]` | the same |
//! | `blocks.N.ln1.{gamma,beta}` | `h.N.ln_1.{weight,bias}` | the same |
//! | `blocks.N.attn.qkv.weight [h, 3h]` | `h.N.attn.c_attn.weight [h, 3h]` | columns `[q k v]` ↔ grouped per head `[q_j k_j v_j]` |
//! | `blocks.N.attn.qkv.bias [3h]` | `h.N.attn.c_attn.bias` | likewise |
//! | `blocks.N.attn.output.{weight,bias}` | `h.N.attn.c_proj.{weight,bias}` | the same (`Conv1D` is `[in, out]`, as Burn) |
//! | `blocks.N.ln2.{gamma,beta}` | `h.N.ln_2.{weight,bias}` | the same |
//! | `blocks.N.mlp.fc1.{weight,bias}` | `h.N.mlp.c_fc.{weight,bias}` | the same |
//! | `blocks.N.mlp.fc2.{weight,bias}` | `h.N.mlp.c_proj.{weight,bias}` | the same |
//! | `ln_f.{gamma,beta}` | `ln_f.{weight,bias}` | the same |
//! | `head.weight [h, V]` (untied) | `lm_head.weight [V, h]` | transposed; absent when tied (GPT-2's own) |
//!
//! HuggingFace's names may carry `transformer.` (the export writes it, as `save_pretrained`
//! does: everything but `lm_head.weight` belongs to `GPT2LMHeadModel.transformer`); its
//! causal-mask buffers (`h.N.attn.bias`, `h.N.attn.masked_bias`) are not parameters and are
//! skipped. Attention variants GPT-2 does not use (`scale_attn_weights: false`,
//! `scale_attn_by_inverse_layer_idx: true`) are refused. The model config travels as
//! `config.json` there and as `__metadata__.burn_parallel_model` here (the fields of
//! `GptConfig`). GPT-2 computes its MLP with the tanh GeLU (`activation_function: gelu_new`):
//! run an imported model with `--activation gelu-tanh` (the imported config says so).
//!
//! A `config.json` whose `model_type` is `llama` is read as Llama ([`super::hf_llama`]), and a
//! Llama-style model exports as one: [`import_hf`] and [`export_hf`] take either ([`HfConfig`]).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use burn::tensor::TensorData;
use serde::{Deserialize, Serialize};

use super::convert::{build_all, resolve, write_plan, HfFiles, Recipe, Source};
use super::error::{CheckpointError, Result};
use super::hf_llama::HfLlamaConfig;
use super::read::Checkpoint;
use crate::activation::Activation;

/// A HuggingFace model's config: GPT-2 or Llama.
#[derive(Debug, Clone, PartialEq)]
pub enum HfConfig {
    /// `GPT2LMHeadModel`.
    Gpt2(HfGpt2Config),
    /// `LlamaForCausalLM`.
    Llama(HfLlamaConfig),
}

impl HfConfig {
    /// The `gpt_pretrain` flags of the model (and its tokenizer where it is one of ours).
    pub fn flags(&self) -> Result<String> {
        let (flags, vocab) = match self {
            Self::Gpt2(c) => (c.flags()?, c.vocab_size),
            Self::Llama(c) => (c.flags(), c.vocab_size),
        };
        let tokenizer = match vocab {
            50257 => " --tokenizer gpt2",
            256 => " --tokenizer byte",
            128256 => " --tokenizer llama3:PATH (Llama 3's tokenizer.model: the hub repository's original/tokenizer.model)",
            _ => " (a vocabulary of none of the tokenizers: gpt_pretrain cannot feed it)",
        };
        Ok(format!("{flags}{tokenizer}"))
    }

    /// One line: the architecture and its sizes.
    pub fn describe(&self) -> String {
        match self {
            Self::Gpt2(c) => format!("GPT-2: {} layers, width {}, {} heads, vocabulary {}", c.n_layer, c.n_embd, c.n_head, c.vocab_size),
            Self::Llama(c) => format!(
                "Llama: {} layers, width {}, {} heads ({} key/value), vocabulary {}",
                c.num_hidden_layers,
                c.hidden_size,
                c.num_attention_heads,
                c.kv_heads(),
                c.vocab_size
            ),
        }
    }
}

/// The fields of HuggingFace's `GPT2Config` the conversion reads and writes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HfGpt2Config {
    /// Width.
    pub n_embd: usize,
    /// Attention heads.
    pub n_head: usize,
    /// Blocks.
    pub n_layer: usize,
    /// Positions (context).
    pub n_positions: usize,
    /// Vocabulary (the tokenizer's: no padding).
    pub vocab_size: usize,
    /// MLP width (`None`: 4 × n_embd).
    #[serde(default)]
    pub n_inner: Option<usize>,
    /// `gelu_new` (tanh, GPT-2's) or `gelu`.
    #[serde(default = "gelu_new")]
    pub activation_function: String,
    /// Layer-norm epsilon.
    #[serde(default = "eps")]
    pub layer_norm_epsilon: f64,
    /// Whether the head is the token embedding (GPT-2: yes).
    #[serde(default = "yes")]
    pub tie_word_embeddings: bool,
    /// `gpt2`.
    #[serde(default = "gpt2")]
    pub model_type: String,
    /// `["GPT2LMHeadModel"]`.
    #[serde(default)]
    pub architectures: Vec<String>,
    /// Scores scaled by `1/√d_head` (GPT-2: yes; ours always).
    #[serde(default = "yes")]
    pub scale_attn_weights: bool,
    /// Scores further scaled by `1/(layer + 1)` (GPT-2: no; ours never).
    #[serde(default)]
    pub scale_attn_by_inverse_layer_idx: bool,
    /// Beginning-of-text token (GPT-2's `<|endoftext|>` 50256; none for other vocabularies).
    #[serde(default)]
    pub bos_token_id: Option<usize>,
    /// End-of-text token (as `bos_token_id`).
    #[serde(default)]
    pub eos_token_id: Option<usize>,
}

fn gelu_new() -> String {
    "gelu_new".into()
}
fn eps() -> f64 {
    1e-5
}
fn yes() -> bool {
    true
}
fn gpt2() -> String {
    "gpt2".into()
}

impl HfGpt2Config {
    /// The `gpt_pretrain` flags of this model.
    pub fn flags(&self) -> Result<String> {
        let tied = if self.tie_word_embeddings { " --tie-embeddings" } else { "" };
        let act = if self.activation()? == Activation::GeluTanh { " --activation gelu-tanh" } else { "" };
        Ok(format!(
            "--d-model {} --heads {} --layers {} --d-ff {} --seq-len {}{tied}{act}",
            self.n_embd,
            self.n_head,
            self.n_layer,
            self.n_inner.unwrap_or(4 * self.n_embd),
            self.n_positions
        ))
    }

    /// The activation it names.
    pub fn activation(&self) -> Result<Activation> {
        match self.activation_function.as_str() {
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Activation::GeluTanh),
            "gelu" => Ok(Activation::Gelu),
            other => Err(CheckpointError::Invalid(format!("activation_function {other:?}: only gelu_new (tanh) and gelu are supported"))),
        }
    }

    /// This config as `GptConfig`'s fields (the JSON our export's `burn_parallel_model` holds);
    /// attention variants GPT-2 does not use are refused.
    pub fn to_model_json(&self) -> Result<serde_json::Value> {
        if !self.scale_attn_weights || self.scale_attn_by_inverse_layer_idx {
            return Err(CheckpointError::Invalid(format!(
                "scale_attn_weights {} / scale_attn_by_inverse_layer_idx {}: only GPT-2's attention (true / false) is supported",
                self.scale_attn_weights, self.scale_attn_by_inverse_layer_idx
            )));
        }
        Ok(serde_json::json!({
            "vocab_size": self.vocab_size,
            "max_seq_len": self.n_positions,
            "d_model": self.n_embd,
            "n_heads": self.n_head,
            "n_layers": self.n_layer,
            "d_ff": self.n_inner.unwrap_or(4 * self.n_embd),
            "layer_norm_eps": self.layer_norm_epsilon,
            "tie_embeddings": self.tie_word_embeddings,
            "activation": self.activation()?,
        }))
    }

    /// The config of a model whose `GptConfig` JSON (our export's `burn_parallel_model`) is
    /// `model`; the vocabulary is the tokenizer's (`vocab_used`), not the padded one.
    pub fn from_model_json(model: &serde_json::Value) -> Result<Self> {
        let field =
            |k: &str| model.get(k).and_then(|v| v.as_u64()).map(|v| v as usize).ok_or_else(|| CheckpointError::Invalid(format!("the model config has no {k}")));
        let activation: Activation = model
            .get("activation")
            .map(|v| serde_json::from_value(v.clone()))
            .transpose()
            .map_err(|e| CheckpointError::Invalid(format!("activation: {e}")))?
            .unwrap_or_default();
        refuse_non_gpt2(model, activation)?;
        Ok(Self {
            n_embd: field("d_model")?,
            n_head: field("n_heads")?,
            n_layer: field("n_layers")?,
            n_positions: field("max_seq_len")?,
            vocab_size: model.get("vocab_used").and_then(|v| v.as_u64()).map(|v| v as usize).map_or_else(|| field("vocab_size"), Ok)?,
            n_inner: Some(field("d_ff")?),
            activation_function: activation.hf_name().into(),
            layer_norm_epsilon: model.get("layer_norm_eps").and_then(|v| v.as_f64()).unwrap_or(1e-5),
            tie_word_embeddings: model.get("tie_embeddings").and_then(|v| v.as_bool()).unwrap_or(false),
            model_type: gpt2(),
            architectures: vec!["GPT2LMHeadModel".into()],
            scale_attn_weights: true,
            scale_attn_by_inverse_layer_idx: false,
            bos_token_id: None,
            eos_token_id: None,
        })
        .map(|mut c| {
            // GPT-2's vocabulary: its <|endoftext|> (HuggingFace's default); none elsewhere.
            let end = (c.vocab_size == 50257).then_some(50256);
            (c.bos_token_id, c.eos_token_id) = (end, end);
            c
        })
    }
}

/// GPT-2 has layer norms, a learned position embedding, biases and a GeLU: a model with RMS
/// norms, RoPE, no biases or SwiGLU (a Llama-style model) has no `GPT2LMHeadModel` form.
fn refuse_non_gpt2(model: &serde_json::Value, activation: Activation) -> Result<()> {
    let text = |k: &str, default: &str| model.get(k).and_then(|v| v.as_str()).unwrap_or(default).to_string();
    let mut other = Vec::new();
    if text("norm", "LayerNorm") != "LayerNorm" {
        other.push("RMS norms".to_string());
    }
    if text("position", "Learned") != "Learned" {
        other.push("rotary position embedding".into());
    }
    if model.get("bias").and_then(|v| v.as_bool()) == Some(false) {
        other.push("no biases".into());
    }
    if activation.gated() {
        other.push(format!("--activation {activation}"));
    }
    let heads = model.get("n_heads").and_then(|v| v.as_u64());
    if let Some(kv) = model.get("kv_heads").and_then(|v| v.as_u64()).filter(|&kv| Some(kv) != heads) {
        other.push(format!("{kv} key/value heads"));
    }
    match other.is_empty() {
        true => Ok(()),
        false => Err(CheckpointError::Invalid(format!("the model is not a GPT-2 ({}): HuggingFace's GPT2LMHeadModel has no such layers", other.join(", ")))),
    }
}

/// Renames of one block's tensors: (ours, HuggingFace's), regrouped q/k/v aside.
const BLOCK: [(&str, &str); 10] = [
    ("ln1.gamma", "ln_1.weight"),
    ("ln1.beta", "ln_1.bias"),
    ("attn.output.weight", "attn.c_proj.weight"),
    ("attn.output.bias", "attn.c_proj.bias"),
    ("ln2.gamma", "ln_2.weight"),
    ("ln2.beta", "ln_2.bias"),
    ("mlp.fc1.weight", "mlp.c_fc.weight"),
    ("mlp.fc1.bias", "mlp.c_fc.bias"),
    ("mlp.fc2.weight", "mlp.c_proj.weight"),
    ("mlp.fc2.bias", "mlp.c_proj.bias"),
];

/// Renames outside the blocks.
const TOP: [(&str, &str); 4] = [("wte.weight", "wte.weight"), ("wpe", "wpe.weight"), ("ln_f.gamma", "ln_f.weight"), ("ln_f.beta", "ln_f.bias")];

/// How each of our tensors (export names, no `model.` prefix) is made from HuggingFace's in
/// `src` (names with or without `transformer.`) for `config`.
pub fn import_plan(config: &HfGpt2Config, src: &dyn Source) -> Result<Vec<(String, Recipe)>> {
    let name = |n: &str| {
        let missing = || format!("the HuggingFace GPT-2 has no tensor {n} (config: {} layers)", config.n_layer);
        resolve(src, &[n.to_string(), format!("transformer.{n}")], missing)
    };
    let mut plan = Vec::new();
    for (ours, theirs) in TOP {
        plan.push((ours.to_string(), Recipe::Copy(name(theirs)?)));
    }
    for n in 0..config.n_layer {
        for (ours, theirs) in BLOCK {
            plan.push((format!("blocks.{n}.{ours}"), Recipe::Copy(name(&format!("h.{n}.{theirs}"))?)));
        }
        for field in ["weight", "bias"] {
            let recipe = Recipe::Regroup { name: name(&format!("h.{n}.attn.c_attn.{field}"))?, heads: config.n_head };
            plan.push((format!("blocks.{n}.attn.qkv.{field}"), recipe));
        }
    }
    if !config.tie_word_embeddings {
        plan.push(("head.weight".into(), Recipe::Transpose(name("lm_head.weight")?)));
    }
    Ok(plan)
}

/// Our tensors (export names, no `model.` prefix) of HuggingFace's `tensors` for `config`, in
/// memory ([`import_hf`] streams them to a file instead).
pub fn from_hf(tensors: &BTreeMap<String, TensorData>, config: &HfGpt2Config) -> Result<BTreeMap<String, TensorData>> {
    build_all(&import_plan(config, tensors)?, tensors)
}

/// How each of HuggingFace's tensors (names as `save_pretrained` writes them: `transformer.`
/// but for `lm_head.weight`) is made from our export's (names without `model.`) for model
/// config `model` (its `GptConfig` JSON), and HuggingFace's config: padded vocabulary rows (and
/// head columns) beyond `vocab_used` dropped.
pub fn export_plan(model: &serde_json::Value) -> Result<(Vec<(String, Recipe)>, HfGpt2Config)> {
    let config = HfGpt2Config::from_model_json(model)?;
    let theirs = |n: &str| format!("transformer.{n}");
    let vocab = |of: Recipe| Recipe::Rows { of: Box::new(of), n: config.vocab_size };
    let mut plan = Vec::new();
    for (ours, hf) in TOP {
        let copy = Recipe::Copy(ours.to_string());
        plan.push((theirs(hf), if ours == "wte.weight" { vocab(copy) } else { copy }));
    }
    for n in 0..config.n_layer {
        for (ours, hf) in BLOCK {
            plan.push((theirs(&format!("h.{n}.{hf}")), Recipe::Copy(format!("blocks.{n}.{ours}"))));
        }
        for field in ["weight", "bias"] {
            let recipe = Recipe::Ungroup { name: format!("blocks.{n}.attn.qkv.{field}"), heads: config.n_head };
            plan.push((theirs(&format!("h.{n}.attn.c_attn.{field}")), recipe));
        }
    }
    if !config.tie_word_embeddings {
        plan.push(("lm_head.weight".into(), vocab(Recipe::Transpose("head.weight".into()))));
    }
    Ok((plan, config))
}

/// HuggingFace's tensors and config of our export's `tensors` with model config `model`, in
/// memory ([`export_hf`] streams them to a file instead).
pub fn to_hf(tensors: &BTreeMap<String, TensorData>, model: &serde_json::Value) -> Result<(BTreeMap<String, TensorData>, HfGpt2Config)> {
    let (plan, config) = export_plan(model)?;
    Ok((build_all(&plan, tensors)?, config))
}

/// Reads a HuggingFace GPT-2 or Llama (`dir/model.safetensors` and `dir/config.json`, or a
/// `.safetensors` file with its `config.json` beside it) and writes it in our export layout to
/// `out` (what `--init-from` reads). Returns the config read.
pub fn import_hf(from: &Path, out: &Path) -> Result<HfConfig> {
    let (file, dir) = if from.is_dir() {
        (from.join("model.safetensors"), from.to_path_buf())
    } else {
        (from.to_path_buf(), from.parent().unwrap_or(Path::new(".")).to_path_buf())
    };
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path).map_err(|e| CheckpointError::io("read", &config_path, e))?;
    let invalid = |e: serde_json::Error| CheckpointError::Invalid(format!("{}: {e}", config_path.display()));
    let value: serde_json::Value = serde_json::from_str(&text).map_err(invalid)?;
    let config = match value.get("model_type").and_then(|v| v.as_str()) {
        Some("llama") | Some("mistral") => HfConfig::Llama(serde_json::from_value(value).map_err(invalid)?),
        Some("gpt2") | None => HfConfig::Gpt2(serde_json::from_value(value).map_err(invalid)?),
        Some(other) => {
            return Err(CheckpointError::Invalid(format!("{}: model_type {other:?}: only gpt2, llama and mistral are supported", config_path.display())))
        }
    };
    // Only the planned tensors are read: buffers (GPT-2's causal masks, old Llama files' rotary
    // frequencies) are not parameters and have no recipe.
    let (files, weight_map) = weight_files(&file, &dir)?;
    let src = HfFiles::open_mapped(&files, &weight_map)?;
    let (plan, model) = match &config {
        HfConfig::Gpt2(c) => (import_plan(c, &src)?, c.to_model_json()?),
        HfConfig::Llama(c) => (super::hf_llama::import_plan(c, &src)?, c.to_model_json()?),
    };
    let meta = HashMap::from([("format".to_string(), "pt".to_string()), ("burn_parallel_model".to_string(), model.to_string())]);
    write_plan(out, &plan, &src, meta)?;
    Ok(config)
}

/// The safetensors files of a model: `file` itself, or where it does not exist the shards
/// that `dir/model.safetensors.index.json`'s `weight_map` names (hub models of several GB),
/// with that map (tensor → file name).
fn weight_files(file: &Path, dir: &Path) -> Result<(Vec<std::path::PathBuf>, BTreeMap<String, String>)> {
    let index = dir.join("model.safetensors.index.json");
    if file.exists() || !index.exists() {
        return Ok((vec![file.to_path_buf()], BTreeMap::new()));
    }
    let text = std::fs::read_to_string(&index).map_err(|e| CheckpointError::io("read", &index, e))?;
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| CheckpointError::Invalid(format!("{}: {e}", index.display())))?;
    let map = value.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| CheckpointError::Invalid(format!("{}: no weight_map", index.display())))?;
    let map: BTreeMap<String, String> = map.iter().filter_map(|(t, f)| Some((t.clone(), f.as_str()?.to_string()))).collect();
    let files: std::collections::BTreeSet<&String> = map.values().collect();
    Ok((files.into_iter().map(|f| dir.join(f)).collect(), map))
}

/// Writes the model of checkpoint `ckpt` as a HuggingFace directory `out` (`model.safetensors`
/// in f32, or shards of at most 5 GB, with `__metadata__ {"format": "pt"}`, and `config.json`):
/// a Llama-style model as Llama, any other as GPT-2 (or an error naming what GPT-2 lacks).
/// Streams: one tensor in memory at a time. [`super::hf_export::export_hf_with`] chooses the
/// dtype and the shard size.
pub fn export_hf(ckpt: &Checkpoint, out: &Path) -> Result<HfConfig> {
    super::hf_export::export_hf_with(ckpt, out, &Default::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Llama-style model has no GPT-2 form: each of its choices is named; GPT-2's own
    /// (including a config from before the fields existed) passes.
    #[test]
    fn only_gpt2_models_export() {
        let gpt2 = serde_json::json!({"d_model": 8, "n_heads": 2, "n_layers": 1, "max_seq_len": 4, "vocab_size": 16, "d_ff": 32});
        assert!(HfGpt2Config::from_model_json(&gpt2).is_ok());
        let explicit = serde_json::json!({"norm": "LayerNorm", "position": "Learned", "bias": true, "activation": "GeluTanh"});
        let mut both = gpt2.clone();
        both.as_object_mut().unwrap().extend(explicit.as_object().unwrap().clone());
        assert!(HfGpt2Config::from_model_json(&both).is_ok());
        let mut llama = gpt2;
        let arch = serde_json::json!({"norm": "RmsNorm", "position": "Rope", "bias": false, "activation": "SwiGlu", "kv_heads": 1});
        llama.as_object_mut().unwrap().extend(arch.as_object().unwrap().clone());
        let e = HfGpt2Config::from_model_json(&llama).unwrap_err().to_string();
        for part in ["RMS norms", "rotary position embedding", "no biases", "--activation swiglu", "1 key/value heads"] {
            assert!(e.contains(part), "{part}: {e}");
        }
    }
}
