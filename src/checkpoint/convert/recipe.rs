//! [`Recipe`]: how one output tensor of a conversion is made from the source's, with its shape
//! and dtype known from the source's metadata before any data is read.

use burn::tensor::TensorData;
use safetensors::Dtype;

use super::{no_tensor, Source};
use crate::checkpoint::error::{CheckpointError, Result};

/// How one output tensor is made from the source's (names as the source spells them). All but
/// [`Recipe::Keep`] make f32.
#[derive(Debug, Clone, PartialEq)]
pub enum Recipe {
    /// As it is, in f32.
    Copy(String),
    /// As it is, in the dtype it is stored in.
    Keep(String),
    /// A 2-d tensor transposed (`nn.Linear`'s `[out, in]` ↔ Burn's `[in, out]`).
    Transpose(String),
    /// GPT-2's fused `[.., 3h]` columns `[q k v]` regrouped per head `[q_j k_j v_j]` (ours).
    Regroup { name: String, heads: usize },
    /// The inverse of [`Recipe::Regroup`]: our per-head columns back to `[q k v]`.
    Ungroup { name: String, heads: usize },
    /// Llama's `q, k, v` projections (`[H·d, h]`, `[G·d, h]`, `[G·d, h]`) transposed and fused
    /// per key/value group into `[h, (H + 2G)·d]` ([`crate::qkv::fuse_qkv_grouped`]).
    FuseQkv { q: String, k: String, v: String, heads: usize, groups: usize },
    /// The inverse of [`Recipe::FuseQkv`] for one projection: part 0 (q, `[H·d, h]`), 1 (k) or
    /// 2 (v, both `[G·d, h]`) of a fused `[h, (H + 2G)·d]`.
    SplitQkv { name: String, heads: usize, groups: usize, part: usize },
    /// The first `n` rows of what `of` makes (a padded vocabulary's table cut to the tokens).
    Rows { of: Box<Recipe>, n: usize },
    /// What `of` makes, converted to the float dtype `dtype` (f32, bf16 or f16).
    Cast { of: Box<Recipe>, dtype: Dtype },
}

fn shape_of(src: &dyn Source, name: &str) -> Result<Vec<usize>> {
    src.shape(name).ok_or_else(|| no_tensor(name))
}

fn transposed(name: &str, shape: Vec<usize>) -> Result<Vec<usize>> {
    match shape.as_slice() {
        [r, c] => Ok(vec![*c, *r]),
        _ => Err(CheckpointError::Invalid(format!("{name}: a {shape:?} tensor where a matrix belongs"))),
    }
}

/// The shape of GPT-2's q/k/v tensor `name`, checked to split into 3 × `heads` heads.
fn qkv_shape(src: &dyn Source, name: &str, heads: usize) -> Result<Vec<usize>> {
    let shape = shape_of(src, name)?;
    let width = *shape.last().ok_or_else(|| CheckpointError::Invalid(format!("{name}: a q/k/v tensor of no dimension")))?;
    if heads == 0 || width % 3 != 0 || (width / 3) % heads != 0 {
        return Err(CheckpointError::Invalid(format!("{name}: a q/k/v tensor of width {width} does not split into 3 x {heads} heads")));
    }
    Ok(shape)
}

/// The head dimension of grouped q/k/v projections of `qkv_width` columns in all, or an error.
fn head_dim(what: &str, qkv_width: usize, heads: usize, groups: usize) -> Result<usize> {
    let d = qkv_width / (heads + 2 * groups).max(1);
    match heads > 0 && groups > 0 && heads.is_multiple_of(groups) && d * (heads + 2 * groups) == qkv_width {
        true => Ok(d),
        false => Err(CheckpointError::Invalid(format!("{what} do not fit {heads} heads in {groups} key/value groups"))),
    }
}

impl Recipe {
    /// The output's shape, from the source's metadata (no data read); an error where the
    /// source's shapes do not fit the recipe.
    pub fn shape(&self, src: &dyn Source) -> Result<Vec<usize>> {
        match self {
            Recipe::Copy(name) | Recipe::Keep(name) => shape_of(src, name),
            Recipe::Transpose(name) => transposed(name, shape_of(src, name)?),
            Recipe::Regroup { name, heads } | Recipe::Ungroup { name, heads } => qkv_shape(src, name, *heads),
            Recipe::FuseQkv { q, k, v, heads, groups } => {
                let [qs, ks, vs] = [q, k, v].map(|n| shape_of(src, n).and_then(|s| transposed(n, s)));
                let (qs, ks, vs) = (qs?, ks?, vs?);
                let (rows, width) = (qs[0], qs[1] + ks[1] + vs[1]);
                let what = format!("{q}, {k}, {v}: projections of shapes {qs:?}, {ks:?}, {vs:?} (transposed)");
                let d = head_dim(&what, width, *heads, *groups)?;
                match qs[1] == heads * d && ks == [rows, groups * d] && vs == ks {
                    true => Ok(vec![rows, width]),
                    false => Err(CheckpointError::Invalid(format!("{what} do not fit {heads} heads in {groups} key/value groups"))),
                }
            }
            Recipe::SplitQkv { name, heads, groups, part } => {
                let [rows, width] = transposed(name, shape_of(src, name)?)?[..] else { unreachable!("a matrix") };
                let d = head_dim(&format!("{name}: a fused q/k/v of width {rows}"), rows, *heads, *groups)?;
                match part {
                    0 => Ok(vec![heads * d, width]),
                    1 | 2 => Ok(vec![groups * d, width]),
                    _ => Err(CheckpointError::Invalid(format!("{name}: q/k/v part {part} of 3"))),
                }
            }
            Recipe::Rows { of, n } => {
                let mut shape = of.shape(src)?;
                match shape.first_mut() {
                    Some(r) if *r >= *n => *r = *n,
                    _ => return Err(CheckpointError::Invalid(format!("{of:?}: a vocabulary of {n} tokens in a table of shape {shape:?}"))),
                }
                Ok(shape)
            }
            Recipe::Cast { of, dtype } => match burn_float(*dtype) {
                Some(_) => of.shape(src),
                None => Err(CheckpointError::Invalid(format!("{of:?}: a cast to {dtype:?}, not a float type of f32, bf16 or f16"))),
            },
        }
    }

    /// The output's dtype (f32 but for [`Recipe::Keep`], which keeps the source's).
    pub fn dtype(&self, src: &dyn Source) -> Result<Dtype> {
        match self {
            Recipe::Keep(name) => src.dtype(name).ok_or_else(|| no_tensor(name)),
            Recipe::Rows { of, .. } => of.dtype(src),
            Recipe::Cast { dtype, .. } => Ok(*dtype),
            _ => Ok(Dtype::F32),
        }
    }

    /// The tensor, read from `src` (its shape checked first).
    pub fn build(&self, src: &dyn Source) -> Result<TensorData> {
        self.shape(src)?;
        let f32 = |n: &str| Ok::<_, CheckpointError>(src.read(n)?.convert::<f32>());
        let t = |n: &str| transpose(&f32(n)?);
        match self {
            Recipe::Copy(name) => f32(name),
            Recipe::Keep(name) => src.read(name),
            Recipe::Transpose(name) => t(name),
            Recipe::Regroup { name, heads } => regroup(&f32(name)?, *heads, true),
            Recipe::Ungroup { name, heads } => regroup(&f32(name)?, *heads, false),
            Recipe::FuseQkv { q, k, v, heads, groups } => Ok(crate::qkv::fuse_qkv_grouped(&t(q)?, &t(k)?, &t(v)?, *heads, *groups)),
            Recipe::SplitQkv { name, heads, groups, part } => {
                let parts = crate::qkv::split_qkv_grouped(&f32(name)?, *heads, *groups);
                transpose(&parts[*part])
            }
            Recipe::Rows { of, n } => Ok(rows(of.build(src)?, *n)),
            Recipe::Cast { of, dtype } => Ok(of.build(src)?.convert_dtype(burn_float(*dtype).expect("checked by shape"))),
        }
    }
}

/// Burn's float dtype of a safetensors dtype (`None` where it is no float type we write).
fn burn_float(d: Dtype) -> Option<burn::tensor::DType> {
    use burn::tensor::DType;
    match d {
        Dtype::F32 => Some(DType::F32),
        Dtype::BF16 => Some(DType::BF16),
        Dtype::F16 => Some(DType::F16),
        _ => None,
    }
}

/// The last dimension of a `[rows, 3h]` (or `[3h]`) q/k/v tensor between HuggingFace's `[q k v]`
/// and ours, grouped per head `[q_j k_j v_j]` (`to_ours`), or back ([`crate::qkv`]); its width
/// checked by [`qkv_shape`] first.
fn regroup(t: &TensorData, heads: usize, to_ours: bool) -> Result<TensorData> {
    let width = *t.shape.last().expect("checked by qkv_shape");
    Ok(match to_ours {
        true => {
            let [q, k, v]: [TensorData; 3] = crate::qkv::split_last(t, &[width / 3; 3]).try_into().expect("three parts");
            crate::qkv::fuse_qkv_grouped(&q, &k, &v, heads, heads)
        }
        false => crate::qkv::concat_last(&crate::qkv::split_qkv_grouped(t, heads, heads)),
    })
}

/// A 2-d f32 tensor transposed.
fn transpose(t: &TensorData) -> Result<TensorData> {
    let [r, c] = t.shape.as_slice() else { return Err(CheckpointError::Invalid(format!("transpose of a {:?} tensor", t.shape))) };
    let v = t.as_slice::<f32>().map_err(|e| CheckpointError::Invalid(format!("{e:?}")))?;
    Ok(TensorData::new((0..r * c).map(|i| v[(i % r) * c + i / r]).collect::<Vec<f32>>(), [*c, *r]))
}

/// The first `n` rows of a tensor of any dtype (`n` at most its rows, checked by the shape).
fn rows(t: TensorData, n: usize) -> TensorData {
    let mut shape = t.shape.as_slice().to_vec();
    let row_bytes = t.as_bytes().len() / shape.first().copied().unwrap_or(1).max(1);
    shape[0] = n;
    let dtype = t.dtype;
    let mut bytes = t.into_bytes().try_into_vec::<u8>().unwrap_or_else(|b| b.to_vec());
    bytes.truncate(n * row_bytes);
    TensorData::from_bytes_vec(bytes, shape, dtype)
}

#[cfg(test)]
pub(super) mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// Small tensors for the recipes (f32 but for `half`, bf16).
    pub(in crate::checkpoint::convert) fn src() -> BTreeMap<String, TensorData> {
        let t = |shape: Vec<usize>| TensorData::new((0..shape.iter().product::<usize>()).map(|i| i as f32).collect::<Vec<_>>(), shape);
        BTreeMap::from([
            ("q".to_string(), t(vec![8, 4])),
            ("k".to_string(), t(vec![4, 4])),
            ("v".to_string(), t(vec![4, 4])),
            ("bad_v".to_string(), t(vec![3, 4])),
            ("qkv".to_string(), t(vec![4, 12])),
            ("vec".to_string(), t(vec![5])),
            ("half".to_string(), t(vec![6, 2]).convert::<burn::tensor::bf16>()),
        ])
    }

    fn fuse(v: &str) -> Recipe {
        Recipe::FuseQkv { q: "q".into(), k: "k".into(), v: v.into(), heads: 4, groups: 2 }
    }

    #[test]
    fn every_recipe_makes_the_shape_and_dtype_it_plans() {
        let src = src();
        let split = |part| Recipe::SplitQkv { name: "qkv".into(), heads: 2, groups: 1, part };
        let recipes = [
            Recipe::Copy("q".into()),
            Recipe::Keep("half".into()),
            Recipe::Copy("half".into()),
            Recipe::Transpose("q".into()),
            Recipe::Regroup { name: "qkv".into(), heads: 2 },
            Recipe::Ungroup { name: "qkv".into(), heads: 2 },
            fuse("v"),
            split(0),
            split(2),
            Recipe::Rows { of: Box::new(Recipe::Keep("half".into())), n: 4 },
            Recipe::Rows { of: Box::new(Recipe::Transpose("q".into())), n: 3 },
            Recipe::Cast { of: Box::new(Recipe::Transpose("q".into())), dtype: Dtype::BF16 },
            Recipe::Cast { of: Box::new(Recipe::Keep("half".into())), dtype: Dtype::F16 },
        ];
        for r in recipes {
            let t = r.build(&src).unwrap();
            assert_eq!(t.shape.as_slice(), r.shape(&src).unwrap().as_slice(), "{r:?}");
            assert_eq!(crate::checkpoint::format::to_safetensors_dtype(t.dtype), Some(r.dtype(&src).unwrap()), "{r:?}");
        }
        assert_eq!(fuse("v").shape(&src).unwrap(), vec![4, 16]);
        assert_eq!(split(0).shape(&src).unwrap(), vec![6, 4]);
        assert_eq!(Recipe::Keep("half".into()).dtype(&src).unwrap(), Dtype::BF16);
    }

    #[test]
    fn malformed_sources_are_clear_errors() {
        let src = src();
        let e = fuse("bad_v").build(&src).unwrap_err().to_string();
        assert!(e.contains("q, k, bad_v") && e.contains("[4, 3]"), "{e}");
        let e = Recipe::Transpose("vec".into()).shape(&src).unwrap_err().to_string();
        assert!(e.contains("vec: a [5] tensor"), "{e}");
        for heads in [0, 3] {
            let e = Recipe::Regroup { name: "qkv".into(), heads }.shape(&src).unwrap_err().to_string();
            assert!(e.contains(&format!("width 12 does not split into 3 x {heads} heads")), "{e}");
        }
        assert!(Recipe::SplitQkv { name: "qkv".into(), heads: 0, groups: 2, part: 0 }.shape(&src).is_err());
        let e = Recipe::Regroup { name: "qkv".into(), heads: 3 }.shape(&src).unwrap_err().to_string();
        assert!(e.contains("width 12 does not split into 3 x 3 heads"), "{e}");
        let e = Recipe::SplitQkv { name: "qkv".into(), heads: 3, groups: 2, part: 0 }.shape(&src).unwrap_err().to_string();
        assert!(e.contains("qkv: a fused q/k/v of width 12 do not fit 3 heads in 2 key/value groups"), "{e}");
        let e = Recipe::Rows { of: Box::new(Recipe::Copy("q".into())), n: 9 }.shape(&src).unwrap_err().to_string();
        assert!(e.contains("a vocabulary of 9 tokens in a table of shape [8, 4]"), "{e}");
        assert!(Recipe::Copy("nope".into()).shape(&src).is_err() && Recipe::Keep("nope".into()).dtype(&src).is_err());
        let e = Recipe::Cast { of: Box::new(Recipe::Copy("q".into())), dtype: Dtype::I32 }.shape(&src).unwrap_err().to_string();
        assert!(e.contains("a cast to I32, not a float type"), "{e}");
    }

    /// Each export recipe undoes its import twin; rows keep the first rows, bytes as they are.
    #[test]
    fn export_recipes_invert_import_recipes() {
        let mut src = src();
        let regrouped = Recipe::Regroup { name: "qkv".into(), heads: 2 }.build(&src).unwrap();
        // h = 4, d = 2: ours is [q0 k0 v0 q1 k1 v1] of theirs [q0 q1 k0 k1 v0 v1].
        assert_eq!(regrouped.to_vec::<f32>().unwrap()[..12], [0., 1., 4., 5., 8., 9., 2., 3., 6., 7., 10., 11.]);
        src.insert("ours".into(), regrouped);
        assert_eq!(Recipe::Ungroup { name: "ours".into(), heads: 2 }.build(&src).unwrap(), src["qkv"]);
        src.insert("fused".into(), fuse("v").build(&src).unwrap());
        for (part, name) in ["q", "k", "v"].iter().enumerate() {
            let back = Recipe::SplitQkv { name: "fused".into(), heads: 4, groups: 2, part }.build(&src).unwrap();
            assert_eq!(back, src[*name], "{name}");
        }
        let m = TensorData::new((0..6).map(|x| x as f32).collect::<Vec<_>>(), [2, 3]);
        assert_eq!(transpose(&m).unwrap().to_vec::<f32>().unwrap(), [0., 3., 1., 4., 2., 5.]);
        let cut = Recipe::Rows { of: Box::new(Recipe::Keep("half".into())), n: 4 }.build(&src).unwrap();
        assert_eq!(cut.as_bytes(), &src["half"].as_bytes()[..4 * 2 * 2]);
    }
}
