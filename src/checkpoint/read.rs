//! Opening and reading checkpoints: any box of any tensor, assembled from the chunks that
//! intersect it (this is what resharding is: each rank of the new layout reads its own box).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use burn::tensor::{DType, TensorData};
use memmap2::Mmap;
use safetensors::tensor::Metadata as FileHeader;
use safetensors::SafeTensors;

use super::error::{CheckpointError, Result};
use super::format::*;
use crate::topology::ParallelConfig;

/// A mapped data file and its parsed safetensors header.
struct MappedFile {
    map: Mmap,
    header_len: usize,
    header: FileHeader,
}

/// An open checkpoint (validated metadata; data files mapped on first use).
pub struct Checkpoint {
    dir: PathBuf,
    meta: Metadata,
    files: Mutex<HashMap<String, Arc<MappedFile>>>,
    verified: Mutex<HashSet<(String, usize)>>,
    /// Chunks carry checksums (false for an imported `model.safetensors`).
    checksums: bool,
    /// Which dimension of a tensor may differ in size from the model's ([`Checkpoint::with_resizable`]).
    resizable: Option<Resizable>,
}

/// A tensor name's resizable dimension, if it has one.
type Resizable = Arc<dyn Fn(&str) -> Option<usize> + Send + Sync>;

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint").field("dir", &self.dir).field("step", &self.meta.step).field("tensors", &self.meta.tensors.len()).finish()
    }
}

/// The newest committed checkpoint of a save directory (`None` if it has none). A directory is
/// a checkpoint iff it is named `step-N` and holds `metadata.json`; the `latest` pointer is
/// not trusted over that (a kill between the rename and the pointer update leaves it one behind).
pub fn latest_checkpoint(save_dir: &Path) -> Result<Option<(u64, PathBuf)>> {
    Ok(committed_checkpoints(save_dir)?.pop())
}

/// Every committed checkpoint of a save directory, oldest first.
pub fn committed_checkpoints(save_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    if save_dir.exists() && !save_dir.is_dir() {
        return Err(CheckpointError::Invalid(format!("{} is not a directory", save_dir.display())));
    }
    let entries = match std::fs::read_dir(save_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(CheckpointError::io("list", save_dir, e)),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| CheckpointError::io("list", save_dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(step) = parse_step_dir(&name) {
            if entry.path().join(METADATA_FILE).is_file() {
                found.push((step, entry.path()));
            }
        }
    }
    found.sort();
    Ok(found)
}

/// The checkpoint `path` names: a checkpoint directory itself, or a save directory (its newest
/// committed checkpoint).
pub fn resolve(path: &Path) -> Result<PathBuf> {
    if path.join(METADATA_FILE).is_file() {
        return Ok(path.to_path_buf());
    }
    if !path.is_dir() {
        return Err(CheckpointError::NotFound { dir: path.to_path_buf(), why: "the directory does not exist".into() });
    }
    match latest_checkpoint(path)? {
        Some((_, dir)) => Ok(dir),
        None => Err(CheckpointError::NotFound {
            dir: path.to_path_buf(),
            why: "it holds no committed checkpoint (no step-N directory with a metadata.json; an interrupted save leaves none)".into(),
        }),
    }
}

impl Checkpoint {
    /// Opens the checkpoint at `path` (see [`resolve`]) and validates its metadata: format,
    /// version, and that every tensor's chunks cover it exactly once.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let dir = resolve(path.as_ref())?;
        let file = dir.join(METADATA_FILE);
        let text = std::fs::read_to_string(&file).map_err(|e| CheckpointError::io("read", &file, e))?;
        let meta = parse_metadata(&file, &text)?;
        for (name, t) in &meta.tensors {
            check_coverage(name, t)?;
            if t.chunks.iter().any(|c| !meta.files.contains_key(&c.file)) {
                return Err(CheckpointError::Format { path: file.clone(), msg: format!("tensor {name} names a data file missing from \"files\"") });
            }
        }
        Ok(Self { dir, meta, files: Mutex::default(), verified: Mutex::default(), checksums: true, resizable: None })
    }

    /// Opens a single safetensors file of whole tensors (e.g. an exported `model.safetensors`)
    /// as a checkpoint whose tensor `n` is called `prefix + n` (no checksums, step 0; our
    /// export's model config, `__metadata__.burn_parallel_model`, as the section `model`).
    pub fn open_safetensors(path: impl AsRef<Path>, prefix: &str) -> Result<Self> {
        let path = path.as_ref();
        let (dir, name) = (path.parent().unwrap_or(Path::new(".")).to_path_buf(), path.file_name().map(|n| n.to_string_lossy().into_owned()));
        let name = name.ok_or_else(|| CheckpointError::Invalid(format!("{} is not a file name", path.display())))?;
        let mapped = map_file(path)?;
        let mut tensors = BTreeMap::new();
        for (t, info) in mapped.header.tensors() {
            let chunk = ChunkMeta { file: name.clone(), offset: vec![0; info.shape.len()], shape: info.shape.clone(), crc32: 0, key: Some(t.clone()) };
            tensors.insert(format!("{prefix}{t}"), TensorMeta { dtype: info.dtype, shape: info.shape.clone(), chunks: vec![chunk] });
        }
        let size = mapped.map.len() as u64;
        // Our export's model config (`__metadata__.burn_parallel_model`), as a checkpoint's.
        let model = mapped.header.metadata().as_ref().and_then(|m| m.get("burn_parallel_model")).and_then(|j| serde_json::from_str(j).ok());
        let sections = model.map(|m| BTreeMap::from([("model".to_string(), m)])).unwrap_or_default();
        let meta = Metadata {
            format: FORMAT_NAME.into(),
            version: FORMAT_VERSION,
            step: 0,
            layout: ParallelConfig::new(),
            train: TrainState::default(),
            counters: BTreeMap::new(),
            sections,
            files: BTreeMap::from([(name.clone(), size)]),
            tensors,
        };
        let files = Mutex::new(HashMap::from([(name, Arc::new(mapped))]));
        Ok(Self { dir, meta, files, verified: Mutex::default(), checksums: false, resizable: None })
    }

    /// The checkpoint directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The metadata.
    pub fn metadata(&self) -> &Metadata {
        &self.meta
    }

    /// The metadata of tensor `name`.
    pub fn tensor(&self, name: &str) -> Result<&TensorMeta> {
        self.meta.tensors.get(name).ok_or_else(|| CheckpointError::MissingTensor {
            dir: self.dir.clone(),
            name: name.into(),
            available: self.meta.tensors.len(),
        })
    }

    /// The same checkpoint, where tensor `name`'s dimension `dim(name)` may differ in size from
    /// the model's (a vocabulary padded for another TP size: Megatron's
    /// make-vocab-size-divisible-by): a read takes the part both have and leaves the rest of the
    /// model's box zero. Every other dimension, and every other tensor, must match as before.
    pub fn with_resizable(mut self, dim: impl Fn(&str) -> Option<usize> + Send + Sync + 'static) -> Self {
        self.resizable = Some(Arc::new(dim));
        self
    }

    /// Whether the saved `saved` and the model's `model` shapes of `name` agree, but for its
    /// resizable dimension.
    fn shapes_agree(&self, name: &str, saved: &[usize], model: &[usize]) -> bool {
        let free = self.resizable.as_ref().and_then(|f| f(name));
        saved.len() == model.len() && saved.iter().zip(model).enumerate().all(|(d, (a, b))| a == b || free == Some(d))
    }

    /// Reads the box `offset`/`shape` of tensor `name`, which must have the global shape
    /// `global_shape` (but for a [resizable](Self::with_resizable) dimension) and the dtype
    /// `dtype` (errors name both sides otherwise). Each chunk read is checked against its
    /// checksum once.
    pub fn read(&self, name: &str, dtype: DType, global_shape: &[usize], offset: &[usize], shape: &[usize]) -> Result<TensorData> {
        let t = self.tensor(name)?;
        if !self.shapes_agree(name, &t.shape, global_shape) {
            return Err(CheckpointError::ShapeMismatch { name: name.into(), checkpoint: t.shape.clone(), model: global_shape.to_vec() });
        }
        let want = to_safetensors_dtype(dtype).ok_or_else(|| CheckpointError::Invalid(format!("tensor {name}: dtype {dtype:?} cannot be checkpointed")))?;
        if t.dtype != want {
            return Err(CheckpointError::DtypeMismatch { name: name.into(), checkpoint: t.dtype, model: want });
        }
        if offset.len() != shape.len() || shape.len() != global_shape.len() || (0..shape.len()).any(|d| offset[d] + shape[d] > global_shape[d]) {
            return Err(CheckpointError::Invalid(format!("tensor {name}: box at {offset:?} of shape {shape:?} lies outside its shape {global_shape:?}")));
        }
        let elem = t.dtype.bitsize() / 8;
        let mut out = vec![0u8; volume(shape) * elem];
        for (i, c) in t.chunks.iter().enumerate() {
            let Some((ro, rs)) = intersect((&c.offset, &c.shape), (offset, shape)) else { continue };
            let file = self.chunk_file(name, i)?;
            let bytes = chunk_bytes(&file, c.key(name), &self.dir.join(&c.file))?;
            copy_region(bytes, (&c.offset, &c.shape), &mut out, (offset, shape), (&ro, &rs), elem);
        }
        Ok(TensorData::from_bytes_vec(out, shape.to_vec(), to_burn_dtype(t.dtype).expect("checked above")))
    }

    /// The whole tensor `name`, as saved.
    pub fn read_full(&self, name: &str) -> Result<TensorData> {
        let t = self.tensor(name)?;
        let dtype = to_burn_dtype(t.dtype).ok_or_else(|| CheckpointError::Invalid(format!("tensor {name}: dtype {:?} has no Burn tensor type", t.dtype)))?;
        self.read(name, dtype, &t.shape.clone(), &vec![0; t.shape.len()], &t.shape.clone())
    }

    /// Checks every data file's size and every chunk's checksum.
    pub fn verify(&self) -> Result<()> {
        for (name, t) in &self.meta.tensors {
            for i in 0..t.chunks.len() {
                self.chunk_file(name, i)?;
            }
        }
        Ok(())
    }

    /// The mapped file of chunk `i` of `name`, its dtype, shape and checksum checked (once).
    fn chunk_file(&self, name: &str, i: usize) -> Result<Arc<MappedFile>> {
        let c = &self.meta.tensors[name].chunks[i];
        let path = self.dir.join(&c.file);
        let file = {
            let mut files = self.files.lock().unwrap();
            match files.get(&c.file) {
                Some(f) => f.clone(),
                None => {
                    let expected = self.meta.files[&c.file];
                    let len = std::fs::metadata(&path).map_err(|e| CheckpointError::io("open", &path, e))?.len();
                    if len != expected {
                        let msg = format!("the file is {len} bytes but the metadata says {expected} (truncated or replaced)");
                        return Err(CheckpointError::Corrupt { file: path, tensor: "*".into(), msg });
                    }
                    let f = Arc::new(map_file(&path)?);
                    files.insert(c.file.clone(), f.clone());
                    f
                }
            }
        };
        if self.verified.lock().unwrap().contains(&(name.to_string(), i)) {
            return Ok(file);
        }
        let key = c.key(name);
        let info = file.header.info(key).ok_or_else(|| CheckpointError::Corrupt { file: path.clone(), tensor: key.into(), msg: "not in this file".into() })?;
        let t = &self.meta.tensors[name];
        if info.shape != c.shape || info.dtype != t.dtype {
            let msg = format!("the file holds {:?} {:?} but the metadata says {:?} {:?}", info.dtype, info.shape, t.dtype, c.shape);
            return Err(CheckpointError::Corrupt { file: path, tensor: name.into(), msg });
        }
        if self.checksums {
            let crc = crc32fast::hash(chunk_bytes(&file, key, &path)?);
            if crc != c.crc32 {
                let msg = format!("checksum {crc:#010x} but the metadata says {:#010x} (corrupted)", c.crc32);
                return Err(CheckpointError::Corrupt { file: path, tensor: name.into(), msg });
            }
        }
        self.verified.lock().unwrap().insert((name.to_string(), i));
        Ok(file)
    }
}

fn map_file(path: &Path) -> Result<MappedFile> {
    let f = File::open(path).map_err(|e| CheckpointError::io("open", path, e))?;
    // SAFETY: the file is only read; checkpoint files are never modified after their commit
    // (a replaced checkpoint is renamed away first, and mapped pages of an unlinked file stay valid).
    let map = unsafe { Mmap::map(&f) }.map_err(|e| CheckpointError::io("map", path, e))?;
    let (header_len, header) = SafeTensors::read_metadata(&map).map_err(|e| CheckpointError::Corrupt {
        file: path.into(),
        tensor: "*".into(),
        msg: format!("not a valid safetensors file: {e}"),
    })?;
    Ok(MappedFile { map, header_len, header })
}

fn chunk_bytes<'a>(file: &'a MappedFile, name: &str, path: &Path) -> Result<&'a [u8]> {
    let info = file.header.info(name).ok_or_else(|| CheckpointError::Corrupt { file: path.into(), tensor: name.into(), msg: "not in this file".into() })?;
    let start = 8 + file.header_len;
    Ok(&file.map[start + info.data_offsets.0..start + info.data_offsets.1])
}

fn parse_metadata(path: &Path, text: &str) -> Result<Metadata> {
    let bad = |msg: String| CheckpointError::Format { path: path.to_path_buf(), msg };
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| bad(format!("not JSON ({e}); the file is damaged")))?;
    let format = value.get("format").and_then(|v| v.as_str()).unwrap_or("");
    if format != FORMAT_NAME {
        return Err(bad(format!("format is {format:?}, not {FORMAT_NAME:?}: not a burn-parallel checkpoint")));
    }
    match value.get("version").and_then(|v| v.as_u64()) {
        Some(v) if v == FORMAT_VERSION as u64 => {}
        Some(v) => return Err(bad(format!("format version {v} is not supported by this build (it reads version {FORMAT_VERSION})"))),
        None => return Err(bad("no format version".into())),
    }
    serde_json::from_value(value).map_err(|e| bad(format!("invalid metadata: {e}")))
}

/// Checks that the chunks of `t` lie inside it, do not overlap, and cover it exactly.
pub(crate) fn check_coverage(name: &str, t: &TensorMeta) -> Result<()> {
    let err = |msg: String| CheckpointError::Coverage { name: name.into(), msg };
    if t.chunks.is_empty() {
        return Err(err(format!("no chunks for shape {:?}", t.shape)));
    }
    let mut covered = 0usize;
    for (i, c) in t.chunks.iter().enumerate() {
        if c.offset.len() != t.shape.len() || c.shape.len() != t.shape.len() || (0..t.shape.len()).any(|d| c.offset[d] + c.shape[d] > t.shape[d]) {
            return Err(err(format!("chunk at {:?} of shape {:?} lies outside the tensor's shape {:?}", c.offset, c.shape, t.shape)));
        }
        for o in &t.chunks[..i] {
            if let Some((ro, rs)) = intersect((&c.offset, &c.shape), (&o.offset, &o.shape)) {
                return Err(err(format!("chunks at {:?} and {:?} overlap in the box at {ro:?} of shape {rs:?}", o.offset, c.offset)));
            }
        }
        covered += volume(&c.shape);
    }
    if covered != volume(&t.shape) {
        return Err(err(format!("chunks cover {covered} of its {} elements (shape {:?}): a part was never saved", volume(&t.shape), t.shape)));
    }
    Ok(())
}
