//! The memory model's step pieces: the optimizer step's transient and each rank's computations
//! in order (the schedule's plan, or gradient accumulation).

use burn_parallel_schedules::{Action, Op};

use super::model::TrainPlan;

/// What the optimizer step holds above the model state (`p` parameters of `e` bytes), at its
/// largest: the f32 gradients, then per bucket (`q` bytes) its packed send buffer and the
/// reduction. On thread ranks a reduce-scatter reduces the whole bucket on every rank and keeps
/// this rank's rows twice (split, then as the result tensor): `4p + q + 2q/dp`; an all-reduce
/// `4p + q`. Then the update: the reduced gradients and the new values (under ZeRO: this rank's
/// rows, the all-gathered bucket and the unpacked parameters). `dp` counts the context-parallel
/// ranks too (the DP group's size).
pub(super) fn optimizer_transient(plan: &TrainPlan, p: f64, e: f64) -> f64 {
    let d = plan.replicas() as f64;
    let q = (p * 4.0).min(crate::data_parallel::DEFAULT_BUCKET_BYTES as f64);
    let zero = plan.zero && plan.replicas() > 1;
    let reduce = match (plan.replicas(), zero) {
        (1, _) => 4.0 * p,
        (_, true) => 4.0 * p + q + 2.0 * q / d,
        (_, false) => 4.0 * p + q,
    };
    let update = if zero { 4.0 * p / d + p * e / d + 2.0 * p * e } else { 4.0 * p + p * e };
    reduce.max(update)
}

/// Every pipeline rank's computations in order (without a pipeline: each micro-batch's forward
/// and backward, gradient accumulation).
pub(super) fn actions(plan: &TrainPlan) -> Result<Vec<Vec<Action>>, String> {
    if plan.pp == 1 {
        // Gradient accumulation: each micro-batch's forward and backward in turn.
        return Ok(vec![(0..plan.microbatches).flat_map(|mb| [Action { op: Op::F, stage: 0, mb }, Action { op: Op::B, stage: 0, mb }]).collect()]);
    }
    let shape = burn_parallel_schedules::PipelineShape::new(plan.pp, plan.virtual_stages, plan.microbatches);
    let schedule = burn_parallel_schedules::schedule_by_name(&plan.schedule).map_err(|e| e.to_string())?;
    Ok(schedule.plan(&shape).map_err(|e| e.to_string())?.ranks)
}
