//! `llama`: a Llama-style GPT (RMS norms, RoPE, SwiGLU, grouped-query attention) on
//! `Autodiff<Cuda>` (fused attention and RMS-norm kernels) against the CPU, f32 and bf16: the
//! loss and every gradient (`benches/llama_backends.rs`, which `tests/wgpu_llama.rs` runs on
//! wgpu in CI). Then the RMS-norm kernels alone at Llama widths on `Autodiff<Cuda>` (Fusion, as
//! users run it): `y`, `dx`, `dγ` against the composed formula on the same GPU, and the time of
//! forward + backward of each.

#[path = "../../benches/llama_backends.rs"]
mod llama_backends;

use burn::backend::{Autodiff, Cuda};
use burn::tensor::{DType, Distribution, Tensor};
use burn_parallel::backward_with;
use burn_parallel::kernels::{rms_norm, LayerNormBackend};
use burn_parallel::precision::Precision;

use crate::bench::time_on;

pub fn run(report: &mut super::Report) {
    for (name, precision) in [("f32", Precision::F32), ("bf16", Precision::Bf16)] {
        report.check(&format!("llama {name}"), llama_backends::compare::<Autodiff<Cuda>>(precision));
    }
    println!("| RMS norm [n, h] | dtype | fused fwd+bwd µs | composed fwd+bwd µs | composed / fused |");
    println!("|---|---|---|---|---|");
    for [n, h] in [[8192, 2048], [8192, 4096], [4096, 8192]] {
        for dtype in [DType::F32, DType::BF16] {
            report.check(&format!("rms norm [{n}, {h}] {dtype:?}"), rms_case(n, h, dtype));
        }
    }
}

type A = Autodiff<Cuda>;

/// `x / √(mean(x²) + ε) · γ` in Burn ops (statistics in f32).
fn composed(x: Tensor<A, 2>, g: Tensor<A, 1>) -> Tensor<A, 2> {
    let dtype = x.dtype();
    let x32 = x.cast(DType::F32);
    let r = x32.clone().square().mean_dim(1).add_scalar(1e-5).sqrt().recip();
    (x32 * r * g.cast(DType::F32).unsqueeze()).cast(dtype)
}

/// The kernels' `y`, `dx`, `dγ` against the composed formula (1e-4 of each tensor's largest
/// entry in f32, 2e-2 in bf16), and both timed (forward + autodiff backward of `dy`).
fn rms_case(n: usize, h: usize, dtype: DType) -> Result<String, String> {
    let dev = Default::default();
    if !<Cuda as LayerNormBackend>::rms_norm_fused(h, dtype, &dev) {
        return Err(format!("no fused kernel at h {h} {dtype:?}"));
    }
    let x = Tensor::<A, 2>::random([n, h], Distribution::Normal(0.5, 2.0), &dev).cast(dtype).require_grad();
    let g = Tensor::<A, 1>::random([h], Distribution::Normal(1.0, 0.2), &dev).cast(dtype).require_grad();
    let dy = Tensor::<Cuda, 2>::random([n, h], Distribution::Normal(0.0, 1.0), &dev).cast(dtype);
    let run = |fused: bool| -> Result<[Vec<f32>; 3], String> {
        let y = if fused { rms_norm(x.clone(), g.clone(), 1e-5) } else { composed(x.clone(), g.clone()) };
        let grads = backward_with(y.clone(), dy.clone()).map_err(|e| e.to_string())?;
        let host = |t: Tensor<Cuda, 2>| t.cast(DType::F32).into_data().to_vec::<f32>().map_err(|e| format!("{e:?}"));
        let (dx, dg) = (x.grad(&grads).ok_or("no dx")?, g.grad(&grads).ok_or("no dγ")?);
        Ok([host(y.inner())?, host(dx)?, host(dg.unsqueeze())?])
    };
    let (ours, theirs) = (run(true)?, run(false)?);
    let tol = if dtype == DType::F32 { 1e-4 } else { 2e-2 };
    let mut worst = 0f32;
    for (what, (a, b)) in ["y", "dx", "dgamma"].iter().zip(ours.iter().zip(&theirs)) {
        let scale = b.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
        let err = a.iter().zip(b).fold(0f32, |m, (p, q)| if (p - q).is_nan() { f32::INFINITY } else { m.max((p - q).abs()) }) / scale;
        if err > tol {
            return Err(format!("{what}: {err:.2e} of its largest entry"));
        }
        worst = worst.max(err);
    }
    let step = |fused: bool| {
        let (x, g, dy) = (x.clone(), g.clone(), dy.clone());
        move || drop(backward_with(if fused { rms_norm(x.clone(), g.clone(), 1e-5) } else { composed(x.clone(), g.clone()) }, dy.clone()))
    };
    let (t_ours, t_theirs) = (time_on::<Cuda, _>(step(true), 20), time_on::<Cuda, _>(step(false), 20));
    println!("| [{n}, {h}] | {dtype:?} | {:.1} | {:.1} | {:.2} |", t_ours * 1e6, t_theirs * 1e6, t_theirs / t_ours);
    Ok(format!("worst {worst:.2e}; fused {:.1} µs, composed {:.1} µs", t_ours * 1e6, t_theirs * 1e6))
}
