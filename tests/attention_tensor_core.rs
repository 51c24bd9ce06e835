//! The tensor-core attention kernels (`cmma`, f16 here; bf16 is the same code on CUDA) where
//! the wgpu device has cooperative matrices: `--features vulkan` (CubeCL's SPIR-V compiler) on
//! Mesa ≥ 26's lavapipe, which `scripts/tensor-core-check.sh` runs in a Debian sid chroot.
//! Elsewhere (WGSL, or an older lavapipe) the test says it skipped, unless
//! `BURN_PARALLEL_REQUIRE_TENSOR_CORES=1` (the script's) makes that a failure.
//!
//! Against the composed reference on `Flex` in f32 (same f16-rounded inputs): `o`, `lse`, `dq,
//! dk, dv`; and against the FMA kernels on the same f16 inputs (`set_tensor_cores(false)`). Head
//! widths 8–128, sequence lengths off the tiles, strided inputs, raw Cube backend and `Fusion`.
#![cfg(feature = "wgpu")]

use burn::backend::{Flex, Wgpu};
use burn::tensor::{DType, Tensor, TensorData, TensorPrimitive};
use burn_parallel::attention::{set_tensor_cores, tensor_core_tiles, AttentionBackend};
use burn_parallel::rng::HostRng;

type R = burn::backend::wgpu::WgpuRuntime;
type K = burn_cubecl::CubeBackend<R, f32, i32, u32>;

/// `[b, s, H, d]` data rounded to f16 (as the attention layer's projections lay it out).
fn data(name: &str, [b, h, s, d]: [usize; 4]) -> TensorData {
    let x = Tensor::<Flex, 1>::from_data(TensorData::new(HostRng::new(7, name).normal_vec(b * h * s * d, 1.0), [b * h * s * d]), &Default::default());
    x.cast(DType::F16).cast(DType::F32).reshape([b, s, h, d]).into_data()
}

/// `[o, lse, dq, dk, dv]` (as f32) of the backend's attention on `dtype` inputs, `[b, H, s, d]`
/// views of `[b, s, H, d]` tensors.
fn run<B: AttentionBackend>(shape: [usize; 4], dtype: DType) -> [TensorData; 5] {
    run_at::<B>(shape, shape[2], 0, dtype)
}

/// The same for queries at positions `offset..offset + s` against `sk` keys and values (context
/// parallelism).
fn run_at<B: AttentionBackend>(shape: [usize; 4], sk: usize, offset: usize, dtype: DType) -> [TensorData; 5] {
    let dev = Default::default();
    let [b, h, _, d] = shape;
    let scale = 1.0 / (d as f32).sqrt();
    let t = |name: &str, shape| Tensor::<B, 4>::from_data(data(name, shape), &dev).cast(dtype).swap_dims(1, 2).into_primitive().tensor();
    let (q, dout, k, v) = (t("q", shape), t("do", shape), t("k", [b, h, sk, d]), t("v", [b, h, sk, d]));
    let (o, lse) = B::causal_attention_at(q.clone(), k.clone(), v.clone(), scale, offset);
    let (dq, dk, dv) = B::causal_attention_backward_at(dout, q, k, v, o.clone(), lse.clone(), scale, offset);
    let w4 = |p| Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(p)).cast(DType::F32).into_data();
    let lse = Tensor::<B, 3>::from_primitive(TensorPrimitive::Float(lse)).into_data();
    [w4(o), lse, w4(dq), w4(dk), w4(dv)]
}

/// `max |a − b| / (1 + max |b|)`: errors relative to the tensor's scale (f16 rounds each value).
fn err(a: &TensorData, b: &TensorData) -> f32 {
    assert_eq!(a.shape, b.shape);
    let (x, y) = (a.to_vec::<f32>().unwrap(), b.to_vec::<f32>().unwrap());
    let scale = 1.0 + y.iter().fold(0f32, |m, v| m.max(v.abs()));
    x.iter().zip(&y).map(|(p, q)| (p - q).abs()).map(|e| if e.is_nan() { f32::INFINITY } else { e }).fold(0.0, f32::max) / scale
}

/// Held by each test for its whole run: `set_tensor_cores` is process-wide and the tests of this
/// binary run in parallel.
static SWITCH: std::sync::Mutex<()> = std::sync::Mutex::new(());

const SHAPES: [[usize; 4]; 6] = [[1, 1, 1, 64], [2, 3, 37, 64], [1, 2, 100, 128], [2, 1, 33, 16], [1, 2, 129, 32], [2, 2, 70, 8]];

#[test]
fn tensor_core_kernels_match_the_reference_and_the_fma_kernels() {
    let _switch = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    let dev = Default::default();
    let client = <R as burn_cubecl::cubecl::Runtime>::client(&dev);
    let Some(tiles) = tensor_core_tiles(&client, DType::F16, 64) else {
        let required = std::env::var("BURN_PARALLEL_REQUIRE_TENSOR_CORES").is_ok_and(|v| v == "1");
        assert!(!required, "BURN_PARALLEL_REQUIRE_TENSOR_CORES=1, but this wgpu device has no f16 × f16 → f32 cooperative matrices");
        eprintln!("skipped: this wgpu device (or CubeCL's WGSL compiler) has no f16 cooperative matrices");
        return;
    };
    eprintln!("tensor-core tiles at d 64 on this device: {tiles:?}");
    assert!(tensor_core_tiles(&client, DType::F32, 64).is_none(), "f32 inputs take the FMA kernel");
    let mut worst = [0f32; 5];
    for shape in SHAPES {
        let tiles = tensor_core_tiles(&client, DType::F16, shape[3]).unwrap_or_else(|| panic!("{shape:?}: no tensor-core tiles"));
        assert!(tiles.backward.is_some(), "{shape:?}: no tensor-core backward tiles");
        let want = run::<Flex>(shape, DType::F32);
        set_tensor_cores(false);
        let fma = run::<K>(shape, DType::F16);
        let off = <Wgpu>::fused_attention_kernels(&dev, DType::F16, shape[3]);
        assert_eq!(off, "FMA kernels (tensor cores switched off)");
        set_tensor_cores(true);
        let on = <Wgpu>::fused_attention_kernels(&dev, DType::F16, shape[3]);
        assert!(on.starts_with(&format!("tensor cores ({0}×{0}×{0} F16 fragments", tiles.forward.f)) && on.contains("dk/dv"), "{on}");
        for (label, got) in [("cube", run::<K>(shape, DType::F16)), ("fusion", run::<Wgpu>(shape, DType::F16))] {
            for (i, (name, (g, w))) in ["o", "lse", "dq", "dk", "dv"].iter().zip(got.iter().zip(&want)).enumerate() {
                let e = err(g, w);
                worst[i] = worst[i].max(e);
                // f16 outputs (and P, dS rounded to f16 before their products): a few f16 ulps of
                // the largest value.
                let tol = if *name == "lse" { 1e-5 } else { 4e-3 };
                assert!(e < tol, "{label} {shape:?}: {name} differs from the f32 reference by {e}");
            }
            // Against the FMA kernels on the same f16 inputs: only P's and dS's rounding differs.
            for (i, name) in ["o", "lse", "dq", "dk", "dv"].iter().enumerate() {
                let e = err(&got[i], &fma[i]);
                assert!(e < if i == 1 { 1e-5 } else { 3e-3 }, "{label} {shape:?}: tensor-core vs FMA kernels: {name} {e}");
            }
        }
    }
    eprintln!("tensor-core kernels (f16) vs the f32 reference, worst o, lse, dq, dk, dv: {worst:?}");
}

/// Queries at an offset against a longer key sequence (context parallelism) on the tensor
/// cores: against the f32 reference and the FMA kernels on the same f16 inputs, as above;
/// offsets off the fragments and tiles, keys past the last query's position, one query.
#[test]
fn tensor_core_kernels_at_an_offset_match_the_reference() {
    let _switch = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    let client = <R as burn_cubecl::cubecl::Runtime>::client(&Default::default());
    if tensor_core_tiles(&client, DType::F16, 64).is_none() {
        let required = std::env::var("BURN_PARALLEL_REQUIRE_TENSOR_CORES").is_ok_and(|v| v == "1");
        assert!(!required, "BURN_PARALLEL_REQUIRE_TENSOR_CORES=1, but this wgpu device has no f16 × f16 → f32 cooperative matrices");
        eprintln!("skipped: this wgpu device (or CubeCL's WGSL compiler) has no f16 cooperative matrices");
        return;
    }
    for (shape, sk, offset) in
        [([2, 3, 37, 64], 100, 50), ([1, 2, 33, 32], 70, 37), ([1, 1, 16, 64], 129, 0), ([2, 1, 1, 16], 64, 63), ([1, 2, 40, 128], 90, 41)]
    {
        let want = run_at::<Flex>(shape, sk, offset, DType::F32);
        set_tensor_cores(false);
        let fma = run_at::<K>(shape, sk, offset, DType::F16);
        assert_eq!(<Wgpu>::fused_attention_kernels(&Default::default(), DType::F16, shape[3]), "FMA kernels (tensor cores switched off)");
        set_tensor_cores(true);
        assert!(tensor_core_tiles(&client, DType::F16, shape[3]).is_some_and(|t| t.backward.is_some()), "{shape:?}: no tensor-core tiles");
        for (label, got) in [("cube", run_at::<K>(shape, sk, offset, DType::F16)), ("fusion", run_at::<Wgpu>(shape, sk, offset, DType::F16))] {
            for (i, name) in ["o", "lse", "dq", "dk", "dv"].iter().enumerate() {
                let (e, ef) = (err(&got[i], &want[i]), err(&got[i], &fma[i]));
                let (tol, tol_fma) = if i == 1 { (1e-5, 1e-5) } else { (4e-3, 3e-3) };
                assert!(e < tol && ef < tol_fma, "{label} q {shape:?} at {offset} against {sk} keys: {name} {e} from the reference, {ef} from the FMA kernels");
            }
        }
    }
}
