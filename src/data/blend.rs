//! Blended datasets (Megatron's `--data-path W1 P1 W2 P2 ...`): each global sample comes from
//! one of several datasets, in proportion to their weights.
//!
//! Sample `i` is assigned to a dataset by the golden-ratio sequence `u_i = frac(i · φ⁻¹)`
//! (64-bit fixed point: `i · 0x9E3779B97F4A7C15 mod 2⁶⁴`) against the weights' cumulative
//! sums: a dataset of weight `w` takes the samples whose `u_i` fall in its interval of length
//! `w`. The sequence is equidistributed with low discrepancy, so a run of `n` consecutive
//! samples (a step's global batch, wherever it starts) holds within 2 of `w · n` from each
//! dataset for `n` up to 1000 (the tests check windows of 64 and 1000); the error grows like
//! `log n` (about 3 at 4096, 4 at 100 000). The assignment depends on `i` alone: random access, no table, the same at any data-parallel degree and on resume from a
//! checkpoint's sample counter. (Megatron's `BlendedDataset` builds the assignment greedily and
//! stores it as an index table.)

/// Why a blend cannot be made.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BlendError {
    /// No dataset.
    #[error("a blend of no datasets")]
    Empty,
    /// A weight that is not a positive finite number.
    #[error("dataset {index}: weight {weight} (weights are positive numbers)")]
    Weight {
        /// The dataset's position.
        index: usize,
        /// Its weight.
        weight: f64,
    },
    /// A spec that does not parse.
    #[error("{spec:?}: {why} (a blend is WEIGHT:PATH,WEIGHT:PATH,..., e.g. 0.7:web,0.3:books)")]
    Spec {
        /// The spec.
        spec: String,
        /// What is wrong.
        why: String,
    },
}

/// Which dataset each global sample comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blend {
    /// The cumulative weights' upper ends in units of 2⁻⁶⁴ (the last one 2⁶⁴: every sample
    /// falls below it).
    ends: Vec<u128>,
}

/// `2⁶⁴ / φ`, odd: the golden-ratio sequence's step in 64-bit fixed point.
const STEP: u64 = 0x9E37_79B9_7F4A_7C15;

impl Blend {
    /// A blend of datasets with `weights` (normalised; any positive finite numbers).
    pub fn new(weights: &[f64]) -> Result<Self, BlendError> {
        if weights.is_empty() {
            return Err(BlendError::Empty);
        }
        if let Some((index, &weight)) = weights.iter().enumerate().find(|(_, w)| !(w.is_finite() && **w > 0.0)) {
            return Err(BlendError::Weight { index, weight });
        }
        let total: f64 = weights.iter().sum();
        let mut acc = 0.0;
        let mut ends: Vec<u128> = weights
            .iter()
            .map(|w| {
                acc += w / total;
                (acc * (1u128 << 64) as f64) as u128
            })
            .collect();
        *ends.last_mut().expect("not empty") = 1u128 << 64;
        Ok(Self { ends })
    }

    /// The number of datasets.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// Whether there is no dataset (never: [`Blend::new`] refuses that).
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The dataset of global sample `index`.
    pub fn source(&self, index: u64) -> usize {
        let u = index.wrapping_mul(STEP) as u128;
        self.ends.iter().position(|&end| u < end).expect("the last end is 2^64")
    }

    /// Parses `WEIGHT:PATH,WEIGHT:PATH,...` (a path holds no comma; spaces around a weight or
    /// path are dropped); a spec with no `:`, or an existing path, is one path of weight 1.
    /// Every weight is checked ([`Blend::new`]).
    pub fn parse_spec(spec: &str) -> Result<Vec<(f64, String)>, BlendError> {
        let bad = |why: String| BlendError::Spec { spec: spec.to_string(), why };
        if !spec.contains(':') || std::path::Path::new(spec).exists() {
            return match spec.trim().is_empty() {
                true => Err(bad("no path".into())),
                false => Ok(vec![(1.0, spec.to_string())]),
            };
        }
        let parts = spec
            .split(',')
            .map(|part| {
                let (w, path) = part.split_once(':').ok_or_else(|| bad(format!("{part:?} has no WEIGHT:")))?;
                let weight = w.trim().parse::<f64>().map_err(|_| bad(format!("{w:?} is not a weight")))?;
                match path.trim().is_empty() {
                    true => Err(bad(format!("{part:?} names no path"))),
                    false => Ok((weight, path.trim().to_string())),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        Blend::new(&parts.iter().map(|(w, _)| *w).collect::<Vec<_>>())?;
        Ok(parts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every window of `n` consecutive samples (stepping by 97 through the first 100 000) holds
    /// within 2 of `w · n` from each dataset.
    #[test]
    fn every_window_of_samples_holds_each_dataset_by_its_weight() {
        for weights in [vec![0.2, 0.3, 0.5], vec![7.0, 3.0], vec![0.01, 0.99], vec![1.0; 3], vec![1.0]] {
            let blend = Blend::new(&weights).unwrap();
            let total: f64 = weights.iter().sum();
            let seq: Vec<usize> = (0..100_000u64).map(|i| blend.source(i)).collect();
            for n in [64, 1000] {
                for start in (0..seq.len() - n).step_by(97) {
                    for (d, w) in weights.iter().enumerate() {
                        let count = seq[start..start + n].iter().filter(|&&s| s == d).count() as f64;
                        assert!((count - w / total * n as f64).abs() <= 2.0, "{weights:?}: {count} of {n} from {d} at {start}");
                    }
                }
            }
        }
        // Far out too (a long run's counter).
        let blend = Blend::new(&[0.25, 0.75]).unwrap();
        let far = (1u64 << 40..(1u64 << 40) + 4000).filter(|&i| blend.source(i) == 0).count();
        assert!((far as i64 - 1000).abs() <= 2, "{far}");
    }

    #[test]
    fn bad_weights_and_specs_are_clear_errors() {
        assert_eq!(Blend::new(&[]), Err(BlendError::Empty));
        assert!(Blend::new(&[1.0, 0.0]).unwrap_err().to_string().contains("dataset 1: weight 0"));
        assert!(Blend::new(&[f64::NAN]).unwrap_err().to_string().contains("dataset 0: weight NaN"));
        assert_eq!(Blend::parse_spec("0.7:web,0.3:a/books").unwrap(), [(0.7, "web".to_string()), (0.3, "a/books".to_string())]);
        assert_eq!(Blend::parse_spec("shards/one").unwrap(), [(1.0, "shards/one".to_string())]);
        assert!(Blend::parse_spec("0.7:web,books").unwrap_err().to_string().contains("\"books\" has no WEIGHT:"));
        assert!(Blend::parse_spec("x:web").unwrap_err().to_string().contains("\"x\" is not a weight"));
        assert!(Blend::parse_spec("1:").unwrap_err().to_string().contains("names no path"));
        assert_eq!(Blend::parse_spec(" 2 : web ").unwrap(), [(2.0, "web".to_string())]);
        assert!(Blend::parse_spec("0:web").unwrap_err().to_string().contains("dataset 0: weight 0"));
        let odd = std::env::temp_dir().join(format!("bp-blend:{}", std::process::id()));
        std::fs::create_dir_all(&odd).unwrap();
        let name = odd.display().to_string();
        assert_eq!(Blend::parse_spec(&name).unwrap(), [(1.0, name.clone())], "an existing path with a colon");
        std::fs::remove_dir(odd).unwrap();
    }
}
