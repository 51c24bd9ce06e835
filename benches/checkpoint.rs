//! Checkpoint throughput: a GPT of ~51M parameters (204 MB in f32; 611 MB with AdamW's two
//! moments) on tp = 2 thread ranks, saved and loaded through `burn_parallel::checkpoint`, against
//! plain sequential file I/O of the same bytes by the same ranks in the same run (one file per
//! rank, `write_all` + fsync; `read` of the whole file). Loads are timed from a cold page cache
//! where `/proc/sys/vm/drop_caches` is writable (root), else warm. Asynchronous saves: the time
//! the training loop is blocked by `save` (after the copy to host memory) as a fraction of a
//! synchronous save. `cargo bench --bench checkpoint` (BENCH_CKPT_LAYERS, BENCH_CKPT_DIR).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::backend::{Autodiff, Flex};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::{Int, Tensor};
use burn_parallel::checkpoint::*;
use burn_parallel::{all_ok, run_world, Comm, LocalWorldOptions, ParallelConfig, ProcessGroups};
use burn_parallel_modules::GptConfig;

type B = Autodiff<Flex>;
const TP: usize = 2;

/// Seconds of each phase on one rank.
#[derive(Debug, Default, Clone)]
struct Times {
    bytes: u64,
    host_copy: f64,
    save: f64,
    plain_write: f64,
    load: f64,
    plain_read: f64,
    async_blocked: f64,
    async_total: f64,
}

fn drop_caches() -> bool {
    // Write dirty pages, then ask the kernel to drop clean ones (needs root).
    let _ = std::process::Command::new("sync").status();
    std::fs::write("/proc/sys/vm/drop_caches", b"3").is_ok()
}

fn plain_write(path: &Path, tensors: &[HostTensor]) -> f64 {
    let t0 = Instant::now();
    let mut f = std::fs::File::create(path).unwrap();
    for t in tensors.iter().filter(|t| t.write) {
        f.write_all(t.data.as_bytes()).unwrap();
    }
    f.sync_all().unwrap();
    t0.elapsed().as_secs_f64()
}

fn rank(comm: Comm, dir: PathBuf, cold: bool) -> Result<Times, String> {
    let layers = std::env::var("BENCH_CKPT_LAYERS").ok().and_then(|v| v.parse().ok()).unwrap_or(4);
    let config = GptConfig::new(256, 64, 1024, 16, layers, 4096);
    let groups = ProcessGroups::new(ParallelConfig::new().with_tensor_parallel(TP), comm.clone()).map_err(|e| e.to_string())?;
    let dev = Default::default();
    let mut gpt = config.init::<B>(&groups.tp, &dev).map_err(|e| e.to_string())?;
    let mut optim = AdamWConfig::new().init();
    let ids = Tensor::<B, 2, Int>::from_ints([[1, 2, 3, 4, 5, 6, 7, 8]], &dev);
    let grads = GradientsParams::from_grads(gpt.loss(ids.clone(), ids).backward(), &gpt);
    gpt = optim.step(1e-3, gpt, grads);
    let ctx = ShardContext::new(&groups);
    let same = |p: &str| p.to_string();
    let snapshot = |train: u64| {
        let mut tensors = module_tensors(&gpt, &same, ctx);
        let (moments, counters) = adamw_tensors(&optim, &gpt, &same, ctx);
        tensors.extend(moments);
        Snapshot {
            step: train,
            layout: groups.config.clone(),
            train: TrainState { step: train, ..Default::default() },
            tensors,
            counters,
            sections: Default::default(),
        }
    };
    let mut t = Times::default();
    let t0 = Instant::now();
    let snap = snapshot(1);
    t.host_copy = t0.elapsed().as_secs_f64();
    t.bytes = snap.tensors.iter().filter(|x| x.write).map(|x| x.data.as_bytes().len() as u64).sum();
    let plain = dir.join(format!("plain-{}.bin", comm.rank()));
    comm.barrier().map_err(|e| e.to_string())?;
    t.plain_write = plain_write(&plain, &snap.tensors);
    comm.barrier().map_err(|e| e.to_string())?;
    let mut saver = Checkpointer::new(CheckpointOptions { dir: dir.join("ckpt"), keep: 1, async_save: false }, comm.clone());
    t.save = saver.save(snap).map_err(|e| e.to_string())?.blocked_secs;
    // Loads (cold where possible: rank 0 drops the page cache between phases).
    let cache = |c: &Comm| -> Result<(), String> {
        if cold && c.rank() == 0 {
            drop_caches();
        }
        c.barrier().map_err(|e| e.to_string())
    };
    cache(&comm)?;
    let fresh = config.init::<B>(&groups.tp, &dev).map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    let ckpt = Checkpoint::open(dir.join("ckpt")).map_err(|e| e.to_string())?;
    let loaded = load_module(&ckpt, fresh, MODEL_PREFIX, &same, ctx).map_err(|e| e.to_string())?;
    let _optim = load_adamw(&ckpt, AdamWConfig::new().init(), &loaded, &same, ctx).map_err(|e| e.to_string())?;
    t.load = t0.elapsed().as_secs_f64();
    cache(&comm)?;
    let t0 = Instant::now();
    std::hint::black_box(std::fs::read(&plain).unwrap());
    t.plain_read = t0.elapsed().as_secs_f64();
    // Asynchronous: blocked time of `save` (after the host copy), then the background write.
    comm.barrier().map_err(|e| e.to_string())?;
    let mut saver = Checkpointer::new(CheckpointOptions { dir: dir.join("ckpt"), keep: 1, async_save: true }, comm.clone());
    let snap = snapshot(2);
    // Ranks meet first: the time is the save's, not one rank waiting for another's host copy.
    comm.barrier().map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    t.async_blocked = saver.save(snap).map_err(|e| e.to_string())?.blocked_secs;
    saver.finish().map_err(|e| e.to_string())?;
    t.async_total = t0.elapsed().as_secs_f64();
    std::fs::remove_file(plain).ok();
    Ok(t)
}

fn main() {
    let dir = std::env::var("BENCH_CKPT_DIR").map(PathBuf::from).unwrap_or_else(|_| std::env::temp_dir().join("bp-bench-checkpoint"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let cold = drop_caches();
    let opts = LocalWorldOptions { timeout: std::time::Duration::from_secs(600), ..Default::default() };
    let times = all_ok(run_world(TP, opts, |c| rank(c, dir.clone(), cold))).expect("benchmark failed");
    let max = |f: fn(&Times) -> f64| times.iter().map(f).fold(0.0, f64::max);
    let bytes: u64 = times.iter().map(|t| t.bytes).sum();
    let gb = bytes as f64 / 1e9;
    println!(
        "checkpoint of {:.0} MB (model + AdamW moments) on tp = {TP} thread ranks; loads from a {} page cache",
        bytes as f64 / 1e6,
        if cold { "cold" } else { "warm" }
    );
    println!("| phase | seconds | GB/s | ratio to plain file I/O |");
    println!("|---|---|---|---|");
    let row = |name: &str, ours: f64, plain: f64| println!("| {name} | {ours:.3} | {:.2} | {:.2} |", gb / ours, plain / ours);
    row("save (sync, fsync, commit)", max(|t| t.save), max(|t| t.plain_write));
    println!("| plain write + fsync | {:.3} | {:.2} | 1 |", max(|t| t.plain_write), gb / max(|t| t.plain_write));
    row("load (same layout, checksums)", max(|t| t.load), max(|t| t.plain_read));
    println!("| plain read | {:.3} | {:.2} | 1 |", max(|t| t.plain_read), gb / max(|t| t.plain_read));
    println!("| host copy (snapshot) | {:.3} | {:.2} | |", max(|t| t.host_copy), gb / max(|t| t.host_copy));
    println!("| async save: training blocked | {:.4} | | {:.3} of a sync save |", max(|t| t.async_blocked), max(|t| t.async_blocked) / max(|t| t.save));
    println!("| async save: until committed | {:.3} | | |", max(|t| t.async_total));
    std::fs::remove_dir_all(&dir).ok();
}
