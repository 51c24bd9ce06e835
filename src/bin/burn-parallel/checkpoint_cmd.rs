//! `burn-parallel checkpoint ...`: inspect, verify, diff, export, export-hf, import-hf.

use std::path::PathBuf;

use burn_parallel::checkpoint::{export_model, Checkpoint, CheckpointError};
use clap::Subcommand;

#[derive(Subcommand)]
pub(crate) enum CheckpointCmd {
    /// Print a checkpoint's step, layout, training position and tensors (DIR: a checkpoint, or
    /// a save directory: its newest).
    Inspect {
        /// Checkpoint or save directory.
        dir: PathBuf,
    },
    /// Check every data file's size and every chunk's checksum.
    Verify {
        /// Checkpoint or save directory.
        dir: PathBuf,
    },
    /// Compare two checkpoints (or exported model files, read as a checkpoint's `model.`
    /// tensors) tensor by tensor: one line per tensor that differs (values: how many elements,
    /// the largest absolute and relative difference; shape; dtype; present in one only), then a
    /// summary. Exit 0 if every tensor is within --atol (default 0: bitwise), else 1.
    Diff {
        /// Checkpoint, save directory (its newest) or `.safetensors` export.
        a: PathBuf,
        /// The other.
        b: PathBuf,
        /// Compare only the tensors whose names start with this (e.g. `model.` for the weights,
        /// `optim.` for the optimizer state).
        #[arg(long, default_value = "")]
        prefix: String,
        /// The largest absolute difference that counts as the same.
        #[arg(long, default_value_t = 0.0)]
        atol: f64,
    },
    /// Write the model as one unsharded safetensors file (`__metadata__ {"format": "pt"}`,
    /// dotted parameter names), readable by Python's safetensors and PyTorch.
    Export {
        /// Checkpoint or save directory.
        dir: PathBuf,
        /// Output file.
        #[arg(long, default_value = "model.safetensors")]
        out: PathBuf,
    },
    /// Write the model as a HuggingFace directory (`OUT/model.safetensors`, or shards and
    /// `OUT/model.safetensors.index.json` past --max-shard-size, and `OUT/config.json`): a
    /// Llama-style model as `LlamaForCausalLM`, any other as `GPT2LMHeadModel` (or an error
    /// naming what GPT-2 lacks). Padded vocabulary rows are dropped; a failed export leaves an
    /// earlier one in OUT as it was.
    ExportHf {
        /// Checkpoint or save directory.
        dir: PathBuf,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// The weights' dtype (`torch_dtype` in config.json): f32, bf16 or f16.
        #[arg(long, default_value = "f32", value_parser = ["f32", "bf16", "f16"])]
        dtype: String,
        /// Largest weight file, as save_pretrained's max_shard_size (e.g. 5GB, 500MB, 2GiB);
        /// a larger model is written in shards with model.safetensors.index.json; `none`: one
        /// file however large.
        #[arg(long, default_value = "5GB")]
        max_shard_size: String,
    },
    /// Convert a HuggingFace GPT-2, Llama or Mistral (by `model_type`; a directory with
    /// `model.safetensors`, or shards and their index, and `config.json`, or the `.safetensors`
    /// file with its `config.json` beside it) into this crate's export layout for
    /// `gpt_pretrain --init-from OUT`; prints the flags the model needs.
    ImportHf {
        /// HuggingFace directory or `.safetensors` file.
        from: PathBuf,
        /// Output file.
        #[arg(long)]
        out: PathBuf,
    },
}

/// Runs `action`; the process's exit code (`diff`: 1 where the checkpoints differ).
pub(crate) fn run(action: CheckpointCmd) -> Result<i32, CheckpointError> {
    match action {
        CheckpointCmd::Inspect { dir } => {
            let ckpt = Checkpoint::open(&dir)?;
            let m = ckpt.metadata();
            println!("{}: step {} (format version {})", ckpt.dir().display(), m.step, m.version);
            let l = &m.layout;
            println!(
                "layout: dp {} cp {} pp {} tp {} virtual stages {} sequence parallel {}",
                l.data_parallel, l.context_parallel, l.pipeline_parallel, l.tensor_parallel, l.virtual_stages, l.sequence_parallel
            );
            println!("train: {} tokens, {} samples, lr {:e}", m.train.tokens_seen, m.train.samples_seen, m.train.lr);
            println!("files: {} ({} bytes)", m.files.len(), m.files.values().sum::<u64>());
            for (name, t) in &m.tensors {
                println!("  {name} {:?} {:?} in {} chunks", t.dtype, t.shape, t.chunks.len());
            }
            println!("counters: {}", m.counters.len());
        }
        CheckpointCmd::Verify { dir } => {
            let ckpt = Checkpoint::open(&dir)?;
            ckpt.verify()?;
            println!("{}: {} tensors, {} files: sizes and checksums ok", ckpt.dir().display(), ckpt.metadata().tensors.len(), ckpt.metadata().files.len());
        }
        CheckpointCmd::Diff { a, b, prefix, atol } => return diff(&a, &b, &prefix, atol),
        CheckpointCmd::Export { dir, out } => {
            let ckpt = Checkpoint::open(&dir)?;
            let bytes = export_model(&ckpt, &out)?;
            println!("{} -> {} ({bytes} bytes of tensors)", ckpt.dir().display(), out.display());
        }
        CheckpointCmd::ExportHf { dir, out, dtype, max_shard_size } => {
            use burn_parallel::checkpoint::hf_export::{export_hf_with, parse_size, HfExportOptions};
            let dtype = match dtype.as_str() {
                "bf16" => safetensors::Dtype::BF16,
                "f16" => safetensors::Dtype::F16,
                _ => safetensors::Dtype::F32,
            };
            let max_shard_bytes = match max_shard_size.as_str() {
                "none" => None,
                size => Some(parse_size(size).map_err(|e| CheckpointError::Invalid(format!("--max-shard-size {e}")))?),
            };
            let ckpt = Checkpoint::open(&dir)?;
            let c = export_hf_with(&ckpt, &out, &HfExportOptions { dtype, max_shard_bytes })?;
            println!("{} -> {} ({})", ckpt.dir().display(), out.display(), c.describe());
        }
        CheckpointCmd::ImportHf { from, out } => {
            let c = burn_parallel::checkpoint::hf::import_hf(&from, &out)?;
            println!("{} -> {} ({}); train it with:\n  gpt_pretrain --init-from {} {}", from.display(), out.display(), c.describe(), out.display(), c.flags()?);
        }
    }
    Ok(0)
}

/// `checkpoint diff`: prints what differs; 0 if every tensor is within `atol`, else 1.
fn diff(a: &std::path::Path, b: &std::path::Path, prefix: &str, atol: f64) -> Result<i32, CheckpointError> {
    use burn_parallel::checkpoint::diff::{diff, open_either, DiffKind};
    let (ca, cb) = (open_either(a)?, open_either(b)?);
    let diffs = diff(&ca, &cb, prefix)?;
    let mut differ = 0;
    for d in diffs.iter().filter(|d| !d.within(atol)) {
        differ += 1;
        match &d.kind {
            DiffKind::OnlyInA => println!("{prefix}{}: only in {}", d.name, a.display()),
            DiffKind::OnlyInB => println!("{prefix}{}: only in {}", d.name, b.display()),
            DiffKind::Shape { a, b } => println!("{prefix}{}: shape {a:?} vs {b:?}", d.name),
            DiffKind::Values { differing, numel, max_abs, max_rel, dtypes_differ } => {
                let dtype = if *dtypes_differ { " (dtypes differ)" } else { "" };
                println!("{prefix}{}: {differing} of {numel} values differ, max |a - b| {max_abs:e}, relative {max_rel:e}{dtype}", d.name);
            }
            DiffKind::Equal => unreachable!("equal is within any atol"),
        }
    }
    let same = diffs.iter().filter(|d| d.kind == DiffKind::Equal).count();
    let close = diffs.len() - same - differ;
    println!("{} tensors: {same} bitwise equal, {close} within {atol}, {differ} differ", diffs.len());
    Ok(i32::from(differ > 0))
}
