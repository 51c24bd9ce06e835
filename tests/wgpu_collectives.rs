//! Collectives and mappings on burn's `Wgpu` (= `Fusion<CubeBackend<WgpuRuntime>>`): the eager
//! fusion bridge that the CUDA/NCCL path also goes through, checked against `Flex` with two
//! thread ranks. Runs with `--features wgpu` (CI: lavapipe).
#![cfg(feature = "wgpu")]

mod common;

use burn::backend::{Autodiff, Flex, Wgpu};
use burn::tensor::{Tensor, TensorData};
use burn_parallel::comm::ops;
use burn_parallel::mappings::*;
use burn_parallel::{CollectiveBackend, Comm, ReduceOp};
use common::{max_abs_diff, randn, world};

/// A chain through every mapping plus the raw collectives; returns outputs and the input grad.
fn chain<B: CollectiveBackend + burn::tensor::backend::AutodiffBackend>(c: &Comm) -> Result<Vec<TensorData>, String>
where
    B::InnerBackend: CollectiveBackend,
{
    let dev = Default::default();
    let r = c.rank();
    let x = Tensor::<B, 3>::from_data(randn(&format!("x{r}"), [2, 4, 6]), &dev).require_grad();
    let w = Tensor::<B, 2>::from_data(randn(&format!("w{r}"), [6, 6]), &dev);
    let h = gather_from_tp(copy_to_tp(x.clone(), c).matmul(w.unsqueeze()), c); // [2, 4, 12]
    let h = reduce_scatter_to_sp(h, 1, c); // [2, 2, 12]
    let h = reduce_from_tp(scatter_to_tp(gather_from_sp(h, 1, c), c).tanh(), c); // [2, 4, 6]
    let grads = (h.clone() * h.clone()).sum().backward();
    let dx = x.grad(&grads).ok_or("no input grad")?;
    let e = |e: burn_parallel::CommError| e.to_string();
    let inner = h.clone().inner();
    let sum = ops::all_reduce(inner.clone(), ReduceOp::Max, c).map_err(e)?;
    let bc = ops::broadcast(inner.clone() + r as f32, 1, c).map_err(e)?;
    let peer = 1 - r;
    let got = ops::batch_p2p(vec![(inner.clone() * 3.0, peer, 5)], &[(peer, 5, [2, 4, 6])], &dev, c).map_err(e)?;
    Ok(vec![h.into_data(), dx.into_data(), sum.into_data(), bc.into_data(), got[0].clone().into_data()])
}

#[test]
fn wgpu_fusion_collectives_equal_flex() {
    let cpu = world(2, |c| chain::<Autodiff<Flex>>(&c));
    let gpu = world(2, |c| chain::<Autodiff<Wgpu>>(&c));
    for r in 0..2 {
        for (i, (a, b)) in cpu[r].iter().zip(&gpu[r]).enumerate() {
            let d = max_abs_diff(a, &b.clone().convert::<f32>()).unwrap();
            assert!(d < 1e-4, "rank {r} output {i}: off by {d}");
        }
    }
}

/// `--precision bf16` on a GPU backend: either the device computes in bf16 (a bf16 GPT forward
/// then runs and agrees with f32 to bf16's precision), or `Precision::check` refuses with the
/// backend's name — never a shader compile error deep inside. On lavapipe (CI) only the refusal
/// runs: it has no bf16 shaders; the bf16 forward on a GPU is `device_check`'s (CUDA).
#[test]
fn bf16_on_wgpu_runs_or_is_refused_clearly() {
    use burn_parallel::precision::Precision;
    use burn_parallel::{LocalWorld, ParallelConfig, ProcessGroups};
    use burn_parallel_modules::GptConfig;
    let dev = Default::default();
    match Precision::Bf16.check::<Wgpu>(&dev) {
        Err(e) => {
            let m = e.to_string();
            eprintln!("bf16 refused on this device: {m}");
            assert!(m.contains("bf16") && m.contains("cannot compute") && m.contains("--precision f32"), "{m}");
        }
        Ok(()) => {
            let groups = ProcessGroups::new(ParallelConfig::new(), LocalWorld::new(1).communicator(0)).unwrap();
            let ids = Tensor::<Wgpu, 2, burn::tensor::Int>::from_data(TensorData::new((0..32i64).map(|i| i % 11).collect(), [2, 16]), &dev);
            let config = GptConfig::new(16, 16, 32, 4, 1, 64);
            let f32_gpt = config.init::<Wgpu>(&groups.tp, &dev).unwrap();
            let bf16_gpt = config.clone().with_precision(Precision::Bf16).in_precision(f32_gpt.clone());
            let a = f32_gpt.forward(ids.clone()).into_data();
            let b = bf16_gpt.forward(ids).into_data();
            let d = max_abs_diff(&a, &b).unwrap();
            eprintln!("bf16 on this device: logits within {d} of f32");
            assert!(d < 0.1, "bf16 logits differ from f32 by {d}");
        }
    }
}
