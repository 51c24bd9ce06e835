//! The RMS norm on a Cube backend (the layer norm's `v4` kernels with their `rms` switch) against
//! the composed reference on the CPU: `y`, `r`, `dx`, `dγ` over many shapes (odd widths, row
//! counts not a multiple of the cube's rows, rows too wide for `v4`: composed there), with and
//! without CubeCL's bounds checks and γ staged, f16 storage, through `Fusion` (same bits) and
//! through autodiff. Runs with `--features wgpu` (CI: lavapipe); CUDA in `device_check llama`.
#![cfg(feature = "wgpu")]

use burn::backend::{Autodiff, Flex};
use burn::tensor::{DType, Tensor, TensorData, TensorPrimitive};
use burn_parallel::kernels::{
    rms_norm, set_affine_staging, set_backward_cache, set_backward_lean, set_backward_prefetch, set_backward_rows, set_bounds_checks, set_variant,
    set_vector_cache, LayerNormBackend, LnKernel,
};
use burn_parallel::rng::HostRng;

type K = burn_cubecl::CubeBackend<burn::backend::wgpu::WgpuRuntime, f32, i32, u32>;

/// The kernels' knobs are process-wide: one test at a time.
static KNOBS: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn knobs() -> std::sync::MutexGuard<'static, ()> {
    KNOBS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Widths: one element, odd, a plane's worth, GPT-2's and Llama-like ones, `v4`'s widest f32
/// row (16384) and one past it (composed).
const SHAPES: [[usize; 2]; 10] = [[1, 1], [3, 7], [37, 300], [129, 768], [64, 1024], [5, 4097], [200, 33], [20000, 16], [2, 16384], [2, 20000]];

fn data(name: &str, shape: &[usize], mean: f32) -> TensorData {
    let n = shape.iter().product();
    let v: Vec<f32> = HostRng::new(4, name).normal_vec(n, 2.0).into_iter().map(|x| x + mean).collect();
    TensorData::new(v, shape.to_vec())
}

/// `[y, r, dx, dγ]` in f32 of rows `x` in `dtype` (f32 or f16).
fn run<B: LayerNormBackend>(x: &TensorData, g: &TensorData, dy: &TensorData, dtype: DType) -> [TensorData; 4] {
    let dev = Default::default();
    let t2 = |d: &TensorData| Tensor::<B, 2>::from_data(d.clone(), &dev).cast(dtype).into_primitive().tensor();
    let t1 = |d: &TensorData| Tensor::<B, 1>::from_data(d.clone(), &dev).cast(dtype).into_primitive().tensor();
    // Freed NaN buffers of the outputs' sizes first (synced: under Fusion they must exist): the
    // pool hands them out again, so a write the kernels skipped shows as NaN.
    let [n, h] = [x.shape.as_slice()[0], x.shape.as_slice()[1]];
    let poison = (
        [(); 2].map(|_| Tensor::<B, 2>::full([n, h], f32::NAN, &dev)),
        Tensor::<B, 2>::full([n, 1], f32::NAN, &dev),
        Tensor::<B, 1>::full([h], f32::NAN, &dev),
    );
    B::sync(&dev).expect("sync");
    drop(poison);
    let (y, rstd) = B::rms_norm_rows(t2(x), t1(g), 1e-5);
    let (dx, dg) = B::rms_norm_rows_backward(t2(dy), t2(x), t1(g), rstd.clone());
    let w2 = |p| Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(p)).cast(DType::F32).into_data();
    let w1 = |p| Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(p)).cast(DType::F32).into_data();
    [w2(y), w2(rstd), w2(dx), w1(dg)]
}

/// Largest `|a − b| / (1 + |b|)`, NaN as infinite.
fn max_rel(a: &TensorData, b: &TensorData) -> f32 {
    let (x, y) = (a.to_vec::<f32>().unwrap(), b.to_vec::<f32>().unwrap());
    assert_eq!(x.len(), y.len());
    x.iter().zip(&y).map(|(p, q)| (p - q).abs() / (1.0 + q.abs())).map(|e| if e.is_nan() { f32::INFINITY } else { e }).fold(0.0, f32::max)
}

/// Every shape on `K` and through `Fusion` (the same bits) against the CPU; `fused`: whether the
/// kernels run (not the composed fallback) is as `K::rms_norm_fused` says, checked against
/// `expect_fused(h)`.
fn check_shapes(expect_fused: impl Fn(usize) -> bool) {
    for [n, h] in SHAPES {
        assert_eq!(K::rms_norm_fused(h, DType::F32, &Default::default()), expect_fused(h), "h {h}");
        let (x, g, dy) = (data(&format!("x{n}x{h}"), &[n, h], 0.5), data("g", &[h], 1.0), data("dy", &[n, h], 0.0));
        let want = run::<Flex>(&x, &g, &dy, DType::F32);
        let got = run::<K>(&x, &g, &dy, DType::F32);
        let fused = run::<burn::backend::Wgpu>(&x, &g, &dy, DType::F32);
        for (a, c) in got.iter().zip(&fused) {
            assert_eq!(a, c, "[{n}, {h}]: through Fusion, the same bits");
        }
        // Row sums in another order than the CPU's: f32 rounding, ~1e-5·√h; dγ sums n rows.
        let row = 1e-5 * (1.0 + (h as f32).sqrt() / 32.0);
        for (i, (what, tol)) in [("y", row), ("r", row), ("dx", 1e-4), ("dgamma", 1e-4)].iter().enumerate() {
            let e = max_rel(&got[i], &want[i]);
            assert!(e <= tol.max(1e-5), "[{n}, {h}] {what}: max rel err {e:e}");
        }
    }
}

#[test]
fn rms_kernels_match_the_composed_reference() {
    let _one = knobs();
    let v4 = |h: usize| h <= 16384;
    set_variant(LnKernel::Vectorized);
    check_shapes(v4);
    // v1 has no RMS switch: the composed ops run (and give the same numbers).
    set_variant(LnKernel::Strided);
    check_shapes(|_| false);
    set_variant(LnKernel::Vectorized);
    set_bounds_checks(true);
    check_shapes(v4);
    set_bounds_checks(false);
    // γ staged in shared memory where a cube holds several rows; other cube layouts.
    set_affine_staging(true);
    check_shapes(v4);
    set_affine_staging(false);
    // The backward's knobs: a cube per row group (many partials), other register caches, the
    // next group's rows (and the unused μ) loaded early, the lean row code.
    set_backward_rows(1);
    check_shapes(v4);
    set_backward_rows(64);
    set_backward_cache(Some(4));
    check_shapes(v4);
    set_backward_cache(None);
    for (prefetch, lean) in [(true, false), (true, true)] {
        set_backward_prefetch(prefetch);
        set_backward_lean(lean);
        check_shapes(v4);
    }
    set_backward_prefetch(false);
    set_backward_lean(false);
    for cache in [4, 32] {
        set_vector_cache(cache);
        check_shapes(|h| h <= 1024 * cache);
    }
    set_vector_cache(16);
}

/// f16 storage (lavapipe has no bf16; CUDA's bf16 is `device_check llama`'s), f32 statistics:
/// within 1e-2 of the reference on the same rounded inputs.
#[test]
fn half_precision_rms_kernels_accumulate_in_f32() {
    let _one = knobs();
    let rounded = |d: TensorData| Tensor::<Flex, 2>::from_data(d, &Default::default()).cast(DType::F16).cast(DType::F32).into_data();
    for [n, h] in [[3usize, 7], [129, 768], [5, 4097]] {
        let x = rounded(data(&format!("hx{n}x{h}"), &[n, h], 0.5));
        let g = TensorData::new(rounded(data("hg", &[1, h], 1.0)).to_vec::<f32>().unwrap(), [h]);
        let dy = rounded(data("hdy", &[n, h], 0.0));
        assert!(K::rms_norm_fused(h, DType::F16, &Default::default()), "h {h}: the kernels take f16 rows");
        let want = run::<Flex>(&x, &g, &dy, DType::F32);
        let got = run::<K>(&x, &g, &dy, DType::F16);
        for (i, what) in ["y", "r", "dx", "dgamma"].iter().enumerate() {
            let scale = want[i].to_vec::<f32>().unwrap().iter().fold(1e-6f32, |m, v| m.max(v.abs()));
            let err = got[i].to_vec::<f32>().unwrap().iter().zip(want[i].to_vec::<f32>().unwrap()).fold(0f32, |m, (a, b)| {
                if (a - b).is_nan() {
                    f32::INFINITY
                } else {
                    m.max((a - b).abs())
                }
            });
            assert!(err / scale <= 1e-2, "[{n}, {h}] f16 {what}: rel err {:e}", err / scale);
        }
    }
}

/// `rms_norm` inside a graph (inputs from queued element-wise ops under `Fusion`, outputs feeding
/// more): the value and the gradients of `x` and `γ` on wgpu equal the CPU's.
#[test]
fn autodiff_through_the_rms_kernels_equals_the_cpu() {
    fn grads<B: burn::tensor::backend::AutodiffBackend + LayerNormBackend>() -> Vec<TensorData> {
        let dev = Default::default();
        let x0 = Tensor::<B, 3>::from_data(data("ax", &[2, 5, 96], 1.0), &dev).require_grad();
        let g0 = Tensor::<B, 1>::from_data(data("ag", &[96], 1.0), &dev).require_grad();
        let w = Tensor::<B, 3>::from_data(data("aw", &[2, 5, 96], 0.0), &dev);
        let y = rms_norm(x0.clone().mul_scalar(0.5).add_scalar(0.1), g0.clone().mul_scalar(1.5), 1e-5).mul_scalar(0.3).exp();
        let z = rms_norm(y.clone(), g0.clone(), 1e-6);
        let gr = (z.clone() * w + y).sum().backward();
        let f32s = |d: TensorData| d.convert::<f32>();
        vec![f32s(z.inner().into_data()), f32s(x0.grad(&gr).unwrap().into_data()), f32s(g0.grad(&gr).unwrap().into_data())]
    }
    let _one = knobs();
    assert!(K::rms_norm_fused(96, DType::F32, &Default::default()));
    let want = grads::<Autodiff<Flex>>();
    for got in [grads::<Autodiff<K>>(), grads::<Autodiff<burn::backend::Wgpu>>()] {
        for (what, (w, g)) in ["z", "dx", "dgamma"].iter().zip(want.iter().zip(&got)) {
            assert!(max_rel(g, w) < 1e-4, "{what}: {:e}", max_rel(g, w));
            assert!(w.to_vec::<f32>().unwrap().iter().any(|v| v.abs() > 0.1), "{what} is not trivially small");
        }
    }
}
