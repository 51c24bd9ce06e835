//! Data parallelism on top of pipeline and tensor parallelism: dp=2 × pp=2 × tp=2 (8 thread
//! ranks) equals the single-rank step (loss and every gradient), and 10 AdamW steps with global
//! gradient clipping give the same losses. Also: bucketed DP all-reduce and global-norm clipping
//! against their math.

mod common;

use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::{Int, Tensor, TensorData};
use burn_parallel::data_parallel::{all_reduce_gradients, clip_grad_norm, global_grad_norm};
use burn_parallel::params::{named_grads, named_param_grads};
use burn_parallel::pipeline::{PipelineExecutor, PipelineOptions};
use burn_parallel::rng::HostRng;
use burn_parallel::{comm::ops::all_reduce, ParallelConfig, ProcessGroups, ReduceOp};
use burn_parallel_modules::{GptConfig, GptPipeline, TokenBatch};
use burn_parallel_schedules::schedule_by_name;
use common::*;

const DP: usize = 2;
const PP: usize = 2;
const TP: usize = 2;
const M: usize = 2;

fn gpt() -> GptConfig {
    GptConfig::new(32, 8, 16, 4, 4, 32)
}

fn tokens(name: &str) -> TensorData {
    let mut rng = HostRng::new(8, name);
    TensorData::new((0..16).map(|_| (rng.next_u64() % 32) as i64).collect::<Vec<_>>(), [2, 8])
}

/// The `DP × M` micro-batches of a step (learnable: target = 3·input + 1 mod 32); DP rank d
/// takes `[d·M, (d+1)·M)`.
fn global_batch(step: usize) -> Vec<TokenBatch> {
    (0..DP * M)
        .map(|i| {
            let inputs = tokens(&format!("x{step}.{i}"));
            let t: Vec<i64> = inputs.to_vec::<i64>().unwrap().iter().map(|v| (3 * v + 1) % 32).collect();
            TokenBatch { targets: TensorData::new(t, [2, 8]), inputs }
        })
        .collect()
}

fn single() -> burn_parallel::Comm {
    burn_parallel::LocalWorld::new(1).communicator(0)
}

fn full(batch: &[TokenBatch]) -> (Tensor<B, 2, Int>, Tensor<B, 2, Int>) {
    let cat = |f: fn(&TokenBatch) -> &TensorData| burn_parallel::comm::concat_along(&batch.iter().map(f).collect::<Vec<_>>(), 0).unwrap();
    let dev = Default::default();
    (Tensor::from_data(cat(|b| &b.inputs), &dev), Tensor::from_data(cat(|b| &b.targets), &dev))
}

type Exec = PipelineExecutor<B, GptPipeline, 3>;

/// This rank's groups and its 1F1B executor of the GPT in the dp × pp × tp layout.
fn hybrid_rank(c: burn_parallel::Comm) -> Result<(ProcessGroups, Exec), String> {
    let cfg = ParallelConfig::new().with_data_parallel(DP).with_pipeline_parallel(PP).with_tensor_parallel(TP);
    let g = ProcessGroups::new(cfg, c).map_err(|e| e.to_string())?;
    let opts = PipelineOptions { microbatches: M, virtual_stages: 1, layout: None };
    let model = GptPipeline { config: gpt(), tp: g.tp.clone(), cp: None };
    let exec = Exec::new(model, schedule_by_name("1f1b").unwrap().as_ref(), &opts, g.pp.clone(), Default::default()).map_err(|e| e.to_string())?;
    Ok((g, exec))
}

#[test]
fn dp2_pp2_tp2_step_equals_the_single_rank_step() {
    let batch = global_batch(0);
    let (ref_loss, ref_grads) = world(1, |c| {
        let model = gpt().init::<B>(&c, &Default::default()).unwrap();
        let (x, y) = full(&batch);
        let loss = model.loss(x, y);
        Ok((loss.clone().into_scalar(), named_grads(&model, &loss.backward())))
    })
    .remove(0);
    let ranks = world(DP * PP * TP, |c| {
        let (g, exec) = hybrid_rank(c)?;
        let out = exec.step(&batch[g.coords.dp * M..(g.coords.dp + 1) * M]).map_err(|e| e.to_string())?;
        let loss = all_reduce(Tensor::<Inner, 1>::from_floats([out.loss], &Default::default()), ReduceOp::Mean, &g.dp).unwrap().into_scalar();
        let mut named = Vec::new();
        for (stage, grads) in exec.stages().iter().zip(out.grads) {
            let grads = all_reduce_gradients(&stage.part, grads, &g.dp, 1024).map_err(|e| e.to_string())?;
            named.extend(named_param_grads(&stage.part, &grads).into_iter().map(|p| (global_path(&p.path, stage.part.first_layer), p)));
        }
        Ok((g.coords, loss, named))
    });
    let mut seen = 0;
    for (coords, loss, named) in ranks {
        assert!((loss - ref_loss).abs() < TOL, "{coords:?}: loss {loss} vs {ref_loss}");
        for (path, p) in named {
            let r = ref_grads.iter().find(|q| q.path == path).unwrap_or_else(|| panic!("unknown {path}"));
            assert_shard(&format!("{coords:?} {path}"), r.grad.as_ref().unwrap(), p.grad.as_ref().unwrap(), coords.tp, TP, TOL);
            seen += 1;
        }
    }
    assert_eq!(seen, ref_grads.len() * DP * TP, "every parameter once per (dp, tp) rank");
}

#[test]
fn ten_hybrid_steps_with_global_clipping_match_single_rank_training() {
    let steps = 10;
    let (lr, clip) = (3e-3, 0.5);
    let reference = world(1, |c| {
        let mut model = gpt().init::<B>(&c, &Default::default()).unwrap();
        let mut optim = AdamWConfig::new().init();
        let mut out = Vec::new();
        for s in 0..steps {
            let (x, y) = full(&global_batch(s));
            let loss = model.loss(x, y);
            out.push(loss.clone().into_scalar());
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            let (norm, mut g) = clip_grad_norm::<B, _>(vec![(&model, grads)], clip, &c, &c).unwrap();
            out.push(norm);
            model = optim.step(lr, model, g.remove(0));
        }
        Ok(out)
    })
    .remove(0);
    let ranks = world(DP * PP * TP, |c| {
        let (g, mut exec) = hybrid_rank(c)?;
        let mut optims: Vec<_> = exec.stages().iter().map(|_| AdamWConfig::new().init()).collect();
        let mut out = Vec::new();
        for s in 0..steps {
            let batch = global_batch(s);
            let step = exec.step(&batch[g.coords.dp * M..(g.coords.dp + 1) * M]).map_err(|e| e.to_string())?;
            out.push(all_reduce(Tensor::<Inner, 1>::from_floats([step.loss], &Default::default()), ReduceOp::Mean, &g.dp).unwrap().into_scalar());
            let synced: Vec<GradientsParams> = exec
                .stages()
                .iter()
                .zip(step.grads)
                .map(|(st, gr)| all_reduce_gradients(&st.part, gr, &g.dp, 4096))
                .collect::<Result<_, _>>()
                .map_err(|e| e.to_string())?;
            let parts = exec.stages().iter().map(|st| &st.part).zip(synced).collect();
            let (norm, grads) = clip_grad_norm::<B, _>(parts, clip, &g.tp, &g.pp).map_err(|e| e.to_string())?;
            out.push(norm);
            exec.update(&mut optims, lr, grads);
        }
        Ok(out)
    });
    for r in &ranks {
        for (i, (a, b)) in reference.iter().zip(r).enumerate() {
            let what = if i % 2 == 0 { "loss" } else { "grad norm" };
            assert!((a - b).abs() < 1e-4 * a.abs().max(1.0), "step {}: {what} {a} vs {b}", i / 2);
        }
    }
    assert!(reference[1] > clip, "clipping must be active (norm {})", reference[1]);
    assert!(reference[2 * steps - 2] < reference[0], "the model learns");
}

#[test]
fn bucketed_all_reduce_averages_and_global_norm_counts_each_parameter_once() {
    let cfg = gpt();
    // Two DP ranks with different data: the synced gradient is the mean, whatever the bucket size.
    for bucket in [1, 300, usize::MAX] {
        let out = world(2, |c| {
            let model = cfg.init::<B>(&single(), &Default::default()).unwrap();
            let batch = global_batch(c.rank());
            let (x, y) = full(&batch[..1]);
            let grads = GradientsParams::from_grads(model.loss(x, y).backward(), &model);
            let own = named_param_grads(&model, &grads);
            let synced = all_reduce_gradients(&model, grads, &c, bucket).unwrap();
            Ok((own, named_param_grads(&model, &synced)))
        });
        for i in 0..out[0].0.len() {
            let (a, b) = (out[0].0[i].grad.as_ref().unwrap(), out[1].0[i].grad.as_ref().unwrap());
            let mean = burn_parallel::comm::reduce_all(&[a, b], ReduceOp::Mean).unwrap();
            for rank in &out[..2] {
                assert!(max_abs_diff(&mean, rank.1[i].grad.as_ref().unwrap()).unwrap() < 1e-6, "bucket {bucket}");
            }
        }
    }
    // Global norm at tp=2 equals the single-rank norm (sharded summed, replicated once).
    let whole = world(1, |c| {
        let m = cfg.init::<B>(&c, &Default::default()).unwrap();
        let (x, y) = full(&global_batch(0));
        let g = GradientsParams::from_grads(m.loss(x, y).backward(), &m);
        Ok(global_grad_norm::<B, _>(&[(&m, &g)], &c, &c).unwrap())
    })[0];
    let split = world(2, |c| {
        let m = cfg.init::<B>(&c, &Default::default()).unwrap();
        let (x, y) = full(&global_batch(0));
        let g = GradientsParams::from_grads(m.loss(x, y).backward(), &m);
        Ok(global_grad_norm::<B, _>(&[(&m, &g)], &c, &single()).unwrap())
    });
    for n in split {
        assert!((n - whole).abs() < 1e-5 * whole, "{n} vs {whole}");
    }
}
