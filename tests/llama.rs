//! Llama-style blocks (RMS norms, rotary position embedding, SwiGLU, no biases, grouped-query
//! attention), each option alone and all together: at tp 1 the model equals burn-nn's layers (`RmsNorm`, `SwiGlu`,
//! `RotaryEncoding`); at tp 2 and 4, with and without SP, the forward and every gradient equal
//! tp 1's; split into pipelines (1F1B pp 2 × tp 2 with SP, interleaved) every gradient equals the
//! single rank's; recompute (full, selective, with dropout) and gradient accumulation give the
//! plain gradients; bf16 at tp 2 equals bf16 at tp 1; bad shapes are clear errors.

mod common;

use std::collections::HashMap;

use burn::tensor::{Int, Tensor, TensorData};
use burn_parallel::activation::Activation;
use burn_parallel::arch::{Norm, Position};
use burn_parallel::params::{named_grads, named_param_grads, NamedParam};
use burn_parallel::pipeline::{PipelineExecutor, PipelineModel, PipelineOptions};
use burn_parallel::rng::HostRng;
use burn_parallel::{Comm, ParallelConfig, ProcessGroups};
use burn_parallel_modules::{GptConfig, GptPipeline, TokenBatch};
use burn_parallel_schedules::schedule_by_name;
use common::*;

/// A Llama-style GPT: vocabulary 32, sequence 8, width 32, 8 heads (head width 4) sharing 4
/// key/value heads, `d_ff` 48.
fn llama(layers: usize) -> GptConfig {
    GptConfig::new(32, 8, 32, 8, layers, 48)
        .with_kv_heads(Some(4))
        .with_norm(Norm::RmsNorm)
        .with_position(Position::Rope)
        .with_rope_theta(500.0)
        .with_activation(Activation::SwiGlu)
        .with_bias(false)
}

/// Each option alone on the GPT-2 model, then all of them.
fn variants() -> Vec<(&'static str, GptConfig)> {
    let base = GptConfig::new(32, 8, 16, 4, 2, 24);
    vec![
        ("rms-norm", base.clone().with_norm(Norm::RmsNorm)),
        ("rope", base.clone().with_position(Position::Rope).with_rope_theta(500.0)),
        ("swiglu", base.clone().with_activation(Activation::SwiGlu)),
        ("no bias", base.clone().with_bias(false)),
        ("gqa", base.clone().with_kv_heads(Some(2))),
        ("mqa", base.with_kv_heads(Some(1))),
        ("llama", llama(2)),
    ]
}

fn tokens(name: &str, shape: [usize; 2]) -> TensorData {
    let mut rng = HostRng::new(5, name);
    TensorData::new((0..shape[0] * shape[1]).map(|_| (rng.next_u64() % 32) as i64).collect::<Vec<_>>(), shape)
}

fn ids(name: &str, shape: [usize; 2]) -> Tensor<B, 2, Int> {
    Tensor::from_data(tokens(name, shape), &Default::default())
}

/// At tp 1 each variant's logits and loss equal the burn-nn model's, and so does the token
/// embedding's gradient (every layer's gradient flows into it).
#[test]
fn each_option_equals_burn_nn_layers() {
    let (x, t) = (ids("in", [3, 8]), ids("tg", [3, 8]));
    for (name, cfg) in variants() {
        let ours = world(1, |c| {
            let gpt = cfg.init::<B>(&c, &Default::default()).map_err(|e| e.to_string())?;
            let loss = gpt.loss(x.clone(), t.clone());
            let grads = named_grads(&gpt, &loss.clone().backward());
            Ok((gpt.forward(x.clone()).into_data(), loss.into_data(), grads))
        })
        .remove(0);
        let nn = cfg.init_reference::<B>(&Default::default());
        let loss = nn.loss(x.clone(), t.clone());
        let nn_grads = named_grads(&nn, &loss.clone().backward());
        let logits = max_abs_diff(&ours.0, &nn.forward(x.clone()).into_data()).unwrap();
        assert!(logits < TOL, "{name}: logits differ by {logits}");
        assert!(max_abs_diff(&ours.1, &loss.into_data()).unwrap() < TOL, "{name}: loss");
        let wte = |g: &[NamedParam]| g.iter().find(|p| p.path == "wte.weight").and_then(|p| p.grad.clone()).unwrap();
        let d = max_abs_diff(&wte(&ours.2), &wte(&nn_grads)).unwrap();
        assert!(d < TOL, "{name}: wte gradient differs by {d}");
        // Each option shows in the parameters.
        let paths: Vec<&str> = ours.2.iter().map(|p| p.path.as_str()).collect();
        match name {
            "rms-norm" => assert!(!paths.iter().any(|p| p.ends_with("beta")) && paths.contains(&"ln_f.gamma")),
            "rope" => assert!(!paths.contains(&"wpe")),
            "swiglu" => assert!(paths.contains(&"blocks.1.mlp.gate.weight")),
            "no bias" => assert!(!paths.iter().any(|p| p.contains(".bias")), "{paths:?}"),
            "gqa" | "mqa" => {
                let qkv = ours.2.iter().find(|p| p.path == "blocks.0.attn.qkv.weight").unwrap();
                let kv = if name == "gqa" { 2 } else { 1 };
                assert_eq!(qkv.value.shape.as_slice(), [16, 16 + 2 * kv * 4], "{name}");
            }
            _ => assert!(!paths.iter().any(|p| p.contains(".bias") || p.ends_with("beta") || *p == "wpe")),
        }
    }
}

/// Forward and every gradient (perturbed weights: RMS gains, gates and rotary heads all off
/// their initial values) at tp 2 and 4, with and without SP, equal tp 1's.
#[test]
fn llama_equals_the_unsharded_model_over_tp_and_sp() {
    for sp in [false, true] {
        let cfg = llama(2).with_sequence_parallel(sp);
        let noise = Perturb::default();
        let run = |c: &Comm| {
            let gpt = noise.apply(cfg.init::<B>(c, &Default::default()).unwrap(), c);
            let (x, t) = (ids("in", [3, 8]), ids("tg", [3, 8]));
            let logits = gpt.forward(x.clone()).into_data();
            let loss = gpt.loss(x, t);
            Outcome { output: logits, input_grad: None, params: named_grads(&gpt, &loss.backward()) }
        };
        let reference = world(1, |c| Ok(run(&c))).remove(0);
        for t in [2, 4] {
            let n = assert_parity(&reference, &world(t, |c| Ok(run(&c))), TOL);
            assert!(n > 10 * t, "sp={sp} tp={t}: compared only {n} tensors");
        }
    }
}

/// One pipelined step on a `pp × tp` world: per rank its TP rank and every gradient under its
/// global path.
fn pipelined(cfg: &GptConfig, schedule: &str, pp: usize, tp: usize, v: usize, mbs: &[TokenBatch]) -> Vec<(usize, Vec<NamedParam>)> {
    let layout = ParallelConfig::new().with_pipeline_parallel(pp).with_tensor_parallel(tp).with_virtual_stages(v);
    world(pp * tp, |c| {
        let groups = ProcessGroups::new(layout.clone(), c).map_err(|e| e.to_string())?;
        let model = GptPipeline { config: cfg.clone(), tp: groups.tp.clone() };
        let opts = PipelineOptions { microbatches: mbs.len(), virtual_stages: v, layout: None };
        let sched = schedule_by_name(schedule).map_err(|e| e.to_string())?;
        let exec = PipelineExecutor::<B, _, 3>::new(model, sched.as_ref(), &opts, groups.pp.clone(), Default::default()).map_err(|e| e.to_string())?;
        let out = exec.step(mbs).map_err(|e| e.to_string())?;
        let mut named = Vec::new();
        for (stage, g) in exec.stages().iter().zip(&out.grads) {
            for p in named_param_grads(&stage.part, g) {
                named.push(NamedParam { path: PipelineModel::<B, 3>::global_param_path(exec.model(), &stage.spec, &p.path), ..p });
            }
        }
        Ok((groups.coords.tp, named))
    })
}

/// Pipelines (1F1B pp 2 × tp 2 with SP and full recompute, interleaved pp 2 with 2 virtual
/// stages, GPipe pp 4): every gradient equals the single rank's whole-batch gradient.
#[test]
fn llama_pipelines_equal_the_single_rank() {
    use burn_parallel::recompute::Recompute;
    let m = 4;
    let mbs: Vec<TokenBatch> = (0..m).map(|i| TokenBatch { inputs: tokens(&format!("x{i}"), [2, 8]), targets: tokens(&format!("y{i}"), [2, 8]) }).collect();
    let cat = |f: fn(&TokenBatch) -> &TensorData| burn_parallel::comm::concat_along(&mbs.iter().map(f).collect::<Vec<_>>(), 0).unwrap();
    for (schedule, pp, tp, v, sp, recompute) in
        [("1f1b", 2, 2, 1, true, Recompute::Full), ("interleaved-1f1b", 2, 1, 2, false, Recompute::Selective), ("gpipe", 4, 1, 1, false, Recompute::None)]
    {
        let cfg = llama(4).with_sequence_parallel(sp).with_recompute(recompute);
        let reference: HashMap<String, NamedParam> = world(1, |c| {
            let gpt = cfg.init::<B>(&c, &Default::default()).unwrap();
            let dev = Default::default();
            let loss = gpt.loss(Tensor::from_data(cat(|b| &b.inputs), &dev), Tensor::from_data(cat(|b| &b.targets), &dev));
            Ok(named_grads(&gpt, &loss.backward()).into_iter().map(|p| (p.path.clone(), p)).collect())
        })
        .remove(0);
        let what = format!("{schedule} pp={pp} tp={tp} v={v} sp={sp} {recompute:?}");
        let mut seen = 0;
        for (tp_rank, grads) in pipelined(&cfg, schedule, pp, tp, v, &mbs) {
            for p in grads {
                let r = &reference[&p.path];
                assert_shard(&format!("{what}: grad of {}", p.path), r.grad.as_ref().unwrap(), p.grad.as_ref().unwrap(), tp_rank, tp, TOL);
                seen += 1;
            }
        }
        assert!(seen >= reference.len(), "{what}: {seen} gradients for {} parameters", reference.len());
    }
}

/// Full and selective recompute with dropout replay the masks and the rotations: the gradients
/// equal the plain backward's; gradient accumulation over 3 micro-batches equals the whole batch.
#[test]
fn recompute_and_accumulation_give_the_plain_gradients() {
    use burn_parallel::recompute::Recompute;
    let grads = |cfg: GptConfig, split: usize| {
        world(2, |c| {
            let gpt = cfg.init::<B>(&c, &Default::default()).unwrap();
            let (x, t) = (ids("in", [3, 8]), ids("tg", [3, 8]));
            let mbs = (0..split).map(|i| (x.clone().slice(i * 3 / split..(i + 1) * 3 / split), t.clone().slice(i * 3 / split..(i + 1) * 3 / split)));
            let (_, g) = gpt.forward_backward_accumulated(mbs.collect()).map_err(|e| e.to_string())?;
            Ok(named_param_grads(&gpt, &g))
        })
        .remove(1)
    };
    let dropped = llama(2).with_dropout(0.1).with_sequence_parallel(true);
    let plain = grads(dropped.clone(), 1);
    for (name, variant, split) in [
        ("full", dropped.clone().with_recompute(Recompute::Full), 1),
        ("selective", dropped.clone().with_recompute(Recompute::Selective), 1),
        ("accumulated", llama(2).with_sequence_parallel(true), 3),
    ] {
        let reference = if split == 1 { plain.clone() } else { grads(llama(2).with_sequence_parallel(true), 1) };
        let got = grads(variant, split);
        assert_eq!(got.len(), reference.len(), "{name}");
        for (a, b) in reference.iter().zip(&got) {
            let d = max_abs_diff(a.grad.as_ref().unwrap(), b.grad.as_ref().unwrap()).unwrap();
            let tol = if split == 1 { 0.0 } else { TOL };
            assert!(d <= tol, "{name}: grad of {}: {d}", a.path);
        }
    }
}

/// In bf16 (f32 RMS statistics, rotations in bf16) tp 2 with SP gives tp 1's loss and logits
/// within bf16's precision.
#[test]
fn bf16_llama_at_tp2_equals_tp1() {
    use burn_parallel::precision::Precision;
    let cfg = llama(2).with_precision(Precision::Bf16);
    let run = |cfg: GptConfig, t: usize| {
        world(t, |c| {
            let gpt = cfg.init::<B>(&c, &Default::default()).unwrap();
            let x = ids("in", [2, 8]);
            Ok((burn::tensor::ElementConversion::elem::<f32>(gpt.loss(x.clone(), ids("tg", [2, 8])).into_scalar()), gpt.logits(x).into_data().convert::<f32>()))
        })
        .remove(0)
    };
    let (one, two) = (run(cfg.clone(), 1), run(cfg.with_sequence_parallel(true), 2));
    assert!((one.0 - two.0).abs() < 2e-2 * one.0.abs(), "loss {} vs {}", one.0, two.0);
    assert!(max_abs_diff(&one.1, &two.1).unwrap() < 5e-2, "logits");
}

/// Grouped-query attention through the chunked attention op (the fused kernels' algorithm as
/// Burn ops) gives the composed core's loss and gradients, at tp 2 with SP.
#[test]
fn grouped_query_attention_through_the_chunked_core_equals_the_composed_core() {
    use burn_parallel::attention::AttentionKernel;
    let grads = |cfg: GptConfig| {
        world(2, |c| {
            let gpt = cfg.init::<B>(&c, &Default::default()).unwrap();
            let loss = gpt.loss(ids("in", [3, 8]), ids("tg", [3, 8]));
            Ok((loss.clone().into_data(), named_grads(&gpt, &loss.backward())))
        })
        .remove(1)
    };
    let cfg = llama(2).with_sequence_parallel(true);
    let (composed, chunked) = (grads(cfg.clone().with_attention(AttentionKernel::Composed)), grads(cfg.with_attention(AttentionKernel::Chunked(3))));
    assert!(max_abs_diff(&composed.0, &chunked.0).unwrap() < TOL);
    for (a, b) in composed.1.iter().zip(&chunked.1) {
        let d = max_abs_diff(a.grad.as_ref().unwrap(), b.grad.as_ref().unwrap()).unwrap();
        assert!(d < TOL, "grad of {}: {d}", a.path);
    }
}

/// An odd head width cannot rotate pairs; θ must be positive; key/value heads must divide the
/// heads and split over TP: clear errors at init.
#[test]
fn shapes_that_cannot_rotate_or_group_are_refused() {
    let e = llama(1).with_kv_heads(Some(3)).validate(1).unwrap_err().to_string();
    assert_eq!(e, "attention heads = 8 is not divisible by key/value heads = 3");
    let e = llama(1).with_kv_heads(Some(2)).validate(4).unwrap_err().to_string();
    assert_eq!(e, "key/value heads = 2 is not divisible by tensor_parallel = 4");
    let e = GptConfig::new(32, 8, 12, 4, 1, 24).with_position(Position::Rope).validate(1).unwrap_err().to_string();
    assert!(e.contains("even head width") && e.contains("head width 3"), "{e}");
    let e = llama(1).with_rope_theta(0.0).validate(1).unwrap_err().to_string();
    assert!(e.contains("θ 0"), "{e}");
}

/// The memory model's parameter count of each variant is the model's own.
#[test]
fn the_memory_model_counts_each_variants_parameters() {
    use burn::module::Module;
    use burn_parallel::arch::Arch;
    use burn_parallel::memory::{model::parameter_count, GptShape};
    for (name, cfg) in variants().into_iter().chain([("llama tied", llama(2).with_tie_embeddings(true))]) {
        let n = world(1, |c| Ok(cfg.init::<B>(&c, &Default::default()).map_err(|e| e.to_string())?.num_params())).remove(0);
        let shape = GptShape {
            vocab: cfg.vocab_size,
            seq: cfg.max_seq_len,
            hidden: cfg.d_model,
            heads: cfg.n_heads,
            layers: cfg.n_layers,
            ffn: cfg.d_ff,
            tied_embeddings: cfg.tie_embeddings,
            activation: cfg.activation,
            arch: Arch { norm: cfg.norm, position: cfg.position, no_bias: !cfg.bias, kv_heads: cfg.kv_heads },
        };
        assert_eq!(parameter_count(&shape), n as f64, "{name}");
    }
}
