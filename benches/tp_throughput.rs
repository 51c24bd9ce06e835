//! Tokens/s of one training step (forward + backward + AdamW) of the same GPT:
//! built from plain burn-nn layers (baseline), ours at tp=1, and tp=2/4 on threads; plus the
//! local communicator's all-reduce latency. Ratios are against the baseline measured in the same
//! run. `cargo bench --bench tp_throughput` (env: BENCH_STEPS, default 6).

use std::time::{Duration, Instant};

use burn::backend::{Autodiff, Flex};
use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::{Int, Tensor, TensorData};
use burn_parallel::rng::HostRng;
use burn_parallel::{all_ok, run_world, LocalWorldOptions, ReduceOp};
use burn_parallel_modules::GptConfig;

type B = Autodiff<Flex>;

const BATCH: usize = 8;
const SEQ: usize = 64;

fn config() -> GptConfig {
    GptConfig::new(256, SEQ, 128, 4, 4, 512)
}

fn batch(step: usize) -> (Tensor<B, 2, Int>, Tensor<B, 2, Int>) {
    let mut rng = HostRng::new(1, &format!("bench{step}"));
    let ids: Vec<i64> = (0..BATCH * SEQ).map(|_| (rng.next_u64() % 256) as i64).collect();
    let tg: Vec<i64> = ids.iter().map(|t| (t + 1) % 256).collect();
    let dev = Default::default();
    (Tensor::from_data(TensorData::new(ids, [BATCH, SEQ]), &dev), Tensor::from_data(TensorData::new(tg, [BATCH, SEQ]), &dev))
}

fn steps() -> usize {
    std::env::var("BENCH_STEPS").ok().and_then(|s| s.parse().ok()).unwrap_or(6)
}

/// Seconds per step, timed after 2 warm-up steps.
fn time_steps(mut step: impl FnMut(usize)) -> f64 {
    for s in 0..2 {
        step(s);
    }
    let n = steps();
    let start = Instant::now();
    for s in 0..n {
        step(s + 2);
    }
    start.elapsed().as_secs_f64() / n as f64
}

fn burn_nn() -> f64 {
    let mut model = config().init_reference::<B>(&Default::default());
    let mut optim = AdamWConfig::new().init();
    time_steps(|s| {
        let (x, y) = batch(s);
        let loss = model.loss(x, y);
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(1e-3, model.clone(), grads);
    })
}

fn ours(tp: usize) -> f64 {
    let res = run_world(tp, LocalWorldOptions::default(), |comm| {
        let mut model = config().init::<B>(&comm, &Default::default()).map_err(|e| e.to_string())?;
        let mut optim = AdamWConfig::new().init();
        Ok::<f64, String>(time_steps(|s| {
            let (x, y) = batch(s);
            let loss = model.loss(x, y);
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optim.step(1e-3, model.clone(), grads);
        }))
    });
    all_ok(res).expect("bench world").into_iter().fold(0.0, f64::max)
}

fn all_reduce_latency(world: usize, elems: usize) -> Duration {
    let iters = 50;
    let res = run_world(world, LocalWorldOptions::default(), |comm| {
        let x = Tensor::<Flex, 1>::ones([elems], &Default::default());
        let start = Instant::now();
        for _ in 0..iters {
            burn_parallel::comm::ops::all_reduce(x.clone(), ReduceOp::Sum, &comm).map_err(|e| e.to_string())?;
        }
        Ok::<_, String>(start.elapsed() / iters)
    });
    all_ok(res).expect("bench world").into_iter().max().unwrap()
}

fn main() {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let params = config().init_reference::<Flex>(&Default::default()).num_params();
    println!("GPT {params} params, batch {BATCH} x seq {SEQ}, Autodiff<Flex>, {cores} cores, {} timed steps\n", steps());
    let base = burn_nn();
    let tok = (BATCH * SEQ) as f64;
    println!("| model | s/step | tokens/s | vs burn-nn |");
    println!("|---|---|---|---|");
    println!("| burn-nn GPT (baseline) | {base:.3} | {:.0} | 1.00 |", tok / base);
    for tp in [1, 2, 4] {
        let t = ours(tp);
        println!("| burn-parallel tp={tp} ({tp} threads) | {t:.3} | {:.0} | {:.2} |", tok / t, base / t);
    }
    let elems = BATCH * SEQ * 128;
    println!("\nlocal all-reduce of [{BATCH}, {SEQ}, 128] f32 ({} KiB):", elems * 4 / 1024);
    for w in [2, 4] {
        println!("  world {w}: {:?} per call", all_reduce_latency(w, elems));
    }
}
