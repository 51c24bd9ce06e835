//! Measured against predicted memory per rank, shared by `benches/memory.rs` (the grid) and
//! `tests/memory.rs` (a small grid in CI). The including crate installs the tracking allocator.

use burn::backend::{Autodiff, Flex};
use burn::tensor::{Int, Tensor, TensorData};
use burn_parallel::memory::{self, GptShape, RankMemory, TrainPlan};
use burn_parallel::optim::{DistAdamW, DistAdamWConfig};
use burn_parallel::pipeline::{PipelineExecutor, PipelineOptions};
use burn_parallel::precision::Precision;
use burn_parallel::recompute::Recompute;
use burn_parallel::{all_ok, run_world, LocalWorldOptions, ParallelConfig, ProcessGroups};
use burn_parallel_modules::{GptConfig, GptPipeline, TokenBatch};
use burn_parallel_schedules::schedule_by_name;

type B = Autodiff<Flex>;

/// One layout of the grid.
#[derive(Debug, Clone)]
pub struct Case {
    pub name: &'static str,
    pub plan: TrainPlan,
}

/// A plan with every option at its default: dp × pp × tp, one micro-batch of `batch` per replica.
pub fn plan(dp: usize, pp: usize, tp: usize, batch: usize) -> TrainPlan {
    TrainPlan {
        dp,
        cp: 1,
        pp,
        tp,
        virtual_stages: 1,
        sequence_parallel: false,
        microbatch: batch / dp,
        microbatches: 1,
        schedule: "1f1b".into(),
        recompute: Recompute::None,
        zero: false,
        precision: Precision::F32,
        dropout: false,
        loss_chunk: None,
        attention: burn_parallel::attention::AttentionCore::Composed,
    }
}

/// With `m` micro-batches per step.
pub fn with_microbatches(mut p: TrainPlan, m: usize) -> TrainPlan {
    p.microbatch /= m;
    p.microbatches = m;
    p
}

/// Deterministic token ids for global samples `range`.
fn tokens(range: std::ops::Range<u64>, seq: usize, vocab: usize) -> (TensorData, TensorData) {
    let n = (range.end - range.start) as usize;
    let t = |i: u64, j: usize| ((i as usize * 31 + j * 7 + (i as usize * j) % 5) % vocab) as i64;
    let x: Vec<i64> = range.clone().flat_map(|i| (0..seq).map(move |j| t(i, j))).collect();
    let y: Vec<i64> = range.flat_map(|i| (0..seq).map(move |j| t(i, j + 1))).collect();
    (TensorData::new(x, [n, seq]), TensorData::new(y, [n, seq]))
}

/// This rank's pipelined GPT under `schedule`.
fn executor(config: &GptConfig, groups: &ProcessGroups, schedule: &str, opts: PipelineOptions) -> Result<PipelineExecutor<B, GptPipeline, 3>, String> {
    let model = GptPipeline { config: config.clone(), tp: groups.tp.clone(), cp: Some(burn_parallel::ContextParallel::new(groups.cp.clone())) };
    let sched = schedule_by_name(schedule).map_err(|e| e.to_string())?;
    PipelineExecutor::new(model, sched.as_ref(), &opts, groups.pp.clone(), Default::default()).map_err(|e| e.to_string())
}

/// Bytes each rank holds after `calls` more pipelined evaluations (`PipelineExecutor::
/// forward_loss`, `pp` stages, 4 micro-batches of 2) than after the first one: what evaluation
/// leaves behind.
pub fn evaluation_growth(shape: &GptShape, pp: usize, calls: usize) -> Vec<i64> {
    let config = GptConfig::new(shape.vocab, shape.seq, shape.hidden, shape.heads, shape.layers, shape.ffn);
    let (x, y) = tokens(0..8, shape.seq, shape.vocab);
    let cut = |d: &TensorData, i| burn_parallel::comm::split_along(d, 0, 4, i).unwrap();
    let mbs: Vec<_> = (0..4).map(|i| TokenBatch { inputs: cut(&x, i), targets: cut(&y, i) }).collect();
    let results = run_world(pp, LocalWorldOptions::default(), |c| {
        let groups = ProcessGroups::new(ParallelConfig::new().with_pipeline_parallel(pp), c.clone()).map_err(|e| e.to_string())?;
        let exec = executor(&config, &groups, "1f1b", PipelineOptions { microbatches: 4, virtual_stages: 1, layout: None })?;
        exec.forward_loss(&mbs).map_err(|e| e.to_string())?;
        let before = settled(&c, c.global_rank())?;
        for _ in 0..calls {
            exec.forward_loss(&mbs).map_err(|e| e.to_string())?;
        }
        Ok::<i64, String>(settled(&c, c.global_rank())? - before)
    });
    all_ok(results).unwrap()
}

/// Every rank's measured peak (bytes) in the third training step (the first two create the
/// optimizer state and warm the backend up), with its pipeline rank.
pub fn measure(shape: &GptShape, p: &TrainPlan) -> Vec<(usize, i64)> {
    run(shape, p, 3).into_iter().map(|m| (m.pp_rank, m.peak)).collect()
}

/// What one rank measured.
#[derive(Debug, Clone)]
pub struct Measured {
    pub pp_rank: usize,
    /// Peak of the last step.
    pub peak: i64,
    /// Held after the last step (parameters, optimizer state, runtime).
    pub state: i64,
    /// Seconds per step after the first two.
    pub step_secs: f64,
}

/// What `rank` holds once every rank finished the step (after a barrier: the ranks' last
/// frees may still be under way when a fast rank reads its counter).
fn settled(world: &burn_parallel::Comm, rank: usize) -> Result<i64, String> {
    world.barrier().map_err(|e| e.to_string())?;
    Ok(memory::current(rank))
}

/// `steps` (≥ 3) training steps of every rank; the last one measured.
pub fn run(shape: &GptShape, p: &TrainPlan, steps: usize) -> Vec<Measured> {
    let config = GptConfig::new(shape.vocab, shape.seq, shape.hidden, shape.heads, shape.layers, shape.ffn)
        .with_sequence_parallel(p.sequence_parallel)
        .with_precision(p.precision)
        .with_recompute(p.recompute)
        .with_dropout(if p.dropout { 0.1 } else { 0.0 })
        .with_loss_chunk(p.loss_chunk)
        .with_attention(p.attention.into())
        .with_tie_embeddings(shape.tied_embeddings)
        .with_activation(shape.activation)
        .with_norm(shape.arch.norm)
        .with_position(shape.arch.position)
        .with_bias(!shape.arch.no_bias)
        .with_kv_heads(shape.arch.kv_heads.filter(|&k| k != shape.heads));
    let per_replica = p.microbatch * p.microbatches;
    let results = run_world(p.dp * p.cp * p.pp * p.tp, LocalWorldOptions::default(), |c| {
        let rank = c.global_rank();
        let cfg = ParallelConfig::new()
            .with_data_parallel(p.dp)
            .with_context_parallel(p.cp)
            .with_pipeline_parallel(p.pp)
            .with_tensor_parallel(p.tp)
            .with_virtual_stages(p.virtual_stages);
        let groups = ProcessGroups::new(cfg, c.clone()).map_err(|e| e.to_string())?;
        let cp = burn_parallel::ContextParallel::new(groups.cp.clone());
        let mut opt = DistAdamW::<B>::new(DistAdamWConfig::new().with_zero(p.zero), &groups);
        let batch = |step: usize| {
            let first = (step * per_replica * p.dp + groups.coords.dp * per_replica) as u64;
            let (x, y) = tokens(first..first + per_replica as u64, shape.seq, shape.vocab);
            (cp.split_data(&x, 1).unwrap(), cp.split_data(&y, 1).unwrap())
        };
        let mut t0 = std::time::Instant::now();
        let state = if p.pp == 1 {
            let gpt = config.init::<B>(&groups.tp, &Default::default()).map_err(|e| e.to_string())?;
            let mut gpt = gpt.with_context_parallel(cp.clone());
            for step in 0..steps {
                if step == 2 {
                    t0 = std::time::Instant::now();
                }
                if step + 1 == steps {
                    memory::reset_peak(rank);
                }
                let (x, y) = batch(step);
                let cut = |d: &TensorData, i| burn_parallel::comm::split_along(d, 0, p.microbatches, i).unwrap();
                let dev = Default::default();
                let mbs = (0..p.microbatches).map(|i| (Tensor::<B, 2, Int>::from_data(cut(&x, i), &dev), Tensor::from_data(cut(&y, i), &dev)));
                let (_, grads) = gpt.forward_backward_accumulated(mbs.collect()).map_err(|e| e.to_string())?;
                gpt = opt.step(1e-3, vec![(gpt, grads)], Some(1.0)).map_err(|e| e.to_string())?.0.remove(0);
            }
            settled(&c, rank)?
        } else {
            let opts = PipelineOptions { microbatches: p.microbatches, virtual_stages: p.virtual_stages, layout: None };
            let mut exec = executor(&config, &groups, &p.schedule, opts)?;
            if shape.tied_embeddings {
                opt.tie(exec.tied_params(), groups.embedding.as_ref()).map_err(|e| e.to_string())?;
            }
            for step in 0..steps {
                if step == 2 {
                    t0 = std::time::Instant::now();
                }
                if step + 1 == steps {
                    memory::reset_peak(rank);
                }
                let (x, y) = batch(step);
                let cut = |d: &TensorData, i| burn_parallel::comm::split_along(d, 0, p.microbatches, i).unwrap();
                let mbs: Vec<_> = (0..p.microbatches).map(|i| TokenBatch { inputs: cut(&x, i), targets: cut(&y, i) }).collect();
                let out = exec.step(&mbs).map_err(|e| e.to_string())?;
                let parts = exec.stages().iter().map(|s| s.part.clone()).zip(out.grads).collect();
                let (parts, _) = opt.step(1e-3, parts, Some(1.0)).map_err(|e| e.to_string())?;
                for (s, part) in exec.stages_mut().iter_mut().zip(parts) {
                    s.part = part;
                }
            }
            settled(&c, rank)?
        };
        let step_secs = t0.elapsed().as_secs_f64() / (steps - 2) as f64;
        Ok::<_, String>(Measured { pp_rank: groups.coords.pp, peak: memory::peak(rank), state, step_secs })
    });
    all_ok(results).expect("measurement run")
}

/// Model state (parameters + optimizer, held after 3 steps, less gemm's scratch) in bytes per
/// parameter, on the lowest and the highest rank: `dp` replicas (ZeRO-1 if `zero`) in `precision`.
/// The f32 gradients a step holds (4 B/param) are not in it.
pub fn state_per_param(shape: &GptShape, dp: usize, zero: bool, precision: Precision) -> (f64, f64) {
    let mut p = plan(dp, 1, 1, 8);
    p.zero = zero;
    p.precision = precision;
    let params = memory::model::parameter_count(shape);
    let per = |s: i64| (s as f64 - memory::model::gemm_scratch()) / params;
    let m = run(shape, &p, 3);
    (per(m.iter().map(|x| x.state).min().unwrap()), per(m.iter().map(|x| x.state).max().unwrap()))
}

/// Measured and predicted peaks of every rank: (pp rank, measured, prediction).
pub fn compare(shape: &GptShape, p: &TrainPlan) -> Vec<(usize, i64, RankMemory)> {
    let predicted = memory::estimate(shape, p).expect("a valid plan");
    measure(shape, p).into_iter().map(|(r, m)| (r, m, predicted[r].clone())).collect()
}

/// The grid of layouts (global batch 8).
pub fn grid() -> Vec<Case> {
    let b = 8;
    let sp = |mut p: TrainPlan| {
        p.sequence_parallel = true;
        p
    };
    let rc = |mut p: TrainPlan, r: Recompute| {
        p.recompute = r;
        p
    };
    let zero = |mut p: TrainPlan| {
        p.zero = true;
        p
    };
    let bf16 = |mut p: TrainPlan| {
        p.precision = Precision::Bf16;
        p
    };
    let sched = |mut p: TrainPlan, s: &str, v: usize| {
        p.schedule = s.into();
        p.virtual_stages = v;
        p
    };
    let drop = |mut p: TrainPlan| {
        p.dropout = true;
        p
    };
    let chunk = |mut p: TrainPlan| {
        p.loss_chunk = Some(64);
        p
    };
    let chunked_attention = |mut p: TrainPlan| {
        p.attention = burn_parallel::attention::AttentionCore::Chunked(16);
        p
    };
    let cp = |mut p: TrainPlan, c: usize| {
        p.cp = c;
        p
    };
    vec![
        Case { name: "tp 1", plan: plan(1, 1, 1, b) },
        Case { name: "cp 2", plan: cp(plan(1, 1, 1, b), 2) },
        Case { name: "cp 2 tp 2 SP", plan: cp(sp(plan(1, 1, 2, b)), 2) },
        Case { name: "cp 2 chunked attention (16 rows)", plan: cp(chunked_attention(plan(1, 1, 1, b)), 2) },
        Case { name: "cp 2 pp 2", plan: cp(with_microbatches(plan(1, 2, 1, b), 4), 2) },
        Case { name: "cp 4", plan: cp(plan(1, 1, 1, b), 4) },
        Case { name: "tp 2", plan: plan(1, 1, 2, b) },
        Case { name: "tp 4", plan: plan(1, 1, 4, b) },
        Case { name: "tp 2 SP", plan: sp(plan(1, 1, 2, b)) },
        Case { name: "tp 4 SP", plan: sp(plan(1, 1, 4, b)) },
        Case { name: "selective", plan: rc(plan(1, 1, 1, b), Recompute::Selective) },
        Case { name: "full", plan: rc(plan(1, 1, 1, b), Recompute::Full) },
        Case { name: "full:2 (2 of 4 blocks)", plan: rc(plan(1, 1, 1, b), Recompute::Blocks(2)) },
        Case { name: "bf16", plan: bf16(plan(1, 1, 1, b)) },
        Case { name: "dropout tp 2", plan: drop(plan(1, 1, 2, b)) },
        Case { name: "dropout bf16", plan: drop(bf16(plan(1, 1, 1, b))) },
        Case { name: "chunked loss (64 rows)", plan: chunk(plan(1, 1, 1, b)) },
        Case { name: "bf16 full, chunked loss", plan: chunk(rc(bf16(plan(1, 1, 1, b)), Recompute::Full)) },
        Case { name: "chunked attention (16 rows)", plan: chunked_attention(plan(1, 1, 1, b)) },
        Case { name: "selective chunked attention", plan: rc(chunked_attention(plan(1, 1, 1, b)), Recompute::Selective) },
        Case { name: "bf16 chunked attention tp 2 SP", plan: chunked_attention(bf16(sp(plan(1, 1, 2, b)))) },
        Case { name: "dp 2", plan: plan(2, 1, 1, b) },
        Case { name: "dp 2 ZeRO", plan: zero(plan(2, 1, 1, b)) },
        Case { name: "dp 4", plan: plan(4, 1, 1, b) },
        Case { name: "dp 4 ZeRO bf16", plan: bf16(zero(plan(4, 1, 1, b))) },
        Case { name: "cp 2 dp 2", plan: cp(plan(2, 1, 1, b), 2) },
        Case { name: "accumulation m 4", plan: with_microbatches(plan(1, 1, 1, b), 4) },
        Case { name: "accumulation m 2 bf16 tp 2 SP", plan: with_microbatches(bf16(sp(plan(1, 1, 2, b))), 2) },
        Case { name: "pp 2 1F1B m 4", plan: with_microbatches(plan(1, 2, 1, b), 4) },
        Case { name: "pp 4 1F1B m 4", plan: with_microbatches(plan(1, 4, 1, b), 4) },
        Case { name: "pp 2 GPipe m 4", plan: sched(with_microbatches(plan(1, 2, 1, b), 4), "gpipe", 1) },
        Case { name: "pp 2 interleaved v 2 m 4", plan: sched(with_microbatches(plan(1, 2, 1, b), 4), "interleaved-1f1b", 2) },
        Case { name: "dp 2 pp 2 tp 2 SP ZeRO bf16 selective", plan: rc(bf16(zero(sp(with_microbatches(plan(2, 2, 2, b), 2)))), Recompute::Selective) },
    ]
}
