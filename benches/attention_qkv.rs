//! Attention over a fused q/k/v projection: one op on `[b, s, 3·H·d]`
//! (`burn_parallel::attention::causal_attention_qkv`: q, k, v viewed in it, `dqkv` written by
//! one concatenation) against three tracked slices of it (each slice's backward fills a zero
//! `[b, s, 3·H·d]` gradient; the three are summed), forward + backward, in the same run.
//! `cargo bench --bench attention_qkv` (CPU: the chunked op) and with `--features wgpu` (also
//! the fused kernels on wgpu; on software Vulkan the numbers show only the pattern, not a GPU's).
//! On the CPU also the step's peak host memory above its input (the tracking allocator).

use std::time::Instant;

use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Distribution, Tensor};
use burn_parallel::attention::{causal_attention, causal_attention_chunked, causal_attention_qkv, AttentionBackend};
use burn_parallel::memory;

#[global_allocator]
static ALLOC: memory::TrackingAllocator = memory::TrackingAllocator;

/// `[b, s, heads, d]` of the timed shape.
const SHAPE: [usize; 4] = [4, 256, 4, 64];

/// Seconds per forward + backward of `attend` on a fresh `[b, s, 3·H·d]` leaf, and the peak
/// host bytes of one step above what was held before it (this thread's allocations).
fn time<B: AutodiffBackend + AttentionBackend>(attend: &dyn Fn(Tensor<B, 3>) -> Tensor<B, 3>) -> (f64, i64) {
    let [b, s, h, d] = SHAPE;
    let dev = Default::default();
    let qkv = Tensor::<B, 3>::random([b, s, 3 * h * d], Distribution::Normal(0.0, 1.0), &dev);
    let step = || {
        let x = qkv.clone().require_grad();
        let grads = attend(x.clone()).sum().backward();
        drop(x.grad(&grads));
    };
    step();
    B::sync(&dev).unwrap();
    memory::reset_peak(0);
    let base = memory::current(0);
    step();
    B::sync(&dev).unwrap();
    let peak = memory::peak(0) - base;
    let iters = std::env::var("ATTN_ITERS").ok().and_then(|s| s.parse().ok()).unwrap_or(10);
    let start = Instant::now();
    for _ in 0..iters {
        step();
    }
    B::sync(&dev).unwrap();
    (start.elapsed().as_secs_f64() / iters as f64, peak)
}

/// The slices' path: q, k, v sliced out per head group, the attention op, heads merged.
fn sliced<B: AttentionBackend>(qkv: Tensor<B, 3>, rows: Option<usize>) -> Tensor<B, 3> {
    let [b, s, h, d] = SHAPE;
    let grouped = qkv.reshape([b, s, h, 3, d]);
    let [q, k, v] = [0, 1, 2].map(|i| grouped.clone().slice([0..b, 0..s, 0..h, i..i + 1, 0..d]).reshape([b, s, h, d]).swap_dims(1, 2));
    let scale = 1.0 / (d as f32).sqrt();
    let o = match rows {
        Some(r) => causal_attention_chunked(q, k, v, scale, r),
        None => causal_attention(q, k, v, scale),
    };
    o.swap_dims(1, 2).reshape([b, s, h * d])
}

fn row<B: AutodiffBackend + AttentionBackend>(label: &str, rows: Option<usize>, host_peak: bool) {
    let [_, _, h, d] = SHAPE;
    let (slices, slices_peak) = time::<B>(&|x| sliced(x, rows));
    let (packed, packed_peak) = time::<B>(&|x| causal_attention_qkv(x, h, 1.0 / (d as f32).sqrt(), rows));
    let peaks = if host_peak { format!("{:.2} | {:.2}", slices_peak as f64 / 1e6, packed_peak as f64 / 1e6) } else { "- | -".into() };
    println!("| {label} | {:.2} | {:.2} | {:.3} | {peaks} |", slices * 1e3, packed * 1e3, packed / slices);
}

fn main() {
    println!("attention over a fused projection, [b, s, H, d] = {SHAPE:?}, forward + backward");
    println!("| backend, core | three slices ms | one op on qkv ms | ratio | slices peak MB | one op peak MB |\n|---|---|---|---|---|---|");
    memory::set_rank(Some(0));
    row::<Autodiff<Flex>>("Flex (CPU), chunked:64", Some(64), true);
    #[cfg(feature = "wgpu")]
    {
        row::<Autodiff<burn::backend::Wgpu>>("wgpu, fused", None, false);
        row::<Autodiff<burn::backend::Wgpu>>("wgpu, chunked:64", Some(64), false);
    }
}
