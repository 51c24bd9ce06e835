//! The memory model of our GPT: every rank's model state, activations and peak, from the
//! shapes, the layout and the options, derived from what our code and Burn 0.21's autodiff keep
//! (Korthikanti et al. 2022's method, our constants).
//!
//! Per transformer block and micro-batch (`N = b·s` tokens, width `h`, MLP `f`, `a` heads, TP `t`,
//! activation bytes `e`; "seq" tensors are `[N/t, h]` under SP, `[N, h]` otherwise):
//!
//! | kept for the backward | elements | who keeps it |
//! |---|---|---|
//! | block input `x` | seq | layer norm 1 |
//! | LN1 output (SP: all-gathered) | `N·h` | the q/k/v linears |
//! | q, k, v | `3·N·h/t` (grouped-query: q and the repeated k, v) | the two attention matmuls |
//! | softmax output `P` (f32) | `b·(a/t)·s²` (×4 bytes) | the softmax op (`attention::softmax`); in f32 without dropout also the matmul with v |
//! | `P` cast to `e` (half precision only), dropout mask + dropped probs (if dropout) | `1`, `2` or `3 · b·(a/t)·s²` | the matmul with v, the dropout's multiply |
//! | context | `N·h/t` | the output projection |
//! | dropout mask after attention | seq (if dropout) | mul (the activation is not kept: the mask is untracked) |
//! | residual sum | seq | layer norm 2 |
//! | LN2 output (SP: all-gathered) | `N·h` | fc1 |
//! | fc1 output, GeLU output | `2·N·f/t` | GeLU, fc2 |
//! | dropout mask after the MLP | seq (if dropout) | mul |
//! | layer-norm μ, 1/σ (f32) | `4 · rows` | layer norms |
//!
//! That is, with f = 4h, dropout, no SP, f32: `N·h·(6 + 12/t)·e + b·s²·(a/t)·(4 + 2e)` bytes
//! (`+ e` per `s²` element in half precision; Korthikanti's `sbh(10 + 24/t + 5as/(ht))` has
//! 1-byte masks and keeps fewer tensors than Burn's autodiff does; Burn's own softmax under
//! autodiff would keep two more f32 `s²` tensors, see `attention::softmax`). With the fused
//! attention kernels (`burn_parallel::attention`, CUDA and wgpu) or the chunked attention ops
//! (any backend) the `s²` terms become the f32 log-sum-exp `4·b·(a/t)·s`.
//! Selective recompute drops the `s²` terms and keeps `[q|k|v]` packed (with a fused or chunked
//! core it keeps the block's graph: nothing to drop);
//! full recompute keeps the block input only and reruns one block at a time in the backward;
//! `full:N` (`Recompute::Blocks`) does so for the first N blocks of each stage (model chunk)
//! and keeps the others whole.
//! The first stage adds the embedding dropout's mask, the last the final layer norm's input
//! and output and the f32 shifted logits `N·V/t·4` (cross-entropy; with a chunked loss the
//! logits `N·V/t·e` instead). A pipeline rank holds the
//! activations of the micro-batches its schedule has in flight (the schedule simulator's peak:
//! 1F1B stage r holds min(p − r, m)) and, on non-last stages, each one's output. Without a
//! pipeline, `m` micro-batches are gradient accumulation: one in flight, the f32 gradients
//! kept from the first backward on.
//!
//! Context parallelism (`cp` C; any attention core): `N = b·s/C` tokens, the scores
//! `b·(a/t)·(s/C)·s`, plus the all-gathered keys and values `2·b·s·h/t` kept (grouped-query
//! attention: repeated per query head; selective recompute drops them with the core) and, in
//! the backward, their gradients and (thread ranks) the reduce-scatter's staged copies, `2·`
//! that, transient.
//!
//! Model state per rank (`P` its parameters): parameters `P·e`; AdamW moments `8·P/z` and, in
//! bf16, the f32 master `4·P/z` (`z` = dp × cp under ZeRO-1, else 1); gradients `4·P` (f32:
//! accumulated over micro-batches; bf16 gradients are cast to f32 when accumulated or reduced).
//! With tied embeddings the head has no `h·V/t` weight of its own, except on a pipeline's last
//! stage (the replica of the first stage's table).
//! The peak is the largest of: the backward, piece by piece (head, blocks last to first, the
//! embedding: three `[V/t, h]` tables in `e`, the lookup's dense gradient, its copy and the
//! accumulated sum; measured at V = 4096, where it sets the first stage's peak): the
//! activations not yet freed, the gradients produced so far, and the piece's transient (three
//! `[N, V/t]` f32 buffers of the cross-entropy; a block's `3·N·f/t` or the attention core's `2·b·(a/t)·s²` f32 (and two in `e` in half
//! precision: the probabilities' gradient and the scores' cast back); under full
//! recompute the rerun block's activations), and the optimizer step (state + f32 gradients +
//! the bucket's send and reduced buffers, then the new values, all-gathered under ZeRO). Plus
//! the CPU backend's runtime: gemm keeps a scratch slab of the L2 cache's size per thread
//! ([`gemm_scratch`]).

use burn_parallel_schedules::{Action, Op};

use crate::attention::AttentionCore;
use crate::pipeline::StageLayout;
use crate::precision::Precision;
use crate::recompute::Recompute;

use super::plan::check;
pub use super::plan::TrainPlan;
use super::steps::{actions, optimizer_transient};
pub use super::table::table;

/// The shapes of the GPT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GptShape {
    /// Vocabulary.
    pub vocab: usize,
    /// Sequence length.
    pub seq: usize,
    /// Width.
    pub hidden: usize,
    /// Attention heads.
    pub heads: usize,
    /// Blocks.
    pub layers: usize,
    /// MLP width.
    pub ffn: usize,
    /// Tied embeddings: the head is the token embedding (no `h·V` head of its own, except the
    /// last stage's replica in a pipeline).
    pub tied_embeddings: bool,
    /// The MLPs' activation (GPT-2's tanh approximation keeps two `[N, f/t]` tensors more,
    /// SwiGLU three more and a gate `h·f/t`).
    pub activation: crate::activation::Activation,
    /// Norms, position encoding, biases (a Llama-style model: RMS norms keep one f32 statistic
    /// per row instead of two and have no `β`; RoPE has no `wpe` and keeps only its `[s, (r + 2)·d]`
    /// tables; no biases).
    pub arch: crate::arch::Arch,
}

/// One rank's predicted memory in bytes (the same for every TP and DP rank of a stage).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RankMemory {
    /// Pipeline rank.
    pub pp_rank: usize,
    /// Parameters.
    pub params: f64,
    /// Parameter gradients (f32).
    pub grads: f64,
    /// Optimizer state (moments, master weights).
    pub optimizer: f64,
    /// Activations kept at the peak of the forward/backward.
    pub activations: f64,
    /// Transient buffers at that peak.
    pub transient: f64,
    /// The optimizer step's own peak.
    pub optimizer_step: f64,
    /// Backend runtime (gemm scratch).
    pub runtime: f64,
    /// The peak.
    pub peak: f64,
    /// Micro-batches (chunk-micro-batches) in flight at the peak.
    pub in_flight: usize,
}

/// gemm's per-thread scratch buffer, kept after the first matmul (burn-flex's gemm): one slab
/// of the L2 cache's size as gemm detects it (`gemm_common::cache::CACHE_INFO`; 512 KiB to a
/// few MiB by CPU: a constant was right on one machine and 1.5 MiB short on the next).
pub fn gemm_scratch() -> f64 {
    gemm_common::cache::CACHE_INFO[1].cache_bytes as f64
}

struct Dims {
    n: f64,
    h: f64,
    f: f64,
    v: f64,
    t: f64,
    s2: f64,
    sp: bool,
    e: f64,
    drop: bool,
    chunk: Option<usize>,
    /// The attention core (fused or chunked: `lse`, `[b, a/t, s]` f32, instead of the `s²`
    /// tensors).
    core: AttentionCore,
    /// `b·(a/t)·s`: the rows of the attention core.
    att_rows: f64,
    /// Query rows of one chunk of a chunked core's queries: the sequence, or under context
    /// parallelism one of the rank's two chunks `s/(2C)`.
    q_chunk: f64,
    /// `b·a/t`: the attention's `[b, a/t]` batch of heads.
    bh: f64,
    /// Context parallelism: the all-gathered keys and values a block keeps (elements).
    gathered_kv: f64,
    /// Sequence length.
    s: f64,
    /// `[N, f/t]` tensors the activation keeps of its own (GeLU none, the tanh approximation 2,
    /// SwiGLU 3: the gate's output, its sigmoid and silu, beside the up projection's output
    /// and the product that GeLU's two stand for).
    act_kept: f64,
    /// f32 statistics per row of a norm (layer norm: μ and 1/σ; RMS norm: 1/rms).
    norm_stats: f64,
}

impl Dims {
    fn new(g: &GptShape, plan: &TrainPlan) -> Self {
        // Context parallelism: this rank's tokens, queries against every key.
        let local = g.seq / plan.cp.max(1);
        Dims {
            n: (plan.microbatch * local) as f64,
            h: g.hidden as f64,
            f: g.ffn as f64,
            v: g.vocab as f64,
            t: plan.tp as f64,
            s2: (plan.microbatch * g.heads / plan.tp * local * g.seq) as f64,
            sp: plan.sequence_parallel && plan.tp > 1,
            e: match plan.precision {
                Precision::F32 => 4.0,
                Precision::Bf16 => 2.0,
            },
            drop: plan.dropout,
            chunk: plan.loss_chunk,
            core: if plan.dropout { AttentionCore::Composed } else { plan.attention },
            att_rows: (plan.microbatch * g.heads / plan.tp * local) as f64,
            q_chunk: if plan.cp > 1 { g.seq / (2 * plan.cp) } else { g.seq } as f64,
            bh: (plan.microbatch * g.heads / plan.tp) as f64,
            // The gathered keys and values as the matmuls keep them: `[b, a/t, s, d]` each
            // (grouped-query attention: repeated for every query head).
            gathered_kv: if plan.cp > 1 { (2 * plan.microbatch * g.seq * g.hidden / plan.tp) as f64 } else { 0.0 },
            s: g.seq as f64,
            act_kept: match g.activation {
                crate::activation::Activation::Gelu => 0.0,
                crate::activation::Activation::GeluTanh => 2.0,
                crate::activation::Activation::SwiGlu => 3.0,
            },
            norm_stats: if g.arch.norm == crate::arch::Norm::RmsNorm { 1.0 } else { 2.0 },
        }
    }

    fn seq(&self) -> f64 {
        if self.sp {
            self.n * self.h / self.t
        } else {
            self.n * self.h
        }
    }
    fn rows(&self) -> f64 {
        if self.sp {
            self.n / self.t
        } else {
            self.n
        }
    }
    /// The `s²` tensors of the attention core (bytes), or the fused/chunked op's f32 `lse`.
    fn core(&self) -> f64 {
        if self.core.keeps_lse_only() {
            return self.att_rows * 4.0;
        }
        // The softmax op's f32 output `P` (in f32 without dropout also what the matmul with v
        // keeps), `P` cast to `e` in half precision (kept with dropout too: measured, the
        // "dropout bf16" case of the grid), the dropout mask and the dropped probabilities.
        let cast = if self.e < 4.0 { self.s2 * self.e } else { 0.0 };
        self.s2 * 4.0 + cast + if self.drop { 2.0 * self.s2 * self.e } else { 0.0 }
    }
    /// The attention core's backward transient: the composed two f32 `s²` buffers (the softmax
    /// op's backward: `dP` and `dP ∘ P`, then `dP − Σ`; in half precision also the
    /// probabilities' gradient and the scores' gradient in `e`: measured 2.0 and 3.0 f32 `s²`
    /// above the backward's start at s 512, with Burn's softmax); the fused kernels' `dq, dk, dv` and f32 `D` (and, in half precision, `dO` and `o` cast to f32; under
    /// context parallelism a query chunk's `dk, dv` are as long as the gathered keys: predicted,
    /// not yet measured, since no Cube backend measures a multi-rank world); the
    /// chunked op's f32 `D`, `dk`/`dv` accumulators, the `dq` chunks and two f32 buffers of
    /// the last chunk `[b, a/t, rows, s]` (`P`, `dP`; in half precision also `P` and `dS` as
    /// half-precision matmul operands and one f32 product of a half-precision matmul before its
    /// cast: Flex computes them in f32).
    fn core_transient(&self) -> f64 {
        let local = self.n * self.h / self.t;
        let half = |tensors: f64| if self.e < 4.0 { tensors * local * 4.0 } else { 0.0 };
        match self.core {
            AttentionCore::Fused => {
                let dkv = if self.gathered_kv > 0.0 { self.gathered_kv } else { 2.0 * local };
                local * self.e + dkv * self.e + self.att_rows * 4.0 + half(2.0) + self.gathered_kv_grads()
            }
            AttentionCore::Chunked(rows) => {
                // `[b, a/t, rows, ≤ s]`.
                let last = self.bh * (rows as f64).min(self.q_chunk) * self.s;
                let half_operands = if self.e < 4.0 { last * 4.0 + 2.0 * last * self.e } else { 0.0 };
                // The f32 dk/dv accumulators: as long as the queries, or under context
                // parallelism as the keys up to the chunk's end (about the gathered sequence).
                let acc = if self.gathered_kv > 0.0 { self.gathered_kv * 4.0 } else { 2.0 * local * 4.0 };
                self.att_rows * 4.0 + acc + local * self.e + 2.0 * last * 4.0 + half_operands + self.gathered_kv_grads()
            }
            AttentionCore::Composed => 2.0 * self.s2 * 4.0 + if self.e < 4.0 { 2.0 * self.s2 * self.e } else { 0.0 } + self.gathered_kv_grads(),
        }
    }
    /// Context parallelism: the gathered keys' and values' gradients, and on thread ranks their
    /// staged copies for the reduce-scatter (0 without).
    fn gathered_kv_grads(&self) -> f64 {
        2.0 * self.gathered_kv * self.e
    }
    /// Bytes a block keeps without recompute.
    fn block(&self) -> f64 {
        let (e, seq, nh) = (self.e, self.seq(), self.n * self.h);
        let masks = if self.drop { 2.0 * seq } else { 0.0 };
        let mlp = (2.0 + self.act_kept) * self.n * self.f / self.t;
        e * (seq + nh + 3.0 * nh / self.t + nh / self.t + masks + seq + nh + mlp + self.gathered_kv) + self.core() + 2.0 * self.norm_stats * self.rows() * 4.0
    }
    /// Bytes a block keeps under `mode`.
    fn block_kept(&self, mode: Recompute) -> f64 {
        match mode {
            Recompute::None => self.block(),
            // A fused or chunked core keeps only o and the lse: the block keeps its graph.
            Recompute::Selective if self.core.keeps_lse_only() => self.block(),
            // The core (with context parallelism its gathered keys and values) is rerun.
            Recompute::Selective => self.block() - self.core() - self.e * self.gathered_kv,
            Recompute::Full => self.e * self.seq(),
            Recompute::Blocks(_) => unreachable!("a block's own mode comes from Recompute::for_block"),
        }
    }
    /// Bytes the `n` blocks of a stage (model chunk) keep under `mode`.
    fn blocks_kept(&self, mode: Recompute, n: usize) -> f64 {
        (0..n).map(|i| self.block_kept(mode.for_block(i))).sum()
    }
    /// The largest transient of a block's backward.
    fn block_transient(&self, mode: Recompute) -> f64 {
        let t = (3.0 * self.n * self.f / self.t * self.e).max(self.core_transient());
        if mode == Recompute::Full {
            t + self.block() - self.e * self.seq()
        } else {
            t
        }
    }
    /// The head keeps the final layer norm's input and output and the f32 shifted logits of
    /// the cross-entropy, or with a chunked loss the logits themselves (in `e`).
    fn head(&self) -> f64 {
        let logits = self.n * self.v / self.t * if self.chunk.is_some() { self.e } else { 4.0 };
        self.e * (self.seq() + self.n * self.h) + logits
    }
    /// The head's largest transient: three `[rows, V/t]` f32 buffers of the cross-entropy's
    /// backward (all rows), or with a chunked loss one chunk's next to the logits' gradient being
    /// filled; at least the logits' matmul, whose f32 product Flex builds through one copy
    /// (`2·N·V/t` f32, in bf16 too: Flex multiplies half precision in f32).
    fn head_transient(&self) -> f64 {
        let logits_f32 = self.n * self.v / self.t * 4.0;
        let backward = match self.chunk {
            None => 3.0 * logits_f32,
            Some(rows) => self.n * self.v / self.t * self.e + 3.0 * (rows as f64).min(self.n) * self.v / self.t * 4.0,
        };
        backward.max(2.0 * logits_f32)
    }
}

/// Parameters of `layers` blocks (this TP rank's shards), with the embedding and/or head.
fn stage_params(g: &GptShape, t: usize, layers: usize, first: bool, last: bool) -> f64 {
    let (h, f, v, t) = (g.hidden as f64, g.ffn as f64, g.vocab as f64, t as f64);
    let (bias, norm) = (!g.arch.no_bias, if g.arch.norm == crate::arch::Norm::RmsNorm { h } else { 2.0 * h });
    let mlp_matrices = if g.activation.gated() { 3.0 } else { 2.0 };
    let kv = g.arch.kv_heads.map_or(h, |k| (k * (g.hidden / g.heads)) as f64);
    let attention = (2.0 * h + 2.0 * kv) * h / t + if bias { (h + 2.0 * kv) / t + h } else { 0.0 };
    let mlp = mlp_matrices * h * f / t + if bias { (mlp_matrices - 1.0) * f / t + h } else { 0.0 };
    let mut p = layers as f64 * (attention + mlp + 2.0 * norm);
    if first {
        p += v / t * h + if g.arch.position == crate::arch::Position::Learned { g.seq as f64 * h } else { 0.0 };
    }
    if last {
        p += norm;
    }
    if last && !(first && g.tied_embeddings) {
        p += h * v / t;
    }
    p
}

/// Parameters of the whole model (tp = 1).
pub fn parameter_count(g: &GptShape) -> f64 {
    stage_params(g, 1, g.layers, true, true)
}

/// Every pipeline rank's predicted memory.
pub fn estimate(g: &GptShape, plan: &TrainPlan) -> Result<Vec<RankMemory>, String> {
    check(g, plan)?;
    let layout = StageLayout::balanced(g.layers, plan.pp * plan.virtual_stages).map_err(|e| e.to_string())?;
    let actions = actions(plan)?;
    let d = Dims::new(g, plan);
    let mut out = Vec::with_capacity(plan.pp);
    for (r, rank_actions) in actions.iter().enumerate() {
        let p: f64 = (0..plan.virtual_stages)
            .map(|c| layout.part(r + c * plan.pp))
            .map(|sp| stage_params(g, plan.tp, sp.layers.len(), sp.is_first(), sp.is_last()))
            .sum();
        let shard = if plan.zero { p / plan.replicas() as f64 } else { p };
        let params = p * d.e;
        let optimizer = 8.0 * shard + if plan.precision == Precision::Bf16 { 4.0 * shard } else { 0.0 };
        let grads = 4.0 * p;
        let state = params + optimizer;
        let run = replay(&d, g, plan, &layout, rank_actions, state, grads);
        let optimizer_step = state + optimizer_transient(plan, p, d.e);
        let runtime = gemm_scratch();
        let peak = run.fwd_bwd.max(optimizer_step) + runtime;
        out.push(RankMemory {
            pp_rank: r,
            params,
            grads,
            optimizer,
            activations: run.activations,
            transient: run.transient,
            optimizer_step,
            runtime,
            peak,
            in_flight: run.max_in_flight,
        });
    }
    Ok(out)
}

/// What replaying one rank's actions found: its forward/backward peak (with the model state),
/// the transient and the live activations at it, the most micro-batches in flight.
struct Replay {
    fwd_bwd: f64,
    transient: f64,
    activations: f64,
    max_in_flight: usize,
}

/// Replays a rank's actions: a forward adds its chunk-micro-batch's activations, a backward (B
/// or I: ours frees the graph there) peaks, then frees them; with accumulation over several
/// micro-batches the f32 gradients stay after the first backward.
fn replay(d: &Dims, g: &GptShape, plan: &TrainPlan, layout: &StageLayout, actions: &[Action], state: f64, grads: f64) -> Replay {
    // Activations of one chunk-micro-batch of stage `s`.
    let kept = |s: usize| {
        let sp = layout.part(s);
        let mut k = d.blocks_kept(plan.recompute, sp.layers.len());
        if sp.is_first() && d.drop {
            k += d.e * d.seq();
        }
        if sp.is_last() {
            k += d.head();
        } else if plan.pp > 1 {
            k += d.e * d.seq();
        }
        k
    };
    let accumulating = plan.microbatches > 1;
    let (mut live, mut count, mut grads_done) = (0.0f64, 0usize, 0.0f64);
    let mut run = Replay { fwd_bwd: 0.0, transient: 0.0, activations: 0.0, max_in_flight: 0 };
    for a in actions {
        match a.op {
            Op::F => {
                live += kept(a.stage);
                count += 1;
                run.max_in_flight = run.max_in_flight.max(count);
            }
            Op::B | Op::I => {
                let k = kept(a.stage);
                let (peak, t) = backward_peak(d, g, plan, &layout.part(a.stage), k, grads_done);
                if state + (live - k) + peak > run.fwd_bwd {
                    (run.fwd_bwd, run.transient, run.activations) = (state + (live - k) + peak, t, live);
                }
                live -= k;
                count -= 1;
                if accumulating {
                    grads_done = grads;
                }
            }
            _ => {}
        }
    }
    run
}

/// The peak of one chunk-micro-batch's backward above the model state and the other
/// micro-batches: its pieces (head, blocks last to first, embedding) in order, each with the
/// activations not yet freed, the gradients produced so far (this micro-batch's, next to the
/// accumulated ones of the earlier micro-batches) and the piece's own transient. Returns the
/// peak and the transient at it.
fn backward_peak(d: &Dims, g: &GptShape, plan: &TrainPlan, spec: &crate::pipeline::PartSpec, kept: f64, grads_live: f64) -> (f64, f64) {
    let block_params = stage_params(g, plan.tp, 1, false, false) * 4.0;
    let mut pieces: Vec<(f64, f64, f64)> = Vec::new(); // (kept, transient, gradient bytes)
    if spec.is_last() {
        pieces.push((d.head(), d.head_transient(), (stage_params(g, plan.tp, 0, false, true)) * 4.0));
    }
    // The blocks last to first, as the backward walks them.
    for i in (0..spec.layers.len()).rev() {
        let mode = plan.recompute.for_block(i);
        pieces.push((d.block_kept(mode), d.block_transient(mode), block_params));
    }
    if spec.is_first() {
        // The lookup's backward builds the dense `[V/t, h]` gradient of the table (and a copy).
        let table = g.vocab as f64 / plan.tp as f64 * g.hidden as f64 * d.e;
        pieces.push((0.0, 3.0 * table, stage_params(g, plan.tp, 0, true, false) * 4.0));
    }
    let (mut remaining, mut done, mut peak, mut at) = (kept, grads_live, 0.0f64, 0.0f64);
    for (k, t, p) in pieces {
        if remaining + done + t > peak {
            (peak, at) = (remaining + done + t, t);
        }
        remaining -= k;
        done += p;
    }
    // At the end every gradient of this micro-batch is live next to the accumulated ones.
    if done > peak {
        (peak, at) = (done, 0.0);
    }
    (peak.max(kept + grads_live), at)
}
