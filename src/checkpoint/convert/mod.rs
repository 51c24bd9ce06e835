//! Conversions that stream: each output tensor is made from the mapped input files when the
//! writer reaches it and dropped once written, so a conversion holds one tensor at a time (read,
//! converted to f32, transposed or regrouped: a few times its f32 bytes), not the model.
//!
//! - [`import_hf`](super::hf::import_hf): a Llama 3.1 70B (140 GB of bf16 weights, 280 GB as
//!   our f32 export) converts in about 10 GB (its head, `[128256, 8192]`, is 4.2 GB in f32);
//!   the whole-model version held the HuggingFace tensors and our f32 copies at once (over
//!   400 GB).
//! - [`export_hf`](super::hf::export_hf) and [`export_model`](super::export_model) read a
//!   checkpoint ([`Checkpoint`] is a [`Source`]: each tensor assembled from its chunks) one
//!   tensor at a time.
//!
//! A conversion is a plan, one [`Recipe`] per output tensor ([`super::hf::import_plan`],
//! [`super::hf::export_plan`] and their Llama twins): each recipe knows its output's shape and
//! dtype from the source's metadata alone ([`Recipe::shape`], which also checks the shapes it
//! combines: a malformed file is a clear error, not a panic inside the q/k/v fusion) and makes
//! the tensor on demand ([`Recipe::build`]). [`write_plan`] streams a plan to a file;
//! [`build_all`] makes it in memory (small models, tests).

mod recipe;

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use burn::tensor::TensorData;
use safetensors::{Dtype, View};

use super::error::{CheckpointError, Result};
use super::format::to_safetensors_dtype;
use super::read::Checkpoint;

pub use recipe::Recipe;

/// Where a conversion reads its tensors.
pub trait Source {
    /// The shape of tensor `name`; `None` where there is none.
    fn shape(&self, name: &str) -> Option<Vec<usize>>;
    /// The dtype tensor `name` is stored in; `None` where there is none.
    fn dtype(&self, name: &str) -> Option<Dtype>;
    /// Tensor `name`, as stored.
    fn read(&self, name: &str) -> Result<TensorData>;
    /// Every tensor's name.
    fn names(&self) -> Vec<String>;
}

fn no_tensor(name: &str) -> CheckpointError {
    CheckpointError::Invalid(format!("no tensor {name}"))
}

impl Source for BTreeMap<String, TensorData> {
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.get(name).map(|t| t.shape.as_slice().to_vec())
    }

    fn dtype(&self, name: &str) -> Option<Dtype> {
        self.get(name).and_then(|t| to_safetensors_dtype(t.dtype))
    }

    fn read(&self, name: &str) -> Result<TensorData> {
        self.get(name).cloned().ok_or_else(|| no_tensor(name))
    }

    fn names(&self) -> Vec<String> {
        self.keys().cloned().collect()
    }
}

/// A checkpoint's tensors, each assembled from its chunks when read.
impl Source for Checkpoint {
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.metadata().tensors.get(name).map(|t| t.shape.clone())
    }

    fn dtype(&self, name: &str) -> Option<Dtype> {
        self.metadata().tensors.get(name).map(|t| t.dtype)
    }

    fn read(&self, name: &str) -> Result<TensorData> {
        self.read_full(name)
    }

    fn names(&self) -> Vec<String> {
        self.metadata().tensors.keys().cloned().collect()
    }
}

/// The tensors of `src` whose names start with `prefix`, by the rest of their names (a
/// checkpoint's model, `model.`, under our export names).
pub struct Prefixed<'a> {
    pub src: &'a dyn Source,
    pub prefix: &'a str,
}

impl Source for Prefixed<'_> {
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.src.shape(&format!("{}{name}", self.prefix))
    }

    fn dtype(&self, name: &str) -> Option<Dtype> {
        self.src.dtype(&format!("{}{name}", self.prefix))
    }

    fn read(&self, name: &str) -> Result<TensorData> {
        self.src.read(&format!("{}{name}", self.prefix))
    }

    fn names(&self) -> Vec<String> {
        self.src.names().into_iter().filter_map(|n| Some(n.strip_prefix(self.prefix)?.to_string())).collect()
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
    /// Maps `paths` (each a safetensors file); a tensor in several files is read from the last.
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        Self::open_mapped(paths, &BTreeMap::new())
    }

    /// Maps `paths`; a tensor that `weight_map` names (a sharded hub model's index: tensor →
    /// file name) is read from that file, which must hold it, any other from the last file
    /// that holds it.
    pub fn open_mapped(paths: &[PathBuf], weight_map: &BTreeMap<String, String>) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut owner = BTreeMap::new();
        for (i, path) in paths.iter().enumerate() {
            let ckpt = Checkpoint::open_safetensors(path, "")?;
            for name in ckpt.metadata().tensors.keys() {
                let indexed = weight_map.get(name);
                if indexed.is_none_or(|f| Path::new(f).file_name() == path.file_name()) {
                    owner.insert(name.clone(), i);
                }
            }
            files.push(ckpt);
        }
        let named = |f: &String| paths.iter().any(|p| p.file_name() == Path::new(f).file_name());
        if let Some((name, file)) = weight_map.iter().find(|(n, f)| !owner.contains_key(*n) && named(f)) {
            return Err(CheckpointError::Invalid(format!("the index places {name} in {file}, which does not hold it")));
        }
        Ok(Self { files, owner })
    }

    fn file(&self, name: &str) -> Option<&Checkpoint> {
        self.owner.get(name).map(|i| &self.files[*i])
    }
}

impl Source for HfFiles {
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.file(name)?.shape(name)
    }

    fn dtype(&self, name: &str) -> Option<Dtype> {
        self.file(name)?.dtype(name)
    }

    fn read(&self, name: &str) -> Result<TensorData> {
        self.file(name).ok_or_else(|| no_tensor(name))?.read_full(name)
    }

    fn names(&self) -> Vec<String> {
        self.owner.keys().cloned().collect()
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
/// failure is kept in `failed` (the view hands over no bytes from then on) and reported by
/// [`write_plan`], which then removes the partial file.
struct Lazy<'a> {
    recipe: &'a Recipe,
    shape: Vec<usize>,
    dtype: Dtype,
    src: &'a dyn Source,
    failed: &'a RefCell<Option<CheckpointError>>,
}

impl Lazy<'_> {
    /// The tensor, checked to be what was planned.
    fn make(&self) -> Result<TensorData> {
        let t = self.recipe.build(self.src)?;
        match t.shape.as_slice() == self.shape.as_slice() && to_safetensors_dtype(t.dtype) == Some(self.dtype) {
            true => Ok(t),
            false => {
                Err(CheckpointError::Invalid(format!("{:?} made a {:?} {:?} tensor, planned {:?} {:?}", self.recipe, t.dtype, t.shape, self.dtype, self.shape)))
            }
        }
    }
}

impl View for Lazy<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        // After a failure nothing more is made (the file is removed): no bytes, no work.
        if self.failed.borrow().is_some() {
            return Cow::Borrowed(&[]);
        }
        match self.make() {
            Ok(t) => Cow::Owned(t.into_bytes().try_into_vec::<u8>().unwrap_or_else(|b| b.to_vec())),
            Err(e) => {
                self.failed.borrow_mut().get_or_insert(e);
                Cow::Borrowed(&[])
            }
        }
    }

    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.bitsize() / 8
    }
}

/// Writes the tensors of `plan` to the safetensors file `out` with `metadata`, each made from
/// `src` as the writer reaches it (one tensor in memory at a time): into a sibling file first,
/// fsynced, then renamed over `out` (a failure leaves an existing `out` as it was). Returns the
/// bytes of tensor data written.
pub fn write_plan(out: &Path, plan: &[(String, Recipe)], src: &dyn Source, metadata: HashMap<String, String>) -> Result<u64> {
    let failed = RefCell::new(None);
    let views = plan
        .iter()
        .map(|(name, recipe)| Ok((name.clone(), Lazy { recipe, shape: recipe.shape(src)?, dtype: recipe.dtype(src)?, src, failed: &failed })))
        .collect::<Result<Vec<_>>>()?;
    let bytes = views.iter().map(|(_, v)| v.data_len() as u64).sum();
    let name = out.file_name().ok_or_else(|| CheckpointError::Invalid(format!("{} is not a file name", out.display())))?;
    let partial = out.with_file_name(format!(".{}.partial", name.to_string_lossy()));
    let written = super::write::serialize(&partial, views, metadata);
    // A recipe's failure first (the writer got no bytes from then on), then the writer's own.
    if let Err(e) = failed.into_inner().map_or(written, Err) {
        let _ = std::fs::remove_file(&partial);
        return Err(e);
    }
    std::fs::rename(&partial, out).map_err(|e| CheckpointError::io("rename", &partial, e))?;
    super::write::sync_dir(out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")))?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::recipe::tests::src;
    use super::*;

    #[test]
    fn a_streamed_file_holds_what_building_in_memory_gives_and_a_failure_leaves_no_file() {
        let src = src();
        let dir = std::env::temp_dir().join(format!("bp-hf-stream-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let plan = vec![
            ("a".to_string(), Recipe::Transpose("q".into())),
            ("b".to_string(), Recipe::Regroup { name: "qkv".into(), heads: 2 }),
            ("c".to_string(), Recipe::Keep("half".into())),
        ];
        let out = dir.join("ok.safetensors");
        assert_eq!(write_plan(&out, &plan, &src, HashMap::new()).unwrap(), 4 * (32 + 48) + 2 * 12, "bytes written");
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
            fn dtype(&self, name: &str) -> Option<Dtype> {
                self.0.dtype(name)
            }
            fn read(&self, name: &str) -> Result<TensorData> {
                match name {
                    "k" => Err(CheckpointError::Invalid("k: unreadable".into())),
                    _ => self.0.read(name),
                }
            }
            fn names(&self) -> Vec<String> {
                self.0.names()
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

    /// A tensor in two shards is read from the one the index names; an index naming a shard
    /// that lacks the tensor is refused.
    #[test]
    fn a_sharded_model_reads_each_tensor_from_the_shard_its_index_names() {
        let dir = std::env::temp_dir().join(format!("bp-hf-shards-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let paths = [dir.join("a.safetensors"), dir.join("b.safetensors")];
        for (i, path) in paths.iter().enumerate() {
            let x = TensorData::new(vec![i as f32; 2], [2]);
            super::super::write_safetensors(path, &[("x".into(), x.clone()), (format!("only{i}"), x)], HashMap::new()).unwrap();
        }
        let map = |file: &str| BTreeMap::from([("x".to_string(), file.to_string())]);
        let read = |files: &HfFiles| files.read("x").unwrap().to_vec::<f32>().unwrap()[0];
        assert_eq!(read(&HfFiles::open(&paths).unwrap()), 1.0, "no index: the last file");
        assert_eq!(read(&HfFiles::open_mapped(&paths, &map("a.safetensors")).unwrap()), 0.0);
        assert_eq!(HfFiles::open_mapped(&paths, &map("a.safetensors")).unwrap().shape("only1"), Some(vec![2]));
        let mut wrong = map("a.safetensors");
        wrong.insert("only1".into(), "a.safetensors".into());
        let e = HfFiles::open_mapped(&paths, &wrong).err().unwrap().to_string();
        assert!(e.contains("the index places only1 in a.safetensors, which does not hold it"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
