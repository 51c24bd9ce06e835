//! `burn_parallel::timing`: the library's spans counted per rank thread (the pipeline executor's
//! forward, backward, weight-gradient and p2p phases once per action of the plan; DistAdamW's
//! phases once per step; the GPT's forward + backward once per micro-batch), the summary over
//! the ranks naming the slowest rank, and nothing counted without the layer.

mod common;

use std::time::Duration;

use burn::tensor::TensorData;
use burn_parallel::data::GlobalSampler;
use burn_parallel::optim::{DistAdamW, DistAdamWConfig};
use burn_parallel::pipeline::{PipelineExecutor, PipelineOptions};
use burn_parallel::timing::{self, phase, PhaseSummary, Timings};
use burn_parallel::{ParallelConfig, ProcessGroups};
use burn_parallel_modules::{GptPipeline, TokenBatch};
use burn_parallel_schedules::{schedule_by_name, Op};
use common::*;

/// The layer, for every thread of this test binary (the rank threads included).
fn install() {
    use tracing_subscriber::layer::SubscriberExt;
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| tracing::subscriber::set_global_default(tracing_subscriber::registry().with(timing::layer())).unwrap());
}

const STEPS: usize = 2;
const MICROBATCHES: usize = 4;

/// `STEPS` steps of dp 2 × pp 2 under `schedule` with DistAdamW (ZeRO-1 with `zero`); each rank
/// sleeps 40 ms × its rank in a `data` span. Per rank: its timings, its actions of each kind per
/// step (from the plan), and the summary.
fn run(schedule: &str, zero: bool) -> Vec<(Timings, [usize; 3], Vec<PhaseSummary>)> {
    install();
    let layout = ParallelConfig::new().with_data_parallel(2).with_pipeline_parallel(2);
    let config = runner::gpt(4, false, 0.0);
    world(4, |c| {
        let groups = ProcessGroups::new(layout.clone(), c.clone()).map_err(|e| e.to_string())?;
        let mut optim = DistAdamW::<B>::new(DistAdamWConfig::new().with_zero(zero), &groups);
        let model = GptPipeline { config: config.clone(), tp: groups.tp.clone(), cp: None };
        let opts = PipelineOptions { microbatches: MICROBATCHES, virtual_stages: 1, layout: None };
        let sched = schedule_by_name(schedule).unwrap();
        let mut exec = PipelineExecutor::<B, _, 3>::new(model, sched.as_ref(), &opts, groups.pp.clone(), Default::default()).map_err(|e| e.to_string())?;
        let actions = &exec.plan().ranks[groups.pp.rank()];
        let count = |ops: &[Op]| actions.iter().filter(|a| ops.contains(&a.op)).count();
        let per_step = [count(&[Op::F]), count(&[Op::B, Op::I]), count(&[Op::W])];
        timing::take(); // whatever building the model timed
        for step in 0..STEPS {
            timing::span!(phase::DATA).in_scope(|| std::thread::sleep(Duration::from_millis(40 * c.rank() as u64)));
            let range = GlobalSampler::replica_samples((step * 8) as u64, 4, groups.coords.dp);
            let (x, y) = runner::samples(range);
            let cut = |d: &TensorData, i| burn_parallel::comm::split_along(d, 0, MICROBATCHES, i).unwrap();
            let mbs: Vec<_> = (0..MICROBATCHES).map(|i| TokenBatch { inputs: cut(&x, i), targets: cut(&y, i) }).collect();
            let out = exec.step(&mbs).map_err(|e| e.to_string())?;
            let parts = exec.stages().iter().map(|s| s.part.clone()).zip(out.grads).collect();
            let (parts, _) = optim.step(1e-3, parts, Some(1.0)).map_err(|e| e.to_string())?;
            for (stage, part) in exec.stages_mut().iter_mut().zip(parts) {
                stage.part = part;
            }
        }
        let mine = timing::take();
        let rows = timing::summarize(&mine, &c).map_err(|e| e.to_string())?;
        Ok((mine, per_step, rows))
    })
}

fn calls(t: &Timings, name: &str) -> u64 {
    t.get(name).map_or(0, |p| p.calls)
}

#[test]
fn every_action_and_optimizer_phase_is_counted_on_its_rank() {
    for (schedule, zero) in [("1f1b", false), ("zb-h1", true)] {
        let ranks = run(schedule, zero);
        for (rank, (t, [f, b, w], _)) in ranks.iter().enumerate() {
            let what = format!("{schedule}, rank {rank}");
            assert_eq!(calls(t, phase::FORWARD), (STEPS * f) as u64, "{what}");
            assert_eq!(calls(t, phase::BACKWARD), (STEPS * b) as u64, "{what}");
            assert_eq!(calls(t, phase::WEIGHT_GRAD), (STEPS * w) as u64, "{what}");
            assert_eq!((*f, *b), (MICROBATCHES, MICROBATCHES), "{what}: one forward and backward per micro-batch");
            assert_eq!(*w > 0, schedule == "zb-h1", "{what}: weight gradients apart under zero bubble only");
            assert!(calls(t, phase::PIPELINE_P2P) >= STEPS as u64, "{what}");
            for p in [phase::GRADS_REDUCE, phase::GRAD_NORM, phase::OPTIMIZER, phase::PARAMS_GATHER, phase::DATA] {
                assert_eq!(calls(t, p), STEPS as u64, "{what}: {p}");
            }
            assert_eq!(calls(t, phase::TIED_GRADS), 0, "{what}: no tied embedding");
            let busy = t.get(phase::FORWARD).unwrap().total + t.get(phase::BACKWARD).unwrap().total;
            assert!(busy > Duration::ZERO, "{what}");
        }
    }
}

#[test]
fn the_summary_is_every_ranks_and_names_the_slowest() {
    let ranks = run("1f1b", false);
    let rows = &ranks[0].2;
    for (rank, (_, _, r)) in ranks.iter().enumerate() {
        assert_eq!(r, rows, "rank {rank} has the same summary");
    }
    let names: Vec<&str> = rows.iter().map(|r| r.phase).collect();
    let expected =
        [phase::DATA, phase::FORWARD, phase::BACKWARD, phase::PIPELINE_P2P, phase::GRADS_REDUCE, phase::GRAD_NORM, phase::OPTIMIZER, phase::PARAMS_GATHER];
    assert_eq!(names, expected, "phase::ALL's order, phases no rank saw left out");
    for r in rows {
        let totals: Vec<Duration> = ranks.iter().map(|(t, ..)| t.get(r.phase).unwrap_or_default().total).collect();
        assert_eq!((r.min, r.max), (*totals.iter().min().unwrap(), totals[r.max_rank]), "{}", r.phase);
        assert_eq!(r.max, *totals.iter().max().unwrap(), "{}", r.phase);
        assert!(r.min <= r.mean && r.mean <= r.max, "{r:?}");
        assert_eq!(r.calls, ranks.iter().map(|(t, ..)| calls(t, r.phase)).max().unwrap());
    }
    // Rank r slept 40 ms × r per step in `data`: rank 3 is the slowest, at least 240 ms.
    let data = rows.iter().find(|r| r.phase == phase::DATA).unwrap();
    assert_eq!(data.max_rank, 3, "{data:?}");
    assert!(data.max >= Duration::from_millis(240) && data.min < Duration::from_millis(80), "{data:?}");
    let table = timing::table(rows, STEPS as u64);
    assert!(table.lines().nth(2).unwrap().starts_with("| data | 1.0 |"), "{table}");
    assert!(table.lines().any(|l| l.starts_with("| forward | 4.0 |")), "{table}");
}

#[test]
fn without_the_layer_nothing_is_counted() {
    let dispatch = tracing::Dispatch::new(tracing_subscriber::registry());
    tracing::dispatcher::with_default(&dispatch, || {
        timing::take();
        timing::span!(phase::STEP).in_scope(|| std::thread::sleep(Duration::from_millis(1)));
        assert_eq!(timing::take(), Timings::default());
    });
}

/// `set_device_sync`: the wait runs when a span starts (before the clock, so the phase holds no
/// work queued before it) and when it ends (before the clock: the phase holds its own work).
#[test]
fn a_device_sync_is_waited_for_when_a_span_starts_and_ends() {
    install();
    let calls = std::rc::Rc::new(std::cell::Cell::new(0));
    let seen = calls.clone();
    timing::take();
    timing::set_device_sync(Some(Box::new(move || {
        seen.set(seen.get() + 1);
        std::thread::sleep(Duration::from_millis(30));
    })));
    timing::span!(phase::OPTIMIZER).in_scope(|| ());
    timing::set_device_sync(None);
    timing::span!(phase::EVAL).in_scope(|| ());
    let t = timing::take();
    assert_eq!(calls.get(), 2, "one wait at the start, one at the end");
    let optimizer = t.get(phase::OPTIMIZER).unwrap().total;
    assert!(optimizer >= Duration::from_millis(30), "the end's wait is in the phase: {optimizer:?}");
    assert_eq!(t.get(phase::EVAL).map(|p| p.calls), Some(1), "without the hook, spans still count");
}
