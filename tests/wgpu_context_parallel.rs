//! Context parallelism through the fused attention kernels on wgpu (lavapipe in CI; CUDA runs
//! the same code in the device binary's `gpt-cp` step): each rank's two query chunks run at
//! their positions against the gathered keys (`causal_attention_at`). The logits of each rank's
//! tokens, the loss (mean over the CP group) and every parameter gradient (averaged over the DP
//! group, which holds the CP ranks) equal the unsplit composed model's on `Flex`, for GPT-2's
//! block (learned positions) and Llama's (RoPE, 4 heads sharing 2 key/value heads), at cp 2,
//! cp 4 and cp 2 × tp 2 with sequence parallelism. Runs with `--features wgpu`.
#![cfg(feature = "wgpu")]

mod common;

use burn::backend::{Autodiff, Flex, Wgpu};
use burn::tensor::{Int, Tensor, TensorData};
use burn_parallel::activation::Activation;
use burn_parallel::arch::{Norm, Position};
use burn_parallel::attention::{AttentionCore, AttentionKernel};
use burn_parallel::params::{named_grads, NamedParam};
use burn_parallel::rng::HostRng;
use burn_parallel::{ContextParallel, ParallelConfig, ProcessGroups, ReduceOp};
use burn_parallel_modules::GptConfig;
use common::{assert_shard, world};

type W = Autodiff<Wgpu>;
const SEQ: usize = 32;
/// f32 on lavapipe against f32 on the CPU: other summation orders in the matmuls and kernels.
const TOL: f32 = 2e-5;

/// GPT-2's block, heads of 16 (vocabulary 64, width 64, 4 heads, 2 layers).
fn gpt2() -> GptConfig {
    GptConfig::new(64, SEQ, 64, 4, 2, 96)
}

/// Llama's block: RoPE, 4 heads sharing 2 key/value heads, RMS norms, SwiGLU, no biases.
fn llama() -> GptConfig {
    gpt2()
        .with_kv_heads(Some(2))
        .with_norm(Norm::RmsNorm)
        .with_position(Position::Rope)
        .with_rope_theta(500.0)
        .with_activation(Activation::SwiGlu)
        .with_bias(false)
}

fn tokens(name: &str) -> TensorData {
    let mut rng = HostRng::new(13, name);
    TensorData::new((0..2 * SEQ).map(|_| (rng.next_u64() % 64) as i64).collect::<Vec<_>>(), [2, SEQ])
}

/// The unsplit composed model on the CPU: logits, loss, every gradient.
fn reference(cfg: &GptConfig, x: &TensorData, y: &TensorData) -> (TensorData, f32, Vec<NamedParam>) {
    world(1, |c| {
        let gpt = cfg.clone().with_attention(AttentionKernel::Composed).init::<Autodiff<Flex>>(&c, &Default::default()).map_err(|e| e.to_string())?;
        let ids = |d: &TensorData| Tensor::<Autodiff<Flex>, 2, Int>::from_data(d.clone(), &Default::default());
        let logits = gpt.forward(ids(x)).into_data();
        let loss = gpt.loss(ids(x), ids(y));
        let value = loss.clone().into_scalar();
        Ok((logits, value, named_grads(&gpt, &loss.backward())))
    })
    .remove(0)
}

/// Every rank of `cp × tp` on wgpu with the fused kernels against the reference; the number of
/// tensors compared on each rank.
fn check_layout(cfg: &GptConfig, cp: usize, tp: usize) -> Vec<usize> {
    let (x, y) = (tokens("in"), tokens("tg"));
    let (logits, loss, grads) = reference(cfg, &x, &y);
    let layout = ParallelConfig::new().with_context_parallel(cp).with_tensor_parallel(tp).with_sequence_parallel(cfg.sequence_parallel);
    world(cp * tp, |c| {
        let dev = Default::default();
        let g = ProcessGroups::new(layout.clone(), c).map_err(|e| e.to_string())?;
        let cpp = ContextParallel::new(g.cp.clone());
        let gpt = cfg.clone().with_attention(AttentionKernel::Fused).init::<W>(&g.tp, &dev).map_err(|e| e.to_string())?;
        assert!(gpt.blocks.iter().all(|b| b.attn.core == AttentionCore::Fused), "the fused kernels resolved on wgpu");
        let gpt = gpt.with_context_parallel(cpp.clone());
        let ids = |d: &TensorData| Tensor::<W, 2, Int>::from_data(cpp.split_data(d, 1).unwrap(), &dev);
        let what = format!("cp {cp} (rank {}) tp {tp} sp {}", cpp.rank(), cfg.sequence_parallel);
        let local = gpt.forward(ids(&x)).into_data();
        assert_shard(&format!("{what}: logits"), &cpp.split_data(&logits, 1)?, &local, g.coords.tp, tp, TOL);
        let l = gpt.loss(ids(&x), ids(&y));
        let mean = burn_parallel::comm::ops::all_reduce(l.clone().inner(), ReduceOp::Mean, &g.cp).map_err(|e| e.to_string())?.into_scalar();
        assert!((mean - loss).abs() < TOL * loss.abs(), "{what}: loss {mean} vs {loss}");
        let mine = named_grads(&gpt, &l.backward());
        assert_eq!(mine.len(), grads.len(), "{what}: parameter count");
        for (p, r) in mine.iter().zip(&grads) {
            assert_eq!(p.path, r.path);
            let gr = g.dp.all_reduce(p.grad.clone().unwrap(), ReduceOp::Mean).map_err(|e| e.to_string())?;
            assert_shard(&format!("{what}: grad of {}", p.path), r.grad.as_ref().unwrap(), &gr, g.coords.tp, tp, TOL);
        }
        Ok(2 + mine.len())
    })
}

#[test]
fn context_parallel_through_the_fused_kernels_equals_the_unsplit_model() {
    for (name, base) in [("gpt2", gpt2()), ("llama", llama())] {
        for (cp, tp, sp) in [(2, 1, false), (4, 1, false), (2, 2, true)] {
            let n = check_layout(&base.clone().with_sequence_parallel(sp), cp, tp);
            assert!(n.iter().all(|&k| k > 15), "{name} cp {cp} tp {tp}: compared {n:?} tensors");
        }
    }
}
