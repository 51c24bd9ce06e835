//! Distributed checkpoints: every rank saves its own shards, any layout loads them.
//!
//! Main types: [`Checkpointer`] (collective save, synchronous or asynchronous, atomic commit,
//! keep-last-K), [`Checkpoint`] (open, validate, read any box of any tensor),
//! [`module_tensors`] / [`load_module`] and [`adamw_tensors`] / [`load_adamw`] (a Burn module and
//! Burn's AdamW to named host tensors and back), [`export_model`] (one `model.safetensors`).
//!
//! A checkpoint is a directory `step-N/` of per-rank **safetensors** files and one
//! `metadata.json` (versioned) that lists, for every tensor, its global shape, dtype and the
//! chunks that cover it (file, offset per dimension, shape, CRC-32), plus the parallel layout,
//! the training position ([`TrainState`]: step, tokens, global sample counter), named counters
//! (random streams, optimizer step counts) and free-form sections (model config, run arguments).
//! Names are those of the **unsplit** model, so a checkpoint does not depend on how it was split:
//!
//! - **save**: each rank writes the chunks it holds, no gather; a tensor held by several ranks
//!   (replicated over TP, or on DP replicas) is written once;
//! - **load at another layout** (tp, pp, virtual stages, dp, SP): each rank computes its box of
//!   each tensor and copies it from the chunks that intersect it.
//!
//! Invariants: a directory is a checkpoint iff it is named `step-N` and holds `metadata.json`
//! (written last, before the directory is renamed into place; see [`write`](mod@write) for the protocol);
//! each chunk is written by exactly one rank; the chunks of a tensor cover it exactly once
//! (checked when saving and when opening); a load reads and checks everything before changing
//! the model or optimizer. Several ranks (threads or processes) write into one directory: the
//! save directory must be on a file system all ranks see.
//!
//! ```
//! use burn::backend::{Autodiff, Flex};
//! use burn::module::Module;
//! use burn::nn::LinearConfig;
//! use burn_parallel::checkpoint::*;
//! use burn_parallel::{LocalWorld, ParallelConfig};
//!
//! type B = Autodiff<Flex>;
//! let dir = std::env::temp_dir().join(format!("bp-doc-{}", std::process::id()));
//! let world = LocalWorld::new(1).communicator(0);
//! let model = LinearConfig::new(4, 3).init::<B>(&Default::default());
//! let same = |p: &str| p.to_string();
//! let mut saver = Checkpointer::new(CheckpointOptions { dir: dir.clone(), keep: 2, async_save: false }, world);
//! let snapshot = Snapshot {
//!     step: 10,
//!     layout: ParallelConfig::new(),
//!     train: TrainState { step: 10, ..Default::default() },
//!     tensors: module_tensors(&model, &same, ShardContext::single()),
//!     counters: Default::default(),
//!     sections: Default::default(),
//! };
//! saver.save(snapshot).unwrap();
//! let ckpt = Checkpoint::open(&dir).unwrap(); // the newest committed checkpoint
//! let fresh = LinearConfig::new(4, 3).init::<B>(&Default::default());
//! let loaded = load_module(&ckpt, fresh, MODEL_PREFIX, &same, ShardContext::single()).unwrap();
//! assert_eq!(loaded.weight.val().into_data(), model.weight.val().into_data());
//! # std::fs::remove_dir_all(&dir).unwrap();
//! ```

pub mod convert;
pub mod diff;
mod error;
mod export;
pub mod format;
pub mod hf;
pub mod hf_export;
pub mod hf_llama;
mod read;
mod saver;
mod state;
pub mod write;

pub use error::{CheckpointError, Result};
pub use export::{export_model, full_tensors};
pub use format::{ChunkMeta, Metadata, TensorMeta, TrainState, FORMAT_VERSION};
pub use read::{committed_checkpoints, latest_checkpoint, resolve, Checkpoint};
pub use saver::{checkpoint_dir, CheckpointOptions, Checkpointer, SaveReport, Snapshot};
pub use state::{
    adamw_tensors, load_adamw, load_module, load_module_cast, module_tensors, restore_streams, stream_counters, HostTensor, Rename, ShardContext, MODEL_PREFIX,
    RNG_PREFIX,
};
pub use write::{check_timeline, write_safetensors};
