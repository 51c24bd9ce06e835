//! Benchmarks on the device: layer norm (fused vs composed) and NCCL collectives.

use std::time::Instant;

use burn::backend::Autodiff;
use burn::nn::LayerNormConfig;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Distribution, Tensor, TensorData};
use burn_parallel::backward_with;
use burn_parallel::comm::ops;
use burn_parallel::kernels::{
    layer_norm as fused, set_affine_staging, set_backward_cache, set_backward_lean, set_backward_prefetch, set_backward_rows, set_bounds_checks, set_variant,
    set_vector_cache, LayerNormBackend, LnKernel,
};
use burn_parallel::{Comm, NcclComm, ReduceOp};

use crate::kernels::K;

/// The benchmark shapes `[rows, hidden]` (ln-bench and ln-tune).
const SHAPES: [[usize; 2]; 4] = [[8192, 768], [8192, 1024], [16384, 4096], [4096, 8192]];

pub(crate) fn time<F: FnMut()>(f: F, iters: usize) -> f64 {
    time_on::<K, F>(f, iters)
}

pub(crate) fn time_on<B: Backend, F: FnMut()>(mut f: F, iters: usize) -> f64 {
    let dev = Default::default();
    for _ in 0..3 {
        f();
    }
    B::sync(&dev).unwrap();
    let start = Instant::now();
    for _ in 0..iters {
        f();
    }
    B::sync(&dev).unwrap();
    start.elapsed().as_secs_f64() / iters as f64
}

/// GPU-side seconds per call ("queue-ahead"): the calls are queued behind ≈ 8 ms of element-wise
/// work on `busy` (16 passes over 1 GiB), so the host's launch path (the per-call floor) overlaps that work and
/// the calls run back to back; per call = (work + calls − work alone) / iters, best of 3 each.
/// `None` if queuing the calls took longer than the work ahead of them (then nothing was hidden).
fn gpu_time<F: FnMut()>(mut f: F, iters: usize, busy: &Tensor<K, 1>) -> Option<f64> {
    let dev = Default::default();
    for _ in 0..3 {
        f();
    }
    let mut run = |calls: usize| {
        K::sync(&dev).unwrap();
        let start = Instant::now();
        let mut t = busy.clone();
        for _ in 0..16 {
            t = t.add_scalar(1.0);
        }
        for _ in 0..calls {
            f();
        }
        let queued = start.elapsed().as_secs_f64();
        K::sync(&dev).unwrap();
        (start.elapsed().as_secs_f64(), queued)
    };
    let (mut alone, mut with, mut queued) = (f64::INFINITY, f64::INFINITY, 0.0f64);
    for _ in 0..3 {
        alone = alone.min(run(0).0);
        let (total, q) = run(iters);
        with = with.min(total);
        queued = queued.max(q);
    }
    if queued >= 0.9 * alone {
        println!("  (queue-ahead: queuing took {:.2} ms, the work ahead {:.2} ms)", queued * 1e3, alone * 1e3);
    }
    (queued < 0.9 * alone).then_some((with - alone).max(0.0) / iters as f64)
}

/// Burn's composed layer norm (what `burn::nn::LayerNorm` computes), for any dtype.
fn composed<B: Backend>(x: Tensor<B, 2>, g: Tensor<B, 1>, b: Tensor<B, 1>) -> Tensor<B, 2> {
    let (var, mean) = x.clone().var_mean_bias(1);
    (x - mean) * var.add_scalar(1e-5).sqrt().recip() * g.unsqueeze() + b.unsqueeze()
}

/// A kernel configuration to time (the library's knobs; `Default` is the library default).
#[derive(Debug, Clone, Copy)]
pub struct Variant {
    /// The row kernels.
    pub kernel: LnKernel,
    /// v4's register cache (f32 values per unit; the forward's holds as many bytes).
    pub cache: usize,
    /// v4's backward rows per cube.
    pub rows: usize,
    /// CubeCL's bounds checks on v4 launches.
    pub checks: bool,
    /// v4's backward register cache (`None`: the library's rule).
    pub backward_cache: Option<usize>,
    /// v4's forward with γ/β staged in shared memory (experimental, off by default).
    pub stage: bool,
    /// v4's backward loading the next row group early (experimental, off by default).
    pub prefetch: bool,
    /// v4's backward with the lean row code: γ in registers, unrolled plane sums (experimental, off by default).
    pub lean: bool,
}

impl Default for Variant {
    fn default() -> Self {
        Self { kernel: LnKernel::Vectorized, cache: 16, rows: 64, checks: false, backward_cache: None, stage: false, prefetch: false, lean: false }
    }
}

impl Variant {
    fn apply(&self) {
        set_variant(self.kernel);
        set_vector_cache(self.cache);
        set_backward_rows(self.rows);
        set_bounds_checks(self.checks);
        set_backward_cache(self.backward_cache);
        set_affine_staging(self.stage);
        set_backward_prefetch(self.prefetch);
        set_backward_lean(self.lean);
    }
}

/// Fused (each of `variants`) vs
pub fn layer_norm(quick: bool, variants: &[Variant]) {
    let dev = Default::default();
    let iters = if quick { 10 } else { 50 };
    println!("\nvariants (µs each):");
    for v in variants {
        println!("  {v:?}");
    }
    println!("| shape | dtype | ours fwd µs | burn fwd µs | fwd GB/s | ours bwd µs | bwd GB/s | ours fwd+bwd(sum) µs | burn fwd+bwd(sum) µs | ours fwd+bwd(dy) µs | burn fwd+bwd(dy) µs | burn sum+bwd alone µs |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let busy = Tensor::<K, 1>::zeros([1 << 28], &dev);
    let mut gpu_side = Vec::new();
    for [n, h] in SHAPES {
        for dtype in [DType::F32, DType::BF16] {
            let (x, dy, g, b) = ln_inputs::<K>(n, h, dtype);
            let ours: Vec<[f64; 4]> = variants
                .iter()
                .map(|v| {
                    v.apply();
                    ours_times(&x, &dy, &g, &b, iters)
                })
                .collect();
            variants[0].apply();
            let copy = gpu_time(|| drop(x.clone().add_scalar(1.0)), 30, &busy);
            gpu_side.push(([n, h], dtype, gpu_times(&x, &dy, &g, &b, &busy), copy));
            Variant::default().apply();
            let theirs = if dtype == DType::F32 {
                let ln = LayerNormConfig::new(h).init::<K>(&dev);
                time(|| drop(ln.forward(x.clone())), iters)
            } else {
                time(|| drop(composed(x.clone(), g.clone(), b.clone())), iters)
            };
            let (xa, ga, ba) = autodiff_inputs(&x, &g, &b);
            let theirs_fb = time(|| drop(composed(xa.clone(), ga.clone(), ba.clone()).sum().backward()), iters);
            let theirs_fbd = time(|| drop(backward_with(composed(xa.clone(), ga.clone(), ba.clone()), dy.clone()).unwrap()), iters);
            // What `sum().backward()` itself costs in Burn (no layer norm): the difference
            // between the (sum) and (dy) columns.
            let sum_alone = time(|| drop(xa.clone().sum().backward()), iters);
            // Bytes: forward reads x, writes y; backward reads dy and x and writes dx (3 passes
            // over [n, h]; v1 reads dy and x twice, and is not credited).
            let bytes = (n * h * dtype.size()) as f64;
            let best = |i: usize| ours.iter().map(|o| o[i]).fold(f64::INFINITY, f64::min);
            let show = |i: usize| ours.iter().map(|o| format!("{:.1}", o[i] * 1e6)).collect::<Vec<_>>().join(" / ");
            println!(
                "| [{n}, {h}] | {dtype:?} | {} | {:.1} | {:.0} | {} | {:.0} | {} | {:.1} | {} | {:.1} | {:.1} |",
                show(0),
                theirs * 1e6,
                2.0 * bytes / best(0) / 1e9,
                show(1),
                3.0 * bytes / best(1) / 1e9,
                show(2),
                theirs_fb * 1e6,
                show(3),
                theirs_fbd * 1e6,
                sum_alone * 1e6,
            );
        }
    }
    println!("\nGPU-side µs per call (queue-ahead; the first variant): forward, backward; GB/s (2 and 3 passes);");
    println!("copy = Burn's element-wise op on the same tensor (reads and writes what the forward does)");
    println!("| shape | dtype | fwd µs | fwd GB/s | bwd µs | bwd GB/s | copy µs | copy GB/s | fwd % of copy |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for ([n, h], dtype, [fwd, bwd], copy) in gpu_side {
        let bytes = (n * h * dtype.size()) as f64;
        let show = |t: Option<f64>, passes: f64| {
            t.map_or(("host-bound".into(), "-".into()), |t| (format!("{:.1}", t * 1e6), format!("{:.0}", passes * bytes / t / 1e9)))
        };
        let ((f, fg), (b, bg), (c, cg)) = (show(fwd, 2.0), show(bwd, 3.0), show(copy, 2.0));
        let pct = fwd.zip(copy).map_or("-".into(), |(f, c)| format!("{:.0}%", 100.0 * c / f));
        println!("| [{n}, {h}] | {dtype:?} | {f} | {fg} | {b} | {bg} | {c} | {cg} | {pct} |");
    }
    drop(busy);
    fusion_table(iters);
    // The per-call floor (host launch path and allocations; the GPU work is negligible): calls
    // this short cannot show bandwidth.
    let (x, dy) = (Tensor::<K, 2>::ones([8, 1024], &dev), Tensor::<K, 2>::ones([8, 1024], &dev));
    let (g, b) = (Tensor::<K, 1>::ones([1024], &dev), Tensor::<K, 1>::zeros([1024], &dev));
    let [fwd, bwd, _, fbd] = ours_times(&x, &dy, &g, &b, iters);
    let add = time(|| drop(x.clone().add_scalar(1.0)), iters);
    println!(
        "\nper-call floor at [8, 1024] f32: forward {:.1} µs, backward {:.1} µs, fwd+bwd(dy) {:.1} µs; one element-wise op {:.1} µs",
        fwd * 1e6,
        bwd * 1e6,
        fbd * 1e6,
        add * 1e6
    );
    // Device-to-device copy bandwidth, the roofline for the GB/s columns.
    let x = Tensor::<K, 1>::zeros([1 << 28], &dev);
    let copy = time(|| drop(x.clone().add_scalar(1.0)), iters);
    println!("\nelement-wise read+write of 1 GiB f32: {:.0} GB/s", 2.0 * (1u64 << 30) as f64 / copy / 1e9);
}

/// GPU-side (queue-ahead) forward µs of each variant, and of Burn's element-wise op on the same
/// tensor (a same-size copy: the roofline at this size, launch ramp and tail included).
pub fn forward_tune(variants: &[Variant]) {
    tune_table(
        "forward",
        "copy",
        variants,
        |(x, _, g, b), busy| gpu_time(|| drop(fused(x.clone(), g.clone(), b.clone(), 1e-5)), 30, busy),
        |(x, ..), busy| gpu_time(|| drop(x.clone().add_scalar(1.0)), 30, busy),
    );
}

/// GPU-side (queue-ahead) backward-op µs of each variant, and of Burn's `dy + x` on the same
/// tensors (reads two, writes one: the backward's traffic, launch ramp and tail included).
pub fn backward_tune(variants: &[Variant]) {
    tune_table(
        "backward",
        "dy + x",
        variants,
        |(x, dy, g, b), busy| gpu_time(op_calls(x, dy, g, b).1, 30, busy),
        |(x, dy, ..), busy| gpu_time(|| drop(dy.clone().add(x.clone())), 30, busy),
    );
}

/// Benchmark inputs `(x, dy, γ, β)`.
type Inputs = (Tensor<K, 2>, Tensor<K, 2>, Tensor<K, 1>, Tensor<K, 1>);

/// One tuning table: per shape and dtype, `call`'s GPU-side time under each variant and the
/// `roof` op's (under the defaults), µs, and the best variant's % of the roof.
fn tune_table<C, R>(what: &str, roof_name: &str, variants: &[Variant], mut call: C, mut roof: R)
where
    C: FnMut(&Inputs, &Tensor<K, 1>) -> Option<f64>,
    R: FnMut(&Inputs, &Tensor<K, 1>) -> Option<f64>,
{
    let dev = Default::default();
    println!("\n{what} tuning, GPU-side µs per call (queue-ahead); variants:");
    for (i, v) in variants.iter().enumerate() {
        println!("  {i}: {v:?}");
    }
    let names: Vec<String> = (0..variants.len()).map(|i| format!("v{i} µs")).collect();
    println!("| shape | dtype | {} | {roof_name} µs | best % of {roof_name} |", names.join(" | "));
    println!("|---|---|{}---|---|", "---|".repeat(variants.len()));
    let busy = Tensor::<K, 1>::zeros([1 << 28], &dev);
    let us = |t: Option<f64>| t.map_or("host-bound".to_string(), |t| format!("{:.1}", t * 1e6));
    for [n, h] in SHAPES {
        for dtype in [DType::F32, DType::BF16] {
            let inputs = ln_inputs::<K>(n, h, dtype);
            let times: Vec<Option<f64>> = variants
                .iter()
                .map(|v| {
                    v.apply();
                    call(&inputs, &busy)
                })
                .collect();
            Variant::default().apply();
            let r = roof(&inputs, &busy);
            let best = times.iter().flatten().fold(f64::INFINITY, |m, t| m.min(*t));
            let pct = r.map_or("-".into(), |r| format!("{:.0}%", 100.0 * r / best));
            let shown: Vec<String> = times.into_iter().map(us).collect();
            println!("| [{n}, {h}] | {dtype:?} | {} | {} | {pct} |", shown.join(" | "), us(r));
        }
    }
}

/// A few forwards of each variant and same-shape copies at `[n, h]` (f32, bf16), synchronised
/// after each: the launches a profiler (`ncu`) inspects, nothing timed.
pub fn forward_profile(variants: &[Variant], [n, h]: [usize; 2]) {
    let dev = Default::default();
    for dtype in [DType::F32, DType::BF16] {
        let (x, _, g, b) = ln_inputs::<K>(n, h, dtype);
        for (i, v) in variants.iter().enumerate() {
            v.apply();
            for _ in 0..2 {
                drop(fused(x.clone(), g.clone(), b.clone(), 1e-5));
                K::sync(&dev).unwrap();
            }
            println!("profiled [{n}, {h}] {dtype:?} v{i}: {v:?}");
        }
        Variant::default().apply();
        drop(x.clone().add_scalar(1.0));
        K::sync(&dev).unwrap();
    }
}

/// Benchmark inputs `[n, h]` in `dtype`: `x` and `dy` ~ N(0, 1), `γ` = 1, `β` = 0.
fn ln_inputs<B: Backend>(n: usize, h: usize, dtype: DType) -> (Tensor<B, 2>, Tensor<B, 2>, Tensor<B, 1>, Tensor<B, 1>) {
    let dev = Default::default();
    let normal = || Tensor::<B, 2>::random([n, h], Distribution::Normal(0.0, 1.0), &dev).cast(dtype);
    (normal(), normal(), Tensor::<B, 1>::ones([h], &dev).cast(dtype), Tensor::<B, 1>::zeros([h], &dev).cast(dtype))
}

/// `x`, `γ`, `β` as tracked leaves of `Autodiff<B>`.
type Leaves<B> = (Tensor<Autodiff<B>, 2>, Tensor<Autodiff<B>, 1>, Tensor<Autodiff<B>, 1>);

fn autodiff_inputs<B: Backend>(x: &Tensor<B, 2>, g: &Tensor<B, 1>, b: &Tensor<B, 1>) -> Leaves<B> {
    let xa = Tensor::<Autodiff<B>, 2>::from_inner(x.clone()).require_grad();
    (xa, Tensor::<Autodiff<B>, 1>::from_inner(g.clone()).require_grad(), Tensor::<Autodiff<B>, 1>::from_inner(b.clone()).require_grad())
}

/// Through Fusion (`burn::backend::Cuda`, Burn's default CUDA backend; our kernels run as lazy
/// ops of its stream): forward, forward + autodiff backward of `sum()` and of a dense `dy`, ours
/// and Burn's composed ops, µs per call, host-timed like the first table (does Fusion change
/// what `sum()`'s backward costs?).
fn fusion_table(iters: usize) {
    type C = burn::backend::Cuda;
    println!("\nthrough Fusion (burn::backend::Cuda), µs per call (host-timed):");
    println!("| shape | dtype | ours fwd | ours fwd+bwd(sum) | ours fwd+bwd(dy) | burn fwd | burn fwd+bwd(sum) | burn fwd+bwd(dy) | burn sum+bwd alone |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for [n, h] in SHAPES {
        for dtype in [DType::F32, DType::BF16] {
            let (x, dy, g, b) = ln_inputs::<C>(n, h, dtype);
            let (xa, ga, ba) = autodiff_inputs(&x, &g, &b);
            let t = |f: &mut dyn FnMut()| time_on::<C, _>(f, iters) * 1e6;
            let row = [
                t(&mut || drop(fused(x.clone(), g.clone(), b.clone(), 1e-5))),
                t(&mut || drop(fused(xa.clone(), ga.clone(), ba.clone(), 1e-5).sum().backward())),
                t(&mut || drop(backward_with(fused(xa.clone(), ga.clone(), ba.clone(), 1e-5), dy.clone()).unwrap())),
                t(&mut || drop(composed(x.clone(), g.clone(), b.clone()))),
                t(&mut || drop(composed(xa.clone(), ga.clone(), ba.clone()).sum().backward())),
                t(&mut || drop(backward_with(composed(xa.clone(), ga.clone(), ba.clone()), dy.clone()).unwrap())),
                t(&mut || drop(xa.clone().sum().backward())),
            ];
            println!("| [{n}, {h}] | {dtype:?} | {} |", row.map(|v| format!("{v:.1}")).join(" | "));
        }
    }
}

/// Our layer norm under the selected variant: `[forward, backward op alone, forward + autodiff
/// backward of sum, forward + autodiff backward of dy]`, seconds per call.
fn ours_times(x: &Tensor<K, 2>, dy: &Tensor<K, 2>, g: &Tensor<K, 1>, b: &Tensor<K, 1>, iters: usize) -> [f64; 4] {
    let (fwd_call, bwd_call) = op_calls(x, dy, g, b);
    let (fwd, bwd) = (time(fwd_call, iters), time(bwd_call, iters));
    let (xa, ga, ba) = autodiff_inputs(x, g, b);
    let fb = time(|| drop(fused(xa.clone(), ga.clone(), ba.clone(), 1e-5).sum().backward()), iters);
    let fbd = time(|| drop(backward_with(fused(xa.clone(), ga.clone(), ba.clone(), 1e-5), dy.clone()).unwrap()), iters);
    [fwd, bwd, fb, fbd]
}

/// GPU-side (queue-ahead) `[forward, backward op]` seconds per call under the selected variant.
fn gpu_times(x: &Tensor<K, 2>, dy: &Tensor<K, 2>, g: &Tensor<K, 1>, b: &Tensor<K, 1>, busy: &Tensor<K, 1>) -> [Option<f64>; 2] {
    let (fwd_call, bwd_call) = op_calls(x, dy, g, b);
    [gpu_time(fwd_call, 30, busy), gpu_time(bwd_call, 30, busy)]
}

/// One call of our forward, and one of the backward op alone on `dy` (μ, r from one forward).
fn op_calls<'a>(x: &'a Tensor<K, 2>, dy: &'a Tensor<K, 2>, g: &'a Tensor<K, 1>, b: &'a Tensor<K, 1>) -> (impl FnMut() + 'a, impl FnMut() + 'a) {
    let p2 = |t: &Tensor<K, 2>| t.clone().into_primitive().tensor();
    let p1 = |t: &Tensor<K, 1>| t.clone().into_primitive().tensor();
    let (_, mean, rstd) = K::layer_norm_rows(p2(x), p1(g), p1(b), 1e-5);
    let fwd = move || drop(fused(x.clone(), g.clone(), b.clone(), 1e-5));
    let bwd = move || drop(K::layer_norm_rows_backward(p2(dy), p2(x), p1(g), mean.clone(), rstd.clone()));
    (fwd, bwd)
}

/// Bus bandwidth `bytes / t × factor` (factor 2(n−1)/n for all-reduce, (n−1)/n otherwise; 0 at
/// world 1, so algorithm bandwidth `bytes / t` is shown as well).
pub fn collectives(quick: bool) -> Result<(), String> {
    let nccl: Comm = crate::nccl::world1().map_err(|e| e.to_string())?;
    let raw = nccl.as_any().downcast_ref::<NcclComm>().ok_or("not NCCL")?;
    let dev = Default::default();
    let sizes_mb: &[usize] = if quick { &[1, 64] } else { &[1, 4, 16, 64, 256, 1024] };
    println!("\nNCCL, world size 1 (overhead only: no data crosses a link; bus bandwidth is 0 by definition)");
    println!("| op | MB | raw NCCL µs | tensor path µs | tensor path, owned input µs | host-staged µs | tensor algbw GB/s |");
    println!("|---|---|---|---|---|---|---|");
    for &mb in sizes_mb {
        let n = mb * (1 << 20) / 4;
        let x = Tensor::<K, 1>::random([n], Distribution::Default, &dev);
        K::sync(&dev).map_err(|e| format!("{e:?}"))?; // x written before raw NCCL reads it
        let iters = if mb >= 256 { 5 } else { 20 };
        let x_ptr = {
            let prim = x.clone().into_primitive().tensor();
            prim.client.get_resource(prim.handle.clone()).map_err(|e| format!("{e:?}"))?.resource().ptr
        };
        for op in ["all_reduce", "all_gather", "reduce_scatter"] {
            // SAFETY: x stays alive for the loop; in-place on a buffer nobody reads concurrently.
            let raw_t = time(
                || unsafe {
                    match op {
                        "all_reduce" => raw.all_reduce_raw(x_ptr, x_ptr, n, DType::F32, ReduceOp::Sum),
                        "all_gather" => raw.all_gather_raw(x_ptr, x_ptr, n, DType::F32),
                        _ => raw.reduce_scatter_raw(x_ptr, x_ptr, n, DType::F32, ReduceOp::Sum),
                    }
                    .unwrap()
                },
                iters,
            );
            let tensor_t = time(
                || {
                    drop(
                        match op {
                            "all_reduce" => ops::all_reduce(x.clone(), ReduceOp::Sum, &nccl),
                            "all_gather" => ops::all_gather(x.clone(), 0, &nccl),
                            _ => ops::reduce_scatter(x.clone(), 0, ReduceOp::Sum, &nccl),
                        }
                        .unwrap(),
                    )
                },
                iters,
            );
            // all_reduce of a buffer the caller owns alone (a gradient bucket): in place.
            let unique_t = if op == "all_reduce" {
                let mut y = Some(x.clone().mul_scalar(1.0));
                let t = time(|| y = Some(ops::all_reduce(y.take().expect("y"), ReduceOp::Sum, &nccl).unwrap()), iters);
                format!("{:.1}", t * 1e6)
            } else {
                "-".into()
            };
            let host_t = if mb <= 64 {
                let d: TensorData = x.clone().into_data();
                let t = time(
                    || {
                        drop(
                            match op {
                                "all_reduce" => nccl.all_reduce(d.clone(), ReduceOp::Sum),
                                "all_gather" => nccl.all_gather(d.clone(), 0),
                                _ => nccl.reduce_scatter(d.clone(), 0, ReduceOp::Sum),
                            }
                            .unwrap(),
                        )
                    },
                    iters.min(5),
                );
                format!("{:.0}", t * 1e6)
            } else {
                "-".into()
            };
            println!("| {op} | {mb} | {:.1} | {:.1} | {unique_t} | {host_t} | {:.0} |", raw_t * 1e6, tensor_t * 1e6, (mb << 20) as f64 / tensor_t / 1e9);
        }
    }
    Ok(())
}
