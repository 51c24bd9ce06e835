//! Training metrics as JSON lines, for plots and monitoring: [`MetricsLog`] appends one JSON
//! object per record ([`StepMetrics`] after each optimizer step, [`EvalMetrics`] after each
//! evaluation, [`TimersMetrics`] where the timers are printed) to a file, flushed line by line, so `tail -f` and a crash both see every
//! finished step. A resumed run appends to the same file: where steps repeat (a run resumed
//! from an older checkpoint), the last record of a step is the one that counts. A NaN or an
//! infinity is written as `null` (JSON has neither).
//!
//! ```no_run
//! use burn_parallel::metrics::{MetricsLog, StepMetrics};
//! let mut log = MetricsLog::append("metrics.jsonl").unwrap();
//! let record = StepMetrics { step: 1, loss: 5.5, lr: 3e-4, grad_norm: Some(1.2), tokens_seen: 8192, tokens_per_sec: 1e4, elapsed_secs: 0.8 };
//! log.write(&record).unwrap();
//! ```

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// One optimizer step.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StepMetrics {
    /// Steps done.
    pub step: u64,
    /// The step's training loss (mean over micro-batches and data-parallel replicas).
    pub loss: f32,
    /// The learning rate the step used.
    pub lr: f64,
    /// The global gradient norm before clipping, where the optimizer computed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grad_norm: Option<f32>,
    /// Tokens trained on so far (all replicas).
    pub tokens_seen: u64,
    /// Tokens per second of this step.
    pub tokens_per_sec: f64,
    /// Seconds since the run (this process) started.
    pub elapsed_secs: f64,
}

/// One evaluation.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EvalMetrics {
    /// Steps done when evaluated.
    pub step: u64,
    /// The validation loss.
    pub val_loss: f32,
}

/// Where the time of some steps went: the [`crate::timing`] summary over the ranks.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TimersMetrics {
    /// Steps done.
    pub step: u64,
    /// The steps the timers cover (the last ones).
    pub steps: u64,
    /// One entry per phase.
    pub timers: Vec<PhaseMetrics>,
}

/// One phase of [`TimersMetrics`], per step.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PhaseMetrics {
    /// The phase (`crate::timing::phase`).
    pub phase: String,
    /// Its spans per step (the most of a rank).
    pub calls_per_step: f64,
    /// The least milliseconds per step of a rank.
    pub min_ms: f64,
    /// The mean over the ranks.
    pub mean_ms: f64,
    /// The most of a rank.
    pub max_ms: f64,
    /// The rank with the most.
    pub slowest_rank: usize,
}

impl TimersMetrics {
    /// The record of `rows` ([`crate::timing::summarize`]) over the `steps` steps up to `step`.
    pub fn new(step: u64, steps: u64, rows: &[crate::timing::PhaseSummary]) -> Self {
        let per = |d: std::time::Duration| d.as_secs_f64() * 1e3 / steps.max(1) as f64;
        let timers = rows
            .iter()
            .map(|r| PhaseMetrics {
                phase: r.phase.to_string(),
                calls_per_step: r.calls as f64 / steps.max(1) as f64,
                min_ms: per(r.min),
                mean_ms: per(r.mean),
                max_ms: per(r.max),
                slowest_rank: r.max_rank,
            })
            .collect();
        Self { step, steps, timers }
    }
}

/// The metrics file cannot be opened or written.
#[derive(Debug, thiserror::Error)]
#[error("cannot {op} the metrics file {}: {source}", path.display())]
pub struct MetricsError {
    /// What was attempted.
    pub op: &'static str,
    /// The file.
    pub path: PathBuf,
    /// The operating system's error.
    pub source: std::io::Error,
}

/// A JSON-lines metrics file, appended to.
#[derive(Debug)]
pub struct MetricsLog {
    file: BufWriter<File>,
    path: PathBuf,
}

impl MetricsLog {
    /// Opens `path` for appending (created if missing; its directory must exist).
    pub fn append(path: impl AsRef<Path>) -> Result<Self, MetricsError> {
        let path = path.as_ref().to_path_buf();
        let file =
            std::fs::OpenOptions::new().create(true).append(true).open(&path).map_err(|source| MetricsError { op: "open", path: path.clone(), source })?;
        Ok(Self { file: BufWriter::new(file), path })
    }

    /// Appends `record` as one line and flushes it.
    pub fn write<T: serde::Serialize>(&mut self, record: &T) -> Result<(), MetricsError> {
        let err = |source| MetricsError { op: "write", path: self.path.clone(), source };
        let mut line = serde_json::to_vec(record).map_err(|e| err(std::io::Error::other(e)))?;
        line.push(b'\n');
        self.file.write_all(&line).and_then(|_| self.file.flush()).map_err(err)
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_appended_one_per_line_and_read_back() {
        let path = std::env::temp_dir().join(format!("bp-metrics-{}.jsonl", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let step =
            |n: u64, loss: f32| StepMetrics { step: n, loss, lr: 1e-3, grad_norm: Some(0.5), tokens_seen: 64 * n, tokens_per_sec: 10.0, elapsed_secs: 0.1 };
        MetricsLog::append(&path).unwrap().write(&step(1, 5.0)).unwrap();
        let mut log = MetricsLog::append(&path).unwrap();
        log.write(&EvalMetrics { step: 1, val_loss: 4.5 }).unwrap();
        log.write(&step(2, f32::NAN)).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert_eq!(serde_json::from_str::<StepMetrics>(lines[0]).unwrap(), step(1, 5.0));
        assert_eq!(serde_json::from_str::<EvalMetrics>(lines[1]).unwrap(), EvalMetrics { step: 1, val_loss: 4.5 });
        assert!(lines[2].contains("\"loss\":null"), "a NaN loss is null: {}", lines[2]);
        let e = MetricsLog::append(path.join("below-a-file")).unwrap_err().to_string();
        assert!(e.contains("cannot open the metrics file") && e.contains("below-a-file"), "{e}");
        std::fs::remove_file(path).unwrap();
    }
}
