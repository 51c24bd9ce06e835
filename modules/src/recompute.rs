//! Activation recompute for the GPT (whole model or a pipeline stage), as a chain of VJPs (see
//! `burn_parallel::recompute`).
//!
//! Forward: the embedding (first stage) and the head with its loss (last stage) keep their
//! graphs (the head's logits are kept, as Megatron does); the blocks run as follows.
//! - **Full**: each block runs without a graph (detached parameters) and keeps only its input
//!   `[b, s, h]` (`[b, s/t, h]` under SP) and its dropout counters; the backward reruns it with a
//!   graph and backpropagates: +1 forward of every block.
//! - **Selective**: each block is cut in two graphs around its attention core: `x → [q|k|v]`
//!   (layer norm, TP entry, projections) and `(x, context) → y` (output projection, residual,
//!   MLP half), both kept; the core (`[b, H/t, s, s]` scores, softmax, dropout, weighted sum)
//!   runs without a graph and is rerun in the backward from the saved `[q|k|v]`. A block whose
//!   core is fused or chunked (it keeps only `o` and the f32 log-sum-exp) keeps its whole graph
//!   instead: rerunning that core would save only the log-sum-exp (Megatron: selective
//!   recompute is moot with flash attention).
//!
//! Backward walks the pieces in reverse: head (loss), blocks (last to first), embedding; each
//! piece is one `backward()` with a TP (and context-parallel) barrier before it (Burn's post-backward clean-up locks
//! every graph, see `PipelineModel::tensor_parallel_group`). The gradients (of the inputs and
//! of every parameter) equal those without recompute bit for bit: the same operations on the
//! same values, with the same dropout masks.

use burn::module::{AutodiffModule, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Int, Tensor};
use burn_parallel::pipeline::StageGrads;
use burn_parallel::recompute::{detached, merge_grads, Recompute, StreamSnapshot};
use burn_parallel::rng::RandomStreams;
use burn_parallel::{BackwardWith, Comm, CommError, ParallelBackend};

use crate::block::TransformerBlock;
use crate::dropout::ParallelDropout;
use crate::embedding::VocabParallelEmbedding;
use crate::gpt::{embed, head_logits, head_loss, HeadRef};

/// The embedding of a first stage: token table, position table (none with RoPE), dropout.
pub type EmbedPieces<'a, B> = (&'a VocabParallelEmbedding<B>, Option<&'a Param<Tensor<B, 2>>>, &'a ParallelDropout);

/// The pieces of a GPT part that recompute walks.
pub struct Pieces<'a, B: ParallelBackend> {
    /// The embedding (first stage).
    pub embed: Option<EmbedPieces<'a, B>>,
    /// The blocks.
    pub blocks: &'a [TransformerBlock<B>],
    /// Final layer norm and head (last stage).
    pub head: Option<HeadRef<'a, B>>,
    /// Sequence parallelism.
    pub sequence_parallel: bool,
    /// The TP group.
    pub tp: &'a Comm,
    /// The context-parallel group (its collectives run in the backward too).
    pub cp: Option<&'a Comm>,
}

/// What a block kept.
enum BlockTape<B: AutodiffBackend> {
    Full {
        input: Tensor<B, 3>,
        streams: StreamSnapshot,
    },
    Selective {
        x_in: Tensor<B, 3>,
        qkv: Tensor<B, 3>,
        x_out: Tensor<B, 3>,
        context: Tensor<B, 3>,
        y: Tensor<B, 3>,
        core: StreamSnapshot,
    },
    /// Selective recompute of a block whose core keeps only `o` and the log-sum-exp: the
    /// block's whole graph from a fresh input leaf.
    Graph(Kept<B>),
}

/// What the blocks kept without recompute: their whole graph from a fresh input leaf.
struct Kept<B: AutodiffBackend> {
    input: Tensor<B, 3>,
    output: Tensor<B, 3>,
}

/// What the head kept: the loss's graph, or (chunked loss) the logits' graph and the targets.
enum HeadTape<B: AutodiffBackend> {
    Plain { x: Tensor<B, 3>, loss: Tensor<B, 1> },
    Chunked { x: Tensor<B, 3>, logits: Tensor<B, 3>, targets: Tensor<B, 1, Int>, rows: usize, stats: crate::cross_entropy::SoftmaxStats<B> },
}

/// What a recomputing forward kept for its backward.
pub struct Tape<B: AutodiffBackend> {
    embedded: Option<Tensor<B, 3>>,
    kept: Option<Kept<B>>,
    blocks: Vec<BlockTape<B>>,
    head: Option<HeadTape<B>>,
}

/// What a recomputing forward returns: the activation for the next stage (no graph), or the
/// loss (with the head's graph).
pub enum Output<B: AutodiffBackend> {
    /// The last block's output, detached.
    Activation(Tensor<B, 3>),
    /// The mean loss.
    Loss(Tensor<B, 1>),
}

/// Ids and targets of a micro-batch (the first stage needs the ids, the last the targets).
pub struct Tokens<B: AutodiffBackend> {
    /// `[b, s]` inputs.
    pub ids: Option<Tensor<B, 2, Int>>,
    /// `[b, s]` targets.
    pub targets: Option<Tensor<B, 2, Int>>,
}

/// Barriers on the TP group, then the context-parallel group (each of more than one rank).
fn barrier(tp: &Comm, cp: Option<&Comm>) -> Result<(), CommError> {
    for group in std::iter::once(tp).chain(cp).filter(|g| g.size() > 1) {
        group.barrier()?;
    }
    Ok(())
}

/// Runs `pieces` forward under `mode`: `input` is the stage input (a non-first stage), or the
/// embedding runs on `tokens.ids`. With `loss_chunk`, the loss is computed `loss_chunk` rows
/// at a time (see [`crate::cross_entropy`]): the head keeps its logits' graph, not the loss's.
/// `None` keeps the blocks' whole graph (the manual chain then serves the chunked loss only).
pub fn forward<B>(pieces: &Pieces<'_, B>, input: Option<Tensor<B, 3>>, tokens: Tokens<B>, mode: Recompute, loss_chunk: Option<usize>) -> (Output<B>, Tape<B>)
where
    B: AutodiffBackend + ParallelBackend,
{
    let (x, embedded) = match (input, pieces.embed) {
        // Untracked: `detach` of a tracked leaf (the received input is one) is a new tracked
        // leaf in Burn, and a graph-free block run from it would record a graph after all.
        (Some(x), _) => (Tensor::from_inner(x.inner()), None),
        (None, Some((wte, wpe, drop))) => {
            let e = embed(wte, wpe, drop, tokens.ids.expect("the first stage gets the ids"), pieces.sequence_parallel);
            (e.clone().detach(), Some(e))
        }
        (None, None) => panic!("a stage without embedding gets an input"),
    };
    let mut cur = x;
    let mut blocks = Vec::with_capacity(pieces.blocks.len());
    let mut kept = None;
    if mode == Recompute::None {
        let input = cur.detach().require_grad();
        let output = pieces.blocks.iter().fold(input.clone(), |x, b| b.forward(x));
        cur = output.clone().detach();
        kept = Some(Kept { input, output });
    }
    for (i, block) in pieces.blocks.iter().enumerate().filter(|_| mode != Recompute::None) {
        let (next, tape) = block_forward(block, cur, mode.for_block(i));
        blocks.push(tape);
        cur = next;
    }
    match &pieces.head {
        Some(h) => {
            let (loss, head) = head_forward(h, cur, tokens.targets.expect("the last stage gets the targets"), loss_chunk);
            (Output::Loss(loss), Tape { embedded, kept, blocks, head: Some(head) })
        }
        None => (Output::Activation(cur), Tape { embedded, kept, blocks, head: None }),
    }
}

/// One block under `mode` (`Recompute::for_block`'s: full, selective, or none for a block
/// `Blocks` leaves alone): its output (detached) and what it keeps.
fn block_forward<B: AutodiffBackend + ParallelBackend>(block: &TransformerBlock<B>, cur: Tensor<B, 3>, mode: Recompute) -> (Tensor<B, 3>, BlockTape<B>) {
    match mode {
        Recompute::Full => {
            let streams = StreamSnapshot::take(block.random_streams());
            let y = detached(block).forward(cur.clone()).detach();
            (y, BlockTape::Full { input: cur, streams })
        }
        // No recompute, or a core that keeps only o and the log-sum-exp: the block's graph.
        Recompute::None | Recompute::Blocks(_) => graph_block(block, cur),
        Recompute::Selective if block.attn.core.keeps_lse_only() => graph_block(block, cur),
        Recompute::Selective => {
            // Two fresh leaves of the same value: the two graphs of the block share no node.
            let x_in = cur.clone().detach().require_grad();
            let qkv = block.attn_in(x_in.clone());
            let core = StreamSnapshot::take(block.attn.random_streams());
            let context = block.attn_core(qkv.clone().detach()).detach().require_grad();
            let x_out = cur.detach().require_grad();
            let y = block.attn_out_and_mlp(x_out.clone(), context.clone());
            (y.clone().detach(), BlockTape::Selective { x_in, qkv, x_out, context, y, core })
        }
    }
}

/// A block's whole graph from a fresh input leaf.
fn graph_block<B: AutodiffBackend + ParallelBackend>(block: &TransformerBlock<B>, cur: Tensor<B, 3>) -> (Tensor<B, 3>, BlockTape<B>) {
    let input = cur.detach().require_grad();
    let output = block.forward(input.clone());
    (output.clone().detach(), BlockTape::Graph(Kept { input, output }))
}

/// The head and its loss from the last block's output: the loss and what the head keeps.
fn head_forward<B: AutodiffBackend + ParallelBackend>(
    h: &HeadRef<'_, B>,
    cur: Tensor<B, 3>,
    targets: Tensor<B, 2, Int>,
    loss_chunk: Option<usize>,
) -> (Tensor<B, 1>, HeadTape<B>) {
    let x = cur.detach().require_grad();
    match loss_chunk {
        None => {
            let loss = head_loss(h, x.clone(), targets, None);
            (loss.clone(), HeadTape::Plain { x, loss })
        }
        Some(rows) => {
            let logits = head_logits(h, x.clone());
            let [b, s] = targets.dims();
            let targets = targets.reshape([b * s]);
            let (loss, stats) = crate::cross_entropy::chunked_loss(logits.clone().detach(), targets.clone(), h.vocab_start, h.tp, rows);
            (loss, HeadTape::Chunked { x, logits, targets, rows, stats })
        }
    }
}

/// The backward of a [`forward`]: from `out_grad` (the gradient of the stage output), or for a
/// last stage from its loss scaled by `loss_scale`. Returns the gradient of the stage input (a
/// non-first stage) and every parameter gradient of `part` (the module holding the pieces).
pub fn backward<B, M>(
    pieces: &Pieces<'_, B>,
    part: &M,
    tape: Tape<B>,
    out_grad: Option<Tensor<B::InnerBackend, 3>>,
    loss_scale: f32,
) -> Result<StageGrads<B, 3>, CommError>
where
    B: AutodiffBackend + ParallelBackend + BackwardWith,
    M: AutodiffModule<B>,
{
    let mut chain = Chain { part, tp: pieces.tp, cp: pieces.cp, acc: GradientsParams::new() };
    let mut dy = match (tape.head, out_grad) {
        (Some(head), _) => chain.head(pieces.head.as_ref().expect("a head tape comes from a head"), head, loss_scale)?,
        (None, Some(g)) => g,
        (None, None) => panic!("a non-last stage's backward needs the output gradient"),
    };
    if let Some(Kept { input, output }) = tape.kept {
        dy = chain.pull(output, dy, &input)?;
    }
    for (block, t) in pieces.blocks.iter().zip(tape.blocks).rev() {
        dy = chain.block(block, t, dy)?;
    }
    match tape.embedded {
        Some(e) => {
            barrier(pieces.tp, pieces.cp)?;
            let g = B::backward_with(e, dy).expect("recomputed shapes match");
            merge_grads(part, &mut chain.acc, GradientsParams::from_grads(g, part));
            Ok((None, chain.acc))
        }
        None => Ok((Some(dy), chain.acc)),
    }
}

/// The backward walk: the module whose parameter gradients it gathers, and the TP group
/// whose ranks meet at a barrier before each `backward()`.
struct Chain<'a, M> {
    part: &'a M,
    tp: &'a Comm,
    cp: Option<&'a Comm>,
    acc: GradientsParams,
}

impl<M> Chain<'_, M> {
    /// Backpropagates `dy` from `y`: the gradient of `x` (the piece's input leaf), the
    /// parameters' gradients gathered.
    fn pull<B>(&mut self, y: Tensor<B, 3>, dy: Tensor<B::InnerBackend, 3>, x: &Tensor<B, 3>) -> Result<Tensor<B::InnerBackend, 3>, CommError>
    where
        B: AutodiffBackend + BackwardWith,
        M: AutodiffModule<B>,
    {
        barrier(self.tp, self.cp)?;
        let g = B::backward_with(y, dy).expect("recomputed shapes match");
        let dx = x.grad(&g).expect("a piece uses its input");
        merge_grads(self.part, &mut self.acc, GradientsParams::from_grads(g, self.part));
        Ok(dx)
    }

    /// The head's backward from its loss (scaled by `loss_scale`): the gradient of its input.
    fn head<B>(&mut self, h: &HeadRef<'_, B>, tape: HeadTape<B>, loss_scale: f32) -> Result<Tensor<B::InnerBackend, 3>, CommError>
    where
        B: AutodiffBackend + ParallelBackend + BackwardWith,
        M: AutodiffModule<B>,
    {
        match tape {
            HeadTape::Plain { x, loss } => {
                barrier(self.tp, self.cp)?;
                let g = loss.mul_scalar(loss_scale).backward();
                let dx = x.grad(&g).expect("the head uses its input");
                merge_grads(self.part, &mut self.acc, GradientsParams::from_grads(g, self.part));
                Ok(dx)
            }
            HeadTape::Chunked { x, logits, targets, rows, stats } => {
                let dlogits = crate::cross_entropy::chunked_loss_grad(logits.clone().inner(), targets.inner(), &stats.inner(), h.vocab_start, rows, loss_scale);
                self.pull(logits, dlogits, &x)
            }
        }
    }

    /// One block's backward from the gradient of its output: the gradient of its input.
    fn block<B>(&mut self, block: &TransformerBlock<B>, tape: BlockTape<B>, dy: Tensor<B::InnerBackend, 3>) -> Result<Tensor<B::InnerBackend, 3>, CommError>
    where
        B: AutodiffBackend + ParallelBackend + BackwardWith,
        M: AutodiffModule<B>,
    {
        match tape {
            BlockTape::Full { input, streams } => {
                let x = input.detach().require_grad();
                let y = streams.replay(|| block.forward(x.clone()));
                self.pull(y, dy, &x)
            }
            BlockTape::Graph(Kept { input, output }) => self.pull(output, dy, &input),
            BlockTape::Selective { x_in, qkv, x_out, context, y, core } => {
                barrier(self.tp, self.cp)?;
                let g = B::backward_with(y, dy).expect("recomputed shapes match");
                let (d_context, dx_out) = (context.grad(&g).expect("the block uses its context"), x_out.grad(&g).expect("residual"));
                merge_grads(self.part, &mut self.acc, GradientsParams::from_grads(g, self.part));
                let qkv_leaf = qkv.clone().detach().require_grad();
                let rerun = core.replay(|| block.attn_core(qkv_leaf.clone()));
                barrier(self.tp, self.cp)?;
                let d_qkv = qkv_leaf.grad(&B::backward_with(rerun, d_context).expect("recomputed shapes match")).expect("the core uses q, k, v");
                let dx_in = self.pull(qkv, d_qkv, &x_in)?;
                Ok(dx_in + dx_out)
            }
        }
    }
}
