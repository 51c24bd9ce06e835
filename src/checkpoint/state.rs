//! From modules and optimizers to named host tensors, and back.
//!
//! Tensor names are global: `model.<path>` for a parameter (its path in the **unsplit** model:
//! a pipeline stage renames its local paths, see `PipelineModel::global_param_path`),
//! `optim.exp_avg.<path>` / `optim.exp_avg_sq.<path>` for AdamW's moments (sharded exactly like
//! the parameter) and the counter `optim.step.<path>` for its step count. Where a shard sits in
//! the whole tensor follows [`crate::sharding`]; a tensor held by several ranks (replicated over
//! TP, or any tensor on DP replicas) is written by one of them only: DP rank 0, and TP rank 0
//! for replicated ones; a stage replica (the last stage's copy of tied embeddings,
//! [`crate::sharding::is_stage_replica`]) by the stage that owns it, and loads from its global
//! name like any other parameter.

use std::collections::{BTreeMap, HashMap};

use burn::module::{AutodiffModule, Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::record::AdaptorRecord;
use burn::optim::{AdamW, AdamWState, AdaptiveMomentumState, Optimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorCreationOptions, TensorData};

use super::error::{CheckpointError, Result};
use super::read::Checkpoint;
use crate::rng::StreamCounter;
use crate::sharding::{is_stage_replica, placement, tp_split_dim, ShardPlacement};
use crate::topology::ProcessGroups;

/// Prefix of parameter tensors.
pub const MODEL_PREFIX: &str = "model.";

/// Where this rank's tensors sit: its TP coordinates (shards) and DP rank (who writes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardContext {
    /// Rank in the TP group.
    pub tp_rank: usize,
    /// TP degree.
    pub tp_size: usize,
    /// Rank in the DP group (replica 0 writes; with context parallelism the DP group holds the
    /// context-parallel ranks too, so one of them writes).
    pub dp_rank: usize,
}

impl ShardContext {
    /// This rank's context from its process groups.
    pub fn new(groups: &ProcessGroups) -> Self {
        Self { tp_rank: groups.coords.tp, tp_size: groups.tp.size(), dp_rank: groups.dp.rank() }
    }

    /// A rank that holds whole tensors alone (tp = dp = 1).
    pub fn single() -> Self {
        Self { tp_rank: 0, tp_size: 1, dp_rank: 0 }
    }

    fn writes(&self, p: &ShardPlacement) -> bool {
        self.dp_rank == 0 && (p.split || self.tp_rank == 0)
    }
}

/// A tensor of this rank on the host, with its global name and place.
#[derive(Debug, Clone)]
pub struct HostTensor {
    /// Global name (`model.blocks.3.attn.qkv.weight`).
    pub name: String,
    /// This rank's part.
    pub data: TensorData,
    /// Where the part sits in the whole tensor.
    pub placement: ShardPlacement,
    /// Whether this rank writes it (exactly one rank writes each chunk).
    pub write: bool,
}

/// Maps a module-local parameter path to its global path (identity for an unsplit model).
pub type Rename<'a> = &'a dyn Fn(&str) -> String;

/// Tracks the visiting path and the module types along it.
#[derive(Default)]
struct Walk {
    path: Vec<String>,
    types: Vec<String>,
}

impl Walk {
    fn enter(&mut self, name: &str, ty: &str) {
        self.path.push(name.to_string());
        self.types.push(ty.to_string());
    }
    fn exit(&mut self) {
        self.path.pop();
        self.types.pop();
    }
    /// The current parameter's local path and TP split dimension.
    fn current(&self) -> (String, Option<usize>) {
        let (ty, field) = self.leaf();
        (self.path.join("."), tp_split_dim(ty, field))
    }
    fn leaf(&self) -> (&str, &str) {
        (self.types.last().map(String::as_str).unwrap_or(""), self.path.last().map(String::as_str).unwrap_or(""))
    }
    /// Whether the current parameter is a replica another stage writes (tied embeddings).
    fn replica(&self) -> bool {
        let (ty, field) = self.leaf();
        is_stage_replica(ty, field)
    }
}

macro_rules! walk_modules {
    () => {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            self.walk.enter(name, container_type);
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.walk.exit();
        }
    };
}

struct Collect<'a> {
    walk: Walk,
    rename: Rename<'a>,
    ctx: ShardContext,
    out: Vec<HostTensor>,
}

impl<B: Backend> ModuleVisitor<B> for Collect<'_> {
    walk_modules!();
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let (path, dim) = self.walk.current();
        let data = param.val().into_data();
        let placement = placement(data.shape.as_slice(), dim, self.ctx.tp_rank, self.ctx.tp_size);
        let write = self.ctx.writes(&placement) && !self.walk.replica();
        self.out.push(HostTensor { name: format!("{MODEL_PREFIX}{}", (self.rename)(&path)), data, placement, write });
    }
}

/// Every float parameter of `module` as a host tensor (copied off the device).
pub fn module_tensors<B: Backend, M: Module<B>>(module: &M, rename: Rename<'_>, ctx: ShardContext) -> Vec<HostTensor> {
    let mut v = Collect { walk: Walk::default(), rename, ctx, out: Vec::new() };
    module.visit(&mut v);
    v.out
}

/// Reads this rank's box of every parameter (phase 1 of a load: nothing is changed yet).
struct ReadParams<'a> {
    walk: Walk,
    rename: Rename<'a>,
    ctx: ShardContext,
    ckpt: &'a Checkpoint,
    prefix: &'a str,
    loaded: HashMap<ParamId, TensorData>,
    error: Option<CheckpointError>,
    /// Read in the checkpoint's dtype and convert to the parameter's (explicitly asked for).
    convert: bool,
}

impl<B: Backend> ModuleVisitor<B> for ReadParams<'_> {
    walk_modules!();
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if self.error.is_some() {
            return;
        }
        let (path, dim) = self.walk.current();
        let value = param.val();
        let shape = value.dims().to_vec();
        let p = placement(&shape, dim, self.ctx.tp_rank, self.ctx.tp_size);
        let name = format!("{}{}", self.prefix, (self.rename)(&path));
        let saved = match (self.convert, self.ckpt.metadata().tensors.get(&name).and_then(|t| crate::checkpoint::format::to_burn_dtype(t.dtype))) {
            (true, Some(d)) => d,
            _ => value.dtype(),
        };
        match self.ckpt.read(&name, saved, &p.global_shape, &p.offset, &shape) {
            Ok(data) => {
                self.loaded.insert(param.id, data);
            }
            Err(e) => self.error = Some(e),
        }
    }
}

/// Replaces parameter values by the loaded ones (phase 2; ids and `require_grad` kept).
struct Apply {
    loaded: HashMap<ParamId, TensorData>,
}

impl<B: Backend> ModuleMapper<B> for Apply {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let Some(data) = self.loaded.remove(&param.id) else { return param };
        let value = param.val();
        let saved = data.dtype;
        let t = Tensor::from_data(data, TensorCreationOptions::new(value.device()).with_dtype(saved));
        // A conversion (load_module_cast) rounds as the backend's cast does, the way training
        // rounds the f32 master into the parameter.
        let t = crate::precision::cast_to(t, value.dtype());
        let id = param.id;
        param.transform_for_load(t, id)
    }
}

/// `module` with every float parameter replaced by this rank's box of the checkpoint's tensor
/// `prefix + rename(path)`. Everything is read and checked (presence, global shape, dtype,
/// checksums) before any parameter changes: an error leaves nothing half-loaded.
pub fn load_module<B: Backend, M: Module<B>>(ckpt: &Checkpoint, module: M, prefix: &str, rename: Rename<'_>, ctx: ShardContext) -> Result<M> {
    load_params(ckpt, module, prefix, rename, ctx, false)
}

/// [`load_module`] converting each tensor from the checkpoint's dtype to the parameter's: the
/// explicit conversion a mixed-precision run asks for (its checkpoints hold f32 weights, its
/// parameters are bf16).
pub fn load_module_cast<B: Backend, M: Module<B>>(ckpt: &Checkpoint, module: M, prefix: &str, rename: Rename<'_>, ctx: ShardContext) -> Result<M> {
    load_params(ckpt, module, prefix, rename, ctx, true)
}

fn load_params<B: Backend, M: Module<B>>(ckpt: &Checkpoint, module: M, prefix: &str, rename: Rename<'_>, ctx: ShardContext, convert: bool) -> Result<M> {
    let mut reader = ReadParams { walk: Walk::default(), rename, ctx, ckpt, prefix, loaded: HashMap::new(), error: None, convert };
    module.visit(&mut reader);
    if let Some(e) = reader.error {
        return Err(e);
    }
    Ok(module.map(&mut Apply { loaded: reader.loaded }))
}

type Records<B> = HashMap<ParamId, AdaptorRecord<AdamW, B>>;

struct CollectAdamW<'a, B: AutodiffBackend> {
    walk: Walk,
    rename: Rename<'a>,
    ctx: ShardContext,
    records: &'a Records<B>,
    out: Vec<HostTensor>,
    counters: BTreeMap<String, u64>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for CollectAdamW<'_, B> {
    walk_modules!();
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let Some(record) = self.records.get(&param.id) else { return };
        let (path, dim) = self.walk.current();
        let name = (self.rename)(&path);
        let m = record.clone().into_state::<D>().momentum;
        self.counters.insert(format!("optim.step.{name}"), m.time as u64);
        let moments = [("exp_avg", Some(m.moment_1)), ("exp_avg_sq", Some(m.moment_2)), ("max_exp_avg_sq", m.max_moment_2)];
        for (what, t) in moments {
            let Some(t) = t else { continue };
            let data = t.into_data();
            let placement = placement(data.shape.as_slice(), dim, self.ctx.tp_rank, self.ctx.tp_size);
            let write = self.ctx.writes(&placement) && !self.walk.replica();
            self.out.push(HostTensor { name: format!("optim.{what}.{name}"), data, placement, write });
        }
    }
}

/// The AdamW state of `module`'s parameters (moments as host tensors, step counts as counters
/// `optim.step.<path>`). Parameters the optimizer has not stepped yet have none.
pub fn adamw_tensors<B, M>(optim: &OptimizerAdaptor<AdamW, M, B>, module: &M, rename: Rename<'_>, ctx: ShardContext) -> (Vec<HostTensor>, BTreeMap<String, u64>)
where
    B: AutodiffBackend,
    M: AutodiffModule<B>,
{
    // Burn's record map is hashbrown's; ours is std's.
    let records: Records<B> = optim.to_record().into_iter().collect();
    let mut v = CollectAdamW { walk: Walk::default(), rename, ctx, records: &records, out: Vec::new(), counters: BTreeMap::new() };
    module.visit(&mut v);
    (v.out, v.counters)
}

struct ReadAdamW<'a, B: AutodiffBackend> {
    walk: Walk,
    rename: Rename<'a>,
    ctx: ShardContext,
    ckpt: &'a Checkpoint,
    records: Records<B>,
    error: Option<CheckpointError>,
}

impl<B: AutodiffBackend> ReadAdamW<'_, B> {
    fn read<const D: usize>(&self, what: &str, name: &str, value: &Tensor<B, D>, dim: Option<usize>) -> Result<Option<Tensor<B::InnerBackend, D>>> {
        let full = format!("optim.{what}.{name}");
        if what == "max_exp_avg_sq" && !self.ckpt.metadata().tensors.contains_key(&full) {
            return Ok(None);
        }
        let shape = value.dims().to_vec();
        let p = placement(&shape, dim, self.ctx.tp_rank, self.ctx.tp_size);
        let data = self.ckpt.read(&full, value.dtype(), &p.global_shape, &p.offset, &shape)?;
        let options = TensorCreationOptions::new(value.device()).with_dtype(value.dtype());
        Ok(Some(Tensor::from_data(data, options)))
    }

    fn state<const D: usize>(&self, name: &str, value: &Tensor<B, D>, dim: Option<usize>) -> Result<Option<AdaptorRecord<AdamW, B>>> {
        let Some(&time) = self.ckpt.metadata().counters.get(&format!("optim.step.{name}")) else { return Ok(None) };
        let (m1, m2) = (self.read("exp_avg", name, value, dim)?, self.read("exp_avg_sq", name, value, dim)?);
        let mut momentum = AdaptiveMomentumState::new(time as usize, m1.expect("always read"), m2.expect("always read"));
        momentum.max_moment_2 = self.read("max_exp_avg_sq", name, value, dim)?;
        Ok(Some(AdaptorRecord::from_state(AdamWState::new(momentum))))
    }
}

impl<B: AutodiffBackend> ModuleVisitor<B> for ReadAdamW<'_, B> {
    walk_modules!();
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if self.error.is_some() {
            return;
        }
        let (path, dim) = self.walk.current();
        let name = (self.rename)(&path);
        match self.state(&name, &param.val(), dim) {
            Ok(Some(record)) => {
                self.records.insert(param.id, record);
            }
            Ok(None) => {}
            Err(e) => self.error = Some(e),
        }
    }
}

/// `optim` with the checkpoint's AdamW state for `module`'s parameters (this rank's boxes of
/// the moments, and the step counts). All is read and checked before the optimizer changes.
pub fn load_adamw<B, M>(
    ckpt: &Checkpoint,
    optim: OptimizerAdaptor<AdamW, M, B>,
    module: &M,
    rename: Rename<'_>,
    ctx: ShardContext,
) -> Result<OptimizerAdaptor<AdamW, M, B>>
where
    B: AutodiffBackend,
    M: AutodiffModule<B>,
{
    let mut reader = ReadAdamW { walk: Walk::default(), rename, ctx, ckpt, records: HashMap::new(), error: None };
    module.visit(&mut reader);
    if let Some(e) = reader.error {
        return Err(e);
    }
    let mut records = optim.to_record();
    records.clear();
    records.extend(reader.records);
    Ok(optim.load_record(records))
}

/// Prefix of random-stream counters.
pub const RNG_PREFIX: &str = "rng.";

/// The counters of `streams` (`rng.<name>` = draws so far).
pub fn stream_counters(streams: &[StreamCounter]) -> BTreeMap<String, u64> {
    streams.iter().map(|s| (format!("{RNG_PREFIX}{}", s.name()), s.get())).collect()
}

/// Sets each of `streams` to its count in the checkpoint; returns the names of the streams the
/// checkpoint has no count for (left as they are: a checkpoint of another layout, e.g. with
/// sequence parallelism switched, names per-rank streams differently).
pub fn restore_streams(ckpt: &Checkpoint, streams: &[StreamCounter]) -> Vec<String> {
    let mut missing = Vec::new();
    for s in streams {
        match ckpt.metadata().counters.get(&format!("{RNG_PREFIX}{}", s.name())) {
            Some(&n) => s.set(n),
            None => missing.push(s.name().to_string()),
        }
    }
    missing
}
