//! `burn-nn-gpt2`: plain Burn's baseline for the GPT-2 benchmark — the same GPT-2 124M (d 768, 12
//! layers, 12 heads, context 1024, vocabulary 50304, untied head) built from burn-nn layers only
//! (`NnGpt`: burn-nn attention, layer norm, cross-entropy), Burn's AdamW, batch 8 × 1024, on one
//! GPU: tokens/s in f32 and in bf16 (plain Burn's bf16: every parameter and the optimizer state
//! in bf16, no master weights), and CUDA memory in use after the steps.

use burn::backend::{Autodiff, Cuda};
use burn::module::AutodiffModule;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, ElementConversion, Int, Tensor, TensorData};
use burn_parallel::precision::cast_params;
use burn_parallel_modules::reference::NnGpt;
use burn_parallel_modules::GptConfig;

use crate::Report;

type A = Autodiff<Cuda>;
const BATCH: usize = 8;
const SEQ: usize = 1024;
const VOCAB: usize = 50304;

fn batch(step: usize) -> (Tensor<A, 2, Int>, Tensor<A, 2, Int>) {
    let dev = Default::default();
    let ids = |k: usize| TensorData::new((0..BATCH * SEQ).map(|i| ((i * 7919 + (step + k) * 104729) % 50257) as i64).collect::<Vec<_>>(), [BATCH, SEQ]);
    (Tensor::from_data(ids(0), &dev), Tensor::from_data(ids(1), &dev))
}

/// Tokens/s over `steps` after two warm-up steps; the last loss.
fn train(dtype: DType, steps: usize) -> Result<(f64, f32), String> {
    let dev = Default::default();
    let config = GptConfig::new(VOCAB, SEQ, 768, 12, 12, 3072);
    let mut model: NnGpt<A> = cast_params(config.init_reference::<A>(&dev), dtype);
    let mut opt = AdamWConfig::new().with_beta_2(0.95).with_weight_decay(0.1).init::<A, NnGpt<A>>();
    let mut loss_value = 0.0;
    let mut start = std::time::Instant::now();
    for step in 0..steps + 2 {
        if step == 2 {
            <Cuda as Backend>::sync(&dev).map_err(|e| format!("{e:?}"))?;
            start = std::time::Instant::now();
        }
        let (x, y) = batch(step);
        let loss = model.loss(x, y);
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = opt.step(3e-4, model, grads);
        if step + 1 == steps + 2 {
            loss_value = loss.into_scalar().elem::<f32>();
        }
    }
    <Cuda as Backend>::sync(&dev).map_err(|e| format!("{e:?}"))?;
    let tokens = (steps * BATCH * SEQ) as f64 / start.elapsed().as_secs_f64();
    drop(model.valid());
    Ok((tokens, loss_value))
}

pub fn run(report: &mut Report) {
    println!("\n| plain Burn GPT-2 124M (burn-nn layers, AdamW, b 8 × 1024) | tokens/s | last loss | CUDA in use after |\n|---|---|---|---|");
    for (name, dtype, steps) in [("bf16 (all bf16)", DType::BF16, 10), ("f32", DType::F32, 6)] {
        match train(dtype, steps) {
            Ok((tokens, loss)) => {
                let mem = burn_parallel::cuda::memory_in_use(&Default::default()).map_or_else(|e| e, |b| format!("{:.0} MB", b as f64 / 1e6));
                println!("| {name} | {tokens:.0} | {loss:.4} | {mem} |");
                report.check(&format!("burn-nn gpt2 {name}"), if loss.is_finite() { Ok(String::new()) } else { Err(format!("loss {loss}")) });
            }
            Err(e) => report.check(&format!("burn-nn gpt2 {name}"), Err(e)),
        }
    }
}
