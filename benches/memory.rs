//! Memory per rank, predicted (`burn_parallel::memory::estimate`) against measured (the tracking
//! allocator, thread ranks on CPU) over a grid of layouts; the reductions each lever gives
//! (measured); model-state bytes per parameter; step time of recompute and ZeRO against their
//! baselines in the same run; composed against chunked attention at s 1024 (peak and step time).
//! `cargo bench --bench memory` (BENCH_MEM_WIDE=1: width 256; BENCH_MEM_ATTENTION_ONLY=1: only
//! the attention table; BENCH_MEM_STATE_ONLY=1: only the bytes-per-parameter table).

#[path = "memory_harness.rs"]
#[allow(dead_code)]
mod harness;

use burn_parallel::memory::{GptShape, TrackingAllocator, TrainPlan};
use burn_parallel::precision::Precision;
use burn_parallel::recompute::Recompute;
use harness::{grid, plan, run, Case};

#[global_allocator]
static ALLOC: TrackingAllocator = TrackingAllocator;

fn shape() -> GptShape {
    if std::env::var("BENCH_MEM_WIDE").is_ok() {
        GptShape {
            vocab: 512,
            seq: 128,
            hidden: 256,
            heads: 8,
            layers: 4,
            ffn: 1024,
            tied_embeddings: false,
            activation: burn_parallel::activation::Activation::Gelu,
            arch: burn_parallel::arch::Arch::GPT2,
        }
    } else {
        GptShape {
            vocab: 256,
            seq: 64,
            hidden: 128,
            heads: 4,
            layers: 4,
            ffn: 512,
            tied_embeddings: false,
            activation: burn_parallel::activation::Activation::Gelu,
            arch: burn_parallel::arch::Arch::GPT2,
        }
    }
}

fn mb(x: f64) -> String {
    format!("{:.2}", x / 1e6)
}

fn main() {
    if std::env::var("BENCH_MEM_ATTENTION_ONLY").is_ok() {
        attention_cores();
        return;
    }
    if std::env::var("BENCH_MEM_STATE_ONLY").is_ok() {
        bytes_per_param();
        return;
    }
    let shape = shape();
    if std::env::var("BENCH_MEM_STEPS_ONLY").is_ok() {
        step_times(&shape);
        return;
    }
    println!("GPT {shape:?}, global batch 8; MB = 10^6 bytes\n");
    println!("| layout | pp rank | predicted peak | measured peak | predicted / measured |\n|---|---|---|---|---|");
    let mut worst = 0f64;
    let mut peaks = Vec::new();
    for Case { name, plan } in grid() {
        let est = burn_parallel::memory::estimate(&shape, &plan).expect("plan");
        let measured = run(&shape, &plan, 3);
        let mut seen = std::collections::BTreeMap::new();
        for m in &measured {
            seen.entry(m.pp_rank).or_insert(m.peak);
        }
        for (r, peak) in &seen {
            let ratio = est[*r].peak / *peak as f64;
            worst = worst.max((ratio - 1.0).abs());
            println!("| {name} | {r} | {} | {} | {ratio:.3} |", mb(est[*r].peak), mb(*peak as f64));
        }
        peaks.push((name, measured.iter().map(|m| m.peak).max().unwrap()));
    }
    println!("\nworst |predicted / measured − 1| over every rank: {worst:.3}\n");
    let base = peaks[0].1 as f64;
    println!("| layout | largest rank peak (measured) | vs tp 1 |\n|---|---|---|");
    for (name, p) in &peaks {
        println!("| {name} | {} | {:.2} |", mb(*p as f64), *p as f64 / base);
    }
    bytes_per_param();
    step_times(&shape);
    attention_cores();
}

/// Composed against chunked attention at a long sequence (s 1024, where the `s²` tensors
/// dominate): peak (predicted, measured) and step time, one rank, batch 2.
fn attention_cores() {
    use burn_parallel::attention::AttentionCore;
    let shape = GptShape {
        vocab: 256,
        seq: 1024,
        hidden: 128,
        heads: 4,
        layers: 2,
        ffn: 512,
        tied_embeddings: false,
        activation: burn_parallel::activation::Activation::Gelu,
        arch: burn_parallel::arch::Arch::GPT2,
    };
    println!(
        "\nGPT {shape:?}, batch 2\n\n| attention | predicted peak | measured peak | s/step | peak vs composed | time vs composed |\n|---|---|---|---|---|---|"
    );
    let mut base = None;
    for core in [AttentionCore::Composed, AttentionCore::Chunked(256), AttentionCore::Chunked(64)] {
        let p = burn_parallel::memory::TrainPlan { attention: core, ..plan(1, 1, 1, 2) };
        let est = burn_parallel::memory::estimate(&shape, &p).expect("plan")[0].peak;
        let m = run(&shape, &p, 5);
        let (peak, secs) = (m[0].peak as f64, m[0].step_secs);
        let (bp, bt) = *base.get_or_insert((peak, secs));
        println!("| {core:?} | {} | {} | {secs:.3} | {:.3} | {:.2} |", mb(est), mb(peak), peak / bp, secs / bt);
    }
}

/// Model state per parameter (`harness::state_per_param`), plus the f32 gradients (4 B) a step
/// holds, against Megatron's bf16 figures. On a wider model than the grid's (13.2M parameters),
/// so the runtime's fixed ~0.2 MB of bookkeeping is 0.02 B/param instead of 0.2.
fn bytes_per_param() {
    let shape = GptShape {
        vocab: 512,
        seq: 64,
        hidden: 512,
        heads: 8,
        layers: 4,
        ffn: 2048,
        tied_embeddings: false,
        activation: burn_parallel::activation::Activation::Gelu,
        arch: burn_parallel::arch::Arch::GPT2,
    };
    println!(
        "\nGPT {shape:?} ({:.1}M parameters), global batch 8\n\n| precision, optimizer | model state B/param, lowest rank (+ 4 B f32 gradients) | highest rank | target |\n|---|---|---|---|",
        burn_parallel::memory::model::parameter_count(&shape) / 1e6
    );
    for (name, dp, zero, prec, target) in [
        ("f32, plain", 1, false, Precision::F32, 16),
        ("bf16, plain", 1, false, Precision::Bf16, 18),
        ("bf16, ZeRO dp 2", 2, true, Precision::Bf16, 6 + 12 / 2),
        ("bf16, ZeRO dp 4", 4, true, Precision::Bf16, 6 + 12 / 4),
    ] {
        let (lo, hi) = harness::state_per_param(&shape, dp, zero, prec);
        println!("| {name} | {lo:.2} + 4 = {:.2} | {hi:.2} + 4 = {:.2} | ≤ {target} |", lo + 4.0, hi + 4.0);
    }
}

/// Seconds per step of each variant against its baseline: 5 rounds, each running every variant
/// once (2 warm-up steps, then 6 timed) in turn, so a slow spell of the machine falls on all of
/// them alike; each ratio is the median over the rounds of the round's ratio.
fn step_times(shape: &GptShape) {
    let rc = |r| TrainPlan { recompute: r, ..plan(1, 1, 1, 8) };
    let variants = [
        ("no recompute (baseline)", 0, plan(1, 1, 1, 8)),
        ("recompute selective", 0, rc(Recompute::Selective)),
        ("recompute full:N, N = half the blocks", 0, rc(Recompute::Blocks(shape.layers / 2))),
        ("recompute full", 0, rc(Recompute::Full)),
        ("dp 2 (baseline)", 4, plan(2, 1, 1, 8)),
        ("dp 2 ZeRO-1", 4, TrainPlan { zero: true, ..plan(2, 1, 1, 8) }),
    ];
    let rounds: Vec<Vec<f64>> =
        (0..5).map(|_| variants.iter().map(|(_, _, p)| run(shape, p, 8).iter().map(|m| m.step_secs).fold(0.0, f64::max)).collect()).collect();
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!("\n| variant | s/step (median of 5 rounds) | vs baseline (median of the rounds' ratios) |\n|---|---|---|");
    for (i, (name, base, _)) in variants.iter().enumerate() {
        let secs = median(rounds.iter().map(|r| r[i]).collect());
        let ratio = median(rounds.iter().map(|r| r[i] / r[*base]).collect());
        println!("| {name} | {secs:.3} | {ratio:.2} |");
    }
}
