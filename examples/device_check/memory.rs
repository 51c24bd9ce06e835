//! `memory`: the memory model against CUDA's bytes in use (cubecl's pools, polled after the
//! stream drains: no peak counter) for one-rank layouts of a small GPT (fused, composed and
//! chunked attention, recompute, chunked loss, f32 and bf16): after the forward of the third
//! step (model state + kept activations) and after the step (model state). The measurement is
//! `benches/cube_memory.rs`, which `tests/wgpu_memory.rs` runs on wgpu in CI. A layout off by
//! more than 10% either way fails.

#[path = "../../benches/cube_memory.rs"]
mod cube_memory;

use burn::backend::{Autodiff, Cuda};
use burn_parallel::memory::GptShape;

const SHAPE: GptShape = GptShape {
    vocab: 1024,
    seq: 256,
    hidden: 256,
    heads: 4,
    layers: 4,
    ffn: 1024,
    tied_embeddings: false,
    activation: burn_parallel::activation::Activation::Gelu,
    arch: burn_parallel::arch::Arch::GPT2,
};
const BATCH: usize = 8;

/// Prints the table; a layout that fails or misses ±10% is reported.
pub fn run(report: &mut super::Report) {
    println!("\n| layout (GPT d 256, 4 layers, s 256, b 8, V 1024) | predicted after forward | CUDA in use | predicted after step | CUDA in use |\n|---|---|---|---|---|");
    let in_use = || burn_parallel::cuda::memory_in_use(&Default::default());
    for l in cube_memory::layouts(true) {
        let r = cube_memory::measure::<Autodiff<Cuda>>(&SHAPE, BATCH, &l, in_use).and_then(|m| {
            let (f, s) = (m.predicted_forward / m.forward, m.predicted_state / m.state);
            println!(
                "| {} | {:.2} MB | {:.2} MB ({f:.3}) | {:.2} MB | {:.2} MB ({s:.3}) |",
                l.name,
                m.predicted_forward / 1e6,
                m.forward / 1e6,
                m.predicted_state / 1e6,
                m.state / 1e6
            );
            match (f - 1.0).abs() <= 0.1 && (s - 1.0).abs() <= 0.1 {
                true => Ok(format!("{f:.3} {s:.3}")),
                false => Err(format!("predicted/measured {f:.3} after the forward, {s:.3} after the step: outside ±10%")),
            }
        });
        report.check(&format!("memory {}", l.name), r);
    }
}
