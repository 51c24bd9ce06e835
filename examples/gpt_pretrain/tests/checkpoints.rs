//! Checkpoints, stops and crashes of the example, in real processes.

use super::*;

#[test]
fn resume_prints_the_same_losses_bit_for_bit() {
    for layout in [
        "--tp 2",
        "--dp 2 --pp 2 --microbatches 2",
        "--tp 2 --sequence-parallel --dp 2",
        "--pp 2 --schedule interleaved-1f1b --microbatches 4",
        "--dp 2 --zero 1 --precision bf16 --tp 2",
        "--dp 2 --zero 1 --pp 2 --microbatches 2 --clip-grad 0.5",
        "--tp 2 --sequence-parallel --recompute full",
        "--pp 2 --microbatches 2 --recompute selective --precision bf16",
        "--microbatches 2 --tp 2",
    ] {
        let dir = fresh("bitexact");
        let base = format!("{TINY} --steps 6 --dropout 0.1 --layers 4 {layout}");
        let whole = losses(&base);
        let first = losses(&format!("{base} --exit-at-step 3 --save-dir {}", dir.display()));
        let rest = losses(&format!("{base} --resume latest --save-dir {}", dir.display()));
        assert_eq!(whole.len(), 6, "{layout}: {whole:?}");
        assert_eq!([first, rest].concat(), whole, "{layout}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}

#[test]
fn sigkill_at_each_phase_of_a_save_leaves_a_loadable_checkpoint() {
    let base = format!("{TINY} --tp 2 --steps 5 --dropout 0.1");
    let whole = losses(&base);
    // (phase, newest committed step after the kill): the rename into place is the commit.
    for (phase, expect) in [("data-written", 2), ("metadata-written", 2), ("renamed", 3), ("retiring", 3)] {
        let dir = fresh(&format!("kill-{phase}"));
        let save = format!("--save-dir {} --keep 1", dir.display());
        losses(&format!("{base} {save} --exit-at-step 2"));
        kill_at(phase, &format!("{base} {save} --resume latest --save-every 1"));
        assert_eq!(latest_step(&dir), Some(expect), "{phase}");
        Checkpoint::open(&dir).unwrap().verify().unwrap();
        let rest = losses(&format!("{base} {save} --resume latest --save-every 1"));
        assert_eq!(rest, whole[expect as usize..], "{phase}: the resumed run differs from the uninterrupted one");
        let leftovers: Vec<_> =
            std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with('.')).collect();
        assert!(leftovers.is_empty(), "{phase}: the next saves leave {leftovers:?}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}

#[test]
fn sigkill_at_random_moments_never_loses_the_last_checkpoint() {
    // A bigger model, saved every step: kills land in every phase of saving and training.
    let base = "--d-model 192 --layers 2 --heads 4 --seq-len 32 --batch-size 4 --eval-batches 1 --sample-tokens 4 --eval-every 0 --tp 2 --steps 400 --save-every 1 --keep 2";
    let dir = fresh("kill-random");
    let flags = format!("{base} --save-dir {}", dir.display());
    let mut rng = burn_parallel::rng::HostRng::new(11, "kill-delays");
    let (mut last, mut interrupted_saves) = (0, 0);
    for round in 0..8 {
        let resume = if latest_step(&dir).is_some() { " --resume latest" } else { "" };
        let mut c = child(&format!("{flags}{resume}")).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(300 + rng.next_u64() % 1200));
        kill(&mut c);
        let step = latest_step(&dir).unwrap_or(0);
        assert!(step >= last, "round {round}: the newest checkpoint went back from {last} to {step}");
        last = step;
        if step > 0 {
            Checkpoint::open(&dir).unwrap().verify().unwrap_or_else(|e| panic!("round {round}: {e}"));
        }
        interrupted_saves +=
            std::fs::read_dir(&dir).map(|d| d.filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with(".tmp-step")).count()).unwrap_or(0);
    }
    assert!(last > 0, "no checkpoint was committed in 8 rounds");
    eprintln!("random kills: newest checkpoint step {last}, {interrupted_saves} kills interrupted a save");
    let done = run(&format!("{flags} --resume latest --exit-at-step {}", last + 1));
    assert!(done.status.success(), "{}", text(&done));
    std::fs::remove_dir_all(dir).unwrap();
}

/// SIGTERM (a pre-empted job, or Ctrl-C): every rank stops after the same step, saves it and
/// exits 0; the resumed run goes on with the uninterrupted losses, bit for bit.
#[test]
fn sigterm_saves_the_step_every_rank_stopped_at_and_the_resume_is_bit_exact() {
    for layout in ["--tp 2 --dp 2", "--pp 2 --microbatches 2"] {
        let dir = fresh("sigterm");
        // Far more steps than run before the signal lands (the schedule spans them all).
        let base = format!("{TINY} --layers 2 --steps 1000000 --dropout 0.1 {layout}");
        let (status, all) = signalled_after_step_3(&format!("{base} --save-dir {}", dir.display()), "-TERM", false);
        assert!(status.success(), "{layout}: {status:?}\n{all}");
        let at = all.find("stopped by signal 15 after step ").unwrap_or_else(|| panic!("{layout}: {all}"));
        let step: usize = all[at..].split_whitespace().nth(6).and_then(|n| n.parse().ok()).unwrap();
        assert!(step >= 3, "{layout}: stopped after step {step}");
        assert_eq!(latest_step(&dir), Some(step as u64), "{layout}: the step it stopped after is saved");
        let end = format!("--exit-at-step {}", step + 3);
        let rest = losses(&format!("{base} {end} --save-dir {} --resume latest", dir.display()));
        let whole = losses(&format!("{base} {end}"));
        assert_eq!(rest, whole[step..], "{layout}: the resumed run differs from the uninterrupted one");
        std::fs::remove_dir_all(dir).unwrap();
    }
    // A hung-up terminal: SIGHUP, and stdout is gone (writes fail). The stop is still clean.
    let dir = fresh("sighup");
    let (status, all) = signalled_after_step_3(&format!("{TINY} --layers 2 --steps 1000000 --save-dir {}", dir.display()), "-HUP", true);
    assert!(status.success() && latest_step(&dir).is_some_and(|s| s >= 3), "{status:?}\n{all}");
    std::fs::remove_dir_all(dir).unwrap();
    // Without --save-dir nothing can be saved: the stop is an error (a scheduler must not take
    // it for a finished run).
    let (status, all) = signalled_after_step_3(&format!("{TINY} --layers 2 --steps 1000000"), "-TERM", false);
    assert!(!status.success() && all.contains("nothing saved (no --save-dir)"), "{all}");
}

/// Runs `flags` in a child and sends it `signal` (`-TERM`, `-HUP`) once it printed step 3;
/// its exit status and output (stdout, then stderr). With `hang_up` its stdout is closed before
/// the signal (a terminal gone); otherwise it is read to the end (a closed pipe would fail the
/// child's next print).
fn signalled_after_step_3(flags: &str, signal: &str, hang_up: bool) -> (std::process::ExitStatus, String) {
    let mut c = child(flags).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(c.stdout.take().unwrap()).lines().map_while(Result::ok);
    let mut out: Vec<String> = lines.by_ref().take_while(|l| !l.contains("step 3 loss")).collect();
    if hang_up {
        drop(lines);
        Command::new("kill").args([signal, &c.id().to_string()]).status().unwrap();
    } else {
        Command::new("kill").args([signal, &c.id().to_string()]).status().unwrap();
        out.extend(lines);
    }
    let o = c.wait_with_output().unwrap();
    out.push(String::from_utf8_lossy(&o.stderr).into_owned());
    (o.status, out.join("\n"))
}

/// A vocabulary padded for one `--tp` resumes at a `--tp` that pads it otherwise (256 bytes,
/// unpadded at tp 2, padded to 384 at tp 3, and back): the resumed runs train as the
/// uninterrupted one in the first layout (f32 rounding of other splits); ZeRO's sharded moments
/// reload too.
#[test]
fn a_checkpoint_resumes_where_the_new_tp_pads_the_vocabulary_otherwise() {
    // Global batch 4 everywhere (dp × --batch-size): the same data in every layout.
    let base = "--d-model 48 --heads 6 --seq-len 16 --eval-batches 1 --sample-tokens 4 --eval-every 0 --print-every 1 --steps 6";
    for (first, then) in [("--tp 2 --batch-size 4", "--tp 3 --batch-size 4"), ("--tp 3 --dp 2 --zero 1 --batch-size 2", "--tp 2 --batch-size 4")] {
        // The uninterrupted run in the first layout (a padded vocabulary initialises other values).
        let whole = loss_values(&losses(&format!("{base} {first}")));
        let dir = fresh("repad");
        let a = loss_values(&losses(&format!("{base} {first} --exit-at-step 3 --save-dir {}", dir.display())));
        let b = loss_values(&losses(&format!("{base} {then} --resume latest --save-dir {}", dir.display())));
        let got = [a, b].concat();
        assert_eq!(got.len(), 6, "{first} -> {then}: {got:?}");
        for (x, y) in got.iter().zip(&whole) {
            assert!((x - y).abs() <= 1e-4 * y.abs(), "{first} -> {then}: {got:?} vs {whole:?}");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}

/// `--time-limit-mins`: the run stops after the first step past the limit, saves it and exits 0.
#[test]
fn a_time_limit_stops_and_saves_like_a_signal() {
    let dir = fresh("time-limit");
    let o = run(&format!("{TINY} --layers 2 --steps 100000 --tp 2 --time-limit-mins 0.005 --save-dir {}", dir.display()));
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    let at = t.find("stopped by --time-limit-mins 0.005 after step ").unwrap_or_else(|| panic!("{t}"));
    let step: u64 = t[at..].split_whitespace().nth(6).and_then(|n| n.parse().ok()).unwrap();
    assert!(step > 0 && step < 100000 && latest_step(&dir) == Some(step), "{t}");
    let e = error_of(&format!("{TINY} --steps 1 --time-limit-mins=-1"));
    assert!(e.contains("--time-limit-mins -1: must be a finite number at least 0"), "{e}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_failing_write_stops_training_with_the_error_and_keeps_the_previous_checkpoint() {
    use std::os::unix::process::CommandExt;
    let dir = fresh("disk-full");
    let flags = format!("{TINY} --tp 2 --steps 4 --save-dir {}", dir.display());
    losses(&format!("{flags} --exit-at-step 2"));
    let mut c = child(&format!("{flags} --resume latest --save-every 1"));
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        c.pre_exec(|| {
            // Files may not grow past 64 KiB (writes fail with EFBIG, as on a full disk).
            let lim = libc::rlimit { rlim_cur: 64 << 10, rlim_max: 64 << 10 };
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let o = c.output().unwrap();
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(t.contains("checkpoint: cannot write") && t.contains("rank-0000") && t.contains("File too large"), "{t}");
    assert_eq!(latest_step(&dir), Some(2));
    Checkpoint::open(&dir).unwrap().verify().unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bad_checkpoint_flags_are_clear_errors() {
    let dir = fresh("bad-flags");
    let save = format!("--save-dir {}", dir.display());
    let two = format!("{TINY} --layers 2");
    let e = error_of(&format!("{two} --steps 2 --resume latest {save}"));
    assert!(e.contains("--resume latest") && e.contains("no checkpoint in") && e.contains("does not exist"), "{e}");
    std::fs::create_dir_all(&dir).unwrap();
    let e = error_of(&format!("{two} --steps 2 --resume latest {save}"));
    assert!(e.contains("holds no committed checkpoint"), "{e}");
    losses(&format!("{two} --steps 2 {save}"));
    // A schedule that differs from the checkpoint's is a warning naming the flags.
    let o = run(&format!("{two} --steps 3 --lr 0.01 --resume latest {save}"));
    let t = text(&o);
    assert!(
        o.status.success()
            && t.contains("the learning-rate schedule's flags differ from the checkpoint's (--lr 0.003 there, 0.01 here; --steps 2 there, 3 here)"),
        "{t}"
    );
    let e = error_of(&format!("{two} --steps 4 --resume latest {save} --tp 3"));
    assert!(e.contains("attention heads = 4 is not divisible by tensor_parallel = 3"), "the padding is no obstacle: {e}");
    let e = error_of(&format!("{two} --steps 4 --resume latest {save} --tokenizer gpt2"));
    assert!(e.contains("another tokenizer: a vocabulary of 256 tokens there, 50257 here (--tokenizer gpt2)"), "{e}");
    let e = error_of(&format!("{two} --steps 4 --resume latest {save} --tp 8"));
    assert!(e.contains("--tp 8") && e.contains("attention heads = 4 is not divisible by tensor_parallel = 8"), "{e}");
    let e = error_of(&format!("{two} --steps 4 --resume latest {save} --pp 4 --microbatches 4"));
    assert!(e.contains("2 layers cannot fill 4 pipeline stages"), "{e}");
    let e = error_of(&format!("{TINY} --layers 3 --steps 4 --resume latest {save}"));
    assert!(e.contains("another model: n_layers = 2 there, 3 here"), "{e}");
    let e = error_of(&format!("{two} --steps 4 --resume latest {save} --d-ff 64"));
    assert!(e.contains("another model: d_ff = 128 there, 64 here"), "{e}");
    let e = error_of(&format!("{two} --steps 4 {save}"));
    assert!(e.contains("newer than step 0"), "a second run into a used save directory: {e}");
    let e = error_of(&format!("{two} --steps 4 --save-every 2"));
    assert!(e.contains("need --save-dir"), "{e}");
    let e = error_of(&format!("{two} --steps 4 --resume auto"));
    assert!(e.contains("--resume auto looks in --save-dir"), "{e}");
    let file = dir.join("latest");
    let e = error_of(&format!("{two} --steps 1 --resume auto --save-dir {}", file.display()));
    assert!(e.contains("--resume auto") && e.contains("latest is not a directory"), "a save directory that cannot be read is no fresh start: {e}");
    let e = error_of(&format!("{two} --steps 1 --save-dir {}", file.display()));
    assert!(e.contains("--save-dir") && e.contains("latest is not a directory"), "{e}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn an_exported_model_initialises_any_layout() {
    let dir = fresh("export");
    let file = dir.join("model.safetensors");
    losses(&format!("{TINY} --steps 3 --tp 2 --save-dir {} --export {}", dir.display(), file.display()));
    let first = |layout: &str| loss_values(&losses(&format!("{TINY} --steps 3 --exit-at-step 1 --init-from {} {layout}", file.display())))[0];
    let (a, b, c) = (first("--tp 1"), first("--tp 4"), first("--pp 2 --microbatches 2"));
    let scratch = loss_values(&losses(&format!("{TINY} --steps 3 --exit-at-step 1")))[0];
    assert!((a - b).abs() < 1e-5 && (a - c).abs() < 1e-5, "{a} {b} {c}");
    assert!((a - scratch).abs() > 1e-3, "the exported weights are not the seed's: {a} vs {scratch}");
    // A bf16 run keeps the exported f32 values as its masters: at lr 0 its own export equals them.
    let (again, out) = (dir.join("bf16"), dir.join("bf16.safetensors"));
    losses(&format!("{TINY} --steps 1 --lr 0 --precision bf16 --init-from {} --save-dir {} --export {}", file.display(), again.display(), out.display()));
    let weights = |f: &Path| Checkpoint::open_safetensors(f, "").unwrap().read_full("blocks.0.mlp.fc1.weight").unwrap().to_vec::<f32>().unwrap();
    assert!(weights(&out) == weights(&file), "the masters are the exported f32 values, not their bf16 rounding");
    // --resume auto with --init-from (a fine-tune that restarts itself): the exported weights on
    // the first start, the newest checkpoint after; the two parts are the whole run.
    let tune = dir.join("tune");
    let whole = losses(&format!("{TINY} --steps 4 --init-from {}", file.display()));
    let auto = format!("{TINY} --steps 4 --init-from {} --resume auto --save-dir {}", file.display(), tune.display());
    let parts = [losses(&format!("{auto} --exit-at-step 2")), losses(&auto)].concat();
    assert_eq!(parts, whole, "--init-from, then --resume auto");
    let e = error_of(&format!("{TINY} --steps 1 --init-from {} --resume latest --save-dir {}", file.display(), tune.display()));
    assert!(e.contains("--resume and --init-from exclude each other"), "{e}");
    // A model of byte tokens does not initialise a GPT-2-token run (the export names its config).
    let e = error_of(&format!("{TINY} --steps 1 --init-from {} --tokenizer gpt2", file.display()));
    assert!(e.contains("--init-from") && e.contains("another tokenizer: a vocabulary of 256 tokens there, 50257 here"), "{e}");
    // The byte vocabulary padded at --tp 3 (256 → 384 rows) initialises tp 1 and 2 (which divide
    // 384): the padding is kept, not redone for the new --tp.
    std::fs::remove_dir_all(&dir).unwrap();
    let three = "--d-model 48 --heads 6 --seq-len 16 --batch-size 4 --eval-batches 1 --sample-tokens 4 --eval-every 0 --print-every 1 --steps 3";
    losses(&format!("{three} --tp 3 --save-dir {} --export {}", dir.display(), file.display()));
    let first = |layout: &str| loss_values(&losses(&format!("{three} --exit-at-step 1 --init-from {} {layout}", file.display())))[0];
    let (a, b) = (first("--tp 1"), first("--tp 2"));
    assert!((a - b).abs() < 1e-5, "{a} {b}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// A diverging run (an absurd learning rate) stops at the first non-finite gradient norm, naming
/// the step, before the NaN reaches the weights: the checkpoint of the step before is the
/// newest, and finite.
#[test]
fn a_diverging_run_stops_at_the_first_nonfinite_gradient_and_keeps_its_checkpoint() {
    // With --async-save the save in flight when the norm turns non-finite is completed first.
    for saving in ["", "--async-save"] {
        let dir = fresh("diverge");
        let o = run(&format!("{TINY} --layers 2 --steps 20 --warmup 0 --lr 1e30 --save-dir {} --save-every 1 {saving}", dir.display()));
        let t = text(&o);
        assert!(!o.status.success() && !t.contains("panicked"), "{t}");
        let at = t.find(": the global gradient norm is").unwrap_or_else(|| panic!("{t}"));
        let step: u64 = t[..at].rsplit("step ").next().and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("{t}"));
        assert_eq!(latest_step(&dir), Some(step - 1), "{saving}: {t}");
        let ckpt = Checkpoint::open(&dir).unwrap();
        for name in ckpt.metadata().tensors.keys() {
            let values = ckpt.read_full(name).unwrap().convert::<f32>().to_vec::<f32>().unwrap();
            assert!(values.iter().all(|v| v.is_finite()), "{name} holds a non-finite value");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}

/// A HuggingFace GPT-2 (random, in `GPT2LMHeadModel`'s layout, written by `tests/gpt2_numpy.py`)
/// imported with `checkpoint::hf::import_hf` initialises a run with GPT-2's tied head and tanh
/// GeLU, at any layout alike; without them the run is refused, naming the flag. Skipped, saying
/// so, without python3 with numpy and safetensors.
#[test]
fn an_imported_huggingface_gpt2_initialises_a_run() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/gpt2_numpy.py");
    if !Command::new("python3").args(["-c", "import numpy, safetensors.numpy"]).status().is_ok_and(|s| s.success()) {
        eprintln!("SKIPPED: python3 with numpy and safetensors is not available (it writes the HuggingFace model)");
        return;
    }
    let dir = fresh("hf");
    std::fs::create_dir_all(&dir).unwrap();
    // TINY's shape: width 32, 4 heads, context 16; 2 layers; the byte vocabulary.
    let made = Command::new("python3").arg(script).arg("make").arg(&dir).args(["2", "32", "4", "256", "16", "3", "gelu_new", "tied"]).status().unwrap();
    assert!(made.success());
    let file = dir.join("ours.safetensors");
    burn_parallel::checkpoint::hf::import_hf(&dir, &file).unwrap();
    let base = format!("{TINY} --layers 2 --init-from {}", file.display());
    let gpt2 = format!("{base} --tie-embeddings --activation gelu-tanh");
    let first = |layout: &str| loss_values(&losses(&format!("{gpt2} --steps 2 --exit-at-step 1 {layout}")))[0];
    let (a, b) = (first(""), first("--pp 2 --tp 2 --microbatches 2"));
    assert!((a - b).abs() < 1e-5, "one rank {a}, pp 2 x tp 2 {b}");
    // Weights of scale 0.2 predict far from uniform: not the seed's ln 256 = 5.55.
    assert!((a - 256f32.ln()).abs() > 0.1, "{a}");
    let e = error_of(&format!("{base} --steps 1 --tie-embeddings"));
    assert!(e.contains("--init-from") && e.contains("pass --activation gelu-tanh"), "{e}");
    let e = error_of(&format!("{base} --steps 1 --activation gelu-tanh"));
    assert!(e.contains("pass --tie-embeddings"), "{e}");
    // Eight heads of 4 fit every tensor's shape, but not its q/k/v columns: refused by name.
    let e = error_of(&format!("{} --steps 1", gpt2.replace("--heads 4", "--heads 8")));
    assert!(e.contains("--init-from") && e.contains("n_heads = 4 there, 8 here"), "{e}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// A HuggingFace Llama (random, in `LlamaForCausalLM`'s layout with 2 key/value heads of 4,
/// written by `tests/llama_numpy.py`) imported with `import_hf` initialises a run with the flags
/// the import names, at any layout alike (tp 2 splits the key/value heads too); a context
/// shorter than the file's (RoPE has no table) is accepted, and the file's is kept in its
/// checkpoints (what an export tells HuggingFace); a wrong ε or key/value count is
/// refused by name; another RoPE θ and scaling are taken (a context extension). Skipped, saying so, without python3 with numpy and safetensors.
#[test]
fn an_imported_huggingface_llama_initialises_a_run() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/llama_numpy.py");
    if !Command::new("python3").args(["-c", "import numpy, safetensors.numpy"]).status().is_ok_and(|s| s.success()) {
        eprintln!("SKIPPED: python3 with numpy and safetensors is not available (it writes the HuggingFace model)");
        return;
    }
    let dir = fresh("hf-llama");
    std::fs::create_dir_all(&dir).unwrap();
    // TINY's width 32 and 4 heads (2 key/value heads), 2 layers, ffn 64, the byte vocabulary.
    let made = Command::new("python3").arg(script).arg("make").arg(&dir).args(["2", "32", "4", "2", "64", "256", "5", "10000.0", "untied"]).status().unwrap();
    assert!(made.success());
    let file = dir.join("ours.safetensors");
    let config = burn_parallel::checkpoint::hf::import_hf(&dir, &file).unwrap();
    let flags = config.flags().unwrap();
    assert!(flags.ends_with("--tokenizer byte"), "{flags}");
    let flags = flags.replace("--d-model 32 --heads 4 ", "").replace(" --tokenizer byte", "");
    let llama = format!("{TINY} --init-from {} {flags}", file.display());
    let first = |layout: &str| loss_values(&losses(&format!("{llama} --steps 2 --exit-at-step 1 {layout}")))[0];
    let (a, b) = (first(""), first("--pp 2 --tp 2 --microbatches 2 --sequence-parallel"));
    assert!((a - b).abs() < 1e-5, "one rank {a}, pp 2 x tp 2 {b}");
    assert!((a - 256f32.ln()).abs() > 0.1, "{a}");
    // Trained at --seq-len 16, the model keeps the file's context (64) for an export.
    let ck = dir.join("ck");
    losses(&format!("{llama} --steps 1 --save-dir {}", ck.display()));
    let saved = Checkpoint::open(&latest_checkpoint(&ck).unwrap().unwrap().1).unwrap();
    assert_eq!(saved.metadata().sections["model"]["max_seq_len"], 64);
    let e = error_of(&format!("{} --steps 1", llama.replace("--norm-eps 1e-6", "")));
    assert!(e.contains("layer_norm_eps") && e.contains("(--norm-eps)"), "{e}");
    let e = error_of(&format!("{} --steps 1", llama.replace("--kv-heads 2", "--kv-heads 4")));
    assert!(e.contains("--init-from") && e.contains("(--kv-heads)"), "{e}");
    // A long-context extension: --init-from with another θ and Llama 3.1's scaling trains (the
    // rotary frequencies have no weights), to another first loss.
    let longer =
        loss_values(&losses(&format!("{} --steps 2 --exit-at-step 1 --rope-scaling llama3:8,1,4,4", llama.replace("--rope-theta 10000", "--rope-theta 500"))))
            [0];
    assert!(longer.is_finite() && (longer - a).abs() > 1e-6, "{longer} vs {a}");
    std::fs::remove_dir_all(dir).unwrap();
}
