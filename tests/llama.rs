//! Llama-style blocks (RMS norms, rotary position embedding, SwiGLU, no biases, grouped-query
//! attention), each option alone and all together: at tp 1 the model equals burn-nn's layers (`RmsNorm`, `SwiGlu`,
//! `RotaryEncoding`); at tp 2 and 4, with and without SP, the forward and every gradient equal
//! tp 1's; split into pipelines (1F1B pp 2 × tp 2 with SP, interleaved) every gradient equals the
//! single rank's; recompute (full, selective, with dropout) and gradient accumulation give the
//! plain gradients; bf16 at tp 2 (SP) is within bf16's precision of f32 at tp 1; bad shapes are
//! clear errors.

mod common;

use std::collections::HashMap;

use burn::module::Module;
use burn::tensor::{Int, Tensor, TensorData};
use burn_parallel::activation::Activation;
use burn_parallel::arch::{Norm, Position, RopeScaling};
use burn_parallel::params::{named_grads, named_param_grads, NamedParam};
use burn_parallel::pipeline::{PipelineExecutor, PipelineModel, PipelineOptions};
use burn_parallel::rng::HostRng;
use burn_parallel::{Comm, ParallelConfig, ProcessGroups};
use burn_parallel_modules::attention::fuse_qkv_grouped;
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

/// Llama 3.1's RoPE scaling on a short original context (the tests' sequences are 8 long).
const SCALED: RopeScaling = RopeScaling { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 64 };

/// Each option alone on the GPT-2 model, then all of them.
fn variants() -> Vec<(&'static str, GptConfig)> {
    let base = GptConfig::new(32, 8, 16, 4, 2, 24);
    vec![
        ("rms-norm", base.clone().with_norm(Norm::RmsNorm)),
        ("rope", base.clone().with_position(Position::Rope).with_rope_theta(500.0)),
        // Head width 8, original context 64: pairs kept, blended and divided (Llama 3.1's rule).
        ("rope llama3", GptConfig::new(32, 8, 32, 4, 2, 24).with_position(Position::Rope).with_rope_theta(500.0).with_rope_scaling(Some(SCALED))),
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

/// Adds noise to every norm gain (and β) keyed by its path without burn-nn's enum variant
/// (`ln1.Rms.gamma` is `ln1.gamma`), alike in our model and burn-nn's: a gain the forward or
/// backward ignored would show.
struct GainNoise(Vec<String>);

impl burn::module::ModuleMapper<B> for GainNoise {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.0.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.0.pop();
    }
    fn map_float<const D: usize>(&mut self, p: burn::module::Param<Tensor<B, D>>) -> burn::module::Param<Tensor<B, D>> {
        let path = self.0.iter().filter(|n| *n != "Rms" && *n != "Layer").cloned().collect::<Vec<_>>().join(".");
        if !(path.ends_with("gamma") || path.ends_with("beta")) {
            return p;
        }
        let n = p.val().dims().iter().product();
        let noise = TensorData::new(HostRng::new(9, &path).normal_vec(n, 0.3), p.val().dims().to_vec());
        p.map(|t| (t.clone() + Tensor::from_data(noise, &t.device())).detach().require_grad())
    }
}

/// burn-nn's gradients under our names: norms without the enum variant, `fc1`/`fc2` under
/// `mlp.`, SwiGLU's inner linear as `mlp.gate` (its outer one is `fc1` itself), q/k/v fused.
fn as_ours(grads: Vec<NamedParam>, cfg: &GptConfig) -> HashMap<String, NamedParam> {
    let rename = |p: &str| {
        let p = p.replace(".Rms.", ".").replace(".Layer.", ".").replace(".swiglu.linear_inner.", ".mlp.gate.");
        p.replace(".fc1.", ".mlp.fc1.").replace(".fc2.", ".mlp.fc2.")
    };
    let mut out: HashMap<String, NamedParam> = grads.into_iter().filter(|p| !p.path.contains("linear_outer")).map(|p| (rename(&p.path), p)).collect();
    let groups = cfg.kv_heads.unwrap_or(cfg.n_heads);
    for i in 0..cfg.n_layers {
        for field in ["weight", "bias"] {
            let mut part = |name: &str| out.remove(&format!("blocks.{i}.attn.{name}.{field}"));
            let (Some(q), Some(k), Some(v)) = (part("query"), part("key"), part("value")) else { continue };
            let fuse = |f: fn(&NamedParam) -> &TensorData| fuse_qkv_grouped(f(&q), f(&k), f(&v), cfg.n_heads, groups);
            let path = format!("blocks.{i}.attn.qkv.{field}");
            out.insert(path.clone(), NamedParam { path, value: fuse(|p| &p.value), grad: Some(fuse(|p| p.grad.as_ref().unwrap())) });
        }
    }
    out
}

/// At tp 1 each variant (norm gains perturbed) equals the burn-nn model: logits, loss, and every
/// parameter's value and gradient.
#[test]
fn each_option_equals_burn_nn_layers() {
    let (x, t) = (ids("in", [3, 8]), ids("tg", [3, 8]));
    for (name, cfg) in variants() {
        let ours = world(1, |c| {
            let gpt = cfg.init::<B>(&c, &Default::default()).map_err(|e| e.to_string())?.map(&mut GainNoise(Vec::new()));
            let loss = gpt.loss(x.clone(), t.clone());
            let grads = named_grads(&gpt, &loss.clone().backward());
            Ok((gpt.forward(x.clone()).into_data(), loss.into_data(), grads))
        })
        .remove(0);
        let nn = cfg.init_reference::<B>(&Default::default()).map(&mut GainNoise(Vec::new()));
        let loss = nn.loss(x.clone(), t.clone());
        let reference = as_ours(named_grads(&nn, &loss.clone().backward()), &cfg);
        let logits = max_abs_diff(&ours.0, &nn.forward(x.clone()).into_data()).unwrap();
        assert!(logits < TOL, "{name}: logits differ by {logits}");
        assert!(max_abs_diff(&ours.1, &loss.into_data()).unwrap() < TOL, "{name}: loss");
        assert_eq!(ours.2.len(), reference.len(), "{name}: parameters {:?}", reference.keys().collect::<Vec<_>>());
        for p in &ours.2 {
            let r = reference.get(&p.path).unwrap_or_else(|| panic!("{name}: burn-nn has no {}", p.path));
            assert_eq!(max_abs_diff(&p.value, &r.value).unwrap(), 0.0, "{name}: value of {}", p.path);
            let d = max_abs_diff(p.grad.as_ref().unwrap(), r.grad.as_ref().unwrap()).unwrap();
            assert!(d < TOL, "{name}: grad of {}: {d}", p.path);
        }
        // Each option shows in the parameters.
        let paths: Vec<&str> = ours.2.iter().map(|p| p.path.as_str()).collect();
        match name {
            "rms-norm" => assert!(!paths.iter().any(|p| p.ends_with("beta")) && paths.contains(&"ln_f.gamma")),
            "rope" => assert!(!paths.contains(&"wpe")),
            "rope llama3" => {
                // The scaling moves the logits (small at init: 2e-4) well beyond the tolerance.
                let plain = cfg.clone().with_rope_scaling(None).init_reference::<B>(&Default::default()).map(&mut GainNoise(Vec::new()));
                let moved = max_abs_diff(&ours.0, &plain.forward(x.clone()).into_data()).unwrap();
                assert!(moved > 10.0 * TOL && !paths.contains(&"wpe"), "{name}: plain RoPE's logits differ by {moved} only");
            }
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
        let model = GptPipeline { config: cfg.clone(), tp: groups.tp.clone(), cp: None };
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
        .concat()
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
            assert_eq!(a.path, b.path);
            let d = max_abs_diff(a.grad.as_ref().unwrap(), b.grad.as_ref().unwrap()).unwrap();
            let tol = if split == 1 { 0.0 } else { TOL };
            assert!(d <= tol, "{name}: grad of {}: {d}", a.path);
        }
    }
}

/// In bf16 (f32 RMS statistics, rotations in bf16), tp 2 with SP gives the f32 model's loss and
/// logits within bf16's precision (perturbed weights: logits of order 1, where attention and its
/// rotation matter: another θ moves them well beyond that precision).
#[test]
fn bf16_llama_at_tp2_equals_f32() {
    use burn::tensor::{DType, ElementConversion};
    use burn_parallel::precision::cast_params;
    let noise = Perturb::default();
    let run = |cfg: GptConfig, t: usize, dtype: DType| {
        world(t, |c| {
            let gpt = noise.apply(cfg.init::<B>(&c, &Default::default()).unwrap(), &c);
            let gpt = if dtype == DType::F32 { gpt } else { cast_params(gpt, dtype) };
            let x = ids("in", [2, 8]);
            let loss = gpt.loss(x.clone(), ids("tg", [2, 8])).into_scalar().elem::<f32>();
            Ok((loss, gpt.logits(x).into_data().convert::<f32>()))
        })
    };
    let f32 = run(llama(2), 1, DType::F32).remove(0);
    let other_theta = run(llama(2).with_rope_theta(3.0), 1, DType::F32).remove(0);
    let scale = f32.1.to_vec::<f32>().unwrap().iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(scale > 1.0, "logits of order 1: {scale}");
    let moved = max_abs_diff(&f32.1, &other_theta.1).unwrap();
    for (r, bf16) in run(llama(2).with_sequence_parallel(true), 2, DType::BF16).into_iter().enumerate() {
        let d = max_abs_diff(&f32.1, &bf16.1).unwrap();
        eprintln!("rank {r}: loss f32 {} bf16 {}; logits: bf16 off by {d}, another θ by {moved}, up to {scale}", f32.0, bf16.0);
        assert!((f32.0 - bf16.0).abs() < 2e-2 * f32.0.abs(), "rank {r}: loss {} vs {}", f32.0, bf16.0);
        assert!(d < 0.05 * scale && moved > 4.0 * d, "rank {r}: bf16 {d}, another θ {moved} (logits up to {scale})");
    }
}

/// RoPE through the chunked attention op (the fused kernels' algorithm as Burn ops), on the
/// packed projection (one key/value head per head) and split (grouped-query attention), gives
/// the composed core's loss and gradients on every rank, at tp 2 with SP.
#[test]
fn rope_and_grouped_query_attention_through_the_chunked_core_equal_the_composed_core() {
    use burn_parallel::attention::AttentionKernel;
    let grads = |cfg: GptConfig| {
        world(2, |c| {
            let gpt = cfg.init::<B>(&c, &Default::default()).unwrap();
            let loss = gpt.loss(ids("in", [3, 8]), ids("tg", [3, 8]));
            Ok((loss.clone().into_data(), named_grads(&gpt, &loss.backward())))
        })
    };
    for cfg in [llama(2), llama(2).with_kv_heads(None)] {
        let cfg = cfg.with_sequence_parallel(true);
        let composed = grads(cfg.clone().with_attention(AttentionKernel::Composed));
        let chunked = grads(cfg.clone().with_attention(AttentionKernel::Chunked(3)));
        for (r, (composed, chunked)) in composed.iter().zip(&chunked).enumerate() {
            assert!(max_abs_diff(&composed.0, &chunked.0).unwrap() < TOL);
            for (a, b) in composed.1.iter().zip(&chunked.1) {
                let d = max_abs_diff(a.grad.as_ref().unwrap(), b.grad.as_ref().unwrap()).unwrap();
                assert!(d < TOL, "kv {:?} rank {r}: grad of {}: {d}", cfg.kv_heads, a.path);
            }
        }
    }
}

/// Generation with RoPE: the first token is the burn-nn model's greedy choice; tp 2 (SP on,
/// which generation switches off) samples tp 1's tokens, past the context window too (the
/// window slides: positions restart at 0 for the kept tokens).
#[test]
fn rope_generation_matches_the_reference_and_any_tp() {
    let cfg = llama(2);
    let prompt = [3usize, 17, 5];
    let nn = cfg.init_reference::<B>(&Default::default());
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(prompt.iter().map(|&t| t as i64).collect::<Vec<_>>(), [1, 3]), &Default::default());
    let last: Vec<f32> = nn.forward(ids).slice([0..1, 2..3]).into_data().to_vec().unwrap();
    let greedy = last.iter().enumerate().fold(0, |b, (i, v)| if *v > last[b] { i } else { b });
    let generate =
        |cfg: GptConfig, t: usize| world(t, |c| cfg.init::<B>(&c, &Default::default()).unwrap().generate(&prompt, 12, 0.0, 1).map_err(|e| e.to_string()));
    let one = generate(cfg.clone(), 1).remove(0);
    assert_eq!(one.len(), 15);
    assert_eq!(one[3], greedy, "the first generated token");
    for tokens in generate(cfg.with_sequence_parallel(true), 2) {
        assert_eq!(tokens, one);
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
    let e = GptConfig::new(32, 8, 16, 4, 1, 24).with_rope_scaling(Some(SCALED)).validate(1).unwrap_err().to_string();
    assert!(e.contains("RoPE scaling needs rotary positions"), "{e}");
    let wrong = RopeScaling { high_freq_factor: 0.5, ..SCALED };
    let e = llama(1).with_rope_scaling(Some(wrong)).validate(1).unwrap_err().to_string();
    assert!(e.contains("llama3:8,1,0.5,64") && e.contains("low_freq_factor < high_freq_factor"), "{e}");
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
