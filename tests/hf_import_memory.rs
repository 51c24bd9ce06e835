//! `import_hf` streams: converting a HuggingFace GPT-2 holds about one tensor at a time, not the
//! model. Measured with the tracking allocator (heap bytes; the mapped input file is not heap)
//! at two model sizes, against converting the same files in memory (`from_hf` on every tensor
//! read), in one run.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use burn::tensor::TensorData;
use burn_parallel::checkpoint::hf::{from_hf, import_hf, HfConfig};
use burn_parallel::checkpoint::hf_import::{HfFiles, Source};
use burn_parallel::checkpoint::{write_safetensors, Checkpoint};
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

/// `f`'s peak heap bytes above what its thread held when it started (a thread of its own,
/// counted as rank 0).
fn peak_of<T: Send>(f: impl FnOnce() -> T + Send) -> (T, i64) {
    std::thread::scope(|s| {
        s.spawn(|| {
            memory::set_rank(Some(0));
            let start = memory::current(0);
            memory::reset_peak(0);
            let out = f();
            (out, memory::peak(0) - start)
        })
        .join()
        .unwrap()
    })
}

/// Peak heap of `import_hf` and of the in-memory conversion of a `layers`-block GPT-2, and its
/// f32 parameter bytes.
fn measure(layers: usize) -> (usize, i64, i64) {
    let dir = std::env::temp_dir().join(format!("bp-hf-import-memory-{}-{layers}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let params = write_gpt2(&dir, layers);
    let out = dir.join("ours.safetensors");
    let (config, streamed) = peak_of(|| import_hf(&dir, &out).unwrap());
    let HfConfig::Gpt2(config) = config else { panic!("a GPT-2 config") };
    // The whole-model conversion of the same file (parameters only): every tensor read, then
    // converted.
    let (ours, whole) = peak_of(|| {
        let src = HfFiles::open(&[dir.join("model.safetensors")]).unwrap();
        let ckpt = Checkpoint::open_safetensors(dir.join("model.safetensors"), "").unwrap();
        let names = ckpt.metadata().tensors.keys().filter(|n| !n.ends_with(".attn.bias"));
        let tensors: BTreeMap<String, TensorData> = names.map(|n| (n.clone(), src.read(n).unwrap())).collect();
        from_hf(&tensors, &config).unwrap()
    });
    // What the stream wrote is what the in-memory conversion makes.
    let written = HfFiles::open(std::slice::from_ref(&out)).unwrap();
    for (name, t) in &ours {
        assert_eq!(&written.read(name).unwrap(), t, "{name}");
    }
    let mb = |b: i64| b as f64 / 1e6;
    eprintln!(
        "{layers} layers, {:.3} MB: streamed import peak {:.3} MB ({:.3} of the model), in memory {:.3} MB ({:.3})",
        mb(params as i64),
        mb(streamed),
        streamed as f64 / params as f64,
        mb(whole),
        whole as f64 / params as f64
    );
    std::fs::remove_dir_all(dir).unwrap();
    (params, streamed, whole)
}

/// Four times the layers: the streamed peak grows by the per-tensor metadata alone (under 2 KiB
/// a tensor, 13 tensors a block), the in-memory conversion by twice the added weights.
#[test]
fn importing_a_huggingface_model_holds_one_tensor_not_the_model() {
    let (small, large) = (measure(8), measure(32));
    let (added, grown, grown_whole) = (large.0 - small.0, large.1 - small.1, large.2 - small.2);
    assert!((grown as usize) < 24 * 13 * (2 << 10), "streamed peak grew {grown} B with {added} B of weights");
    assert!(grown_whole as usize > 2 * added, "in memory: {grown_whole} B more for {added} B of weights");
    // And it is below the model at 32 layers (the writer's 1 MiB buffer and a few copies of the
    // 0.13 MB embedding are most of it).
    assert!((large.1 as usize) < large.0 / 2, "streamed peak {} B for a {} B model", large.1, large.0);
}
