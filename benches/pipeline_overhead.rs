//! Pipeline executor overhead: stages whose forward and backward sleep a fixed time, run by the
//! executor on threads; the measured step time against the simulator's makespan for the same
//! costs, and the measured bubble against theory, per schedule.
//! `cargo bench --bench pipeline_overhead` (env: PIPE_F_MS, default 20; backward = 2 × forward;
//! PIPE_P2P=rendezvous for NCCL's point-to-point rules).

use std::fmt::Debug;
use std::time::{Duration, Instant};

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{unary, Backward, Ops, OpsKind};
use burn::backend::{Autodiff, Flex};
use burn::module::{Module, Param};
use burn::tensor::{Tensor, TensorPrimitive};
use burn_parallel::pipeline::{PartSpec, PipelineExecutor, PipelineModel, PipelineOptions, StageOutput};
use burn_parallel::{all_ok, run_world, ConfigError, LocalWorldOptions, P2pMode};
use burn_parallel_schedules::{schedule_by_name, simulate, Costs, PipelineShape};

type B = Autodiff<Flex>;

/// Identity whose forward sleeps `f` and whose backward sleeps `b`.
#[derive(Debug)]
struct DelayBackward;

impl Backward<Flex, 1> for DelayBackward {
    type State = Duration;
    fn backward(self, ops: Ops<Duration, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let wait = ops.state;
        unary::<Flex, _>(ops.parents, ops.node, grads, |g| {
            std::thread::sleep(wait);
            g
        });
    }
}

fn delay(x: Tensor<B, 2>, f: Duration, b: Duration) -> Tensor<B, 2> {
    let p = x.into_primitive().tensor();
    std::thread::sleep(f);
    let out = match DelayBackward.prepare::<burn::backend::autodiff::checkpoint::strategy::NoCheckpointing>([p.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish(b, p.primitive),
        OpsKind::UnTracked(prep) => prep.finish(p.primitive),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

#[derive(Module, Debug)]
struct Scale<B: burn::tensor::backend::Backend> {
    w: Param<Tensor<B, 1>>,
}

struct Sleepy {
    f: Duration,
    b: Duration,
    layers: usize,
    /// Charge the backward cost inside Burn's autodiff backward (holding the graph lock), or
    /// outside it (after the backward returns).
    inside: bool,
}

impl PipelineModel<B, 2> for Sleepy {
    type Part = Scale<B>;
    type MicroBatch = ();
    fn num_layers(&self) -> usize {
        self.layers
    }
    fn build_part(&self, _: &PartSpec, device: &burn::tensor::Device<B>) -> Result<Scale<B>, ConfigError> {
        Ok(Scale { w: Param::from_tensor(Tensor::ones([4], device)) })
    }
    fn after_backward(&self, _: &PartSpec, _: usize) {
        if !self.inside {
            std::thread::sleep(self.b);
        }
    }
    fn activation_shape(&self, _: &()) -> [usize; 2] {
        [1, 4]
    }
    fn forward(&self, part: &Scale<B>, spec: &PartSpec, input: Option<Tensor<B, 2>>, _: &()) -> StageOutput<B, 2> {
        let x = input.unwrap_or_else(|| Tensor::ones([1, 4], &Default::default()));
        let b = if self.inside { self.b } else { Duration::ZERO };
        let y = delay(x * part.w.val().unsqueeze(), self.f, b);
        if spec.is_last() {
            StageOutput::Loss(y.sum())
        } else {
            StageOutput::Activation(y)
        }
    }
}

fn measure(schedule: &str, p: usize, v: usize, m: usize, f: Duration, inside: bool) -> (f64, f64) {
    let b = 2 * f;
    let res = run_world(p, LocalWorldOptions { p2p: p2p_mode(), ..Default::default() }, |c| {
        let opts = PipelineOptions { microbatches: m, virtual_stages: v, layout: None };
        let model = Sleepy { f, b, layers: p * v, inside };
        let exec = PipelineExecutor::<B, _, 2>::new(model, schedule_by_name(schedule).unwrap().as_ref(), &opts, c.clone(), Default::default())
            .map_err(|e| e.to_string())?;
        let batch = vec![(); m];
        exec.step(&batch).map_err(|e| e.to_string())?; // warm-up
        c.barrier().map_err(|e| e.to_string())?;
        let start = Instant::now();
        exec.step(&batch).map_err(|e| e.to_string())?;
        Ok::<f64, String>(start.elapsed().as_secs_f64())
    });
    let measured = all_ok(res).expect("bench world").into_iter().fold(0.0, f64::max);
    // The executor runs zb-h1's I as the whole backward and W as bookkeeping.
    let split = schedule == "zb-h1";
    let ms = f.as_secs_f64();
    let costs =
        Costs { forward: ms, backward: 2.0 * ms, backward_input: if split { 2.0 * ms } else { ms }, backward_weight: if split { 0.0 } else { ms }, comm: 0.0 };
    let plan = schedule_by_name(schedule).unwrap().plan(&PipelineShape::new(p, v, m)).unwrap();
    (measured, simulate(&plan, &costs).unwrap().makespan)
}

/// `PIPE_P2P=rendezvous` runs the ranks under NCCL's point-to-point rules (batches complete when
/// received), default buffered.
fn p2p_mode() -> P2pMode {
    match std::env::var("PIPE_P2P").as_deref() {
        Ok("rendezvous") => P2pMode::Rendezvous,
        _ => P2pMode::Buffered,
    }
}

fn main() {
    println!("point-to-point: {:?}", p2p_mode());
    let f_ms: u64 = std::env::var("PIPE_F_MS").ok().and_then(|s| s.parse().ok()).unwrap_or(20);
    let f = Duration::from_millis(f_ms);
    for inside in [false, true] {
        table(f, inside);
    }
}

fn table(f: Duration, inside: bool) {
    let f_ms = f.as_millis();
    let where_ = if inside { "inside autodiff backward (holds Burn's graph lock)" } else { "after backward returns (executor overhead alone)" };
    println!("\nstage forward {f_ms} ms, backward {} ms charged {where_}; ranks as threads\n", 2 * f_ms);
    println!("| schedule | p | v | m | simulated | measured | measured/simulated | bubble theory | bubble measured |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for (schedule, v) in [("gpipe", 1), ("1f1b", 1), ("interleaved-1f1b", 2), ("zb-h1", 1)] {
        for (p, m) in [(2, 4), (4, 8)] {
            let (measured, simulated) = measure(schedule, p, v, m, f, inside);
            let busy = (m * v) as f64 * 3.0 * f.as_secs_f64();
            let theory = match schedule {
                "interleaved-1f1b" => (p - 1) as f64 / (v * m + p - 1) as f64,
                _ => (p - 1) as f64 / (m + p - 1) as f64,
            };
            println!(
                "| {schedule} | {p} | {v} | {m} | {:.1} ms | {:.1} ms | {:.3} | {:.1}% | {:.1}% |",
                simulated * 1e3,
                measured * 1e3,
                measured / simulated,
                100.0 * theory,
                100.0 * (1.0 - busy / measured)
            );
        }
    }
}
