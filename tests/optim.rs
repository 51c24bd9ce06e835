//! DistAdamW: plain DP in f32 is bitwise Burn's AdamW path (all-reduce, global clipping,
//! AdamW); ZeRO-1 gives bitwise the parameters of plain DP (within 1e-6 with clipping: the norm
//! is summed over shards in another order), also with uneven rows (dp = 3), TP, PP and bf16.

mod common;

use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::DType;
use burn::tensor::{Int, Tensor};
use burn_parallel::data::GlobalSampler;
use burn_parallel::data_parallel::{all_reduce_gradients, clip_grad_norm};
use burn_parallel::optim::{DistAdamW, DistAdamWConfig};
use burn_parallel::params::named_params;
use burn_parallel::pipeline::{PipelineExecutor, PipelineOptions};
use burn_parallel::precision::Precision;
use burn_parallel::{ParallelConfig, ProcessGroups};
use burn_parallel_modules::{GptConfig, GptPipeline, TokenBatch};
use burn_parallel_schedules::schedule_by_name;
use common::runner::{self, gpt, samples, GLOBAL_BATCH};
use common::*;

const STEPS: usize = 3;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Opt {
    Burn,
    Dist {
        zero: bool,
    },
    /// DistAdamW with fused updates of up to `bytes` of state per group (0: per parameter).
    Grouped {
        zero: bool,
        bytes: usize,
    },
}

/// Every parameter (path, bits) of rank `r` after `STEPS` steps of the flat GPT at dp × tp.
/// Per rank: its number and every parameter's path and bits.
type Bits = Vec<(usize, Vec<(String, Vec<u32>)>)>;

fn flat(dp: usize, tp: usize, config: &GptConfig, opt: Opt, clip: Option<f32>) -> Bits {
    world(dp * tp, |c| {
        let groups = ProcessGroups::new(ParallelConfig::new().with_data_parallel(dp).with_tensor_parallel(tp), c).map_err(|e| e.to_string())?;
        let mut model = config.init::<B>(&groups.tp, &Default::default()).map_err(|e| e.to_string())?;
        let mut burn_opt = AdamWConfig::new().with_weight_decay(0.1).init();
        let mut dist = DistAdamW::<B>::new(
            {
                let (zero, bytes) = match opt {
                    Opt::Grouped { zero, bytes } => (zero, bytes),
                    Opt::Dist { zero } => (zero, 0),
                    Opt::Burn => (false, 0),
                };
                DistAdamWConfig::new().with_weight_decay(0.1).with_zero(zero).with_bucket_bytes(3000).with_group_bytes(bytes)
            },
            &groups,
        );
        for step in 0..STEPS {
            let range = GlobalSampler::replica_samples((step * GLOBAL_BATCH) as u64, GLOBAL_BATCH / dp, groups.coords.dp);
            let (x, y) = samples(range);
            let dev = Default::default();
            let loss = model.loss(Tensor::<B, 2, Int>::from_data(x, &dev), Tensor::from_data(y, &dev));
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = match opt {
                Opt::Burn => {
                    let grads = all_reduce_gradients(&model, grads, &groups.dp, 3000).map_err(|e| e.to_string())?;
                    let grads = match clip {
                        Some(max) => clip_grad_norm::<B, _>(vec![(&model, grads)], max, &groups.tp, &groups.pp).map_err(|e| e.to_string())?.1.remove(0),
                        None => grads,
                    };
                    burn_opt.step(2e-2, model, grads)
                }
                Opt::Dist { .. } | Opt::Grouped { .. } => {
                    let (mut m, _) = dist.step(2e-2, vec![(model, grads)], clip).map_err(|e| e.to_string())?;
                    m.remove(0)
                }
            };
        }
        let bits = named_params(&model)
            .into_iter()
            .map(|p| (p.path, p.value.convert::<f32>().to_vec::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()))
            .collect();
        Ok((groups.coords.tp + tp * groups.coords.dp, bits))
    })
}

/// The largest `|x − y| / max(|x|, 1)` over every parameter element of every rank.
fn max_rel(a: &Bits, b: &Bits) -> f32 {
    let mut worst = 0.0f32;
    for ((ra, pa), (rb, pb)) in a.iter().zip(b) {
        assert_eq!(ra, rb);
        for ((na, va), (nb, vb)) in pa.iter().zip(pb) {
            assert_eq!(na, nb);
            for (x, y) in va.iter().zip(vb) {
                let (x, y) = (f32::from_bits(*x), f32::from_bits(*y));
                let d = (x - y).abs() / x.abs().max(1.0);
                worst = worst.max(if d.is_nan() { f32::INFINITY } else { d });
            }
        }
    }
    worst
}

#[test]
fn plain_dp_in_f32_is_bitwise_burns_adamw_path() {
    let config = gpt(2, false, 0.0);
    for clip in [None, Some(0.05)] {
        assert_eq!(flat(2, 2, &config, Opt::Burn, clip), flat(2, 2, &config, Opt::Dist { zero: false }, clip), "clip {clip:?}");
    }
}

/// The fused update (one flat tensor per group of parameters) is bitwise the per-parameter one:
/// a group per parameter (0 bytes), groups of a few parameters (3000 bytes: the larger
/// parameters alone, the small ones together), all of one dtype in one group (25 MiB),
/// with plain DP and clipping, ZeRO with uneven rows (dp 3), and bf16 parameters with f32
/// masters.
#[test]
fn fused_groups_give_bitwise_the_per_parameter_update() {
    let (f32c, bf16) = (gpt(2, false, 0.0), gpt(2, false, 0.0).with_precision(Precision::Bf16));
    for (config, dp, tp, zero) in [(&f32c, 2, 2, false), (&f32c, 3, 1, true), (&bf16, 2, 1, true), (&bf16, 1, 2, false)] {
        let one = flat(dp, tp, config, Opt::Grouped { zero, bytes: 0 }, Some(0.05));
        for bytes in [3000, 26214400] {
            let what = format!("{:?} dp {dp} tp {tp} zero {zero} group bytes {bytes}", config.precision);
            assert!(one == flat(dp, tp, config, Opt::Grouped { zero, bytes }, Some(0.05)), "{what}");
        }
    }
}

#[test]
fn zero1_gives_the_parameters_of_plain_dp() {
    let config = gpt(2, false, 0.0);
    // dp = 2 with tp = 2; dp = 3 splits 16 rows as 5 + 5 + 6 and the 32-row embedding as 10 + 11 + 11.
    for (dp, tp) in [(2, 2), (3, 1), (4, 1)] {
        let plain = flat(dp, tp, &config, Opt::Dist { zero: false }, None);
        assert_eq!(plain, flat(dp, tp, &config, Opt::Dist { zero: true }, None), "dp {dp} tp {tp}");
        // With clipping, the norm is summed over DP shards in another order (1 ulp apart here), so
        // the clip factors differ in the last bit; AdamW's m/√v amplifies that where |g| ≈ ε:
        // equal within 1e-6 (relative, absolute below 1).
        let (a, b) = (flat(dp, tp, &config, Opt::Dist { zero: false }, Some(0.05)), flat(dp, tp, &config, Opt::Dist { zero: true }, Some(0.05)));
        assert!(max_rel(&a, &b) < 1e-6, "dp {dp} tp {tp} with clipping: {}", max_rel(&a, &b));
    }
    // bf16 parameters with f32 masters: the same bits with and without ZeRO.
    let bf16 = gpt(2, false, 0.0).with_precision(Precision::Bf16);
    assert_eq!(flat(2, 1, &bf16, Opt::Dist { zero: false }, None), flat(2, 1, &bf16, Opt::Dist { zero: true }, None));
}

#[test]
fn zero1_with_pipeline_and_tensor_parallelism() {
    let config = gpt(4, false, 0.0);
    let run = |zero: bool| {
        world(8, |c| {
            let cfg = ParallelConfig::new().with_data_parallel(2).with_pipeline_parallel(2).with_tensor_parallel(2);
            let groups = ProcessGroups::new(cfg, c).map_err(|e| e.to_string())?;
            let opts = PipelineOptions { microbatches: 2, virtual_stages: 1, layout: None };
            let model = GptPipeline { config: config.clone(), tp: groups.tp.clone(), cp: None };
            let mut exec = PipelineExecutor::<B, _, 3>::new(model, schedule_by_name("1f1b").unwrap().as_ref(), &opts, groups.pp.clone(), Default::default())
                .map_err(|e| e.to_string())?;
            let mut opt = DistAdamW::<B>::new(DistAdamWConfig::new().with_zero(zero).with_bucket_bytes(2000), &groups);
            for step in 0..STEPS {
                let range = GlobalSampler::replica_samples((step * GLOBAL_BATCH) as u64, GLOBAL_BATCH / 2, groups.coords.dp);
                let (x, y) = samples(range);
                let cut = |d: &burn::tensor::TensorData, i| burn_parallel::comm::split_along(d, 0, 2, i).unwrap();
                let mbs: Vec<_> = (0..2).map(|i| TokenBatch { inputs: cut(&x, i), targets: cut(&y, i) }).collect();
                let out = exec.step(&mbs).map_err(|e| e.to_string())?;
                let parts = exec.stages().iter().map(|s| s.part.clone()).zip(out.grads).collect();
                let (parts, norm) = opt.step(1e-2, parts, Some(1.0)).map_err(|e| e.to_string())?;
                assert!(norm.unwrap() > 0.0);
                for (s, p) in exec.stages_mut().iter_mut().zip(parts) {
                    s.part = p;
                }
            }
            Ok(exec.stages().iter().flat_map(|s| named_params(&s.part)).map(|p| p.value.to_vec::<f32>().unwrap()).collect::<Vec<_>>())
        })
    };
    let (a, b) = (run(false), run(true));
    for (ra, rb) in a.iter().zip(&b) {
        for (x, y) in ra.iter().flatten().zip(rb.iter().flatten()) {
            assert!((x - y).abs() <= 1e-6 * x.abs().max(1.0), "{x} vs {y}");
        }
    }
}

/// A flat-GPT run with DistAdamW: start (fresh, or from `load`), `steps` steps, save into `save`;
/// rank 0's losses.
fn run(dp: usize, zero: bool, precision: Precision, load: Option<&std::path::Path>, steps: usize, save: Option<&std::path::Path>) -> Vec<f32> {
    use burn_parallel::checkpoint::*;
    let config = gpt(2, false, 0.0).with_precision(precision);
    world(dp * 2, |c| {
        let groups = ProcessGroups::new(ParallelConfig::new().with_data_parallel(dp).with_tensor_parallel(2), c.clone()).map_err(|e| e.to_string())?;
        let ctx = ShardContext::new(&groups);
        let same = |p: &str| p.to_string();
        let mut model = config.init::<B>(&groups.tp, &Default::default()).map_err(|e| e.to_string())?;
        let mut opt = DistAdamW::<B>::new(DistAdamWConfig::new().with_zero(zero).with_bucket_bytes(3000), &groups);
        let mut first = 0;
        if let Some(dir) = load {
            let ckpt = Checkpoint::open(dir).map_err(|e| e.to_string())?;
            model = load_module_cast(&ckpt, model, MODEL_PREFIX, &same, ctx).map_err(|e| e.to_string())?;
            opt.load(&ckpt, &[(&model, &same)], ctx).map_err(|e| e.to_string())?;
            first = ckpt.metadata().step as usize;
        }
        let mut losses = Vec::new();
        for step in first..first + steps {
            let range = GlobalSampler::replica_samples((step * GLOBAL_BATCH) as u64, GLOBAL_BATCH / dp, groups.coords.dp);
            let (x, y) = samples(range);
            let loss = model.loss(Tensor::<B, 2, Int>::from_data(x, &Default::default()), Tensor::from_data(y, &Default::default()));
            let value = burn_parallel::comm::ops::all_reduce(
                Tensor::<Inner, 1>::from_floats([loss.clone().into_scalar()], &Default::default()),
                burn_parallel::ReduceOp::Mean,
                &groups.dp,
            )
            .unwrap()
            .into_scalar();
            losses.push(value);
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = opt.step(1e-2, vec![(model, grads)], Some(1.0)).map_err(|e| e.to_string())?.0.remove(0);
        }
        if let Some(dir) = save {
            let (tensors, counters) = opt.state_tensors(&[(&model, &same)], ctx);
            let train = TrainState { step: (first + steps) as u64, ..Default::default() };
            let snap = Snapshot { step: train.step, layout: groups.config.clone(), train, tensors, counters, sections: Default::default() };
            Checkpointer::new(CheckpointOptions { dir: dir.to_path_buf(), keep: 0, async_save: false }, c).save(snap).map_err(|e| e.to_string())?;
        }
        Ok(losses)
    })
    .remove(0)
}

#[test]
fn optimizer_checkpoints_reshard_between_zero_and_plain_dp_dp_sizes_and_precisions() {
    use burn_parallel::checkpoint::{full_tensors, Checkpoint};
    let cases = [
        ((2, true, Precision::Bf16), (1, false, Precision::Bf16)),
        ((1, false, Precision::F32), (2, true, Precision::F32)),
        ((2, true, Precision::F32), (4, true, Precision::F32)),
        ((4, true, Precision::Bf16), (2, false, Precision::F32)),
        ((2, false, Precision::F32), (1, false, Precision::Bf16)),
    ];
    for ((da, za, pa), (db, zb, pb)) in cases {
        let what = format!("dp {da} zero {za} {pa} -> dp {db} zero {zb} {pb}");
        let (dir_a, dir_b) = (runner::temp_dir("opt-a"), runner::temp_dir("opt-b"));
        run(da, za, pa, None, 2, Some(&dir_a));
        run(db, zb, pb, Some(&dir_a), 0, Some(&dir_b));
        let (a, b) = (Checkpoint::open(&dir_a).unwrap(), Checkpoint::open(&dir_b).unwrap());
        let (ta, tb) = (full_tensors(&a, "").unwrap(), full_tensors(&b, "").unwrap());
        assert_eq!(ta.keys().collect::<Vec<_>>(), tb.keys().collect::<Vec<_>>(), "{what}");
        assert!(ta.keys().any(|k| k.starts_with("optim.exp_avg.")));
        for (name, x) in &ta {
            // Exact also across precisions: a bf16 run saves its f32 masters as the weights.
            assert!(x == &tb[name], "{what}: {name} differs");
            assert_eq!(x.dtype, DType::F32, "{what}: {name} is saved in f32");
        }
        assert_eq!(a.metadata().counters, b.metadata().counters, "{what}");
        let (la, lb) = (run(da, za, pa, Some(&dir_a), 2, None), run(db, zb, pb, Some(&dir_a), 2, None));
        let tol = if pa == Precision::Bf16 || pb == Precision::Bf16 { 1e-2 } else { 1e-5 };
        for (x, y) in la.iter().zip(&lb) {
            assert!((x - y).abs() <= tol * x.abs(), "{what}: continued losses {la:?} vs {lb:?}");
        }
        std::fs::remove_dir_all(dir_a).unwrap();
        std::fs::remove_dir_all(dir_b).unwrap();
    }
}

/// A resumed run regroups the loaded per-parameter state (moments, f32 masters, step counts)
/// into fused groups: its losses are bitwise those of the uninterrupted run.
#[test]
fn resumed_state_regroups_into_the_uninterrupted_run() {
    for (dp, zero, precision) in [(2, true, Precision::Bf16), (1, false, Precision::F32)] {
        let bits = |l: &[f32]| l.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let straight = run(dp, zero, precision, None, 4, None);
        let dir = runner::temp_dir("opt-regroup");
        run(dp, zero, precision, None, 2, Some(&dir));
        let resumed = run(dp, zero, precision, Some(&dir), 2, None);
        assert_eq!(bits(&straight[2..]), bits(&resumed), "dp {dp} zero {zero} {precision}: {straight:?} then {resumed:?}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}

/// Every float parameter's id and rank.
struct Ids(Vec<(burn::module::ParamId, usize)>);

impl burn::module::ModuleVisitor<B> for Ids {
    fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<B, D>>) {
        self.0.push((param.id, D));
    }
}

/// Two parameters without a gradient in one step (as if frozen for it): they keep their values
/// and state, their fused groups are broken up around them (their step counts lag from then
/// on), and every parameter is bitwise the per-parameter update's after 4 steps; bf16 with f32
/// masters, ZeRO over dp 2.
#[test]
fn parameters_without_a_gradient_break_their_group_up_bitwise() {
    use burn::module::Module;
    let config = gpt(2, false, 0.0).with_precision(Precision::Bf16);
    let run = |bytes: usize| {
        world(2, |c| {
            let groups = ProcessGroups::new(ParallelConfig::new().with_data_parallel(2), c).map_err(|e| e.to_string())?;
            let mut model = config.init::<B>(&groups.tp, &Default::default()).map_err(|e| e.to_string())?;
            let mut opt = DistAdamW::<B>::new(DistAdamWConfig::new().with_zero(true).with_group_bytes(bytes), &groups);
            let mut ids = Ids(Vec::new());
            model.visit(&mut ids);
            for step in 0..4 {
                let range = GlobalSampler::replica_samples((step * GLOBAL_BATCH) as u64, GLOBAL_BATCH / 2, groups.coords.dp);
                let (x, y) = samples(range);
                let loss = model.loss(Tensor::<B, 2, Int>::from_data(x, &Default::default()), Tensor::from_data(y, &Default::default()));
                let mut grads = GradientsParams::from_grads(loss.backward(), &model);
                if step == 1 {
                    for &(id, rank) in [ids.0[3], ids.0[8]].iter() {
                        let removed = if rank == 1 { grads.remove::<Inner, 1>(id).is_some() } else { grads.remove::<Inner, 2>(id).is_some() };
                        assert!(removed, "parameter {id} of rank {rank} had a gradient");
                    }
                }
                model = opt.step(1e-2, vec![(model, grads)], Some(1.0)).map_err(|e| e.to_string())?.0.remove(0);
            }
            Ok(named_params(&model).into_iter().map(|p| (p.path, p.value.convert::<f32>().to_vec::<f32>().unwrap())).collect::<Vec<_>>())
        })
    };
    let per_parameter = run(0);
    for bytes in [3000, 26214400] {
        assert!(run(bytes) == per_parameter, "group bytes {bytes}");
    }
}
