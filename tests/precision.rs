//! bf16 mixed precision on CPU (Flex computes bf16): the GPT split by tp = 2, tp = 2 with SP,
//! and pp = 2 (× tp = 2) in bf16 equals the tp = 1 bf16 model (loss and every gradient) within
//! bf16 tolerance; parameters and gradients are bf16, pipelined gradients accumulate in f32.

mod common;

use std::collections::HashMap;

use burn::tensor::{DType, Int, Tensor, TensorData};
use burn_parallel::params::{named_grads, named_param_grads, NamedParam};
use burn_parallel::pipeline::{PipelineExecutor, PipelineOptions};
use burn_parallel::precision::Precision;
use burn_parallel::{ParallelConfig, ProcessGroups};
use burn_parallel_modules::{GptConfig, GptPipeline, TokenBatch};
use burn_parallel_schedules::schedule_by_name;
use common::runner::samples;
use common::*;

fn config(sp: bool) -> GptConfig {
    GptConfig::new(32, 8, 32, 4, 4, 64).with_sequence_parallel(sp).with_precision(Precision::Bf16).with_dropout(0.0)
}

fn batch() -> (TensorData, TensorData) {
    samples(0..8)
}

/// Loss and named gradients (f32 copies) of the unsplit model.
fn reference(config: &GptConfig) -> (f32, HashMap<String, NamedParam>) {
    world(1, |c| {
        let m = config.init::<B>(&c, &Default::default()).unwrap();
        assert!(burn_parallel::params::named_params(&m).iter().all(|p| p.value.dtype == DType::BF16), "parameters are bf16");
        let (x, y) = batch();
        let loss = m.loss(Tensor::<B, 2, Int>::from_data(x, &Default::default()), Tensor::from_data(y, &Default::default()));
        let value = loss.clone().into_scalar();
        let grads = named_grads(&m, &loss.backward());
        assert!(grads.iter().all(|p| p.grad.as_ref().unwrap().dtype == DType::BF16), "gradients are bf16");
        Ok((value, grads.into_iter().map(|p| (p.path.clone(), p)).collect()))
    })
    .remove(0)
}

/// About 10 bf16 ulps of the tensor's largest element (measured worst: 1.5e-2).
const TOL: f32 = 4e-2;

#[test]
fn bf16_tensor_and_sequence_parallel_equal_tp1_within_bf16_tolerance() {
    let (ref_loss, ref_grads) = reference(&config(false));
    let f32_loss = reference_f32();
    assert!((ref_loss - f32_loss).abs() > 1e-5, "bf16 must differ from f32 ({ref_loss} vs {f32_loss})");
    assert!((ref_loss - f32_loss).abs() < 2e-2 * f32_loss, "bf16 {ref_loss} vs f32 {f32_loss}");
    let mut worst = 0f32;
    for sp in [false, true] {
        let ranks = world(2, |c| {
            let m = config(sp).init::<B>(&c, &Default::default()).unwrap();
            let (x, y) = batch();
            let loss = m.loss(Tensor::<B, 2, Int>::from_data(x, &Default::default()), Tensor::from_data(y, &Default::default()));
            Ok((c.rank(), loss.clone().into_scalar(), named_grads(&m, &loss.backward())))
        });
        for (r, loss, grads) in ranks {
            assert!((loss - ref_loss).abs() <= 1e-2 * ref_loss, "sp {sp}: loss {loss} vs {ref_loss}");
            for p in grads {
                worst = worst.max(close(&format!("sp {sp} grad {}", p.path), ref_grads[&p.path].grad.as_ref().unwrap(), p.grad.as_ref().unwrap(), r, 2, TOL));
            }
        }
    }
    eprintln!("bf16 tp=2 (and SP) vs tp=1: worst gradient error {worst:.4} of the tensor's max");
}

fn reference_f32() -> f32 {
    let c = config(false).with_precision(Precision::F32);
    world(1, |comm| {
        let m = c.init::<B>(&comm, &Default::default()).unwrap();
        let (x, y) = batch();
        Ok(m.loss(Tensor::<B, 2, Int>::from_data(x, &Default::default()), Tensor::from_data(y, &Default::default())).into_scalar())
    })[0]
}

#[test]
fn bf16_pipeline_equals_tp1_and_accumulates_in_f32() {
    let (ref_loss, ref_grads) = reference(&config(false));
    let ranks = world(4, |c| {
        let groups = ProcessGroups::new(ParallelConfig::new().with_pipeline_parallel(2).with_tensor_parallel(2), c).map_err(|e| e.to_string())?;
        let opts = PipelineOptions { microbatches: 2, virtual_stages: 1, layout: None };
        let model = GptPipeline { config: config(false), tp: groups.tp.clone(), cp: None };
        let exec = PipelineExecutor::<B, _, 3>::new(model, schedule_by_name("1f1b").unwrap().as_ref(), &opts, groups.pp.clone(), Default::default())
            .map_err(|e| e.to_string())?;
        let (x, y) = batch();
        let cut = |d: &TensorData, i| burn_parallel::comm::split_along(d, 0, 2, i).unwrap();
        let mbs: Vec<_> = (0..2).map(|i| TokenBatch { inputs: cut(&x, i), targets: cut(&y, i) }).collect();
        let out = exec.step(&mbs).map_err(|e| e.to_string())?;
        let mut named = Vec::new();
        for (s, g) in exec.stages().iter().zip(&out.grads) {
            named.extend(named_param_grads(&s.part, g).into_iter().map(|p| (global_path(&p.path, s.part.first_layer), p)));
        }
        Ok((groups.coords.tp, out.loss, named))
    });
    for (r, loss, named) in ranks {
        assert!((loss - ref_loss).abs() <= 1e-2 * ref_loss, "loss {loss} vs {ref_loss}");
        for (path, p) in named {
            let g = p.grad.as_ref().unwrap();
            assert_eq!(g.dtype, DType::F32, "{path}: accumulated gradients are f32");
            close(&format!("pp grad {path}"), ref_grads[&path].grad.as_ref().unwrap(), g, r, 2, TOL);
        }
    }
}
