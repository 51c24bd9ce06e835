//! The GPT as a [`PipelineModel`]: blocks are the layers; the first stage also holds the token
//! and position embeddings, the last the final layer norm, the vocab-parallel head and the loss.
//! Works with tensor parallelism: each stage's layers are split over the `tp` group.
//! With tied embeddings (`GptConfig::tie_embeddings`) the last stage's head holds a replica of
//! the first stage's token embedding ([`TiedHead`]): both are named by `tied_params`, their
//! gradients summed over the embedding group (`DistAdamW::tie`, or
//! `PipelineExecutor::all_reduce_tied_grads` after a loop's own DP reduction), and
//! the replica saves and loads as `wte.weight`. A stage both first and last uses the embedding
//! itself.

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
use crate::embedding::{VocabParallelEmbedding, VocabParallelEmbeddingConfig};
use crate::gpt::{embed, head_loss, GptConfig, HeadRef};
use crate::init::ParamInit;
use crate::layer_norm::ParallelLayerNorm;
use crate::recompute::{self, Output, Pieces, Tape, Tokens};
use crate::tied_head::{HeadWeight, TiedHead};

/// The GPT split for pipelining (and tensor parallelism over `tp`).
#[derive(Debug, Clone)]
pub struct GptPipeline {
    /// The model.
    pub config: GptConfig,
    /// The tensor-parallel group of this rank.
    pub tp: Comm,
    /// The context-parallel group (`None`: whole sequences; see `Gpt::with_context_parallel`:
    /// the micro-batches then hold this rank's chunks, and the stages exchange them).
    pub cp: Option<burn_parallel::ContextParallel>,
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
    /// Position embedding (first stage; none with RoPE).
    pub wpe: Option<Param<Tensor<B, 2>>>,
    /// Embedding dropout.
    pub drop: ParallelDropout,
    /// This stage's blocks.
    pub blocks: Vec<TransformerBlock<B>>,
    /// Global index of the first block.
    pub first_layer: usize,
    /// Final layer norm (last stage).
    pub ln_f: Option<ParallelLayerNorm<B>>,
    /// Vocab-parallel head (last stage, untied embeddings).
    pub head: Option<ColumnLinear<B>>,
    /// The replica of the token embedding the head uses (last stage, tied embeddings, unless
    /// it is also the first stage).
    pub tied_head: Option<TiedHead<B>>,
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
        let (first, last, tied) = (spec.is_first(), spec.is_last(), c.tie_embeddings);
        let (ln_f, head) = if last { c.init_head(&self.tp, device).map(|(l, h)| (Some(l), h))? } else { (None, None) };
        let tied_head = match last && tied && !first {
            true => Some(TiedHead::init(&VocabParallelEmbeddingConfig::new(c.vocab_size, c.d_model), &self.tp, &ParamInit::new(c.seed).child("wte"), device)?),
            false => None,
        };
        let mut stage = GptStage {
            wte: first.then_some(wte),
            wpe: wpe.filter(|_| first),
            drop,
            blocks: c.init_blocks(spec.layers.clone(), &self.tp, device)?,
            first_layer: spec.layers.start,
            ln_f,
            head,
            tied_head,
        };
        if let Some(cp) = &self.cp {
            crate::context_parallel::attach_context_parallel(stage.wte.as_mut(), &mut stage.blocks, cp.clone());
        }
        Ok(c.in_precision(stage))
    }

    fn tensor_parallel_group(&self) -> Option<&Comm> {
        Some(&self.tp)
    }

    /// The TP group and the context-parallel group (both run collectives in the backward).
    fn backward_groups(&self) -> Vec<&Comm> {
        std::iter::once(&self.tp).chain(self.cp.as_ref().map(|cp| cp.comm())).collect()
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
        let targets = part.ln_f.is_some().then(|| Tensor::from_data(mb.targets.clone(), &device));
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
    /// The tied head's replica is the embedding's table, `wte.weight`.
    fn global_param_path(&self, spec: &PartSpec, path: &str) -> String {
        match path.strip_prefix("tied_head.") {
            Some(field) => format!("wte.{field}"),
            None => global_block_path(path, spec.layers.start),
        }
    }

    /// With tied embeddings: the token embedding of a first stage and the replica of a last
    /// stage (none where one stage is both).
    fn tied_params(&self, _spec: &PartSpec, part: &GptStage<B>) -> Vec<burn::module::ParamId> {
        match (&part.wte, &part.tied_head) {
            (Some(wte), None) if self.config.tie_embeddings && part.ln_f.is_none() => vec![wte.weight.id],
            (None, Some(t)) => vec![t.weight.id],
            _ => Vec::new(),
        }
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
        let embed = self.wte.as_ref().map(|wte| (wte, self.wpe.as_ref(), &self.drop));
        let vocab_start = model.tp.rank() * model.config.vocab_size / model.tp.size();
        let weight = match (&self.head, &self.tied_head, &self.wte) {
            (Some(head), _, _) => Some(HeadWeight::Own(head)),
            (None, Some(t), _) => Some(HeadWeight::Tied(&t.weight)),
            (None, None, Some(wte)) => Some(HeadWeight::Tied(&wte.weight)),
            (None, None, None) => None,
        };
        let head = match (&self.ln_f, weight) {
            (Some(ln_f), Some(head)) => Some(HeadRef { ln_f, head, tp: &model.tp, vocab_start, vocab_used: model.config.vocab_used }),
            _ => None,
        };
        let cp = model.cp.as_ref().map(|cp| cp.comm());
        Pieces { embed, blocks: &self.blocks, head, sequence_parallel: model.config.sequence_parallel, tp: &model.tp, cp }
    }

    fn drop_device(&self, input: Option<&Tensor<B, 3>>) -> B::Device {
        match (input, &self.wte) {
            (Some(x), _) => x.device(),
            (None, Some(w)) => w.weight.val().device(),
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
