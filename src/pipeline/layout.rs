//! Splitting a model's layers over pipeline stages.

use std::ops::Range;

use crate::error::ConfigError;

/// The part of a model one stage holds: a contiguous range of layers, plus what runs before the
/// first layer (on stage 0) and after the last (on the last stage).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartSpec {
    /// Global stage index.
    pub stage: usize,
    /// Number of stages.
    pub stages: usize,
    /// Layers of this stage (global indices).
    pub layers: Range<usize>,
}

impl PartSpec {
    /// The stage that also runs what comes before the first layer (e.g. the embedding).
    pub fn is_first(&self) -> bool {
        self.stage == 0
    }

    /// The stage that also runs what comes after the last layer (e.g. head and loss).
    pub fn is_last(&self) -> bool {
        self.stage + 1 == self.stages
    }
}

/// How many layers each stage holds. Every layer is placed exactly once (torchtitan#963).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageLayout {
    layers_per_stage: Vec<usize>,
}

impl StageLayout {
    /// `num_layers` split over `stages` as evenly as possible; the extra layers go to the
    /// stages after the first, in order (the first stage also holds the embedding).
    pub fn balanced(num_layers: usize, stages: usize) -> Result<Self, ConfigError> {
        if stages == 0 {
            return Err(ConfigError::ZeroDegree { name: "pipeline stages" });
        }
        if num_layers < stages {
            return Err(ConfigError::Invalid(format!("{num_layers} layers cannot fill {stages} pipeline stages (at least one layer each)")));
        }
        let mut counts = vec![num_layers / stages; stages];
        let order = (1..stages).chain(std::iter::once(0));
        for s in order.take(num_layers % stages) {
            counts[s] += 1;
        }
        Ok(Self { layers_per_stage: counts })
    }

    /// An explicit layout: `counts[s]` layers on stage `s`; the counts must add up to `num_layers`.
    pub fn explicit(counts: Vec<usize>, num_layers: usize) -> Result<Self, ConfigError> {
        let total: usize = counts.iter().sum();
        if counts.is_empty() || total != num_layers {
            return Err(ConfigError::Invalid(format!("layout {counts:?} places {total} layers but the model has {num_layers}")));
        }
        Ok(Self { layers_per_stage: counts })
    }

    /// Number of stages.
    pub fn stages(&self) -> usize {
        self.layers_per_stage.len()
    }

    /// Layers per stage.
    pub fn counts(&self) -> &[usize] {
        &self.layers_per_stage
    }

    /// The part of stage `stage`.
    pub fn part(&self, stage: usize) -> PartSpec {
        let start: usize = self.layers_per_stage[..stage].iter().sum();
        PartSpec { stage, stages: self.stages(), layers: start..start + self.layers_per_stage[stage] }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balanced_and_explicit_layouts() {
        let l = StageLayout::balanced(10, 4).unwrap();
        assert_eq!(l.counts(), &[2, 3, 3, 2]);
        assert_eq!(l.part(1).layers, 2..5);
        assert!(l.part(3).is_last() && l.part(0).is_first());
        assert_eq!(StageLayout::balanced(8, 4).unwrap().counts(), &[2, 2, 2, 2]);
        assert!(StageLayout::balanced(3, 4).unwrap_err().to_string().contains("3 layers cannot fill 4"));
        let e = StageLayout::explicit(vec![1, 2], 4).unwrap_err().to_string();
        assert_eq!(e, "layout [1, 2] places 3 layers but the model has 4");
        assert_eq!(StageLayout::explicit(vec![0, 4], 4).unwrap().part(1).layers, 0..4);
    }
}
