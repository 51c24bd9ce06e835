//! Chunked attention (`AttentionKernel::Chunked`: Burn ops on query chunks, no `s × s` tensor
//! kept) on the CPU backend: the GPT with it equals the composed GPT (logits and every gradient,
//! sliced per rank) at tp 1, 2 with SP and 4; training continued over dp × pp × tp layouts
//! gives the composed run's losses; recompute stays bit-exact with it; dropout is refused.

mod common;

use burn::tensor::{Int, Tensor, TensorData};
use burn_parallel::attention::{AttentionCore, AttentionKernel};
use burn_parallel::params::{named_grads, named_param_grads};
use burn_parallel::recompute::Recompute;
use burn_parallel_modules::GptConfig;
use common::runner::{self, gpt, layout, Layout, Plan};
use common::*;

fn ids(name: &str, [b, s]: [usize; 2]) -> TensorData {
    TensorData::new((0..b * s).map(|i| ((i * 7 + name.len() * 5) % 61) as i64).collect::<Vec<_>>(), [b, s])
}

/// Logits and every parameter gradient of one forward/backward at `cfg` (world of `c`).
fn outcome(cfg: &GptConfig, c: &burn_parallel::Comm, want: AttentionCore) -> Result<Outcome, String> {
    let dev = Default::default();
    let gpt = cfg.init::<B>(c, &dev).map_err(|e| e.to_string())?;
    assert!(gpt.blocks.iter().all(|b| b.attn.core == want), "attention resolved to {:?}, not {want:?}", gpt.blocks[0].attn.core);
    let shape = [3, cfg.max_seq_len];
    let (x, t) = (Tensor::<B, 2, Int>::from_data(ids("x", shape), &dev), Tensor::<B, 2, Int>::from_data(ids("target", shape), &dev));
    let logits = gpt.forward(x.clone());
    let grads = gpt.loss(x, t).backward();
    Ok(Outcome { output: logits.into_data(), input_grad: None, params: named_grads(&gpt, &grads) })
}

#[test]
fn gpt_with_chunked_attention_equals_the_composed_gpt() {
    let cfg = |kernel| GptConfig::new(64, 40, 64, 4, 2, 128).with_attention(kernel);
    let reference = world(1, |c| outcome(&cfg(AttentionKernel::Composed), &c, AttentionCore::Composed)).remove(0);
    // 40 positions: chunks of 16 (the last one short), of 7, and one chunk of all.
    for (t, sp, rows) in [(1, false, 16), (1, false, 40), (2, true, 7), (4, false, 16)] {
        let chunked = cfg(AttentionKernel::Chunked(rows)).with_sequence_parallel(sp);
        let ranks = world(t, |c| outcome(&chunked, &c, AttentionCore::Chunked(rows)));
        let n = assert_parity(&reference, &ranks, 1e-5);
        assert!(n > 20 * t, "tp {t}: compared only {n} tensors");
    }
}

#[test]
fn training_with_chunked_attention_matches_the_composed_run_over_layouts() {
    let plan = |l: Layout, kernel| Plan { layout: l, config: gpt(4, l.sp, 0.0).with_attention(kernel), load: None, steps: 4, save: None, async_save: false };
    let reference = runner::run(&plan(layout(1, 1, 1), AttentionKernel::Composed));
    let sp = |mut l: Layout| {
        l.sp = true;
        l
    };
    for l in [layout(1, 1, 1), layout(1, 2, 2), sp(layout(2, 1, 2)), layout(2, 2, 1)] {
        let losses = runner::run(&plan(l, AttentionKernel::Chunked(3)));
        for (step, (a, b)) in losses.iter().zip(&reference).enumerate() {
            assert!((a - b).abs() < 1e-5, "{l:?} step {step}: loss {a} with chunked attention, {b} composed");
        }
    }
}

/// Per rank: the loss's bits and every gradient's (path, bits).
type Bits = Vec<(u32, Vec<(String, Vec<u32>)>)>;

/// The loss and every gradient's bits of one forward/backward at tp (SP) with `mode`.
fn bits(tp: usize, sp: bool, mode: Recompute) -> Bits {
    world(tp, |c| {
        let dev = Default::default();
        let cfg = GptConfig::new(64, 24, 64, 4, 2, 128).with_attention(AttentionKernel::Chunked(5)).with_sequence_parallel(sp).with_recompute(mode);
        let gpt = cfg.init::<B>(&c, &dev).map_err(|e| e.to_string())?;
        let x = Tensor::<B, 2, Int>::from_data(ids("x", [2, 24]), &dev);
        let (loss, grads) = gpt.forward_backward(x, Tensor::from_data(ids("target", [2, 24]), &dev)).map_err(|e| e.to_string())?;
        let named = named_param_grads(&gpt, &grads)
            .into_iter()
            .map(|p| (p.path, p.grad.expect("a gradient").to_vec::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()))
            .collect();
        Ok((loss.to_bits(), named))
    })
}

#[test]
fn recompute_with_chunked_attention_gives_the_gradients_of_no_recompute_bit_for_bit() {
    for (tp, sp) in [(1, false), (2, true)] {
        let reference = bits(tp, sp, Recompute::None);
        for mode in [Recompute::Selective, Recompute::Full] {
            let got = bits(tp, sp, mode);
            assert_eq!(got, reference, "tp {tp} sp {sp}: {mode:?} differs from no recompute");
        }
    }
}

#[test]
fn chunked_attention_with_dropout_is_refused() {
    let cfg = GptConfig::new(64, 24, 64, 4, 2, 128).with_attention(AttentionKernel::Chunked(8)).with_dropout(0.1);
    let e = cfg.init::<B>(&world(1, Ok).remove(0), &Default::default()).unwrap_err().to_string();
    assert!(e.contains("chunked attention has no dropout: attention dropout is 0.1"), "{e}");
}
