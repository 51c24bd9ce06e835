//! [`DistAdamW::tie`]: parameters tied across pipeline stages (tied embeddings), summed inside
//! the step after the DP reduction (see `crate::pipeline`'s tied parameters: why after).

use std::collections::HashMap;

use burn::module::ParamId;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::Tensor;

use super::{DistAdamW, Entry, OptimError};
use crate::comm::ops::all_reduce_scalar;
use crate::pipeline::tied::{agree_on_count, sets_of, sum_sets};
use crate::pipeline::TiedError;
use crate::{CollectiveBackend, Comm, ReduceOp};

/// The tied sets of this rank (each: its copies of one parameter), the group that sums them,
/// and whether the stages have agreed that the step's parameters pair up.
#[derive(Default)]
pub(super) struct Tied {
    sets: Vec<Vec<ParamId>>,
    group: Option<Comm>,
    agreed: bool,
}

impl<B> DistAdamW<B>
where
    B: AutodiffBackend,
    B::InnerBackend: CollectiveBackend,
{
    /// Ties parameters across pipeline stages: `per_stage` holds each of this rank's stages'
    /// tied parameters (`PipelineExecutor::tied_params`: the `k`-th of each stage are copies of
    /// one parameter), `group` is the pipeline's embedding group (`ProcessGroups::embedding`).
    /// From the next [`step`](Self::step) on, each tied gradient is summed over its copies
    /// after the DP reduction (on ZeRO shards: both copies shard alike), so the copies get the
    /// same bits and the same update; the replica counts once in the global norm. Every member
    /// of `group` calls it once (it checks they tie alike: every member fails otherwise).
    pub fn tie(&mut self, per_stage: Vec<Vec<ParamId>>, group: Option<&Comm>) -> Result<(), TiedError> {
        let local = sets_of(&per_stage);
        let sets = local.clone().unwrap_or_default();
        agree_on_count(local.map(|s| s.len()), group)?;
        self.tied = Tied { sets, group: group.cloned(), agreed: false };
        Ok(())
    }

    /// [`check_tied`](Self::check_tied); on the first step (after `new` or `tie`) agreed over
    /// the pipeline group (a max of an error flag), so that a stage that refuses fails every
    /// stage at once instead of leaving them in the step's next collective.
    pub(super) fn check_tied_agreed(&mut self, entries: &[Entry<B::InnerBackend>]) -> Result<(), OptimError> {
        let local = self.check_tied(entries);
        if self.tied.agreed {
            return local;
        }
        let flag = if local.is_err() { 1.0 } else { 0.0 };
        let any = if self.pp.size() > 1 { all_reduce_scalar(flag, ReduceOp::Max, &self.pp)? } else { flag };
        local?;
        if any > 0.0 {
            return Err(TiedError::Mismatch(format!("another stage of pipeline group {} refused the step (its error says why)", self.pp.label())).into());
        }
        self.tied.agreed = true;
        Ok(())
    }

    /// Before any collective of a step: every tied parameter has a gradient here, and a stage
    /// replica is stepped only when tied (else its gradient would be the head's part alone).
    pub(super) fn check_tied(&self, entries: &[Entry<B::InnerBackend>]) -> Result<(), OptimError> {
        let ids: Vec<ParamId> = entries.iter().map(|e| e.id).collect();
        if let Some(id) = self.tied.sets.iter().flatten().find(|id| !ids.contains(id)) {
            return Err(TiedError::Mismatch(format!("tied parameter {id} has no gradient in this step")).into());
        }
        let tied: Vec<&ParamId> = self.tied.sets.iter().flatten().collect();
        match entries.iter().find(|e| e.replica && !tied.contains(&&e.id)) {
            Some(_) => Err(TiedError::Mismatch(
                "a stage replica of tied embeddings (TiedHead) is stepped without DistAdamW::tie: its gradient would be the head's part alone".into(),
            )
            .into()),
            None => Ok(()),
        }
    }

    /// Replaces each tied gradient (`grads`, after the DP reduction, aligned with `entries`) by
    /// its set's sum.
    pub(super) fn sum_tied(&self, entries: &[Entry<B::InnerBackend>], grads: &mut [Tensor<B::InnerBackend, 1>]) -> Result<(), OptimError> {
        if self.tied.sets.is_empty() {
            return Ok(());
        }
        let _t = crate::timing::span!(crate::timing::phase::TIED_GRADS).entered();
        let index: HashMap<ParamId, usize> = entries.iter().enumerate().map(|(i, e)| (e.id, i)).collect();
        let members = self.tied.sets.iter().map(|set| set.iter().map(|id| grads[index[id]].clone()).collect()).collect();
        let sums = sum_sets(members, self.tied.group.as_ref())?;
        for (set, sum) in self.tied.sets.iter().zip(sums) {
            for id in set {
                grads[index[id]] = sum.clone();
            }
        }
        Ok(())
    }
}
