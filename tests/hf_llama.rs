//! HuggingFace Llama interop against an independent numpy Llama (`tests/llama_numpy.py`): a
//! random model in `LlamaForCausalLM`'s layout (grouped-query attention, RoPE θ, RMS norms,
//! SwiGLU; tied or not), written and run by numpy, imported (`checkpoint::hf::import_hf`, and
//! through the command line, which names the flags) and loaded at tp 1 and 2 gives numpy's
//! logits; our Llama-style GPT exported with `export_hf` gives numpy our logits and imports back
//! to the same tensors. Skips, saying so, without python3 with numpy and safetensors.

mod common;
#[path = "common/numpy.rs"]
mod numpy;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use burn_parallel::activation::Activation;
use burn_parallel::arch::{Norm, Position, RopeScaling};
use burn_parallel::checkpoint::hf::{export_hf, import_hf, HfConfig};
use burn_parallel::checkpoint::*;
use burn_parallel::ParallelConfig;
use burn_parallel_modules::GptConfig;
use common::runner::temp_dir;
use common::*;
use numpy::{assert_close, ours, python};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/llama_numpy.py");
const BIN: &str = env!("CARGO_BIN_EXE_burn-parallel");

/// Our Llama-style GPT of width 16, 4 heads sharing `kv` key/value heads, 2 layers, ffn 40.
fn llama(vocab: usize, kv: usize, tied: bool, eps: f64) -> GptConfig {
    GptConfig::new(vocab, 8, 16, 4, 2, 40)
        .with_norm(Norm::RmsNorm)
        .with_position(Position::Rope)
        .with_rope_theta(500.0)
        .with_activation(Activation::SwiGlu)
        .with_bias(false)
        .with_kv_heads((kv != 4).then_some(kv))
        .with_tie_embeddings(tied)
        .with_layer_norm_eps(eps)
}

#[test]
fn an_imported_huggingface_llama_gives_numpys_logits_at_tp_1_and_2() {
    if !python() {
        return;
    }
    for (kv, tied) in [(2, false), (4, true)] {
        let dir = temp_dir(&format!("hf-llama-{kv}"));
        let args = ["2", "16", "4", &kv.to_string(), "40", "50", "3", "500.0", if tied { "tied" } else { "untied" }].map(String::from);
        assert!(Command::new("python3").arg(SCRIPT).arg("make").arg(&dir).args(args).status().unwrap().success());
        let file = dir.join("ours.safetensors");
        if !tied {
            // Through the command line: it names every flag the model needs.
            let o = Command::new(BIN).args(["checkpoint", "import-hf"]).arg(&dir).arg("--out").arg(&file).output().unwrap();
            let text = String::from_utf8_lossy(&o.stdout);
            let flags = "--d-model 16 --heads 4 --layers 2 --d-ff 40 --norm rms-norm --position rope --rope-theta 500 --activation swiglu --no-bias --kv-heads 2 --norm-eps 1e-6";
            assert!(o.status.success() && text.contains(flags) && text.contains("Llama: 2 layers"), "{text}{}", String::from_utf8_lossy(&o.stderr));
        } else {
            // As Mistral 7B v0.3 says it: the same tensors, no sliding window.
            let path = dir.join("config.json");
            let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            (config["model_type"], config["sliding_window"]) = ("mistral".into(), serde_json::Value::Null);
            std::fs::write(&path, config.to_string()).unwrap();
            let HfConfig::Llama(hf) = import_hf(&dir, &file).unwrap() else { panic!("a Llama config") };
            assert_eq!((hf.num_hidden_layers, hf.kv_heads(), hf.tie_word_embeddings, hf.model_type.as_str()), (2, 4, true, "mistral"));
        }
        let ckpt = Checkpoint::open_safetensors(&file, MODEL_PREFIX).unwrap();
        assert_eq!(ckpt.metadata().tensors.contains_key("model.head.weight"), !tied, "a head of its own only when untied");
        let cfg = llama(50, kv, tied, 1e-6);
        let reference = numpy::logits(SCRIPT, &dir);
        for t in [1, 2] {
            let logits = world(t, |c| {
                let gpt = cfg.init::<B>(&c, &Default::default()).map_err(|e| e.to_string())?;
                let ctx = ShardContext { tp_rank: c.rank(), tp_size: t, dp_rank: 0 };
                let same = |p: &str| p.to_string();
                let gpt = load_module(&ckpt, gpt, MODEL_PREFIX, &same, ctx).map_err(|e| e.to_string())?;
                Ok(ours(&gpt, 50))
            });
            for l in &logits {
                assert_close(&format!("kv {kv} tied {tied} tp {t}"), l, &reference);
            }
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}

/// A hub model in shards (`model-0000N-of-0000M.safetensors` and the index's `weight_map`)
/// imports as the single file does.
#[test]
fn a_sharded_huggingface_llama_imports_like_one_file() {
    if !python() {
        return;
    }
    let dir = temp_dir("hf-llama-shards");
    let args = ["1", "16", "4", "2", "40", "50", "4", "10000.0", "untied"].map(String::from);
    assert!(Command::new("python3").arg(SCRIPT).arg("make").arg(&dir).args(args).status().unwrap().success());
    let (single, sharded) = (dir.join("single.safetensors"), dir.join("sharded.safetensors"));
    import_hf(&dir, &single).unwrap();
    let whole = Checkpoint::open_safetensors(dir.join("model.safetensors"), "").unwrap();
    let names: Vec<String> = whole.metadata().tensors.keys().cloned().collect();
    let mut map = serde_json::Map::new();
    for (i, half) in names.chunks(names.len().div_ceil(2)).enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i + 1);
        let tensors: Vec<_> = half.iter().map(|n| (n.clone(), whole.read_full(n).unwrap())).collect();
        write::write_safetensors(&dir.join(&file), &tensors, Default::default()).unwrap();
        map.extend(half.iter().map(|n| (n.clone(), serde_json::json!(file))));
    }
    drop(whole);
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("model.safetensors.index.json"), serde_json::json!({"metadata": {}, "weight_map": map}).to_string()).unwrap();
    import_hf(&dir, &sharded).unwrap();
    let (a, b) = (Checkpoint::open_safetensors(&single, MODEL_PREFIX).unwrap(), Checkpoint::open_safetensors(&sharded, MODEL_PREFIX).unwrap());
    assert_eq!(full_tensors(&a, MODEL_PREFIX).unwrap(), full_tensors(&b, MODEL_PREFIX).unwrap());
    std::fs::remove_dir_all(dir).unwrap();
}

/// Saves `cfg`'s model (perturbed: logits of order 1) as a checkpoint in `dir`; its logits.
fn save(cfg: &GptConfig, dir: &Path) -> Vec<f32> {
    let noise = Perturb::default();
    world(1, |c| {
        let gpt = noise.apply(cfg.init::<B>(&c, &Default::default()).map_err(|e| e.to_string())?, &c);
        let same = |p: &str| p.to_string();
        let snapshot = Snapshot {
            step: 1,
            layout: ParallelConfig::new(),
            train: TrainState::default(),
            tensors: module_tensors(&gpt, &same, ShardContext::single()),
            counters: BTreeMap::new(),
            sections: BTreeMap::from([("model".to_string(), serde_json::to_value(cfg).unwrap())]),
        };
        let mut saver = Checkpointer::new(CheckpointOptions { dir: dir.to_path_buf(), keep: 0, async_save: false }, c);
        saver.save(snapshot).map_err(|e| e.to_string())?;
        saver.finish().map_err(|e| e.to_string())?;
        Ok(ours(&gpt, 50))
    })
    .remove(0)
}

#[test]
fn our_llama_exported_for_huggingface_gives_numpy_our_logits() {
    if !python() {
        return;
    }
    // A padded vocabulary (64 rows, 50 tokens) and an untied head; then tied, one key/value head.
    for (kv, tied, vocab) in [(2, false, 64), (1, true, 50)] {
        let cfg = llama(vocab, kv, tied, 1e-5).with_vocab_used((vocab > 50).then_some(50));
        let (dir, out) = (temp_dir(&format!("hf-llama-export-{kv}")), temp_dir(&format!("hf-llama-export-{kv}-out")));
        let logits = save(&cfg, &dir);
        if tied {
            let o = Command::new(BIN).args(["checkpoint", "export-hf"]).arg(&dir).arg("--out").arg(&out).output().unwrap();
            assert!(o.status.success() && String::from_utf8_lossy(&o.stdout).contains("Llama"), "{}", String::from_utf8_lossy(&o.stderr));
        } else {
            assert!(matches!(export_hf(&Checkpoint::open(&dir).unwrap(), &out).unwrap(), HfConfig::Llama(_)));
        }
        let hf: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
        assert_eq!((hf["model_type"].as_str(), hf["vocab_size"].as_u64(), hf["num_key_value_heads"].as_u64()), (Some("llama"), Some(50), Some(kv as u64)));
        // No end-of-text id of LlamaConfig's defaults (1, 2): ordinary tokens of this vocabulary.
        assert!(hf["eos_token_id"].is_null() && hf["bos_token_id"].is_null(), "{hf}");
        assert_close(&format!("exported kv {kv} tied {tied}"), &logits, &numpy::logits(SCRIPT, &out));
        // And back: the same tensors (padding rows aside).
        assert_imports_back(&dir, &out, false);
        for d in [dir, out] {
            std::fs::remove_dir_all(d).unwrap();
        }
    }
}

/// The HuggingFace export `out` imports back as the checkpoint `dir`'s tensors (padding rows
/// aside), each rounded to bf16 where `bf16`.
fn assert_imports_back(dir: &Path, out: &Path, bf16: bool) {
    let back = out.join("back.safetensors");
    import_hf(out, &back).unwrap();
    let (a, b) = (Checkpoint::open(dir).unwrap(), Checkpoint::open_safetensors(&back, MODEL_PREFIX).unwrap());
    let names = full_tensors(&b, MODEL_PREFIX).unwrap();
    assert_eq!(names.len(), a.metadata().tensors.len(), "every tensor back");
    for (name, t) in names {
        // Padded vocabulary: the embedding's first rows, the head's first columns.
        let whole = a.read_full(&name).unwrap();
        let whole = if bf16 { whole.convert::<burn::tensor::bf16>().convert::<f32>() } else { whole };
        let (cols, all) = (*whole.shape.last().unwrap(), whole.to_vec::<f32>().unwrap());
        let keep = *t.shape.last().unwrap();
        let kept: Vec<f32> = all.chunks(cols).flat_map(|row| row[..keep].to_vec()).take(t.num_elements()).collect();
        assert_eq!(t.to_vec::<f32>().unwrap(), kept, "{name}");
    }
    std::fs::remove_file(back).unwrap();
}

/// As `save_pretrained` writes large models: an export in shards of at most 4 KB gives numpy our
/// logits (read through the index); a bf16 export (one file) says `torch_dtype: bfloat16` and
/// imports back as our weights rounded to bf16; each export removes the last one's weight files.
#[test]
fn exports_in_shards_and_in_bf16_read_back_and_replace_the_last() {
    let cfg = llama(64, 2, false, 1e-5).with_vocab_used(Some(50));
    let (dir, out) = (temp_dir("hf-llama-shards"), temp_dir("hf-llama-shards-out"));
    let logits = save(&cfg, &dir);
    let export = |args: &[&str]| {
        let o = Command::new(BIN).args(["checkpoint", "export-hf"]).arg(&dir).arg("--out").arg(&out).args(args).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let mut files: Vec<String> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        files.sort();
        files
    };
    let files = export(&["--max-shard-size", "4KB"]);
    let shards: Vec<&String> = files.iter().filter(|f| f.starts_with("model-")).collect();
    assert!(shards.len() > 2 && files.contains(&"model.safetensors.index.json".into()) && !files.contains(&"model.safetensors".into()), "{files:?}");
    let index: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("model.safetensors.index.json")).unwrap()).unwrap();
    let shard_bytes: u64 = shards
        .iter()
        .map(|f| full_tensors(&Checkpoint::open_safetensors(out.join(f), "").unwrap(), "").unwrap().values().map(|t| t.as_bytes().len() as u64).sum::<u64>())
        .sum();
    assert_eq!(index["metadata"]["total_size"].as_u64(), Some(shard_bytes));
    assert_eq!(index["weight_map"].as_object().unwrap().len(), 2 + 2 * 9 + 1, "embedding, norm, 9 a block, head");
    if python() {
        assert_close("exported in shards", &logits, &numpy::logits(SCRIPT, &out));
    }
    assert_imports_back(&dir, &out, false);
    assert_eq!(export(&["--dtype", "bf16", "--max-shard-size", "none"]), ["config.json", "model.safetensors"], "the shards and index removed");
    let hf: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(hf["torch_dtype"], "bfloat16");
    let file = Checkpoint::open_safetensors(out.join("model.safetensors"), "").unwrap();
    assert!(file.metadata().tensors.values().all(|t| t.dtype == safetensors::Dtype::BF16));
    assert_imports_back(&dir, &out, true);
    // Back to shards: the single file that would shadow them is gone.
    let sharded = export(&["--max-shard-size", "4KB"]);
    assert!(!sharded.contains(&"model.safetensors".into()) && sharded.contains(&"model.safetensors.index.json".into()), "{sharded:?}");
    // A checkpoint that fails to read half way: the error, and the last export as it was.
    let step = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).find(|p| p.join("metadata.json").exists()).unwrap();
    let data = std::fs::read_dir(&step).unwrap().map(|e| e.unwrap().path()).find(|p| p.extension().is_some_and(|e| e == "safetensors")).unwrap();
    let mut bytes = std::fs::read(&data).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&data, bytes).unwrap();
    let index = std::fs::read(out.join("model.safetensors.index.json")).unwrap();
    let o = Command::new(BIN).args(["checkpoint", "export-hf"]).arg(&dir).arg("--out").arg(&out).args(["--max-shard-size", "none"]).output().unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("checksum"), "{}", String::from_utf8_lossy(&o.stderr));
    let mut files: Vec<String> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    files.sort();
    assert_eq!(files, sharded, "the last export, and no staging folder");
    assert_eq!(std::fs::read(out.join("model.safetensors.index.json")).unwrap(), index);
    let o = Command::new(BIN).args(["checkpoint", "export-hf"]).arg(&dir).arg("--out").arg(&out).args(["--max-shard-size", "5 TB"]).output().unwrap();
    assert!(
        !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("--max-shard-size \"5 TB\": a size is"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    for d in [dir, out] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

/// Llama 3.1's scaled RoPE (`rope_type: "llama3"`, transformers 5's `rope_parameters`): at head
/// width 8 and original context 64 its four pairs are kept, blended and divided; the import
/// names `--rope-scaling`, gives numpy's logits at tp 1 and 2 (which differ from plain RoPE's),
/// and the export writes `rope_scaling` back (numpy reads it, giving our logits).
#[test]
fn a_huggingface_llama_3_1_with_scaled_rope_gives_numpys_logits_both_ways() {
    if !python() {
        return;
    }
    let (dir, out) = (temp_dir("hf-llama31"), temp_dir("hf-llama31-out"));
    let args = ["2", "32", "4", "2", "40", "50", "7", "500.0", "untied", "8,1,4,64"].map(String::from);
    assert!(Command::new("python3").arg(SCRIPT).arg("make").arg(&dir).args(args).status().unwrap().success());
    let file = dir.join("ours.safetensors");
    let o = Command::new(BIN).args(["checkpoint", "import-hf"]).arg(&dir).arg("--out").arg(&file).output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && text.contains("--kv-heads 2 --rope-scaling llama3:8,1,4,64 --norm-eps 1e-6"), "{text}{}", String::from_utf8_lossy(&o.stderr));
    let scaling = RopeScaling { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 64 };
    let cfg = GptConfig::new(50, 8, 32, 4, 2, 40)
        .with_norm(Norm::RmsNorm)
        .with_position(Position::Rope)
        .with_rope_theta(500.0)
        .with_rope_scaling(Some(scaling))
        .with_activation(Activation::SwiGlu)
        .with_bias(false)
        .with_kv_heads(Some(2))
        .with_layer_norm_eps(1e-6);
    let ckpt = Checkpoint::open_safetensors(&file, MODEL_PREFIX).unwrap();
    assert_eq!(ckpt.metadata().sections["model"]["rope_scaling"], serde_json::to_value(scaling).unwrap());
    let reference = numpy::logits(SCRIPT, &dir);
    for t in [1, 2] {
        let logits = world(t, |c| {
            let gpt = cfg.init::<B>(&c, &Default::default()).map_err(|e| e.to_string())?;
            let ctx = ShardContext { tp_rank: c.rank(), tp_size: t, dp_rank: 0 };
            let gpt = load_module(&ckpt, gpt, MODEL_PREFIX, &|p: &str| p.to_string(), ctx).map_err(|e| e.to_string())?;
            Ok(ours(&gpt, 50))
        });
        logits.iter().for_each(|l| assert_close(&format!("llama 3.1 tp {t}"), l, &reference));
    }
    // The legacy form of the hub's Llama 3.1/3.2 configs (`rope_scaling`, θ at the top level)
    // imports the same scaling and numpy gives the same logits.
    let config = dir.join("config.json");
    let mut legacy: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    let mut settings = legacy.as_object_mut().unwrap().remove("rope_parameters").unwrap();
    settings.as_object_mut().unwrap().remove("rope_theta");
    legacy["rope_scaling"] = settings;
    std::fs::write(&config, legacy.to_string()).unwrap();
    let HfConfig::Llama(hf) = import_hf(&dir, &dir.join("legacy.safetensors")).unwrap() else { panic!("a Llama config") };
    assert_eq!((hf.scaling().unwrap(), hf.theta()), (Some(scaling), 500.0));
    assert_close("llama 3.1 legacy config", &numpy::logits(SCRIPT, &dir), &reference);
    // The same weights with plain RoPE give other logits: the scaling is not a no-op here.
    let mut plain = legacy.clone();
    plain["rope_scaling"] = serde_json::Value::Null;
    std::fs::write(&config, plain.to_string()).unwrap();
    let unscaled = numpy::logits(SCRIPT, &dir);
    let moved = reference.iter().zip(&unscaled).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(moved > 1e-2, "scaled and plain RoPE logits differ by {moved} only");
    // Out again: rope_scaling in HuggingFace's form, numpy gives our logits.
    let logits = save(&cfg, &dir.join("ckpt"));
    export_hf(&Checkpoint::open(dir.join("ckpt")).unwrap(), &out).unwrap();
    let hf: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    let want =
        serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64});
    assert_eq!(hf["rope_scaling"], want, "{hf}");
    assert_close("exported llama 3.1", &logits, &numpy::logits(SCRIPT, &out));
    for d in [dir, out] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

/// What the conversion does not carry is refused, naming the field.
#[test]
fn llama_variants_the_conversion_does_not_carry_are_refused() {
    use burn_parallel::checkpoint::hf_llama::HfLlamaConfig;
    let base = serde_json::json!({"hidden_size": 16, "intermediate_size": 40, "num_attention_heads": 4, "num_hidden_layers": 1,
        "max_position_embeddings": 8, "vocab_size": 50, "model_type": "llama"});
    let with = |k: &str, v: serde_json::Value| {
        let mut c = base.clone();
        c[k] = v;
        serde_json::from_value::<HfLlamaConfig>(c).unwrap().check().map_err(|e| e.to_string())
    };
    assert!(with("hidden_act", "silu".into()).is_ok());
    assert!(with("head_dim", serde_json::json!(4)).is_ok() && with("rope_scaling", serde_json::json!({"rope_type": "default"})).is_ok());
    // transformers 5 keeps θ in rope_parameters.
    let mut v5 = base.clone();
    v5["rope_parameters"] = serde_json::json!({"rope_type": "default", "rope_theta": 500000.0});
    let v5: HfLlamaConfig = serde_json::from_value(v5).unwrap();
    assert_eq!(v5.to_model_json().unwrap()["rope_theta"], serde_json::json!(500000.0));
    assert!(v5.flags().contains("--rope-theta 500000"), "{}", v5.flags());
    // Both forms given: they must agree (transformers would take rope_scaling).
    let llama3 = |factor: f64| serde_json::json!({"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
    let mut both = base.clone();
    (both["rope_scaling"], both["rope_parameters"]) = (llama3(8.0), llama3(8.0));
    let both_same: HfLlamaConfig = serde_json::from_value(both.clone()).unwrap();
    assert_eq!(both_same.scaling().unwrap().map(|s| s.factor), Some(8.0));
    both["rope_parameters"] = llama3(32.0);
    let e = serde_json::from_value::<HfLlamaConfig>(both).unwrap().check().unwrap_err().to_string();
    assert!(e.contains("disagree"), "{e}");
    for (k, v, says) in [
        ("hidden_act", serde_json::json!("gelu"), "hidden_act \"gelu\""),
        ("attention_bias", serde_json::json!(true), "biases are not supported"),
        ("rope_scaling", serde_json::json!({"rope_type": "llama3", "factor": 8.0}), "no number low_freq_factor"),
        ("rope_scaling", serde_json::json!({"rope_type": "yarn", "factor": 4.0}), "only the default and llama3"),
        ("rope_scaling", serde_json::json!({"type": "linear", "factor": 2.0}), "only the default and llama3"),
        (
            "rope_scaling",
            serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0, "original_max_position_embeddings": 8192}),
            "low_freq_factor < high_freq_factor",
        ),
        ("head_dim", serde_json::json!(8), "head_dim Some(8)"),
        ("num_key_value_heads", serde_json::json!(3), "4 heads of 3 key/value heads"),
        ("num_key_value_heads", serde_json::json!(0), "4 heads with 0 key/value heads"),
        ("rope_parameters", serde_json::json!({"rope_type": "dynamic", "rope_theta": 500000.0}), "only the default and llama3"),
        ("rope_parameters", serde_json::json!({"type": "yarn", "factor": 4.0}), "only the default and llama3"),
        (
            "rope_scaling",
            serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192.5}),
            "no whole number original_max_position_embeddings",
        ),
    ] {
        let e = with(k, v).unwrap_err();
        assert!(e.contains(says), "{k}: {e}");
    }
    // Mistral's window: none, or the whole context, is Llama's attention; a shorter one is not.
    assert!(with("sliding_window", serde_json::Value::Null).is_ok() && with("sliding_window", serde_json::json!(8)).is_ok());
    let e = with("sliding_window", serde_json::json!(4)).unwrap_err();
    assert!(e.contains("sliding_window 4 below max_position_embeddings 8"), "{e}");
    // Another architecture's config is refused by name, not read as GPT-2.
    let dir = temp_dir("hf-qwen");
    std::fs::write(dir.join("config.json"), serde_json::json!({"model_type": "qwen2", "hidden_size": 16}).to_string()).unwrap();
    let e = import_hf(&dir, &dir.join("out.safetensors")).unwrap_err().to_string();
    assert!(e.contains("model_type \"qwen2\": only gpt2, llama and mistral are supported"), "{e}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// The export's begin/end-of-text ids: GPT-2's for its vocabulary, Llama 3's for its, none for
/// any other; scaled RoPE's context (factor × original) bounds `max_position_embeddings` from
/// below.
#[test]
fn exported_special_ids_follow_the_vocabulary() {
    use burn_parallel::checkpoint::hf_llama::HfLlamaConfig;
    let model = |vocab: usize| {
        let mut m = serde_json::to_value(llama(vocab, 2, false, 1e-5)).unwrap();
        m["vocab_used"] = serde_json::json!(vocab);
        m
    };
    for (vocab, bos, eos) in [
        (50257, serde_json::json!(50256), serde_json::json!(50256)),
        (128256, serde_json::json!(128000), serde_json::json!(128001)),
        (50, serde_json::Value::Null, serde_json::Value::Null),
    ] {
        let hf = HfLlamaConfig::from_model_json(&model(vocab)).unwrap();
        assert_eq!((hf.bos_token_id, hf.eos_token_id), (Some(bos), Some(eos)), "vocabulary {vocab}");
        assert_eq!(hf.max_position_embeddings, 8);
    }
    let mut scaled = model(50);
    scaled["rope_scaling"] = serde_json::to_value(RopeScaling::LLAMA3_1).unwrap();
    let hf = HfLlamaConfig::from_model_json(&scaled).unwrap();
    assert_eq!((hf.max_position_embeddings, hf.scaling().unwrap()), (65536, Some(RopeScaling::LLAMA3_1)));
}
