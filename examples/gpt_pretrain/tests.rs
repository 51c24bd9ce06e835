//! The example's checkpoint flags, with real processes: this test binary runs `main_result` in
//! child processes of itself (the ignored test `child_process`), so runs can be killed with
//! SIGKILL at any moment of a save, or limited in the file size they may write.
//!
//! - a run of 2N steps prints the same losses, bit for bit, as N steps + `--resume` for N more
//!   (dropout on; tp, dp, pp, SP);
//! - SIGKILL at each phase of the commit protocol, and at random moments, leaves the newest
//!   committed checkpoint loadable, and the resumed run equals the uninterrupted one;
//! - a write that fails (file-size limit: "disk full") stops training with the error, the
//!   previous checkpoint stays;
//! - bad flags: `--resume latest` with no checkpoint, a layout the model does not allow, another
//!   model, a save directory that is a file;
//! - `--export` + `--init-from` at another layout.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use burn_parallel::checkpoint::{latest_checkpoint, Checkpoint};

use super::{main_result, Args};

const CHILD_ENV: &str = "GPT_PRETRAIN_TEST_CHILD_ARGS";

/// Runs `main_result` with the flags in the environment (in a child process of the tests).
#[test]
#[ignore = "the child process of the tests below (runs only with their environment)"]
fn child_process() {
    let Ok(flags) = std::env::var(CHILD_ENV) else { return };
    super::init_logging();
    let args =
        Args::parse_with_presets(std::iter::once("gpt_pretrain".to_string()).chain(flags.split_whitespace().map(String::from))).unwrap_or_else(|e| e.exit());
    let code = match main_result(&args) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    };
    std::process::exit(code);
}

const TINY: &str = "--d-model 32 --heads 4 --seq-len 16 --batch-size 4 --eval-batches 1 --sample-tokens 4 --eval-every 0 --print-every 1";

fn child(flags: &str) -> Command {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args(["tests::child_process", "--exact", "--ignored", "--nocapture", "--test-threads", "1"]);
    c.env(CHILD_ENV, flags).env("RUST_LOG", "warn").stdin(Stdio::null());
    c
}

fn run(flags: &str) -> Output {
    child(flags).output().unwrap()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// The `step N loss L` lines of a successful run.
fn losses(flags: &str) -> Vec<String> {
    let o = run(flags);
    assert!(o.status.success(), "gpt_pretrain {flags} failed:\n{}", text(&o));
    step_lines(&String::from_utf8_lossy(&o.stdout))
}

/// The `step N loss L` lines of a run's stdout.
fn step_lines(stdout: &str) -> Vec<String> {
    // The test harness's "test tests::child_process ... " shares the first line.
    stdout.lines().filter_map(|l| l.find("step ").map(|i| l[i..].to_string())).filter(|l| l.contains(" loss ")).collect()
}

fn fresh(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("bp-example-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

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

/// Fused optimizer updates (`--optimizer-group-mb`, the GPU devices' default) print the
/// per-parameter losses bit for bit, also across a resume (the loaded state regroups).
#[test]
fn fused_optimizer_updates_print_the_per_parameter_losses() {
    let dir = fresh("fused-optim");
    let base = format!("{TINY} --steps 4 --dp 2 --zero 1 --precision bf16 --clip-grad 0.5");
    let per_parameter = losses(&base);
    assert_eq!(per_parameter.len(), 4, "{per_parameter:?}");
    let fused = format!("{base} --optimizer-group-mb 1");
    assert_eq!(losses(&fused), per_parameter);
    let first = losses(&format!("{fused} --exit-at-step 2 --save-dir {}", dir.display()));
    let rest = losses(&format!("{fused} --resume latest --save-dir {}", dir.display()));
    assert_eq!([first, rest].concat(), per_parameter);
    std::fs::remove_dir_all(dir).unwrap();
}

/// Starts a run that stalls at `phase` of its first save and kills it there with SIGKILL.
fn kill_at(phase: &str, flags: &str) {
    let mut c = child(flags).env("BURN_PARALLEL_CHECKPOINT_STALL", phase).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let stderr = c.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("checkpoint: stalled at") {
                let _ = tx.send(());
            }
        }
    });
    let reached = rx.recv_timeout(Duration::from_secs(120));
    kill(&mut c);
    assert!(reached.is_ok(), "the run never reached {phase}");
}

fn kill(c: &mut Child) {
    c.kill().unwrap(); // SIGKILL
    c.wait().unwrap();
}

fn latest_step(dir: &Path) -> Option<u64> {
    latest_checkpoint(dir).unwrap().map(|(s, _)| s)
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
        let base = format!("{TINY} --layers 2 --steps 120 --dropout 0.1 {layout}");
        let whole = losses(&base);
        let mut c = child(&format!("{base} --save-dir {}", dir.display())).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
        let mut lines = BufReader::new(c.stdout.take().unwrap()).lines().map_while(Result::ok);
        let mut out: Vec<String> = lines.by_ref().take_while(|l| !l.contains("step 3 loss")).collect();
        Command::new("kill").args(["-TERM", &c.id().to_string()]).status().unwrap();
        out.push("step 3 loss".into()); // the line take_while consumed (its loss is in `whole`)
        out.extend(lines);
        let status = c.wait().unwrap();
        let all = out.join("\n");
        assert!(status.success(), "{layout}: {status:?}\n{all}");
        let at = all.find("stopped by signal 15 after step ").unwrap_or_else(|| panic!("{layout}: {all}"));
        let step: usize = all[at..].split_whitespace().nth(6).and_then(|n| n.parse().ok()).unwrap();
        assert!((3..120).contains(&step), "{layout}: stopped after step {step}");
        assert_eq!(latest_step(&dir), Some(step as u64), "{layout}: the step it stopped after is saved");
        let rest = losses(&format!("{base} --save-dir {} --resume latest", dir.display()));
        assert_eq!(rest, whole[step..], "{layout}: the resumed run differs from the uninterrupted one");
        std::fs::remove_dir_all(dir).unwrap();
    }
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

fn error_of(flags: &str) -> String {
    let args = Args::parse_with_presets(std::iter::once("gpt_pretrain".to_string()).chain(flags.split_whitespace().map(String::from))).unwrap();
    main_result(&args).expect_err("must fail")
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
    let e = error_of(&format!("{two} --steps 4 --resume latest {save} --tp 3"));
    assert!(e.contains("vocab_size = 256 there, 384 here (--tp 3 pads the vocabulary"), "{e}");
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
    let file = dir.join("latest");
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

fn parse_error(flags: &str) -> String {
    let argv = std::iter::once("gpt_pretrain".to_string()).chain(flags.split_whitespace().map(String::from));
    Args::parse_with_presets(argv).expect_err("must not parse").to_string()
}

#[test]
fn bad_memory_flags_are_clear_errors() {
    let e = parse_error(&format!("{TINY} --precision f16"));
    assert!(e.contains("f16") && e.contains("bf16"), "an unknown precision names the known ones: {e}");
    let e = parse_error(&format!("{TINY} --recompute everything"));
    assert!(e.contains("everything") && e.contains("selective"), "an unknown recompute mode names the known ones: {e}");
    let e = parse_error(&format!("{TINY} --attention sparse"));
    assert!(e.contains("sparse") && e.contains("composed"), "{e}");
    let e = error_of(&format!("{TINY} --steps 1 --attention fused"));
    assert!(e.contains("no fused attention kernels"), "fused attention on the CPU backend is refused: {e}");
    let e = parse_error(&format!("{TINY} --attention chunked:0"));
    assert!(e.contains("chunked:0") && e.contains("chunked:ROWS"), "{e}");
    let e = error_of(&format!("{TINY} --steps 1 --attention chunked:4 --dropout 0.1"));
    assert!(e.contains("chunked attention has no dropout"), "{e}");
    let e = parse_error(&format!("{TINY} --attention-tensor-cores maybe"));
    assert!(e.contains("maybe") && e.contains("--attention-tensor-cores"), "{e}");
    let e = parse_error(&format!("{TINY} --tokenizer gpt4"));
    assert!(e.contains("gpt4"), "{e}");
    let e = error_of(&format!("{TINY} --steps 1 --zero 1"));
    assert!(e.contains("--zero 1") && e.contains("--dp 1"), "ZeRO without data parallelism is refused: {e}");
}

/// Sizes of zero, a dropout that is no probability and numbers no run can use are refused
/// before anything is built, naming the value (they panicked deep inside or trained silently).
#[test]
fn bad_model_and_optimisation_numbers_are_clear_errors() {
    for (flags, want) in [
        ("--d-model 0", "--d-model 0: hidden size must be at least 1 (got 0)"),
        ("--seq-len 0", "--seq-len 0: max_seq_len must be at least 1 (got 0)"),
        ("--layers 0", "--layers 0: layers must be at least 1 (got 0)"),
        ("--d-ff 0", "--d-ff 0: ffn size must be at least 1 (got 0)"),
        ("--heads 0", "--heads 0: attention heads must be at least 1 (got 0)"),
        ("--heads 5", "--d-model / --heads: hidden size = 128 is not divisible by attention heads = 5"),
        ("--dropout 1.5", "model: dropout 1.5 is not a probability in [0, 1)"),
        ("--lr=-1", "--lr -1: must be a finite number at least 0"),
        ("--lr nan", "--lr NaN: must be a finite number at least 0"),
        ("--weight-decay=-0.1", "--weight-decay -0.1: must be a finite number at least 0"),
        ("--temperature=-1", "--temperature -1: must be a finite number at least 0"),
        ("--clip-grad 0", "--clip-grad 0: must be a finite number above 0"),
        ("--peak-tflops 0", "--peak-tflops 0: must be a finite number above 0"),
        ("--save-dir x --export /nonexistent/dir/m.safetensors", "the directory /nonexistent/dir does not exist (checked before training)"),
    ] {
        // Not TINY: its size flags would be given twice. Refused before the default model is built.
        let e = error_of(&format!("--steps 1 --eval-batches 1 {flags}"));
        assert!(e.contains(want), "{flags}: {e}");
    }
    // An export into the save directory, or next to it in a directory the run makes, is fine.
    for flags in ["--save-dir /nonexistent/a/ck --export /nonexistent/a/m.safetensors", "--save-dir ./ck --export ck/m.safetensors"] {
        let args = Args::parse_with_presets(format!("gpt_pretrain {flags}").split_whitespace()).unwrap();
        assert_eq!(super::checkpointing::check_args(&args), Ok(()), "{flags}");
    }
}

/// The byte vocabulary is padded (masked) where --tp does not divide 256, as GPT-2's always is.
#[test]
fn the_byte_vocabulary_is_padded_where_tp_does_not_divide_it() {
    let l = loss_values(&losses(
        "--d-model 48 --heads 3 --seq-len 16 --batch-size 4 --eval-batches 1 --sample-tokens 4 --eval-every 0 --print-every 1 --steps 2 --tp 3",
    ));
    assert!(l.len() == 2 && l.iter().all(|x| x.is_finite()), "{l:?}");
    let args = Args::parse_with_presets(["gpt_pretrain", "--tp", "3"]).unwrap();
    let c = super::gpt_config(&args);
    assert_eq!((c.vocab_size, c.vocab_used), (384, Some(256)));
    let args = Args::parse_with_presets(["gpt_pretrain", "--tp", "4"]).unwrap();
    assert_eq!((super::gpt_config(&args).vocab_size, super::gpt_config(&args).vocab_used), (256, None));
}

#[test]
fn a_preset_sets_the_shape_and_explicit_flags_override_it() {
    let parse = |flags: &str| Args::parse_with_presets(std::iter::once("gpt_pretrain".to_string()).chain(flags.split_whitespace().map(String::from))).unwrap();
    let a = parse("--model gpt2-124m");
    assert_eq!((a.d_model, a.layers, a.seq_len, a.loss_chunk, a.lr), (768, 12, 1024, 1024, 6e-4));
    let a = parse("--model gpt2-350m");
    assert_eq!((a.d_model, a.layers, a.heads, a.lr), (1024, 24, 16, 3e-4));
    let a = parse("--model gpt2-124m --layers 2 --seq-len 64 --loss-chunk 0 --lr 1e-3");
    assert_eq!((a.d_model, a.layers, a.seq_len, a.loss_chunk, a.lr), (768, 2, 64, 0, 1e-3));
    assert_eq!(parse("").lr, 3e-3);
}

/// `--attention chunked:ROWS` (CPU: Burn ops on query chunks) trains with the composed run's
/// losses (printed to 4 decimals), at tp 1 and tp 2 with sequence parallelism.
#[test]
fn chunked_attention_prints_the_composed_losses() {
    for layout in ["", "--tp 2 --sequence-parallel"] {
        let composed = losses(&format!("{TINY} --steps 3 {layout} --attention composed"));
        let chunked = losses(&format!("{TINY} --steps 3 {layout} --attention chunked:5"));
        assert_eq!(composed.len(), 3, "{composed:?}");
        assert_eq!(chunked, composed, "{layout}");
    }
}

/// `--microbatches M` without a pipeline is gradient accumulation: it prints the losses of the
/// pipeline over the same M micro-batches bit for bit (with dropout; tp 2, SP, bf16, full
/// recompute), and those of one micro-batch within f32 rounding (no dropout: masks of other
/// shapes draw other values).
#[test]
fn gradient_accumulation_prints_the_pipelines_losses() {
    for layout in ["--dropout 0.1", "--tp 2 --sequence-parallel --precision bf16 --recompute full"] {
        let base = format!("{TINY} --steps 3 --layers 2 --microbatches 4 {layout}");
        let accumulated = losses(&base);
        assert_eq!(accumulated.len(), 3, "{accumulated:?}");
        assert_eq!(losses(&format!("{base} --pp 2")), accumulated, "{layout}");
    }
    let one = loss_values(&losses(&format!("{TINY} --steps 3 --layers 2")));
    let four = loss_values(&losses(&format!("{TINY} --steps 3 --layers 2 --microbatches 4")));
    assert_eq!(one.len(), 3);
    for (a, b) in one.iter().zip(&four) {
        assert!((a - b).abs() <= 1e-5 * a.abs(), "one micro-batch {one:?}, four {four:?}");
    }
}

/// `--metrics FILE`: one JSON line per step (its loss the printed one, bit for bit; the gradient
/// norm; the tokens seen) and one per evaluation; a resumed run appends.
#[test]
fn metrics_are_json_lines_and_a_resume_appends() {
    use burn_parallel::metrics::{EvalMetrics, StepMetrics};
    let dir = fresh("metrics");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("metrics.jsonl");
    let tiny = TINY.replace("--eval-every 0", "--eval-every 2");
    let base = format!("{tiny} --layers 2 --steps 4 --save-dir {} --metrics {}", dir.join("ckpt").display(), file.display());
    let printed = [losses(&format!("{base} --exit-at-step 3")), losses(&format!("{base} --resume latest"))].concat();
    let text = std::fs::read_to_string(&file).unwrap();
    let steps: Vec<StepMetrics> = text.lines().filter(|l| l.contains("\"loss\"")).map(|l| serde_json::from_str(l).unwrap()).collect();
    let evals: Vec<EvalMetrics> = text.lines().filter(|l| l.contains("val_loss")).map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(steps.iter().map(|s| s.step).collect::<Vec<_>>(), [1, 2, 3, 4], "{text}");
    let logged: Vec<String> = steps.iter().map(|s| format!("step {} loss {:?}", s.step, s.loss)).collect();
    assert_eq!(logged, printed);
    assert!(steps.iter().all(|s| s.grad_norm.is_some_and(|n| n.is_finite() && n > 0.0) && s.tokens_seen == s.step * 4 * 16), "{text}");
    assert_eq!(evals.iter().map(|e| e.step).collect::<Vec<_>>(), [2], "{text}");
    let e = error_of(&format!("{TINY} --steps 1 --metrics {}", dir.join("missing/m.jsonl").display()));
    assert!(e.contains("--metrics: cannot open the metrics file"), "{e}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// A diverging run (an absurd learning rate) stops at the first non-finite gradient norm, naming
/// the step, before the NaN reaches the weights: the checkpoint of the step before is the
/// newest, and finite.
#[test]
fn a_diverging_run_stops_at_the_first_nonfinite_gradient_and_keeps_its_checkpoint() {
    let dir = fresh("diverge");
    let o = run(&format!("{TINY} --layers 2 --steps 20 --warmup 0 --lr 1e30 --save-dir {} --save-every 1", dir.display()));
    let t = text(&o);
    assert!(!o.status.success() && !t.contains("panicked"), "{t}");
    let at = t.find(": the global gradient norm is").unwrap_or_else(|| panic!("{t}"));
    let step: u64 = t[..at].rsplit("step ").next().and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("{t}"));
    assert_eq!(latest_step(&dir), Some(step - 1), "{t}");
    let ckpt = Checkpoint::open(&dir).unwrap();
    for name in ckpt.metadata().tensors.keys() {
        let values = ckpt.read_full(name).unwrap().convert::<f32>().to_vec::<f32>().unwrap();
        assert!(values.iter().all(|v| v.is_finite()), "{name} holds a non-finite value");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// GPT-2 124M multiplies by 85.06M block weights and the 768 × 50304 head per token (the
/// embeddings are lookups): 6 · 123.69M + 12 · 12 · 768 · 1024 FLOPs.
#[test]
fn model_flops_of_gpt2_124m_count_the_matmul_weights_only() {
    let args = Args::parse_with_presets(["gpt_pretrain", "--model", "gpt2-124m", "--tokenizer", "gpt2"].map(String::from)).unwrap();
    let (flops, n) = super::model_flops(&args);
    let expected_n = 85_056_000.0 + 768.0 * 50_304.0;
    assert!((n / expected_n - 1.0).abs() < 1e-3, "N {n} vs {expected_n}");
    let expected = 6.0 * expected_n + 12.0 * 12.0 * 768.0 * 1024.0;
    assert!((flops / expected - 1.0).abs() < 1e-3, "FLOPs/token {flops} vs {expected}");
}

/// The loss of each `step N loss L` line.
fn loss_values(lines: &[String]) -> Vec<f32> {
    lines.iter().map(|l| l.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no loss in {l:?}"))).collect()
}

/// The log names the attention kernels that run: on wgpu, with `--attention-tensor-cores false`,
/// the FMA kernels, switched to.
#[cfg(feature = "wgpu")]
#[test]
fn wgpu_logs_which_attention_kernels_run() {
    let o = child(&format!("{TINY} --steps 1 --device wgpu --attention-tensor-cores false")).env("RUST_LOG", "info").output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let log = String::from_utf8_lossy(&o.stderr);
    let line = log.lines().find(|l| l.contains("fused attention")).unwrap_or_else(|| panic!("no 'fused attention' line in:\n{log}"));
    assert!(line.contains("FMA kernels (tensor cores switched off)"), "{line}");
}

/// `--device wgpu` (burn's `Wgpu`: the `Fusion<CubeBackend>` path that `Cuda` takes, with the
/// fused attention and layer-norm kernels, the device-side norm and loss sums and the chunked
/// cross-entropy; lavapipe in CI) trains with the CPU run's losses, tp 2 with SP and pp 2 × dp 2
/// with ZeRO and recompute; every rank's device bytes after the last step are the predicted
/// model state; a checkpoint saved on wgpu resumes on the CPU with the CPU's losses.
#[cfg(feature = "wgpu")]
#[test]
fn wgpu_training_prints_the_cpu_losses_and_its_checkpoint_resumes_on_the_cpu() {
    let close = |a: &[String], b: &[String], what: &str| {
        let (a, b) = (loss_values(a), loss_values(b));
        assert_eq!(a.len(), b.len(), "{what}: {a:?} vs {b:?}");
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!((x - y).abs() < 2e-4, "{what}: step {} loss {x} on wgpu, {y} on the CPU ({a:?} vs {b:?})", i + 1);
        }
    };
    for (layout, world) in
        [("--tp 2 --sequence-parallel --loss-chunk 24 --clip-grad 0.5", 2), ("--pp 2 --dp 2 --microbatches 2 --zero 1 --recompute selective", 4)]
    {
        let base = format!("{TINY} --steps 3 --layers 2 {layout}");
        let cpu = losses(&base);
        assert_eq!(cpu.len(), 3, "{layout}: {cpu:?}");
        let o = run(&format!("{base} --device wgpu"));
        assert!(o.status.success(), "--device wgpu {layout} failed:\n{}", text(&o));
        let out = String::from_utf8_lossy(&o.stdout);
        close(&step_lines(&out), &cpu, layout);
        // The memory table: each rank's device bytes after the last step against the predicted
        // parameters + optimizer state (MB, 2 decimals).
        let rows: Vec<Vec<f64>> = out
            .lines()
            .filter(|l| l.starts_with("| ") && !l.starts_with("| rank"))
            .map(|l| l.split('|').filter_map(|c| c.trim().parse().ok()).collect())
            .collect();
        assert_eq!(rows.len(), world, "{layout}: one row per rank:\n{out}");
        for r in &rows {
            let (state, measured) = (r[r.len() - 2], r[r.len() - 1]);
            assert!((measured - state).abs() <= 0.1 * state + 0.01, "{layout}: rank {} holds {measured} MB after the last step, predicted {state}", r[0]);
        }
    }
    let dir = fresh("wgpu-to-cpu");
    let base = format!("{TINY} --steps 4 --layers 2 --tp 2 --dropout 0.1");
    let whole = losses(&base);
    let first = losses(&format!("{base} --device wgpu --exit-at-step 2 --save-dir {}", dir.display()));
    let rest = losses(&format!("{base} --resume latest --save-dir {}", dir.display()));
    close(&[first, rest].concat(), &whole, "saved on wgpu, resumed on the CPU");
    std::fs::remove_dir_all(dir).unwrap();
}
