//! Every check and benchmark that needs the GPU machine, in one binary (feature `cuda`):
//!
//! ```text
//! device_check [all | kernels nccl ln-bench nccl-bench ...] [ln-tune] [ln-profile] [--quick]
//! ```
//! - `kernels`: the fused layer-norm kernels on CUDA (f32, bf16) against the composed reference
//!   (computed on the CPU from the same rounded inputs), many shapes; `Fusion` == `CubeBackend`.
//! - `nccl`: NCCL with world size 1: every collective, grouped send/recv to self, sub-groups and a
//!   p2p mismatch, on host data and on CUDA tensors (device pointers), f32/bf16/f16, against the
//!   local backend; the differentiable mappings on `Autodiff<Cuda>` through NCCL.
//! - `ln-bench`: fused vs composed layer norm, forward, backward and forward+backward, µs and GB/s;
//!   GPU-side times against a same-shape element-wise op (a copy of the same bytes).
//! - `ln-tune` (only when named): GPU-side forward of `v4` with γ/β staged in shared memory
//!   (interleaved with the default, twice each) and other register caches, against the same-shape
//!   copy; GPU-side backward op with the next row group prefetched and/or γ in registers, against
//!   `dy + x` (the backward's traffic).
//! - `ln-profile` (only when named): a few forwards of the default and the staged `v4` and a copy at
//!   [8192, 1024], for `ncu` (nothing timed).
//! - `attention`: the flash-attention kernels against the composed reference (f32, bf16, raw and
//!   under `Fusion`), then fused vs composed forward(+backward) at GPT-2's shape, T 1024 and 2048.
//! - `llama`: a Llama-style GPT (RMS norms, RoPE, SwiGLU, grouped-query attention) on CUDA
//!   (fused attention kernels, bf16 too) against the CPU: loss and every gradient.
//! - `burn-nn-gpt2` (only when named): plain Burn's GPT-2 124M (burn-nn layers, AdamW) tokens/s
//!   in bf16 and f32, the baseline of the GPT-2 benchmark.
//! - `memory` (only when named): the memory model against CUDA's bytes in use (one rank; f32,
//!   bf16, recompute, chunked loss), after a forward and after a step.
//! - `nccl-bench`: all-reduce / all-gather / reduce-scatter from 1 MB to 1 GB (world 1: overhead
//!   only), device path vs raw NCCL vs host-staged.
//!
//! Prints PASS/FAIL lines and markdown tables; exits 1 if any check failed.

#[cfg(feature = "cuda")]
mod attention;
#[cfg(feature = "cuda")]
mod bench;
#[cfg(feature = "cuda")]
mod kernels;
#[cfg(feature = "cuda")]
mod llama;
#[cfg(feature = "cuda")]
mod memory;
#[cfg(feature = "cuda")]
mod nccl;
#[cfg(feature = "cuda")]
mod nn_gpt;

#[cfg(not(feature = "cuda"))]
fn main() {
    eprintln!("device_check needs --features cuda (build with CUDARC_CUDA_VERSION=13000)");
    std::process::exit(2);
}

/// Counts failures; prints one line per check.
#[cfg(feature = "cuda")]
#[derive(Default)]
pub struct Report {
    failed: Vec<String>,
    passed: usize,
}

#[cfg(feature = "cuda")]
impl Report {
    /// Records a check.
    pub fn check(&mut self, name: &str, r: Result<String, String>) {
        match r {
            Ok(detail) => {
                self.passed += 1;
                println!("PASS {name} {detail}");
            }
            Err(e) => {
                println!("FAIL {name}: {e}");
                self.failed.push(name.to_string());
            }
        }
    }
}

#[cfg(feature = "cuda")]
use burn_parallel::kernels::LnKernel;

#[cfg(feature = "cuda")]
fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let whats: Vec<&str> = args.iter().filter(|a| !a.starts_with("--")).map(String::as_str).collect();
    let on = |k: &str| whats.is_empty() || whats.contains(&"all") || whats.contains(&k);
    let quick = args.iter().any(|a| a == "--quick");
    if let Err(e) = burn_parallel::cuda::check_cuda() {
        eprintln!("device_check: {e}");
        std::process::exit(2);
    }
    let dir = burn_parallel::cuda::enable_kernel_caches(None);
    println!("kernel caches: {}", dir.display());
    let mut report = Report::default();
    let t0 = std::time::Instant::now();
    let variants = [LnKernel::Strided, LnKernel::Vectorized];
    if on("kernels") {
        kernels::run(&mut report, quick, &variants);
    }
    if on("nccl") {
        nccl::run(&mut report);
    }
    if on("attention") {
        attention::run(&mut report, quick);
    }
    if on("llama") {
        llama::run(&mut report);
    }
    // v4 as the library runs it (register cache 16, no bounds checks, one-pass backward with 64
    // rows per cube and its cache halved for wide rows), and with the backward's cache at 16.
    let v4 = bench::Variant::default();
    if on("ln-bench") {
        bench::layer_norm(quick, &[v4, bench::Variant { backward_cache: Some(16), ..v4 }]);
    }
    // v4's forward with γ/β staged in shared memory (the experimental knob; h ≤ 1024 only, the
    // default elsewhere) and, as an A/A control of the timing noise, the default again; then
    // register caches of 8 and 32 f32 values per unit (the row over twice or half the units at
    // h ≥ 2048; h ≤ 1024 stays in one plane); `ln-profile` launches the default and the staged
    // forward at [8192, 1024] for a profiler (`ncu ... device_check ln-profile`).
    let staged = bench::Variant { stage: true, ..v4 };
    let caches = [v4, staged, v4, staged, bench::Variant { cache: 8, ..v4 }, bench::Variant { cache: 32, ..v4 }];
    // v4's backward loading the next row group early, with the lean row code (γ in registers,
    // unrolled plane sums), both (the experimental knobs); 16 rows per cube (more cubes in
    // flight, more partials: the default 64 was chosen at [16384, 4096]) alone and with both
    // knobs; the default again as an A/A control.
    let (pre, lean) = (bench::Variant { prefetch: true, ..v4 }, bench::Variant { lean: true, ..v4 });
    let both = bench::Variant { prefetch: true, lean: true, ..v4 };
    let backward = [v4, pre, lean, both, bench::Variant { rows: 16, ..v4 }, bench::Variant { rows: 16, ..both }, v4];
    if whats.contains(&"ln-tune") {
        bench::forward_tune(&caches);
        bench::backward_tune(&backward);
    }
    if whats.contains(&"ln-profile") {
        bench::forward_profile(&[v4, staged], [8192, 1024]);
    }
    if whats.contains(&"memory") {
        memory::run(&mut report);
    }
    if whats.contains(&"burn-nn-gpt2") {
        nn_gpt::run(&mut report);
    }
    if on("nccl-bench") {
        if let Err(e) = bench::collectives(quick) {
            report.check("nccl-bench", Err(e));
        }
    }
    println!("\n{} passed, {} failed ({:.0} s): {:?}", report.passed, report.failed.len(), t0.elapsed().as_secs_f64(), report.failed);
    std::process::exit(i32::from(!report.failed.is_empty()));
}
