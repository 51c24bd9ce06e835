//! The CubeCL layer-norm kernels (forward, dx, dγ/dβ) against the composed-ops reference, over
//! many shapes incl. non-power-of-two widths and row counts not a multiple of the block/chunk.
//! Runs with `--features wgpu` (CI: lavapipe, a software Vulkan driver); CUDA on the GPU machine.
#![cfg(feature = "wgpu")]

use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData, TensorPrimitive};
use burn_parallel::kernels::{
    layer_norm, set_affine_staging, set_backward_cache, set_backward_lean, set_backward_prefetch, set_backward_rows, set_bounds_checks, set_variant,
    set_vector_cache, LayerNormBackend, LnKernel,
};
use burn_parallel::rng::HostRng;

type K = burn_cubecl::CubeBackend<burn::backend::wgpu::WgpuRuntime, f32, i32, u32>;

fn data(name: &str, shape: &[usize], mean: f32) -> TensorData {
    let n = shape.iter().product();
    let v: Vec<f32> = HostRng::new(3, name).normal_vec(n, 2.0).into_iter().map(|x| x + mean).collect();
    TensorData::new(v, shape.to_vec())
}

fn run<B: LayerNormBackend, const D: usize>(x: &TensorData, g: &TensorData, b: &TensorData, dy: &TensorData) -> [TensorData; 4] {
    let dev = Default::default();
    let t = |d: &TensorData| Tensor::<B, 2>::from_data(d.clone(), &dev).into_primitive().tensor();
    let t1 = |d: &TensorData| Tensor::<B, 1>::from_data(d.clone(), &dev).into_primitive().tensor();
    let [n, h] = [x.shape.as_slice()[0], x.shape.as_slice()[1]];
    let (x, g, b, dy) = (t(x), t1(g), t1(b), t(dy));
    // Freed NaN buffers of the outputs' sizes first: the pool hands them out again, so a write
    // the kernels skipped shows as NaN, not as an earlier run's right answer.
    let poison = [(); 3].map(|_| Tensor::<B, 2>::full([n, h], f32::NAN, &dev));
    B::sync(&dev).expect("sync");
    drop(poison);
    let (y, mean, rstd) = B::layer_norm_rows(x.clone(), g.clone(), b, 1e-5);
    let (dx, dg, db) = B::layer_norm_rows_backward(dy, x, g, mean, rstd);
    let w2 = |p| Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(p)).into_data().convert::<f32>();
    let w1 = |p| Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(p)).into_data().convert::<f32>();
    [w2(y), w2(dx), w1(dg), w1(db)]
}

fn max_rel(a: &TensorData, b: &TensorData) -> f32 {
    let (x, y) = (a.to_vec::<f32>().unwrap(), b.to_vec::<f32>().unwrap());
    assert_eq!(x.len(), y.len());
    // NaN (e.g. a write the kernels skipped, over a poisoned buffer) counts as infinite error:
    // `f32::max` alone would drop it.
    x.iter().zip(&y).map(|(p, q)| (p - q).abs() / (1.0 + q.abs())).map(|e| if e.is_nan() { f32::INFINITY } else { e }).fold(0.0, f32::max)
}

#[test]
fn kernels_match_the_composed_reference() {
    // (lavapipe has no plane ops: v4 reduces through shared memory there.)
    for variant in [LnKernel::Strided, LnKernel::Vectorized] {
        set_variant(variant);
        check_shapes();
    }
    // v4's backward with 64 rows per cube (default) and a cube per row group (1: many partials).
    for rows in [1, 64] {
        set_backward_rows(rows);
        check_shapes();
    }
    // v4's backward with other register caches (the default halves it for wide rows).
    for cache in [Some(4), Some(16), None] {
        set_backward_cache(cache);
        check_shapes();
    }
    // v4's backward loading the next row group before computing the current one (many groups
    // per cube at [20000, 16] and [129, 768]; none left at the end), and with the lean row code.
    for (prefetch, lean) in [(true, false), (false, true), (true, true)] {
        set_backward_prefetch(prefetch);
        set_backward_lean(lean);
        check_shapes();
    }
    check_half();
    set_backward_prefetch(false);
    set_backward_lean(false);
    // v4 launches without CubeCL's bounds checks by default; with them, the same results.
    set_bounds_checks(true);
    check_shapes();
    set_bounds_checks(false);
    // v4 with smaller and larger register caches (more or fewer units per row: other cube
    // layouts, e.g. 2 and 4 rows per cube at h = 2048 with a cache of 4 and 8).
    for cache in [4, 8, 32] {
        set_vector_cache(cache);
        check_shapes();
        check_half();
    }
    set_vector_cache(16);
    check_far_from_zero();
    // v4's forward with γ/β staged in shared memory where a cube holds several rows (h ≤ 1024
    // here; [200, 33]: unvectorised), also with a cache of 4 (more units per row).
    set_affine_staging(true);
    check_shapes();
    check_half();
    check_far_from_zero();
    set_vector_cache(4);
    check_shapes();
    set_vector_cache(16);
    set_affine_staging(false);
}

/// Both variants (other tests may switch the process-wide variant meanwhile: every variant must
/// pass every check, and both give the same bits, so that is harmless).
fn check_shapes() {
    for &[n, h] in &[[1usize, 1], [3, 7], [37, 300], [64, 1024], [129, 768], [5, 4097], [200, 33], [3, 9000], [9, 2048], [5, 3000], [20000, 16], [2, 20000]] {
        let x = data(&format!("x{n}x{h}"), &[n, h], 3.0);
        let (g, b) = (data("g", &[h], 1.0), data("b", &[h], 0.0));
        let dy = data("dy", &[n, h], 0.0);
        let want = run::<Flex, 2>(&x, &g, &b, &dy);
        let got = run::<K, 2>(&x, &g, &b, &dy);
        let fused = run::<burn::backend::Wgpu, 2>(&x, &g, &b, &dy);
        for (a, c) in got.iter().zip(&fused) {
            assert_eq!(a, c, "[{n}, {h}]: the kernels through Fusion give the same bits");
        }
        // Relative to 1 + |reference|. Rows of h values (and dγ/dβ over n rows) are summed in a
        // different order than the CPU reference: f32 rounding of that order, up to ~1e-5·√h.
        let row = 1e-5 * (1.0 + (h as f32).sqrt() / 32.0);
        // dγ/dβ: sums over n rows; f32 reordering stays ~1e-6 relative here (a row group left
        // out of them is not).
        let tols = [row, 1e-4, 1e-4, 1e-4];
        for (i, what) in ["y", "dx", "dgamma", "dbeta"].iter().enumerate() {
            let e = max_rel(&got[i], &want[i]);
            assert!(e <= tols[i].max(1e-5), "[{n}, {h}] {what}: max rel err {e:e}");
        }
    }
}

/// Rows far from 0 (mean ±1000, σ 2) against an f64 reference on the host: the two-pass
/// variance loses nothing to cancellation (a plain `E[x²] − E[x]²` in f32 would be off by ~1e-1
/// in the variance here, ~1e-2 in `y`).
fn check_far_from_zero() {
    // Row r is offset by 1000·(r % 3 − 1): statistics taken from another row (e.g. a wrong row
    // index with several rows per cube: [2000, 16]) would be ~1000 off.
    for &[n, h] in &[[37usize, 300], [9, 2048], [5, 4097], [2000, 16], [300, 2048]] {
        let offsets = (0..n).flat_map(|r| std::iter::repeat_n(1000.0 * ((r % 3) as f32 - 1.0), h));
        let v: Vec<f32> = data(&format!("far{n}x{h}"), &[n, h], 0.0).to_vec::<f32>().unwrap().iter().zip(offsets).map(|(x, o)| x + o).collect();
        let x = TensorData::new(v, [n, h]);
        let (g, b) = (data("g", &[h], 1.0), data("b", &[h], 0.0));
        let dy = data("dy", &[n, h], 0.0);
        let got = run::<K, 2>(&x, &g, &b, &dy)[0].to_vec::<f32>().unwrap();
        let (xs, gs, bs) = (x.to_vec::<f32>().unwrap(), g.to_vec::<f32>().unwrap(), b.to_vec::<f32>().unwrap());
        let mut err = 0.0f64;
        for (r, row) in xs.chunks(h).enumerate() {
            let mean = row.iter().map(|&v| v as f64).sum::<f64>() / h as f64;
            let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / h as f64;
            for (c, &v) in row.iter().enumerate() {
                let want = (v as f64 - mean) / (var + 1e-5).sqrt() * gs[c] as f64 + bs[c] as f64;
                let e = (got[r * h + c] as f64 - want).abs() / (1.0 + want.abs());
                err = if e.is_nan() { f64::INFINITY } else { err.max(e) };
            }
        }
        // Any f32 kernel: the row sum of values near 1000 rounds (partial sums ~3e5, ulp 0.03),
        // ~1e-3 in μ, ~2e-4 in y after dividing by σ (two-pass measured 2e-4 at h = 300).
        assert!(err <= 1e-3, "[{n}, {h}] y far from zero: max rel err {err:e}");
    }
}

#[test]
fn autodiff_through_the_kernel_equals_autodiff_on_cpu() {
    fn grads<B: burn::tensor::backend::AutodiffBackend + LayerNormBackend>() -> Vec<TensorData> {
        let dev = Default::default();
        let x = Tensor::<B, 3>::from_data(data("ax", &[2, 5, 48], 1.0), &dev).require_grad();
        let g = Tensor::<B, 1>::from_data(data("ag", &[48], 1.0), &dev).require_grad();
        let b = Tensor::<B, 1>::from_data(data("ab", &[48], 0.0), &dev).require_grad();
        let w = Tensor::<B, 3>::from_data(data("aw", &[2, 5, 48], 0.0), &dev);
        let y = layer_norm(x.clone(), g.clone(), b.clone(), 1e-5);
        let gr = (y.clone() * w).sum().backward();
        let to = |t: Tensor<<B as burn::tensor::backend::AutodiffBackend>::InnerBackend, 3>| t.into_data().convert::<f32>();
        vec![
            y.inner().into_data().convert::<f32>(),
            to(x.grad(&gr).unwrap()),
            g.grad(&gr).unwrap().into_data().convert::<f32>(),
            b.grad(&gr).unwrap().into_data().convert::<f32>(),
        ]
    }
    let want = grads::<Autodiff<Flex>>();
    for got in [grads::<Autodiff<K>>(), grads::<Autodiff<burn::backend::Wgpu>>()] {
        for (w, g) in want.iter().zip(&got) {
            assert!(max_rel(g, w) < 1e-4, "{:e}", max_rel(g, w));
        }
    }
    let _ = <K as Backend>::name(&Default::default());
}

/// Half precision storage with f32 accumulation: f16 inputs (the reference sees the same rounded
/// values in f32), outputs within 1e-2 relative. (The issue asks for bf16, which lavapipe lacks;
/// bf16 runs in `device_check kernels` on CUDA. f16 exercises the same casts and accumulation.)
#[test]
fn half_precision_kernels_accumulate_in_f32() {
    check_half();
}

/// f16 storage (the forward caches the storage dtype; lavapipe has no bf16): within 1e-2 of the
/// f32 reference on the same rounded inputs.
fn check_half() {
    use burn::tensor::DType;
    let dev: burn::tensor::Device<K> = Default::default();
    let half = |d: &TensorData| {
        Tensor::<Flex, 1>::from_data(TensorData::new(d.to_vec::<f32>().unwrap(), [d.num_elements()]), &Default::default())
            .cast(DType::F16)
            .cast(DType::F32)
            .into_data()
    };
    let shaped = |d: TensorData, s: &[usize]| TensorData::new(d.to_vec::<f32>().unwrap(), s.to_vec());
    for &[n, h] in &[[3usize, 7], [64, 1024], [129, 768], [5, 4097], [2, 20000]] {
        let x = shaped(half(&data(&format!("hx{n}x{h}"), &[n, h], 3.0)), &[n, h]);
        let (g, b) = (shaped(half(&data("hg", &[h], 1.0)), &[h]), shaped(half(&data("hb", &[h], 0.0)), &[h]));
        let dy = shaped(half(&data("hdy", &[n, h], 0.0)), &[n, h]);
        let want = run::<Flex, 2>(&x, &g, &b, &dy);
        let t2 = |d: &TensorData| Tensor::<K, 2>::from_data(d.clone(), &dev).cast(DType::F16).into_primitive().tensor();
        let t1 = |d: &TensorData| Tensor::<K, 1>::from_data(d.clone(), &dev).cast(DType::F16).into_primitive().tensor();
        let (y, mean, rstd) = K::layer_norm_rows(t2(&x), t1(&g), t1(&b), 1e-5);
        let (dx, dg, db) = K::layer_norm_rows_backward(t2(&dy), t2(&x), t1(&g), mean, rstd);
        let w2 = |p| Tensor::<K, 2>::from_primitive(TensorPrimitive::Float(p)).cast(DType::F32).into_data();
        let w1 = |p| Tensor::<K, 1>::from_primitive(TensorPrimitive::Float(p)).cast(DType::F32).into_data();
        assert_eq!(w2(y.clone()).dtype, DType::F32);
        let got = [w2(y), w2(dx), w1(dg), w1(db)];
        for (i, what) in ["y", "dx", "dgamma", "dbeta"].iter().enumerate() {
            let scale = want[i].to_vec::<f32>().unwrap().iter().fold(1e-6f32, |m, v| m.max(v.abs()));
            let err = got[i].to_vec::<f32>().unwrap().iter().zip(want[i].to_vec::<f32>().unwrap()).fold(0.0f32, |m, (a, b)| {
                if (a - b).is_nan() {
                    f32::INFINITY
                } else {
                    m.max((a - b).abs())
                }
            }) / scale;
            assert!(err <= 1e-2, "[{n}, {h}] f16 {what}: rel err {err:e}");
        }
    }
}

/// Under `Fusion` the layer norm is a lazy op of the fusion stream: its inputs may come from
/// element-wise ops still queued (not yet fused/executed) and its outputs feed later queued ops.
/// The result equals the same program on `CubeBackend`, forward and backward.
#[test]
fn lazy_fusion_op_keeps_stream_order() {
    fn program<B: burn::tensor::backend::AutodiffBackend + LayerNormBackend>() -> Vec<TensorData> {
        let dev = Default::default();
        let x0 = Tensor::<B, 2>::from_data(data("lx", &[33, 96], 1.0), &dev).require_grad();
        let g0 = Tensor::<B, 1>::from_data(data("lg", &[96], 1.0), &dev).require_grad();
        let x = x0.clone().mul_scalar(2.0).add_scalar(0.5).tanh();
        let g = g0.clone().mul_scalar(1.5);
        let b = g.clone().mul_scalar(-0.25);
        let y = layer_norm(x, g, b, 1e-5).exp().add_scalar(1.0);
        let z = layer_norm(y.clone(), g0.clone(), g0.clone().mul_scalar(0.5), 1e-5);
        let gr = (z.clone() * y).sum().backward();
        vec![z.inner().into_data().convert::<f32>(), x0.grad(&gr).unwrap().into_data().convert::<f32>(), g0.grad(&gr).unwrap().into_data().convert::<f32>()]
    }
    let want = program::<Autodiff<K>>();
    let got = program::<Autodiff<burn::backend::Wgpu>>();
    for (w, g) in want.iter().zip(&got) {
        assert!(max_rel(g, w) < 1e-5, "{:e}", max_rel(g, w));
    }
}
