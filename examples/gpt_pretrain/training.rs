//! What one rank's training loop does around each step, the same for the whole model and for
//! pipeline stages: the position in the data and the learning rate, reporting, the agreed stop
//! (signals, `--time-limit-mins`), saving when due or stopping, evaluation when due.

use std::ops::Range;
use std::time::Instant;

use burn_parallel::checkpoint::{Checkpointer, Snapshot, TrainState};
use burn_parallel::data::GlobalSampler;
use burn_parallel::optim::schedule::LrSchedule;
use burn_parallel::optim::OptimError;
use burn_parallel::timing;
use burn_parallel::{ProcessGroups, ReduceOp};

use super::checkpointing::{self, Start};
use super::report::{Reporter, Throughput};
use super::{dp_mean, Args};

/// One rank's loop state.
pub(crate) struct Loop<'a> {
    args: &'a Args,
    groups: &'a ProcessGroups,
    /// The position: steps, samples and tokens done, learning rate.
    pub(crate) train: TrainState,
    saver: Option<Checkpointer>,
    /// The learning rate of each step.
    schedule: LrSchedule,
    reporter: Reporter,
    throughput: Throughput,
    first: (f32, u64),
    last: u64,
    started: Instant,
    step_started: Instant,
    stopped: Option<i32>,
    /// The last step's loss (mean over replicas).
    loss: f32,
    /// The timing span of the step that runs now (`burn_parallel::timing`).
    step_span: Option<tracing::span::EnteredSpan>,
    /// The step the timers were last printed after.
    timers_from: u64,
}

/// How a rank's loop ended.
pub(crate) struct Ended {
    /// The first step's loss (mean over replicas).
    pub(crate) first_loss: f32,
    /// Tokens per second over the warm steps.
    pub(crate) tokens_per_sec: f64,
    /// The signal (or `preempt::TIME_LIMIT`) every rank stopped for, and the steps done.
    pub(crate) stopped: Option<(i32, u64)>,
}

impl<'a> Loop<'a> {
    /// The loop of this rank of `groups`, from `start`.
    pub(crate) fn new(args: &'a Args, groups: &'a ProcessGroups, start: &Start) -> Result<Self, String> {
        let train = start.train_state();
        agree_on_start(groups, train.step)?;
        let schedule = super::lr_schedule(args)?;
        let saver = checkpointing::saver(args, groups, train.step)?;
        let reporter = Reporter::new(args, groups.world.global_rank(), train.step)?;
        let (first, now) = ((f32::NAN, train.step), Instant::now());
        let last = args.exit_at_step.unwrap_or(args.steps) as u64;
        Ok(Self {
            args,
            groups,
            schedule,
            throughput: Throughput::new(train.step),
            train,
            saver,
            reporter,
            first,
            last,
            started: now,
            step_started: now,
            stopped: None,
            loss: f32::NAN,
            step_span: None,
            timers_from: first.1,
        })
    }

    /// Whether another step runs; starts its clock.
    pub(crate) fn running(&mut self) -> bool {
        self.step_started = Instant::now();
        let running = self.train.step < self.last;
        self.step_span = running.then(|| timing::span!(timing::phase::STEP, step = self.train.step + 1).entered());
        running
    }

    /// The 0-based index of the step that runs now.
    pub(crate) fn step(&self) -> usize {
        self.train.step as usize
    }

    /// The learning rate of the step that runs now.
    pub(crate) fn lr(&self) -> f64 {
        self.schedule.lr(self.step())
    }

    /// This replica's samples of the step that runs now.
    pub(crate) fn samples(&self) -> Range<u64> {
        GlobalSampler::replica_samples(self.train.samples_seen, self.args.batch_size, self.groups.coords.dp)
    }

    /// The error of the optimizer step: see [`checkpointing::step_failed`].
    pub(crate) fn failed(&mut self, e: OptimError) -> String {
        let step = self.step();
        checkpointing::step_failed(&mut self.saver, step, e)
    }

    /// The step is applied (`loss` this replica's, `norm` the optimizer's): counts it, reports
    /// it, agrees on stopping, and saves when due or stopping (`snapshot` of the new state).
    /// Returns whether to go on.
    pub(crate) fn done(&mut self, loss: f32, norm: Option<f32>, snapshot: impl FnOnce(&TrainState) -> Snapshot) -> Result<bool, String> {
        let (args, step) = (self.args, self.step());
        let loss = dp_mean(loss, self.groups)?;
        self.loss = loss;
        self.train.step += 1;
        self.train.samples_seen += (args.dp * args.batch_size) as u64;
        self.train.tokens_seen += (args.dp * args.batch_size * args.seq_len) as u64;
        self.train.lr = self.schedule.lr(step);
        self.throughput.step_done(self.train.step);
        if self.train.step == self.first.1 + 1 {
            self.first.0 = loss;
        }
        self.reporter.step(&self.train, loss, norm, self.tokens_per_step() / self.step_started.elapsed().as_secs_f64());
        if args.time_limit_mins.is_some_and(|m| self.started.elapsed().as_secs_f64() >= m * 60.0) {
            burn_parallel::preempt::request(burn_parallel::preempt::TIME_LIMIT);
        }
        self.stopped =
            timing::span!(timing::phase::STOP_CHECK).in_scope(|| burn_parallel::preempt::agreed_stop(&self.groups.world)).map_err(|e| e.to_string())?;
        let due = checkpointing::due(args, self.train.step, self.last, self.stopped);
        let save_span = due.then(|| timing::span!(timing::phase::CHECKPOINT, step = self.train.step).entered());
        let save = due.then(|| snapshot(&self.train));
        checkpointing::after_step(&mut self.saver, save)?;
        drop(save_span);
        self.step_span = None;
        if args.timers_every > 0 && self.train.step.is_multiple_of(args.timers_every as u64) {
            self.print_timers()?;
        }
        Ok(self.stopped.is_none())
    }

    /// Whether to evaluate after the step just done (`--eval-every`, not after the last).
    pub(crate) fn eval_due(&self) -> bool {
        let done = self.train.step as usize;
        self.args.eval_every > 0 && done.is_multiple_of(self.args.eval_every) && done < self.args.steps
    }

    /// The evaluation after the step just done.
    pub(crate) fn evaluated(&mut self, val_loss: f32) {
        self.reporter.eval(self.train.step, self.loss, val_loss);
    }

    /// The loop is over: the save in flight committed, `--export` written.
    pub(crate) fn finish(mut self) -> Result<Ended, String> {
        self.reporter.finish();
        checkpointing::finish(self.args, &mut self.saver, self.groups.world.global_rank())?;
        if (self.args.timers || self.args.timers_every > 0) && self.train.step > self.timers_from {
            self.print_timers()?;
        }
        let tokens_per_sec = self.throughput.tokens_per_sec(self.train.step, self.tokens_per_step());
        Ok(Ended { first_loss: self.first.0, tokens_per_sec, stopped: self.stopped.map(|s| (s, self.train.step)) })
    }

    /// `--timers`: every rank's phases since the last print gathered (a collective), printed
    /// and recorded by rank 0.
    fn print_timers(&mut self) -> Result<(), String> {
        let rows = timing::summarize(&timing::take(), &self.groups.world).map_err(|e| e.to_string())?;
        let steps = self.train.step - self.timers_from;
        self.reporter.timers(self.train.step, steps, self.groups.world.size(), &rows);
        self.timers_from = self.train.step;
        Ok(())
    }

    fn tokens_per_step(&self) -> f64 {
        (self.args.dp * self.args.batch_size * self.args.seq_len) as f64
    }
}

/// `--timers`/`--trace` on a GPU: every timing span of this rank thread waits for its device
/// when it starts and ends (`timing::set_device_sync`), so the phases hold the device's work.
pub(crate) fn sync_timers<B: burn::tensor::backend::Backend>(args: &Args, device: &B::Device) {
    if args.device != super::DeviceKind::Cpu && args.timing() {
        let device = device.clone();
        timing::set_device_sync(Some(Box::new(move || {
            let _ = B::sync(&device);
        })));
    }
}

/// Every rank starts from the same step: rank processes pick the newest checkpoint each on its
/// own (`--resume latest|auto`), and a save directory seen differently (a stale network file
/// system cache after a restart) would have them train from different states.
fn agree_on_start(groups: &ProcessGroups, step: u64) -> Result<(), String> {
    let world = &groups.world;
    if world.size() == 1 {
        return Ok(());
    }
    // One all-reduce of [s, −s] with Max: the newest and the oldest start (f64: exact).
    let both = burn::tensor::TensorData::new(vec![step as f64, -(step as f64)], [2]);
    let got = world.all_reduce(both, ReduceOp::Max).map_err(|e| e.to_string())?.to_vec::<f64>().map_err(|e| format!("{e:?}"))?;
    let (newest, oldest) = (got[0], -got[1]);
    if newest != oldest {
        return Err(format!(
            "the ranks start from different steps ({oldest} to {newest}; this one {step}): they read different checkpoints of the save directory, which every rank must see alike"
        ));
    }
    Ok(())
}
