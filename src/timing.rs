//! Where each rank's time goes: Megatron's timers (`--timing-log-level`: each phase's time, min
//! and max over the ranks) and a trace of every rank's phases for Perfetto / `chrome://tracing`
//! (torchtitan's profiler traces), both from `tracing` spans.
//!
//! The library opens a span of target [`TARGET`] (level TRACE, so that logging at `info` does
//! not show them) around each phase: the pipeline executor's forward, backward and weight-gradient
//! computations and its point-to-point exchanges, the GPT's forward + backward per micro-batch,
//! and `DistAdamW`'s gradient reduction, tied-gradient sum, norm, update and ZeRO all-gather; the
//! example adds the step, its data, checkpoint saves, evaluations and the agreed-stop check. The
//! names are [`phase`]'s.
//!
//! - [`TimersLayer`] (install it in the subscriber; [`layer`] filters it to [`TARGET`]) adds up
//!   each span's time, per thread: a rank's, as thread ranks are threads and process ranks their
//!   main thread. [`take`] returns and resets the calling thread's [`Timings`]; [`summarize`]
//!   gathers every rank's over a communicator into one row per phase: calls, the least, mean and
//!   most time of a rank, and which rank took the most (the straggler), as [`table`] prints.
//! - [`trace_layer`] writes every span of [`TARGET`] to a Chrome trace file (`tracing-chrome`),
//!   one row per thread, named by the thread (`rank-N` for thread ranks).
//!
//! Times are the host's: on a GPU backend, whose kernels run asynchronously, a phase ends when its
//! work is queued unless something in it waits for the device (a collective, a loss read back).
//! [`set_device_sync`] makes every span of the thread wait for the device when it starts and
//! ends (as Megatron's timers synchronize CUDA): then the phases measure the device's work, at
//! the cost of the overlap between host and device. Spans nest (a step holds its forward), so
//! the phases' times overlap.
//!
//! ```
//! use burn_parallel::timing::{self, phase};
//! use tracing_subscriber::layer::SubscriberExt;
//!
//! let subscriber = tracing_subscriber::registry().with(timing::layer());
//! tracing::subscriber::with_default(subscriber, || {
//!     for _ in 0..3 {
//!         let _step = timing::span!(phase::STEP).entered();
//!     }
//!     let t = timing::take();
//!     assert_eq!(t.get(phase::STEP).map(|p| p.calls), Some(3));
//! });
//! ```

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use burn::tensor::TensorData;
use tracing::span::Id;
use tracing::Subscriber;
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::registry::LookupSpan;

use crate::{Comm, CommError};

/// The target of the library's timing spans.
pub const TARGET: &str = "burn_parallel::timing";

/// The phases' span names, in the order [`table`] lists them.
pub mod phase {
    /// One training step (the example's loop).
    pub const STEP: &str = "step";
    /// Building the step's batches.
    pub const DATA: &str = "data";
    /// A micro-batch's forward and backward (`Gpt::forward_backward_accumulated`).
    pub const FORWARD_BACKWARD: &str = "forward-backward";
    /// A pipeline stage's forward of a micro-batch.
    pub const FORWARD: &str = "forward";
    /// A pipeline stage's backward of a micro-batch (`B`, or `I` under zero-bubble schedules).
    pub const BACKWARD: &str = "backward";
    /// A pipeline stage's weight gradients (`W`, zero-bubble schedules).
    pub const WEIGHT_GRAD: &str = "weight-grad";
    /// A batch of pipeline sends and receives (waiting for the neighbour included).
    pub const PIPELINE_P2P: &str = "pipeline-p2p";
    /// The DP mean of the gradients (all-reduce, or ZeRO's reduce-scatter).
    pub const GRADS_REDUCE: &str = "grads-reduce";
    /// The tied embedding's two gradients summed over the embedding group.
    pub const TIED_GRADS: &str = "tied-grads";
    /// The global gradient norm (and the non-finite check).
    pub const GRAD_NORM: &str = "grad-norm";
    /// The AdamW update of this rank's parameters (or ZeRO shard).
    pub const OPTIMIZER: &str = "optimizer";
    /// ZeRO's all-gather of the updated parameters, and putting them into the model.
    pub const PARAMS_GATHER: &str = "params-gather";
    /// The per-step agreement on stopping (an all-reduce over the world: waits for the slowest).
    pub const STOP_CHECK: &str = "stop-check";
    /// A checkpoint save (the copy to host memory; the whole write unless asynchronous).
    pub const CHECKPOINT: &str = "checkpoint";
    /// An evaluation.
    pub const EVAL: &str = "eval";

    /// Every phase, in order.
    pub const ALL: [&str; 15] = [
        STEP,
        DATA,
        FORWARD_BACKWARD,
        FORWARD,
        BACKWARD,
        WEIGHT_GRAD,
        PIPELINE_P2P,
        GRADS_REDUCE,
        TIED_GRADS,
        GRAD_NORM,
        OPTIMIZER,
        PARAMS_GATHER,
        STOP_CHECK,
        CHECKPOINT,
        EVAL,
    ];
}

/// A TRACE span of target [`TARGET`] named by a [`phase`] constant, with optional fields:
/// `timing::span!(phase::FORWARD, stage = s, mb = m)`.
#[macro_export]
macro_rules! timing_span {
    ($name:expr $(, $($fields:tt)*)?) => {
        $crate::__tracing::trace_span!(target: "burn_parallel::timing", $name $(, $($fields)*)?)
    };
}
pub use crate::timing_span as span;

/// One phase's time on one thread.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Phase {
    /// Times a span of it was entered and exited (once for a span entered once).
    pub calls: u64,
    /// Their time, summed.
    pub total: Duration,
}

/// A thread's phases since the last [`take`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Timings {
    phases: BTreeMap<&'static str, Phase>,
}

impl Timings {
    /// The phase named `name`, if any span of it closed.
    pub fn get(&self, name: &str) -> Option<Phase> {
        self.phases.get(name).copied()
    }

    /// Every phase seen.
    pub fn phases(&self) -> impl Iterator<Item = (&'static str, Phase)> + '_ {
        self.phases.iter().map(|(n, p)| (*n, *p))
    }
}

/// A wait for this thread's device (see [`set_device_sync`]).
pub type DeviceSync = Box<dyn Fn()>;

thread_local! {
    static TIMINGS: RefCell<Timings> = RefCell::new(Timings::default());
    static SYNC: RefCell<Option<DeviceSync>> = const { RefCell::new(None) };
}

/// Makes [`TimersLayer`] call `sync` (e.g. `|| B::sync(&device)`, the rank's device) on this
/// thread before it reads the clock at each span's start and end, so that a phase holds the
/// device work it queued and none queued before it; `None` stops it.
pub fn set_device_sync(sync: Option<DeviceSync>) {
    SYNC.with(|s| *s.borrow_mut() = sync);
}

fn device_sync() {
    SYNC.with(|s| {
        if let Some(f) = s.borrow().as_ref() {
            f();
        }
    });
}

/// The calling thread's timings since its last `take` (then reset).
pub fn take() -> Timings {
    TIMINGS.with(|t| std::mem::take(&mut *t.borrow_mut()))
}

/// A `tracing` layer adding up the time of each span it sees, per thread (see the module docs).
#[derive(Debug, Clone, Copy, Default)]
pub struct TimersLayer;

/// When a span was entered (in its extensions).
struct Entered(Instant);

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for TimersLayer {
    fn on_enter(&self, id: &Id, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            device_sync();
            span.extensions_mut().replace(Entered(Instant::now()));
        }
    }

    fn on_exit(&self, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        if span.extensions().get::<Entered>().is_none() {
            return;
        }
        device_sync();
        let Some(Entered(at)) = span.extensions_mut().remove::<Entered>() else { return };
        let name = span.metadata().name();
        TIMINGS.with(|t| {
            let mut t = t.borrow_mut();
            let p = t.phases.entry(name).or_default();
            p.calls += 1;
            p.total += at.elapsed();
        });
    }
}

/// [`TimersLayer`] for the spans of [`TARGET`] only.
pub fn layer<S: Subscriber + for<'a> LookupSpan<'a>>() -> impl Layer<S> {
    TimersLayer.with_filter(tracing_subscriber::filter::Targets::new().with_target(TARGET, tracing::Level::TRACE))
}

/// A layer writing every span of [`TARGET`] to the Chrome trace file `path` (Perfetto,
/// `chrome://tracing`), and the guard that completes the file when dropped (keep it until the
/// end of the run).
pub fn trace_layer<S: Subscriber + for<'a> LookupSpan<'a> + Send + Sync>(path: &std::path::Path) -> (impl Layer<S>, tracing_chrome::FlushGuard) {
    let (chrome, guard) = tracing_chrome::ChromeLayerBuilder::new().file(path).include_args(true).build();
    (chrome.with_filter(tracing_subscriber::filter::Targets::new().with_target(TARGET, tracing::Level::TRACE)), guard)
}

/// One phase over every rank: see [`summarize`].
#[derive(Debug, Clone, PartialEq)]
pub struct PhaseSummary {
    /// The phase's name.
    pub phase: &'static str,
    /// The most calls of a rank.
    pub calls: u64,
    /// The least time of a rank (ranks without the phase count as 0).
    pub min: Duration,
    /// The mean over the ranks.
    pub mean: Duration,
    /// The most time of a rank.
    pub max: Duration,
    /// Which rank took `max` (the lowest of equals).
    pub max_rank: usize,
}

/// Every rank's [`phase::ALL`] timings (`local`: this rank's) gathered over `world`, one row per
/// phase that some rank saw, in [`phase::ALL`]'s order; the same on every rank. A collective:
/// every rank of `world` calls it.
pub fn summarize(local: &Timings, world: &Comm) -> Result<Vec<PhaseSummary>, CommError> {
    let n = phase::ALL.len();
    let mut mine = Vec::with_capacity(2 * n);
    for name in phase::ALL {
        let p = local.get(name).unwrap_or_default();
        mine.extend([p.calls as f64, p.total.as_secs_f64()]);
    }
    let all = world.all_gather(TensorData::new(mine, [1, 2 * n]), 0)?;
    let all = all.to_vec::<f64>().map_err(|e| CommError::Backend(format!("{e:?}")))?;
    let ranks = all.len() / (2 * n);
    let mut rows = Vec::new();
    for (i, name) in phase::ALL.into_iter().enumerate() {
        let at = |r: usize| (all[r * 2 * n + 2 * i], all[r * 2 * n + 2 * i + 1]);
        let calls = (0..ranks).map(|r| at(r).0 as u64).max().unwrap_or(0);
        if calls == 0 {
            continue;
        }
        let secs: Vec<f64> = (0..ranks).map(|r| at(r).1).collect();
        let max_rank = (0..ranks).fold(0, |best, r| if secs[r] > secs[best] { r } else { best });
        let min = secs.iter().copied().fold(f64::INFINITY, f64::min);
        let mean = secs.iter().sum::<f64>() / ranks as f64;
        let d = Duration::from_secs_f64;
        rows.push(PhaseSummary { phase: name, calls, min: d(min), mean: d(mean), max: d(secs[max_rank]), max_rank });
    }
    Ok(rows)
}

/// The rows as a Markdown table of milliseconds per step over `steps` steps.
pub fn table(rows: &[PhaseSummary], steps: u64) -> String {
    let mut out = String::from("| phase | calls/step | min ms/step | mean ms/step | max ms/step | slowest rank |\n|---|---|---|---|---|---|\n");
    // Per step as `--metrics` records them.
    for p in crate::metrics::TimersMetrics::new(0, steps, rows).timers {
        out += &format!("| {} | {:.1} | {:.2} | {:.2} | {:.2} | {} |\n", p.phase, p.calls_per_step, p.min_ms, p.mean_ms, p.max_ms, p.slowest_rank);
    }
    out
}
