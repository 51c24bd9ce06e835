//! `memory`: the memory model against CUDA's bytes in use (cubecl's pools, polled after the
//! stream drains: no peak counter) for one-rank layouts of a small GPT (fused and composed
//! attention): after the forward of the third step (model state + kept activations) and after
//! the step (model state).

use burn::backend::{Autodiff, Cuda};
use burn::tensor::{Int, Tensor, TensorData};
use burn_parallel::attention::AttentionKernel;
use burn_parallel::memory::{estimate, GptShape, TrainPlan};
use burn_parallel::optim::{DistAdamW, DistAdamWConfig};
use burn_parallel::precision::Precision;
use burn_parallel::recompute::Recompute;
use burn_parallel::{LocalWorld, ParallelConfig, ProcessGroups};
use burn_parallel_modules::recompute::{self, Tokens};
use burn_parallel_modules::GptConfig;

type B = Autodiff<Cuda>;

const SHAPE: GptShape = GptShape { vocab: 1024, seq: 256, hidden: 256, heads: 4, layers: 4, ffn: 1024 };
const BATCH: usize = 8;

fn run_one(precision: Precision, mode: Recompute, chunk: Option<usize>, attention: AttentionKernel) -> Result<(f64, f64, f64, f64), String> {
    let device = Default::default();
    let groups = ProcessGroups::new(ParallelConfig::new(), LocalWorld::new(1).communicator(0)).map_err(|e| e.to_string())?;
    let g = SHAPE;
    let config = GptConfig::new(g.vocab, g.seq, g.hidden, g.heads, g.layers, g.ffn)
        .with_precision(precision)
        .with_recompute(mode)
        .with_loss_chunk(chunk)
        .with_attention(attention);
    let mut gpt = config.init::<B>(&groups.tp, &device).map_err(|e| e.to_string())?;
    let attention = gpt.blocks[0].attn.core;
    let mut opt = DistAdamW::<B>::new(DistAdamWConfig::new(), &groups);
    let ids = |step: usize| TensorData::new((0..BATCH * g.seq).map(|i| ((i * 7 + step * 13) % g.vocab) as i64).collect::<Vec<_>>(), [BATCH, g.seq]);
    let (mut after_forward, mut after_step) = (0u64, 0u64);
    for step in 0..3 {
        let x = Tensor::<B, 2, Int>::from_data(ids(step), &device);
        let grads = {
            let pieces = gpt.pieces();
            let (_, tape) = recompute::forward(&pieces, None, Tokens { ids: Some(x.clone()), targets: Some(x) }, mode, chunk);
            after_forward = burn_parallel::cuda::memory_in_use(&device)?;
            recompute::backward(&pieces, &gpt, tape, None, 1.0).map_err(|e| e.to_string())?.1
        };
        gpt = opt.step(1e-3, vec![(gpt, grads)], Some(1.0)).map_err(|e| e.to_string())?.0.remove(0);
        after_step = burn_parallel::cuda::memory_in_use(&device)?;
    }
    let plan = TrainPlan {
        dp: 1,
        pp: 1,
        tp: 1,
        virtual_stages: 1,
        sequence_parallel: false,
        microbatch: BATCH,
        microbatches: 1,
        schedule: "1f1b".into(),
        recompute: mode,
        zero: false,
        precision,
        dropout: false,
        loss_chunk: chunk,
        attention,
    };
    let e = &estimate(&g, &plan)?[0];
    let state = e.params + e.optimizer;
    Ok((state + e.activations, after_forward as f64, state, after_step as f64))
}

/// Prints the table; a layout that fails is reported.
pub fn run(report: &mut super::Report) {
    println!("\n| layout (GPT d 256, 4 layers, s 256, b 8, V 1024) | predicted after forward | CUDA in use | predicted after step | CUDA in use |\n|---|---|---|---|---|");
    let (fused, composed) = (AttentionKernel::Fused, AttentionKernel::Composed);
    for (name, p, m, c, a) in [
        ("f32", Precision::F32, Recompute::None, None, fused),
        ("f32, composed attention", Precision::F32, Recompute::None, None, composed),
        ("bf16", Precision::Bf16, Recompute::None, None, fused),
        ("bf16, composed attention", Precision::Bf16, Recompute::None, None, composed),
        ("bf16, chunked:64 attention", Precision::Bf16, Recompute::None, None, AttentionKernel::Chunked(64)),
        ("f32 selective, composed attention", Precision::F32, Recompute::Selective, None, composed),
        ("f32 full", Precision::F32, Recompute::Full, None, fused),
        ("bf16 full, chunked loss 512", Precision::Bf16, Recompute::Full, Some(512), fused),
    ] {
        match run_one(p, m, c, a) {
            Ok((pf, mf, ps, ms)) => {
                println!("| {name} | {:.2} MB | {:.2} MB ({:.3}) | {:.2} MB | {:.2} MB ({:.3}) |", pf / 1e6, mf / 1e6, pf / mf, ps / 1e6, ms / 1e6, ps / ms);
                report.check(&format!("memory {name}"), Ok(String::new()));
            }
            Err(e) => report.check(&format!("memory {name}"), Err(e)),
        }
    }
}
