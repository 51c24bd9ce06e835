//! How tensor parallelism splits each parameter: the one rule that gradient clipping and
//! checkpoints share.
//!
//! A parameter is recognised by the type of the module that holds it and its field name (Burn's
//! visitors report `Struct:ColumnLinear` and `weight`):
//!
//! | module | field | split over TP along |
//! | --- | --- | --- |
//! | `ColumnLinear` | `weight` `[d_in, d_out]` | dim 1 (output features) |
//! | `ColumnLinear` | `bias` `[d_out]` | dim 0 |
//! | `RowLinear` | `weight` `[d_in, d_out]` | dim 0 (input features) |
//! | `VocabParallelEmbedding` | `weight` `[V, h]` | dim 0 (vocabulary) |
//! | `TiedHead` | `weight` `[V, h]` | dim 0 (vocabulary) |
//! | anything else | | replicated (every TP rank holds it whole) |
//!
//! Shards are even: rank `r` of `t` holds rows `[r·n/t, (r+1)·n/t)` of the split dimension.
//!
//! A `TiedHead`'s weight is also a **stage replica** ([`is_stage_replica`]): the last pipeline
//! stage's copy of the token embedding that the first stage owns (tied embeddings). Its gradient
//! is summed with the owner's ([`DistAdamW::tie`], or
//! [`PipelineExecutor::all_reduce_tied_grads`]), so the two stay equal; the global gradient norm
//! counts it once (the owner's) and checkpoints hold the owner's copy only (the replica loads it
//! back by its global path).
//!
//! [`DistAdamW::tie`]: crate::optim::DistAdamW::tie
//! [`PipelineExecutor::all_reduce_tied_grads`]: crate::pipeline::PipelineExecutor::all_reduce_tied_grads

/// The dimension along which the TP group splits the parameter `field` of a module of type
/// `container_type` (as Burn's `ModuleVisitor::enter_module` names it), or `None` if it is
/// replicated.
pub fn tp_split_dim(container_type: &str, field: &str) -> Option<usize> {
    match (container_type, field) {
        ("Struct:ColumnLinear", "weight") => Some(1),
        ("Struct:ColumnLinear", "bias") => Some(0),
        ("Struct:RowLinear", "weight") => Some(0),
        ("Struct:VocabParallelEmbedding", "weight") => Some(0),
        ("Struct:TiedHead", "weight") => Some(0),
        _ => None,
    }
}

/// Whether the parameter `field` of a module of type `container_type` is a replica of a
/// parameter another pipeline stage owns (the last stage's copy of tied embeddings): left out of
/// the global gradient norm and of checkpoint writes (see the [module docs](self)).
pub fn is_stage_replica(container_type: &str, field: &str) -> bool {
    matches!((container_type, field), ("Struct:TiedHead", "weight"))
}

/// Where one rank's shard of a parameter sits in the whole tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardPlacement {
    /// Shape of the whole (unsharded) tensor.
    pub global_shape: Vec<usize>,
    /// Offset of the shard in the whole tensor, per dimension.
    pub offset: Vec<usize>,
    /// Whether the TP group splits it (otherwise every TP rank holds the same tensor).
    pub split: bool,
}

/// The placement of a local tensor of `local_shape` on TP rank `tp_rank` of `tp_size`, split
/// along `dim` (or replicated for `None`).
pub fn placement(local_shape: &[usize], dim: Option<usize>, tp_rank: usize, tp_size: usize) -> ShardPlacement {
    let mut global_shape = local_shape.to_vec();
    let mut offset = vec![0; local_shape.len()];
    match dim {
        Some(d) if d < local_shape.len() => {
            global_shape[d] *= tp_size;
            offset[d] = tp_rank * local_shape[d];
            ShardPlacement { global_shape, offset, split: true }
        }
        _ => ShardPlacement { global_shape, offset, split: false },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_and_placements() {
        assert_eq!(tp_split_dim("Struct:ColumnLinear", "weight"), Some(1));
        assert_eq!(tp_split_dim("Struct:RowLinear", "bias"), None);
        assert_eq!(tp_split_dim("Struct:ParallelLayerNorm", "gamma"), None);
        assert_eq!(tp_split_dim("Struct:TiedHead", "weight"), Some(0));
        assert!(is_stage_replica("Struct:TiedHead", "weight"));
        assert!(!is_stage_replica("Struct:VocabParallelEmbedding", "weight"));
        let p = placement(&[16, 8], Some(1), 3, 4);
        assert_eq!(p, ShardPlacement { global_shape: vec![16, 32], offset: vec![0, 24], split: true });
        let p = placement(&[16], None, 3, 4);
        assert_eq!(p, ShardPlacement { global_shape: vec![16], offset: vec![0], split: false });
    }
}
