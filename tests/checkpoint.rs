//! Checkpoints across layouts (thread ranks): saved at layout A, loaded at B and saved again,
//! both read back as whole tensors are identical (model and AdamW state), and training continued
//! at B matches training continued at A; a resume at the same layout is bit-exact (with
//! dropout); replicated tensors are written once; keep-K, `latest`, leftovers of interrupted
//! saves; asynchronous saves.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::{DType, TensorData};
use burn_parallel::checkpoint::*;
use common::runner::*;

/// Every tensor of a checkpoint, whole, and its counters other than random streams (whose names
/// depend on the layout: SP draws per-rank masks).
fn read_back(dir: &Path) -> (BTreeMap<String, TensorData>, BTreeMap<String, u64>, TrainState) {
    let ckpt = Checkpoint::open(dir).unwrap();
    let counters = ckpt.metadata().counters.iter().filter(|(k, _)| !k.starts_with(RNG_PREFIX)).map(|(k, v)| (k.clone(), *v)).collect();
    (full_tensors(&ckpt, "").unwrap(), counters, ckpt.metadata().train.clone())
}

fn plan(layout: Layout, load: Option<&Path>, steps: usize, save: Option<&Path>, dropout: f64) -> Vec<f32> {
    run(&Plan { layout, config: gpt(4, layout.sp, dropout), load, steps, save, async_save: false })
}

fn sp(l: Layout) -> Layout {
    Layout { sp: true, ..l }
}

fn virt(l: Layout) -> Layout {
    Layout { v: 2, ..l }
}

#[test]
fn saved_at_one_layout_loaded_at_another_is_the_same_state_and_trains_the_same() {
    let pairs = [
        (layout(1, 1, 1), layout(1, 1, 2)),
        (layout(1, 1, 2), layout(1, 1, 4)),
        (layout(1, 1, 4), layout(1, 1, 1)),
        (layout(1, 1, 1), layout(1, 2, 1)),
        (layout(1, 2, 1), layout(1, 4, 1)),
        (layout(1, 4, 1), layout(1, 1, 2)),
        (virt(layout(1, 2, 1)), layout(1, 2, 2)),
        (layout(2, 1, 1), layout(1, 1, 1)),
        (layout(1, 1, 2), sp(layout(2, 2, 2))),
        (sp(layout(1, 1, 2)), layout(1, 1, 1)),
        (layout(2, 2, 2), virt(layout(1, 2, 1))),
    ];
    for (a, b) in pairs {
        let (dir_a, dir_b) = (temp_dir("reshard-a"), temp_dir("reshard-b"));
        plan(a, None, 2, Some(&dir_a), 0.0);
        plan(b, Some(&dir_a), 0, Some(&dir_b), 0.0);
        let (ta, ca, sa) = read_back(&dir_a);
        let (tb, cb, sb) = read_back(&dir_b);
        assert_eq!(ta.keys().collect::<Vec<_>>(), tb.keys().collect::<Vec<_>>(), "{a:?} -> {b:?}: tensor names");
        assert!(ta.keys().any(|k| k.starts_with("optim.exp_avg_sq.")) && ta.len() == 3 * ta.keys().filter(|k| k.starts_with("model.")).count());
        for (name, x) in &ta {
            assert!(x == &tb[name], "{a:?} -> {b:?}: {name} differs after the reshard");
        }
        assert_eq!((ca, sa.clone()), (cb, sb), "{a:?} -> {b:?}: counters and training state");
        assert_eq!(sa.step, 2);
        // Training continued at B matches training continued at A.
        let (la, lb) = (plan(a, Some(&dir_a), 3, None, 0.0), plan(b, Some(&dir_a), 3, None, 0.0));
        for (x, y) in la.iter().zip(&lb) {
            assert!((x - y).abs() < 1e-5 * x.abs().max(1.0), "{a:?} -> {b:?}: losses {la:?} vs {lb:?}");
        }
        for d in [dir_a, dir_b] {
            std::fs::remove_dir_all(d).unwrap();
        }
    }
}

#[test]
fn resuming_at_the_same_layout_is_bit_exact_with_dropout() {
    for l in [layout(1, 1, 2), sp(layout(1, 1, 2)), layout(2, 2, 1), virt(layout(1, 2, 2))] {
        let dir = temp_dir("bitexact");
        let whole = plan(l, None, 4, None, 0.1);
        let first = plan(l, None, 2, Some(&dir), 0.1);
        let rest = plan(l, Some(&dir), 2, None, 0.1);
        assert_eq!(first, whole[..2], "{l:?}");
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&rest), bits(&whole[2..]), "{l:?}: resumed losses {rest:?} vs uninterrupted {:?}", &whole[2..]);
        assert_ne!(whole[2], plan(l, None, 3, None, 0.0)[2], "{l:?}: dropout must be active for this test to mean anything");
        std::fs::remove_dir_all(dir).unwrap();
    }
}

#[test]
fn replicated_tensors_are_written_once_and_each_rank_writes_its_own_shards() {
    let dir = temp_dir("dedup");
    plan(layout(2, 2, 2), None, 1, Some(&dir), 0.0);
    let ckpt = Checkpoint::open(&dir).unwrap();
    let m = ckpt.metadata();
    // Megatron order: rank = tp + 2·dp + 4·pp. DP replica 1 (ranks 2, 3, 6, 7) writes nothing.
    assert_eq!(
        m.files.keys().cloned().collect::<Vec<_>>(),
        ["rank-00000.safetensors", "rank-00001.safetensors", "rank-00004.safetensors", "rank-00005.safetensors"]
    );
    let chunks = |n: &str| m.tensors[n].chunks.iter().map(|c| (c.file.clone(), c.offset.clone())).collect::<Vec<_>>();
    assert_eq!(chunks("model.blocks.0.ln1.gamma"), [("rank-00000.safetensors".to_string(), vec![0])]);
    assert_eq!(chunks("model.blocks.3.ln2.beta"), [("rank-00004.safetensors".to_string(), vec![0])]);
    assert_eq!(chunks("model.blocks.0.attn.qkv.weight"), [("rank-00000.safetensors".into(), vec![0, 0]), ("rank-00001.safetensors".into(), vec![0, 24])]);
    assert_eq!(chunks("optim.exp_avg.head.weight"), [("rank-00004.safetensors".into(), vec![0, 0]), ("rank-00005.safetensors".into(), vec![0, 16])]);
    assert_eq!(chunks("model.wte.weight"), [("rank-00000.safetensors".into(), vec![0, 0]), ("rank-00001.safetensors".into(), vec![16, 0])]);
    ckpt.verify().unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

fn tiny_snapshot(step: u64, value: f32) -> Snapshot {
    let data = TensorData::new(vec![value; 6], [2, 3]);
    let placement = burn_parallel::sharding::placement(&[2, 3], None, 0, 1);
    let tensors = vec![HostTensor { name: "model.w".into(), data, placement, write: true }];
    let train = TrainState { step, ..Default::default() };
    Snapshot { step, layout: burn_parallel::ParallelConfig::new(), train, tensors, counters: BTreeMap::new(), sections: BTreeMap::new() }
}

fn single() -> burn_parallel::Comm {
    burn_parallel::LocalWorld::new(1).communicator(0)
}

#[test]
fn keep_k_latest_pointer_leftovers_and_one_timeline() {
    let dir = temp_dir("keep");
    let mut saver = Checkpointer::new(CheckpointOptions { dir: dir.clone(), keep: 2, async_save: false }, single());
    for step in 1..=5 {
        let r = saver.save(tiny_snapshot(step, step as f32)).unwrap();
        assert_eq!(r.committed, Some(checkpoint_dir(&dir, step)));
    }
    let steps: Vec<u64> = committed_checkpoints(&dir).unwrap().into_iter().map(|(s, _)| s).collect();
    assert_eq!(steps, [4, 5]);
    assert_eq!(std::fs::read_to_string(dir.join("latest")).unwrap(), "step-000005\n");
    // Leftovers of interrupted saves are never checkpoints, and the next save removes them.
    std::fs::create_dir_all(dir.join(".tmp-step-000009")).unwrap();
    std::fs::write(dir.join(".tmp-step-000009/rank-00000.safetensors"), b"half").unwrap();
    std::fs::create_dir_all(dir.join("step-000007")).unwrap(); // no metadata: not a checkpoint
    assert_eq!(latest_checkpoint(&dir).unwrap().unwrap().0, 5);
    saver.save(tiny_snapshot(6, 6.0)).unwrap();
    assert!(!dir.join(".tmp-step-000009").exists());
    let ckpt = Checkpoint::open(&dir).unwrap();
    assert_eq!((ckpt.metadata().step, ckpt.read_full("model.w").unwrap().to_vec::<f32>().unwrap()), (6, vec![6.0; 6]));
    // A save directory is one timeline: step 3 after step 6 is refused.
    let e = saver.save(tiny_snapshot(3, 3.0)).unwrap_err().to_string();
    assert!(e.contains("newer than step 3"), "{e}");
    assert_eq!(latest_checkpoint(&dir).unwrap().unwrap().0, 6);
    std::fs::remove_dir_all(dir).unwrap();
}

/// A step saved again (resharded in place) replaces the old one, with one complete `step-N`
/// at every moment (an atomic exchange) and nothing left behind; once a checkpoint is renamed
/// into place it is committed, even where `latest` cannot be rewritten.
#[test]
fn a_step_saved_again_replaces_it_and_a_failure_after_the_rename_keeps_the_commit() {
    let dir = temp_dir("resave");
    let mut saver = Checkpointer::new(CheckpointOptions { dir: dir.clone(), keep: 0, async_save: false }, single());
    saver.save(tiny_snapshot(1, 1.0)).unwrap();
    let r = saver.save(tiny_snapshot(1, 2.0)).unwrap();
    assert_eq!(r.committed, Some(checkpoint_dir(&dir, 1)));
    let ckpt = Checkpoint::open(&dir).unwrap();
    assert_eq!((ckpt.metadata().step, ckpt.read_full("model.w").unwrap().to_vec::<f32>().unwrap()), (1, vec![2.0; 6]));
    let names: Vec<String> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(names.iter().all(|n| !n.starts_with('.')), "leftovers: {names:?}");
    // `latest` replaced by a non-empty directory: the pointer cannot be rewritten.
    std::fs::remove_file(dir.join("latest")).unwrap();
    std::fs::create_dir_all(dir.join("latest/in-the-way")).unwrap();
    let r = saver.save(tiny_snapshot(2, 3.0)).unwrap();
    assert_eq!(r.committed, Some(checkpoint_dir(&dir, 2)), "committed once renamed into place");
    assert_eq!(latest_checkpoint(&dir).unwrap().unwrap().0, 2);
    std::fs::remove_dir_all(dir).unwrap();
}

/// A resizable dimension (a vocabulary padded anew): the part both shapes have is read, the rest
/// of the model's box is zero, saved rows past the model's are dropped; any other dimension, or
/// any tensor without the rule, must still match.
#[test]
fn a_resizable_dimension_reads_the_common_part_and_zero_beyond() {
    let dir = temp_dir("resize");
    let mut saver = Checkpointer::new(CheckpointOptions { dir: dir.clone(), keep: 0, async_save: false }, single());
    let mut snap = tiny_snapshot(1, 0.0);
    snap.tensors[0].data = TensorData::new((1..=6).map(|v| v as f32).collect::<Vec<_>>(), [2, 3]);
    saver.save(snap).unwrap();
    let plain = Checkpoint::open(&dir).unwrap();
    let e = plain.read("model.w", DType::F32, &[4, 3], &[0, 0], &[4, 3]).unwrap_err().to_string();
    assert!(e.contains("[2, 3]") && e.contains("[4, 3]"), "{e}");
    let ckpt = Checkpoint::open(&dir).unwrap().with_resizable(|name| (name == "model.w").then_some(0));
    let grown = ckpt.read("model.w", DType::F32, &[4, 3], &[1, 0], &[3, 3]).unwrap().to_vec::<f32>().unwrap();
    assert_eq!(grown, [4.0, 5.0, 6.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
    let shrunk = ckpt.read("model.w", DType::F32, &[1, 3], &[0, 0], &[1, 3]).unwrap().to_vec::<f32>().unwrap();
    assert_eq!(shrunk, [1.0, 2.0, 3.0]);
    assert!(ckpt.read("model.w", DType::F32, &[2, 4], &[0, 0], &[2, 4]).is_err(), "only dimension 0 may differ");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn asynchronous_saves_equal_synchronous_ones_and_report_background_errors() {
    let (sync_dir, async_dir) = (temp_dir("sync"), temp_dir("async"));
    let l = layout(2, 2, 1);
    run(&Plan { layout: l, config: gpt(4, false, 0.0), load: None, steps: 2, save: Some(&sync_dir), async_save: false });
    run(&Plan { layout: l, config: gpt(4, false, 0.0), load: None, steps: 2, save: Some(&async_dir), async_save: true });
    assert_eq!(read_back(&sync_dir).0, read_back(&async_dir).0);
    // A background write that fails surfaces at the next poll/finish; the previous checkpoint stays.
    let dir = temp_dir("async-fail");
    let mut saver = Checkpointer::new(CheckpointOptions { dir: dir.clone(), keep: 0, async_save: true }, single());
    saver.save(tiny_snapshot(1, 1.0)).unwrap();
    assert!(saver.in_flight());
    assert!(saver.finish().unwrap().is_some());
    let mut bad = tiny_snapshot(2, 2.0);
    bad.tensors[0].data = TensorData::new(vec![true; 6], [2, 3]);
    let r = saver.save(bad).unwrap();
    assert!(r.committed.is_none());
    let e = loop {
        match saver.poll() {
            Ok(None) => std::thread::sleep(std::time::Duration::from_millis(5)),
            Ok(Some(d)) => panic!("a failed write was committed to {}", d.display()),
            Err(e) => break e.to_string(),
        }
    };
    assert!(e.contains("asynchronous save of step 2 failed") && e.contains("cannot be saved"), "{e}");
    assert!(!saver.in_flight());
    assert_eq!(Checkpoint::open(&dir).unwrap().metadata().step, 1);
    for d in [sync_dir, async_dir, dir] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

#[test]
fn export_writes_whole_tensors_that_python_and_any_layout_read_back() {
    let dir = temp_dir("export");
    plan(layout(1, 2, 2), None, 1, Some(&dir), 0.0);
    let ckpt = Checkpoint::open(&dir).unwrap();
    let file = dir.join("model.safetensors");
    export_model(&ckpt, &file).unwrap();
    let whole = full_tensors(&ckpt, MODEL_PREFIX).unwrap();
    // Read back as a checkpoint of whole tensors: the same names and values.
    let imported = Checkpoint::open_safetensors(&file, MODEL_PREFIX).unwrap();
    assert_eq!(full_tensors(&imported, MODEL_PREFIX).unwrap(), whole);
    // Initialise tp = 4 from it: each rank holds its slice of the export.
    let shards = common::world(4, |c| {
        let groups = burn_parallel::ProcessGroups::new(layout(1, 1, 4).config(), c).map_err(|e| e.to_string())?;
        let m: burn_parallel_modules::Gpt<common::B> = gpt(4, false, 0.0).init(&groups.tp, &Default::default()).unwrap();
        let m = load_module(&imported, m, MODEL_PREFIX, &|p: &str| p.to_string(), ShardContext::new(&groups)).map_err(|e| e.to_string())?;
        Ok((groups.coords.tp, m.blocks[1].mlp.fc1.weight.val().into_data()))
    });
    for (r, shard) in shards {
        assert_eq!(shard, burn_parallel::comm::split_along(&whole["model.blocks.1.mlp.fc1.weight"], 1, 4, r).unwrap());
    }
    python_reads(&file, &whole);
    std::fs::remove_dir_all(dir).unwrap();
}

/// Python's `safetensors` (numpy) reads the export: same names, shapes, dtypes, sums, and
/// `__metadata__["format"] == "pt"`. Skipped (with a note) where Python lacks the package.
fn python_reads(file: &Path, whole: &BTreeMap<String, TensorData>) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/check_export.py");
    let out = match std::process::Command::new("python3").arg(script).arg(file).output() {
        Ok(o) if o.status.success() => o,
        Ok(o) if String::from_utf8_lossy(&o.stderr).contains("No module named") => {
            eprintln!("python3 has no safetensors/numpy: the Python read of the export is not checked here");
            return;
        }
        Ok(o) => panic!("check_export.py failed: {}", String::from_utf8_lossy(&o.stderr)),
        Err(e) => {
            eprintln!("no python3 ({e}): the Python read of the export is not checked here");
            return;
        }
    };
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["metadata"]["format"], "pt");
    let tensors = v["tensors"].as_object().unwrap();
    assert_eq!(tensors.len(), whole.len());
    for (name, data) in whole {
        let t = &tensors[name.trim_start_matches(MODEL_PREFIX)];
        assert_eq!(t["dtype"], "float32", "{name}");
        assert_eq!(t["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect::<Vec<_>>(), data.shape.as_slice(), "{name}");
        let sum: f64 = data.to_vec::<f32>().unwrap().iter().map(|x| *x as f64).sum();
        assert!((t["sum"].as_f64().unwrap() - sum).abs() <= 1e-9 * sum.abs().max(1.0), "{name}: python sum {} vs {sum}", t["sum"]);
    }
}

/// `checkpoint diff`: a checkpoint against its export (the model: bitwise equal, exit 0),
/// against the same run one step on (every model tensor named, exit 1; within a loose --atol,
/// exit 0), and a missing path (exit 2).
#[test]
fn checkpoint_diff_names_what_differs_and_exits_by_it() {
    let (a, b) = (temp_dir("diff-a"), temp_dir("diff-b"));
    plan(layout(1, 2, 2), None, 1, Some(&a), 0.0);
    plan(layout(1, 2, 2), None, 2, Some(&b), 0.0);
    let file = a.join("model.safetensors");
    export_model(&Checkpoint::open(&a).unwrap(), &file).unwrap();
    let diff = |args: &[&std::ffi::OsStr]| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_burn-parallel")).args(["checkpoint", "diff"]).args(args).output().unwrap();
        (o.status.code(), format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
    };
    let os = |s: &str| std::ffi::OsString::from(s);
    let (model, loose) = (os("--prefix=model."), os("--atol=1000"));
    let n = Checkpoint::open(&a).unwrap().metadata().tensors.keys().filter(|k| k.starts_with(MODEL_PREFIX)).count();
    let (code, out) = diff(&[a.as_os_str(), file.as_os_str(), &model]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains(&format!("{n} tensors: {n} bitwise equal, 0 within 0, 0 differ")), "{out}");
    let (code, out) = diff(&[a.as_os_str(), b.as_os_str(), &model]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("model.blocks.1.mlp.fc1.weight: ") && out.contains("values differ, max |a - b|"), "{out}");
    assert!(out.contains(&format!("{n} tensors: 0 bitwise equal, 0 within 0, {n} differ")), "{out}");
    let (code, out) = diff(&[a.as_os_str(), b.as_os_str(), &loose]);
    assert_eq!(code, Some(0), "{out}");
    // The optimizer state is in the checkpoints, not in the export.
    let (code, out) = diff(&[a.as_os_str(), file.as_os_str()]);
    assert!(code == Some(1) && out.contains(&format!("only in {}", a.display())), "{out}");
    let (code, out) = diff(&[a.as_os_str(), a.join("missing").as_os_str()]);
    assert!(code == Some(2) && out.contains("missing"), "{out}");
    for d in [a, b] {
        std::fs::remove_dir_all(d).unwrap();
    }
}
