//! How a run is trained, as the memory model takes it ([`TrainPlan`]), and its validation.

use crate::attention::AttentionCore;
use crate::precision::Precision;
use crate::recompute::Recompute;

use super::model::GptShape;

/// How it is trained.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainPlan {
    /// Data-parallel degree.
    pub dp: usize,
    /// Context-parallel degree (`crate::context`: a rank holds `seq / cp` tokens of each
    /// sequence and the gathered keys and values of all of them; ZeRO shards over `dp · cp`).
    pub cp: usize,
    /// Pipeline stages (ranks).
    pub pp: usize,
    /// Tensor-parallel degree.
    pub tp: usize,
    /// Chunks per pipeline rank.
    pub virtual_stages: usize,
    /// Sequence parallelism.
    pub sequence_parallel: bool,
    /// Sequences per micro-batch.
    pub microbatch: usize,
    /// Micro-batches per step (without a pipeline: gradient accumulation over them).
    pub microbatches: usize,
    /// Pipeline schedule (`1f1b`, `gpipe`, `interleaved-1f1b`, `zb-h1`).
    pub schedule: String,
    /// Activation recompute.
    pub recompute: Recompute,
    /// ZeRO-1.
    pub zero: bool,
    /// Compute precision.
    pub precision: Precision,
    /// Dropout probability > 0.
    pub dropout: bool,
    /// Cross-entropy rows per chunk (`None`: the whole batch at once).
    pub loss_chunk: Option<usize>,
    /// What the attention core runs (`AttentionKernel::resolve`): the fused kernels (CUDA/wgpu)
    /// or the chunked Burn ops keep the f32 log-sum-exp instead of the `s²` tensors.
    pub attention: AttentionCore,
}

impl TrainPlan {
    /// The ranks holding the same parameter shard (the DP group, CP ranks included).
    pub fn replicas(&self) -> usize {
        self.dp * self.cp
    }
}

/// The plan's degrees are at least 1, the model splits over its tp, a sequence is not empty, a
/// micro-batch is not empty.
pub(super) fn check(g: &GptShape, plan: &TrainPlan) -> Result<(), String> {
    if g.seq == 0 {
        return Err(crate::ConfigError::ZeroSize { what: "sequence length" }.to_string());
    }
    let cfg = crate::ParallelConfig::new()
        .with_data_parallel(plan.dp)
        .with_context_parallel(plan.cp)
        .with_pipeline_parallel(plan.pp)
        .with_tensor_parallel(plan.tp)
        .with_virtual_stages(plan.virtual_stages);
    cfg.validate(cfg.world_size()).map_err(|e| e.to_string())?;
    cfg.validate_model(&crate::ModelDims { hidden: g.hidden, heads: g.heads, ffn: g.ffn, vocab: g.vocab }).map_err(|e| e.to_string())?;
    if let Some(k) = g.arch.kv_heads {
        if k == 0 || !g.heads.is_multiple_of(k) || !k.is_multiple_of(plan.tp) {
            return Err(format!("{k} key/value heads must divide {} attention heads and be divisible by tensor_parallel = {}", g.heads, plan.tp));
        }
    }
    crate::context::check_seq_len(g.seq, plan.cp).map_err(|e| e.to_string())?;
    let local = g.seq / plan.cp.max(1);
    if plan.sequence_parallel && !local.is_multiple_of(plan.tp) {
        return Err(format!("sequence parallelism splits each rank's {local} tokens over tensor_parallel = {}: not divisible", plan.tp));
    }
    if plan.microbatch == 0 || plan.microbatches == 0 {
        return Err(format!("a step needs at least one sample: micro-batch size {}, {} micro-batches", plan.microbatch, plan.microbatches));
    }
    Ok(())
}
