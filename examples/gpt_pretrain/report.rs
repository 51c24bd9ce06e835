//! What rank 0 shows and records of a run: the progress bar (loss, gradient norm, tokens/s),
//! `--print-every`'s exact `step N loss L` lines, `--metrics FILE`'s JSON lines
//! (`burn_parallel::metrics`), and the throughput over the warm steps.

use std::time::Instant;

use burn_parallel::checkpoint::TrainState;
use burn_parallel::metrics::{EvalMetrics, MetricsLog, StepMetrics};
use indicatif::{ProgressBar, ProgressStyle};

use super::Args;

/// Rank 0's reporting (other ranks get a hidden bar and no file).
pub(crate) struct Reporter {
    bar: ProgressBar,
    rank0: bool,
    print_every: usize,
    metrics: Option<MetricsLog>,
    start: Instant,
}

impl Reporter {
    /// Rank `rank`'s reporter of a run starting after `start` steps (rank 0 opens `--metrics`).
    pub(crate) fn new(args: &Args, rank: usize, start: u64) -> Result<Self, String> {
        let (bar, metrics) = match rank {
            0 => {
                let bar = ProgressBar::new(args.exit_at_step.unwrap_or(args.steps) as u64);
                bar.set_position(start);
                bar.set_style(ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} {msg}").unwrap().progress_chars("=> "));
                let metrics = args.metrics.as_ref().map(MetricsLog::append).transpose().map_err(|e| format!("--metrics: {e}"))?;
                (bar, metrics)
            }
            _ => (ProgressBar::hidden(), None),
        };
        Ok(Self { bar, rank0: rank == 0, print_every: args.print_every, metrics, start: Instant::now() })
    }

    /// A step is done (`train` counts it): the bar, the exact loss line, the metrics record.
    pub(crate) fn step(&mut self, train: &TrainState, loss: f32, grad_norm: Option<f32>, tokens_per_sec: f64) {
        let norm = grad_norm.map_or(String::new(), |n| format!("  |g| {n:.3}"));
        self.bar.set_message(format!("loss {loss:.4}{norm}  {tokens_per_sec:.0} tok/s"));
        self.bar.inc(1);
        if self.rank0 && self.print_every > 0 && train.step.is_multiple_of(self.print_every as u64) {
            self.bar.suspend(|| say!("step {} loss {loss:?}", train.step));
        }
        let record = || StepMetrics {
            step: train.step,
            loss,
            lr: train.lr,
            grad_norm,
            tokens_seen: train.tokens_seen,
            tokens_per_sec,
            elapsed_secs: self.start.elapsed().as_secs_f64(),
        };
        let record = record();
        self.record(&record);
    }

    /// Appends a metrics record; a failed write (a full disk) is logged once and ends the
    /// metrics file, not the run.
    fn record<T: serde::Serialize>(&mut self, record: &T) {
        if let Some(Err(e)) = self.metrics.as_mut().map(|log| log.write(record)) {
            self.bar.suspend(|| tracing::warn!(error = %e, "--metrics: no more records are written"));
            self.metrics = None;
        }
    }

    /// An evaluation after `step` steps.
    pub(crate) fn eval(&mut self, step: u64, train_loss: f32, val_loss: f32) {
        self.record(&EvalMetrics { step, val_loss });
        if self.rank0 {
            self.bar.suspend(|| tracing::info!(step, train_loss, val_loss, "evaluation"));
        }
    }

    /// The timers of the `steps` steps up to `step` over `ranks` ranks: printed and recorded.
    pub(crate) fn timers(&mut self, step: u64, steps: u64, ranks: usize, rows: &[burn_parallel::timing::PhaseSummary]) {
        if !self.rank0 {
            return;
        }
        let table = burn_parallel::timing::table(rows, steps);
        let first = step + 1 - steps.max(1);
        self.bar.suspend(|| say!("timers of steps {first}-{step}, {ranks} ranks (ms per step: least, mean and most of a rank):\n{table}"));
        self.record(&burn_parallel::metrics::TimersMetrics::new(step, steps, rows));
    }

    /// The run's steps are over.
    pub(crate) fn finish(&self) {
        self.bar.finish();
    }
}

/// Tokens per second over the steps after the first two (kernel compilation and warm-up on a
/// GPU), or over every step of shorter runs.
pub(crate) struct Throughput {
    start: Instant,
    first: u64,
    warm: Option<(Instant, u64)>,
}

impl Throughput {
    pub(crate) fn new(first: u64) -> Self {
        Self { start: Instant::now(), first, warm: None }
    }

    pub(crate) fn step_done(&mut self, done: u64) {
        if done == self.first + 2 {
            self.warm = Some((Instant::now(), done));
        }
    }

    pub(crate) fn tokens_per_sec(&self, done: u64, tokens_per_step: f64) -> f64 {
        match self.warm {
            Some((t, at)) if done > at => tokens_per_step * (done - at) as f64 / t.elapsed().as_secs_f64(),
            _ => tokens_per_step * (done - self.first) as f64 / self.start.elapsed().as_secs_f64(),
        }
    }
}
