//! What a model implements to be pipelined: [`PipelineModel`].

use std::any::Any;

use burn::module::AutodiffModule;
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;

use super::layout::PartSpec;
use crate::error::{CommError, ConfigError};
use crate::Comm;

/// What a stage's forward returns: the activation for the next stage, or (last stage) the loss
/// (on the autodiff backend in training, on its inner backend in
/// [`forward_valid`](PipelineModel::forward_valid)).
#[derive(Debug, Clone)]
pub enum StageOutput<B: Backend, const D: usize> {
    /// Output activation `[.., D dims]`, sent to the next stage.
    Activation(Tensor<B, D>),
    /// Mean loss of the micro-batch (one element).
    Loss(Tensor<B, 1>),
}

/// A model that can be split into pipeline stages. `D` is the rank of the activations passed
/// between stages (3 for `[batch, seq, hidden]`).
pub trait PipelineModel<B: AutodiffBackend, const D: usize>: Sync {
    /// The modules one stage holds.
    type Part: AutodiffModule<B>;
    /// One micro-batch's data (inputs for the first stage, targets for the last).
    type MicroBatch: Sync;

    /// Number of layers to distribute over the stages.
    fn num_layers(&self) -> usize;
    /// Builds the part of `spec` (only this rank's parts are ever built). The parameters must be
    /// the same as those of the unsplit model's layers `spec.layers`.
    fn build_part(&self, spec: &PartSpec, device: &B::Device) -> Result<Self::Part, ConfigError>;
    /// The shape of the activation between stages for `mb` (also the shape of its gradient).
    fn activation_shape(&self, mb: &Self::MicroBatch) -> [usize; D];
    /// Runs `part` on a micro-batch; `input` is `None` on the first stage.
    fn forward(&self, part: &Self::Part, spec: &PartSpec, input: Option<Tensor<B, D>>, mb: &Self::MicroBatch) -> StageOutput<B, D>;

    /// Evaluation without autodiff (optional): [`forward`](Self::forward) of `part.valid()` on
    /// the inner backend, as the unsplit model evaluates. `None` (the default): the executor's
    /// [`forward_loss`](super::PipelineExecutor::forward_loss) runs `forward` on detached
    /// parameters instead, which Burn 0.21 still records in its autodiff graph (it registers
    /// untracked operations too, and frees them only in the next `backward()`): host memory
    /// that grows with every micro-batch evaluated until the next training step.
    fn forward_valid(
        &self,
        _part: &<Self::Part as AutodiffModule<B>>::InnerModule,
        _spec: &PartSpec,
        _input: Option<Tensor<B::InnerBackend, D>>,
        _mb: &Self::MicroBatch,
    ) -> Option<StageOutput<B::InnerBackend, D>> {
        None
    }

    /// The dtype of the activations (and their gradients) between stages; `None`: the backend's
    /// default float dtype. A bf16 model returns `Some(BF16)`, so receives expect bf16.
    fn activation_dtype(&self) -> Option<burn::tensor::DType> {
        None
    }

    /// The tensor-parallel group whose collectives run inside this model's backward, if any.
    /// The executor puts a barrier on it before every backward: Burn 0.21 ends each `backward()`
    /// by locking **every** autodiff graph of the process (`cleanup_orphaned_entries`), so with
    /// ranks as threads a rank still cleaning up must not find a TP peer already blocked in the
    /// next backward's collective while holding its graph lock.
    fn tensor_parallel_group(&self) -> Option<&Comm> {
        None
    }

    /// Every group whose collectives run inside this model's backward (the TP group, and the
    /// context-parallel group where the sequence is split): the executor puts a barrier on each,
    /// in this order, before every backward (see
    /// [`tensor_parallel_group`](Self::tensor_parallel_group)). A rank's peers in each group
    /// have then finished their previous backward and its clean-up.
    fn backward_groups(&self) -> Vec<&Comm> {
        self.tensor_parallel_group().into_iter().collect()
    }

    /// Activation recompute (optional): runs `part` forward keeping only what its backward
    /// needs, returning the output (an activation without graph, or the loss) and that state.
    /// `None` (the default) means the executor runs [`forward`](Self::forward) and keeps its
    /// whole graph until the backward.
    fn forward_saving(
        &self,
        _part: &Self::Part,
        _spec: &PartSpec,
        _input: Option<Tensor<B, D>>,
        _mb: &Self::MicroBatch,
    ) -> Option<(StageOutput<B, D>, Box<dyn Any>)> {
        None
    }

    /// The backward of a [`forward_saving`](Self::forward_saving): from the gradient of the
    /// stage output (or, on the last stage, the loss times `loss_scale`), the gradient of the
    /// stage input (`None` on the first stage) and of `part`'s parameters. Collectives inside
    /// must be preceded by a barrier on the TP group, as the executor does before a backward.
    fn backward_saved(
        &self,
        _part: &Self::Part,
        _spec: &PartSpec,
        _saved: Box<dyn Any>,
        _out_grad: Option<Tensor<B::InnerBackend, D>>,
        _loss_scale: f32,
    ) -> Result<StageGrads<B, D>, CommError> {
        unreachable!("backward_saved without forward_saving")
    }

    /// The path in the **unsplit** model of the parameter at `path` of `spec`'s part (what
    /// checkpoints save it as, so that any other split can load it). Identity by default; a
    /// model whose parts number their layers from 0 maps them to global indices here.
    fn global_param_path(&self, _spec: &PartSpec, path: &str) -> String {
        path.to_string()
    }

    /// Parameters of `spec`'s part that are one parameter with a part on another pipeline rank
    /// (tied embeddings: the first stage's token embedding and the last stage's replica of it in
    /// the head), in the same order on every rank that holds one. Their gradients are summed
    /// over those ranks after the DP reduction, by [`DistAdamW::tie`](crate::optim::DistAdamW::tie)
    /// or [`PipelineExecutor::all_reduce_tied_grads`](super::PipelineExecutor::all_reduce_tied_grads).
    /// None by default.
    fn tied_params(&self, _spec: &PartSpec, _part: &Self::Part) -> Vec<burn::module::ParamId> {
        Vec::new()
    }

    /// Called after each backward (`B` or `I`) of `spec`'s stage on micro-batch `mb`, outside
    /// autodiff (profiling, logging, gradient hooks). Does nothing by default.
    fn after_backward(&self, _spec: &PartSpec, _mb: usize) {}
}

/// What a stage's backward returns: the gradient of its input (`None` on the first stage) and
/// its parameters' gradients.
pub type StageGrads<B, const D: usize> = (Option<Tensor<<B as AutodiffBackend>::InnerBackend, D>>, GradientsParams);
