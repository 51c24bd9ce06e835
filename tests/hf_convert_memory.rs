//! The conversions stream: `import_hf`, `export_hf` and `export_model` of a GPT-2 hold about one
//! tensor at a time, not the model. Measured with the tracking allocator (heap bytes; the mapped
//! input files are not heap) at two model sizes, against converting the same files in memory
//! (`from_hf` on every tensor read, `to_hf` on `full_tensors`), in one run.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use burn::tensor::TensorData;
use burn_parallel::checkpoint::convert::{HfFiles, Source};
use burn_parallel::checkpoint::hf::{export_hf, from_hf, import_hf, to_hf, HfConfig};
use burn_parallel::checkpoint::{export_model, full_tensors, write_safetensors, Checkpoint, MODEL_PREFIX};
use burn_parallel::memory::{self, TrackingAllocator};

#[global_allocator]
static ALLOC: TrackingAllocator = TrackingAllocator;

const WIDTH: usize = 64;
const VOCAB: usize = 512;

/// A GPT-2 in HuggingFace's layout (untied, with the causal-mask buffers `save_pretrained`
/// used to write): `dir/model.safetensors` and `dir/config.json`; returns its f32 bytes.
fn write_gpt2(dir: &Path, layers: usize) -> usize {
    let mut tensors = Vec::new();
    let mut add = |name: String, shape: Vec<usize>| {
        let n = shape.iter().product::<usize>();
        let values = (0..n).map(|i| ((i * 37 + name.len()) % 101) as f32 / 101.0 - 0.5).collect::<Vec<_>>();
        tensors.push((name, TensorData::new(values, shape)));
    };
    let (h, f) = (WIDTH, 4 * WIDTH);
    add("transformer.wte.weight".into(), vec![VOCAB, h]);
    add("transformer.wpe.weight".into(), vec![64, h]);
    for n in 0..layers {
        let p = format!("transformer.h.{n}.");
        for (name, shape) in [
            ("ln_1.weight", vec![h]),
            ("ln_1.bias", vec![h]),
            ("attn.c_attn.weight", vec![h, 3 * h]),
            ("attn.c_attn.bias", vec![3 * h]),
            ("attn.c_proj.weight", vec![h, h]),
            ("attn.c_proj.bias", vec![h]),
            ("attn.bias", vec![1, 1, 64, 64]),
            ("ln_2.weight", vec![h]),
            ("ln_2.bias", vec![h]),
            ("mlp.c_fc.weight", vec![h, f]),
            ("mlp.c_fc.bias", vec![f]),
            ("mlp.c_proj.weight", vec![f, h]),
            ("mlp.c_proj.bias", vec![h]),
        ] {
            add(format!("{p}{name}"), shape);
        }
    }
    add("transformer.ln_f.weight".into(), vec![h]);
    add("transformer.ln_f.bias".into(), vec![h]);
    add("lm_head.weight".into(), vec![VOCAB, h]);
    let params = tensors.iter().filter(|(n, _)| !n.ends_with(".attn.bias")).map(|(_, t)| t.as_bytes().len()).sum();
    std::fs::create_dir_all(dir).unwrap();
    write_safetensors(&dir.join("model.safetensors"), &tensors, HashMap::from([("format".into(), "pt".into())])).unwrap();
    let config = serde_json::json!({
        "n_embd": h, "n_head": 4, "n_layer": layers, "n_positions": 64, "vocab_size": VOCAB,
        "activation_function": "gelu_new", "tie_word_embeddings": false, "model_type": "gpt2"
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    params
}

/// Peak heap bytes of one model size's conversions.
#[derive(Debug)]
struct Peaks {
    /// The model's f32 parameter bytes.
    params: usize,
    import: i64,
    import_in_memory: i64,
    export_hf: i64,
    export_model: i64,
    export_hf_in_memory: i64,
}

/// The conversions of a `layers`-block GPT-2: HuggingFace → ours (streamed and in memory), and
/// ours → HuggingFace (streamed and in memory) and → our export, each checked to give the same
/// tensors.
fn measure(layers: usize) -> Peaks {
    let dir = std::env::temp_dir().join(format!("bp-hf-convert-memory-{}-{layers}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let params = write_gpt2(&dir, layers);
    let hf_file = dir.join("model.safetensors");
    let out = dir.join("ours.safetensors");
    let (config, import) = memory::peak_of(0, || import_hf(&dir, &out).unwrap());
    let HfConfig::Gpt2(config) = config else { panic!("a GPT-2 config") };
    // The whole-model conversion of the same file (parameters only): every tensor read, then
    // converted.
    let (ours, import_in_memory) = memory::peak_of(0, || {
        let src = HfFiles::open(std::slice::from_ref(&hf_file)).unwrap();
        let ckpt = Checkpoint::open_safetensors(&hf_file, "").unwrap();
        let names = ckpt.metadata().tensors.keys().filter(|n| !n.ends_with(".attn.bias"));
        let tensors: BTreeMap<String, TensorData> = names.map(|n| (n.clone(), src.read(n).unwrap())).collect();
        from_hf(&tensors, &config).unwrap()
    });
    // What the stream wrote is what the in-memory conversion makes.
    let written = HfFiles::open(std::slice::from_ref(&out)).unwrap();
    for (name, t) in &ours {
        assert_eq!(&written.read(name).unwrap(), t, "{name}");
    }
    // Back: our file as a checkpoint (`model.` names, its model config), to HuggingFace and to
    // our export; each equals its source.
    let ckpt = Checkpoint::open_safetensors(&out, MODEL_PREFIX).unwrap();
    let (hf_dir, exported) = (dir.join("hf"), dir.join("export.safetensors"));
    let (_, hf_peak) = memory::peak_of(0, || export_hf(&ckpt, &hf_dir).unwrap());
    let (_, model_peak) = memory::peak_of(0, || export_model(&ckpt, &exported).unwrap());
    let (back, export_hf_in_memory) = memory::peak_of(0, || {
        let ours = full_tensors(&ckpt, MODEL_PREFIX).unwrap();
        let ours: BTreeMap<String, TensorData> = ours.into_iter().map(|(n, t)| (n.trim_start_matches(MODEL_PREFIX).to_string(), t)).collect();
        to_hf(&ours, &ckpt.metadata().sections["model"]).unwrap().0
    });
    let (original, streamed_back) = (HfFiles::open(&[hf_file]).unwrap(), HfFiles::open(&[hf_dir.join("model.safetensors")]).unwrap());
    for (name, t) in &back {
        assert_eq!(&original.read(name).unwrap(), t, "{name}: the round trip");
        assert_eq!(&streamed_back.read(name).unwrap(), t, "{name}: streamed and in memory");
    }
    let (exported, ours) = (HfFiles::open(&[exported]).unwrap(), ckpt.metadata().tensors.keys().map(|n| n.trim_start_matches(MODEL_PREFIX)));
    for name in ours {
        assert_eq!(exported.read(name).unwrap(), written.read(name).unwrap(), "{name}: export_model");
    }
    std::fs::remove_dir_all(dir).unwrap();
    let peaks = Peaks { params, import, import_in_memory, export_hf: hf_peak, export_model: model_peak, export_hf_in_memory };
    let mb = |b: i64| format!("{:.3} MB ({:.3} of the model)", b as f64 / 1e6, b as f64 / params as f64);
    eprintln!("{layers} layers, {:.3} MB of parameters:", params as f64 / 1e6);
    eprintln!("  import_hf {}, in memory {}", mb(peaks.import), mb(peaks.import_in_memory));
    eprintln!("  export_hf {}, in memory {}; export_model {}", mb(peaks.export_hf), mb(peaks.export_hf_in_memory), mb(peaks.export_model));
    peaks
}

/// Four times the layers: each streamed peak grows by the per-tensor metadata alone (under
/// 2 KiB a tensor, 13 tensors a block), each in-memory conversion by twice the added weights.
#[test]
fn converting_a_model_holds_one_tensor_not_the_model() {
    let (small, large) = (measure(8), measure(32));
    let added = large.params - small.params;
    for (what, s, l) in
        [("import_hf", small.import, large.import), ("export_hf", small.export_hf, large.export_hf), ("export_model", small.export_model, large.export_model)]
    {
        let grown = l - s;
        assert!((grown as usize) < 24 * 13 * (2 << 10), "{what}: the streamed peak grew {grown} B with {added} B of weights");
        // And it is below the model at 32 layers (the writer's 1 MiB buffer and a few copies
        // of the 0.13 MB embedding are most of it).
        assert!((l as usize) < large.params / 2, "{what}: a streamed peak of {l} B for a {} B model", large.params);
    }
    for (what, s, l) in [("from_hf", small.import_in_memory, large.import_in_memory), ("to_hf", small.export_hf_in_memory, large.export_hf_in_memory)] {
        assert!((l - s) as usize > 2 * added, "{what} in memory: {} B more for {added} B of weights", l - s);
    }
}
