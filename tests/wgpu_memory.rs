//! The memory model against wgpu's bytes in use (lavapipe in CI): the Cube-backend measurement
//! that `device_check memory` makes on CUDA.
#![cfg(feature = "wgpu")]

#[path = "../benches/cube_memory.rs"]
#[allow(dead_code)]
mod cube_memory;

use burn::backend::{Autodiff, Wgpu};
use burn_parallel::memory::GptShape;

fn in_use() -> Result<u64, String> {
    burn_parallel::memory::cube_bytes_in_use::<Wgpu, burn::backend::wgpu::WgpuRuntime>(&Default::default())
}

/// After the forward (model state + what the backward keeps: fused attention's log-sum-exp,
/// composed attention's scores, selective and full recompute) and after the step (parameters,
/// gradients gone, AdamW moments), f32 (lavapipe has no bf16; CUDA's bf16 rows are
/// `device_check memory`'s).
#[test]
fn predicted_memory_is_within_ten_percent_of_wgpus_bytes_in_use() {
    let shape = GptShape {
        vocab: 1024,
        seq: 128,
        hidden: 128,
        heads: 4,
        layers: 2,
        ffn: 512,
        tied_embeddings: false,
        activation: burn_parallel::activation::Activation::Gelu,
        arch: burn_parallel::arch::Arch::GPT2,
    };
    let keep = ["f32", "f32, composed attention", "f32 selective, composed attention", "f32 full"];
    for l in cube_memory::layouts(false).into_iter().filter(|l| keep.contains(&l.name)) {
        let m = cube_memory::measure::<Autodiff<Wgpu>>(&shape, 4, &l, in_use).unwrap();
        let (f, s) = (m.predicted_forward / m.forward, m.predicted_state / m.state);
        eprintln!(
            "{}: after the forward {:.3} MB, predicted {:.3} ({f:.3}); after the step {:.3} MB, predicted {:.3} ({s:.3})",
            l.name,
            m.forward / 1e6,
            m.predicted_forward / 1e6,
            m.state / 1e6,
            m.predicted_state / 1e6
        );
        assert!((f - 1.0).abs() <= 0.1 && (s - 1.0).abs() <= 0.1, "{}: predicted/measured {f:.3} after the forward, {s:.3} after the step", l.name);
    }
}
