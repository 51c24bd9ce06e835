//! Writing a checkpoint's model as a HuggingFace directory, as `save_pretrained` does: in a
//! chosen float dtype (`torch_dtype` in `config.json`), and in shards of at most a given size
//! (`model-00001-of-0000N.safetensors` and `model.safetensors.index.json`, whose `weight_map`
//! names each tensor's shard) where one file would be larger; one `model.safetensors` otherwise.
//! Every tensor streams from the checkpoint ([`write_plan`]: one in memory at a time).
//!
//! Everything is written into a staging folder inside the output folder and moved in at the
//! end, so a failed export leaves an earlier one as it was. Files of an earlier export that
//! this one does not write (`model.safetensors`, the index, other shards) are removed after the
//! new ones are in place: `from_pretrained` prefers `model.safetensors` to an index, so a stale
//! one would shadow new shards.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use safetensors::Dtype;

use super::convert::{write_plan, Prefixed, Recipe, Source};
use super::error::{CheckpointError, Result};
use super::hf::HfConfig;
use super::hf_llama::HfLlamaConfig;
use super::read::Checkpoint;
use super::state::MODEL_PREFIX;

/// How [`export_hf_with`] writes.
#[derive(Debug, Clone, PartialEq)]
pub struct HfExportOptions {
    /// The weights' dtype: f32 (the default), bf16 or f16.
    pub dtype: Dtype,
    /// The largest shard in bytes (a tensor larger than that gets a shard of its own); `None`:
    /// one file however large. Default: 5 GB, `save_pretrained`'s.
    pub max_shard_bytes: Option<u64>,
}

impl Default for HfExportOptions {
    fn default() -> Self {
        Self { dtype: Dtype::F32, max_shard_bytes: Some(5_000_000_000) }
    }
}

/// `torch_dtype`'s name of a float dtype.
fn torch_dtype(d: Dtype) -> Result<&'static str> {
    match d {
        Dtype::F32 => Ok("float32"),
        Dtype::BF16 => Ok("bfloat16"),
        Dtype::F16 => Ok("float16"),
        other => Err(CheckpointError::Invalid(format!("an export in {other:?}: the weights can be f32, bf16 or f16"))),
    }
}

/// Parses a size as `save_pretrained`'s `max_shard_size` takes it: bytes, or a number with
/// `KB`/`MB`/`GB` (powers of 1000) or `KiB`/`MiB`/`GiB` (powers of 1024), e.g. `5GB`.
pub fn parse_size(text: &str) -> std::result::Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        _ => return Err(format!("{text:?}: a size is a number of bytes, or of KB, MB, GB, KiB, MiB or GiB")),
    };
    match number.parse::<f64>() {
        Ok(n) if n >= 1.0 / scale as f64 && n.is_finite() => Ok((n * scale as f64).round() as u64),
        _ => Err(format!("{text:?}: a size is a positive number of bytes, or of KB, MB, GB, KiB, MiB or GiB")),
    }
}

/// The plan's tensors in shards of at most `max` bytes each (in order; a larger tensor alone).
fn shards(plan: Vec<(String, Recipe)>, src: &dyn Source, max: Option<u64>) -> Result<Vec<Vec<(String, Recipe)>>> {
    let mut out: Vec<Vec<(String, Recipe)>> = vec![Vec::new()];
    let mut bytes = 0u64;
    for (name, recipe) in plan {
        let size = recipe.shape(src)?.iter().product::<usize>() as u64 * (recipe.dtype(src)?.bitsize() / 8) as u64;
        let last = out.last_mut().expect("one shard at least");
        if max.is_some_and(|m| !last.is_empty() && bytes + size > m) {
            out.push(Vec::new());
            bytes = 0;
        }
        bytes += size;
        out.last_mut().expect("one shard at least").push((name, recipe));
    }
    Ok(out)
}

/// Whether `name` is a weight file an export writes (`model.safetensors`, its index, a shard).
fn is_export_file(name: &str) -> bool {
    name == "model.safetensors"
        || name == "model.safetensors.index.json"
        || (name.starts_with("model-") && name.contains("-of-") && name.ends_with(".safetensors"))
}

/// Writes the model of checkpoint `ckpt` as a HuggingFace directory `out` (`config.json` with
/// `torch_dtype`, and the weights with `__metadata__ {"format": "pt"}`, in one file or shards by
/// `options`): a Llama-style model as Llama, any other as GPT-2 (or an error naming what GPT-2
/// lacks).
pub fn export_hf_with(ckpt: &Checkpoint, out: &Path, options: &HfExportOptions) -> Result<HfConfig> {
    let model =
        ckpt.metadata().sections.get("model").ok_or_else(|| CheckpointError::Invalid(format!("{}: no model config to export", ckpt.dir().display())))?;
    let (plan, config) = match HfLlamaConfig::is_llama_style(model) {
        true => super::hf_llama::export_plan(model).map(|(p, c)| (p, HfConfig::Llama(c)))?,
        false => super::hf::export_plan(model).map(|(p, c)| (p, HfConfig::Gpt2(c)))?,
    };
    let mut json = match &config {
        HfConfig::Llama(c) => serde_json::to_value(c),
        HfConfig::Gpt2(c) => serde_json::to_value(c),
    }
    .expect("config serialises");
    json["torch_dtype"] = torch_dtype(options.dtype)?.into();
    let cast = |(name, of): (String, Recipe)| (name, Recipe::Cast { of: Box::new(of), dtype: options.dtype });
    let plan: Vec<(String, Recipe)> = plan.into_iter().map(cast).collect();
    let src = Prefixed { src: ckpt, prefix: MODEL_PREFIX };
    let shards = shards(plan, &src, options.max_shard_bytes)?;
    std::fs::create_dir_all(out).map_err(|e| CheckpointError::io("create", out, e))?;
    // Everything is written into a staging folder first: a failure leaves an earlier export
    // in `out` as it was (no mix of new and old shards), and the staging folder is removed.
    let staging = out.join(STAGING);
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(|e| CheckpointError::io("remove", &staging, e))?;
    }
    std::fs::create_dir(&staging).map_err(|e| CheckpointError::io("create", &staging, e))?;
    let written = write_all(&staging, &shards, &src, &json).inspect_err(|_| {
        let _ = std::fs::remove_dir_all(&staging);
    })?;
    // Then moved in: the weights, the index, the config; then what an earlier export left.
    for name in &written {
        std::fs::rename(staging.join(name), out.join(name)).map_err(|e| CheckpointError::io("rename", &staging.join(name), e))?;
    }
    std::fs::remove_dir(&staging).map_err(|e| CheckpointError::io("remove", &staging, e))?;
    remove_stale(out, &written)?;
    Ok(config)
}

/// The staging folder of an export inside its output folder.
const STAGING: &str = ".export-partial";

/// Writes the weights of `shards` (one `model.safetensors`, or shards and their index) and
/// `config.json` into `dir`; their names, in the order to move them in.
fn write_all(dir: &Path, shards: &[Vec<(String, Recipe)>], src: &dyn Source, config: &serde_json::Value) -> Result<Vec<String>> {
    let meta = || HashMap::from([("format".to_string(), "pt".to_string())]);
    let mut written = Vec::new();
    if let [one] = shards {
        write_plan(&dir.join("model.safetensors"), one, src, meta())?;
        written.push("model.safetensors".to_string());
    } else {
        let (mut map, mut total) = (BTreeMap::new(), 0u64);
        for (i, shard) in shards.iter().enumerate() {
            let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, shards.len());
            total += write_plan(&dir.join(&file), shard, src, meta())?;
            map.extend(shard.iter().map(|(name, _)| (name.clone(), serde_json::Value::from(file.clone()))));
            written.push(file);
        }
        let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": map});
        let text = serde_json::to_string_pretty(&index).expect("an index serialises");
        super::write::write_synced(&dir.join("model.safetensors.index.json"), text.as_bytes())?;
        written.push("model.safetensors.index.json".to_string());
    }
    let text = serde_json::to_string_pretty(config).expect("config serialises");
    super::write::write_synced(&dir.join("config.json"), text.as_bytes())?;
    written.push("config.json".to_string());
    super::write::sync_dir(dir)?;
    Ok(written)
}

/// Removes the weight files of `out` that an export writes but this one did not (`written`).
fn remove_stale(out: &Path, written: &[String]) -> Result<()> {
    for entry in std::fs::read_dir(out).map_err(|e| CheckpointError::io("read", out, e))?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if is_export_file(&name) && !written.contains(&name) {
            std::fs::remove_file(entry.path()).map_err(|e| CheckpointError::io("remove", &entry.path(), e))?;
        }
    }
    super::write::sync_dir(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_as_save_pretrained_takes_them() {
        assert_eq!(parse_size("5GB"), Ok(5_000_000_000));
        assert_eq!(parse_size("2 MiB"), Ok(2 << 20));
        assert_eq!(parse_size("1.5kb"), Ok(1500));
        assert_eq!(parse_size("123"), Ok(123));
        for bad in ["", "GB", "5 TB", "-1MB", "0"] {
            assert!(parse_size(bad).unwrap_err().contains("a size is"), "{bad}");
        }
    }

    #[test]
    fn shards_fill_up_to_the_limit_and_a_large_tensor_stands_alone() {
        let t = |n: usize| burn::tensor::TensorData::new(vec![0f32; n], [n]);
        let src: BTreeMap<String, burn::tensor::TensorData> = [("a", 10), ("b", 10), ("c", 40), ("d", 5)].map(|(n, k)| (n.to_string(), t(k))).into();
        let plan = || ["a", "b", "c", "d"].map(|n| (n.to_string(), Recipe::Copy(n.to_string()))).to_vec();
        let names = |s: Vec<Vec<(String, Recipe)>>| s.iter().map(|sh| sh.iter().map(|(n, _)| n.as_str()).collect::<String>()).collect::<Vec<_>>();
        assert_eq!(names(shards(plan(), &src, Some(80)).unwrap()), ["ab", "c", "d"]);
        assert_eq!(names(shards(plan(), &src, Some(200)).unwrap()), ["ab", "cd"]);
        assert_eq!(names(shards(plan(), &src, None).unwrap()), ["abcd"]);
        assert!(is_export_file("model-00002-of-00003.safetensors") && !is_export_file("config.json") && !is_export_file("other.safetensors"));
    }
}
