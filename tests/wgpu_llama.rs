//! A Llama-style GPT (RMS norms, RoPE, SwiGLU, grouped-query attention) on wgpu (lavapipe in
//! CI: the fused attention kernels with the repeated keys and values, the RMS-norm kernels
//! under `Fusion`) against the CPU: the loss and every gradient, f32 (lavapipe has no bf16; CUDA's
//! bf16 is `device_check llama`'s).
#![cfg(feature = "wgpu")]

#[path = "../benches/llama_backends.rs"]
mod llama_backends;

use burn::backend::{Autodiff, Wgpu};
use burn_parallel::precision::Precision;

#[test]
fn a_llama_on_wgpu_has_the_cpus_loss_and_gradients() {
    let line = llama_backends::compare::<Autodiff<Wgpu>>(Precision::F32).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{line}");
    assert!(line.starts_with("attention Fused, RMS norm fused"), "the fused kernels ran: {line}");
}
