//! Parameters tied across pipeline stages (Megatron's shared word embeddings).
//!
//! A model whose token embedding `E [V, h]` is also its head's weight (GPT-2's tied embeddings)
//! holds `E` twice once split: the first stage owns it, the last stage holds a replica for its
//! head ([`PipelineModel::tied_params`] names both). In a step each gets a partial gradient (the
//! lookup's on the first stage, the head's on the last); they are summed over the pipeline's
//! embedding group (`ProcessGroups::embedding`: its first and last stage, per TP rank and DP
//! replica), stages of one rank (interleaved schedules on a pipeline of one) locally first, so
//! both copies hold the whole `∂L/∂E` and take the same optimizer step.
//!
//! The sum comes **after** the DP reduction, as Megatron's `finalize_model_grads` orders it: the
//! two copies are reduced over DP by different communicators at different bucket offsets (NCCL
//! may add in another order there), but the embedding group then adds the same two tensors, so
//! both get the same bits on any communicator and the copies never drift. `DistAdamW` does it
//! inside its step ([`DistAdamW::tie`](crate::optim::DistAdamW::tie)); a loop that reduces DP
//! itself calls [`PipelineExecutor::all_reduce_tied_grads`] after it. Cost: one all-reduce of this
//! rank's `V/t · h` (or its ZeRO shard) per step over a group of two (Megatron's
//! `_allreduce_word_embedding_grads`).

use std::collections::HashMap;

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;

use super::{PipelineExecutor, PipelineModel};
use crate::comm::ops::{all_reduce, all_reduce_scalar};
use crate::error::CommError;
use crate::{BackwardWith, CollectiveBackend, Comm, ReduceOp};

/// Tied parameters that do not pair up.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TiedError {
    /// A collective failed.
    #[error(transparent)]
    Comm(#[from] CommError),
    /// Ranks holding different numbers of tied parameters, a tied parameter without a gradient,
    /// a replica no one ties. Every member of the group gets it.
    #[error("tied parameters: {0}")]
    Mismatch(String),
}

/// The number of tied sets this rank holds (`local`; `Err`: something is wrong here), checked
/// against every other member of `group` in one exchange, so that all fail together (none is
/// left waiting in the sum).
pub(crate) fn agree_on_count(local: Result<usize, String>, group: Option<&Comm>) -> Result<usize, TiedError> {
    let Some(g) = group.filter(|g| g.size() > 1) else { return local.map_err(TiedError::Mismatch) };
    let mine = local.as_ref().map_or(-1.0, |n| *n as f32);
    let (lo, hi) = (-all_reduce_scalar(-mine, ReduceOp::Max, g)?, all_reduce_scalar(mine, ReduceOp::Max, g)?);
    match local {
        Err(e) => Err(TiedError::Mismatch(e)),
        Ok(_) if lo < 0.0 => {
            Err(TiedError::Mismatch(format!("another rank of group {} could not collect its tied parameters (its error says why)", g.label())))
        }
        Ok(n) if lo != hi => Err(TiedError::Mismatch(format!("the ranks of group {} tie between {lo} and {hi} parameters (this rank: {n})", g.label()))),
        Ok(n) => Ok(n),
    }
}

/// Each set's sum: its members (this rank's copies) added in order, then all-reduced over
/// `group`.
pub(crate) fn sum_sets<I: CollectiveBackend>(sets: Vec<Vec<Tensor<I, 1>>>, group: Option<&Comm>) -> Result<Vec<Tensor<I, 1>>, TiedError> {
    let group = group.filter(|g| g.size() > 1);
    let mut out = Vec::with_capacity(sets.len());
    for set in sets {
        let local = set.into_iter().reduce(|a, b| a + b).ok_or_else(|| TiedError::Mismatch("a tied set without a member on this rank".into()))?;
        out.push(match group {
            Some(g) => all_reduce(local, ReduceOp::Sum, g)?,
            None => local,
        });
    }
    Ok(out)
}

/// This rank's tied sets from each stage's tied parameters: set `k` holds every stage's `k`-th;
/// stages that tie must tie as many.
pub(crate) fn sets_of(per_stage: &[Vec<ParamId>]) -> Result<Vec<Vec<ParamId>>, String> {
    let held: Vec<&Vec<ParamId>> = per_stage.iter().filter(|t| !t.is_empty()).collect();
    let count = held.first().map_or(0, |t| t.len());
    if held.iter().any(|t| t.len() != count) {
        return Err(format!("this rank's stages tie different numbers of parameters: {:?}", held.iter().map(|t| t.len()).collect::<Vec<_>>()));
    }
    Ok((0..count).map(|k| held.iter().map(|t| t[k]).collect()).collect())
}

impl<B, M, const D: usize> PipelineExecutor<B, M, D>
where
    B: AutodiffBackend + CollectiveBackend + BackwardWith,
    B::InnerBackend: CollectiveBackend,
    M: PipelineModel<B, D>,
{
    /// The tied parameters ([`PipelineModel::tied_params`]) of each of this rank's stages.
    pub fn tied_params(&self) -> Vec<Vec<ParamId>> {
        self.stages().iter().map(|s| self.model().tied_params(&s.spec, &s.part)).collect()
    }

    /// Sums the gradients of the tied parameters of this rank's stages over `group`, the
    /// pipeline's first and last stage (`ProcessGroups::embedding`; `None` on the middle stages,
    /// which hold none), for a training loop that reduces DP itself: call it **after** the DP
    /// reduction (`all_reduce_gradients`) and before clipping and the optimizer (Megatron's
    /// order: the copies are reduced over DP by different communicators, maybe in different
    /// orders, but here both add the same two tensors, so they stay bitwise alike on any
    /// communicator). With `DistAdamW`, call [`DistAdamW::tie`](crate::optim::DistAdamW::tie)
    /// once instead. Every member of `group` must call it (two scalar all-reduces check they tie
    /// alike, then one all-reduce per tied parameter).
    ///
    /// # Errors
    /// A collective failed, or the members of `group` do not tie alike (every member returns
    /// the error).
    pub fn all_reduce_tied_grads(&self, mut grads: Vec<GradientsParams>, group: Option<&Comm>) -> Result<Vec<GradientsParams>, TiedError> {
        assert_eq!(grads.len(), self.stages().len(), "one gradient set per stage of this rank");
        let tied = self.tied_params();
        let mut flats: HashMap<ParamId, Tensor<B::InnerBackend, 1>> = HashMap::new();
        for ((stage, g), ids) in self.stages().iter().zip(&mut grads).zip(&tied) {
            stage.part.visit(&mut Take::<B::InnerBackend> { ids, grads: g, out: &mut flats });
        }
        let local = sets_of(&tied).and_then(|sets| match sets.iter().flatten().find(|id| !flats.contains_key(id)) {
            Some(id) => Err(format!("tied parameter {id} has no gradient")),
            None => Ok(sets),
        });
        let sets = local.clone().unwrap_or_default();
        agree_on_count(local.map(|s| s.len()), group)?;
        let members = sets.iter().map(|set| set.iter().map(|id| flats[id].clone()).collect()).collect();
        let sums = sum_sets(members, group)?;
        let mut values = HashMap::new();
        for (set, sum) in sets.iter().zip(sums) {
            for id in set {
                values.insert(*id, sum.clone());
            }
        }
        for (stage, g) in self.stages().iter().zip(&mut grads) {
            stage.part.visit(&mut Put::<B::InnerBackend> { values: &mut values, grads: g });
        }
        Ok(grads)
    }
}

/// Removes the gradients of `ids` (flattened).
struct Take<'a, I: Backend> {
    ids: &'a [ParamId],
    grads: &'a mut GradientsParams,
    out: &'a mut HashMap<ParamId, Tensor<I, 1>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Take<'_, B::InnerBackend> {
    fn visit_float<const N: usize>(&mut self, param: &Param<Tensor<B, N>>) {
        if !self.ids.contains(&param.id) {
            return;
        }
        if let Some(g) = self.grads.remove::<B::InnerBackend, N>(param.id) {
            let n = g.dims().iter().product::<usize>();
            self.out.insert(param.id, g.reshape([n]));
        }
    }
}

/// Registers the summed gradients back, in each parameter's shape.
struct Put<'a, I: Backend> {
    values: &'a mut HashMap<ParamId, Tensor<I, 1>>,
    grads: &'a mut GradientsParams,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Put<'_, B::InnerBackend> {
    fn visit_float<const N: usize>(&mut self, param: &Param<Tensor<B, N>>) {
        if let Some(flat) = self.values.remove(&param.id) {
            self.grads.register::<B::InnerBackend, N>(param.id, flat.reshape(param.val().dims()));
        }
    }
}
