//! [`Checkpointer`]: the collective save, synchronous or in the background.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::Instant;

use burn::tensor::TensorData;

use super::error::{CheckpointError, Result};
use super::format::TrainState;
use super::state::HostTensor;
use super::write::{commit, prepare, write_rank, CommitHeader};
use crate::comm::Comm;
use crate::topology::ParallelConfig;

/// How to save.
#[derive(Debug, Clone)]
pub struct CheckpointOptions {
    /// The save directory (`step-N/` directories and `latest` go here).
    pub dir: PathBuf,
    /// Keep the newest K committed checkpoints (0: keep all).
    pub keep: usize,
    /// Write in a background thread: [`Checkpointer::save`] returns once the tensors are on
    /// the host; the commit happens at a later [`poll`](Checkpointer::poll), the next save or
    /// [`finish`](Checkpointer::finish).
    pub async_save: bool,
}

/// One rank's state at a step, on the host.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The step (optimizer steps done).
    pub step: u64,
    /// The layout of the run.
    pub layout: ParallelConfig,
    /// Training position (the same on every rank).
    pub train: TrainState,
    /// This rank's tensors (model, optimizer).
    pub tensors: Vec<HostTensor>,
    /// This rank's counters (random streams, optimizer step counts).
    pub counters: BTreeMap<String, u64>,
    /// Sections of the metadata (taken from rank 0): model config, run arguments, ...
    pub sections: BTreeMap<String, serde_json::Value>,
}

/// What a save cost on this rank.
#[derive(Debug, Clone, Default)]
pub struct SaveReport {
    /// The committed checkpoint (`None` while an asynchronous save is in flight).
    pub committed: Option<PathBuf>,
    /// Bytes of tensor data this rank wrote (0 until an asynchronous write completes).
    pub bytes: u64,
    /// Seconds the caller was blocked.
    pub blocked_secs: f64,
}

struct Pending {
    tmp: PathBuf,
    header: CommitHeader,
    writer: JoinHandle<Result<u64>>,
}

/// Saves checkpoints for one rank of a world; every method is **collective** over `world` (all
/// ranks call it at the same point of the program). See the [module docs](super) for the
/// commit protocol.
pub struct Checkpointer {
    options: CheckpointOptions,
    world: Comm,
    pending: Option<Pending>,
}

impl std::fmt::Debug for Checkpointer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpointer").field("options", &self.options).field("pending", &self.pending.is_some()).finish()
    }
}

impl Checkpointer {
    /// A checkpointer for this rank of `world` (every rank of the job).
    pub fn new(options: CheckpointOptions, world: Comm) -> Self {
        Self { options, world, pending: None }
    }

    /// The options.
    pub fn options(&self) -> &CheckpointOptions {
        &self.options
    }

    /// Whether an asynchronous save is in flight.
    pub fn in_flight(&self) -> bool {
        self.pending.is_some()
    }

    /// Saves `snapshot` (collective). Waits for an asynchronous save still in flight and commits
    /// it first. Synchronous: returns once the checkpoint is committed. Asynchronous: returns
    /// once rank 0 has prepared the directory, the data is written in a background thread.
    /// On error nothing is committed and the previous checkpoint is untouched.
    pub fn save(&mut self, snapshot: Snapshot) -> Result<SaveReport> {
        let start = Instant::now();
        self.finish()?;
        let step = snapshot.step;
        let tmp = self.options.dir.join(format!("{}{}", super::format::TMP_PREFIX, super::format::step_dir_name(step)));
        let prepared = if self.world.rank() == 0 { prepare(&self.options.dir, step).map(|_| ()) } else { Ok(()) };
        self.agree(step, prepared)?;
        let header = CommitHeader { step, layout: snapshot.layout, train: snapshot.train, sections: snapshot.sections };
        let rank = self.world.global_rank();
        let (tensors, counters) = (snapshot.tensors, snapshot.counters);
        if self.options.async_save {
            let dir = tmp.clone();
            let writer = std::thread::Builder::new()
                .name(format!("checkpoint-writer-{rank}"))
                .spawn(move || write_rank(&dir, rank, &tensors, &counters))
                .map_err(|e| CheckpointError::io("start the writer thread for", &tmp, e))?;
            self.pending = Some(Pending { tmp, header, writer });
            return Ok(SaveReport { committed: None, bytes: 0, blocked_secs: start.elapsed().as_secs_f64() });
        }
        let written = write_rank(&tmp, rank, &tensors, &counters);
        let bytes = *written.as_ref().unwrap_or(&0);
        let committed = self.commit(tmp, header, written.map(|_| ()))?;
        Ok(SaveReport { committed: Some(committed), bytes, blocked_secs: start.elapsed().as_secs_f64() })
    }

    /// Commits an asynchronous save whose writes have finished on **every** rank (collective:
    /// one small all-gather while a save is in flight, nothing otherwise). Returns the
    /// committed directory, if one was committed now.
    pub fn poll(&mut self) -> Result<Option<PathBuf>> {
        let Some(p) = &self.pending else { return Ok(None) };
        let done = self.flags(p.writer.is_finished())?;
        if done.iter().all(|d| *d) {
            return self.finish();
        }
        Ok(None)
    }

    /// Waits for an asynchronous save in flight and commits it (collective). Call it before the
    /// program ends. A failed background write is reported here (as [`CheckpointError::Async`]).
    pub fn finish(&mut self) -> Result<Option<PathBuf>> {
        let Some(p) = self.pending.take() else { return Ok(None) };
        let step = p.header.step;
        let written = p.writer.join().unwrap_or_else(|_| Err(CheckpointError::Invalid("the checkpoint writer thread panicked".into())));
        let written = written.map(|_| ()).map_err(|e| CheckpointError::Async { step, source: Box::new(e) });
        self.commit(p.tmp, p.header, written).map(Some)
    }

    /// Everyone's written → rank 0 commits → everyone learns the outcome.
    fn commit(&self, tmp: PathBuf, header: CommitHeader, written: Result<()>) -> Result<PathBuf> {
        let step = header.step;
        self.agree(step, written)?;
        let target = self.options.dir.join(super::format::step_dir_name(step));
        let committed = if self.world.rank() == 0 {
            let t0 = Instant::now();
            let r = commit(&self.options.dir, &tmp, self.world.size(), header, self.options.keep);
            if r.is_ok() {
                tracing::debug!(step, secs = t0.elapsed().as_secs_f64(), "checkpoint committed");
            }
            r.map(|_| ())
        } else {
            Ok(())
        };
        self.agree(step, committed)?;
        Ok(target)
    }

    /// Whether each rank of the world reports `ok` (one all-gather).
    fn flags(&self, ok: bool) -> Result<Vec<bool>> {
        let mine = TensorData::new(vec![if ok { 1.0f32 } else { 0.0 }], [1]);
        let all = self.world.all_gather(mine, 0)?;
        Ok(all.to_vec::<f32>().expect("f32 flags").into_iter().map(|v| v > 0.5).collect())
    }

    /// Collective outcome of a phase: this rank's own error if it failed, an error naming the
    /// failed ranks if others did, `Ok` if all succeeded.
    fn agree(&self, step: u64, mine: Result<()>) -> Result<()> {
        let flags = self.flags(mine.is_ok())?;
        mine?;
        let failed: Vec<usize> = flags.iter().enumerate().filter(|(_, ok)| !**ok).map(|(r, _)| self.world.global_ranks()[r]).collect();
        if failed.is_empty() {
            return Ok(());
        }
        Err(CheckpointError::NotCommitted { step, msg: format!("ranks {failed:?} failed (their errors say why); the previous checkpoint is untouched") })
    }
}

/// The directory a step's checkpoint is committed to in `save_dir`.
pub fn checkpoint_dir(save_dir: &Path, step: u64) -> PathBuf {
    save_dir.join(super::format::step_dir_name(step))
}
