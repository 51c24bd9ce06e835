//! Pipeline parallelism: split a model's layers into stages on the ranks of a pipeline group and
//! run a [`Schedule`](burn_parallel_schedules::Schedule)'s plan over micro-batches.
//!
//! A model becomes pipelinable by implementing [`PipelineModel`]: it lists its layers, builds the
//! part a stage holds ([`PartSpec`]: a layer range plus, on the first/last stage, what runs
//! before/after the layers) and runs that part forward. The [`PipelineExecutor`] builds only this
//! rank's stages (balanced by default, an explicit [`StageLayout`] allowed) and executes the plan:
//!
//! - `F`: forward a micro-batch through a stage; keep its autodiff graph until its backward.
//!   A stage's input activation is a **fresh leaf** (`recv → require_grad`), and so is every
//!   parameter: each micro-batch runs on a shallow copy of the stage whose parameters are new
//!   leaves with the same ids. Otherwise the graphs of in-flight micro-batches merge through the
//!   shared parameters, and Burn 0.21's graph clean-up (run after every `backward()`, from any
//!   thread) intermittently drops nodes of a merged graph still waiting for its backward.
//! - `B`: backward with the received output gradient `g` as a vector-Jacobian product,
//!   `(y · g).sum().backward()` (on the last stage: `loss / m`), send `∂/∂input` upstream, and
//!   accumulate parameter gradients over micro-batches. `I`/`W` (split backward): `I` runs that
//!   backward and sends the input gradient at once; `W` adds the parameter gradients it stashed.
//!   (Burn 0.21 computes all gradients of a graph in one pass, so the split changes the order in
//!   which gradients travel, not the amount of compute.)
//! - `SEND_*`/`RECV_*`: point-to-point on the pipeline group; every receive states the expected
//!   shape and dtype, so a mismatch is an error naming both ranks, never a hang or silent
//!   truncation. Messages are tagged by (kind, stage, micro-batch), so activations and gradients
//!   between the same two ranks never mix. Sends never block on the local backend, and every plan
//!   is checked by a dry run to be deadlock-free under that model before it runs.
//!
//! With ranks as threads, Burn's process-global autodiff clean-up makes a rank that finishes a
//! backward wait for any backward running on another rank (see `BENCHMARKS.md`); the executor
//! itself adds about 1% to the simulated makespan. Models with collectives inside their backward
//! name their TP group ([`PipelineModel::tensor_parallel_group`]) so the executor can keep TP
//! peers from deadlocking on that clean-up.

//!
//! Evaluation ([`PipelineExecutor::forward_loss`]) runs under an [`EvaluationScope`], each
//! stage's [`PipelineModel::forward_valid`] (its inner module: no autodiff graph) where the
//! model has one, else its `forward` on detached parameters. That one stays on the autodiff
//! backend (where Burn 0.21's `ad_enabled()` is always true), so training-only layers ask
//! [`evaluating`] instead (the modules crate's dropout does).

mod executor;
mod layout;
mod model;
pub(crate) mod tied;

use std::cell::Cell;
use std::marker::PhantomData;

pub use executor::{PipelineError, PipelineExecutor, PipelineModel, PipelineOptions, Stage, StageGrads, StageOutput, StepOutput};
pub use layout::{PartSpec, StageLayout};
pub use tied::TiedError;

thread_local! {
    static EVALUATING: Cell<usize> = const { Cell::new(0) };
}

/// While alive, this thread (a rank) evaluates: [`evaluating`] is true, so training-only layers
/// such as dropout pass activations through. Nests; not `Send` (it marks its own thread).
#[derive(Debug)]
pub struct EvaluationScope {
    _thread_bound: PhantomData<*const ()>,
}

impl EvaluationScope {
    /// Enters evaluation on this thread until the scope is dropped.
    pub fn enter() -> Self {
        EVALUATING.with(|c| c.set(c.get() + 1));
        Self { _thread_bound: PhantomData }
    }
}

impl Drop for EvaluationScope {
    fn drop(&mut self) {
        EVALUATING.with(|c| c.set(c.get() - 1));
    }
}

/// Whether this thread is inside an [`EvaluationScope`].
pub fn evaluating() -> bool {
    EVALUATING.with(|c| c.get() > 0)
}
