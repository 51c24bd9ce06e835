//! `attention`: the flash-attention kernels on CUDA against the composed reference (computed on
//! the CPU from the same rounded inputs), f32 and bf16 (bf16 on tensor cores, and on
//! the FMA kernels with `set_tensor_cores(false)`), raw `CubeBackend` and `Fusion`, with whole
//! causal sequences and with queries at an offset against longer keys (context parallelism's
//! `causal_attention_at`); then fused vs
//! composed forward and forward+backward at GPT-2's shape (b 8, 12 heads, d 64) for T = 1024 and
//! 2048, bf16's fused kernels both ways (`benches/torch_attention.py` times PyTorch's SDPA at the
//! same shapes).

use burn::backend::{Autodiff, Cuda, Flex};
use burn::tensor::activation::softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData, TensorPrimitive};
use burn_parallel::attention::{causal_attention, causal_attention_chunked, set_tensor_cores, tensor_core_tiles, AttentionBackend};
use burn_parallel::rng::HostRng;

use crate::kernels::K;
use crate::Report;

/// `(q shape, keys, offset)`: whole causal sequences (keys = s, offset 0), then queries at an
/// offset against longer keys (off the tiles; keys past the last query; one query).
const SHAPES: &[([usize; 4], usize, usize)] = &[
    ([1, 1, 1, 64], 1, 0),
    ([2, 3, 37, 64], 37, 0),
    ([1, 2, 100, 128], 100, 0),
    ([1, 4, 257, 128], 257, 0),
    ([2, 2, 1000, 64], 1000, 0),
    ([1, 2, 130, 80], 130, 0),
    ([2, 3, 37, 64], 100, 50),
    ([1, 2, 256, 64], 1024, 768),
    ([1, 2, 256, 128], 1024, 256),
    ([2, 1, 1, 64], 64, 63),
];

/// Inputs rounded to `dtype`, as f32 host data: `q, dO` of `shape`, `k, v` with `keys` rows.
fn inputs(shape: [usize; 4], keys: usize, dtype: DType) -> [TensorData; 4] {
    let dev = Default::default();
    ["q", "k", "v", "do"].map(|name| {
        let shape = if name == "k" || name == "v" { [shape[0], shape[1], keys, shape[3]] } else { shape };
        let n = shape.iter().product::<usize>();
        let t = Tensor::<Flex, 1>::from_data(TensorData::new(HostRng::new(11, name).normal_vec(n, 1.0), [n]), &dev);
        TensorData::new(t.cast(dtype).cast(DType::F32).into_data().to_vec::<f32>().unwrap(), shape)
    })
}

/// `[o, lse, dq, dk, dv]` as f32 host data (the fused op, or the chunked one with `Some(rows)`),
/// queries at positions `offset..`.
fn apply<B: AttentionBackend>(inp: &[TensorData; 4], dtype: DType, rows: Option<usize>, offset: usize) -> [TensorData; 5] {
    let dev = Default::default();
    let scale = 1.0 / (inp[0].shape[3] as f32).sqrt();
    let t = |d: &TensorData| Tensor::<B, 4>::from_data(d.clone(), &dev).cast(dtype).into_primitive().tensor();
    let (q, k, v, dout) = (t(&inp[0]), t(&inp[1]), t(&inp[2]), t(&inp[3]));
    let (o, lse) = match rows {
        Some(r) => B::causal_attention_chunked_at(q.clone(), k.clone(), v.clone(), scale, r, offset),
        None => B::causal_attention_at(q.clone(), k.clone(), v.clone(), scale, offset),
    };
    let (dq, dk, dv) = match rows {
        Some(r) => B::causal_attention_chunked_backward_at(dout, q, k, v, o.clone(), lse.clone(), scale, r, offset),
        None => B::causal_attention_backward_at(dout, q, k, v, o.clone(), lse.clone(), scale, offset),
    };
    let w = |p| Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(p)).cast(DType::F32).into_data().convert::<f32>();
    let lse = Tensor::<B, 3>::from_primitive(TensorPrimitive::Float(lse)).into_data().convert::<f32>();
    [w(o), lse, w(dq), w(dk), w(dv)]
}

/// Max |a − b| relative to max |b| (NaN: infinite).
fn rel_err(a: &TensorData, b: &TensorData) -> f32 {
    let (a, b) = (a.to_vec::<f32>().unwrap(), b.to_vec::<f32>().unwrap());
    let scale = b.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
    a.iter().zip(&b).fold(0.0f32, |m, (x, y)| if (x - y).is_nan() { f32::INFINITY } else { m.max((x - y).abs()) }) / scale
}

fn check<B: AttentionBackend>(report: &mut Report, label: &str, rows: Option<usize>) {
    for &(shape, keys, offset) in SHAPES {
        for (dtype, tol) in [(DType::F32, 1e-4f32), (DType::BF16, 2e-2)] {
            let inp = inputs(shape, keys, dtype);
            let want = apply::<Flex>(&inp, DType::F32, None, offset);
            let got = apply::<B>(&inp, dtype, rows, offset);
            let errs: Vec<f32> = got.iter().zip(&want).map(|(g, w)| rel_err(g, w)).collect();
            let detail = format!("rel err o/lse/dq/dk/dv = {} (tol {tol})", errs.iter().map(|e| format!("{e:.1e}")).collect::<Vec<_>>().join("/"));
            let at = if keys == shape[2] { String::new() } else { format!(" at {offset} of {keys} keys") };
            report.check(&format!("attention {label} {shape:?}{at} {dtype:?}"), if errs.iter().all(|e| *e <= tol) { Ok(detail) } else { Err(detail) });
        }
    }
}

/// The composed attention through Burn's autodiff (what the layer runs without the kernels).
fn composed<B: Backend>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, scale: f32) -> Tensor<B, 4> {
    let s = q.dims()[2];
    let device = q.device();
    let dtype = q.dtype();
    let scores = q.matmul(k.swap_dims(2, 3)).mul_scalar(scale);
    let scores = scores.mask_fill(burn_parallel::attention::future_mask(0, s, s, &device), -1.0e4);
    softmax(scores.cast(DType::F32), 3).cast(dtype).matmul(v)
}

/// Milliseconds per call (3 warm-up calls, then `iters`, synchronised).
fn ms<F: FnMut()>(mut f: F, iters: usize) -> f64 {
    let dev = Default::default();
    for _ in 0..3 {
        f();
    }
    <Cuda as Backend>::sync(&dev).unwrap();
    let t = std::time::Instant::now();
    for _ in 0..iters {
        f();
    }
    <Cuda as Backend>::sync(&dev).unwrap();
    t.elapsed().as_secs_f64() * 1e3 / iters as f64
}

fn bench() {
    type A = Autodiff<Cuda>;
    println!("\n| attention (b 8, H 12, d 64, causal) | T | dtype | fused fwd ms | FMA fwd ms | fused fwd+bwd ms | FMA fwd+bwd ms | chunked:256 fwd+bwd ms | composed fwd+bwd ms | composed/fused | composed/chunked |\n|---|---|---|---|---|---|---|---|---|---|---|");
    let dev = Default::default();
    for t in [1024, 2048] {
        for dtype in [DType::BF16, DType::F32] {
            let shape = [8, 12, t, 64];
            let [q, k, v, g] = inputs(shape, t, DType::F32).map(|d| Tensor::<A, 4>::from_data(d, &dev).cast(dtype));
            let [q, k, v] = [q, k, v].map(|x| x.detach().require_grad());
            let scale = 0.125;
            let forward = || ms(|| drop(causal_attention(q.clone().detach(), k.clone().detach(), v.clone().detach(), scale)), 10);
            let step = |f: &dyn Fn() -> Tensor<A, 4>| {
                ms(
                    || {
                        let grads = (f() * g.clone()).sum().backward();
                        drop([&q, &k, &v].map(|x| x.grad(&grads)));
                    },
                    5,
                )
            };
            let (fwd, fused) = (forward(), step(&|| causal_attention(q.clone(), k.clone(), v.clone(), scale)));
            // The FMA kernels where bf16 ran on tensor cores (f32: the same kernels).
            set_tensor_cores(false);
            let (fma_fwd, fma) =
                if dtype == DType::F32 { (fwd, fused) } else { (forward(), step(&|| causal_attention(q.clone(), k.clone(), v.clone(), scale))) };
            set_tensor_cores(true);
            let chunked = step(&|| causal_attention_chunked(q.clone(), k.clone(), v.clone(), scale, 256));
            let comp = step(&|| composed(q.clone(), k.clone(), v.clone(), scale));
            println!(
                "| | {t} | {dtype:?} | {fwd:.3} | {fma_fwd:.3} | {fused:.3} | {fma:.3} | {chunked:.3} | {comp:.3} | {:.2} | {:.2} |",
                comp / fused,
                comp / chunked
            );
        }
    }
}

pub fn run(report: &mut Report, quick: bool) {
    let client = <burn_cubecl::cubecl::cuda::CudaRuntime as burn_cubecl::cubecl::Runtime>::client(&Default::default());
    for d in [64, 128] {
        let tiles = tensor_core_tiles(&client, DType::BF16, d);
        report.check(
            &format!("attention bf16 forward on tensor cores at d {d}"),
            tiles.map(|t| format!("{t:?}")).ok_or_else(|| "no bf16 cmma configuration found".to_string()),
        );
    }
    check::<K>(report, "cube", None);
    set_tensor_cores(false);
    check::<K>(report, "cube, FMA kernels", None);
    set_tensor_cores(true);
    check::<Cuda>(report, "fusion", None);
    check::<Cuda>(report, "chunked:64 fusion", Some(64));
    if !quick {
        bench();
    }
}
