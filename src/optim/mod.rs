//! [`DistAdamW`]: AdamW for data × pipeline × tensor-parallel training, with f32 master weights
//! (mixed precision) and an optional distributed optimizer (ZeRO-1).
//!
//! One step over this rank's model parts (the whole model, or its pipeline stages):
//! 1. gradients are taken in f32 (cast from bf16: accumulation and reduction in f32);
//! 2. data parallelism: the mean over the DP group, by bucketed all-reduce; with **ZeRO-1** by
//!    bucketed **reduce-scatter**, so each DP rank gets only the rows of each parameter it owns
//!    ([`shard`]); then tied parameters ([`DistAdamW::tie`]) summed over their copies;
//! 3. the global gradient norm over everything (TP-sharded parameters summed over TP,
//!    replicated ones counted once, DP shards summed over DP under ZeRO, stages over PP; the
//!    last stage's replica of tied embeddings is the first stage's, counted there):
//!    optional clipping to a maximum, and (by default, as Megatron's
//!    `check_for_nan_in_loss_and_grad`) a NaN or infinite norm fails the step on every rank
//!    alike with [`OptimError::NonFinite`] before anything changes;
//! 4. AdamW on this rank's rows in f32, the same operations in the same order as Burn's
//!    `AdamW` (so plain DP in f32 is bitwise Burn's optimizer);
//! 5. the new values cast to the parameter dtype; under ZeRO **all-gathered** over DP.
//!
//! State per parameter (its owned rows, flattened, f32): AdamW's two moments, the step count,
//! and for non-f32 parameters the f32 master copy (for f32 parameters the parameter is the
//! master). Model-state bytes per parameter and rank: bf16 params 2 + f32 gradients 4 + master
//! and moments 12 = 18, and 2 + 4 + 12/dp with ZeRO (Megatron's figures); f32: params 4 +
//! gradients 4 + moments 8 = 16, and 4 + 4 + 8/dp with ZeRO. Checkpoints ([`DistAdamW::state_tensors`], [`DistAdamW::load`]) store the master
//! as the model's weights and the moments as boxes of the whole tensors, so they load with or
//! without ZeRO, at any dp and in either precision.

mod group;
pub mod schedule;
pub mod shard;
mod state;
mod tied;

use std::collections::{HashMap, HashSet};

use burn::config::Config;
use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, ElementConversion, Tensor};

use crate::comm::ops::all_reduce;
use crate::error::CommError;
use crate::sharding::tp_split_dim;
use crate::{CollectiveBackend, Comm, ProcessGroups, ReduceOp};
use group::{Group, Groups, Slot};
use shard::{all_gather_shards, owned_rows, reduce_scatter_shards, RowSplit};

/// Configuration of [`DistAdamW`] (AdamW's hyper-parameters as Burn's `AdamWConfig`).
#[derive(Config, Debug)]
pub struct DistAdamWConfig {
    /// First-moment decay.
    #[config(default = 0.9)]
    pub beta_1: f32,
    /// Second-moment decay.
    #[config(default = 0.999)]
    pub beta_2: f32,
    /// Denominator epsilon.
    #[config(default = 1e-5)]
    pub epsilon: f32,
    /// Decoupled weight decay.
    #[config(default = 1e-4)]
    pub weight_decay: f32,
    /// ZeRO-1: shard master weights and moments over the DP group (reduce-scatter of
    /// gradients, all-gather of parameters).
    #[config(default = false)]
    pub zero: bool,
    /// Bytes of f32 gradients per collective (all-reduce or reduce-scatter).
    #[config(default = 26214400)]
    pub bucket_bytes: usize,
    /// Fused updates: consecutive parameters of one dtype are updated as one flat tensor of up
    /// to this many f32 bytes (the group's moments and master are each that size; `group`
    /// module: one set of tensor operations for many parameters, as torch's `foreach` AdamW).
    /// 0 (default): one parameter at a time.
    /// The values are bitwise the same either way. Meant for fusing GPU backends (CUDA, wgpu),
    /// where the host cost of ~16 operations per parameter dominates the step and a group's
    /// chain fuses into a few kernels (`gpt_pretrain` uses 25 MiB there). Not for the CPU: there
    /// every intermediate of the chain is materialised for the whole group (the memory grid's
    /// peaks rose 5-15%) and, past cache-sized parameters, the per-parameter update is the faster
    /// (`benches/optim_step.rs`).
    #[config(default = 0)]
    pub group_bytes: usize,
    /// Fail a step whose global gradient norm is NaN or infinite ([`OptimError::NonFinite`]),
    /// before any parameter or state changes, instead of writing NaNs into the weights (and
    /// from there into every later checkpoint). Costs the norm (one pass over the gradients and
    /// a scalar all-reduce per model-parallel group) where no clipping computes it anyway.
    #[config(default = true)]
    pub check_finite: bool,
}

/// Why [`DistAdamW::step`] did not update.
#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    /// A collective failed.
    #[error(transparent)]
    Comm(#[from] CommError),
    /// The global gradient norm is not finite: some gradient on some rank holds a NaN or an
    /// infinity (a diverging run, an overflow). Every rank of the model sees the same norm, so
    /// all fail together; nothing was updated.
    #[error("the global gradient norm is {norm} (a NaN or infinite gradient on some rank): the step is not applied, the parameters and optimizer state are unchanged (diverging? lower the learning rate or clip the gradients)")]
    NonFinite {
        /// The norm.
        norm: f32,
    },
    /// Tied parameters that do not pair up ([`DistAdamW::tie`]).
    #[error(transparent)]
    Tied(#[from] crate::pipeline::TiedError),
}

/// AdamW with f32 master weights and optional ZeRO-1. See the [module docs](self).
pub struct DistAdamW<B: AutodiffBackend> {
    config: DistAdamWConfig,
    dp: Comm,
    tp: Comm,
    pp: Comm,
    state: Groups<B::InnerBackend>,
    tied: tied::Tied,
}

impl<B: AutodiffBackend> std::fmt::Debug for DistAdamW<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DistAdamW").field("config", &self.config).field("params", &self.state.len()).finish()
    }
}

/// One parameter of a step: where it is, its gradient and value.
struct Entry<I: burn::tensor::backend::Backend> {
    id: ParamId,
    dtype: DType,
    split: RowSplit,
    tp_split: bool,
    /// A stage replica of tied embeddings (left out of the norm).
    replica: bool,
    /// Taken (and freed) by the reduction.
    grad: Option<Tensor<I, 1>>,
    value: Tensor<I, 1>,
}

/// Collects (and removes) the f32 flattened gradients of a part, with the flat values.
struct Gather<'a, B: AutodiffBackend> {
    grads: &'a mut GradientsParams,
    path: Vec<String>,
    types: Vec<String>,
    out: Vec<Entry<B::InnerBackend>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Gather<'_, B> {
    fn enter_module(&mut self, name: &str, ty: &str) {
        self.path.push(name.into());
        self.types.push(ty.into());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
        self.types.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let Some(g) = self.grads.remove::<B::InnerBackend, D>(param.id) else { return };
        let value = param.val().inner();
        let dims = value.dims();
        let n: usize = dims.iter().product();
        let (ty, field) = (self.types.last().map(String::as_str).unwrap_or(""), self.path.last().map(String::as_str).unwrap_or(""));
        self.out.push(Entry {
            id: param.id,
            dtype: value.dtype(),
            split: RowSplit::of(&dims),
            tp_split: tp_split_dim(ty, field).is_some(),
            replica: crate::sharding::is_stage_replica(ty, field),
            grad: Some(crate::precision::to_f32(g).reshape([n])),
            value: value.reshape([n]),
        });
    }
}

/// Writes new flat values into the parameters (ids, `require_grad` kept); copies the values of
/// `copy` into buffers of their own.
struct Apply<I: burn::tensor::backend::Backend> {
    values: HashMap<ParamId, Tensor<I, 1>>,
    copy: HashSet<ParamId>,
}

impl<B: AutodiffBackend> ModuleMapper<B> for Apply<B::InnerBackend> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let require_grad = param.is_require_grad();
        let value = match self.values.remove(&param.id) {
            Some(v) => Some(v),
            None if self.copy.remove(&param.id) => None,
            None => return param,
        };
        param.map(|old| {
            let t = Tensor::<B, D>::from_inner(match value {
                Some(v) => v.reshape(old.dims()),
                None => group::own_copy(old.inner()),
            });
            if require_grad {
                t.require_grad()
            } else {
                t
            }
        })
    }
}

/// Splits `entries` into buckets of about `bytes` f32 gradient bytes.
fn buckets(n: &[usize], bytes: usize) -> Vec<std::ops::Range<usize>> {
    let (mut out, mut start, mut acc) = (Vec::new(), 0, 0);
    for (i, len) in n.iter().enumerate() {
        acc += len * 4;
        if acc >= bytes || i + 1 == n.len() {
            out.push(start..i + 1);
            (start, acc) = (i + 1, 0);
        }
    }
    out
}

impl<B> DistAdamW<B>
where
    B: AutodiffBackend,
    B::InnerBackend: CollectiveBackend,
{
    /// An optimizer for this rank of `groups` (DP group: reduction and ZeRO; TP and PP: the
    /// global norm).
    pub fn new(config: DistAdamWConfig, groups: &ProcessGroups) -> Self {
        Self { config, dp: groups.dp.clone(), tp: groups.tp.clone(), pp: groups.pp.clone(), state: Groups::default(), tied: tied::Tied::default() }
    }

    /// The configuration.
    pub fn config(&self) -> &DistAdamWConfig {
        &self.config
    }

    fn sharded(&self) -> bool {
        self.config.zero && self.dp.size() > 1
    }

    /// One step over this rank's `parts` with their gradients (see the [module docs](self));
    /// clips the global norm to `max_norm` if given. Returns the updated parts and the global
    /// gradient norm (before clipping) when it was computed (with clipping or
    /// [`check_finite`](DistAdamWConfig::check_finite)). A non-finite norm is
    /// [`OptimError::NonFinite`]; the parts are consumed either way (clone them first to go on
    /// without the step: Burn modules share their tensors, so a clone is cheap).
    pub fn step<M: AutodiffModule<B>>(
        &mut self,
        lr: f64,
        parts: Vec<(M, GradientsParams)>,
        max_norm: Option<f32>,
    ) -> Result<(Vec<M>, Option<f32>), OptimError> {
        let (mut modules, mut entries) = (Vec::new(), Vec::new());
        for (module, mut grads) in parts {
            let mut g = Gather::<B> { grads: &mut grads, path: Vec::new(), types: Vec::new(), out: Vec::new() };
            module.visit(&mut g);
            entries.extend(g.out);
            modules.push(module);
        }
        use crate::timing::{phase, span};
        self.check_tied_agreed(&entries)?;
        let mut grads = span!(phase::GRADS_REDUCE).in_scope(|| self.reduce(&mut entries))?;
        self.sum_tied(&entries, &mut grads)?;
        let wanted = max_norm.is_some() || self.config.check_finite;
        let norm_span = wanted.then(|| span!(phase::GRAD_NORM).entered());
        let norm = match wanted {
            true => Some(self.global_norm(&entries, &grads)?),
            false => None,
        };
        if let Some(norm) = norm.filter(|_| self.config.check_finite) {
            if self.non_finite_anywhere(norm)? {
                return Err(OptimError::NonFinite { norm });
            }
        }
        drop(norm_span);
        if let (Some(max), Some(norm)) = (max_norm, norm) {
            if norm > max {
                let factor = max / (norm + 1e-6);
                grads = grads.into_iter().map(|g| g.mul_scalar(factor)).collect();
            }
        }
        let (own, left) = span!(phase::OPTIMIZER).in_scope(|| self.update_all(&entries, grads, lr));
        let _gather = span!(phase::PARAMS_GATHER).entered();
        let values = self.gather(&entries, own)?;
        let mut apply = Apply { values: entries.iter().map(|e| e.id).zip(values).collect(), copy: left.into_iter().collect() };
        Ok((modules.into_iter().map(|m| m.map(&mut apply)).collect(), norm))
    }

    /// The DP mean of every gradient: whole (all-reduce) or this rank's rows (reduce-scatter).
    fn reduce(&self, entries: &mut [Entry<B::InnerBackend>]) -> Result<Vec<Tensor<B::InnerBackend, 1>>, CommError> {
        let take = |entries: &mut [Entry<B::InnerBackend>]| -> Vec<_> { entries.iter_mut().map(|e| e.grad.take().expect("reduced once")).collect() };
        if self.dp.size() == 1 {
            return Ok(take(entries));
        }
        let lens: Vec<usize> = entries.iter().map(|e| e.value.dims()[0]).collect();
        let splits: Vec<RowSplit> = entries.iter().map(|e| e.split).collect();
        let mut out = Vec::with_capacity(entries.len());
        for b in buckets(&lens, self.config.bucket_bytes) {
            let grads = take(&mut entries[b.clone()]);
            if self.sharded() {
                out.extend(reduce_scatter_shards(grads, &splits[b], &self.dp)?);
            } else {
                let summed = all_reduce(Tensor::cat(grads, 0), ReduceOp::Mean, &self.dp)?;
                out.extend(summed.split_with_sizes(lens[b].to_vec(), 0));
            }
        }
        Ok(out)
    }

    /// The global L2 norm (the order of sums of `data_parallel::global_grad_norm`).
    fn global_norm(&self, entries: &[Entry<B::InnerBackend>], grads: &[Tensor<B::InnerBackend, 1>]) -> Result<f32, CommError> {
        let (mut sharded, mut replicated) = (Vec::new(), Vec::new());
        // A stage replica (tied embeddings) has the owner's gradient: counted there, once.
        for (e, g) in entries.iter().zip(grads).filter(|(e, _)| !e.replica) {
            let sq = g.clone().powi_scalar(2).sum();
            if e.tp_split {
                sharded.push(sq);
            } else {
                replicated.push(sq);
            }
        }
        let device = grads.first().map(|g| g.device()).unwrap_or_default();
        let t = crate::data_parallel::device_sum(sharded, &device);
        let sharded = if self.tp.size() > 1 { all_reduce(t, ReduceOp::Sum, &self.tp)? } else { t };
        let mut total = sharded + crate::data_parallel::device_sum(replicated, &device);
        if self.sharded() {
            total = all_reduce(total, ReduceOp::Sum, &self.dp)?;
        }
        if self.pp.size() > 1 {
            total = all_reduce(total, ReduceOp::Sum, &self.pp)?;
        }
        Ok(total.into_scalar().elem::<f32>().sqrt())
    }

    /// Whether the norm is non-finite on any rank. The norm is all-reduced over TP (sharded
    /// parameters), DP under ZeRO and PP, but the replicated parameters' part is this TP rank's
    /// own: were it to differ between TP ranks (it should not), a max over TP keeps them from
    /// deciding differently and one of them waiting in a collective the others never join.
    fn non_finite_anywhere(&self, norm: f32) -> Result<bool, CommError> {
        let flag = if norm.is_finite() { 0.0f32 } else { 1.0 };
        if self.tp.size() == 1 {
            return Ok(flag > 0.0);
        }
        Ok(crate::comm::ops::all_reduce_scalar(flag, ReduceOp::Max, &self.tp)? > 0.0)
    }

    /// The rows of `e` this rank updates (element range of the flat tensor).
    fn own_range(&self, e: &Entry<B::InnerBackend>) -> std::ops::Range<usize> {
        if self.sharded() {
            e.split.elements(self.dp.size(), self.dp.rank())
        } else {
            0..e.value.dims()[0]
        }
    }

    /// The groups of this step: consecutive entries of one dtype and state signature, up to
    /// `group_bytes` of f32 each (index ranges of `entries`).
    fn plan(&self, entries: &[Entry<B::InnerBackend>]) -> Vec<std::ops::Range<usize>> {
        let (mut runs, mut start, mut bytes) = (Vec::new(), 0, 0);
        for (i, e) in entries.iter().enumerate() {
            let n = 4 * self.own_range(e).len();
            if i > start {
                let prev = &entries[i - 1];
                let joins = e.dtype == prev.dtype && self.state.signature(&e.id) == self.state.signature(&prev.id) && bytes + n <= self.config.group_bytes;
                if !joins {
                    runs.push(start..i);
                    (start, bytes) = (i, 0);
                }
            }
            bytes += n;
        }
        if start < entries.len() {
            runs.push(start..entries.len());
        }
        runs
    }

    /// AdamW on this rank's rows of every entry, a group at a time; the new rows in each
    /// parameter's dtype, in entry order, and the parameters without a gradient whose group
    /// was broken up (their values may be views of its last update's buffer).
    #[allow(clippy::type_complexity)]
    fn update_all(
        &mut self,
        entries: &[Entry<B::InnerBackend>],
        grads: Vec<Tensor<B::InnerBackend, 1>>,
        lr: f64,
    ) -> (Vec<Tensor<B::InnerBackend, 1>>, Vec<ParamId>) {
        let runs = self.plan(entries);
        let members: Vec<Vec<(ParamId, usize)>> = runs.iter().map(|r| entries[r.clone()].iter().map(|e| (e.id, self.own_range(e).len())).collect()).collect();
        let (groups, left) = self.state.take(&members);
        let mut grads = grads.into_iter();
        let (mut own, mut updated) = (Vec::with_capacity(entries.len()), Vec::with_capacity(runs.len()));
        for (run, group) in runs.into_iter().zip(groups) {
            let g = group::concat(grads.by_ref().take(run.len()).collect());
            let (group, values) = self.update(&entries[run], group, g, lr);
            own.extend(values);
            updated.push(group);
        }
        self.state.put(updated);
        (own, left)
    }

    /// AdamW on a group's rows (`grad`: their f32 gradients, concatenated; Burn's operations,
    /// in Burn's order); the updated group and each member's new rows in its dtype.
    fn update(
        &self,
        entries: &[Entry<B::InnerBackend>],
        group: Group<B::InnerBackend>,
        grad: Tensor<B::InnerBackend, 1>,
        lr: f64,
    ) -> (Group<B::InnerBackend>, Vec<Tensor<B::InnerBackend, 1>>) {
        let c = &self.config;
        let dtype = entries[0].dtype;
        let Group { members, state } = group;
        let rows = || group::concat(entries.iter().map(|e| e.value.clone().slice(self.own_range(e))).collect());
        let current = match (state.master, dtype) {
            (Some(m), _) => m,
            (None, DType::F32) => rows(),
            (None, _) => crate::precision::to_f32(rows()),
        };
        let (f1, f2) = (1.0 - c.beta_1, 1.0 - c.beta_2);
        let (m, v) = match state.moments {
            Some((m, v)) => (m.mul_scalar(c.beta_1).add(grad.clone().mul_scalar(f1)), v.mul_scalar(c.beta_2).add(grad.square().mul_scalar(f2))),
            None => (grad.clone().mul_scalar(f1), grad.square().mul_scalar(f2)),
        };
        let step = state.step + 1;
        let t = step as i32;
        let m_hat = m.clone().div_scalar(1f32 - c.beta_1.powi(t));
        let v_hat = v.clone().div_scalar(1f32 - c.beta_2.powi(t));
        let delta = m_hat.div(v_hat.sqrt().add_scalar(c.epsilon));
        let decay = lr * (c.weight_decay as f64);
        let decayed = if decay == 0.0 { current } else { current.mul_scalar(1.0 - decay) };
        let updated = decayed - delta.mul_scalar(lr);
        let (master, values) = if dtype == DType::F32 { (None, updated) } else { (Some(updated.clone()), updated.cast(dtype)) };
        let lens: Vec<usize> = members.iter().map(|(_, n)| *n).collect();
        let state = Slot { master, moments: Some((m, v)), step };
        (Group { members, state }, group::split(values, &lens))
    }

    /// The full new values of every parameter from this rank's rows (all-gather under ZeRO).
    fn gather(&self, entries: &[Entry<B::InnerBackend>], own: Vec<Tensor<B::InnerBackend, 1>>) -> Result<Vec<Tensor<B::InnerBackend, 1>>, CommError> {
        if !self.sharded() {
            return Ok(own);
        }
        let lens: Vec<usize> = entries.iter().map(|e| e.value.dims()[0]).collect();
        let mut own = own.into_iter();
        let mut out = Vec::with_capacity(entries.len());
        for b in buckets(&lens, self.config.bucket_bytes) {
            // One all-gather per bucket and dtype (a bucket mixes dtypes only in odd models).
            let chunk: Vec<_> = own.by_ref().take(b.len()).collect();
            let splits: Vec<RowSplit> = entries[b.clone()].iter().map(|e| e.split).collect();
            let dtypes: Vec<DType> = entries[b].iter().map(|e| e.dtype).collect();
            if dtypes.iter().all(|d| *d == dtypes[0]) {
                out.extend(all_gather_shards(chunk, &splits, &self.dp)?);
            } else {
                for (t, s) in chunk.into_iter().zip(splits) {
                    out.extend(all_gather_shards(vec![t], &[s], &self.dp)?);
                }
            }
        }
        Ok(out)
    }

    /// Rows this rank owns of a parameter with `rows` rows of dim 0.
    pub(crate) fn owned(&self, rows: usize) -> std::ops::Range<usize> {
        if self.sharded() {
            owned_rows(rows, self.dp.size(), self.dp.rank())
        } else {
            0..rows
        }
    }
}
