//! The flash-attention kernels (forward `o` and `lse`, backward `dq, dk, dv`) against the composed
//! reference on `Flex`, over head widths 8–128 (register blocks of 1 × 1 to 4 × 4 per unit) and
//! sequence lengths that are not multiples of the tiles, with strided (`[b, s, H, d]` viewed as
//! `[b, H, s, d]`) inputs, on the raw Cube backend and under `Fusion`, with and without CubeCL's
//! bounds checks. Also the chunked op (Burn ops) on wgpu, and the GPT with fused attention in f32
//! and in f16 (the half-precision code of a bf16 GPU run; lavapipe has no bf16) against `Flex`.
//! Runs with `--features wgpu` (CI: lavapipe); CUDA in the device binary
//! (`device_check attention`).
#![cfg(feature = "wgpu")]

mod common;

use burn::backend::{Autodiff, Flex, Wgpu};
use burn::tensor::{DType, Tensor, TensorData, TensorPrimitive};
use burn_parallel::attention::{tensor_core_tiles, AttentionBackend};
use burn_parallel::kernels::set_bounds_checks;
use burn_parallel::rng::HostRng;

type K = burn_cubecl::CubeBackend<burn::backend::wgpu::WgpuRuntime, f32, i32, u32>;

/// `[b, s, H, d]` data (as the attention layer's projections lay it out).
fn data(name: &str, [b, h, s, d]: [usize; 4]) -> TensorData {
    TensorData::new(HostRng::new(5, name).normal_vec(b * h * s * d, 1.0), [b, s, h, d])
}

/// `[o, lse, dq, dk, dv]` of the backend's attention op for the output gradient `do`.
fn run<B: AttentionBackend>(shape: [usize; 4], strided: bool) -> [TensorData; 5] {
    run_with::<B>(shape, strided, None)
}

/// The same through the chunked op with `Some(rows)`.
fn run_with<B: AttentionBackend>(shape: [usize; 4], strided: bool, rows: Option<usize>) -> [TensorData; 5] {
    run_at::<B>(shape, shape[2], 0, strided, rows)
}

/// The same for queries at positions `offset..offset + s` (`shape`'s `s`) against `sk` keys and
/// values (context parallelism): `dk`, `dv` are `sk` long.
fn run_at<B: AttentionBackend>(shape: [usize; 4], sk: usize, offset: usize, strided: bool, rows: Option<usize>) -> [TensorData; 5] {
    let dev = Default::default();
    let [b, h, _, d] = shape;
    let scale = 1.0 / (d as f32).sqrt();
    let t = |name: &str, shape: [usize; 4]| {
        let x = Tensor::<B, 4>::from_data(data(name, shape), &dev).swap_dims(1, 2);
        let x = if strided { x } else { Tensor::from_data(x.into_data(), &dev) };
        x.into_primitive().tensor()
    };
    let (q, dout) = (t("q", shape), t("do", shape));
    let (k, v) = (t("k", [b, h, sk, d]), t("v", [b, h, sk, d]));
    // Freed NaN buffers first: a write the kernels skipped shows as NaN.
    let poison = [(); 4].map(|_| Tensor::<B, 4>::full([b, h, sk.max(shape[2]), d], f32::NAN, &dev));
    B::sync(&dev).expect("sync");
    drop(poison);
    let (o, lse) = match rows {
        Some(r) => B::causal_attention_chunked_at(q.clone(), k.clone(), v.clone(), scale, r, offset),
        None => B::causal_attention_at(q.clone(), k.clone(), v.clone(), scale, offset),
    };
    let (dq, dk, dv) = match rows {
        Some(r) => B::causal_attention_chunked_backward_at(dout, q, k, v, o.clone(), lse.clone(), scale, r, offset),
        None => B::causal_attention_backward_at(dout, q, k, v, o.clone(), lse.clone(), scale, offset),
    };
    let w4 = |p| Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(p)).into_data().convert::<f32>();
    let lse = Tensor::<B, 3>::from_primitive(TensorPrimitive::Float(lse)).into_data().convert::<f32>();
    [w4(o), lse, w4(dq), w4(dk), w4(dv)]
}

fn max_rel(a: &TensorData, b: &TensorData) -> f32 {
    assert_eq!(a.shape, b.shape);
    let (x, y) = (a.to_vec::<f32>().unwrap(), b.to_vec::<f32>().unwrap());
    x.iter().zip(&y).map(|(p, q)| (p - q).abs() / (1.0 + q.abs())).map(|e| if e.is_nan() { f32::INFINITY } else { e }).fold(0.0, f32::max)
}

/// Head widths 8–128: on lavapipe's 32 KiB, d 8 runs 4 × 4 blocks per unit in 64 × 32 tiles
/// (what d 64 runs on a GPU), d 16–64 2 × 2 or 1 × 1, d 48 three head columns per unit, d 33 one
/// unit per row; sequence lengths below, at and past several tiles.
const SHAPES: [[usize; 4]; 8] =
    [[1, 1, 1, 64], [2, 3, 37, 64], [1, 2, 100, 128], [1, 1, 70, 48], [2, 1, 33, 16], [1, 2, 129, 32], [2, 2, 150, 8], [1, 1, 40, 33]];

fn check<B: AttentionBackend>(label: &str, strided: bool) {
    for shape in SHAPES {
        let want = run::<Flex>(shape, false);
        let got = run::<B>(shape, strided);
        for (name, (g, w)) in ["o", "lse", "dq", "dk", "dv"].iter().zip(got.iter().zip(&want)) {
            let e = max_rel(g, w);
            assert!(e < 2e-5, "{label} {shape:?} strided {strided}: {name} differs by {e} (relative)");
        }
    }
}

#[test]
fn fused_attention_matches_the_composed_reference() {
    let dev = Default::default();
    for d in [8, 16, 32, 33, 48, 64, 128] {
        K::fused_attention(&dev, d).unwrap_or_else(|e| panic!("lavapipe, d {d}: {e}"));
    }
    check::<K>("cube", true);
    check::<K>("cube", false);
    check::<Wgpu>("fusion", true);
    set_bounds_checks(true);
    check::<K>("cube, bounds checks", true);
    set_bounds_checks(false);
}

/// `(q shape, keys, offset)`: queries at an offset against a longer key sequence (a context-
/// parallel rank's chunk against the gathered keys); offsets and lengths off the tiles, the last
/// key at the last query's position, keys past it (their gradient rows: zero), keys from 0 with
/// offset 0, one query, d 8 (4 × 4 blocks), 33 (one unit per row) and 128.
const OFFSETS: [([usize; 4], usize, usize); 7] = [
    ([2, 3, 37, 64], 100, 50),
    ([1, 2, 33, 64], 70, 37),
    ([1, 1, 16, 32], 129, 0),
    ([2, 1, 1, 64], 64, 63),
    ([2, 2, 50, 8], 150, 100),
    ([1, 1, 20, 33], 45, 13),
    ([1, 2, 40, 128], 90, 41),
];

/// The kernels with queries at an offset (context parallelism) equal the chunked Burn ops on
/// `Flex` (`causal_attention_chunked_at`'s reference, checked against the whole attention in
/// the library's unit tests): `o`, `lse`, `dq`, `dk`, `dv`, on the raw Cube backend (strided and
/// contiguous inputs, with bounds checks) and under `Fusion`.
#[test]
fn fused_attention_at_an_offset_matches_the_reference() {
    for (shape, sk, offset) in OFFSETS {
        let want = run_at::<Flex>(shape, sk, offset, false, None);
        // The reference itself: key rows past the last query's position get no gradient, the
        // rows before do.
        let (d, last) = (shape[3], offset + shape[2]);
        let dk = want[3].to_vec::<f32>().unwrap();
        let row_norm = |j: usize| (0..d).map(|x| dk[j * d + x].abs()).sum::<f32>();
        assert!((last..sk).all(|j| row_norm(j) == 0.0) && row_norm(last - 1) > 0.0, "reference dk at {shape:?} {sk} {offset}");
        set_bounds_checks(true);
        let checked = run_at::<K>(shape, sk, offset, true, None);
        set_bounds_checks(false);
        let runs = [("cube", run_at::<K>(shape, sk, offset, true, None)), ("cube, contiguous", run_at::<K>(shape, sk, offset, false, None))];
        for (label, got) in runs.into_iter().chain([("cube, bounds checks", checked), ("fusion", run_at::<Wgpu>(shape, sk, offset, true, None))]) {
            for (name, (g, w)) in ["o", "lse", "dq", "dk", "dv"].iter().zip(got.iter().zip(&want)) {
                let e = max_rel(g, w);
                assert!(e < 2e-5, "{label} q {shape:?} at {offset} against {sk} keys: {name} differs by {e} (relative)");
            }
        }
    }
}

/// The public op under autodiff: `causal_attention_at` on wgpu equals it on `Flex` in the
/// output and in the gradients of `q`, `k`, `v`; keys shorter than the queries' end are refused.
#[test]
fn causal_attention_at_under_autodiff_on_wgpu_equals_the_cpu() {
    use burn_parallel::attention::causal_attention_at;
    fn grads<B: burn::tensor::backend::AutodiffBackend + AttentionBackend>() -> [TensorData; 4] {
        let dev = Default::default();
        let t = |name: &str, s: usize| Tensor::<B, 4>::from_data(data(name, [2, 2, s, 16]), &dev).swap_dims(1, 2).require_grad();
        let (q, k, v) = (t("q", 24), t("k", 60), t("v", 60));
        let up = Tensor::<B, 4>::from_data(data("up", [2, 2, 24, 16]), &dev).swap_dims(1, 2);
        let o = causal_attention_at(q.clone(), k.clone(), v.clone(), 0.25, 30);
        let g = (o.clone() * up).sum().backward();
        let grad = |x: &Tensor<B, 4>| x.grad(&g).expect("tracked").into_data();
        [o.into_data(), grad(&q), grad(&k), grad(&v)]
    }
    let want = grads::<Autodiff<Flex>>();
    for (label, got) in [("cube", grads::<Autodiff<K>>()), ("fusion", grads::<Autodiff<Wgpu>>())] {
        for (name, (g, w)) in ["o", "dq", "dk", "dv"].iter().zip(got.iter().zip(&want)) {
            let e = max_rel(g, w);
            assert!(e < 2e-5, "{label}: {name} differs by {e} (relative)");
        }
    }
    let dev = Default::default();
    let x = |s: usize| Tensor::<Autodiff<Wgpu>, 4>::zeros([1, 1, s, 8], &dev);
    let e = std::panic::catch_unwind(|| causal_attention_at(x(8), x(20), x(20), 1.0, 13)).unwrap_err();
    let msg = e.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(msg.contains("at 13 against k [1, 1, 20, 8]"), "{msg}");
}

#[test]
fn heads_too_wide_are_refused_with_the_numbers() {
    let e = K::fused_attention(&Default::default(), 512).unwrap_err();
    assert!(e.contains("width 1..=256, not 512"), "{e}");
    // The words for logs: the same refusal, through autodiff and fusion too.
    let e = Autodiff::<Wgpu>::fused_attention_kernels(&Default::default(), DType::F32, 512);
    assert!(e.contains("width 1..=256, not 512"), "{e}");
}

/// What the log says runs: the FMA kernels for f32, and for f16 the tensor cores where the
/// device has f16 cooperative matrices (Mesa ≥ 26's lavapipe under SPIR-V), else the FMA kernels
/// saying why; on the CPU backend, that it has no fused kernels.
#[test]
fn the_attention_kernels_that_run_are_named() {
    let dev = Default::default();
    let f32_words = Autodiff::<Wgpu>::fused_attention_kernels(&dev, DType::F32, 64);
    assert_eq!(f32_words, "FMA kernels (F32 inputs: tensor cores take f16/bf16)");
    let client = <burn::backend::wgpu::WgpuRuntime as burn_cubecl::cubecl::Runtime>::client(&dev);
    let f16_words = <Wgpu>::fused_attention_kernels(&dev, DType::F16, 64);
    match tensor_core_tiles(&client, DType::F16, 64) {
        Some(t) => assert!(f16_words.starts_with(&format!("tensor cores ({0}×{0}×{0} F16 fragments", t.forward.f)), "{f16_words}"),
        None => assert_eq!(f16_words, "FMA kernels (no F16 cooperative matrices of 16 or 8 with f32 accumulators on this device)"),
    }
    let cpu = Flex::fused_attention_kernels(&Default::default(), DType::F32, 64);
    assert!(cpu.contains("no fused attention kernels"), "{cpu}");
}

/// The chunked op (Burn ops: the backend's matmuls, under `Fusion`) on wgpu equals the composed
/// reference on `Flex`, strided inputs, a short last chunk.
#[test]
fn chunked_attention_on_wgpu_matches_the_composed_reference() {
    for shape in [[2, 3, 37, 64]] {
        let want = run::<Flex>(shape, false);
        let got = run_with::<Wgpu>(shape, true, Some(16));
        for (name, (g, w)) in ["o", "lse", "dq", "dk", "dv"].iter().zip(got.iter().zip(&want)) {
            let e = max_rel(g, w);
            assert!(e < 2e-5, "chunked {shape:?}: {name} differs by {e} (relative)");
        }
    }
}

/// `(context, dqkv)` of the packed op on a fused `[2, s, 3·H·d]` projection for `y = Σ ctx ∘ w`.
fn packed<B: burn::tensor::backend::AutodiffBackend + AttentionBackend>([heads, s, d]: [usize; 3], rows: Option<usize>) -> [TensorData; 2] {
    let dev = Default::default();
    let w = 3 * heads * d;
    let qkv = Tensor::<B, 3>::from_data(TensorData::new(HostRng::new(6, "qkv").normal_vec(2 * s * w, 1.0), [2, s, w]), &dev).require_grad();
    let up = Tensor::<B, 3>::from_data(TensorData::new(HostRng::new(6, "w").normal_vec(2 * s * heads * d, 1.0), [2, s, heads * d]), &dev);
    let context = burn_parallel::attention::causal_attention_qkv(qkv.clone(), heads, 1.0 / (d as f32).sqrt(), rows);
    let dqkv = qkv.grad(&(context.clone() * up).sum().backward()).expect("tracked");
    [context.into_data(), dqkv.into_data()]
}

/// Attention over a fused projection (q, k, v viewed in it; `dqkv` one concatenation) on the
/// raw Cube backend and under `Fusion`, fused and chunked, equals the CPU's; head widths whose
/// k/v column offsets are and are not aligned for a buffer view.
#[test]
fn attention_of_a_fused_projection_on_wgpu_matches_the_cpu() {
    for (dims, rows) in [([3, 37, 64], None), ([2, 33, 16], None), ([3, 37, 64], Some(16))] {
        let want = packed::<Autodiff<Flex>>(dims, rows);
        for (label, got) in [("cube", packed::<Autodiff<K>>(dims, rows)), ("fusion", packed::<Autodiff<Wgpu>>(dims, rows))] {
            for (name, (g, w)) in ["context", "dqkv"].iter().zip(got.iter().zip(&want)) {
                let e = max_rel(g, w);
                assert!(e < 2e-5, "{label} {dims:?} rows {rows:?}: {name} differs by {e} (relative)");
            }
        }
    }
}

/// The GPT with fused attention on wgpu (tp 1, and tp 2 with sequence parallelism on two thread
/// ranks) equals the composed GPT on `Flex` at tp 1: logits, loss and every parameter gradient.
#[test]
fn gpt_with_fused_attention_equals_the_composed_gpt() {
    use burn_parallel::attention::AttentionKernel;
    use burn_parallel::params::named_grads;
    use burn_parallel_modules::GptConfig;
    use common::{assert_parity, world, Outcome};
    let cfg = |kernel| GptConfig::new(64, 40, 64, 4, 2, 128).with_attention(kernel);
    let ids = |name: &str| TensorData::new((0..3 * 40).map(|i| ((i * 7 + name.len() * 5) % 61) as i64).collect::<Vec<_>>(), [3, 40]);
    fn outcome<B: burn::tensor::backend::AutodiffBackend + burn_parallel::ParallelBackend>(
        cfg: &GptConfig,
        c: &burn_parallel::Comm,
        [x, t]: [TensorData; 2],
        fused: bool,
    ) -> Outcome {
        let dev = Default::default();
        let gpt = cfg.init::<B>(c, &dev).unwrap();
        assert!(gpt.blocks.iter().all(|b| (b.attn.core == burn_parallel::attention::AttentionCore::Fused) == fused), "fused attention resolved to {}", !fused);
        let (x, t) = (Tensor::<B, 2, burn::tensor::Int>::from_data(x, &dev), Tensor::<B, 2, burn::tensor::Int>::from_data(t, &dev));
        let logits = gpt.forward(x.clone());
        let grads = gpt.loss(x, t).backward();
        Outcome { output: logits.into_data(), input_grad: None, params: named_grads(&gpt, &grads) }
    }
    let reference = world(1, |c| Ok(outcome::<Autodiff<Flex>>(&cfg(AttentionKernel::Auto), &c, [ids("x"), ids("target")], false))).remove(0);
    for (t, sp) in [(1, false), (2, true)] {
        let fused = cfg(AttentionKernel::Fused).with_sequence_parallel(sp);
        let ranks = world(t, |c| Ok(outcome::<Autodiff<Wgpu>>(&fused, &c, [ids("x"), ids("target")], true)));
        let n = assert_parity(&reference, &ranks, 2e-5);
        assert!(n > 20 * t, "compared only {n} tensors");
    }
    let e = cfg(AttentionKernel::Fused).with_dropout(0.1).init::<Autodiff<Wgpu>>(&world(1, Ok).remove(0), &Default::default()).unwrap_err();
    assert!(e.to_string().contains("attention dropout is 0.1"), "{e}");
}

/// Selective and full recompute rerun the fused kernels in the backward: the loss and every
/// gradient equal no recompute's bit for bit (the kernels are deterministic: no atomics), tp 1
/// and tp 2 with sequence parallelism.
#[test]
fn recompute_with_fused_attention_gives_the_gradients_of_no_recompute_bit_for_bit() {
    use burn_parallel::attention::AttentionKernel;
    use burn_parallel::params::named_param_grads;
    use burn_parallel::recompute::Recompute;
    use burn_parallel_modules::GptConfig;
    type A = Autodiff<Wgpu>;
    let run = |tp: usize, sp: bool, mode: Recompute| {
        common::world(tp, |c| {
            let dev = Default::default();
            let gpt = GptConfig::new(64, 32, 64, 4, 2, 128).with_attention(AttentionKernel::Fused).with_sequence_parallel(sp).with_recompute(mode);
            let gpt = gpt.init::<A>(&c, &dev).map_err(|e| e.to_string())?;
            let ids = |k: usize| TensorData::new((0..2 * 32).map(|i| ((i * 5 + k) % 63) as i64).collect::<Vec<_>>(), [2, 32]);
            let x = Tensor::<A, 2, burn::tensor::Int>::from_data(ids(0), &dev);
            let (loss, grads) = gpt.forward_backward(x, Tensor::from_data(ids(1), &dev)).map_err(|e| e.to_string())?;
            let named: Vec<(String, Vec<u32>)> = named_param_grads(&gpt, &grads)
                .into_iter()
                .map(|p| (p.path, p.grad.expect("a gradient").to_vec::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()))
                .collect();
            Ok((loss.to_bits(), named))
        })
    };
    for (tp, sp) in [(1, false), (2, true)] {
        // A first run of each mode warms cubecl's matmul autotuning (with a cold cache, the
        // first calls of a shape run another matmul kernel than the tuned one: other rounding).
        for mode in [Recompute::None, Recompute::Selective, Recompute::Full] {
            run(tp, sp, mode);
        }
        let reference = run(tp, sp, Recompute::None);
        for mode in [Recompute::Selective, Recompute::Full] {
            for (r, (got, want)) in run(tp, sp, mode).iter().zip(&reference).enumerate() {
                assert_eq!(got.0, want.0, "tp {tp} sp {sp} rank {r}: {mode:?} loss differs");
                for ((path, g), (_, w)) in got.1.iter().zip(&want.1) {
                    let diff = g.iter().zip(w).map(|(a, b)| (f32::from_bits(*a) - f32::from_bits(*b)).abs()).fold(0.0, f32::max);
                    assert!(g == w, "tp {tp} sp {sp} rank {r}: {mode:?} gradient of {path} differs by up to {diff:e}");
                }
            }
        }
    }
}

/// Bytes in use on the wgpu device after the stream drains (cubecl's pools).
fn wgpu_in_use() -> u64 {
    burn_parallel::memory::cube_bytes_in_use::<K, burn::backend::wgpu::WgpuRuntime>(&Default::default()).expect("wgpu memory usage")
}

/// What the forward keeps for the backward, measured: with the graph of `o = attention(q, k, v)`
/// alive, the composed path holds the `[b, H, s, s]` scores and probabilities (f32), the fused
/// op only `o` and the f32 log-sum-exp.
#[test]
fn the_fused_forward_keeps_no_s_by_s_tensor() {
    type A = Autodiff<K>;
    let [b, h, s, d] = [1, 4, 256, 32];
    let dev = Default::default();
    let kept = |fused: bool| {
        let [q, k, v] = ["q", "k", "v"].map(|n| Tensor::<A, 4>::from_data(data(n, [b, h, s, d]), &dev).swap_dims(1, 2).require_grad());
        let base = wgpu_in_use();
        let o = if fused {
            burn_parallel::attention::causal_attention(q.clone(), k.clone(), v.clone(), 0.2)
        } else {
            let p = burn::tensor::activation::softmax(q.clone().matmul(k.clone().swap_dims(2, 3)).mul_scalar(0.2), 3);
            p.matmul(v.clone())
        };
        let held = wgpu_in_use() - base;
        drop(o.sum().backward());
        held
    };
    let (fused, composed) = (kept(true), kept(false));
    let (scores, io) = ((b * h * s * s * 4) as u64, (b * h * s * d * 4) as u64);
    eprintln!("held by the forward: fused {fused} bytes, composed {composed} bytes (one f32 [b, H, s, s] = {scores})");
    assert!(fused < 4 * io + scores / 4, "the fused forward holds {fused} bytes: more than o, lse and the copies of q/k/v ({io} bytes each)");
    assert!(composed >= 2 * scores, "the composed forward should hold at least two s×s tensors, holds {composed}");
}

/// The half-precision path of a GPU run on wgpu: the GPT's parameters cast to f16 (lavapipe has
/// no bf16; the casts, the f32 statistics, softmax and log-sum-exp and the kernels in the half
/// type are bf16's code), the chunked loss, fused attention at tp 1 and tp 2 with SP, chunked
/// attention (its matmuls in the half type) at tp 2 with SP, against the
/// same f16 GPT on `Flex` at tp 1: loss and every parameter gradient within a few f16 ulps of
/// the largest element. CUDA's bf16 is `device_check`'s and the GPT-2 benchmark's.
#[test]
fn half_precision_gpt_on_wgpu_equals_the_cpu() {
    use burn::tensor::DType;
    use burn_parallel::attention::AttentionKernel;
    use burn_parallel::params::named_param_grads;
    use burn_parallel::precision::cast_params;
    use burn_parallel_modules::GptConfig;
    use common::{close, world};
    let cfg = |kernel| GptConfig::new(64, 40, 64, 4, 2, 128).with_attention(kernel).with_loss_chunk(Some(48));
    let ids = |name: &str| TensorData::new((0..3 * 40).map(|i| ((i * 7 + name.len() * 5) % 61) as i64).collect::<Vec<_>>(), [3, 40]);
    fn outcome<B: burn::tensor::backend::AutodiffBackend + burn_parallel::ParallelBackend + burn_parallel::BackwardWith>(
        cfg: &GptConfig,
        c: &burn_parallel::Comm,
        [x, t]: [TensorData; 2],
    ) -> (f32, Vec<burn_parallel::params::NamedParam>)
    where
        B::InnerBackend: burn_parallel::ParallelBackend,
    {
        let dev = Default::default();
        let gpt = cast_params(cfg.init::<B>(c, &dev).unwrap(), DType::F16);
        let (x, t) = (Tensor::<B, 2, burn::tensor::Int>::from_data(x, &dev), Tensor::<B, 2, burn::tensor::Int>::from_data(t, &dev));
        let (loss, grads) = gpt.forward_backward(x, t).unwrap();
        (loss, named_param_grads(&gpt, &grads))
    }
    let (loss, reference) = world(1, |c| Ok(outcome::<Autodiff<Flex>>(&cfg(AttentionKernel::Auto), &c, [ids("x"), ids("target")]))).remove(0);
    let mut worst = 0f32;
    for (t, sp, kernel) in [(1, false, AttentionKernel::Fused), (2, true, AttentionKernel::Fused), (2, true, AttentionKernel::Chunked(16))] {
        let config = cfg(kernel).with_sequence_parallel(sp);
        for (r, (l, params)) in world(t, |c| Ok(outcome::<Autodiff<Wgpu>>(&config, &c, [ids("x"), ids("target")]))).into_iter().enumerate() {
            assert!((l - loss).abs() < 2e-3 * loss.abs(), "tp {t} {kernel:?}: loss {l} on wgpu, {loss} on the CPU");
            assert_eq!(params.len(), reference.len());
            for (p, q) in reference.iter().zip(&params) {
                let (gp, gq) = (p.grad.as_ref().unwrap(), q.grad.as_ref().unwrap_or_else(|| panic!("no grad for {}", q.path)));
                assert_eq!(gq.dtype, burn::tensor::DType::F16, "{}", q.path);
                worst = worst.max(close(&format!("tp {t} {kernel:?}: grad of {}", q.path), gp, gq, r, t, 2e-2));
            }
        }
    }
    eprintln!("f16 on wgpu against f16 on the CPU: worst gradient ‖diff‖∞ / ‖ref‖∞ {worst}");
}
