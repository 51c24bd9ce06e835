//! Comparing two checkpoints (or exports) tensor by tensor, one tensor of each in memory at a
//! time: did a reshard, an export, a resume at another layout keep every number?
//!
//! ```
//! use std::collections::BTreeMap;
//! use burn::tensor::TensorData;
//! use burn_parallel::checkpoint::diff::{diff, DiffKind};
//!
//! let a = BTreeMap::from([("w".to_string(), TensorData::new(vec![1f32, 2.0], [2]))]);
//! let b = BTreeMap::from([("w".to_string(), TensorData::new(vec![1f32, 2.5], [2]))]);
//! let d = diff(&a, &b, "").unwrap();
//! assert!(matches!(d[0].kind, DiffKind::Values { differing: 1, max_abs, .. } if max_abs == 0.5));
//! ```

use super::convert::Source;
use super::error::Result;
use super::read::Checkpoint;

/// How one tensor of two sources compares.
#[derive(Debug, Clone, PartialEq)]
pub enum DiffKind {
    /// Bitwise the same (values and dtype).
    Equal,
    /// In the first source only.
    OnlyInA,
    /// In the second source only.
    OnlyInB,
    /// Of different shapes.
    Shape { a: Vec<usize>, b: Vec<usize> },
    /// Of one shape, with values (compared in f64; dtypes may differ) not all bitwise equal.
    Values {
        /// Elements that differ: bitwise where the dtypes agree (so -0 and 0 differ), else as
        /// f64 values.
        differing: usize,
        /// Elements in all.
        numel: usize,
        /// The largest |a − b| (infinite where one side is NaN and the other is not).
        max_abs: f64,
        /// `max_abs` over the largest |a| (0 where a is all zeros).
        max_rel: f64,
        /// Whether the stored dtypes differ too.
        dtypes_differ: bool,
    },
}

/// One tensor's comparison.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorDiff {
    /// Its name (the part after the prefix).
    pub name: String,
    /// How it compares.
    pub kind: DiffKind,
}

impl TensorDiff {
    /// Whether the tensor is the same in both within `atol` (0: every value bitwise, dtypes
    /// aside).
    pub fn within(&self, atol: f64) -> bool {
        match &self.kind {
            DiffKind::Equal => true,
            DiffKind::Values { differing, max_abs, .. } => *differing == 0 || (atol > 0.0 && *max_abs <= atol),
            _ => false,
        }
    }
}

/// Every tensor of `a` and `b` whose name starts with `prefix`, compared (name order).
pub fn diff(a: &dyn Source, b: &dyn Source, prefix: &str) -> Result<Vec<TensorDiff>> {
    let (na, nb) = (a.names(), b.names());
    let mut names: Vec<&String> = na.iter().chain(&nb).filter(|n| n.starts_with(prefix)).collect();
    names.sort();
    names.dedup();
    names.into_iter().map(|n| Ok(TensorDiff { name: n[prefix.len()..].to_string(), kind: compare(a, b, n)? })).collect()
}

fn compare(a: &dyn Source, b: &dyn Source, name: &str) -> Result<DiffKind> {
    let (sa, sb) = match (a.shape(name), b.shape(name)) {
        (None, _) => return Ok(DiffKind::OnlyInB),
        (_, None) => return Ok(DiffKind::OnlyInA),
        (Some(sa), Some(sb)) => (sa, sb),
    };
    if sa != sb {
        return Ok(DiffKind::Shape { a: sa, b: sb });
    }
    let (ta, tb) = (a.read(name)?, b.read(name)?);
    let dtypes_differ = ta.dtype != tb.dtype;
    if !dtypes_differ && ta.as_bytes() == tb.as_bytes() {
        return Ok(DiffKind::Equal);
    }
    // Bitwise per element where the dtypes agree (-0 and 0 differ), else as f64 values.
    let elem = ta.dtype.size();
    let stored = (!dtypes_differ).then(|| ta.as_bytes().chunks(elem).zip(tb.as_bytes().chunks(elem)).filter(|(x, y)| x != y).count());
    let (va, vb) = (ta.convert::<f64>().to_vec::<f64>().expect("f64"), tb.convert::<f64>().to_vec::<f64>().expect("f64"));
    let (mut as_f64, mut max_abs, mut scale) = (0, 0f64, 0f64);
    for (x, y) in va.iter().zip(&vb) {
        as_f64 += usize::from(x.to_bits() != y.to_bits());
        let d = if x.is_nan() != y.is_nan() { f64::INFINITY } else { (x - y).abs() };
        max_abs = max_abs.max(d);
        scale = scale.max(x.abs());
    }
    let max_rel = if scale > 0.0 { max_abs / scale } else { 0.0 };
    let differing = stored.unwrap_or(as_f64);
    Ok(DiffKind::Values { differing, numel: va.len(), max_abs, max_rel, dtypes_differ })
}

/// A checkpoint directory, or a safetensors file (an export) whose tensors are read as a
/// checkpoint's model (`model.` + name).
pub fn open_either(path: &std::path::Path) -> Result<Checkpoint> {
    match path.is_file() {
        true => Checkpoint::open_safetensors(path, super::MODEL_PREFIX),
        false => Checkpoint::open(path),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use burn::tensor::TensorData;

    use super::*;

    #[test]
    fn every_kind_of_difference_is_named() {
        let t = |v: Vec<f32>| TensorData::new(v.clone(), [v.len()]);
        let a = BTreeMap::from([
            ("m.same".to_string(), t(vec![1.0, -2.0])),
            ("m.close".to_string(), t(vec![4.0, 2.0])),
            ("m.shape".to_string(), t(vec![1.0])),
            ("m.a".to_string(), t(vec![0.0])),
            ("other".to_string(), t(vec![9.0])),
        ]);
        let b = BTreeMap::from([
            ("m.same".to_string(), t(vec![1.0, -2.0])),
            ("m.close".to_string(), t(vec![4.0, 2.5])),
            ("m.shape".to_string(), t(vec![1.0, 2.0])),
            ("m.b".to_string(), t(vec![0.0])),
            ("m.cast".to_string(), t(vec![0.5])),
        ]);
        let mut b2 = b.clone();
        b2.insert("m.cast".into(), t(vec![0.5]).convert::<burn::tensor::bf16>());
        let mut a2 = a.clone();
        a2.insert("m.cast".into(), t(vec![0.5]));
        let d = diff(&a2, &b2, "m.").unwrap();
        let kinds: BTreeMap<&str, &DiffKind> = d.iter().map(|x| (x.name.as_str(), &x.kind)).collect();
        assert_eq!(kinds.len(), 6, "{d:?}: `other` is outside the prefix");
        assert_eq!(kinds["same"], &DiffKind::Equal);
        assert_eq!(kinds["a"], &DiffKind::OnlyInA);
        assert_eq!(kinds["b"], &DiffKind::OnlyInB);
        assert_eq!(kinds["shape"], &DiffKind::Shape { a: vec![1], b: vec![2] });
        assert_eq!(kinds["close"], &DiffKind::Values { differing: 1, numel: 2, max_abs: 0.5, max_rel: 0.125, dtypes_differ: false });
        assert_eq!(kinds["cast"], &DiffKind::Values { differing: 0, numel: 1, max_abs: 0.0, max_rel: 0.0, dtypes_differ: true });
        // NaN against a number, and -0 against 0, are not "within 0".
        let odd = |v: f32| BTreeMap::from([("x".to_string(), t(vec![1.0, v]))]);
        for (a, b) in [(f32::NAN, 1.0), (-0.0, 0.0)] {
            let d = diff(&odd(a), &odd(b), "").unwrap();
            assert!(!d[0].within(0.0), "{a} vs {b}: {d:?}");
            assert_eq!(d[0].within(1e9), a.is_nan() == b.is_nan(), "{a} vs {b}: {d:?}");
        }
        let within: Vec<bool> = d.iter().map(|x| x.within(0.5)).collect();
        assert_eq!(within, [false, false, true, true, true, false], "{d:?}: a, b, cast, close, same, shape");
    }
}
