//! What can go wrong with a checkpoint: every message names the file or tensor and the numbers.

use std::path::{Path, PathBuf};

use safetensors::Dtype;

use crate::error::CommError;

/// A checkpoint could not be saved or loaded.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// A file operation failed (missing file, unwritable directory, disk full, ...).
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        /// What was attempted (`create`, `write`, `read`, `rename`, ...).
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// No committed checkpoint where one was asked for.
    #[error("no checkpoint in {}: {why}", dir.display())]
    NotFound {
        /// The directory looked at.
        dir: PathBuf,
        /// Why nothing was found.
        why: String,
    },
    /// The metadata file is not one this build understands.
    #[error("{}: {msg}", path.display())]
    Format {
        /// The metadata file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// A data file does not hold what the metadata promises (truncated, corrupted, another
    /// file).
    #[error("{}: tensor {tensor}: {msg}", file.display())]
    Corrupt {
        /// The data file.
        file: PathBuf,
        /// The tensor (or `*` for the file itself).
        tensor: String,
        /// What does not match, with both numbers.
        msg: String,
    },
    /// A tensor the model needs is not in the checkpoint.
    #[error("{}: no tensor {name} (the checkpoint has {available} tensors; is it of another model?)", dir.display())]
    MissingTensor {
        /// The checkpoint.
        dir: PathBuf,
        /// The tensor.
        name: String,
        /// How many tensors it has.
        available: usize,
    },
    /// The checkpoint's tensor has another shape than the model's.
    #[error("tensor {name}: the checkpoint holds shape {checkpoint:?} but the model expects {model:?} (another model configuration?)")]
    ShapeMismatch {
        /// The tensor.
        name: String,
        /// Global shape in the checkpoint.
        checkpoint: Vec<usize>,
        /// Global shape the model expects.
        model: Vec<usize>,
    },
    /// The checkpoint's tensor has another dtype than the model's (never converted silently).
    #[error("tensor {name}: the checkpoint holds {checkpoint:?} but the model's parameter is {model:?} (no silent conversion)")]
    DtypeMismatch {
        /// The tensor.
        name: String,
        /// Dtype in the checkpoint.
        checkpoint: Dtype,
        /// Dtype of the model's parameter.
        model: Dtype,
    },
    /// The chunks of a tensor do not cover it exactly once.
    #[error("tensor {name}: {msg}")]
    Coverage {
        /// The tensor.
        name: String,
        /// The gap or overlap, with offsets and shapes.
        msg: String,
    },
    /// Saving failed on some ranks; the previous checkpoint is untouched.
    #[error("checkpoint of step {step} not committed: {msg}")]
    NotCommitted {
        /// The step that was being saved.
        step: u64,
        /// Which ranks failed and why (rank 0 names its own error).
        msg: String,
    },
    /// The background write of an asynchronous save failed (reported at the next save, poll or
    /// finish; the previous checkpoint is untouched).
    #[error("asynchronous save of step {step} failed: {source}")]
    Async {
        /// The step that was being saved.
        step: u64,
        /// The write's error.
        source: Box<CheckpointError>,
    },
    /// A collective of the save protocol failed.
    #[error(transparent)]
    Comm(#[from] CommError),
    /// Anything else that is invalid (with numbers).
    #[error("{0}")]
    Invalid(String),
}

impl CheckpointError {
    /// An [`Io`](Self::Io) error.
    pub fn io(op: &'static str, path: &Path, source: std::io::Error) -> Self {
        Self::Io { op, path: path.to_path_buf(), source }
    }
}

/// Result of checkpoint operations.
pub type Result<T, E = CheckpointError> = std::result::Result<T, E>;
