//! A NaN or infinite gradient on one rank fails `DistAdamW::step` on every rank of the world
//! alike (`OptimError::NonFinite`: the global norm carries it through TP, DP and ZeRO), and
//! changes nothing: skipping that step and going on gives bit for bit the parameters of a run
//! that never took it. With `check_finite` off the NaN reaches the weights (what the check is for).

mod common;

use burn::optim::GradientsParams;
use burn::tensor::{Int, Tensor};
use burn_parallel::data::GlobalSampler;
use burn_parallel::optim::{DistAdamW, DistAdamWConfig, OptimError};
use burn_parallel::params::named_params;
use burn_parallel::{ParallelConfig, ProcessGroups};
use burn_parallel_modules::Gpt;
use common::runner::{gpt, samples, GLOBAL_BATCH};
use common::*;

/// What each rank of dp 2 × tp 2 saw: the error of each poisoned step, then every parameter's bits.
type Outcome = Vec<(Vec<String>, Vec<Vec<u32>>)>;

/// Steps `steps` of the flat GPT at dp 2 × tp 2; at the steps in `poisoned`, rank 3 (dp 1, tp 1)
/// puts `value` into one element of its shard of `blocks.0.mlp.fc1.weight`'s gradient. A step
/// that fails is skipped (the model cloned before it goes on).
fn run(zero: bool, check: bool, steps: &[usize], poisoned: &[usize], value: f32) -> Outcome {
    world(4, |c| {
        let groups = ProcessGroups::new(ParallelConfig::new().with_data_parallel(2).with_tensor_parallel(2), c).map_err(|e| e.to_string())?;
        let mut model: Gpt<B> = gpt(2, false, 0.0).init(&groups.tp, &Default::default()).map_err(|e| e.to_string())?;
        let config = DistAdamWConfig::new().with_weight_decay(0.1).with_zero(zero).with_bucket_bytes(3000).with_check_finite(check);
        let mut opt = DistAdamW::<B>::new(config, &groups);
        let mut errors = Vec::new();
        for &step in steps {
            let range = GlobalSampler::replica_samples((step * GLOBAL_BATCH) as u64, GLOBAL_BATCH / 2, groups.coords.dp);
            let (x, y) = samples(range);
            let dev = Default::default();
            let loss = model.loss(Tensor::<B, 2, Int>::from_data(x, &dev), Tensor::from_data(y, &dev));
            let mut grads = GradientsParams::from_grads(loss.backward(), &model);
            if poisoned.contains(&step) && groups.world.global_rank() == 3 {
                let id = model.blocks[0].mlp.fc1.weight.id;
                let g = grads.remove::<Inner, 2>(id).expect("fc1 has a gradient");
                let bad = g.slice_assign([0..1, 0..1], Tensor::from_floats([[value]], &dev));
                grads.register::<Inner, 2>(id, bad);
            }
            match opt.step(1e-2, vec![(model.clone(), grads)], None) {
                Ok((mut parts, norm)) => {
                    assert_eq!(norm.is_some(), check, "the norm is computed where the check is on");
                    model = parts.remove(0);
                }
                Err(e @ OptimError::NonFinite { .. }) => errors.push(e.to_string()),
                Err(e) => return Err(e.to_string()),
            }
        }
        let bits = named_params(&model).into_iter().map(|p| p.value.to_vec::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()).collect();
        Ok((errors, bits))
    })
}

#[test]
fn a_nan_gradient_on_one_rank_fails_the_step_everywhere_and_changes_nothing() {
    for zero in [false, true] {
        for value in [f32::NAN, f32::INFINITY] {
            let poisoned = run(zero, true, &[0, 1, 2], &[1], value);
            for (rank, (errors, _)) in poisoned.iter().enumerate() {
                assert_eq!(errors.len(), 1, "zero {zero} {value}: rank {rank} {errors:?}");
                assert!(errors[0].contains("the global gradient norm is") && errors[0].contains("not applied"), "{}", errors[0]);
            }
            let never = run(zero, true, &[0, 2], &[], 0.0);
            let (a, b): (Vec<_>, Vec<_>) = (poisoned.iter().map(|r| &r.1).collect(), never.iter().map(|r| &r.1).collect());
            assert!(a == b, "zero {zero} {value}: a refused step must leave no trace in the parameters or the optimizer state");
        }
    }
}

#[test]
fn without_the_check_a_nan_gradient_reaches_the_weights() {
    let ranks = run(false, false, &[0, 1], &[1], f32::NAN);
    assert!(ranks.iter().all(|(errors, _)| errors.is_empty()));
    let nan = ranks.iter().any(|(_, params)| params.iter().flatten().any(|b| f32::from_bits(*b).is_nan()));
    assert!(nan, "the poisoned step was applied");
}
