//! `llama`: a Llama-style GPT (RMS norms, RoPE, SwiGLU, grouped-query attention) on
//! `Autodiff<Cuda>` (fused attention kernels) against the CPU, f32 and bf16: the loss and every
//! gradient (`benches/llama_backends.rs`, which `tests/wgpu_llama.rs` runs on wgpu in CI).

#[path = "../../benches/llama_backends.rs"]
mod llama_backends;

use burn::backend::{Autodiff, Cuda};
use burn_parallel::precision::Precision;

pub fn run(report: &mut super::Report) {
    for (name, precision) in [("f32", Precision::F32), ("bf16", Precision::Bf16)] {
        report.check(&format!("llama {name}"), llama_backends::compare::<Autodiff<Cuda>>(precision));
    }
}
