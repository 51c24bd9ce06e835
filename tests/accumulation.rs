//! Gradient accumulation without a pipeline (`Gpt::forward_backward_accumulated`, the example's
//! `--microbatches M` at `--pp 1`): M micro-batches give bit for bit the loss and every parameter
//! gradient of the pipeline over the same M micro-batches (pp 2, 1F1B; tp 2, SP, dropout 0.1,
//! recompute, bf16), draw the same dropout masks, and agree with one whole batch (no dropout)
//! within f32 rounding.

mod common;

use burn::tensor::{DType, Int, Tensor, TensorData};
use burn_parallel::params::named_param_grads;
use burn_parallel::pipeline::{PipelineExecutor, PipelineOptions};
use burn_parallel::precision::Precision;
use burn_parallel::recompute::Recompute;
use burn_parallel::rng::RandomStreams;
use burn_parallel::{ParallelConfig, ProcessGroups};
use burn_parallel_modules::{GptConfig, GptPipeline, TokenBatch};
use burn_parallel_schedules::schedule_by_name;
use common::runner::samples;
use common::*;

const M: usize = 4;

/// (global rank within the TP group order, loss, every gradient's (global path, f32 values,
/// dtype), dropout stream counts), of each TP rank.
type Run = Vec<(usize, f32, Vec<(String, Vec<f32>, DType)>, Vec<u64>)>;

fn config(sp: bool, mode: Recompute, precision: Precision, dropout: f64) -> GptConfig {
    GptConfig::new(32, 8, 16, 4, 4, 32).with_sequence_parallel(sp).with_dropout(dropout).with_recompute(mode).with_precision(precision)
}

fn values(d: &TensorData) -> Vec<f32> {
    d.clone().convert::<f32>().to_vec().unwrap()
}

/// The 8 samples of one step in `m` micro-batches.
fn microbatches(m: usize) -> Vec<(TensorData, TensorData)> {
    let (x, y) = samples(0..8);
    let cut = |d: &TensorData, i| burn_parallel::comm::split_along(d, 0, m, i).unwrap();
    (0..m).map(|i| (cut(&x, i), cut(&y, i))).collect()
}

/// The whole model at tp 2, the step's samples accumulated over `m` micro-batches.
fn accumulated(config: &GptConfig, m: usize) -> Run {
    world(2, |c| {
        let gpt = config.init::<B>(&c, &Default::default()).map_err(|e| e.to_string())?;
        let dev = Default::default();
        let mbs = microbatches(m).into_iter().map(|(x, y)| (Tensor::<B, 2, Int>::from_data(x, &dev), Tensor::from_data(y, &dev))).collect();
        let (loss, grads) = gpt.forward_backward_accumulated(mbs).map_err(|e| e.to_string())?;
        let named = named_param_grads(&gpt, &grads).into_iter().map(|p| {
            let g = p.grad.expect("every parameter has a gradient");
            (p.path, values(&g), g.dtype)
        });
        Ok((c.rank(), loss, named.collect(), gpt.random_streams().iter().map(|s| s.get()).collect()))
    })
}

/// The pipeline (pp 2 × tp 2, 1F1B) over the same `M` micro-batches; the TP ranks' gradients of
/// both stages gathered in layer order.
fn piped(config: &GptConfig) -> Run {
    let ranks = world(4, |c| {
        let groups = ProcessGroups::new(ParallelConfig::new().with_pipeline_parallel(2).with_tensor_parallel(2), c).map_err(|e| e.to_string())?;
        let opts = PipelineOptions { microbatches: M, virtual_stages: 1, layout: None };
        let model = GptPipeline { config: config.clone(), tp: groups.tp.clone(), cp: None };
        let exec = PipelineExecutor::<B, _, 3>::new(model, schedule_by_name("1f1b").unwrap().as_ref(), &opts, groups.pp.clone(), Default::default())
            .map_err(|e| e.to_string())?;
        let mbs: Vec<_> = microbatches(M).into_iter().map(|(inputs, targets)| TokenBatch { inputs, targets }).collect();
        let out = exec.step(&mbs).map_err(|e| e.to_string())?;
        let (mut named, mut streams) = (Vec::new(), Vec::new());
        for (s, g) in exec.stages().iter().zip(&out.grads) {
            named.extend(named_param_grads(&s.part, g).into_iter().map(|p| {
                let g = p.grad.unwrap();
                (global_path(&p.path, s.part.first_layer), values(&g), g.dtype)
            }));
            streams.extend(s.part.random_streams().iter().map(|s| s.get()));
        }
        Ok((groups.coords.tp, groups.coords.pp, out.loss, named, streams))
    });
    (0..2)
        .map(|tp| {
            let (mut named, mut streams, mut loss) = (Vec::new(), Vec::new(), f32::NAN);
            for pp in 0..2 {
                let r = ranks.iter().find(|r| r.0 == tp && r.1 == pp).unwrap();
                loss = r.2;
                named.extend(r.3.clone());
                streams.extend(r.4.clone());
            }
            (tp, loss, named, streams)
        })
        .collect()
}

/// The same parameters with the same gradients (paths sorted: the stages list them in their
/// own order), within `tol` (0: bit for bit), and the same dropout draws.
fn same(a: &Run, b: &Run, tol: f32, what: &str) {
    for (r, g) in a.iter().zip(b) {
        assert!((r.1 - g.1).abs() <= tol * r.1.abs(), "{what} tp rank {}: loss {} vs {}", r.0, r.1, g.1);
        let sorted = |v: &Vec<(String, Vec<f32>, DType)>| {
            let mut v = v.clone();
            v.sort_by(|x, y| x.0.cmp(&y.0));
            v
        };
        let (ra, ga) = (sorted(&r.2), sorted(&g.2));
        assert_eq!(ra.len(), ga.len(), "{what}: parameter count");
        for ((pa, va, da), (pb, vb, db)) in ra.iter().zip(&ga) {
            assert_eq!((pa, da), (pb, db), "{what}: parameters and gradient dtypes");
            let d = va.iter().zip(vb).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            let scale = va.iter().map(|x| x.abs()).fold(0f32, f32::max).max(1e-12);
            assert!(d <= tol * scale, "{what} tp rank {}: gradient of {pa} differs by {d} (largest {scale})", r.0);
        }
        assert_eq!(r.3.iter().sum::<u64>(), g.3.iter().sum::<u64>(), "{what}: dropout draws");
    }
}

#[test]
fn accumulated_micro_batches_give_the_pipelines_loss_and_gradients_bit_for_bit() {
    let cases = [
        ("tp 2", config(false, Recompute::None, Precision::F32, 0.1)),
        ("tp 2 SP full recompute", config(true, Recompute::Full, Precision::F32, 0.1)),
        ("tp 2 SP selective recompute bf16", config(true, Recompute::Selective, Precision::Bf16, 0.0)),
    ];
    for (what, config) in cases {
        let (acc, pipe) = (accumulated(&config, M), piped(&config));
        assert!(acc[0].3.iter().sum::<u64>() > 0 || config.dropout == 0.0, "{what}: dropout must draw masks");
        same(&acc, &pipe, 0.0, what);
        assert!(acc[0].2.iter().all(|g| g.2 == DType::F32), "{what}: accumulated gradients are f32 (main grads)");
    }
}

#[test]
fn accumulated_micro_batches_give_the_whole_batchs_loss_and_gradients() {
    for sp in [false, true] {
        let config = config(sp, Recompute::None, Precision::F32, 0.0);
        let whole = accumulated(&config, 1);
        for m in [2, 8] {
            same(&whole, &accumulated(&config, m), 1e-5, &format!("sp {sp}: {m} micro-batches against one"));
        }
    }
}
