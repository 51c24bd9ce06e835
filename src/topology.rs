//! Parallel layout: degrees, rank ↔ coordinates, and process groups.
//!
//! Ranks are laid out in Megatron order: **tensor-parallel fastest, then context-parallel, then
//! data-parallel, then pipeline**: `rank = tp + T·(cp + C·(dp + D·pp))`. With 16 ranks, tp=2,
//! pp=4 (so dp=2): TP groups `[0,1] [2,3] …`, DP groups `[0,2] [1,3] [4,6] …`, PP groups
//! `[0,4,8,12] [1,5,9,13] …`.
//!
//! Context parallelism (`context_parallel` C > 1, [`crate::context`]) splits each sample's
//! sequence over C ranks that hold the same parameters: their gradients are reduced with the
//! data-parallel replicas', so the **DP group holds D·C ranks** (Megatron's data-parallel group
//! with context parallelism), in `(dp, cp)` order; the data a rank reads follows its `dp`
//! coordinate alone (the C ranks of a replica read the same samples).

use burn::config::Config;

use crate::comm::Comm;
use crate::error::{CommError, ConfigError};

/// Parallel degrees of a run. `data_parallel * context_parallel * pipeline_parallel *
/// tensor_parallel` must equal the world size.
#[derive(Config, Debug, PartialEq, Eq)]
pub struct ParallelConfig {
    /// Data-parallel degree (model replicas).
    #[config(default = 1)]
    pub data_parallel: usize,
    /// Pipeline-parallel degree (stages on distinct ranks).
    #[config(default = 1)]
    pub pipeline_parallel: usize,
    /// Tensor-parallel degree (ranks sharing every layer).
    #[config(default = 1)]
    pub tensor_parallel: usize,
    /// Context-parallel degree (ranks sharing each sample's sequence; [`crate::context`]).
    #[config(default = 1)]
    pub context_parallel: usize,
    /// Model chunks per pipeline rank (interleaved schedules); 1 otherwise.
    #[config(default = 1)]
    pub virtual_stages: usize,
    /// Shard layer-norm/dropout regions along the sequence over the TP group.
    #[config(default = false)]
    pub sequence_parallel: bool,
}

/// Where a rank sits in the (dp, cp, pp, tp) grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RankCoords {
    /// Data-parallel index (which samples the rank reads).
    pub dp: usize,
    /// Context-parallel index (which chunks of the sequence; 0 without context parallelism).
    pub cp: usize,
    /// Pipeline stage index.
    pub pp: usize,
    /// Tensor-parallel index.
    pub tp: usize,
}

/// The sizes of a model that tensor parallelism splits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelDims {
    /// Hidden (model) size.
    pub hidden: usize,
    /// Attention heads.
    pub heads: usize,
    /// Feed-forward inner size.
    pub ffn: usize,
    /// Vocabulary size.
    pub vocab: usize,
}

impl ParallelConfig {
    /// `data_parallel * context_parallel * pipeline_parallel * tensor_parallel` (saturating:
    /// absurd degrees fail [`validate`](Self::validate) instead of wrapping around to a
    /// plausible world size).
    pub fn world_size(&self) -> usize {
        self.data_parallel.saturating_mul(self.context_parallel).saturating_mul(self.pipeline_parallel).saturating_mul(self.tensor_parallel)
    }

    /// The ranks holding one parameter shard: `data_parallel * context_parallel` (the DP group's
    /// size, see the module docs).
    pub fn replicas(&self) -> usize {
        self.data_parallel * self.context_parallel
    }

    /// Checks the degrees against a world size.
    pub fn validate(&self, world: usize) -> Result<(), ConfigError> {
        for (name, v) in [
            ("data_parallel", self.data_parallel),
            ("pipeline_parallel", self.pipeline_parallel),
            ("tensor_parallel", self.tensor_parallel),
            ("context_parallel", self.context_parallel),
            ("virtual_stages", self.virtual_stages),
        ] {
            if v == 0 {
                return Err(ConfigError::ZeroDegree { name });
            }
        }
        if self.world_size() != world {
            return Err(ConfigError::WorldSizeMismatch {
                world,
                dp: self.data_parallel,
                cp: self.context_parallel,
                pp: self.pipeline_parallel,
                tp: self.tensor_parallel,
                product: self.world_size(),
            });
        }
        Ok(())
    }

    /// Checks that every dimension tensor parallelism splits is at least 1 and divisible by
    /// `tensor_parallel` (the hidden size also by the heads).
    pub fn validate_model(&self, dims: &ModelDims) -> Result<(), ConfigError> {
        let tp = self.tensor_parallel;
        if tp == 0 {
            return Err(ConfigError::ZeroDegree { name: "tensor_parallel" });
        }
        let sizes = [("attention heads", dims.heads), ("hidden size", dims.hidden), ("ffn size", dims.ffn), ("vocab size", dims.vocab)];
        if let Some(&(what, _)) = sizes.iter().find(|(_, value)| *value == 0) {
            return Err(ConfigError::ZeroSize { what });
        }
        if !dims.hidden.is_multiple_of(dims.heads) {
            return Err(ConfigError::NotDivisible { what: "hidden size", value: dims.hidden, degree_name: "attention heads", degree: dims.heads });
        }
        for (what, value) in sizes {
            if value % tp != 0 {
                return Err(ConfigError::NotDivisible { what, value, degree_name: "tensor_parallel", degree: tp });
            }
        }
        Ok(())
    }

    /// Coordinates of a global rank.
    pub fn coords(&self, rank: usize) -> Result<RankCoords, ConfigError> {
        let world = self.world_size();
        if rank >= world {
            return Err(ConfigError::RankOutOfRange { rank, world });
        }
        let tp = rank % self.tensor_parallel;
        let cp = (rank / self.tensor_parallel) % self.context_parallel;
        let dp = (rank / (self.tensor_parallel * self.context_parallel)) % self.data_parallel;
        let pp = rank / (self.tensor_parallel * self.context_parallel * self.data_parallel);
        Ok(RankCoords { dp, cp, pp, tp })
    }

    /// Global rank of coordinates (inverse of [`coords`](Self::coords)).
    pub fn rank_of(&self, c: RankCoords) -> usize {
        c.tp + self.tensor_parallel * (c.cp + self.context_parallel * (c.dp + self.data_parallel * c.pp))
    }

    /// Global ranks of the TP group containing `rank`, in TP order.
    pub fn tp_group(&self, rank: usize) -> Result<Vec<usize>, ConfigError> {
        let c = self.coords(rank)?;
        Ok((0..self.tensor_parallel).map(|tp| self.rank_of(RankCoords { tp, ..c })).collect())
    }

    /// Global ranks of the DP group containing `rank` (with its context-parallel ranks: every
    /// rank holding the same parameter shard), in `(dp, cp)` order.
    pub fn dp_group(&self, rank: usize) -> Result<Vec<usize>, ConfigError> {
        let c = self.coords(rank)?;
        let (d, k) = (self.data_parallel, self.context_parallel);
        Ok((0..d * k).map(|i| self.rank_of(RankCoords { dp: i / k, cp: i % k, ..c })).collect())
    }

    /// Global ranks of the context-parallel group containing `rank`, in CP order.
    pub fn cp_group(&self, rank: usize) -> Result<Vec<usize>, ConfigError> {
        let c = self.coords(rank)?;
        Ok((0..self.context_parallel).map(|cp| self.rank_of(RankCoords { cp, ..c })).collect())
    }

    /// Global ranks of the pipeline group containing `rank`, in stage order.
    pub fn pp_group(&self, rank: usize) -> Result<Vec<usize>, ConfigError> {
        let c = self.coords(rank)?;
        Ok((0..self.pipeline_parallel).map(|pp| self.rank_of(RankCoords { pp, ..c })).collect())
    }

    /// First and last stage of `rank`'s pipeline (one rank when pp = 1): the group that reduces
    /// tied embedding gradients.
    pub fn embedding_group(&self, rank: usize) -> Result<Vec<usize>, ConfigError> {
        let pp = self.pp_group(rank)?;
        let mut g = vec![pp[0], pp[pp.len() - 1]];
        g.dedup();
        Ok(g)
    }

    /// Every TP group of the world, in order of their first rank.
    pub fn all_tp_groups(&self) -> Vec<Vec<usize>> {
        let n = self.world_size();
        (0..n).step_by(self.tensor_parallel.max(1)).map(|r| self.tp_group(r).unwrap()).collect()
    }
}

/// A rank's view of the layout: its coordinates and a communicator per group it belongs to.
#[derive(Debug, Clone)]
pub struct ProcessGroups {
    /// The layout.
    pub config: ParallelConfig,
    /// This rank's coordinates.
    pub coords: RankCoords,
    /// All ranks.
    pub world: Comm,
    /// Ranks sharing this rank's layers (tensor parallel).
    pub tp: Comm,
    /// Ranks holding replicas of this rank's shard (data parallel, with the context-parallel
    /// ranks: `data_parallel · context_parallel` ranks).
    pub dp: Comm,
    /// Ranks sharing this rank's samples along the sequence (context parallel).
    pub cp: Comm,
    /// Ranks holding the other stages of this rank's pipeline.
    pub pp: Comm,
    /// First and last stage of this pipeline (tied embeddings); `None` on middle stages.
    pub embedding: Option<Comm>,
}

impl ProcessGroups {
    /// Validates `config` against `world` and creates this rank's groups.
    pub fn new(config: ParallelConfig, world: Comm) -> Result<Self, GroupsError> {
        config.validate(world.size())?;
        let rank = world.global_rank();
        let coords = config.coords(rank)?;
        let tp = world.new_group("tp", &config.tp_group(rank)?)?;
        let dp = world.new_group("dp", &config.dp_group(rank)?)?;
        let cp = world.new_group("cp", &config.cp_group(rank)?)?;
        let pp = world.new_group("pp", &config.pp_group(rank)?)?;
        let members = config.embedding_group(rank)?;
        let embedding = if members.contains(&rank) { Some(world.new_group("embedding", &members)?) } else { None };
        Ok(Self { config, coords, world, tp, dp, cp, pp, embedding })
    }
}

/// Creating process groups failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GroupsError {
    /// The layout is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The communicator refused a group.
    #[error(transparent)]
    Comm(#[from] CommError),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(dp: usize, pp: usize, tp: usize) -> ParallelConfig {
        ParallelConfig::new().with_data_parallel(dp).with_pipeline_parallel(pp).with_tensor_parallel(tp)
    }

    #[test]
    fn megatron_order_16_ranks() {
        let c = cfg(2, 4, 2);
        assert_eq!(c.tp_group(0).unwrap(), vec![0, 1]);
        assert_eq!(c.tp_group(3).unwrap(), vec![2, 3]);
        assert_eq!(c.dp_group(0).unwrap(), vec![0, 2]);
        assert_eq!(c.dp_group(5).unwrap(), vec![5, 7]);
        assert_eq!(c.pp_group(0).unwrap(), vec![0, 4, 8, 12]);
        assert_eq!(c.pp_group(1).unwrap(), vec![1, 5, 9, 13]);
        assert_eq!(c.embedding_group(5).unwrap(), vec![1, 13]);
        for r in 0..16 {
            assert_eq!(c.rank_of(c.coords(r).unwrap()), r);
        }
        assert_eq!(c.coords(13).unwrap(), RankCoords { dp: 0, cp: 0, pp: 3, tp: 1 });
        assert_eq!(c.all_tp_groups().len(), 8);
    }

    /// Megatron's order with context parallelism: tp, cp, dp, pp; the DP group holds the
    /// replica's context-parallel ranks.
    #[test]
    fn context_parallel_order_16_ranks() {
        let c = cfg(2, 2, 2).with_context_parallel(2);
        assert_eq!(c.world_size(), 16);
        assert_eq!(c.tp_group(5).unwrap(), vec![4, 5]);
        assert_eq!(c.cp_group(5).unwrap(), vec![5, 7]);
        assert_eq!(c.dp_group(5).unwrap(), vec![1, 3, 5, 7]);
        assert_eq!(c.pp_group(5).unwrap(), vec![5, 13]);
        assert_eq!(c.coords(7).unwrap(), RankCoords { dp: 1, cp: 1, pp: 0, tp: 1 });
        for r in 0..16 {
            assert_eq!(c.rank_of(c.coords(r).unwrap()), r);
        }
        assert_eq!(c.replicas(), 4);
        assert!(matches!(c.clone().with_context_parallel(0).validate(0), Err(ConfigError::ZeroDegree { name: "context_parallel" })));
    }

    #[test]
    fn world_size_mismatch_names_numbers() {
        let e = cfg(2, 2, 2).validate(6).unwrap_err();
        assert_eq!(e.to_string(), "world size 6 != data_parallel 2 x context_parallel 1 x pipeline_parallel 2 x tensor_parallel 2 = 8");
        assert!(matches!(cfg(1, 0, 1).validate(0), Err(ConfigError::ZeroDegree { name: "pipeline_parallel" })));
        assert!(cfg(1, 1, 4).coords(4).is_err());
        // (2^63 + 1) × 2 would wrap around to 2 on 64 bits.
        assert!(matches!(cfg(usize::MAX / 2 + 2, 1, 2).validate(2), Err(ConfigError::WorldSizeMismatch { product: usize::MAX, .. })));
    }

    #[test]
    fn model_divisibility() {
        let dims = ModelDims { hidden: 64, heads: 4, ffn: 256, vocab: 256 };
        assert!(cfg(1, 1, 4).validate_model(&dims).is_ok());
        let e = cfg(1, 1, 8).validate_model(&dims).unwrap_err();
        assert_eq!(e.to_string(), "attention heads = 4 is not divisible by tensor_parallel = 8");
        let e = cfg(1, 1, 2).validate_model(&ModelDims { vocab: 255, ..dims }).unwrap_err();
        assert_eq!(e.to_string(), "vocab size = 255 is not divisible by tensor_parallel = 2");
        let e = cfg(1, 1, 3).validate_model(&ModelDims { heads: 6, hidden: 66, ..dims }).unwrap_err();
        assert_eq!(e.to_string(), "ffn size = 256 is not divisible by tensor_parallel = 3");
        let e = cfg(1, 1, 1).validate_model(&ModelDims { heads: 5, ..dims }).unwrap_err();
        assert!(e.to_string().contains("hidden size = 64 is not divisible by attention heads = 5"));
        for (dims, what) in [
            (ModelDims { hidden: 0, ..dims }, "hidden size"),
            (ModelDims { heads: 0, ..dims }, "attention heads"),
            (ModelDims { ffn: 0, ..dims }, "ffn size"),
            (ModelDims { vocab: 0, ..dims }, "vocab size"),
        ] {
            let e = cfg(1, 1, 1).validate_model(&dims).unwrap_err();
            assert_eq!(e.to_string(), format!("{what} must be at least 1 (got 0)"));
        }
    }
}
