//! A HuggingFace import that streams: each of our tensors is made from the mapped HuggingFace
//! files when the writer reaches it and dropped once written, so [`import_hf`](super::hf::import_hf)
//! holds one tensor at a time (read, converted to f32, transposed: about 2.5 times its f32
//! bytes), not the model. A Llama 3.1 70B (140 GB of bf16 weights, 280 GB as our f32 export)
//! converts in about 10 GB (its head, `[128256, 8192]`, is 4.2 GB in f32); the whole-model
//! version held the HuggingFace tensors and our f32 copies at once (over 400 GB).
//!
//! A conversion is a plan, one [`Recipe`] per tensor of ours ([`super::hf::import_plan`],
//! [`super::hf_llama::import_plan`]): each recipe knows its output's shape from the source's
//! metadata alone ([`Recipe::shape`], which also checks the shapes it combines: a malformed
//! file is a clear error, not a panic inside the q/k/v fusion) and makes the tensor on demand
//! ([`Recipe::build`]).

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use burn::tensor::TensorData;
use safetensors::{Dtype, View};

use super::error::{CheckpointError, Result};
use super::read::Checkpoint;

/// Where a conversion reads HuggingFace's tensors.
pub trait Source {
    /// The shape of tensor `name`; `None` where there is none.
    fn shape(&self, name: &str) -> Option<Vec<usize>>;
    /// Tensor `name` as f32.
    fn read(&self, name: &str) -> Result<TensorData>;
}

impl Source for BTreeMap<String, TensorData> {
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.get(name).map(|t| t.shape.as_slice().to_vec())
    }

    fn read(&self, name: &str) -> Result<TensorData> {
        self.get(name).map(|t| t.clone().convert::<f32>()).ok_or_else(|| CheckpointError::Invalid(format!("no tensor {name}")))
    }
}

/// HuggingFace safetensors files (one, or a hub model's shards), mapped, read one tensor at a
/// time.
pub struct HfFiles {
    files: Vec<Checkpoint>,
    /// The file that holds each tensor.
    owner: BTreeMap<String, usize>,
}

impl HfFiles {
    /// Maps `paths` (each a safetensors file).
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut owner = BTreeMap::new();
        for (i, path) in paths.iter().enumerate() {
            let ckpt = Checkpoint::open_safetensors(path, "")?;
            for name in ckpt.metadata().tensors.keys() {
                owner.insert(name.clone(), i);
            }
            files.push(ckpt);
        }
        Ok(Self { files, owner })
    }
}

impl Source for HfFiles {
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        let file = &self.files[*self.owner.get(name)?];
        file.metadata().tensors.get(name).map(|t| t.shape.clone())
    }

    fn read(&self, name: &str) -> Result<TensorData> {
        let file = self.owner.get(name).ok_or_else(|| CheckpointError::Invalid(format!("no tensor {name}")))?;
        Ok(self.files[*file].read_full(name)?.convert::<f32>())
    }
}

/// How one of our tensors is made from HuggingFace's (names as the source spells them).
#[derive(Debug, Clone, PartialEq)]
pub enum Recipe {
    /// As it is (f32).
    Copy(String),
    /// A 2-d tensor transposed (`nn.Linear`'s `[out, in]` ↔ Burn's `[in, out]`).
    Transpose(String),
    /// GPT-2's fused `[.., 3h]` columns `[q k v]` regrouped per head `[q_j k_j v_j]`.
    Regroup { name: String, heads: usize },
    /// Llama's `q, k, v` projections (`[H·d, h]`, `[G·d, h]`, `[G·d, h]`) transposed and fused
    /// per key/value group into `[h, (H + 2G)·d]` ([`crate::qkv::fuse_qkv_grouped`]).
    FuseQkv { q: String, k: String, v: String, heads: usize, groups: usize },
}

fn shape_of(src: &dyn Source, name: &str) -> Result<Vec<usize>> {
    src.shape(name).ok_or_else(|| CheckpointError::Invalid(format!("no tensor {name}")))
}

fn transposed(name: &str, shape: Vec<usize>) -> Result<Vec<usize>> {
    match shape.as_slice() {
        [r, c] => Ok(vec![*c, *r]),
        _ => Err(CheckpointError::Invalid(format!("{name}: a {shape:?} tensor where a matrix belongs"))),
    }
}

impl Recipe {
    /// The output's shape, from the source's metadata (no data read); an error where the
    /// source's shapes do not fit the recipe.
    pub fn shape(&self, src: &dyn Source) -> Result<Vec<usize>> {
        match self {
            Recipe::Copy(name) => shape_of(src, name),
            Recipe::Transpose(name) => transposed(name, shape_of(src, name)?),
            Recipe::Regroup { name, heads } => {
                let shape = shape_of(src, name)?;
                let width = *shape.last().ok_or_else(|| CheckpointError::Invalid(format!("{name}: a q/k/v tensor of no dimension")))?;
                if width % 3 != 0 || (width / 3) % (*heads).max(1) != 0 {
                    return Err(CheckpointError::Invalid(format!("{name}: a q/k/v tensor of width {width} does not split into 3 x {heads} heads")));
                }
                Ok(shape)
            }
            Recipe::FuseQkv { q, k, v, heads, groups } => {
                let [qs, ks, vs] = [q, k, v].map(|n| shape_of(src, n).and_then(|s| transposed(n, s)));
                let (qs, ks, vs) = (qs?, ks?, vs?);
                let (rows, width) = (qs[0], qs[1]);
                let d = width / heads.max(&1);
                let fits = d * heads == width && *groups > 0 && heads % groups == 0 && ks == [rows, groups * d] && vs == ks;
                if !fits {
                    return Err(CheckpointError::Invalid(format!(
                        "{q}, {k}, {v}: projections of shapes {:?}, {:?}, {:?} (transposed) do not fit {heads} heads in {groups} key/value groups",
                        qs, ks, vs
                    )));
                }
                Ok(vec![rows, width + 2 * groups * d])
            }
        }
    }

    /// The tensor (f32), read from `src`.
    pub fn build(&self, src: &dyn Source) -> Result<TensorData> {
        self.shape(src)?;
        match self {
            Recipe::Copy(name) => src.read(name),
            Recipe::Transpose(name) => super::hf::transpose(&src.read(name)?),
            Recipe::Regroup { name, heads } => super::hf::regroup(&src.read(name)?, *heads, true),
            Recipe::FuseQkv { q, k, v, heads, groups } => {
                let t = |n: &str| super::hf::transpose(&src.read(n)?);
                Ok(crate::qkv::fuse_qkv_grouped(&t(q)?, &t(k)?, &t(v)?, *heads, *groups))
            }
        }
    }
}

/// The first of `names` that `src` holds, or an error saying `missing`.
pub(super) fn resolve(src: &dyn Source, names: &[String], missing: impl FnOnce() -> String) -> Result<String> {
    names.iter().find(|n| src.shape(n).is_some()).cloned().ok_or_else(|| CheckpointError::Invalid(missing()))
}

/// Every tensor of `plan` made from `src`, in memory (the whole model: for small models and
/// tests; [`write_plan`] streams).
pub fn build_all(plan: &[(String, Recipe)], src: &dyn Source) -> Result<BTreeMap<String, TensorData>> {
    plan.iter().map(|(name, r)| Ok((name.clone(), r.build(src)?))).collect()
}

/// One planned tensor as a safetensors view: made when the writer asks for its bytes. A
/// failure is kept in `failed` (the view must still hand over its length in bytes) and
/// reported by [`write_plan`], which then removes the partial file.
struct Lazy<'a> {
    recipe: &'a Recipe,
    shape: Vec<usize>,
    src: &'a dyn Source,
    failed: &'a RefCell<Option<CheckpointError>>,
}

impl View for Lazy<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        if self.failed.borrow().is_some() {
            return Cow::Owned(vec![0; self.data_len()]);
        }
        let made = self.recipe.build(self.src).and_then(|t| match t.shape.as_slice() == self.shape.as_slice() {
            true => Ok(t),
            false => Err(CheckpointError::Invalid(format!("{:?} made a {:?} tensor, planned {:?}", self.recipe, t.shape, self.shape))),
        });
        match made {
            Ok(t) => Cow::Owned(t.into_bytes().try_into_vec::<u8>().unwrap_or_else(|b| b.to_vec())),
            Err(e) => {
                self.failed.borrow_mut().get_or_insert(e);
                Cow::Owned(vec![0; self.data_len()])
            }
        }
    }

    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * 4
    }
}

/// Writes the tensors of `plan` to the safetensors file `out` with `metadata`, each made from
/// `src` as the writer reaches it (one tensor in memory at a time): into a sibling file first,
/// fsynced, then renamed over `out` (a failure leaves an existing `out` as it was).
pub fn write_plan(out: &Path, plan: &[(String, Recipe)], src: &dyn Source, metadata: HashMap<String, String>) -> Result<()> {
    let failed = RefCell::new(None);
    let views =
        plan.iter().map(|(name, recipe)| Ok((name.clone(), Lazy { recipe, shape: recipe.shape(src)?, src, failed: &failed }))).collect::<Result<Vec<_>>>()?;
    let name = out.file_name().ok_or_else(|| CheckpointError::Invalid(format!("{} is not a file name", out.display())))?;
    let partial = out.with_file_name(format!(".{}.partial", name.to_string_lossy()));
    let written = super::write::serialize(&partial, views, metadata);
    // A recipe's failure first (the writer saw only zeros), then the writer's own.
    if let Err(e) = failed.into_inner().map_or(written, Err) {
        let _ = std::fs::remove_file(&partial);
        return Err(e);
    }
    std::fs::rename(&partial, out).map_err(|e| CheckpointError::io("rename", &partial, e))?;
    super::write::sync_dir(out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src() -> BTreeMap<String, TensorData> {
        let t = |shape: Vec<usize>| TensorData::new((0..shape.iter().product::<usize>()).map(|i| i as f32).collect::<Vec<_>>(), shape);
        BTreeMap::from([
            ("q".to_string(), t(vec![8, 4])),
            ("k".to_string(), t(vec![4, 4])),
            ("v".to_string(), t(vec![4, 4])),
            ("bad_v".to_string(), t(vec![3, 4])),
            ("qkv".to_string(), t(vec![4, 12])),
            ("vec".to_string(), t(vec![5])),
        ])
    }

    #[test]
    fn every_recipe_makes_the_shape_it_plans() {
        let src = src();
        let fuse = |v: &str| Recipe::FuseQkv { q: "q".into(), k: "k".into(), v: v.into(), heads: 4, groups: 2 };
        for r in [Recipe::Copy("q".into()), Recipe::Transpose("q".into()), Recipe::Regroup { name: "qkv".into(), heads: 2 }, fuse("v")] {
            assert_eq!(r.build(&src).unwrap().shape.as_slice(), r.shape(&src).unwrap().as_slice(), "{r:?}");
        }
        assert_eq!(fuse("v").shape(&src).unwrap(), vec![4, 16]);
        // Malformed sources: clear errors naming the tensors, not panics.
        let e = fuse("bad_v").build(&src).unwrap_err().to_string();
        assert!(e.contains("q, k, bad_v") && e.contains("[4, 3]"), "{e}");
        let e = Recipe::Transpose("vec".into()).shape(&src).unwrap_err().to_string();
        assert!(e.contains("vec: a [5] tensor"), "{e}");
        let e = Recipe::Regroup { name: "qkv".into(), heads: 3 }.shape(&src).unwrap_err().to_string();
        assert!(e.contains("width 12 does not split into 3 x 3 heads"), "{e}");
        assert!(Recipe::Copy("nope".into()).shape(&src).is_err());
    }

    #[test]
    fn a_streamed_file_holds_what_building_in_memory_gives_and_a_failure_leaves_no_file() {
        let src = src();
        let dir = std::env::temp_dir().join(format!("bp-hf-stream-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let plan = vec![("a".to_string(), Recipe::Transpose("q".into())), ("b".to_string(), Recipe::Regroup { name: "qkv".into(), heads: 2 })];
        let out = dir.join("ok.safetensors");
        write_plan(&out, &plan, &src, HashMap::new()).unwrap();
        let back = HfFiles::open(std::slice::from_ref(&out)).unwrap();
        for (name, t) in build_all(&plan, &src).unwrap() {
            assert_eq!(back.read(&name).unwrap(), t, "{name}");
        }
        // A tensor whose data cannot be read once writing began: the error, and no file.
        struct Flaky(BTreeMap<String, TensorData>);
        impl Source for Flaky {
            fn shape(&self, name: &str) -> Option<Vec<usize>> {
                self.0.shape(name)
            }
            fn read(&self, name: &str) -> Result<TensorData> {
                match name {
                    "k" => Err(CheckpointError::Invalid("k: unreadable".into())),
                    _ => self.0.read(name),
                }
            }
        }
        let bad = dir.join("bad.safetensors");
        let plan = vec![("a".to_string(), Recipe::Copy("q".into())), ("b".to_string(), Recipe::Copy("k".into()))];
        let e = write_plan(&bad, &plan, &Flaky(src.clone()), HashMap::new()).unwrap_err().to_string();
        assert!(e.contains("k: unreadable") && !bad.exists(), "{e}");
        // Over an existing file: the error, and the file as it was.
        let e = write_plan(&out, &plan, &Flaky(src), HashMap::new()).unwrap_err().to_string();
        assert!(e.contains("k: unreadable") && HfFiles::open(std::slice::from_ref(&out)).unwrap().shape("a") == Some(vec![4, 8]), "{e}");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "only ok.safetensors: no partial file left");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
