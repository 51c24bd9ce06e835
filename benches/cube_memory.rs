//! The memory model against a Cube backend's bytes in use (cubecl's pools, polled after the
//! stream drains: cubecl keeps no peak) for one-rank layouts of a small GPT: after the forward
//! of the third step (model state + kept activations) and after the step (model state). Shared
//! by `examples/device_check/memory.rs` (CUDA) and `tests/wgpu_memory.rs` (wgpu; lavapipe in CI).

use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Int, Tensor, TensorData};
use burn_parallel::attention::AttentionKernel;
use burn_parallel::memory::{estimate, GptShape, TrainPlan};
use burn_parallel::optim::{DistAdamW, DistAdamWConfig};
use burn_parallel::precision::Precision;
use burn_parallel::recompute::Recompute;
use burn_parallel::{BackwardWith, LocalWorld, ParallelBackend, ParallelConfig, ProcessGroups};
use burn_parallel_modules::recompute::{self, Tokens};
use burn_parallel_modules::GptConfig;

/// One layout of the table.
#[derive(Debug, Clone)]
pub struct Layout {
    pub name: &'static str,
    pub precision: Precision,
    pub recompute: Recompute,
    pub loss_chunk: Option<usize>,
    pub attention: AttentionKernel,
}

/// Predicted and measured bytes, after the forward and after the step.
#[derive(Debug, Clone, Copy)]
pub struct Measured {
    pub predicted_forward: f64,
    pub forward: f64,
    pub predicted_state: f64,
    pub state: f64,
}

/// Trains three steps of `shape` at batch `batch` on one rank; `in_use` reads the device's bytes
/// in use after a sync.
pub fn measure<B>(shape: &GptShape, batch: usize, l: &Layout, in_use: impl Fn() -> Result<u64, String>) -> Result<Measured, String>
where
    B: AutodiffBackend + ParallelBackend + BackwardWith,
    B::InnerBackend: ParallelBackend,
{
    let device = Default::default();
    let groups = ProcessGroups::new(ParallelConfig::new(), LocalWorld::new(1).communicator(0)).map_err(|e| e.to_string())?;
    let g = shape;
    let config = GptConfig::new(g.vocab, g.seq, g.hidden, g.heads, g.layers, g.ffn)
        .with_precision(l.precision)
        .with_recompute(l.recompute)
        .with_loss_chunk(l.loss_chunk)
        .with_attention(l.attention)
        .with_tie_embeddings(g.tied_embeddings)
        .with_activation(g.activation);
    let mut gpt = config.init::<B>(&groups.tp, &device).map_err(|e| e.to_string())?;
    let attention = gpt.blocks[0].attn.core;
    let mut opt = DistAdamW::<B>::new(DistAdamWConfig::new(), &groups);
    let ids = |step: usize| TensorData::new((0..batch * g.seq).map(|i| ((i * 7 + step * 13) % g.vocab) as i64).collect::<Vec<_>>(), [batch, g.seq]);
    let (mut after_forward, mut after_step) = (0u64, 0u64);
    for step in 0..3 {
        let x = Tensor::<B, 2, Int>::from_data(ids(step), &device);
        let grads = {
            let pieces = gpt.pieces();
            let (_, tape) = recompute::forward(&pieces, None, Tokens { ids: Some(x.clone()), targets: Some(x) }, l.recompute, l.loss_chunk);
            after_forward = in_use()?;
            recompute::backward(&pieces, &gpt, tape, None, 1.0).map_err(|e| e.to_string())?.1
        };
        gpt = opt.step(1e-3, vec![(gpt, grads)], Some(1.0)).map_err(|e| e.to_string())?.0.remove(0);
        after_step = in_use()?;
    }
    let plan = TrainPlan {
        cp: 1,
        dp: 1,
        pp: 1,
        tp: 1,
        virtual_stages: 1,
        sequence_parallel: false,
        microbatch: batch,
        microbatches: 1,
        schedule: "1f1b".into(),
        recompute: l.recompute,
        zero: false,
        precision: l.precision,
        dropout: false,
        loss_chunk: l.loss_chunk,
        attention,
    };
    let e = &estimate(g, &plan)?[0];
    let state = e.params + e.optimizer;
    Ok(Measured { predicted_forward: state + e.activations, forward: after_forward as f64, predicted_state: state, state: after_step as f64 })
}

/// The table's layouts; `bf16` adds the half-precision ones.
pub fn layouts(bf16: bool) -> Vec<Layout> {
    use AttentionKernel::{Chunked, Composed, Fused};
    use Precision::{Bf16, F32};
    use Recompute::{Full, None, Selective};
    let l = |name, precision, recompute, loss_chunk, attention| Layout { name, precision, recompute, loss_chunk, attention };
    let mut v = vec![
        l("f32", F32, None, Option::None, Fused),
        l("f32, composed attention", F32, None, Option::None, Composed),
        l("f32, chunked:64 attention", F32, None, Option::None, Chunked(64)),
        l("f32 selective, composed attention", F32, Selective, Option::None, Composed),
        l("f32 full", F32, Full, Option::None, Fused),
        l("f32 full, chunked loss 512", F32, Full, Some(512), Fused),
    ];
    if bf16 {
        v.extend([
            l("bf16", Bf16, None, Option::None, Fused),
            l("bf16, composed attention", Bf16, None, Option::None, Composed),
            l("bf16, chunked:64 attention", Bf16, None, Option::None, Chunked(64)),
            l("bf16 full, chunked loss 512", Bf16, Full, Some(512), Fused),
        ]);
    }
    v
}
