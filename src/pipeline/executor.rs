//! The executor: runs one rank's actions of a pipeline plan.

use std::any::Any;
use std::collections::HashMap;

use burn::module::{AutodiffModule, Module, ModuleMapper, Param};
use burn::optim::{GradientsAccumulator, GradientsParams, Optimizer};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, Tensor};
use burn_parallel_schedules::{check_rendezvous, steps, validate, Action, Op, PipelineShape, Plan, Schedule, ScheduleError, Step};

use super::layout::{PartSpec, StageLayout};
pub use super::model::{PipelineModel, StageGrads, StageOutput};
use crate::comm::ops::{batch_p2p_as, broadcast, recv_as, send};
use crate::error::{CommError, ConfigError};
use crate::{BackwardWith, CollectiveBackend, Comm};

/// How to pipeline.
#[derive(Debug, Clone)]
pub struct PipelineOptions {
    /// Micro-batches per step.
    pub microbatches: usize,
    /// Stages per rank (interleaved schedules), 1 otherwise.
    pub virtual_stages: usize,
    /// Layers per stage; `None` balances them.
    pub layout: Option<Vec<usize>>,
}

/// Pipelining failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PipelineError {
    /// The schedule rejected the shape, or its plan is invalid.
    #[error(transparent)]
    Schedule(#[from] ScheduleError),
    /// The layout or the model is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A send or receive failed.
    #[error(transparent)]
    Comm(#[from] CommError),
    /// A step got another number of micro-batches than the plan has.
    #[error("the plan runs {expected} micro-batches per step but the step got {got}")]
    Microbatches {
        /// Micro-batches in the plan.
        expected: usize,
        /// Micro-batches given.
        got: usize,
    },
    /// Tied parameters ([`PipelineModel::tied_params`]) that do not pair up.
    #[error(transparent)]
    Tied(#[from] super::TiedError),
}

/// One stage held by this rank.
#[derive(Debug)]
pub struct Stage<P> {
    /// Which layers.
    pub spec: PartSpec,
    /// The modules.
    pub part: P,
}

/// The result of a step on one rank.
#[derive(Debug)]
pub struct StepOutput {
    /// Mean loss over the micro-batches (computed on the last stage, broadcast to every rank).
    pub loss: f32,
    /// Accumulated parameter gradients, one per stage of this rank (chunk order).
    pub grads: Vec<GradientsParams>,
}

/// Runs a pipeline plan on one rank of a pipeline group. See the [module docs](super).
pub struct PipelineExecutor<B: AutodiffBackend, M: PipelineModel<B, D>, const D: usize> {
    model: M,
    plan: Plan,
    comm: Comm,
    device: B::Device,
    stages: Vec<Stage<M::Part>>,
}

type Key = (usize, usize);

/// A forward awaiting its backward: (input leaf, output, the parameter leaves used, what a
/// recomputing forward saved).
type Inflight<B, P, const D: usize> = (Option<Tensor<B, D>>, StageOutput<B, D>, P, Option<Box<dyn Any>>);

/// What a step keeps between actions.
struct StepState<B: AutodiffBackend, P: AutodiffModule<B>, const D: usize> {
    /// Forwards awaiting their backward.
    inflight: HashMap<Key, Inflight<B, P, D>>,
    /// Received (or handed-over) stage inputs.
    inputs: HashMap<Key, Tensor<B, D>>,
    /// Received (or handed-over) output gradients.
    out_grads: HashMap<Key, Tensor<B, D>>,
    /// Input gradients waiting for their send.
    to_send: HashMap<Key, Tensor<B, D>>,
    /// Weight gradients of `I` waiting for their `W`.
    stash: HashMap<Key, GradientsParams>,
    /// Accumulated gradients per local stage.
    acc: Vec<GradientsAccumulator<P>>,
    /// Sum of the micro-batch losses (last stage), on the device: read once per step.
    loss_sum: Option<Tensor<B::InnerBackend, 1>>,
}

impl<B: AutodiffBackend, P: AutodiffModule<B>, const D: usize> StepState<B, P, D> {
    fn add_loss(&mut self, l: Tensor<B::InnerBackend, 1>) {
        self.loss_sum = Some(match self.loss_sum.take() {
            Some(sum) => sum + l,
            None => l,
        });
    }
}

/// Replaces every parameter by a fresh autodiff leaf with the same value and id (or, with
/// `track == false`, by a detached tensor that records no graph at all).
struct FreshLeaves {
    track: bool,
}

impl<B: AutodiffBackend> ModuleMapper<B> for FreshLeaves {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let require_grad = self.track && param.is_require_grad();
        param.map(|t| if require_grad { t.detach().require_grad() } else { t.detach() }).set_require_grad(require_grad)
    }
}

/// `schedule`'s plan for `shape`, checked again here (`Schedule::plan` may be overridden): it
/// must be for `shape`, valid, and never hang under NCCL's rendezvous point-to-point.
fn checked_plan(schedule: &dyn Schedule, shape: &PipelineShape) -> Result<Plan, PipelineError> {
    let plan = schedule.plan(shape)?;
    if plan.shape != *shape || plan.ranks.len() != shape.ranks {
        return Err(ConfigError::Invalid(format!(
            "schedule {} returned a plan for {:?} with {} rank lists; this pipeline is {shape:?}",
            schedule.name(),
            plan.shape,
            plan.ranks.len()
        ))
        .into());
    }
    validate(&plan)?;
    check_rendezvous(&plan)?;
    Ok(plan)
}

/// Micro-batch numbers of [`PipelineExecutor::forward_loss`] messages start here, apart from
/// training steps.
const EVAL_TAG_OFFSET: usize = 1 << 24;

/// The tag of a message: which kind (activation or gradient), from which stage, for which
/// micro-batch.
fn tag(kind: Op, from_stage: usize, mb: usize) -> u64 {
    let k = u64::from(kind == Op::SendB);
    ((from_stage as u64) << 33) | (k << 32) | mb as u64
}

impl<B, M, const D: usize> PipelineExecutor<B, M, D>
where
    B: AutodiffBackend + CollectiveBackend + BackwardWith,
    M: PipelineModel<B, D>,
{
    /// Plans `schedule` for the pipeline group `pp` (its ranks in stage order) and builds this
    /// rank's stages.
    pub fn new(model: M, schedule: &dyn Schedule, options: &PipelineOptions, pp: Comm, device: B::Device) -> Result<Self, PipelineError> {
        let shape = PipelineShape::new(pp.size(), options.virtual_stages, options.microbatches);
        let plan = checked_plan(schedule, &shape)?;
        let layout = match &options.layout {
            Some(counts) => StageLayout::explicit(counts.clone(), model.num_layers())?,
            None => StageLayout::balanced(model.num_layers(), shape.stages())?,
        };
        if layout.stages() != shape.stages() {
            return Err(ConfigError::Invalid(format!(
                "layout has {} stages but {} ranks x {} virtual stages need {}",
                layout.stages(),
                shape.ranks,
                shape.virtual_stages,
                shape.stages()
            ))
            .into());
        }
        let stages = shape
            .stages_of(pp.rank())
            .into_iter()
            .map(|s| {
                let spec = layout.part(s);
                model.build_part(&spec, &device).map(|part| Stage { spec, part })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { model, plan, comm: pp, device, stages })
    }

    /// The plan this executor runs.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// This rank's stages.
    pub fn stages(&self) -> &[Stage<M::Part>] {
        &self.stages
    }

    /// This rank's stages, to replace their parts (e.g. with parameters loaded from a
    /// checkpoint; ids and shapes must stay those the executor built).
    pub fn stages_mut(&mut self) -> &mut [Stage<M::Part>] {
        &mut self.stages
    }

    /// The model being pipelined.
    pub fn model(&self) -> &M {
        &self.model
    }

    fn activation_dtype(&self) -> burn::tensor::DType {
        self.model.activation_dtype().unwrap_or_else(|| Tensor::<B, 1>::empty([0], &self.device).dtype())
    }

    fn local(&self, stage: usize) -> usize {
        stage / self.plan.shape.ranks
    }

    fn peer(&self, stage: usize) -> usize {
        self.plan.shape.rank_of(stage)
    }

    /// Runs this rank's actions for one step over `microbatches`. Each run of consecutive
    /// sends/receives of the plan is issued as one [`batch_p2p`](crate::comm::ops::batch_p2p) (an NCCL group); plans are made
    /// safe for that by the schedules crate ([`burn_parallel_schedules::p2p`]).
    pub fn step(&self, microbatches: &[M::MicroBatch]) -> Result<StepOutput, PipelineError> {
        let m = self.plan.shape.microbatches;
        if microbatches.len() != m {
            return Err(PipelineError::Microbatches { expected: m, got: microbatches.len() });
        }
        let mut st = StepState::<B, M::Part, D> {
            inflight: HashMap::new(),
            inputs: HashMap::new(),
            out_grads: HashMap::new(),
            to_send: HashMap::new(),
            stash: HashMap::new(),
            acc: self.stages.iter().map(|_| GradientsAccumulator::new()).collect(),
            loss_sum: None,
        };
        for step in steps(&self.plan.ranks[self.comm.rank()]) {
            match step {
                Step::Batch(batch) => {
                    let _t = crate::timing::span!(crate::timing::phase::PIPELINE_P2P, ops = batch.len()).entered();
                    self.exchange(&batch, microbatches, &mut st)?
                }
                Step::Compute(a) => self.compute(a, microbatches, &mut st)?,
            }
        }
        let loss = self.share_loss(st.loss_sum.take().map(|l| l.div_scalar(m as f32)))?;
        Ok(StepOutput { loss, grads: st.acc.iter_mut().map(|a| a.grads()).collect() })
    }

    /// Issues one batch of sends and receives.
    fn exchange(&self, batch: &[Action], microbatches: &[M::MicroBatch], st: &mut StepState<B, M::Part, D>) -> Result<(), PipelineError> {
        let (mut sends, mut recvs, mut dest) = (Vec::new(), Vec::new(), Vec::new());
        for a in batch {
            let (s, mb, key) = (a.stage, a.mb, (a.stage, a.mb));
            let shape = self.model.activation_shape(&microbatches[mb]);
            match a.op {
                Op::SendF => match st.inflight.get(&key) {
                    Some((_, StageOutput::Activation(y), _, _)) => sends.push((y.clone().detach(), self.peer(s + 1), tag(Op::SendF, s, mb))),
                    _ => panic!("validated plan: {a} follows the forward of a non-last stage"),
                },
                Op::SendB => {
                    let g = st.to_send.remove(&key).expect("validated plan: backward before send");
                    sends.push((g, self.peer(s - 1), tag(Op::SendB, s, mb)));
                }
                Op::RecvF => {
                    recvs.push((self.peer(s - 1), tag(Op::SendF, s - 1, mb), shape));
                    dest.push((true, key));
                }
                Op::RecvB => {
                    recvs.push((self.peer(s + 1), tag(Op::SendB, s + 1, mb), shape));
                    dest.push((false, key));
                }
                _ => unreachable!("a batch holds communication only"),
            }
        }
        let got = batch_p2p_as::<B, D>(sends, &recvs, self.activation_dtype(), &self.device, &self.comm)?;
        for ((is_input, key), x) in dest.into_iter().zip(got) {
            if is_input {
                st.inputs.insert(key, x.require_grad());
            } else {
                st.out_grads.insert(key, x);
            }
        }
        Ok(())
    }

    /// Runs one computation (`F`, `B`, `I`, `W`).
    fn compute(&self, a: Action, microbatches: &[M::MicroBatch], st: &mut StepState<B, M::Part, D>) -> Result<(), PipelineError> {
        let (me, last) = (self.comm.rank(), self.plan.shape.stages() - 1);
        let (s, mb, key) = (a.stage, a.mb, (a.stage, a.mb));
        let i = self.local(s);
        use crate::timing::{phase, span};
        let _t = match a.op {
            Op::F => span!(phase::FORWARD, stage = s, mb = mb),
            Op::W => span!(phase::WEIGHT_GRAD, stage = s, mb = mb),
            _ => span!(phase::BACKWARD, stage = s, mb = mb),
        }
        .entered();
        match a.op {
            Op::F => {
                let stage = &self.stages[i];
                let input = (s > 0).then(|| st.inputs.remove(&key).expect("validated plan: input before forward"));
                // Each micro-batch's graph gets its own parameter leaves, so the graphs of
                // in-flight micro-batches never merge in Burn's autodiff (their backwards and
                // graph clean-ups stay independent); gradients are keyed by ParamId anyway.
                let part = stage.part.clone().map(&mut FreshLeaves { track: true });
                let (out, saved) = match self.model.forward_saving(&part, &stage.spec, input.clone(), &microbatches[mb]) {
                    Some((out, saved)) => (out, Some(saved)),
                    None => (self.model.forward(&part, &stage.spec, input.clone(), &microbatches[mb]), None),
                };
                if let (StageOutput::Activation(y), true) = (&out, s < last && self.peer(s + 1) == me) {
                    st.inputs.insert((s + 1, mb), y.clone().detach().require_grad());
                }
                st.inflight.insert(key, (input, out, part, saved));
            }
            Op::B | Op::I => {
                for group in self.model.backward_groups().into_iter().filter(|g| g.size() > 1) {
                    group.barrier()?;
                }
                let (input, out, part, saved) = st.inflight.remove(&key).expect("validated plan: forward before backward");
                if let Some(saved) = saved {
                    return self.backward_saved(a, (input, out, part), saved, st);
                }
                let grads = match out {
                    StageOutput::Loss(l) => {
                        st.add_loss(l.clone().inner());
                        l.div_scalar(self.plan.shape.microbatches as f32).backward()
                    }
                    StageOutput::Activation(y) => {
                        let g = st.out_grads.remove(&key).expect("validated plan: output gradient before backward");
                        B::backward_with(y, g.inner()).map_err(|e| ConfigError::Invalid(format!("stage {s} (micro-batch {mb}): {e}")))?
                    }
                };
                if let Some(x) = input {
                    let dx =
                        x.grad(&grads).unwrap_or_else(|| panic!("no gradient reached the input of stage {s} (micro-batch {mb}): the stage must use its input"));
                    let dx = Tensor::<B, D>::from_inner(dx);
                    if self.peer(s - 1) == me {
                        st.out_grads.insert((s - 1, mb), dx);
                    } else {
                        st.to_send.insert(key, dx);
                    }
                }
                self.model.after_backward(&self.stages[i].spec, mb);
                self.keep_grads(a, &part, GradientsParams::from_grads(grads, &part), st);
            }
            Op::W => st.acc[i].accumulate(&self.stages[i].part, st.stash.remove(&key).expect("validated plan: I before W")),
            _ => unreachable!("communication runs in batches"),
        }
        Ok(())
    }

    /// The backward of a recomputing forward: the model's own chain of VJPs.
    fn backward_saved(
        &self,
        a: Action,
        (input, out, part): (Option<Tensor<B, D>>, StageOutput<B, D>, M::Part),
        saved: Box<dyn Any>,
        st: &mut StepState<B, M::Part, D>,
    ) -> Result<(), PipelineError> {
        let (s, mb, key) = (a.stage, a.mb, (a.stage, a.mb));
        let spec = &self.stages[self.local(s)].spec;
        let out_grad = match out {
            StageOutput::Loss(l) => {
                st.add_loss(l.inner());
                None
            }
            StageOutput::Activation(_) => Some(st.out_grads.remove(&key).expect("validated plan: output gradient before backward").inner()),
        };
        let (dx, grads) = self.model.backward_saved(&part, spec, saved, out_grad, 1.0 / self.plan.shape.microbatches as f32)?;
        if let (Some(_), Some(dx)) = (input, dx) {
            let dx = Tensor::<B, D>::from_inner(dx);
            if self.peer(s - 1) == self.comm.rank() {
                st.out_grads.insert((s - 1, mb), dx);
            } else {
                st.to_send.insert(key, dx);
            }
        }
        self.model.after_backward(spec, mb);
        self.keep_grads(a, &part, grads, st);
        Ok(())
    }

    /// Accumulates (`B`) or stashes (`I`) a micro-batch's parameter gradients; half-precision
    /// gradients are accumulated in f32.
    fn keep_grads(&self, a: Action, part: &M::Part, mut grads: GradientsParams, st: &mut StepState<B, M::Part, D>) {
        let i = self.local(a.stage);
        if matches!(self.activation_dtype(), burn::tensor::DType::BF16 | burn::tensor::DType::F16) {
            grads = crate::precision::grads_to_f32(part, grads);
        }
        if a.op == Op::B {
            st.acc[i].accumulate(&self.stages[i].part, grads);
        } else {
            st.stash.insert((a.stage, a.mb), grads);
        }
    }

    /// Broadcasts the last stage's loss (`None` elsewhere) to every rank of the pipeline group.
    fn share_loss(&self, loss: Option<Tensor<B::InnerBackend, 1>>) -> Result<f32, PipelineError> {
        let root = self.peer(self.plan.shape.stages() - 1);
        let t = Tensor::<B, 1>::from_inner(loss.unwrap_or_else(|| Tensor::zeros([1], &self.device)));
        Ok(broadcast(t, root, &self.comm)?.into_scalar().elem())
    }

    /// Mean loss of `microbatches` by forward passes only (no backward; stage by stage), in an
    /// [`EvaluationScope`](super::EvaluationScope) (no dropout). Each stage runs
    /// [`PipelineModel::forward_valid`] on its parameters' inner module where the model has it
    /// (no autodiff graph), else [`PipelineModel::forward`] on detached parameters.
    pub fn forward_loss(&self, microbatches: &[M::MicroBatch]) -> Result<f32, PipelineError> {
        let _eval = super::EvaluationScope::enter();
        let shape = self.plan.shape;
        let (me, last) = (self.comm.rank(), shape.stages() - 1);
        let valid: Vec<_> = self.stages.iter().map(|stage| stage.part.valid()).collect();
        let mut total: Option<Tensor<B::InnerBackend, 1>> = None;
        for (mb, batch) in microbatches.iter().enumerate() {
            let mb = mb + EVAL_TAG_OFFSET;
            let mut carry: Option<Tensor<B::InnerBackend, D>> = None;
            for (stage, part) in self.stages.iter().zip(&valid) {
                let s = stage.spec.stage;
                let input = match s {
                    0 => None,
                    _ if self.peer(s - 1) == me => carry.take(),
                    _ => Some(
                        recv_as::<B, D>(
                            self.model.activation_shape(batch),
                            self.activation_dtype(),
                            &self.device,
                            self.peer(s - 1),
                            tag(Op::SendF, s - 1, mb),
                            &self.comm,
                        )?
                        .inner(),
                    ),
                };
                match self.evaluate_stage(stage, part, input, batch) {
                    StageOutput::Loss(l) => {
                        total = Some(match total.take() {
                            Some(t) => t + l,
                            None => l,
                        });
                    }
                    StageOutput::Activation(y) if s < last && self.peer(s + 1) != me => {
                        send(Tensor::<B, D>::from_inner(y), self.peer(s + 1), tag(Op::SendF, s, mb), &self.comm)?
                    }
                    StageOutput::Activation(y) => carry = Some(y),
                }
            }
        }
        self.share_loss(total.map(|t| t.div_scalar(microbatches.len().max(1) as f32)))
    }

    /// One stage of [`forward_loss`](Self::forward_loss) on `input`: the model's
    /// `forward_valid` on `part` (the stage's inner module), or its `forward` on detached
    /// parameters (recorded in Burn's graph until the next backward: see `forward_valid`).
    fn evaluate_stage(
        &self,
        stage: &Stage<M::Part>,
        part: &<M::Part as AutodiffModule<B>>::InnerModule,
        input: Option<Tensor<B::InnerBackend, D>>,
        batch: &M::MicroBatch,
    ) -> StageOutput<B::InnerBackend, D> {
        if let Some(out) = self.model.forward_valid(part, &stage.spec, input.clone(), batch) {
            return out;
        }
        let detached = stage.part.clone().map(&mut FreshLeaves { track: false });
        match self.model.forward(&detached, &stage.spec, input.map(Tensor::from_inner), batch) {
            StageOutput::Loss(l) => StageOutput::Loss(l.inner()),
            StageOutput::Activation(y) => StageOutput::Activation(y.inner()),
        }
    }

    /// Applies one optimizer per stage (in chunk order) with the step's gradients.
    pub fn update<O: Optimizer<M::Part, B>>(&mut self, optimizers: &mut [O], lr: f64, grads: Vec<GradientsParams>) {
        assert_eq!(optimizers.len(), self.stages.len(), "one optimizer per stage of this rank");
        assert_eq!(grads.len(), self.stages.len(), "one gradient set per stage of this rank");
        let stages = std::mem::take(&mut self.stages);
        self.stages =
            stages.into_iter().zip(optimizers.iter_mut().zip(grads)).map(|(st, (o, g))| Stage { part: o.step(lr, st.part, g), spec: st.spec }).collect();
    }
}
