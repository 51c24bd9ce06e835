//! Training equivalence across TP degrees, and Megatron's dropout RNG rules.

mod common;

use burn::module::AutodiffModule;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::{Int, Tensor, TensorData};
use burn_parallel::rng::HostRng;
use burn_parallel_modules::{DropoutRegion, GptConfig, ParallelDropout};
use common::{world, Inner, B};

fn batch(step: usize, b: usize, s: usize, vocab: usize) -> (Tensor<B, 2, Int>, Tensor<B, 2, Int>) {
    // A learnable stream: token i+1 = (token i * 3 + 1) mod vocab, random starts.
    let mut rng = HostRng::new(5, &format!("batch{step}"));
    let mut ids = Vec::new();
    let mut tg = Vec::new();
    for _ in 0..b {
        let mut t = (rng.next_u64() % vocab as u64) as i64;
        for _ in 0..s {
            ids.push(t);
            t = (t * 3 + 1) % vocab as i64;
            tg.push(t);
        }
    }
    let dev = Default::default();
    (Tensor::from_data(TensorData::new(ids, [b, s]), &dev), Tensor::from_data(TensorData::new(tg, [b, s]), &dev))
}

fn train(tp: usize, steps: usize) -> Vec<Vec<f32>> {
    let cfg = GptConfig::new(32, 16, 32, 4, 2, 64);
    world(tp, |c| {
        let mut gpt = cfg.init::<B>(&c, &Default::default()).map_err(|e| e.to_string())?;
        let mut optim = AdamWConfig::new().with_weight_decay(0.01).init();
        let mut losses = Vec::new();
        for step in 0..steps {
            let (x, y) = batch(step, 4, 16, 32);
            let loss = gpt.loss(x, y);
            losses.push(loss.clone().into_scalar());
            let grads = GradientsParams::from_grads(loss.backward(), &gpt);
            gpt = optim.step(3e-3, gpt, grads);
        }
        Ok(losses)
    })
}

#[test]
fn twenty_adamw_steps_give_the_same_loss_curve_at_tp1_and_tp2() {
    let one = train(1, 20).remove(0);
    let two = train(2, 20);
    assert_eq!(two[0], two[1], "TP ranks must report the same loss");
    for (step, (a, b)) in one.iter().zip(&two[0]).enumerate() {
        assert!((a - b).abs() < 1e-4, "step {step}: tp1 {a} vs tp2 {b}");
    }
    assert!(one[19] < one[0] - 0.5, "the model should learn: {} -> {}", one[0], one[19]);
}

#[test]
fn dropout_masks_follow_megatron_rules() {
    let out = world(2, |c| {
        let dev = Default::default();
        let ones = Tensor::<B, 2>::ones([8, 64], &dev);
        let rep = ParallelDropout::new(0.5, 1, "blk.drop", DropoutRegion::Replicated, c.rank());
        let sh = ParallelDropout::new(0.5, 1, "attn.drop", DropoutRegion::Sharded, c.rank());
        let r1 = rep.forward(ones.clone()).into_data();
        let r2 = rep.forward(ones.clone()).into_data();
        let s1 = sh.forward(ones.clone()).into_data();
        // Without autodiff (inference) dropout is off.
        let off = rep.forward(Tensor::<Inner, 2>::ones([8, 64], &dev)).into_data();
        Ok((r1, r2, s1, off))
    });
    let (a, b) = (&out[0], &out[1]);
    assert_eq!(a.0, b.0, "replicated region: same mask on every TP rank");
    assert_ne!(a.0, a.1, "successive calls draw new masks");
    assert_ne!(a.2, b.2, "sharded region: own mask per TP rank");
    let v = a.0.to_vec::<f32>().unwrap();
    let zeros = v.iter().filter(|x| **x == 0.0).count();
    assert!((150..362).contains(&zeros), "p=0.5 of 512: {zeros} zeros");
    assert!(v.iter().all(|x| *x == 0.0 || *x == 2.0), "inverted dropout scales by 1/(1-p)");
    assert!(a.3.to_vec::<f32>().unwrap().iter().all(|x| *x == 1.0));
}

#[test]
fn with_dropout_the_tp_ranks_stay_consistent() {
    let cfg = GptConfig::new(32, 16, 32, 4, 2, 64).with_dropout(0.2);
    let out = world(2, |c| {
        let gpt = cfg.init::<B>(&c, &Default::default()).map_err(|e| e.to_string())?;
        let (x, y) = batch(0, 2, 16, 32);
        let hidden = gpt.hidden(x.clone()).into_data();
        let loss = gpt.loss(x.clone(), y.clone()).into_scalar();
        let eval = gpt.valid().loss(x.inner(), y.inner()).into_scalar();
        Ok((hidden, loss, eval))
    });
    assert_eq!(out[0].0, out[1].0, "replicated hidden states must agree across TP ranks");
    assert_eq!(out[0].1, out[1].1);
    assert!((out[0].1 - out[0].2).abs() > 1e-4, "dropout must be active in training and off in eval");
}
