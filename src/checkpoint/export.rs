//! Export: a checkpoint's model as one `model.safetensors` of whole tensors, readable by Python's
//! `safetensors` / PyTorch (`__metadata__ {"format": "pt"}`, dotted parameter names without the
//! `model.` prefix). Import is [`Checkpoint::open_safetensors`] + [`load_module`](super::load_module)
//! at any layout.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use burn::tensor::TensorData;

use super::convert::{write_plan, Recipe};
use super::error::Result;
use super::read::Checkpoint;
use super::state::MODEL_PREFIX;

/// Every tensor of `ckpt` whose name starts with `prefix`, whole, by name (prefix kept).
pub fn full_tensors(ckpt: &Checkpoint, prefix: &str) -> Result<BTreeMap<String, TensorData>> {
    let names: Vec<String> = ckpt.metadata().tensors.keys().filter(|n| n.starts_with(prefix)).cloned().collect();
    names.into_iter().map(|n| ckpt.read_full(&n).map(|d| (n, d))).collect()
}

/// Writes the model tensors of `ckpt` (names without `model.`, dtypes as saved) to `out` as one
/// safetensors file, one tensor in memory at a time ([`write_plan`]); the `model` section of
/// the metadata (e.g. the model config) goes into `__metadata__` as the JSON string
/// `burn_parallel_model`, the step as `burn_parallel_step`. Returns the bytes of tensor data
/// written.
pub fn export_model(ckpt: &Checkpoint, out: &Path) -> Result<u64> {
    let names = ckpt.metadata().tensors.keys().filter_map(|n| Some((n.strip_prefix(MODEL_PREFIX)?.to_string(), Recipe::Keep(n.clone()))));
    let plan: Vec<(String, Recipe)> = names.collect();
    let mut meta = HashMap::from([("format".to_string(), "pt".to_string()), ("burn_parallel_step".to_string(), ckpt.metadata().step.to_string())]);
    if let Some(model) = ckpt.metadata().sections.get("model") {
        meta.insert("burn_parallel_model".into(), model.to_string());
    }
    write_plan(out, &plan, ckpt, meta)
}
