//! The GPT as a [`PipelineModel`]: blocks are the layers; the first stage also holds the token
//! and position embeddings, the last the final layer norm, the vocab-parallel head and the loss.
//! Works with tensor parallelism: each stage's layers are split over the `tp` group.
//! The head is untied, so the first and last stages share no parameter (no embedding-group
//! reduction).

use std::any::Any;

use burn::module::{Module, Param};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorData};
use burn_parallel::pipeline::{PartSpec, PipelineModel, StageGrads, StageOutput};
use burn_parallel::recompute::Recompute;
use burn_parallel::rng::{RandomStreams, StreamCounter};
use burn_parallel::{BackwardWith, Comm, CommError, ConfigError, ParallelBackend};

use crate::block::TransformerBlock;
use crate::column_linear::ColumnLinear;
use crate::dropout::ParallelDropout;
use crate::embedding::VocabParallelEmbedding;
use crate::gpt::{embed, head_loss, GptConfig, HeadRef};
use crate::layer_norm::ParallelLayerNorm;
use crate::recompute::{self, Output, Pieces, Tape, Tokens};

/// The GPT split for pipelining (and tensor parallelism over `tp`).
#[derive(Debug, Clone)]
pub struct GptPipeline {
    /// The model.
    pub config: GptConfig,
    /// The tensor-parallel group of this rank.
    pub tp: Comm,
}

/// One micro-batch of token ids and next-token targets, `[b, s]` integers on the host.
#[derive(Debug, Clone)]
pub struct TokenBatch {
    /// Inputs `[b, s]`.
    pub inputs: TensorData,
    /// Targets `[b, s]`.
    pub targets: TensorData,
}

/// The modules of one GPT pipeline stage.
#[derive(Module, Debug)]
pub struct GptStage<B: ParallelBackend> {
    /// Token embedding (first stage).
    pub wte: Option<VocabParallelEmbedding<B>>,
    /// Position embedding (first stage).
    pub wpe: Option<Param<Tensor<B, 2>>>,
    /// Embedding dropout.
    pub drop: ParallelDropout,
    /// This stage's blocks.
    pub blocks: Vec<TransformerBlock<B>>,
    /// Global index of the first block.
    pub first_layer: usize,
    /// Final layer norm (last stage).
    pub ln_f: Option<ParallelLayerNorm<B>>,
    /// Vocab-parallel head (last stage).
    pub head: Option<ColumnLinear<B>>,
}

impl<B> PipelineModel<B, 3> for GptPipeline
where
    B: AutodiffBackend + ParallelBackend + BackwardWith,
    B::InnerBackend: ParallelBackend,
{
    type Part = GptStage<B>;
    type MicroBatch = TokenBatch;

    fn num_layers(&self) -> usize {
        self.config.n_layers
    }

    fn build_part(&self, spec: &PartSpec, device: &B::Device) -> Result<GptStage<B>, ConfigError> {
        let c = &self.config;
        c.validate(self.tp.size())?;
        let (wte, wpe, drop) = c.init_embedding(&self.tp, device)?;
        let first = spec.is_first();
        let (ln_f, head) = if spec.is_last() { c.init_head(&self.tp, device).map(|(l, h)| (Some(l), Some(h)))? } else { (None, None) };
        Ok(c.in_precision(GptStage {
            wte: first.then_some(wte),
            wpe: first.then_some(wpe),
            drop,
            blocks: c.init_blocks(spec.layers.clone(), &self.tp, device)?,
            first_layer: spec.layers.start,
            ln_f,
            head,
        }))
    }

    fn tensor_parallel_group(&self) -> Option<&Comm> {
        Some(&self.tp)
    }

    fn activation_dtype(&self) -> Option<burn::tensor::DType> {
        Some(self.config.precision.dtype())
    }

    /// With `GptConfig::recompute` set: the stage's blocks recompute (see [`crate::recompute`]).
    fn forward_saving(&self, part: &GptStage<B>, _spec: &PartSpec, input: Option<Tensor<B, 3>>, mb: &TokenBatch) -> Option<(StageOutput<B, 3>, Box<dyn Any>)> {
        if self.config.recompute == Recompute::None && self.config.loss_chunk.is_none() {
            return None;
        }
        let device = part.drop_device(input.as_ref());
        let ids = input.is_none().then(|| Tensor::from_data(mb.inputs.clone(), &device));
        let targets = part.head.is_some().then(|| Tensor::from_data(mb.targets.clone(), &device));
        let (out, tape) = recompute::forward(&part.pieces(self), input, Tokens { ids, targets }, self.config.recompute, self.config.loss_chunk);
        let out = match out {
            Output::Loss(l) => StageOutput::Loss(l),
            Output::Activation(a) => StageOutput::Activation(a),
        };
        Some((out, Box::new(tape)))
    }

    fn backward_saved(
        &self,
        part: &GptStage<B>,
        _spec: &PartSpec,
        saved: Box<dyn Any>,
        out_grad: Option<Tensor<B::InnerBackend, 3>>,
        loss_scale: f32,
    ) -> Result<StageGrads<B, 3>, CommError> {
        let tape = *saved.downcast::<Tape<B>>().expect("the tape of forward_saving");
        recompute::backward(&part.pieces(self), part, tape, out_grad, loss_scale)
    }

    /// A stage numbers its blocks from 0; the unsplit [`Gpt`](crate::Gpt) from its first layer.
    fn global_param_path(&self, spec: &PartSpec, path: &str) -> String {
        global_block_path(path, spec.layers.start)
    }

    fn activation_shape(&self, mb: &TokenBatch) -> [usize; 3] {
        // Under sequence parallelism the stages exchange sequence shards.
        let s = mb.inputs.shape.as_slice();
        let seq = if self.config.sequence_parallel { s[1] / self.tp.size() } else { s[1] };
        [s[0], seq, self.config.d_model]
    }

    fn forward(&self, part: &GptStage<B>, _spec: &PartSpec, input: Option<Tensor<B, 3>>, mb: &TokenBatch) -> StageOutput<B, 3> {
        part.forward(self, input, mb)
    }

    /// The same forward on the inner backend: evaluation records no autodiff graph.
    fn forward_valid(
        &self,
        part: &GptStage<B::InnerBackend>,
        _spec: &PartSpec,
        input: Option<Tensor<B::InnerBackend, 3>>,
        mb: &TokenBatch,
    ) -> Option<StageOutput<B::InnerBackend, 3>> {
        Some(part.forward(self, input, mb))
    }
}

impl<B: ParallelBackend> GptStage<B> {
    /// The stage on `input` (`None` on the first stage: the micro-batch's tokens), on any
    /// backend: the autodiff one in training, its inner one in evaluation.
    pub fn forward(&self, model: &GptPipeline, input: Option<Tensor<B, 3>>, mb: &TokenBatch) -> StageOutput<B, 3> {
        let device = self.drop_device(input.as_ref());
        let pieces = self.pieces(model);
        let mut x = match (input, pieces.embed) {
            (Some(x), _) => x,
            (None, Some((wte, wpe, drop))) => embed(wte, wpe, drop, Tensor::from_data(mb.inputs.clone(), &device), pieces.sequence_parallel),
            (None, None) => panic!("the first stage holds the embeddings"),
        };
        for block in pieces.blocks {
            x = block.forward(x);
        }
        match pieces.head {
            Some(h) => StageOutput::Loss(head_loss(&h, x, Tensor::from_data(mb.targets.clone(), &device), model.config.loss_chunk)),
            None => StageOutput::Activation(x),
        }
    }

    /// The pieces recompute walks.
    pub fn pieces<'a>(&'a self, model: &'a GptPipeline) -> Pieces<'a, B> {
        let embed = match (&self.wte, &self.wpe) {
            (Some(wte), Some(wpe)) => Some((wte, wpe, &self.drop)),
            _ => None,
        };
        let vocab_start = model.tp.rank() * model.config.vocab_size / model.tp.size();
        let head = match (&self.ln_f, &self.head) {
            (Some(ln_f), Some(head)) => Some(HeadRef { ln_f, head, vocab_start, vocab_used: model.config.vocab_used }),
            _ => None,
        };
        Pieces { embed, blocks: &self.blocks, head, sequence_parallel: model.config.sequence_parallel, tp: &model.tp }
    }

    fn drop_device(&self, input: Option<&Tensor<B, 3>>) -> B::Device {
        match (input, &self.wpe) {
            (Some(x), _) => x.device(),
            (None, Some(w)) => w.val().device(),
            (None, None) => Default::default(),
        }
    }
}

/// The unsplit model's path of a stage parameter at `path` (blocks numbered from `first_layer`):
/// `blocks.1.ln1.gamma` of a stage starting at layer 4 is `blocks.5.ln1.gamma`.
pub fn global_block_path(path: &str, first_layer: usize) -> String {
    let Some(rest) = path.strip_prefix("blocks.") else { return path.to_string() };
    match rest.split_once('.').map(|(j, tail)| (j.parse::<usize>(), tail)) {
        Some((Ok(j), tail)) => format!("blocks.{}.{tail}", first_layer + j),
        _ => path.to_string(),
    }
}

impl<B: ParallelBackend> RandomStreams for GptStage<B> {
    /// The embedding dropout's (first stage) and this stage's blocks' mask streams.
    fn random_streams(&self) -> Vec<StreamCounter> {
        let mut out = if self.wte.is_some() { self.drop.random_streams() } else { Vec::new() };
        out.extend(self.blocks.iter().flat_map(|b| b.random_streams()));
        out
    }
}
