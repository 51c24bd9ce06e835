//! Context parallelism (`burn_parallel::context`): each sequence split over C ranks in
//! load-balanced chunks, keys and values all-gathered in attention. The logits of each rank's
//! tokens, the loss (mean over the group) and every parameter gradient (averaged over the DP
//! group, which holds the CP ranks) equal the unsplit model's, for the GPT-2 model (learned
//! positions) and the Llama model (RoPE, grouped-query attention), at cp 2 and 4, with tp 2,
//! with SP; training runs at dp × cp × pp × tp equal the single rank's step by step, recompute
//! gives the plain gradients with dropout on, checkpoints move between CP layouts, generation
//! samples the unsplit model's tokens, and bad layouts are clear errors.

mod common;

use burn::tensor::{Int, Tensor, TensorData};
use burn_parallel::activation::Activation;
use burn_parallel::arch::{Norm, Position};
use burn_parallel::attention::AttentionKernel;
use burn_parallel::params::{named_grads, named_param_grads, NamedParam};
use burn_parallel::recompute::Recompute;
use burn_parallel::rng::HostRng;
use burn_parallel::{ContextParallel, ParallelConfig, ProcessGroups, ReduceOp};
use burn_parallel_modules::GptConfig;
use common::runner::{layout, run, temp_dir, Layout, Plan};
use common::*;

const SEQ: usize = 16;

/// GPT-2's block (learned positions, layer norms, GeLU, biases): vocabulary 32, width 16,
/// 4 heads, 2 layers.
fn gpt2() -> GptConfig {
    GptConfig::new(32, SEQ, 16, 4, 2, 24)
}

/// Llama's block: RoPE, 4 heads sharing 2 key/value heads, RMS norms, SwiGLU, no biases.
fn llama() -> GptConfig {
    gpt2()
        .with_kv_heads(Some(2))
        .with_norm(Norm::RmsNorm)
        .with_position(Position::Rope)
        .with_rope_theta(500.0)
        .with_activation(Activation::SwiGlu)
        .with_bias(false)
}

fn tokens(name: &str, shape: [usize; 2]) -> TensorData {
    let mut rng = HostRng::new(11, name);
    TensorData::new((0..shape[0] * shape[1]).map(|_| (rng.next_u64() % 32) as i64).collect::<Vec<_>>(), shape)
}

/// The unsplit model's logits, loss and every gradient (composed attention; parameters perturbed
/// by `noise`).
fn reference(cfg: &GptConfig, noise: &Perturb, x: &TensorData, y: &TensorData) -> (TensorData, f32, Vec<NamedParam>) {
    world(1, |c| {
        let unsplit = cfg.clone().with_attention(AttentionKernel::Composed);
        let gpt = noise.apply(unsplit.init::<B>(&c, &Default::default()).map_err(|e| e.to_string())?, &c);
        let ids = |d: &TensorData| Tensor::<B, 2, Int>::from_data(d.clone(), &Default::default());
        let logits = gpt.forward(ids(x)).into_data();
        let loss = gpt.loss(ids(x), ids(y));
        let value = loss.clone().into_scalar();
        Ok((logits, value, named_grads(&gpt, &loss.backward())))
    })
    .remove(0)
}

/// Every rank of `cp × tp` (SP as configured) against the reference; returns the number of
/// tensors compared on each rank.
fn check_layout(cfg: &GptConfig, cp: usize, tp: usize) -> Vec<usize> {
    let (x, y) = (tokens("in", [3, SEQ]), tokens("tg", [3, SEQ]));
    let noise = Perturb::default();
    let (logits, loss, grads) = reference(cfg, &noise, &x, &y);
    let layout = ParallelConfig::new().with_context_parallel(cp).with_tensor_parallel(tp).with_sequence_parallel(cfg.sequence_parallel);
    world(cp * tp, |c| {
        let g = ProcessGroups::new(layout.clone(), c).map_err(|e| e.to_string())?;
        let cpp = ContextParallel::new(g.cp.clone());
        let gpt = noise.apply(cfg.init::<B>(&g.tp, &Default::default()).map_err(|e| e.to_string())?, &g.tp);
        let gpt = gpt.with_context_parallel(cpp.clone());
        let ids = |d: &TensorData| Tensor::<B, 2, Int>::from_data(cpp.split_data(d, 1).unwrap(), &Default::default());
        let what = format!("cp {cp} (rank {}) tp {tp} sp {}", cpp.rank(), cfg.sequence_parallel);
        let local = gpt.forward(ids(&x)).into_data();
        assert_shard(&format!("{what}: logits"), &cpp.split_data(&logits, 1)?, &local, g.coords.tp, tp, TOL);
        let l = gpt.loss(ids(&x), ids(&y));
        let mean = burn_parallel::comm::ops::all_reduce(l.clone().inner(), ReduceOp::Mean, &g.cp).map_err(|e| e.to_string())?.into_scalar();
        assert!((mean - loss).abs() < TOL, "{what}: loss {mean} vs {loss}");
        let mine = named_grads(&gpt, &l.backward());
        assert_eq!(mine.len(), grads.len(), "{what}: parameter count");
        for (p, r) in mine.iter().zip(&grads) {
            assert_eq!(p.path, r.path);
            let gr = g.dp.all_reduce(p.grad.clone().unwrap(), ReduceOp::Mean).map_err(|e| e.to_string())?;
            assert_shard(&format!("{what}: grad of {}", p.path), r.grad.as_ref().unwrap(), &gr, g.coords.tp, tp, TOL);
        }
        Ok(2 + mine.len())
    })
}

/// Logits, loss and every gradient equal the unsplit model's (composed attention) over cp 2 and
/// 4, with tp 2 and SP, through the composed and the chunked attention core (3 query rows per
/// chunk: chunks of 2, 4 and 8 rows that do not divide evenly).
#[test]
fn context_parallel_equals_the_unsplit_model() {
    let chunked = |c: GptConfig| c.with_attention(AttentionKernel::Chunked(3));
    for (name, base) in [("gpt2", gpt2()), ("llama", llama()), ("gpt2 chunked", chunked(gpt2())), ("llama chunked", chunked(llama()))] {
        for (cp, tp, sp) in [(2, 1, false), (4, 1, false), (2, 2, false), (2, 2, true)] {
            let n = check_layout(&base.clone().with_sequence_parallel(sp), cp, tp);
            assert!(n.iter().all(|&k| k > 15), "{name} cp {cp} tp {tp}: compared {n:?} tensors");
        }
    }
}

/// The split itself: the two ranks' ids interleave as designed, and gathering and reordering
/// gives the whole sequence back.
#[test]
fn each_rank_reads_its_two_chunks() {
    let x = TensorData::new((0..16i64).collect::<Vec<_>>(), [1, 16]);
    let got = world(2, |c| Ok(ContextParallel::new(c).split_data(&x, 1).unwrap().to_vec::<i64>().unwrap()));
    assert_eq!(got, vec![vec![0, 1, 2, 3, 12, 13, 14, 15], vec![4, 5, 6, 7, 8, 9, 10, 11]]);
    // Split, gathered (rank order) and put in position order: the whole sequence again, at
    // cp 2 and 4; the gathered rows sit at `gathered_positions`.
    for c in [2, 4] {
        let whole: Vec<f32> = (0..16).map(|i| i as f32).collect();
        let back = world(c, |comm| {
            let cp = ContextParallel::new(comm);
            let mine = Tensor::<B, 2>::from_data(TensorData::new(whole.clone(), [1, 16]), &Default::default());
            let gathered = cp.gather(cp.split(mine, 1), 1);
            let at: Vec<f32> = cp.gathered_positions(16 / c).into_iter().map(|p| p as f32).collect();
            assert_eq!(gathered.clone().into_data().to_vec::<f32>().unwrap(), at, "cp {c}: gathered rows");
            Ok(cp.to_position_order(gathered, 1).into_data().to_vec::<f32>().unwrap())
        });
        assert!(back.iter().all(|b| *b == whole), "cp {c}: {back:?}");
    }
}

fn cp(l: Layout, cp: usize) -> Layout {
    Layout { cp, ..l }
}

/// Training steps (AdamW, clipping) at dp × cp × pp × tp equal the single rank's losses.
#[test]
fn training_runs_equal_the_single_rank() {
    let plan = |layout: Layout, sp: bool| Plan { layout, config: common::runner::gpt(4, sp, 0.0), load: None, steps: 3, save: None, async_save: false };
    let single = run(&plan(layout(1, 1, 1), false));
    for (l, sp) in [
        (cp(layout(1, 1, 1), 2), false),
        (cp(layout(2, 1, 1), 2), false),
        (cp(layout(1, 1, 2), 2), true),
        (cp(layout(1, 2, 1), 2), false),
        (cp(layout(1, 2, 2), 2), true),
        (cp(layout(1, 1, 1), 4), false),
    ] {
        let losses = run(&plan(Layout { sp, ..l }, sp));
        for (i, (a, b)) in single.iter().zip(&losses).enumerate() {
            assert!((a - b).abs() < 2e-5, "{l:?}: step {i} loss {b} vs single rank {a}");
        }
    }
}

/// A checkpoint saved at dp 1 × cp 2 × tp 2 resumes at dp 2 × tp 1 (and back) where the
/// uninterrupted single rank would be.
#[test]
fn checkpoints_move_between_context_parallel_layouts() {
    let plan = |layout: Layout, load, steps, save| Plan { layout, config: common::runner::gpt(4, false, 0.0), load, steps, save, async_save: false };
    let whole = run(&plan(layout(1, 1, 1), None, 4, None));
    let (a, b) = (temp_dir("cp-a"), temp_dir("cp-b"));
    let first = run(&plan(cp(layout(1, 1, 2), 2), None, 2, Some(&a)));
    let second = run(&plan(layout(2, 1, 1), Some(&a), 1, Some(&b)));
    let third = run(&plan(cp(layout(1, 2, 1), 2), Some(&b), 1, None));
    for (i, (w, got)) in whole.iter().zip(first.iter().chain(&second).chain(&third)).enumerate() {
        assert!((w - got).abs() < 2e-5, "step {i}: {got} vs {w}");
    }
    let _ = (std::fs::remove_dir_all(a), std::fs::remove_dir_all(b));
}

/// With dropout on, selective and full recompute under cp 2 × tp 2 (SP) give the gradients of no
/// recompute exactly (the same masks replayed; the gathers rerun).
#[test]
fn recompute_gives_the_plain_gradients() {
    let layout = ParallelConfig::new().with_context_parallel(2).with_tensor_parallel(2).with_sequence_parallel(true);
    let (x, y) = (tokens("in", [2, SEQ]), tokens("tg", [2, SEQ]));
    let run_mode = |mode: Recompute| {
        let cfg = llama().with_sequence_parallel(true).with_dropout(0.1).with_recompute(mode);
        world(4, |c| {
            let g = ProcessGroups::new(layout.clone(), c).map_err(|e| e.to_string())?;
            let cpp = ContextParallel::new(g.cp.clone());
            let gpt = cfg.init::<B>(&g.tp, &Default::default()).map(|m| m.with_context_parallel(cpp.clone())).map_err(|e| e.to_string())?;
            let ids = |d: &TensorData| Tensor::<B, 2, Int>::from_data(cpp.split_data(d, 1).unwrap(), &Default::default());
            let (loss, grads) = gpt.forward_backward(ids(&x), ids(&y)).map_err(|e| e.to_string())?;
            Ok((loss, named_param_grads(&gpt, &grads)))
        })
    };
    let plain = run_mode(Recompute::None);
    for mode in [Recompute::Selective, Recompute::Full] {
        for (r, (want, got)) in plain.iter().zip(run_mode(mode)).enumerate() {
            assert_eq!(want.0, got.0, "{mode:?} rank {r}: loss");
            for (p, q) in want.1.iter().zip(&got.1) {
                assert_eq!(max_abs_diff(p.grad.as_ref().unwrap(), q.grad.as_ref().unwrap()).unwrap(), 0.0, "{mode:?} rank {r}: grad of {}", p.path);
            }
        }
    }
}

/// Sequences that do not split into 2·cp chunks and SP shards of a chunk are refused with the
/// numbers.
#[test]
fn bad_layouts_are_clear_errors() {
    let e = gpt2().check_seq_len_cp(12, 1, 4).unwrap_err().to_string();
    assert_eq!(e, "sequence length = 12 is not divisible by 2 × context_parallel (two chunks per rank) = 8");
    let e = gpt2().with_sequence_parallel(true).check_seq_len_cp(12, 4, 2).unwrap_err().to_string();
    assert_eq!(e, "sequence length / context_parallel = 6 is not divisible by tensor_parallel (sequence parallelism) = 4");
    assert!(gpt2().with_sequence_parallel(true).check_seq_len_cp(16, 4, 2).is_ok());
    let e = gpt2().check_seq_len_cp(32, 1, 2).unwrap_err().to_string();
    assert!(e.contains("exceeds max_seq_len 16"), "{e}");
}

/// Generation on a context-parallel model runs on whole sequences: every CP rank samples the
/// unsplit model's tokens.
#[test]
fn generation_samples_the_unsplit_models_tokens() {
    let prompt = [3, 1, 4, 1, 5];
    for cfg in [gpt2(), llama()] {
        let want = world(1, |c| Ok(cfg.init::<B>(&c, &Default::default()).unwrap().generate(&prompt, 12, 0.8, 7).unwrap())).remove(0);
        let got = world(2, |c| {
            let gpt = cfg.init::<B>(&c.new_group("tp", &[c.global_rank()]).unwrap(), &Default::default()).unwrap();
            gpt.with_context_parallel(ContextParallel::new(c)).generate(&prompt, 12, 0.8, 7).map_err(|e| e.to_string())
        });
        assert_eq!(got, vec![want.clone(), want]);
    }
}
