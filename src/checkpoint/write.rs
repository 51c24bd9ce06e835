//! Writing checkpoints: each rank's data file, and rank 0's atomic commit.
//!
//! Commit protocol (each step durable before the next: files and directories are fsynced):
//! 1. rank 0 removes leftovers of interrupted saves (`.tmp-*`, `.trash-*`) and creates
//!    `.tmp-step-N/`;
//! 2. every rank writes `rank-R.safetensors` (its chunks) and `rank-R.json` (what it wrote);
//! 3. once all ranks succeeded, rank 0 merges the fragments, checks that every tensor is covered
//!    exactly once, writes `metadata.json` **last**, renames the directory to `step-N/`, then
//!    rewrites the `latest` pointer (write, fsync, rename) and deletes checkpoints beyond the
//!    newest K (each renamed away before it is deleted, so a half-deleted one is never valid).
//!
//! A kill at any moment leaves either the previous state (no `step-N/`) or the committed one.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, View};

use super::error::{CheckpointError, Result};
use super::format::*;
use super::read::{check_coverage, committed_checkpoints};
use super::state::HostTensor;

/// One chunk's bytes as a safetensors view.
struct ChunkView<'a> {
    dtype: Dtype,
    shape: &'a [usize],
    data: &'a [u8],
}

impl View for ChunkView<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> CheckpointError + 'a {
    move |e| CheckpointError::io(op, path, e)
}

/// fsync of a directory (makes renames and new entries in it durable).
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|f| f.sync_all()).map_err(io("fsync", dir))
}

/// Creates `dir` and its missing ancestors, each made durable in its parent (a power loss after
/// the first save must not lose the directory entry of a save directory whose files are synced).
fn create_dir_synced(dir: &Path) -> Result<()> {
    let missing: Vec<&Path> = dir.ancestors().take_while(|a| !a.as_os_str().is_empty() && !a.exists()).collect();
    std::fs::create_dir_all(dir).map_err(io("create the save directory", dir))?;
    for made in missing.iter().rev() {
        sync_dir(made.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")))?;
    }
    Ok(())
}

/// Writes `bytes` to `path` and fsyncs it.
pub(crate) fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).map_err(io("create", path))?;
    f.write_all(bytes).map_err(io("write", path))?;
    f.sync_all().map_err(io("fsync", path))
}

/// Writes a safetensors file of whole tensors `(name, data)` (e.g. an exported model) with
/// `metadata` as its `__metadata__`, and fsyncs it.
pub fn write_safetensors(path: &Path, tensors: &[(String, burn::tensor::TensorData)], metadata: HashMap<String, String>) -> Result<()> {
    let views = tensors
        .iter()
        .map(|(n, d)| {
            let dtype = to_safetensors_dtype(d.dtype).ok_or_else(|| CheckpointError::Invalid(format!("tensor {n}: dtype {:?} cannot be saved", d.dtype)))?;
            Ok((n.clone(), ChunkView { dtype, shape: d.shape.as_slice(), data: d.as_bytes() }))
        })
        .collect::<Result<Vec<_>>>()?;
    serialize(path, views, metadata)
}

/// Writes `views` as the safetensors file `path` (through a sibling temporary file, renamed),
/// then fsyncs it.
pub(super) fn serialize<V: View>(path: &Path, views: Vec<(String, V)>, metadata: HashMap<String, String>) -> Result<()> {
    safetensors::serialize_to_file(views, Some(metadata), path).map_err(|e| match e {
        safetensors::SafeTensorError::IoError(e) => CheckpointError::io("write", path, e),
        e => CheckpointError::Invalid(format!("{}: {e}", path.display())),
    })?;
    File::open(path).and_then(|f| f.sync_all()).map_err(io("fsync", path))
}

/// Test hook for kill tests: with `BURN_PARALLEL_CHECKPOINT_STALL=<phase>` in the environment,
/// the save stops at `phase` (printing `checkpoint: stalled at <phase>` to stderr) and waits to
/// be killed. Phases: `data-written` (every rank's files, before the merge), `metadata-written`
/// (before the rename), `renamed` (before the `latest` pointer), `retiring` (an old checkpoint
/// renamed away, before its deletion).
fn stall_point(phase: &str) {
    if std::env::var("BURN_PARALLEL_CHECKPOINT_STALL").is_ok_and(|p| p == phase) {
        eprintln!("checkpoint: stalled at {phase}");
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}

/// Step 1 (rank 0): removes leftovers of interrupted saves and creates the temporary directory
/// of `step`.
pub(crate) fn prepare(save_dir: &Path, step: u64) -> Result<PathBuf> {
    create_dir_synced(save_dir)?;
    check_timeline(save_dir, step)?;
    for entry in std::fs::read_dir(save_dir).map_err(io("list", save_dir))? {
        let entry = entry.map_err(io("list", save_dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(TMP_PREFIX) || name.starts_with(TRASH_PREFIX) {
            let p = entry.path();
            tracing::info!(path = %p.display(), "removing an interrupted save");
            // Leftovers are never read: one that cannot go yet (e.g. still mapped on NFS) stays.
            if let Err(e) = std::fs::remove_dir_all(&p).or_else(|_| std::fs::remove_file(&p)) {
                tracing::warn!(path = %p.display(), error = %e, "cannot remove a leftover of an earlier save");
            }
        }
    }
    // Not fsynced: a temporary directory lost in a crash loses nothing (the commit fsyncs).
    let tmp = save_dir.join(format!("{TMP_PREFIX}{}", step_dir_name(step)));
    std::fs::create_dir(&tmp).map_err(io("create", &tmp))?;
    Ok(tmp)
}

/// A save directory holds one run's timeline: saving `step` where a newer checkpoint exists
/// (a run resumed from an older one) is refused rather than mixing two histories (`latest`
/// would keep pointing at the abandoned one, and keeping the newest K would delete the new).
pub fn check_timeline(save_dir: &Path, step: u64) -> Result<()> {
    match committed_checkpoints(save_dir)?.last() {
        Some((newer, dir)) if *newer > step => Err(CheckpointError::Invalid(format!(
            "{} holds {}, newer than step {step} that this run saves next: resume from it, or save to another directory",
            save_dir.display(),
            dir.display()
        ))),
        _ => Ok(()),
    }
}

/// Step 2 (every rank): writes this rank's chunks (the tensors it is the writer of) and its
/// fragment; returns the number of data bytes written.
pub(crate) fn write_rank(tmp: &Path, rank: usize, tensors: &[HostTensor], counters: &BTreeMap<String, u64>) -> Result<u64> {
    let mine: Vec<&HostTensor> = tensors.iter().filter(|t| t.write).collect();
    let mut fragment = Fragment { rank, counters: counters.clone(), ..Default::default() };
    let mut bytes = 0;
    if !mine.is_empty() {
        let file = rank_file_name(rank);
        let mut views = Vec::with_capacity(mine.len());
        for t in &mine {
            let dtype = to_safetensors_dtype(t.data.dtype)
                .ok_or_else(|| CheckpointError::Invalid(format!("tensor {}: dtype {:?} cannot be saved", t.name, t.data.dtype)))?;
            let data = t.data.as_bytes();
            let chunk =
                ChunkMeta { file: file.clone(), offset: t.placement.offset.clone(), shape: t.data.shape.to_vec(), crc32: crc32fast::hash(data), key: None };
            fragment.tensors.push((t.name.clone(), dtype, t.placement.global_shape.clone(), chunk));
            views.push((t.name.clone(), ChunkView { dtype, shape: t.data.shape.as_slice(), data }));
            bytes += data.len() as u64;
        }
        let path = tmp.join(&file);
        serialize(&path, views, HashMap::from([("format".into(), FORMAT_NAME.into()), ("rank".into(), rank.to_string())]))?;
        let size = std::fs::metadata(&path).map_err(io("stat", &path))?.len();
        fragment.file = Some((file, size));
    }
    let json = serde_json::to_vec(&fragment).expect("fragments serialise");
    write_synced(&tmp.join(fragment_file_name(rank)), &json)?;
    Ok(bytes)
}

/// What rank 0 adds to the fragments to make the metadata.
pub(crate) struct CommitHeader {
    pub step: u64,
    pub layout: crate::topology::ParallelConfig,
    pub train: TrainState,
    pub sections: BTreeMap<String, serde_json::Value>,
}

/// Merges the fragments of `world` ranks into the metadata (every tensor covered exactly once,
/// counters equal wherever several ranks report them).
fn merge(tmp: &Path, world: usize, header: CommitHeader) -> Result<Metadata> {
    let mut meta = Metadata {
        format: FORMAT_NAME.into(),
        version: FORMAT_VERSION,
        step: header.step,
        layout: header.layout,
        train: header.train,
        counters: BTreeMap::new(),
        sections: header.sections,
        files: BTreeMap::new(),
        tensors: BTreeMap::new(),
    };
    for rank in 0..world {
        let path = tmp.join(fragment_file_name(rank));
        let text = std::fs::read(&path).map_err(io("read", &path))?;
        let f: Fragment = serde_json::from_slice(&text).map_err(|e| CheckpointError::Invalid(format!("{}: {e}", path.display())))?;
        if let Some((file, size)) = f.file {
            meta.files.insert(file, size);
        }
        for (name, dtype, shape, chunk) in f.tensors {
            let t = meta.tensors.entry(name.clone()).or_insert_with(|| TensorMeta { dtype, shape: shape.clone(), chunks: Vec::new() });
            if t.dtype != dtype || t.shape != shape {
                return Err(CheckpointError::Invalid(format!(
                    "tensor {name}: rank {rank} saved a chunk of a {dtype:?} {shape:?} tensor, another rank of a {:?} {:?} one",
                    t.dtype, t.shape
                )));
            }
            t.chunks.push(chunk);
        }
        for (key, value) in f.counters {
            match meta.counters.insert(key.clone(), value) {
                Some(old) if old != value => {
                    return Err(CheckpointError::Invalid(format!("counter {key}: rank {rank} has {value}, an earlier rank {old} (replicas diverged)")));
                }
                _ => {}
            }
        }
    }
    for (name, t) in &mut meta.tensors {
        t.chunks.sort_by(|a, b| a.offset.cmp(&b.offset));
        check_coverage(name, t)?;
    }
    Ok(meta)
}

/// Step 3 (rank 0): merges, writes the metadata, renames into place, updates `latest`, keeps
/// the newest `keep` checkpoints (0: all). Returns the committed directory. Once the rename is
/// durable the checkpoint is committed: a failure to update `latest` (the newest `step-N` wins
/// over a stale pointer anyway) or to delete old checkpoints is logged, not returned.
pub(crate) fn commit(save_dir: &Path, tmp: &Path, world: usize, header: CommitHeader, keep: usize) -> Result<PathBuf> {
    let step = header.step;
    stall_point("data-written");
    let meta = merge(tmp, world, header)?;
    for rank in 0..world {
        let p = tmp.join(fragment_file_name(rank));
        std::fs::remove_file(&p).map_err(io("remove", &p))?;
    }
    let json = serde_json::to_vec_pretty(&meta).expect("metadata serialises");
    write_synced(&tmp.join(METADATA_FILE), &json)?;
    sync_dir(tmp)?;
    stall_point("metadata-written");
    let target = save_dir.join(step_dir_name(step));
    let replaced = place(save_dir, tmp, &target)?;
    stall_point("renamed");
    let after = || -> Result<()> {
        let latest = save_dir.join(LATEST_FILE);
        let pointer = save_dir.join(format!("{TMP_PREFIX}{LATEST_FILE}"));
        write_synced(&pointer, format!("{}\n", step_dir_name(step)).as_bytes())?;
        std::fs::rename(&pointer, &latest).map_err(io("rename", &pointer))?;
        sync_dir(save_dir)?;
        if keep > 0 {
            let all = committed_checkpoints(save_dir)?;
            for (_, old) in all.iter().take(all.len().saturating_sub(keep)) {
                retire(save_dir, old)?;
            }
        }
        match replaced {
            Some(old) => std::fs::remove_dir_all(&old).map_err(io("remove the replaced", &old)),
            None => Ok(()),
        }
    };
    if let Err(e) = after() {
        tracing::warn!(dir = %target.display(), error = %e, "checkpoint committed; updating `latest` or deleting old checkpoints failed");
    }
    Ok(target)
}

/// Renames the complete `tmp` to `target`, durably. Where `target` exists (a step saved again,
/// e.g. resharded in place) the two are swapped atomically (Linux `renameat2`
/// `RENAME_EXCHANGE`): at every moment one complete `step-N` exists; the old one, now at
/// `tmp`, is returned for deletion (a crash leaves it as a `.tmp-*` leftover, which the next
/// save removes). Without the exchange (another OS or file system) the old one is renamed away
/// first and only deleted once the new one is in place.
fn place(save_dir: &Path, tmp: &Path, target: &Path) -> Result<Option<PathBuf>> {
    if !target.exists() {
        std::fs::rename(tmp, target).map_err(io("rename into place", tmp))?;
        sync_dir(save_dir)?;
        return Ok(None);
    }
    if exchange(tmp, target) {
        sync_dir(save_dir)?;
        return Ok(Some(tmp.to_path_buf()));
    }
    let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let trash = save_dir.join(format!("{TRASH_PREFIX}{name}"));
    std::fs::rename(target, &trash).map_err(io("rename", target))?;
    std::fs::rename(tmp, target).map_err(io("rename into place", tmp))?;
    sync_dir(save_dir)?;
    Ok(Some(trash))
}

/// Swaps two directory entries atomically where the OS and file system can (Linux 3.15+ on
/// ext4, xfs, btrfs, tmpfs, ...); false where they cannot (nothing changed).
fn exchange(a: &Path, b: &Path) -> bool {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::ffi::OsStrExt;
        let (Ok(ca), Ok(cb)) = (std::ffi::CString::new(a.as_os_str().as_bytes()), std::ffi::CString::new(b.as_os_str().as_bytes())) else { return false };
        // SAFETY: two NUL-terminated paths; renameat2 only reads them.
        let r = unsafe { libc::syscall(libc::SYS_renameat2, libc::AT_FDCWD, ca.as_ptr(), libc::AT_FDCWD, cb.as_ptr(), libc::RENAME_EXCHANGE) };
        r == 0
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (a, b);
        false
    }
}

/// Deletes a committed checkpoint: renamed out of the `step-N` namespace first (atomic), then
/// removed.
fn retire(save_dir: &Path, dir: &Path) -> Result<()> {
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let trash = save_dir.join(format!("{TRASH_PREFIX}{name}"));
    std::fs::rename(dir, &trash).map_err(io("rename", dir))?;
    sync_dir(save_dir)?;
    stall_point("retiring");
    std::fs::remove_dir_all(&trash).map_err(io("remove", &trash))
}
