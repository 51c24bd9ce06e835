//! Bad checkpoints give clear errors naming the file, the tensor and the numbers, and nothing
//! is half-loaded: missing directory, no committed checkpoint, missing/truncated/corrupted data
//! file, another model (shape, missing tensor), another dtype, unknown version or format,
//! damaged metadata, chunks that do not cover a tensor or overlap, an unwritable save directory.

mod common;

use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::{DType, Tensor};
use burn_parallel::checkpoint::*;
use burn_parallel_modules::Gpt;
use common::runner::*;
use common::B;

/// A committed single-rank checkpoint of the test GPT after one step.
fn saved(name: &str) -> (PathBuf, PathBuf) {
    let dir = temp_dir(name);
    run(&Plan { layout: layout(1, 1, 2), config: gpt(4, false, 0.0), load: None, steps: 1, save: Some(&dir), async_save: false });
    let ckpt = dir.join("step-000001");
    (dir, ckpt)
}

fn model(layers: usize, d_ff: usize) -> Gpt<B> {
    let c = burn_parallel::LocalWorld::new(1).communicator(0);
    burn_parallel_modules::GptConfig::new(VOCAB, SEQ, 16, 4, layers, d_ff).init(&c, &Default::default()).unwrap()
}

fn load(dir: &Path, m: Gpt<B>) -> Result<Gpt<B>, String> {
    let ckpt = Checkpoint::open(dir).map_err(|e| e.to_string())?;
    load_module(&ckpt, m, MODEL_PREFIX, &|p: &str| p.to_string(), ShardContext::single()).map_err(|e| e.to_string())
}

fn err(r: Result<Gpt<B>, String>) -> String {
    match r {
        Ok(_) => panic!("loading must fail"),
        Err(e) => e,
    }
}

fn edit_metadata(dir: &Path, f: impl Fn(&mut serde_json::Value)) {
    let path = dir.join("metadata.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, serde_json::to_vec(&v).unwrap()).unwrap();
}

fn contains_all(e: &str, parts: &[&str]) {
    for p in parts {
        assert!(e.contains(p), "expected {p:?} in: {e}");
    }
}

#[test]
fn a_good_checkpoint_loads_whole_at_tp1() {
    let (root, dir) = saved("good");
    let m = load(&dir, model(4, 32)).unwrap();
    let ckpt = Checkpoint::open(&dir).unwrap();
    assert_eq!(m.head.as_ref().unwrap().weight.val().into_data(), ckpt.read_full("model.head.weight").unwrap());
    std::fs::remove_dir_all(root).unwrap();
}

#[test]
fn missing_directory_and_no_committed_checkpoint() {
    let e = Checkpoint::open("/nonexistent/ckpt").unwrap_err().to_string();
    contains_all(&e, &["/nonexistent/ckpt", "does not exist"]);
    let root = temp_dir("empty");
    std::fs::create_dir_all(root.join(".tmp-step-000005")).unwrap();
    let e = Checkpoint::open(&root).unwrap_err().to_string();
    contains_all(&e, &[root.to_str().unwrap(), "no committed checkpoint"]);
    std::fs::remove_dir_all(root).unwrap();
}

#[test]
fn missing_truncated_and_corrupted_data_files() {
    let (root, dir) = saved("files");
    let file = dir.join("rank-00001.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    // Missing.
    std::fs::remove_file(&file).unwrap();
    contains_all(&err(load(&dir, model(4, 32))), &["cannot open", "rank-00001.safetensors"]);
    // Truncated.
    std::fs::write(&file, &bytes[..bytes.len() - 100]).unwrap();
    contains_all(&err(load(&dir, model(4, 32))), &["rank-00001.safetensors", &format!("is {} bytes but the metadata says {}", bytes.len() - 100, bytes.len())]);
    // One flipped bit in the data of a parameter: its checksum names it.
    let (header_len, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let at = 8 + header_len + header.info("model.head.weight").unwrap().data_offsets.0 + 5;
    let mut bad = bytes.clone();
    bad[at] ^= 0x40;
    std::fs::write(&file, &bad).unwrap();
    let e = Checkpoint::open(&dir).unwrap().verify().unwrap_err().to_string();
    contains_all(&e, &["rank-00001.safetensors", "tensor model.head.weight", "checksum", "corrupted"]);
    contains_all(&err(load(&dir, model(4, 32))), &["tensor model.head.weight", "checksum"]);
    // Restored, it loads again.
    std::fs::write(&file, &bytes).unwrap();
    load(&dir, model(4, 32)).unwrap();
    std::fs::remove_dir_all(root).unwrap();
}

#[test]
fn another_model_is_refused_naming_both_shapes_or_the_missing_tensor() {
    let (root, dir) = saved("model");
    let e = err(load(&dir, model(4, 64)));
    contains_all(&e, &["tensor model.blocks.0.mlp.fc1.weight", "[16, 32]", "[16, 64]"]);
    let e = err(load(&dir, model(6, 32)));
    contains_all(&e, &["no tensor model.blocks.4.", "another model"]);
    std::fs::remove_dir_all(root).unwrap();
}

struct ToBf16;
impl ModuleMapper<B> for ToBf16 {
    fn map_float<const D: usize>(&mut self, p: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        p.map(|t| t.cast(DType::BF16).detach().require_grad())
    }
}

#[test]
fn another_dtype_is_refused_not_converted() {
    let (root, dir) = saved("dtype");
    let e = err(load(&dir, model(4, 32).map(&mut ToBf16)));
    contains_all(&e, &["the checkpoint holds F32", "parameter is BF16", "no silent conversion"]);
    std::fs::remove_dir_all(root).unwrap();
}

#[test]
fn unknown_version_foreign_format_and_damaged_metadata() {
    let (root, dir) = saved("version");
    edit_metadata(&dir, |v| v["version"] = 2.into());
    contains_all(&Checkpoint::open(&dir).unwrap_err().to_string(), &["metadata.json", "format version 2 is not supported", "reads version 1"]);
    edit_metadata(&dir, |v| v["format"] = "torch-dcp".into());
    contains_all(&Checkpoint::open(&dir).unwrap_err().to_string(), &["format is \"torch-dcp\"", "not a burn-parallel checkpoint"]);
    std::fs::write(dir.join("metadata.json"), b"{\"format\": \"burn-par").unwrap();
    contains_all(&Checkpoint::open(&dir).unwrap_err().to_string(), &["metadata.json", "not JSON"]);
    std::fs::remove_dir_all(root).unwrap();
}

#[test]
fn chunks_that_leave_a_gap_or_overlap_are_refused() {
    let (root, dir) = saved("cover");
    let original = std::fs::read(dir.join("metadata.json")).unwrap();
    let name = "model.blocks.0.attn.qkv.weight";
    edit_metadata(&dir, |v| {
        v["tensors"][name]["chunks"].as_array_mut().unwrap().pop();
    });
    contains_all(&Checkpoint::open(&dir).unwrap_err().to_string(), &[name, "cover 384 of its 768 elements", "[16, 48]"]);
    std::fs::write(dir.join("metadata.json"), &original).unwrap();
    edit_metadata(&dir, |v| v["tensors"][name]["chunks"][1]["offset"] = serde_json::json!([0, 4]));
    contains_all(&Checkpoint::open(&dir).unwrap_err().to_string(), &[name, "overlap", "[0, 4]"]);
    edit_metadata(&dir, |v| v["tensors"][name]["chunks"][1]["offset"] = serde_json::json!([0, 30]));
    contains_all(&Checkpoint::open(&dir).unwrap_err().to_string(), &[name, "outside the tensor's shape [16, 48]"]);
    std::fs::remove_dir_all(root).unwrap();
}

#[test]
fn an_unwritable_save_directory_fails_the_save_and_keeps_nothing_half_written() {
    let root = temp_dir("unwritable");
    let not_a_dir = root.join("file");
    std::fs::write(&not_a_dir, b"x").unwrap();
    let e = std::panic::catch_unwind(|| {
        run(&Plan { layout: layout(1, 1, 2), config: gpt(4, false, 0.0), load: None, steps: 1, save: Some(&not_a_dir), async_save: false })
    })
    .map(|_| ())
    .unwrap_err();
    let msg = e.downcast_ref::<String>().cloned().unwrap_or_default();
    contains_all(&msg, &["cannot create the save directory", "file", "rank 1", "ranks [0] failed"]);
    std::fs::remove_dir_all(root).unwrap();
}
