//! Tied embeddings (GPT-2's head is its token embedding): the model equals the unsharded one at
//! tp 1/2/4, with and without SP, and the burn-nn model with a tied head; split into a pipeline
//! (any schedule, tp, virtual stages) the last stage's replica gets the summed gradient, bitwise
//! the first stage's, and every gradient equals the single rank's; training with DP, ZeRO-1 and
//! clipping keeps the copies bitwise equal and matches the single rank; checkpoints hold one
//! copy and load at another layout; ranks that tie differently fail with a clear error.

mod common;

use std::collections::HashMap;

use burn::tensor::{Int, Tensor, TensorData};
use burn_parallel::data::GlobalSampler;
use burn_parallel::optim::{DistAdamW, DistAdamWConfig};
use burn_parallel::params::{named_grads, named_param_grads, named_params, NamedParam};
use burn_parallel::pipeline::{PipelineExecutor, PipelineModel, PipelineOptions};
use burn_parallel::rng::HostRng;
use burn_parallel::{Comm, ParallelConfig, ProcessGroups};
use burn_parallel_modules::{GptConfig, GptPipeline, TokenBatch};
use burn_parallel_schedules::schedule_by_name;
use common::*;

fn tied(layers: usize) -> GptConfig {
    GptConfig::new(32, 8, 16, 4, layers, 32).with_tie_embeddings(true)
}

fn tokens(name: &str, shape: [usize; 2]) -> TensorData {
    let mut rng = HostRng::new(11, name);
    TensorData::new((0..shape[0] * shape[1]).map(|_| (rng.next_u64() % 32) as i64).collect::<Vec<_>>(), shape)
}

fn ids(name: &str, shape: [usize; 2]) -> Tensor<B, 2, Int> {
    Tensor::from_data(tokens(name, shape), &Default::default())
}

/// Logits, loss and every gradient at tp 2 and 4 (SP too) equal tp 1's; the model has no head
/// parameter of its own, and its embedding's gradient is the lookup's plus the head's.
#[test]
fn tied_gpt_equals_the_unsharded_model_over_tp_and_sp() {
    for sp in [false, true] {
        let cfg = tied(2).with_sequence_parallel(sp);
        let noise = Perturb::default();
        let run = |c: &Comm| {
            let gpt = noise.apply(cfg.init::<B>(c, &Default::default()).unwrap(), c);
            let (x, t) = (ids("in", [3, 8]), ids("tg", [3, 8]));
            let logits = gpt.forward(x.clone()).into_data();
            let loss = gpt.loss(x, t);
            Outcome { output: logits, input_grad: None, params: named_grads(&gpt, &loss.backward()) }
        };
        let reference = world(1, |c| Ok(run(&c))).remove(0);
        assert!(reference.params.iter().all(|p| !p.path.starts_with("head")), "no head parameter when tied");
        for t in [2, 4] {
            let n = assert_parity(&reference, &world(t, |c| Ok(run(&c))), TOL);
            assert!(n > 4 * t, "sp={sp} tp={t}: compared only {n} tensors");
        }
    }
}

/// At tp 1 the tied GPT equals the burn-nn model whose logits are `x · wteᵀ`: logits, loss and
/// the embedding's gradient (where the lookup's and the head's meet).
#[test]
fn tied_gpt_equals_the_burn_nn_model_with_a_tied_head() {
    let cfg = tied(2);
    let (x, t) = (ids("in", [3, 8]), ids("tg", [3, 8]));
    let ours = world(1, |c| {
        let gpt = cfg.init::<B>(&c, &Default::default()).unwrap();
        let logits = gpt.forward(x.clone()).into_data();
        let loss = gpt.loss(x.clone(), t.clone());
        let grads = named_grads(&gpt, &loss.clone().backward());
        Ok((logits, loss.into_data(), grads.into_iter().find(|p| p.path == "wte.weight").unwrap()))
    })
    .remove(0);
    let nn = cfg.init_reference::<B>(&Default::default());
    assert!(nn.head.is_none());
    let loss = nn.loss(x.clone(), t);
    let wte = named_grads(&nn, &loss.clone().backward()).into_iter().find(|p| p.path == "wte.weight").unwrap();
    assert!(max_abs_diff(&ours.0, &nn.forward(x).into_data()).unwrap() < TOL);
    assert!(max_abs_diff(&ours.1, &loss.into_data()).unwrap() < TOL);
    assert_eq!(max_abs_diff(&ours.2.value, &wte.value).unwrap(), 0.0);
    assert!(max_abs_diff(ours.2.grad.as_ref().unwrap(), wte.grad.as_ref().unwrap()).unwrap() < TOL);
}

/// With the model whole on a rank, recompute (full, selective) and the chunked loss
/// backpropagate the head and the embedding as separate pieces: the table's two gradients still
/// meet, as in the plain backward.
#[test]
fn recompute_and_the_chunked_loss_sum_the_tables_two_gradients() {
    use burn_parallel::recompute::Recompute;
    let cfg = tied(2).with_dropout(0.1);
    let grads = |cfg: GptConfig| {
        world(1, |c| {
            let gpt = cfg.init::<B>(&c, &Default::default()).unwrap();
            let (_, g) = gpt.forward_backward(ids("in", [3, 8]), ids("tg", [3, 8])).map_err(|e| e.to_string())?;
            Ok(named_param_grads(&gpt, &g))
        })
        .remove(0)
    };
    let plain = grads(cfg.clone());
    assert!(plain.iter().any(|p| p.path == "wte.weight") && !plain.iter().any(|p| p.path.starts_with("head")));
    for (name, variant) in [
        ("full", cfg.clone().with_recompute(Recompute::Full)),
        ("selective", cfg.clone().with_recompute(Recompute::Selective)),
        ("chunked loss", cfg.clone().with_loss_chunk(Some(5))),
    ] {
        let got = grads(variant);
        assert_eq!(got.len(), plain.len(), "{name}");
        for (a, b) in plain.iter().zip(&got) {
            assert_eq!(a.path, b.path);
            let d = max_abs_diff(a.grad.as_ref().unwrap(), b.grad.as_ref().unwrap()).unwrap();
            assert!(d < TOL, "{name}: grad of {}: {d}", a.path);
        }
    }
}

/// One pipelined step of the tied GPT on a `pp × tp` world: per rank its TP rank and every
/// gradient (global paths: the replica is `wte.weight`), before and after the tied all-reduce.
type Piped = (usize, Vec<NamedParam>, Vec<NamedParam>);

fn pipelined(cfg: &GptConfig, schedule: &str, pp: usize, tp: usize, v: usize, mbs: &[TokenBatch]) -> Vec<Piped> {
    let layout = ParallelConfig::new().with_pipeline_parallel(pp).with_tensor_parallel(tp).with_virtual_stages(v);
    world(pp * tp, |c| {
        let groups = ProcessGroups::new(layout.clone(), c).map_err(|e| e.to_string())?;
        let model = GptPipeline { config: cfg.clone(), tp: groups.tp.clone(), cp: None };
        let opts = PipelineOptions { microbatches: mbs.len(), virtual_stages: v, layout: None };
        let sched = schedule_by_name(schedule).map_err(|e| e.to_string())?;
        let exec = PipelineExecutor::<B, _, 3>::new(model, sched.as_ref(), &opts, groups.pp.clone(), Default::default()).map_err(|e| e.to_string())?;
        let out = exec.step(mbs).map_err(|e| e.to_string())?;
        let named = |grads: &[burn::optim::GradientsParams]| {
            let mut v = Vec::new();
            for (stage, g) in exec.stages().iter().zip(grads) {
                for p in named_param_grads(&stage.part, g) {
                    v.push(NamedParam { path: PipelineModel::<B, 3>::global_param_path(exec.model(), &stage.spec, &p.path), ..p });
                }
            }
            v
        };
        let before = named(&out.grads);
        let after = exec.all_reduce_tied_grads(out.grads, groups.embedding.as_ref()).map_err(|e| e.to_string())?;
        Ok((groups.coords.tp, before, named(&after)))
    })
}

/// Every schedule, tp 1/2, virtual stages (on one rank too: the copies then meet locally), SP:
/// after the tied all-reduce every gradient equals the single rank's, the embedding's on the
/// first and the last stage bitwise alike; before it, the last stage's is the head's part only.
#[test]
fn pipeline_stages_sum_the_tied_gradient_and_equal_the_single_rank() {
    let m = 4;
    let mbs: Vec<TokenBatch> = (0..m).map(|i| TokenBatch { inputs: tokens(&format!("x{i}"), [2, 8]), targets: tokens(&format!("y{i}"), [2, 8]) }).collect();
    let cat = |f: fn(&TokenBatch) -> &TensorData| burn_parallel::comm::concat_along(&mbs.iter().map(f).collect::<Vec<_>>(), 0).unwrap();
    let cases = [
        ("1f1b", 2, 1, 1, false),
        ("gpipe", 4, 1, 1, false),
        ("1f1b", 2, 2, 1, false),
        ("interleaved-1f1b", 2, 1, 2, false),
        ("interleaved-1f1b", 1, 1, 2, false),
        ("zb-h1", 2, 2, 1, true),
    ];
    for (schedule, pp, tp, v, sp) in cases {
        let cfg = tied(4).with_sequence_parallel(sp);
        let reference: HashMap<String, NamedParam> = world(1, |c| {
            let gpt = cfg.init::<B>(&c, &Default::default()).unwrap();
            let dev = Default::default();
            let loss = gpt.loss(Tensor::from_data(cat(|b| &b.inputs), &dev), Tensor::from_data(cat(|b| &b.targets), &dev));
            Ok(named_grads(&gpt, &loss.backward()).into_iter().map(|p| (p.path.clone(), p)).collect())
        })
        .remove(0);
        let what = format!("{schedule} pp={pp} tp={tp} v={v} sp={sp}");
        let ranks = pipelined(&cfg, schedule, pp, tp, v, &mbs);
        let mut copies: HashMap<usize, Vec<TensorData>> = HashMap::new();
        for (tp_rank, before, after) in &ranks {
            for p in after {
                let r = &reference[&p.path];
                assert_shard(&format!("{what}: grad of {}", p.path), r.grad.as_ref().unwrap(), p.grad.as_ref().unwrap(), *tp_rank, tp, TOL);
                if p.path == "wte.weight" {
                    copies.entry(*tp_rank).or_default().push(p.grad.clone().unwrap());
                }
            }
            for p in before.iter().filter(|p| p.path == "wte.weight") {
                let expected = expected_shard(reference["wte.weight"].grad.as_ref().unwrap(), p.grad.as_ref().unwrap().shape.as_slice(), *tp_rank, tp).unwrap();
                assert!(max_abs_diff(&expected, p.grad.as_ref().unwrap()).unwrap() > 1e-4, "{what}: a copy alone has part of the gradient");
            }
        }
        for (tp_rank, grads) in copies {
            assert_eq!(grads.len(), 2, "{what}: tp rank {tp_rank}: the embedding and its replica");
            assert_eq!(grads[0], grads[1], "{what}: tp rank {tp_rank}: the copies' gradients are bitwise alike");
        }
    }
}

/// The whole model's parameters after `steps` steps of DistAdamW (ZeRO-1, clipping at 0.05) on
/// `layout`, with each rank's named values; the global norms of rank 0.
fn train(layout: ParallelConfig, steps: usize) -> Vec<(Vec<NamedParam>, Vec<f32>)> {
    let (dp, pp) = (layout.data_parallel, layout.pipeline_parallel);
    let cfg = tied(4);
    world(layout.world_size(), |c| {
        let groups = ProcessGroups::new(layout.clone(), c).map_err(|e| e.to_string())?;
        let mut optim = DistAdamW::<B>::new(DistAdamWConfig::new().with_zero(dp > 1).with_bucket_bytes(2000), &groups);
        let model = GptPipeline { config: cfg.clone(), tp: groups.tp.clone(), cp: None };
        let opts = PipelineOptions { microbatches: 2, virtual_stages: 1, layout: None };
        let sched = schedule_by_name(if pp > 1 { "1f1b" } else { "gpipe" }).unwrap();
        let mut exec = PipelineExecutor::<B, _, 3>::new(model, sched.as_ref(), &opts, groups.pp.clone(), Default::default()).map_err(|e| e.to_string())?;
        optim.tie(exec.tied_params(), groups.embedding.as_ref()).map_err(|e| e.to_string())?;
        let mut norms = Vec::new();
        for step in 0..steps {
            let range = GlobalSampler::replica_samples((step * 8) as u64, 8 / dp, groups.coords.dp);
            let (x, y) = common::runner::samples(range);
            let cut = |d: &TensorData, i| burn_parallel::comm::split_along(d, 0, 2, i).unwrap();
            let mbs: Vec<_> = (0..2).map(|i| TokenBatch { inputs: cut(&x, i), targets: cut(&y, i) }).collect();
            let out = exec.step(&mbs).map_err(|e| e.to_string())?;
            let parts = exec.stages().iter().map(|s| s.part.clone()).zip(out.grads).collect();
            let (parts, norm) = optim.step(3e-3, parts, Some(0.05)).map_err(|e| e.to_string())?;
            for (stage, part) in exec.stages_mut().iter_mut().zip(parts) {
                stage.part = part;
            }
            norms.push(norm.unwrap());
        }
        let mut named = Vec::new();
        for stage in exec.stages() {
            for p in named_params(&stage.part) {
                named.push(NamedParam { path: PipelineModel::<B, 3>::global_param_path(exec.model(), &stage.spec, &p.path), ..p });
            }
        }
        Ok((named, norms))
    })
}

/// dp 2 × pp 2 × tp 2 with ZeRO-1 and clipping trains as one rank (norms and every parameter
/// within f32 rounding; the norm counts the embedding once), and the embedding and its replica
/// stay bitwise equal on every rank pair.
#[test]
fn training_keeps_the_copies_equal_and_matches_one_rank() {
    let steps = 4;
    let single = train(ParallelConfig::new().with_pipeline_parallel(1), steps).remove(0);
    let ranks = train(ParallelConfig::new().with_data_parallel(2).with_pipeline_parallel(2).with_tensor_parallel(2), steps);
    for (i, (a, b)) in single.1.iter().zip(&ranks[0].1).enumerate() {
        assert!((a - b).abs() < 1e-5 * a, "step {i}: norm {a} (one rank) vs {b}");
    }
    assert!(single.1.iter().all(|n| *n > 0.05), "clipping is active: {:?}", single.1);
    let whole: HashMap<&str, &NamedParam> = single.0.iter().map(|p| (p.path.as_str(), p)).collect();
    // Megatron order: rank = tp + 2·dp + 4·pp.
    for (rank, (params, _)) in ranks.iter().enumerate() {
        for p in params {
            assert_shard(&format!("rank {rank}: {}", p.path), &whole[p.path.as_str()].value, &p.value, rank % 2, 2, 2e-5);
        }
        if rank < 4 {
            let first = params.iter().find(|p| p.path == "wte.weight").unwrap();
            let last = ranks[rank + 4].0.iter().find(|p| p.path == "wte.weight").unwrap();
            assert_eq!(first.value, last.value, "rank {rank} and {}: the copies drifted apart", rank + 4);
        }
    }
}

/// A last stage's replica stepped by `DistAdamW` that was never tied is refused (its gradient
/// would be the head's part alone), and every stage fails with it at once.
#[test]
fn an_untied_replica_is_refused_by_the_optimizer() {
    let layout = ParallelConfig::new().with_pipeline_parallel(2);
    let opts = burn_parallel::LocalWorldOptions { timeout: std::time::Duration::from_secs(20), ..Default::default() };
    let results = burn_parallel::run_world(2, opts, |c| {
        let groups = ProcessGroups::new(layout.clone(), c).map_err(|e| e.to_string())?;
        let exec = PipelineExecutor::<B, _, 3>::new(
            GptPipeline { config: tied(2), tp: groups.tp.clone(), cp: None },
            schedule_by_name("1f1b").unwrap().as_ref(),
            &PipelineOptions { microbatches: 2, virtual_stages: 1, layout: None },
            groups.pp.clone(),
            Default::default(),
        )
        .map_err(|e| e.to_string())?;
        let mbs: Vec<_> = (0..2).map(|i| TokenBatch { inputs: tokens(&format!("x{i}"), [1, 8]), targets: tokens(&format!("y{i}"), [1, 8]) }).collect();
        let out = exec.step(&mbs).map_err(|e| e.to_string())?;
        let mut optim = DistAdamW::<B>::new(DistAdamWConfig::new(), &groups);
        let parts = exec.stages().iter().map(|s| s.part.clone()).zip(out.grads).collect();
        optim.step(1e-3, parts, Some(1.0)).map(|_| ()).map_err(|e| e.to_string())
    });
    let last = results[1].as_ref().expect_err("the last stage must refuse").to_string();
    assert!(last.contains("stepped without DistAdamW::tie"), "{last}");
    // The first stage fails at once with it (no timeout: the stages agree before any reduction).
    let first = results[0].as_ref().expect_err("the first stage fails too").to_string();
    assert!(first.contains("another stage of pipeline group") && first.contains("refused the step"), "{first}");
}

/// Ranks of one embedding group that tie different numbers of parameters (here a model tied on
/// one stage only) fail on every rank, naming the counts, instead of waiting forever.
#[test]
fn stages_that_tie_differently_are_a_clear_error() {
    let layout = ParallelConfig::new().with_pipeline_parallel(2);
    let errors = burn_parallel::run_world(2, burn_parallel::LocalWorldOptions::default(), |c| {
        let groups = ProcessGroups::new(layout.clone(), c).map_err(|e| e.to_string())?;
        let cfg = tied(2).with_tie_embeddings(groups.coords.pp == 1);
        let exec = PipelineExecutor::<B, _, 3>::new(
            GptPipeline { config: cfg, tp: groups.tp.clone(), cp: None },
            schedule_by_name("1f1b").unwrap().as_ref(),
            &PipelineOptions { microbatches: 2, virtual_stages: 1, layout: None },
            groups.pp.clone(),
            Default::default(),
        )
        .map_err(|e| e.to_string())?;
        let mbs: Vec<_> = (0..2).map(|i| TokenBatch { inputs: tokens(&format!("x{i}"), [1, 8]), targets: tokens(&format!("y{i}"), [1, 8]) }).collect();
        let out = exec.step(&mbs).map_err(|e| e.to_string())?;
        exec.all_reduce_tied_grads(out.grads, groups.embedding.as_ref()).map(|_| ()).map_err(|e| e.to_string())
    });
    for r in errors {
        let e = r.expect_err("ranks that tie differently must fail");
        let e = e.to_string();
        assert!(e.contains("tied parameters") && e.contains("tie between 0 and 1 parameters"), "{e}");
    }
}

/// Checkpoints of a tied model hold the embedding once (written by the first stage; no head
/// tensor), load at another layout (pipeline ↔ none, tp, dp, virtual stages: the replica reads
/// `wte.weight` and its moments back) into the same state, and train on the same; a resume at
/// the same pipelined layout is bit-exact.
#[test]
fn checkpoints_hold_one_copy_and_load_at_another_layout() {
    use burn_parallel::checkpoint::{full_tensors, Checkpoint};
    use common::runner::{layout, run, temp_dir, Layout, Plan};
    fn plan(layout: Layout, load: Option<&std::path::Path>, steps: usize, save: Option<&std::path::Path>) -> Vec<f32> {
        run(&Plan { layout, config: common::runner::gpt(4, false, 0.0).with_tie_embeddings(true), load, steps, save, async_save: false })
    }
    let virt = |l: Layout| Layout { v: 2, ..l };
    for (a, b) in [(layout(1, 2, 2), layout(1, 1, 1)), (layout(2, 1, 2), virt(layout(1, 2, 1))), (layout(1, 4, 1), layout(2, 2, 1))] {
        let (dir_a, dir_b) = (temp_dir("tied-a"), temp_dir("tied-b"));
        plan(a, None, 2, Some(&dir_a));
        let ckpt = Checkpoint::open(&dir_a).unwrap();
        ckpt.verify().unwrap();
        let meta = ckpt.metadata();
        assert!(!meta.tensors.keys().any(|k| k.contains("head")), "{a:?}: no head tensor: {:?}", meta.tensors.keys().collect::<Vec<_>>());
        for name in ["model.wte.weight", "optim.exp_avg.wte.weight"] {
            let chunks = &meta.tensors[name].chunks;
            assert_eq!(chunks.len(), a.tp, "{a:?}: {name} once per vocabulary shard");
            // Megatron order: the first stage's ranks are the first dp · tp.
            for c in chunks {
                let rank: usize = c.file.trim_start_matches("rank-").trim_end_matches(".safetensors").parse().unwrap();
                assert!(rank < a.dp * a.tp, "{a:?}: {name} written by rank {rank}, not by the first stage");
            }
        }
        plan(b, Some(&dir_a), 0, Some(&dir_b));
        let (ta, tb) = (full_tensors(&ckpt, "").unwrap(), full_tensors(&Checkpoint::open(&dir_b).unwrap(), "").unwrap());
        assert_eq!(ta.keys().collect::<Vec<_>>(), tb.keys().collect::<Vec<_>>(), "{a:?} -> {b:?}");
        for (name, x) in &ta {
            assert!(x == &tb[name], "{a:?} -> {b:?}: {name} differs after the reshard");
        }
        let (la, lb) = (plan(a, Some(&dir_a), 3, None), plan(b, Some(&dir_a), 3, None));
        for (x, y) in la.iter().zip(&lb) {
            assert!((x - y).abs() < 1e-5 * x.abs().max(1.0), "{a:?} -> {b:?}: losses {la:?} vs {lb:?}");
        }
        if a.pp > 1 {
            let whole = plan(a, None, 4, None);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&la[..2]), bits(&whole[2..]), "{a:?}: resumed vs uninterrupted");
        }
        drop(ckpt);
        for d in [dir_a, dir_b] {
            std::fs::remove_dir_all(d).unwrap();
        }
    }
}
