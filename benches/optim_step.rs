//! DistAdamW's step with fused updates (one flat update per 25 MiB group of
//! parameter state) against one parameter at a time (`group_bytes` 0), and without the
//! non-finite guard (`check_finite`, whose global norm is one more pass over the gradients
//! when nothing clips), in the same run, on a
//! GPT with GPT-2's 12 layers (its number of parameter tensors) at a small width, so that the
//! per-operation cost of the step shows rather than its arithmetic. Only the optimizer step is
//! timed (synced before and after), over `BENCH_STEPS` steps (default 8) after 2 warm-up steps.
//! `cargo bench --bench optim_step` (the CPU: f32 and bf16 parameters) and with
//! `--features wgpu` (also burn's Wgpu, a fusing Cube backend, f32).

use std::time::Instant;

use burn::backend::{Autodiff, Flex};
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Int, Tensor, TensorData};
use burn_parallel::optim::{DistAdamW, DistAdamWConfig};
use burn_parallel::params::named_params;
use burn_parallel::precision::Precision;
use burn_parallel::rng::HostRng;
use burn_parallel::{all_ok, run_world, LocalWorldOptions, ParallelBackend, ParallelConfig, ProcessGroups};
use burn_parallel_modules::GptConfig;

const BATCH: usize = 2;
const SEQ: usize = 32;
const VOCAB: usize = 256;
/// The fused variant: what `gpt_pretrain` uses on GPU devices.
const FUSED: usize = 25 << 20;

fn batch<B: AutodiffBackend>(step: usize, dev: &B::Device) -> (Tensor<B, 2, Int>, Tensor<B, 2, Int>) {
    let mut rng = HostRng::new(1, &format!("optim-bench{step}"));
    let ids: Vec<i64> = (0..BATCH * SEQ).map(|_| (rng.next_u64() % VOCAB as u64) as i64).collect();
    let tg: Vec<i64> = ids.iter().map(|t| (t + 1) % VOCAB as i64).collect();
    (Tensor::from_data(TensorData::new(ids, [BATCH, SEQ]), dev), Tensor::from_data(TensorData::new(tg, [BATCH, SEQ]), dev))
}

fn steps() -> usize {
    std::env::var("BENCH_STEPS").ok().and_then(|s| s.parse().ok()).unwrap_or(8)
}

/// Milliseconds per optimizer step, per forward + backward, and the number of parameter tensors
/// (`check`: the non-finite guard, `DistAdamWConfig::check_finite`).
fn time_step<B>(config: &GptConfig, group_bytes: usize, check: bool) -> (f64, f64, usize)
where
    B: AutodiffBackend + ParallelBackend,
    B::InnerBackend: ParallelBackend,
{
    let res = run_world(1, LocalWorldOptions::default(), |comm| {
        let groups = ProcessGroups::new(ParallelConfig::new(), comm).map_err(|e| e.to_string())?;
        let dev = B::Device::default();
        let mut model = config.init::<B>(&groups.tp, &dev).map_err(|e| e.to_string())?;
        let tensors = named_params(&model).len();
        let mut opt = DistAdamW::<B>::new(DistAdamWConfig::new().with_group_bytes(group_bytes).with_check_finite(check), &groups);
        let (mut total, mut fwd_bwd) = (0.0, 0.0);
        for s in 0..2 + steps() {
            let (x, y) = batch::<B>(s, &dev);
            let start = Instant::now();
            let grads = GradientsParams::from_grads(model.loss(x, y).backward(), &model);
            B::sync(&dev).map_err(|e| format!("{e:?}"))?;
            if s >= 2 {
                fwd_bwd += start.elapsed().as_secs_f64();
            }
            let start = Instant::now();
            model = opt.step(1e-3, vec![(model, grads)], None).map_err(|e| e.to_string())?.0.remove(0);
            B::sync(&dev).map_err(|e| format!("{e:?}"))?;
            if s >= 2 {
                total += start.elapsed().as_secs_f64();
            }
        }
        Ok::<_, String>((total / steps() as f64 * 1e3, fwd_bwd / steps() as f64 * 1e3, tensors))
    });
    all_ok(res).expect("bench world").remove(0)
}

fn row<B>(backend: &str, config: &GptConfig)
where
    B: AutodiffBackend + ParallelBackend,
    B::InnerBackend: ParallelBackend,
{
    let (per, fwd_bwd, n) = time_step::<B>(config, 0, true);
    let (fused, _, _) = time_step::<B>(config, FUSED, true);
    let (unchecked, _, _) = time_step::<B>(config, 0, false);
    let (p, d) = (config.precision, config.d_model);
    let guard = (per - unchecked) / (fwd_bwd + per);
    println!("| {backend} | {p:?} | d {d} | {n} | {per:.2} | {fused:.2} | {:.2} | {unchecked:.2} | {fwd_bwd:.2} | {:.1}% |", fused / per, 100.0 * guard);
}

fn main() {
    println!("| backend | parameters | width | tensors | per parameter ms | fused ms | fused / per parameter | no finite check ms | forward + backward ms | the check's share of a step |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for d in [16, 64] {
        let config = GptConfig::new(VOCAB, SEQ, d, 4, 12, 4 * d);
        row::<Autodiff<Flex>>("Flex (CPU)", &config);
        row::<Autodiff<Flex>>("Flex (CPU)", &config.clone().with_precision(Precision::Bf16));
        #[cfg(feature = "wgpu")]
        row::<Autodiff<burn::backend::Wgpu>>("wgpu (Fusion)", &config);
    }
}
