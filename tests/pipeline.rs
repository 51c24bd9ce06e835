//! Pipelined training steps equal the single-rank model: loss and every parameter gradient, for
//! every schedule, pp ∈ {2, 4}, m ∈ {p, 2p+1}, also with tp = 2; a second, different model goes
//! through the same wrapper; bad configurations are clear errors.

mod common;

use std::collections::HashMap;

use burn::module::{AutodiffModule, Module};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{Int, Tensor, TensorData};
use burn_parallel::params::{named_grads, named_param_grads, NamedParam};
use burn_parallel::pipeline::{PartSpec, PipelineError, PipelineExecutor, PipelineModel, PipelineOptions, StageOutput};
use burn_parallel::rng::HostRng;
use burn_parallel::{ConfigError, ParallelConfig, ProcessGroups};
use burn_parallel_modules::{GptConfig, GptPipeline, TokenBatch};
use burn_parallel_schedules::{schedule_by_name, Action, GPipe, PipelineShape, Plan, Schedule, ScheduleError};
use common::*;

fn gpt() -> GptConfig {
    GptConfig::new(32, 8, 16, 2, 8, 32)
}

fn tokens(name: &str, shape: [usize; 2]) -> TensorData {
    let mut rng = HostRng::new(3, name);
    TensorData::new((0..shape[0] * shape[1]).map(|_| (rng.next_u64() % 32) as i64).collect::<Vec<_>>(), shape)
}

/// `m` micro-batches of 2 sequences, and the same data as one batch.
fn batches(m: usize) -> (Vec<TokenBatch>, TokenBatch) {
    let mbs: Vec<TokenBatch> = (0..m).map(|i| TokenBatch { inputs: tokens(&format!("x{i}"), [2, 8]), targets: tokens(&format!("y{i}"), [2, 8]) }).collect();
    let cat = |f: fn(&TokenBatch) -> &TensorData| burn_parallel::comm::concat_along(&mbs.iter().map(f).collect::<Vec<_>>(), 0).unwrap();
    let full = TokenBatch { inputs: cat(|b| &b.inputs), targets: cat(|b| &b.targets) };
    (mbs, full)
}

/// Loss and gradients of the unsplit GPT (tp = 1, one rank) on the full batch.
fn reference(full: &TokenBatch) -> (f32, HashMap<String, NamedParam>) {
    world(1, |c| {
        let model = gpt().init::<B>(&c, &Default::default()).unwrap();
        let dev = Default::default();
        let loss = model.loss(Tensor::<B, 2, Int>::from_data(full.inputs.clone(), &dev), Tensor::from_data(full.targets.clone(), &dev));
        let value = loss.clone().into_scalar();
        let grads = named_grads(&model, &loss.backward());
        Ok((value, grads.into_iter().map(|p| (p.path.clone(), p)).collect()))
    })
    .remove(0)
}

/// Runs one pipelined step on a dp=1 world of `pp × tp` ranks; returns (tp rank, loss, named grads).
fn pipelined(config: &GptConfig, schedule: &str, pp: usize, tp: usize, v: usize, m: usize, mbs: &[TokenBatch]) -> Vec<(usize, f32, Vec<NamedParam>)> {
    let cfg = ParallelConfig::new().with_pipeline_parallel(pp).with_tensor_parallel(tp);
    world(pp * tp, |c| {
        let groups = ProcessGroups::new(cfg.clone(), c).map_err(|e| e.to_string())?;
        let model = GptPipeline { config: config.clone(), tp: groups.tp.clone(), cp: None };
        let opts = PipelineOptions { microbatches: m, virtual_stages: v, layout: None };
        let sched = schedule_by_name(schedule).map_err(|e| e.to_string())?;
        let exec = PipelineExecutor::<B, _, 3>::new(model, sched.as_ref(), &opts, groups.pp.clone(), Default::default()).map_err(|e| e.to_string())?;
        let out = exec.step(mbs).map_err(|e| e.to_string())?;
        let mut named = Vec::new();
        for (stage, grads) in exec.stages().iter().zip(&out.grads) {
            for p in named_param_grads(&stage.part, grads) {
                named.push(NamedParam { path: global_path(&p.path, stage.part.first_layer), ..p });
            }
        }
        Ok((groups.coords.tp, out.loss, named))
    })
}

fn check(schedule: &str, pp: usize, tp: usize, v: usize, m: usize) {
    check_with(&gpt(), schedule, pp, tp, v, m)
}

fn check_with(config: &GptConfig, schedule: &str, pp: usize, tp: usize, v: usize, m: usize) {
    let (mbs, full) = batches(m);
    let (ref_loss, ref_grads) = reference(&full);
    let ranks = pipelined(config, schedule, pp, tp, v, m, &mbs);
    let mut covered: HashMap<String, usize> = HashMap::new();
    for (tp_rank, loss, params) in &ranks {
        assert!((loss - ref_loss).abs() < TOL, "{schedule} pp={pp} tp={tp} m={m}: loss {loss} vs {ref_loss}");
        for p in params {
            let r = ref_grads.get(&p.path).unwrap_or_else(|| panic!("unknown parameter {}", p.path));
            let what = format!("{schedule} pp={pp} tp={tp} v={v} m={m}: grad of {}", p.path);
            assert_shard(&what, r.grad.as_ref().unwrap(), p.grad.as_ref().unwrap_or_else(|| panic!("{what}: missing")), *tp_rank, tp, TOL);
            *covered.entry(p.path.clone()).or_default() += 1;
        }
    }
    for path in ref_grads.keys() {
        assert_eq!(covered.get(path), Some(&tp), "{schedule} pp={pp}: {path} held {:?} times, want once per TP rank", covered.get(path));
    }
}

#[test]
fn gpipe_1f1b_and_zb_h1_equal_the_single_rank_step() {
    for schedule in ["gpipe", "1f1b", "zb-h1"] {
        for pp in [2, 4] {
            for m in [pp, 2 * pp + 1] {
                check(schedule, pp, 1, 1, m);
            }
        }
    }
}

/// Consecutive stages on one rank hand activations and gradients over locally (no messages).
#[test]
fn stages_sharing_a_rank_hand_over_locally() {
    check("interleaved-1f1b", 1, 1, 2, 3);
    check("gpipe", 1, 1, 1, 2);
}

#[test]
fn interleaved_1f1b_equals_the_single_rank_step() {
    for pp in [2, 4] {
        for m in [pp, 2 * pp + 1] {
            check("interleaved-1f1b", pp, 1, 2, m);
        }
    }
}

/// Pipelined evaluation runs without dropout: `forward_loss` gives the same value twice and
/// equals the unsplit model's `valid()` loss, though the model trains with dropout 0.5; also
/// with its stages tensor-parallel under sequence parallelism (`forward_valid` runs the TP
/// collectives on the inner backend).
#[test]
fn pipelined_evaluation_runs_without_dropout() {
    let config = gpt().with_dropout(0.5);
    let (mbs, full) = batches(4);
    let want = world(1, |c| {
        let model = config.init::<B>(&c, &Default::default()).unwrap().valid();
        let dev = Default::default();
        let (x, t) = (Tensor::<Inner, 2, Int>::from_data(full.inputs.clone(), &dev), Tensor::from_data(full.targets.clone(), &dev));
        Ok(model.loss(x, t).into_scalar())
    })
    .remove(0);
    for tp in [1, 2] {
        let config = config.clone().with_sequence_parallel(tp > 1);
        let cfg = ParallelConfig::new().with_pipeline_parallel(2).with_tensor_parallel(tp);
        let got = world(2 * tp, |c| {
            let groups = ProcessGroups::new(cfg.clone(), c).map_err(|e| e.to_string())?;
            let model = GptPipeline { config: config.clone(), tp: groups.tp.clone(), cp: None };
            let opts = PipelineOptions { microbatches: 4, virtual_stages: 1, layout: None };
            let sched = schedule_by_name("1f1b").map_err(|e| e.to_string())?;
            let exec = PipelineExecutor::<B, _, 3>::new(model, sched.as_ref(), &opts, groups.pp.clone(), Default::default()).map_err(|e| e.to_string())?;
            let first = exec.forward_loss(&mbs).map_err(|e| e.to_string())?;
            Ok((first, exec.forward_loss(&mbs).map_err(|e| e.to_string())?))
        });
        for (first, second) in got {
            assert_eq!(first, second);
            assert!((first - want).abs() < TOL, "tp {tp}: pipelined eval loss {first} vs valid() {want}");
        }
    }
}

/// m = 3p − 1 at even p: a receive from a slow peer listed first in a batch must not hold up
/// another peer's send to this rank (NCCL progresses a group's operations together).
#[test]
fn interleaved_1f1b_with_3p_minus_1_microbatches() {
    check("interleaved-1f1b", 4, 1, 2, 11);
}

#[test]
fn tensor_and_pipeline_parallel_together() {
    check("1f1b", 2, 2, 1, 3);
    check("interleaved-1f1b", 2, 2, 2, 2);
}

#[test]
fn sequence_parallel_stages_exchange_shards_and_equal_the_single_rank_step() {
    check_with(&gpt().with_sequence_parallel(true), "1f1b", 2, 2, 1, 3);
}

// ---- a second, different model through the same wrapper: a deep MLP regression ----

struct DeepMlp {
    width: usize,
    layers: usize,
}

#[derive(Module, Debug)]
struct MlpPart<B: burn::tensor::backend::Backend> {
    layers: Vec<Linear<B>>,
}

#[derive(Clone)]
struct Xy {
    x: TensorData,
    y: TensorData,
}

impl DeepMlp {
    fn layer(&self, i: usize) -> Linear<B> {
        let mut l = LinearConfig::new(self.width, self.width).init::<B>(&Default::default());
        let w = TensorData::new(HostRng::new(1, &format!("mlp{i}")).normal_vec(self.width * self.width, 0.4), [self.width, self.width]);
        let b = TensorData::new(HostRng::new(2, &format!("mlp{i}")).normal_vec(self.width, 0.4), [self.width]);
        l.weight = burn::module::Param::from_tensor(Tensor::from_data(w, &Default::default()));
        l.bias = Some(burn::module::Param::from_tensor(Tensor::from_data(b, &Default::default())));
        l
    }

    fn run(&self, layers: &[Linear<B>], mut x: Tensor<B, 2>) -> Tensor<B, 2> {
        for l in layers {
            x = burn::tensor::activation::tanh(l.forward(x));
        }
        x
    }
}

impl PipelineModel<B, 2> for DeepMlp {
    type Part = MlpPart<B>;
    type MicroBatch = Xy;
    fn num_layers(&self) -> usize {
        self.layers
    }
    fn build_part(&self, spec: &PartSpec, _: &burn::tensor::Device<B>) -> Result<MlpPart<B>, ConfigError> {
        Ok(MlpPart { layers: spec.layers.clone().map(|i| self.layer(i)).collect() })
    }
    fn activation_shape(&self, mb: &Xy) -> [usize; 2] {
        [mb.x.shape[0], self.width]
    }
    fn forward(&self, part: &MlpPart<B>, spec: &PartSpec, input: Option<Tensor<B, 2>>, mb: &Xy) -> StageOutput<B, 2> {
        let x = input.unwrap_or_else(|| Tensor::from_data(mb.x.clone(), &Default::default()));
        let y = self.run(&part.layers, x);
        if spec.is_last() {
            let t = Tensor::<B, 2>::from_data(mb.y.clone(), &Default::default());
            StageOutput::Loss((y - t).powi_scalar(2).mean().reshape([1]))
        } else {
            StageOutput::Activation(y)
        }
    }
}

#[test]
fn a_deep_mlp_splits_through_the_same_wrapper_with_an_explicit_layout() {
    let mlp = DeepMlp { width: 6, layers: 5 };
    let data: Vec<Xy> = (0..3).map(|i| Xy { x: randn(&format!("mx{i}"), [4, 6]), y: randn(&format!("my{i}"), [4, 6]) }).collect();
    // Reference: one rank, the mean of the micro-batch losses.
    let all: Vec<Linear<B>> = (0..5).map(|i| mlp.layer(i)).collect();
    let part = MlpPart { layers: all };
    let losses: Vec<Tensor<B, 1>> = data
        .iter()
        .map(|d| {
            (mlp.run(&part.layers, Tensor::from_data(d.x.clone(), &Default::default())) - Tensor::<B, 2>::from_data(d.y.clone(), &Default::default()))
                .powi_scalar(2)
                .mean()
                .reshape([1])
        })
        .collect();
    let loss = Tensor::cat(losses, 0).mean();
    let ref_loss = loss.clone().into_scalar();
    let ref_grads = named_grads(&part, &loss.backward());
    let out = world(2, |c| {
        let opts = PipelineOptions { microbatches: 3, virtual_stages: 1, layout: Some(vec![2, 3]) };
        let exec = PipelineExecutor::<B, _, 2>::new(DeepMlp { width: 6, layers: 5 }, schedule_by_name("1f1b").unwrap().as_ref(), &opts, c, Default::default())
            .map_err(|e| e.to_string())?;
        // A model without `forward_valid` evaluates on detached parameters.
        let eval = exec.forward_loss(&data).map_err(|e| e.to_string())?;
        let out = exec.step(&data).map_err(|e| e.to_string())?;
        let first = exec.stages()[0].spec.layers.start;
        Ok((eval, out.loss, first, named_param_grads(&exec.stages()[0].part, &out.grads[0])))
    });
    for (eval, loss, first, params) in out {
        assert!((eval - ref_loss).abs() < TOL, "evaluation loss {eval} vs {ref_loss}");
        assert!((loss - ref_loss).abs() < TOL, "loss {loss} vs {ref_loss}");
        for p in params {
            let path = global_path(&p.path.replace("layers.", "blocks."), first).replace("blocks.", "layers.");
            let r = ref_grads.iter().find(|q| q.path == path).unwrap();
            assert!(max_abs_diff(r.grad.as_ref().unwrap(), p.grad.as_ref().unwrap()).unwrap() < TOL, "{path}");
        }
    }
}

#[test]
fn bad_pipeline_configurations_are_clear_errors() {
    let err = |opts: PipelineOptions, schedule: &str, pp: usize| -> String {
        let res = burn_parallel::run_world(pp, Default::default(), |c| {
            PipelineExecutor::<B, _, 2>::new(DeepMlp { width: 4, layers: 4 }, schedule_by_name(schedule).unwrap().as_ref(), &opts, c, Default::default())
                .map(|_| ())
        });
        res.into_iter().next().unwrap().unwrap_err().to_string()
    };
    let e = err(PipelineOptions { microbatches: 1, virtual_stages: 1, layout: None }, "1f1b", 2);
    assert!(e.contains("schedule 1f1b needs at least 2 micro-batches for 2 pipeline ranks, got 1"), "{e}");
    let e = err(PipelineOptions { microbatches: 2, virtual_stages: 1, layout: Some(vec![1, 2]) }, "1f1b", 2);
    assert!(e.contains("layout [1, 2] places 3 layers but the model has 4"), "{e}");
    let e = err(PipelineOptions { microbatches: 2, virtual_stages: 1, layout: Some(vec![4]) }, "1f1b", 2);
    assert!(e.contains("layout has 1 stages but 2 ranks x 1 virtual stages need 2"), "{e}");
    let e = err(PipelineOptions { microbatches: 4, virtual_stages: 3, layout: None }, "interleaved-1f1b", 2);
    assert!(e.contains("4 layers cannot fill 6 pipeline stages"), "{e}");
    // A step with the wrong number of micro-batches.
    let res = world(1, |c| {
        let opts = PipelineOptions { microbatches: 2, virtual_stages: 1, layout: None };
        let exec = PipelineExecutor::<B, _, 2>::new(DeepMlp { width: 4, layers: 2 }, schedule_by_name("gpipe").unwrap().as_ref(), &opts, c, Default::default())
            .unwrap();
        Ok(matches!(exec.step(&[]), Err(PipelineError::Microbatches { expected: 2, got: 0 })))
    });
    assert!(res[0]);
}

/// A schedule overriding `plan` badly: another pipeline's plan, or a rank's last action dropped.
#[derive(Debug)]
struct BadPlan {
    other_shape: bool,
}

impl Schedule for BadPlan {
    fn name(&self) -> &'static str {
        "bad-plan"
    }
    fn compute_order(&self, shape: &PipelineShape) -> Result<Vec<Vec<Action>>, ScheduleError> {
        GPipe.compute_order(shape)
    }
    fn plan(&self, shape: &PipelineShape) -> Result<Plan, ScheduleError> {
        if self.other_shape {
            return GPipe.plan(&PipelineShape::new(1, 1, shape.microbatches));
        }
        let mut plan = GPipe.plan(shape)?;
        plan.ranks[0].pop();
        Ok(plan)
    }
}

#[test]
fn an_overridden_plan_is_checked_before_it_runs() {
    for other_shape in [true, false] {
        let res = burn_parallel::run_world(2, Default::default(), |c| {
            let opts = PipelineOptions { microbatches: 2, virtual_stages: 1, layout: None };
            PipelineExecutor::<B, _, 2>::new(DeepMlp { width: 4, layers: 2 }, &BadPlan { other_shape }, &opts, c, Default::default()).map(|_| ())
        });
        let e = res.into_iter().next().unwrap().unwrap_err().to_string();
        let want = if other_shape { "schedule bad-plan returned a plan for" } else { "invalid plan: " };
        assert!(e.contains(want), "{e}");
    }
}

/// A model that announces the wrong activation shape: the receiver reports both ranks and shapes.
#[test]
fn a_p2p_shape_mismatch_names_both_ranks() {
    struct Liar(DeepMlp);
    impl PipelineModel<B, 2> for Liar {
        type Part = MlpPart<B>;
        type MicroBatch = Xy;
        fn num_layers(&self) -> usize {
            self.0.layers
        }
        fn build_part(&self, spec: &PartSpec, d: &burn::tensor::Device<B>) -> Result<MlpPart<B>, ConfigError> {
            self.0.build_part(spec, d)
        }
        fn activation_shape(&self, mb: &Xy) -> [usize; 2] {
            [mb.x.shape[0], self.0.width + 1]
        }
        fn forward(&self, part: &MlpPart<B>, spec: &PartSpec, input: Option<Tensor<B, 2>>, mb: &Xy) -> StageOutput<B, 2> {
            self.0.forward(part, spec, input, mb)
        }
    }
    let data = vec![Xy { x: randn("x", [2, 4]), y: randn("y", [2, 4]) }; 2];
    let res = burn_parallel::run_world(2, Default::default(), |c| {
        let opts = PipelineOptions { microbatches: 2, virtual_stages: 1, layout: None };
        let exec =
            PipelineExecutor::<B, _, 2>::new(Liar(DeepMlp { width: 4, layers: 2 }), schedule_by_name("gpipe").unwrap().as_ref(), &opts, c, Default::default())?;
        exec.step(&data).map(|_| ())
    });
    let e = res[1].as_ref().unwrap_err().to_string();
    assert!(e.contains("rank 0 sent [2, 4] F32 but rank 1 expected [2, 5] F32"), "{e}");
}
