//! Parameters tied across pipeline stages (Megatron's shared word embeddings).
//!
//! A model whose token embedding `E [V, h]` is also its head's weight (GPT-2's tied embeddings)
//! holds `E` twice once split: the first stage owns it, the last stage holds a replica for its
//! head ([`PipelineModel::tied_params`] names both). In a step each gets a partial gradient (the
//! lookup's on the first stage, the head's on the last);
//! [`PipelineExecutor::all_reduce_tied_grads`] sums them over the pipeline's embedding group
//! (`ProcessGroups::embedding`: its first and last stage, per TP rank and DP replica) so that
//! both hold the whole `∂L/∂E`, bitwise the same sum on both, and take the same optimizer step:
//! the copies never drift apart. Stages of one rank (interleaved schedules on a pipeline of one)
//! are summed locally first. Forward: nothing; backward: one all-reduce of this rank's `V/t · h`
//! shard per step (Megatron's `_allreduce_word_embedding_grads`), plus two scalar all-reduces that
//! check every member holds as many tied parameters.

use std::collections::HashMap;

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::Tensor;

use super::{PipelineError, PipelineExecutor, PipelineModel};
use crate::comm::ops::{all_reduce, all_reduce_scalar};
use crate::{BackwardWith, CollectiveBackend, Comm, ReduceOp};

impl<B, M, const D: usize> PipelineExecutor<B, M, D>
where
    B: AutodiffBackend + CollectiveBackend + BackwardWith,
    B::InnerBackend: CollectiveBackend,
    M: PipelineModel<B, D>,
{
    /// Sums the gradients of the tied parameters ([`PipelineModel::tied_params`]) of this rank's
    /// stages over `group`, the pipeline's first and last stage (`ProcessGroups::embedding`;
    /// `None` on the middle stages, which hold none). Call it after [`step`](Self::step), before
    /// the DP reduction and the optimizer. A no-op for a model without tied parameters.
    ///
    /// # Errors
    /// A collective failed, a tied parameter has no gradient, or the members of `group` hold
    /// different numbers of tied parameters (every member returns the error).
    pub fn all_reduce_tied_grads(&self, mut grads: Vec<GradientsParams>, group: Option<&Comm>) -> Result<Vec<GradientsParams>, PipelineError> {
        assert_eq!(grads.len(), self.stages().len(), "one gradient set per stage of this rank");
        let tied: Vec<Vec<ParamId>> = self.stages().iter().map(|s| self.model().tied_params(&s.spec, &s.part)).collect();
        let held: Vec<&Vec<ParamId>> = tied.iter().filter(|t| !t.is_empty()).collect();
        let count = held.first().map_or(0, |t| t.len());
        if held.iter().any(|t| t.len() != count) {
            return Err(mismatch(format!("this rank's stages tie different numbers of parameters: {:?}", held.iter().map(|t| t.len()).collect::<Vec<_>>())));
        }
        let group = group.filter(|g| g.size() > 1);
        if let Some(g) = group {
            let (lo, hi) = (-all_reduce_scalar(-(count as f32), ReduceOp::Max, g)?, all_reduce_scalar(count as f32, ReduceOp::Max, g)?);
            if lo != hi {
                return Err(mismatch(format!("the ranks of group {} tie between {lo} and {hi} parameters (this rank: {count})", g.label())));
            }
        }
        if count == 0 {
            return Ok(grads);
        }
        let mut sums: Vec<Option<Flat<B::InnerBackend>>> = vec![None; count];
        for ((stage, g), ids) in self.stages().iter().zip(&mut grads).zip(&tied) {
            let mut take = Take::<B::InnerBackend> { index: ids.iter().enumerate().map(|(k, id)| (*id, k)).collect(), grads: g, out: vec![None; ids.len()] };
            stage.part.visit(&mut take);
            for (k, got) in take.out.into_iter().enumerate() {
                let (flat, shape) = got.ok_or_else(|| mismatch(format!("tied parameter {k} of stage {} has no gradient", stage.spec.stage)))?;
                sums[k] = Some(match sums[k].take() {
                    Some((sum, s)) => (sum + flat, s),
                    None => (flat, shape),
                });
            }
        }
        let mut summed = Vec::with_capacity(count);
        for (sum, shape) in sums.into_iter().flatten() {
            summed.push((if let Some(g) = group { all_reduce(sum, ReduceOp::Sum, g)? } else { sum }, shape));
        }
        for ((stage, g), ids) in self.stages().iter().zip(&mut grads).zip(&tied) {
            let values = ids.iter().zip(&summed).map(|(id, s)| (*id, s.0.clone())).collect();
            stage.part.visit(&mut Put::<B::InnerBackend> { values, grads: g });
        }
        Ok(grads)
    }
}

fn mismatch(what: String) -> PipelineError {
    PipelineError::Tied(what)
}

/// A gradient flattened, with its shape.
type Flat<I> = (Tensor<I, 1>, Vec<usize>);

/// Removes the gradients of the tied parameters (flattened, with their shapes).
struct Take<'a, I: burn::tensor::backend::Backend> {
    index: HashMap<ParamId, usize>,
    grads: &'a mut GradientsParams,
    out: Vec<Option<Flat<I>>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Take<'_, B::InnerBackend> {
    fn visit_float<const N: usize>(&mut self, param: &Param<Tensor<B, N>>) {
        let Some(&k) = self.index.get(&param.id) else { return };
        if let Some(g) = self.grads.remove::<B::InnerBackend, N>(param.id) {
            let shape = g.dims().to_vec();
            self.out[k] = Some((g.reshape([shape.iter().product::<usize>()]), shape));
        }
    }
}

/// Registers the summed gradients back, in each parameter's shape.
struct Put<'a, I: burn::tensor::backend::Backend> {
    values: HashMap<ParamId, Tensor<I, 1>>,
    grads: &'a mut GradientsParams,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Put<'_, B::InnerBackend> {
    fn visit_float<const N: usize>(&mut self, param: &Param<Tensor<B, N>>) {
        if let Some(flat) = self.values.remove(&param.id) {
            self.grads.register::<B::InnerBackend, N>(param.id, flat.reshape(param.val().dims()));
        }
    }
}
