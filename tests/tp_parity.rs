//! Every tensor-parallel module and the whole GPT equal the unsharded model: forward output and
//! the gradient of the input and of every parameter shard, for tp ∈ {1, 2, 4} on CPU threads.
//! With tp = 1 each layer also equals its burn-nn counterpart.

mod common;

use burn::module::Module;
use burn::tensor::{Int, Tensor, TensorData};
use burn_parallel::comm::split_along;
use burn_parallel::params::{named_grads, NamedParam};
use burn_parallel::Comm;
use burn_parallel_modules::attention::fuse_qkv;
use burn_parallel_modules::*;
use common::*;

const TPS: [usize; 2] = [2, 4];

/// Runs `f` at tp = 1 (the reference) and at each tp in `TPS`, asserting parity.
fn parity(name: &str, f: impl Fn(&Comm, &Perturb) -> Outcome + Send + Sync) {
    let noise = Perturb::default();
    let reference = world(1, |c| Ok(f(&c, &noise))).remove(0);
    for t in TPS {
        let ranks = world(t, |c| Ok(f(&c, &noise)));
        let n = assert_parity(&reference, &ranks, TOL);
        assert!(n >= 2 * t, "{name}: compared only {n} tensors");
    }
}

fn outcome<M: Module<B>, const D: usize>(m: &M, y: Tensor<B, D>, loss: Tensor<B, 1>, x: Option<&Tensor<B, D>>) -> Outcome {
    outcome_any(m, y.clone().into_data(), loss, |g| x.and_then(|x| x.grad(g)).map(|t| t.into_data()))
}

fn outcome_any<M: Module<B>>(
    m: &M,
    output: TensorData,
    loss: Tensor<B, 1>,
    input_grad: impl FnOnce(&<B as burn::tensor::backend::AutodiffBackend>::Gradients) -> Option<TensorData>,
) -> Outcome {
    let grads = loss.backward();
    Outcome { output, input_grad: input_grad(&grads), params: named_grads(m, &grads) }
}

fn dev() -> burn::backend::flex::FlexDevice {
    Default::default()
}

#[test]
fn column_linear_sharded_and_gathered_output() {
    for gather in [false, true] {
        parity("column", |c, p| {
            let lin = ColumnLinearConfig::new(8, 12).with_gather_output(gather).init::<B>(c, &ParamInit::new(1), &dev()).unwrap();
            let lin = p.apply(lin, c);
            let x = leaf::<3>(randn("x", [2, 3, 8]));
            let y = lin.forward(x.clone());
            let loss = weighted_sum(y.clone(), [2, 3, 12], (!gather).then_some(2), c);
            outcome(&lin, y, loss, Some(&x))
        });
    }
}

#[test]
fn row_linear_parallel_and_replicated_input() {
    for parallel in [false, true] {
        parity("row", |c, p| {
            let lin = RowLinearConfig::new(8, 6).with_input_is_parallel(parallel).init::<B>(c, &ParamInit::new(2), &dev()).unwrap();
            let lin = p.apply(lin, c);
            let full = randn("x", [2, 3, 8]);
            let x = leaf::<3>(if parallel && c.size() > 1 { split_along(&full, 2, c.size(), c.rank()).unwrap() } else { full });
            let y = lin.forward(x.clone());
            let loss = weighted_sum(y.clone(), [2, 3, 6], None, c);
            outcome(&lin, y, loss, Some(&x))
        });
    }
}

fn ids(name: &str, shape: [usize; 2], vocab: usize) -> Tensor<B, 2, Int> {
    let n = shape[0] * shape[1];
    let mut rng = burn_parallel::rng::HostRng::new(9, name);
    let v: Vec<i64> = (0..n).map(|_| (rng.next_u64() % vocab as u64) as i64).collect();
    Tensor::from_data(TensorData::new(v, shape), &dev())
}

#[test]
fn vocab_parallel_embedding() {
    parity("embedding", |c, p| {
        let emb = VocabParallelEmbeddingConfig::new(16, 6).init::<B>(c, &ParamInit::new(3), &dev()).unwrap();
        let emb = p.apply(emb, c);
        let y = emb.forward(ids("ids", [3, 7], 16));
        let loss = weighted_sum(y.clone(), [3, 7, 6], None, c);
        outcome(&emb, y, loss, None)
    });
}

/// A target outside the vocabulary (e.g. torch's −100 padding) is refused, not counted as
/// `log Σ exp` (checked in builds with debug assertions, as the tests are).
#[test]
#[should_panic(expected = "target -100 is outside the vocabulary [0, 16)")]
fn cross_entropy_refuses_targets_outside_the_vocabulary() {
    let tp1 = burn_parallel::LocalWorld::new(1).communicator(0);
    let targets = Tensor::<B, 1, Int>::from_data(TensorData::new(vec![3i64, -100], [2]), &dev());
    drop(vocab_parallel_cross_entropy(leaf::<2>(randn("z", [2, 16])), targets, 0, &tp1));
}

#[test]
fn vocab_parallel_cross_entropy_matches_full_softmax() {
    parity("cross-entropy", |c, _| {
        let full = randn("logits", [10, 16]);
        let local = if c.size() > 1 { split_along(&full, 1, c.size(), c.rank()).unwrap() } else { full };
        let z = leaf::<2>(local);
        let start = c.rank() * 16 / c.size();
        let loss = vocab_parallel_cross_entropy(z.clone(), ids("t", [1, 10], 16).reshape([10]), start, c);
        let output = loss.clone().into_data();
        let grads = loss.backward();
        Outcome { output, input_grad: z.grad(&grads).map(|t| t.into_data()), params: Vec::new() }
    });
}

#[test]
fn mlp_attention_and_block() {
    let x_full = randn("x", [2, 5, 16]);
    parity("mlp", |c, p| {
        let m = ParallelMlpConfig::new(16, 32).init::<B>(c, &ParamInit::new(4), &dev()).unwrap();
        let m = p.apply(m, c);
        let x = leaf::<3>(x_full.clone());
        let y = m.forward(x.clone());
        outcome(&m, y.clone(), weighted_sum(y, [2, 5, 16], None, c), Some(&x))
    });
    parity("attention", |c, p| {
        let m = ParallelAttentionConfig::new(16, 4).init::<B>(c, &ParamInit::new(5), &dev()).unwrap();
        let m = p.apply(m, c);
        let x = leaf::<3>(x_full.clone());
        let y = m.forward(x.clone());
        outcome(&m, y.clone(), weighted_sum(y, [2, 5, 16], None, c), Some(&x))
    });
    parity("block", |c, p| {
        let m = TransformerBlockConfig::new(16, 4, 32).init::<B>(c, &ParamInit::new(6), &dev()).unwrap();
        let m = p.apply(m, c);
        let x = leaf::<3>(x_full.clone());
        let y = m.forward(x.clone());
        outcome(&m, y.clone(), weighted_sum(y, [2, 5, 16], None, c), Some(&x))
    });
}

fn small_gpt() -> GptConfig {
    GptConfig::new(32, 8, 16, 4, 2, 32)
}

/// Logits (sharded over the vocabulary), loss, and every parameter gradient of the GPT.
#[test]
fn gpt_logits_loss_and_every_gradient() {
    let cfg = small_gpt();
    let losses = std::sync::Mutex::new(Vec::new());
    parity("gpt", |c, p| {
        let gpt = cfg.init::<B>(c, &dev()).unwrap();
        let gpt = p.apply(gpt, c);
        let (x, t) = (ids("in", [3, 8], 32), ids("tg", [3, 8], 32));
        let logits = gpt.forward(x.clone());
        let loss = gpt.loss(x, t);
        losses.lock().unwrap().push((c.size(), loss.clone().into_scalar()));
        outcome(&gpt, logits, loss, None)
    });
    let losses = losses.into_inner().unwrap();
    let reference = losses.iter().find(|(t, _)| *t == 1).unwrap().1;
    assert!(losses.iter().all(|(_, l)| (l - reference).abs() < 1e-5), "{losses:?}");
    assert!(reference > 3.0 && reference < 4.0, "ln(32) ≈ 3.47 at init, got {reference}");
}

/// Sampling gives the same tokens at tp = 1 and 2 (greedy and at temperature 1, with and without
/// sequence parallelism); an empty prompt or an id outside the vocabulary is a clear error.
#[test]
fn generate_agrees_over_tp_and_rejects_bad_prompts() {
    let cfg = small_gpt();
    let sample = |t: usize, sp: bool| {
        world(t, |c| {
            let gpt = cfg.init::<B>(&c, &dev()).unwrap().with_sequence_parallel(sp);
            let greedy = gpt.generate(&[1, 2, 3], 6, 0.0, 7).map_err(|e| e.to_string())?;
            let warm = gpt.generate(&[1, 2, 3], 6, 1.0, 7).map_err(|e| e.to_string())?;
            let empty = gpt.generate(&[], 1, 0.0, 7).unwrap_err().to_string();
            let outside = gpt.generate(&[3, cfg.vocab_size], 1, 0.0, 7).unwrap_err().to_string();
            Ok((greedy, warm, empty, outside))
        })
    };
    let reference = sample(1, false).remove(0);
    assert_eq!(reference.0.len(), 9);
    assert_eq!(&reference.0[..3], &[1, 2, 3]);
    assert!(reference.2.contains("at least one token"), "{}", reference.2);
    assert!(reference.3.contains(&format!("token {} is outside the vocabulary of {}", cfg.vocab_size, cfg.vocab_size)), "{}", reference.3);
    for out in [sample(2, false), sample(2, true)].concat() {
        assert_eq!((&out.0, &out.1), (&reference.0, &reference.1));
    }
}

/// tp = 1 equals the same model built from burn-nn layers (Linear, Embedding, LayerNorm,
/// MultiHeadAttention, CrossEntropyLoss), parameter by parameter.
#[test]
fn tp1_gpt_equals_burn_nn_gpt() {
    let cfg = small_gpt();
    let (x, t) = (ids("in", [3, 8], 32), ids("tg", [3, 8], 32));
    let ours = world(1, |c| {
        let gpt = cfg.init::<B>(&c, &dev()).unwrap();
        let logits = gpt.forward(x.clone()).into_data();
        let loss = gpt.loss(x.clone(), t.clone());
        Ok((logits, loss.clone().into_data(), named_grads(&gpt, &loss.backward())))
    })
    .remove(0);
    let nn = cfg.init_reference::<B>(&dev());
    let logits = nn.forward(x.clone()).into_data();
    let loss = nn.loss(x, t);
    let grads = named_grads(&nn, &loss.clone().backward());
    assert!(max_abs_diff(&ours.0, &logits).unwrap() < TOL);
    assert!(max_abs_diff(&ours.1, &loss.into_data()).unwrap() < TOL);
    let mut ref_by_path: std::collections::HashMap<String, _> = grads.into_iter().map(|p| (p.path.replace("mlp.", "").replace(".Layer.", "."), p)).collect();
    // burn-nn's separate q, k, v are our fused projection, grouped by head.
    for i in 0..cfg.n_layers {
        for field in ["weight", "bias"] {
            let mut part = |name: &str| ref_by_path.remove(&format!("blocks.{i}.attn.{name}.{field}")).unwrap();
            let (q, k, v) = (part("query"), part("key"), part("value"));
            let fuse = |f: fn(&NamedParam) -> &TensorData| fuse_qkv(f(&q), f(&k), f(&v), cfg.n_heads);
            let value = fuse(|p| &p.value);
            let grad = fuse(|p| p.grad.as_ref().unwrap());
            let path = format!("blocks.{i}.attn.qkv.{field}");
            ref_by_path.insert(path.clone(), NamedParam { path, value, grad: Some(grad) });
        }
    }
    assert_eq!(ref_by_path.len(), ours.2.len(), "same parameter count");
    for p in &ours.2 {
        let q = ref_by_path.get(&p.path.replace("mlp.", "")).unwrap_or_else(|| panic!("burn-nn model has no {}", p.path));
        assert_eq!(max_abs_diff(&p.value, &q.value).unwrap(), 0.0, "value of {}", p.path);
        let d = max_abs_diff(p.grad.as_ref().unwrap(), q.grad.as_ref().unwrap()).unwrap();
        assert!(d < TOL, "grad of {}: {d}", p.path);
    }
}

// ---- sequence parallelism ----

/// The SP block maps `[b, s/t, h]` shards to shards and equals the unsharded block: output shard,
/// input-shard gradient and every parameter gradient (LN γ/β and row biases summed over TP).
#[test]
fn sequence_parallel_block_equals_the_unsharded_block() {
    let x_full = randn("x", [2, 8, 16]);
    parity("sp block", |c, p| {
        let m = TransformerBlockConfig::new(16, 4, 32).with_sequence_parallel(true).init::<B>(c, &ParamInit::new(6), &dev()).unwrap();
        let m = p.apply(m, c);
        let x = leaf::<3>(if c.size() > 1 { split_along(&x_full, 1, c.size(), c.rank()).unwrap() } else { x_full.clone() });
        let y = m.forward(x.clone());
        // Activation memory of the LN/dropout/residual regions: 1/t of the full [b, s, h].
        assert_eq!(y.dims(), [2, 8 / c.size(), 16]);
        outcome(&m, y.clone(), weighted_sum(y, [2, 8, 16], Some(1), c), Some(&x))
    });
}

#[test]
fn sequence_parallel_gpt_equals_the_unsharded_and_the_tp_gpt() {
    let cfg = small_gpt().with_sequence_parallel(true);
    let tp_only = std::sync::Mutex::new(Vec::new());
    parity("sp gpt", |c, p| {
        let gpt = p.apply(cfg.init::<B>(c, &dev()).unwrap(), c);
        let (x, t) = (ids("in", [3, 8], 32), ids("tg", [3, 8], 32));
        let logits = gpt.forward(x.clone());
        let loss = gpt.loss(x.clone(), t.clone());
        // The same parameters without SP give the same loss.
        let plain = gpt.clone().with_sequence_parallel(false).loss(x, t).into_scalar();
        tp_only.lock().unwrap().push((loss.clone().into_scalar(), plain));
        outcome(&gpt, logits, loss, None)
    });
    for (sp, plain) in tp_only.into_inner().unwrap() {
        assert!((sp - plain).abs() < TOL, "SP loss {sp} vs TP loss {plain}");
    }
}

/// Without the TP all-reduce of γ/β gradients (a layer norm that does not know it runs on a
/// sequence shard), each rank only has its tokens' share: the check above would fail.
#[test]
fn layer_norm_gradients_on_shards_need_the_tp_all_reduce() {
    let x_full = randn("x", [2, 4, 6]);
    let grads = |sp_flag: bool| {
        world(2, |c| {
            let ln = ParallelLayerNormConfig::new(6).with_sequence_parallel(sp_flag).init::<B>(&c, &dev());
            let x = leaf::<3>(split_along(&x_full, 1, 2, c.rank()).unwrap());
            let y = ln.forward(x);
            let g = weighted_sum(y, [2, 4, 6], Some(1), &c).backward();
            Ok(ln.gamma.val().grad(&g).unwrap().into_data())
        })
    };
    let reference = world(1, |c| {
        let ln = ParallelLayerNormConfig::new(6).init::<B>(&c, &dev());
        let y = ln.forward(leaf::<3>(x_full.clone()));
        Ok(ln.gamma.val().grad(&weighted_sum(y, [2, 4, 6], None, &c).backward()).unwrap().into_data())
    });
    for g in grads(true) {
        assert!(max_abs_diff(&reference[0], &g).unwrap() < TOL);
    }
    for g in grads(false) {
        assert!(max_abs_diff(&reference[0], &g).unwrap() > 1e-2);
    }
}

#[test]
fn sequence_length_not_divisible_by_tp_is_a_clear_error() {
    let cfg = small_gpt().with_sequence_parallel(true);
    let e = cfg.check_seq_len(6, 4).unwrap_err().to_string();
    assert_eq!(e, "sequence length = 6 is not divisible by tensor_parallel (sequence parallelism) = 4");
    assert!(cfg.check_seq_len(8, 4).is_ok());
    assert!(cfg.check_seq_len(9, 1).unwrap_err().to_string().contains("exceeds max_seq_len 8"));
    let e = small_gpt().init::<B>(&world(3, Ok).remove(0), &dev()).unwrap_err().to_string();
    assert_eq!(e, "attention heads = 4 is not divisible by tensor_parallel = 3");
}

/// Sizes of zero and a dropout that is no probability are errors of `GptConfig::validate`
/// (`init` and the pipeline's `build_part` call it), not panics inside the first forward.
#[test]
fn zero_sizes_and_a_bad_dropout_are_clear_errors() {
    let c = small_gpt();
    let cases = [
        (GptConfig { n_layers: 0, ..c.clone() }, "layers must be at least 1 (got 0)"),
        (GptConfig { max_seq_len: 0, ..c.clone() }, "max_seq_len must be at least 1 (got 0)"),
        (GptConfig { d_model: 0, ..c.clone() }, "hidden size must be at least 1 (got 0)"),
        (GptConfig { d_ff: 0, ..c.clone() }, "ffn size must be at least 1 (got 0)"),
        (GptConfig { vocab_size: 0, ..c.clone() }, "vocab size must be at least 1 (got 0)"),
        (c.clone().with_loss_chunk(Some(0)), "loss chunk rows must be at least 1 (got 0)"),
        (c.clone().with_dropout(1.0), "dropout 1 is not a probability in [0, 1)"),
        (c.clone().with_dropout(-0.1), "dropout -0.1 is not a probability in [0, 1)"),
    ];
    for (cfg, want) in cases {
        assert_eq!(cfg.validate(1).unwrap_err().to_string(), want);
        assert_eq!(cfg.init::<B>(&world(1, Ok).remove(0), &dev()).unwrap_err().to_string(), want);
    }
    assert!(c.with_dropout(0.0).validate(2).is_ok());
}
