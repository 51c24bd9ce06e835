//! Shared helpers of the integration tests: worlds of ranks on CPU threads and sliced comparisons.
#![allow(dead_code)]

pub mod runner;

use std::time::Duration;

use burn::backend::{Autodiff, Flex};
use burn::tensor::{Tensor, TensorData};
use burn_parallel::comm::split_along;
use burn_parallel::params::NamedParam;
use burn_parallel::rng::HostRng;
use burn_parallel::{all_ok, run_world, Comm, LocalWorldOptions, P2pMode};

pub type B = Autodiff<Flex>;
pub type Inner = Flex;

pub const TOL: f32 = 1e-5;

/// Runs `f` on `n` thread ranks (30 s timeout) and returns every rank's value, panicking with all
/// rank errors otherwise. Point-to-point follows NCCL's rules ([`P2pMode::Rendezvous`]), so every
/// pipeline test also proves the executor cannot hang or mismatch messages on NCCL.
///
/// With `--features cuda` and `BURN_PARALLEL_TEST_COMM=nccl-emu`, the ranks talk through
/// `NcclComm` over the NCCL emulator instead (CI runs the parity suites that way), so the NCCL
/// communicator's own logic is checked with several ranks without GPUs; with
/// `BURN_PARALLEL_TEST_COMM=tcp`, through `TcpComm` over loopback (each rank its own
/// connections, as rank processes have; CI runs the parity suites that way too).
pub fn world<T: Send>(n: usize, f: impl Fn(Comm) -> Result<T, String> + Send + Sync) -> Vec<T> {
    #[cfg(feature = "cuda")]
    if std::env::var("BURN_PARALLEL_TEST_COMM").as_deref() == Ok("nccl-emu") {
        return emulated_nccl(n, f);
    }
    if std::env::var("BURN_PARALLEL_TEST_COMM").as_deref() == Ok("tcp") {
        let comms = burn_parallel::TcpComm::loopback_world(n, Duration::from_secs(60)).unwrap_or_else(|e| panic!("TCP world of {n}: {e}"));
        return on_threads(comms, "TCP", f);
    }
    let opts = LocalWorldOptions { timeout: Duration::from_secs(30), p2p: P2pMode::Rendezvous };
    all_ok(run_world(n, opts, f)).unwrap_or_else(|e| panic!("world of {n} failed:\n{e}"))
}

/// Runs `f` with each communicator on its own thread; every rank's value, or a panic listing
/// every rank's error.
fn on_threads<T: Send>(comms: Vec<Comm>, what: &str, f: impl Fn(Comm) -> Result<T, String> + Send + Sync) -> Vec<T> {
    let n = comms.len();
    let f = &f;
    let results: Vec<Result<T, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = comms.into_iter().map(|c| s.spawn(move || f(c))).collect();
        handles.into_iter().enumerate().map(|(r, h)| h.join().unwrap_or_else(|p| Err(format!("rank {r} panicked: {}", panic_text(&p))))).collect()
    });
    let errors: Vec<String> = results.iter().enumerate().filter_map(|(r, x)| x.as_ref().err().map(|e| format!("rank {r}: {e}"))).collect();
    assert!(errors.is_empty(), "{what} world of {n} failed:\n{}", errors.join("\n"));
    results.into_iter().map(|r| r.unwrap_or_else(|_| unreachable!("checked"))).collect()
}

/// A deterministic `N(0,1)` tensor of `shape` named `name`.
pub fn randn<const D: usize>(name: &str, shape: [usize; D]) -> TensorData {
    let n = shape.iter().product();
    TensorData::new(HostRng::new(1234, name).normal_vec(n, 1.0), shape)
}

/// A fresh leaf on this rank (never share a tracked tensor between rank threads).
pub fn leaf<const D: usize>(data: TensorData) -> Tensor<B, D> {
    Tensor::<B, D>::from_data(data, &Default::default()).require_grad()
}

/// The max absolute difference, or a message with the shapes if they differ.
pub fn max_abs_diff(a: &TensorData, b: &TensorData) -> Result<f32, String> {
    if a.shape != b.shape {
        return Err(format!("shape {:?} vs {:?}", a.shape.as_slice(), b.shape.as_slice()));
    }
    let (x, y) = (a.clone().convert::<f32>().to_vec::<f32>().unwrap(), b.clone().convert::<f32>().to_vec::<f32>().unwrap());
    // NaN counts as infinite difference (`f32::max` alone would drop it and pass NaN outputs).
    Ok(x.iter().zip(&y).map(|(p, q)| (p - q).abs()).map(|d| if d.is_nan() { f32::INFINITY } else { d }).fold(0.0, f32::max))
}

/// The slice of `reference` that `rank` of `t` should hold, inferred from `local`'s shape: the
/// whole tensor when the shapes agree (replicated), else its `rank`-th slice along the one
/// dimension where `local` is `t` times smaller.
pub fn expected_shard(reference: &TensorData, local_shape: &[usize], rank: usize, t: usize) -> Result<TensorData, String> {
    let r = reference.shape.as_slice();
    if r == local_shape {
        return Ok(reference.clone());
    }
    let dims: Vec<usize> = (0..r.len()).filter(|&d| r[d] != local_shape[d]).collect();
    match dims.as_slice() {
        [d] if r[*d] == local_shape[*d] * t => split_along(reference, *d, t, rank),
        _ => Err(format!("local shape {local_shape:?} is no 1/{t} slice of {r:?}")),
    }
}

/// Asserts `local` equals `reference` sliced for `rank` within `tol`.
pub fn assert_shard(what: &str, reference: &TensorData, local: &TensorData, rank: usize, t: usize, tol: f32) {
    let want = expected_shard(reference, local.shape.as_slice(), rank, t).unwrap_or_else(|e| panic!("{what} (rank {rank}/{t}): {e}"));
    let d = max_abs_diff(&want, local).unwrap_or_else(|e| panic!("{what} (rank {rank}/{t}): {e}"));
    assert!(d <= tol, "{what} (rank {rank} of tp={t}): max |diff| = {d:e} > {tol:e}");
}

/// `‖a − b‖∞ ≤ tol · max(‖a‖∞, 1e-5)` for the slice of `full` that `rank` of `t` holds.
pub fn close(what: &str, full: &TensorData, local: &TensorData, rank: usize, t: usize, tol: f32) -> f32 {
    let want = expected_shard(&full.clone().convert::<f32>(), local.shape.as_slice(), rank, t).unwrap();
    // The floor: the key bias's gradient is exactly 0 in exact arithmetic (softmax ignores a
    // shift shared by a row's scores), so only rounding noise (~1e-7) is there to compare.
    let scale = want.to_vec::<f32>().unwrap().iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-5);
    let err = max_abs_diff(&want, &local.clone().convert::<f32>()).unwrap() / scale;
    assert!(err <= tol, "{what} (rank {rank} of {t}): ‖diff‖∞ / ‖ref‖∞ = {err}");
    err
}

/// What one rank computed: output, input gradient, parameters with gradients.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub output: TensorData,
    pub input_grad: Option<TensorData>,
    pub params: Vec<NamedParam>,
}

/// Compares every rank's outcome with the unsharded reference: output, input gradient, and each
/// parameter's value and gradient (sliced per rank). Returns the number of tensors compared.
pub fn assert_parity(reference: &Outcome, ranks: &[Outcome], tol: f32) -> usize {
    let t = ranks.len();
    let mut n = 0;
    for (r, o) in ranks.iter().enumerate() {
        assert_shard("output", &reference.output, &o.output, r, t, tol);
        n += 1;
        match (&reference.input_grad, &o.input_grad) {
            (Some(a), Some(b)) => {
                assert_shard("input grad", a, b, r, t, tol);
                n += 1;
            }
            (None, None) => {}
            _ => panic!("input grad present on one side only"),
        }
        assert_eq!(reference.params.len(), o.params.len(), "parameter count");
        for (p, q) in reference.params.iter().zip(&o.params) {
            assert_eq!(p.path, q.path);
            assert_shard(&format!("value of {}", p.path), &p.value, &q.value, r, t, 0.0);
            let (gp, gq) = (p.grad.as_ref(), q.grad.as_ref());
            let (gp, gq) =
                (gp.unwrap_or_else(|| panic!("no reference grad for {}", p.path)), gq.unwrap_or_else(|| panic!("no grad for {} on rank {r}", q.path)));
            assert_shard(&format!("grad of {}", p.path), gp, gq, r, t, tol);
            n += 2;
        }
    }
    n
}

/// `(y * G).sum()` where `G` is this rank's part of a fixed random upstream gradient of the full
/// output shape (`sharded_dim`: the dim along which `y` is split over the group, if it is).
pub fn weighted_sum<const D: usize>(y: Tensor<B, D>, full_shape: [usize; D], sharded_dim: Option<usize>, comm: &Comm) -> Tensor<B, 1> {
    let g = randn("upstream", full_shape);
    let g = match sharded_dim {
        Some(d) if comm.size() > 1 => split_along(&g, d, comm.size(), comm.rank()).unwrap(),
        _ => g,
    };
    (y * Tensor::<B, D>::from_data(g, &Default::default())).sum()
}

/// Adds shard-consistent noise to every parameter (so zero biases and unit layer-norm gains
/// cannot hide a misplaced reduction). The reference run (a group of one) records each
/// parameter's full shape; sharded runs then add the matching slice of the same noise.
#[derive(Default)]
pub struct Perturb {
    full_shapes: std::sync::Mutex<std::collections::HashMap<String, Vec<usize>>>,
}

struct PerturbMapper<'a> {
    owner: &'a Perturb,
    path: Vec<String>,
    rank: usize,
    size: usize,
}

impl burn::module::ModuleMapper<B> for PerturbMapper<'_> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn map_float<const D: usize>(&mut self, p: burn::module::Param<Tensor<B, D>>) -> burn::module::Param<Tensor<B, D>> {
        let path = self.path.join(".");
        let local: [usize; D] = p.val().dims();
        let mut shapes = self.owner.full_shapes.lock().unwrap();
        if self.size == 1 {
            shapes.insert(path.clone(), local.to_vec());
        }
        let full = shapes.get(&path).unwrap_or_else(|| panic!("no reference shape for {path}")).clone();
        let n = full.iter().product();
        let noise = TensorData::new(HostRng::new(77, &path).normal_vec(n, 0.1), full);
        let noise = expected_shard(&noise, &local, self.rank, self.size).unwrap();
        p.map(|t| (t.clone() + Tensor::from_data(noise, &t.device())).detach().require_grad())
    }
}

impl Perturb {
    /// `module` with noise added to every parameter (see the type docs).
    pub fn apply<M: burn::module::Module<B>>(&self, module: M, comm: &Comm) -> M {
        module.map(&mut PerturbMapper { owner: self, path: Vec::new(), rank: comm.rank(), size: comm.size() })
    }
}

/// The unsplit model's path of a pipeline-stage parameter: the stage numbers its blocks from 0,
/// the whole model from the stage's first layer.
pub fn global_path(path: &str, first_layer: usize) -> String {
    burn_parallel_modules::gpt_pipeline::global_block_path(path, first_layer)
}

/// `world` over emulated NCCL communicators (60 s timeouts).
#[cfg(feature = "cuda")]
fn emulated_nccl<T: Send>(n: usize, f: impl Fn(Comm) -> Result<T, String> + Send + Sync) -> Vec<T> {
    on_threads(burn_parallel::NcclComm::emulated_world(n, Duration::from_secs(60)), "emulated NCCL", f)
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default()
}
