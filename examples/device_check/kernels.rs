//! The fused layer-norm kernels on CUDA against the composed reference.

use burn::backend::{Cuda, Flex};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData, TensorPrimitive};
use burn_parallel::kernels::{
    set_affine_staging, set_backward_cache, set_backward_lean, set_backward_prefetch, set_variant, set_vector_cache, LayerNormBackend, LnKernel,
};
use burn_parallel::rng::HostRng;

use crate::Report;

pub type K = burn_cubecl::CubeBackend<burn_cubecl::cubecl::cuda::CudaRuntime, f32, i32, u8>;

const SHAPES: &[[usize; 2]] = &[[1, 8], [7, 100], [64, 768], [300, 1000], [129, 4097], [4096, 1024], [1000, 8192], [70000, 64], [4, 20000]];

/// `[y, dx, dgamma, dbeta]` as f32 host data.
fn apply<B: LayerNormBackend>(inputs: &[TensorData; 4], dtype: DType) -> [TensorData; 4] {
    let dev = Default::default();
    let t2 = |d: &TensorData| Tensor::<B, 2>::from_data(d.clone(), &dev).cast(dtype).into_primitive().tensor();
    let t1 = |d: &TensorData| Tensor::<B, 1>::from_data(d.clone(), &dev).cast(dtype).into_primitive().tensor();
    let [x, g, b, dy] = inputs;
    let (y, mean, rstd) = B::layer_norm_rows(t2(x), t1(g), t1(b), 1e-5);
    let (dx, dg, db) = B::layer_norm_rows_backward(t2(dy), t2(x), t1(g), mean, rstd);
    let w2 = |p| Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(p)).cast(DType::F32).into_data().convert::<f32>();
    let w1 = |p| Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(p)).cast(DType::F32).into_data().convert::<f32>();
    [w2(y), w2(dx), w1(dg), w1(db)]
}

/// Inputs rounded to `dtype` (so the f32 reference sees exactly what the kernel sees).
fn inputs(n: usize, h: usize, dtype: DType) -> [TensorData; 4] {
    let dev = Default::default();
    let data = |name: &str, shape: Vec<usize>, mean: f32| {
        let v: Vec<f32> = HostRng::new(7, name).normal_vec(shape.iter().product(), 2.0).into_iter().map(|x| x + mean).collect();
        let t = Tensor::<Flex, 1>::from_data(TensorData::new(v, [shape.iter().product::<usize>()]), &dev);
        let rounded = t.cast(dtype).cast(DType::F32).into_data();
        TensorData::new(rounded.to_vec::<f32>().unwrap(), shape)
    };
    [data("x", vec![n, h], 3.0), data("g", vec![h], 1.0), data("b", vec![h], 0.0), data("dy", vec![n, h], 0.0)]
}

/// f32: 1e-5 per row (y, dx); the column sums over up to 70k rows (dγ, dβ) are summed in another
/// order than the reference, 1e-4. bf16: 1e-2 (outputs rounded to 8 bits).
fn check_shape(report: &mut Report, variant: &str, n: usize, h: usize) {
    for (dtype, tol) in [(DType::F32, [1e-5f32, 1e-5, 1e-4, 1e-4]), (DType::BF16, [1e-2; 4])] {
        let inp = inputs(n, h, dtype);
        let want = apply::<Flex>(&inp, DType::F32);
        let got = apply::<K>(&inp, dtype);
        let errs: Vec<f32> = got.iter().zip(&want).map(|(g, w)| rel_err(g, w)).collect();
        let ok = errs.iter().zip(tol).all(|(e, t)| *e <= t);
        let shown: Vec<String> = errs.iter().map(|e| format!("{e:.1e}")).collect();
        let detail = format!("rel err y/dx/dγ/dβ = {} (tol {tol:?})", shown.join("/"));
        report.check(&format!("kernels {variant} [{n}, {h}] {dtype:?}"), if ok { Ok(detail) } else { Err(detail) });
    }
}

/// Max |a − b| relative to max |b| (≥ 1e-6).
fn rel_err(a: &TensorData, b: &TensorData) -> f32 {
    let (a, b) = (a.to_vec::<f32>().unwrap(), b.to_vec::<f32>().unwrap());
    let scale = b.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
    // NaN counts as infinite error (`f32::max` alone would drop it).
    a.iter().zip(&b).fold(0.0f32, |m, (x, y)| if (x - y).is_nan() { f32::INFINITY } else { m.max((x - y).abs()) }) / scale
}

pub fn run(report: &mut Report, quick: bool, variants: &[LnKernel]) {
    let shapes = if quick { &SHAPES[..5] } else { SHAPES };
    for &variant in variants {
        set_variant(variant);
        for &[n, h] in shapes {
            check_shape(report, &format!("{variant:?}"), n, h);
        }
    }
    // v4's backward with the register caches `ln-bench`/`ln-tune` time (default: its rule).
    for cache in [4, 8, 16] {
        set_backward_cache(Some(cache));
        for &[n, h] in shapes {
            check_shape(report, &format!("Vectorized backward cache {cache}"), n, h);
        }
    }
    set_backward_cache(None);
    // v4 with the register caches `ln-tune` times (other cube layouts; plane sums with cube
    // exchanges run only here: lavapipe has no plane ops).
    for cache in [8, 32] {
        set_vector_cache(cache);
        for &[n, h] in shapes {
            check_shape(report, &format!("Vectorized cache {cache}"), n, h);
        }
    }
    set_vector_cache(16);
    // v4's forward with γ/β staged in shared memory (the experimental knob `ln-tune` times).
    set_affine_staging(true);
    for &[n, h] in shapes {
        check_shape(report, "Vectorized affine staging", n, h);
    }
    set_affine_staging(false);
    // v4's backward with the experimental knobs `ln-tune` times.
    for (prefetch, lean) in [(true, false), (false, true), (true, true)] {
        set_backward_prefetch(prefetch);
        set_backward_lean(lean);
        for &[n, h] in shapes {
            check_shape(report, &format!("Vectorized backward prefetch {prefetch} lean {lean}"), n, h);
        }
    }
    set_backward_prefetch(false);
    set_backward_lean(false);
    // Fusion (burn's default `Cuda`): the kernels as lazy ops of the fusion stream (inputs from
    // queued casts), identical to CubeBackend.
    for (dtype, [n, h]) in [(DType::F32, [129, 4097]), (DType::BF16, [129, 4097]), (DType::BF16, [4096, 1024])] {
        let inp = inputs(n, h, dtype);
        let (a, b) = (apply::<Cuda>(&inp, dtype), apply::<K>(&inp, dtype));
        let same = a.iter().zip(&b).all(|(x, y)| x.to_vec::<f32>().unwrap() == y.to_vec::<f32>().unwrap());
        report.check(&format!("kernels Fusion == CubeBackend [{n}, {h}] {dtype:?}"), if same { Ok(String::new()) } else { Err("outputs differ".into()) });
    }
    let _ = <K as Backend>::sync(&Default::default());
}
