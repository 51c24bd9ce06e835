//! The example's tests, with real processes: this test binary runs `main_result` in child
//! processes of itself (the ignored test `child_process`), so runs can be killed with SIGKILL or
//! SIGTERM at any moment, or limited in the file size they may write.
//!
//! - `checkpoints.rs`: a run of 2N steps prints the same losses, bit for bit, as N steps +
//!   `--resume` for N more (dropout on; tp, dp, pp, SP, accumulation); SIGKILL at each phase of
//!   the commit protocol and at random moments leaves the newest committed checkpoint loadable;
//!   a failing write stops training and keeps the previous checkpoint; SIGTERM and
//!   `--time-limit-mins` stop every rank after one step and save it; a diverging run stops
//!   before a NaN reaches the weights; bad checkpoint flags; `--export` + `--init-from`.
//! - `processes.rs`: one process per rank over TCP (`--comm tcp`): the thread ranks' losses bit
//!   for bit, their checkpoint resumed on threads, a killed rank process named by the others at
//!   once, SIGTERM to one rank process stopping every rank after the same step.
//! - `data.rs`: blended shards (`--shards W:DIR,W:DIR`).
//! - `runs.rs`: flags and presets, bad numbers, fused optimizer updates, chunked attention,
//!   gradient accumulation, `--metrics`, model FLOPs, and `--device wgpu` against the CPU.
//! - `timers.rs`: `--timers` and `--trace` (threads and TCP processes), losses unchanged.

mod checkpoints;
mod context;
mod data;
mod processes;
mod runs;
mod timers;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use burn_parallel::checkpoint::{latest_checkpoint, Checkpoint};

use super::{main_result, Args};

const CHILD_ENV: &str = "GPT_PRETRAIN_TEST_CHILD_ARGS";

const TINY: &str = "--d-model 32 --heads 4 --seq-len 16 --batch-size 4 --eval-batches 1 --sample-tokens 4 --eval-every 0 --print-every 1";

/// Runs `main_result` with the flags in the environment (in a child process of the tests).
#[test]
#[ignore = "the child process of the tests below (runs only with their environment)"]
fn child_process() {
    let Ok(flags) = std::env::var(CHILD_ENV) else { return };
    let args =
        Args::parse_with_presets(std::iter::once("gpt_pretrain".to_string()).chain(flags.split_whitespace().map(String::from))).unwrap_or_else(|e| e.exit());
    let code = match super::init_logging(&args).and_then(|guard| main_result(&args).map(|()| drop(guard))) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    };
    std::process::exit(code);
}

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

fn error_of(flags: &str) -> String {
    let args = Args::parse_with_presets(std::iter::once("gpt_pretrain".to_string()).chain(flags.split_whitespace().map(String::from))).unwrap();
    main_result(&args).expect_err("must fail")
}

fn parse_error(flags: &str) -> String {
    let argv = std::iter::once("gpt_pretrain".to_string()).chain(flags.split_whitespace().map(String::from));
    Args::parse_with_presets(argv).expect_err("must not parse").to_string()
}

/// The loss of each `step N loss L` line.
fn loss_values(lines: &[String]) -> Vec<f32> {
    lines.iter().map(|l| l.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no loss in {l:?}"))).collect()
}
