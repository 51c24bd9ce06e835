//! A Llama-style GPT (RMS norms, RoPE, SwiGLU, no biases, 2 key/value heads of 4, head width
//! 32; width 128, 2 layers, sequence 64, batch 2, vocabulary 256) on a Cube backend against the same model on
//! the CPU: the loss and every parameter's gradient. On a Cube backend the attention runs the
//! fused kernels (`Auto`: grouped-query attention splits the projection and repeats the keys and
//! values before them; the rotation is applied before either), the RMS norm the layer norm's
//! `v4` kernels with their `rms` switch (as a lazy op under `Fusion`); in bf16 (rotation tables cast to bf16, f32 RMS statistics) against the CPU's
//! f32. Tolerances: f32 1e-3 of each gradient's largest entry (the kernels sum in other orders),
//! bf16 the loss within 2% and each gradient within 8e-2.
//!
//! A module the tests (`tests/wgpu_llama.rs`, wgpu over lavapipe in CI) and `device_check
//! llama` (CUDA) include; not a benchmark of its own.

use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use burn_parallel::activation::Activation;
use burn_parallel::arch::{Norm, Position};
use burn_parallel::attention::AttentionCore;
use burn_parallel::params::{named_grads, NamedParam};
use burn_parallel::precision::Precision;
use burn_parallel::{BackwardWith, LocalWorld, ParallelBackend};
use burn_parallel_modules::GptConfig;

fn config() -> GptConfig {
    GptConfig::new(256, 64, 128, 4, 2, 352)
        .with_norm(Norm::RmsNorm)
        .with_position(Position::Rope)
        .with_rope_theta(10000.0)
        .with_activation(Activation::SwiGlu)
        .with_bias(false)
        .with_kv_heads(Some(2))
}

/// The loss and every gradient (f32 on the host) of one forward and backward on `B`, and the
/// attention core that ran.
fn grads<B>(cfg: &GptConfig) -> Result<(f32, Vec<NamedParam>, AttentionCore), String>
where
    B: AutodiffBackend + ParallelBackend + BackwardWith,
    B::InnerBackend: ParallelBackend,
{
    let comm = LocalWorld::new(1).communicator(0);
    let dev = Default::default();
    let gpt = cfg.init::<B>(&comm, &dev).map_err(|e| e.to_string())?;
    let ids = |k: usize| TensorData::new((0..2 * 64).map(|i| ((i * 31 + k * 7) % 256) as i64).collect::<Vec<_>>(), [2, 64]);
    let loss = gpt.loss(Tensor::<B, 2, Int>::from_data(ids(0), &dev), Tensor::from_data(ids(1), &dev));
    let value = loss.clone().into_scalar().elem::<f32>();
    Ok((value, named_grads(&gpt, &loss.backward()), gpt.blocks[0].attn.core))
}

/// The worst gradient error relative to that gradient's largest entry, and its parameter.
fn worst(a: &[NamedParam], b: &[NamedParam]) -> Result<(f32, String), String> {
    let mut out = (0f32, String::new());
    for (p, q) in a.iter().zip(b) {
        let (x, y) = (p.grad.clone().ok_or("no gradient")?.convert::<f32>(), q.grad.clone().ok_or("no gradient")?.convert::<f32>());
        let (x, y) = (x.to_vec::<f32>().map_err(|e| format!("{e:?}"))?, y.to_vec::<f32>().map_err(|e| format!("{e:?}"))?);
        let scale = x.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        let err = x.iter().zip(&y).fold(0f32, |m, (u, v)| m.max((u - v).abs())) / scale;
        if err > out.0 || err.is_nan() {
            out = (err, p.path.clone());
        }
    }
    Ok(out)
}

/// The loss and gradients of the model on `B` in `precision` against the CPU's in f32: a line
/// of numbers, an error when outside the tolerances.
pub fn compare<B>(precision: Precision) -> Result<String, String>
where
    B: AutodiffBackend + ParallelBackend + BackwardWith,
    B::InnerBackend: ParallelBackend,
{
    let (cpu_loss, cpu_grads, _) = grads::<Autodiff<Flex>>(&config())?;
    let (loss_tol, grad_tol) = if precision == Precision::F32 { (1e-4, 1e-3) } else { (2e-2, 8e-2) };
    let (loss, grads, core) = grads::<B>(&config().with_precision(precision))?;
    let (err, at) = worst(&cpu_grads, &grads)?;
    let norm = if B::rms_norm_fused(128, precision.dtype(), &Default::default()) { "fused" } else { "composed" };
    let detail = format!("attention {core:?}, RMS norm {norm}: loss {loss} (CPU {cpu_loss}), worst gradient {err:.2e} ({at})");
    match (loss - cpu_loss).abs() <= loss_tol * cpu_loss.abs() && err <= grad_tol && grads.len() == cpu_grads.len() {
        true => Ok(detail),
        false => Err(detail),
    }
}
