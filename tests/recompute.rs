//! Activation recompute: full, selective and full for the first N blocks of each stage
//! (`full:N`) give bit for bit the loss and every parameter gradient of no recompute (f32,
//! dropout 0.1), for tp = 1, tp = 2, tp = 2 with SP, and pp = 2 (× tp = 2, 1F1B and
//! interleaved: per model chunk), and draw the same dropout masks (their counters end equal).

mod common;

use burn::tensor::{Int, Tensor, TensorData};
use burn_parallel::params::named_param_grads;
use burn_parallel::pipeline::{PipelineExecutor, PipelineOptions};
use burn_parallel::recompute::Recompute;
use burn_parallel::rng::RandomStreams;
use burn_parallel::{ParallelConfig, ProcessGroups};
use burn_parallel_modules::{GptConfig, GptPipeline, TokenBatch};
use burn_parallel_schedules::schedule_by_name;
use common::runner::samples;
use common::*;

fn config(sp: bool, mode: Recompute) -> GptConfig {
    GptConfig::new(32, 8, 16, 4, 4, 32).with_sequence_parallel(sp).with_dropout(0.1).with_recompute(mode)
}

thread_local! {
    /// Cross-entropy rows per chunk of the runs below (`None`: whole).
    static CHUNK: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// (rank, loss bits, every gradient's (path, bits), stream counts) of each rank.
type Run = Vec<(usize, u32, Vec<(String, Vec<u32>)>, Vec<u64>)>;

fn bits(d: &TensorData) -> Vec<u32> {
    d.to_vec::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()
}

/// Two training steps of the whole model at tp (SP) with `mode`; the second step's gradients.
fn flat(tp: usize, sp: bool, mode: Recompute) -> Run {
    flat_chunked(tp, sp, mode, None)
}

fn flat_chunked(tp: usize, sp: bool, mode: Recompute, chunk: Option<usize>) -> Run {
    world(tp, |c| {
        let gpt = config(sp, mode).with_loss_chunk(chunk).init::<B>(&c, &Default::default()).map_err(|e| e.to_string())?;
        let mut last = None;
        for step in 0..2u64 {
            let (x, y) = samples(step * 4..step * 4 + 4);
            let dev = Default::default();
            let (loss, grads) = gpt.forward_backward(Tensor::<B, 2, Int>::from_data(x, &dev), Tensor::from_data(y, &dev)).map_err(|e| e.to_string())?;
            last = Some((loss, grads));
        }
        let (loss, grads) = last.unwrap();
        let named = named_param_grads(&gpt, &grads).into_iter().map(|p| (p.path, bits(p.grad.as_ref().expect("every parameter has a gradient")))).collect();
        Ok((c.rank(), loss.to_bits(), named, gpt.random_streams().iter().map(|s| s.get()).collect()))
    })
}

#[test]
fn full_and_selective_recompute_give_the_gradients_of_no_recompute_bit_for_bit() {
    for (tp, sp) in [(1, false), (2, false), (2, true)] {
        let reference = flat(tp, sp, Recompute::None);
        assert!(reference[0].3.iter().any(|&n| n > 0), "dropout must draw masks");
        for mode in [Recompute::Full, Recompute::Selective, Recompute::Blocks(1), Recompute::Blocks(3), Recompute::Blocks(9)] {
            let got = flat(tp, sp, mode);
            for (r, g) in reference.iter().zip(&got) {
                assert_eq!(r.1, g.1, "tp {tp} sp {sp} {mode}: loss");
                assert_eq!(r.3, g.3, "tp {tp} sp {sp} {mode}: dropout stream counts");
                for ((pa, ga), (pb, gb)) in r.2.iter().zip(&g.2) {
                    assert_eq!(pa, pb);
                    assert!(ga == gb, "tp {tp} sp {sp} {mode}: gradient of {pa} differs");
                }
            }
        }
    }
}

fn piped(schedule: &str, v: usize, mode: Recompute) -> Run {
    piped_chunked(schedule, v, mode, None)
}

fn piped_chunked(schedule: &str, v: usize, mode: Recompute, chunk: Option<usize>) -> Run {
    world(4, move |c| {
        CHUNK.set(chunk);
        let groups = ProcessGroups::new(ParallelConfig::new().with_pipeline_parallel(2).with_tensor_parallel(2), c).map_err(|e| e.to_string())?;
        let opts = PipelineOptions { microbatches: 4, virtual_stages: v, layout: None };
        let model = GptPipeline { config: config(false, mode).with_loss_chunk(CHUNK.get()), tp: groups.tp.clone(), cp: None };
        let exec = PipelineExecutor::<B, _, 3>::new(model, schedule_by_name(schedule).unwrap().as_ref(), &opts, groups.pp.clone(), Default::default())
            .map_err(|e| e.to_string())?;
        let (x, y) = samples(0..8);
        let cut = |d: &TensorData, i| burn_parallel::comm::split_along(d, 0, 4, i).unwrap();
        let mbs: Vec<_> = (0..4).map(|i| TokenBatch { inputs: cut(&x, i), targets: cut(&y, i) }).collect();
        let out = exec.step(&mbs).map_err(|e| e.to_string())?;
        let mut named = Vec::new();
        let mut streams = Vec::new();
        for (s, g) in exec.stages().iter().zip(&out.grads) {
            named.extend(named_param_grads(&s.part, g).into_iter().map(|p| (global_path(&p.path, s.part.first_layer), bits(p.grad.as_ref().unwrap()))));
            streams.extend(s.part.random_streams().iter().map(|s| s.get()));
        }
        Ok((groups.world.global_rank(), out.loss.to_bits(), named, streams))
    })
}

#[test]
fn pipelined_recompute_gives_the_gradients_of_no_recompute_bit_for_bit() {
    for (schedule, v) in [("1f1b", 1), ("interleaved-1f1b", 2)] {
        let reference = piped(schedule, v, Recompute::None);
        for mode in [Recompute::Full, Recompute::Selective, Recompute::Blocks(1)] {
            let got = piped(schedule, v, mode);
            for (r, g) in reference.iter().zip(&got) {
                assert_eq!((r.0, r.1, &r.3), (g.0, g.1, &g.3), "{schedule} {mode}: rank, loss, streams");
                for ((pa, ga), (pb, gb)) in r.2.iter().zip(&g.2) {
                    assert!(pa == pb && ga == gb, "{schedule} {mode} rank {}: gradient of {pa} differs", r.0);
                }
            }
        }
    }
}

fn close(a: &Run, b: &Run, what: &str) {
    for (r, g) in a.iter().zip(b) {
        let (la, lb) = (f32::from_bits(r.1), f32::from_bits(g.1));
        assert!((la - lb).abs() <= 1e-6 * la.abs(), "{what}: loss {la} vs {lb}");
        assert_eq!(r.3, g.3, "{what}: dropout stream counts");
        for ((pa, ga), (pb, gb)) in r.2.iter().zip(&g.2) {
            assert_eq!(pa, pb);
            let d = ga.iter().zip(gb).map(|(x, y)| (f32::from_bits(*x) - f32::from_bits(*y)).abs()).fold(0f32, f32::max);
            assert!(d <= 1e-6, "{what}: gradient of {pa} differs by {d}");
        }
    }
}

#[test]
fn a_chunked_cross_entropy_gives_the_loss_and_gradients_of_the_whole_one() {
    // 4 × 8 = 32 token rows in chunks of 5 (the last one short), with and without recompute.
    for (tp, sp) in [(1, false), (2, true)] {
        let whole = flat(tp, sp, Recompute::None);
        for mode in [Recompute::None, Recompute::Full, Recompute::Selective, Recompute::Blocks(2)] {
            close(&whole, &flat_chunked(tp, sp, mode, Some(5)), &format!("tp {tp} sp {sp} {mode} chunked"));
        }
    }
    close(&piped("1f1b", 1, Recompute::None), &piped_chunked("1f1b", 1, Recompute::None, Some(3)), "pp 2 chunked");
}
