//! Multi-process: the TCP rendezvous across real processes on loopback (all arrive; one never
//! arrives; garbage on the port; a duplicate rank) and the launcher's failure propagation.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_burn-parallel");

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn rank(r: usize, world: usize, port: u16, timeout_secs: u64) -> std::process::Child {
    Command::new(BIN)
        .arg("rendezvous-check")
        .env("RANK", r.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env("BURN_PARALLEL_TIMEOUT_SECS", timeout_secs.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[test]
fn four_processes_rendezvous_through_the_launcher() {
    let port = free_port();
    let out = Command::new(BIN)
        .args(["launch", "--nproc-per-node", "4", "--master-port", &port.to_string(), "--", BIN, "rendezvous-check"])
        .env("BURN_PARALLEL_TIMEOUT_SECS", "30")
        .output()
        .unwrap();
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    for r in 0..4 {
        assert!(t.contains(&format!("[rank {r}] rank {r} of 4 got id-of-a-world-of-4")), "{t}");
    }
}

#[test]
fn a_rank_that_never_arrives_times_out_with_its_number() {
    let port = free_port();
    let start = Instant::now();
    let children: Vec<_> = (0..3).map(|r| rank(r, 4, port, 2)).collect();
    let outs: Vec<Output> = children.into_iter().map(|c| c.wait_with_output().unwrap()).collect();
    assert!(start.elapsed() < Duration::from_secs(20));
    assert_eq!(outs[0].status.code(), Some(3));
    assert!(text(&outs[0]).contains("ranks [3] never arrived"), "{}", text(&outs[0]));
    for o in &outs[1..] {
        assert_eq!(o.status.code(), Some(3));
        assert!(text(o).contains("rejected by rank 0") && text(o).contains("ranks [3] never arrived"), "{}", text(o));
    }
}

/// Rank 0 listens on every interface: a rank that reaches it by another of its addresses
/// (127.0.0.2, where rank 0's MASTER_ADDR says 127.0.0.1) still joins. Rank 0's timeout is too
/// large for `Instant`: no overflow panic.
#[test]
fn rank_0_is_reachable_by_any_of_its_addresses() {
    let port = free_port();
    let spawn = |r: usize, addr: &str, timeout: &str| {
        Command::new(BIN)
            .arg("rendezvous-check")
            .env("RANK", r.to_string())
            .env("WORLD_SIZE", "2")
            .env("MASTER_ADDR", addr)
            .env("MASTER_PORT", port.to_string())
            .env("BURN_PARALLEL_TIMEOUT_SECS", timeout)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut r0 = spawn(0, "127.0.0.1", &u64::MAX.to_string());
    let o1 = spawn(1, "127.0.0.2", "10").wait_with_output().unwrap();
    if !o1.status.success() {
        let _ = r0.kill();
    }
    let o0 = r0.wait_with_output().unwrap();
    assert!(o1.status.success() && text(&o1).contains("rank 1 of 2 got id-of-a-world-of-2"), "{}\n{}", text(&o0), text(&o1));
    assert!(o0.status.success(), "{}", text(&o0));
}

/// A raw connection to rank 0's rendezvous port, once it listens (within 10 s).
fn connect_to_rank_0(port: u16) -> TcpStream {
    let start = Instant::now();
    loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => return s,
            Err(_) if start.elapsed() < Duration::from_secs(10) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("rank 0 never listened: {e}"),
        }
    }
}

#[test]
fn garbage_on_the_port_is_rejected_and_does_not_count() {
    let port = free_port();
    let r0 = rank(0, 2, port, 20);
    let mut garbage = connect_to_rank_0(port);
    garbage.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    drop(garbage);
    let r1 = rank(1, 2, port, 20);
    let (o0, o1) = (r0.wait_with_output().unwrap(), r1.wait_with_output().unwrap());
    assert!(o0.status.success() && o1.status.success(), "{}\n{}", text(&o0), text(&o1));
    assert!(text(&o1).contains("rank 1 of 2 got id-of-a-world-of-2"));
    assert!(text(&o0).contains("rejected a connection"), "rank 0 logs the garbage: {}", text(&o0));
}

/// A connection that trickles its hello (a byte every 2 s, each read in time) is dropped 5 s
/// after it connected, not when its last byte would come (48 s): rank 1 then joins.
#[test]
fn a_trickling_connection_cannot_hold_rank_0() {
    let port = free_port();
    let r0 = rank(0, 2, port, 60);
    let start = Instant::now();
    let mut slow = connect_to_rank_0(port);
    let trickle = std::thread::spawn(move || {
        for b in b"BURNPAR1".iter().chain(&[2, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0]) {
            if slow.write_all(&[*b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_secs(2));
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    let r1 = rank(1, 2, port, 60);
    let (o0, o1) = (r0.wait_with_output().unwrap(), r1.wait_with_output().unwrap());
    assert!(o0.status.success() && o1.status.success(), "{}\n{}", text(&o0), text(&o1));
    assert!(start.elapsed() < Duration::from_secs(20), "rank 0 took {:?}", start.elapsed());
    assert!(text(&o0).contains("no complete hello in time"), "{}", text(&o0));
    trickle.join().unwrap();
}

#[test]
fn duplicate_rank_and_wrong_world_size_are_clear_errors() {
    let port = free_port();
    let r0 = rank(0, 3, port, 20);
    let a = rank(1, 3, port, 20);
    std::thread::sleep(Duration::from_millis(300));
    let b = rank(1, 3, port, 20);
    let outs = [r0.wait_with_output().unwrap(), a.wait_with_output().unwrap(), b.wait_with_output().unwrap()];
    assert!(text(&outs[0]).contains("rank 1 joined twice"), "{}", text(&outs[0]));
    assert!(outs.iter().all(|o| o.status.code() == Some(3)));
    let port = free_port();
    let r0 = rank(0, 2, port, 20);
    let bad = rank(1, 5, port, 20);
    let (o0, o1) = (r0.wait_with_output().unwrap(), bad.wait_with_output().unwrap());
    assert!(text(&o0).contains("rank 1 says world size 5, but rank 0 has world size 2"), "{}", text(&o0));
    assert!(text(&o1).contains("rank 1 says world size 5"), "{}", text(&o1));
}

/// Two jobs given one port: a rank of the other job is turned away with both ids named, and
/// does not count; rank 0 goes on to meet its own rank 1.
#[test]
fn a_rank_of_another_job_is_turned_away_and_does_not_count() {
    let port = free_port();
    let with_job = |r: usize, job: &str| {
        let mut c = Command::new(BIN);
        c.arg("rendezvous-check").env("RANK", r.to_string()).env("WORLD_SIZE", "2").env("MASTER_ADDR", "127.0.0.1");
        c.env("MASTER_PORT", port.to_string()).env("BURN_PARALLEL_TIMEOUT_SECS", "20").env("BURN_PARALLEL_JOB_ID", job);
        c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
    };
    let r0 = with_job(0, "job-a");
    let stranger = with_job(1, "job-b").wait_with_output().unwrap();
    let t = text(&stranger);
    assert_eq!(stranger.status.code(), Some(3), "{t}");
    assert!(t.contains(r#"serves job "job-a", but this process (rank 1) is of job "job-b""#), "{t}");
    let (o1, o0) = (with_job(1, "job-a").wait_with_output().unwrap(), r0.wait_with_output().unwrap());
    assert!(o0.status.success() && o1.status.success(), "{}\n{}", text(&o0), text(&o1));
    assert!(text(&o0).contains("turned away a rank of another job"), "{}", text(&o0));
}

/// The launcher hands its ranks one job id: `--job-id`, else a fresh one (one node).
#[test]
fn the_launcher_gives_every_rank_the_same_job_id() {
    let ids = |extra: &[&str]| {
        let mut args = vec!["launch", "--nproc-per-node", "2"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--", "sh", "-c", r#"echo "id=$BURN_PARALLEL_JOB_ID""#]);
        let out =
            Command::new(BIN).args(&args).env_remove("BURN_PARALLEL_JOB_ID").env_remove("TORCHELASTIC_RUN_ID").env_remove("SLURM_JOB_ID").output().unwrap();
        assert!(out.status.success(), "{}", text(&out));
        let t = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut ids: Vec<String> = t.lines().filter_map(|l| l.split_once("id=")).map(|(_, id)| id.to_string()).collect();
        ids.dedup();
        assert_eq!(ids.len(), 1, "one id for both ranks: {t}");
        ids.pop().unwrap()
    };
    assert_eq!(ids(&["--job-id", "run-7"]), "run-7");
    let (a, b) = (ids(&[]), ids(&[]));
    assert!(a.starts_with("launch-") && b.starts_with("launch-") && a != b, "{a} {b}");
}

#[test]
fn the_launcher_stops_everyone_and_returns_the_failing_code() {
    let start = Instant::now();
    let script = r#"if [ "$RANK" = 1 ]; then echo boom; exit 7; fi; echo "up $RANK of $WORLD_SIZE local $LOCAL_RANK"; sleep 30"#;
    let out = Command::new(BIN).args(["launch", "--nproc-per-node", "3", "--", "sh", "-c", script]).output().unwrap();
    assert_eq!(out.status.code(), Some(7), "{}", text(&out));
    assert!(start.elapsed() < Duration::from_secs(20), "the others were not stopped");
    let t = text(&out);
    assert!(t.contains("[rank 1] boom") && t.contains("rank 1 failed with exit code 7"), "{t}");
    let out = Command::new(BIN).args(["launch", "--nproc-per-node", "2", "--", "sh", "-c", "echo ok $RANK"]).output().unwrap();
    assert!(out.status.success() && text(&out).contains("[rank 1] ok 1"));
}

/// `--max-restarts`: a failure stops every rank and starts them all again, with
/// TORCHELASTIC_RESTART_COUNT counting the starts; a job that keeps failing ends with its code
/// once no restart is left; a stop signal is never followed by a restart.
#[test]
fn max_restarts_starts_every_rank_again_until_none_is_left() {
    let dir = std::env::temp_dir().join(format!("bp-restarts-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("starts");
    // Rank 1 fails on the first start only (once every rank started); the others would wait.
    let script = format!(
        r#"echo "$RANK:$TORCHELASTIC_RESTART_COUNT:$TORCHELASTIC_MAX_RESTARTS" >> {0}; if [ "$TORCHELASTIC_RESTART_COUNT" = 0 ]; then if [ "$RANK" = 1 ]; then while [ "$(grep -c ':0:' {0})" -lt 3 ]; do sleep 0.05; done; exit 3; fi; sleep 30; fi; echo "done $RANK""#,
        log.display()
    );
    let start = Instant::now();
    let out = Command::new(BIN).args(["launch", "--nproc-per-node", "3", "--max-restarts", "2", "--", "sh", "-c", &script]).output().unwrap();
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(start.elapsed() < Duration::from_secs(20), "the first start was not stopped");
    assert!(t.contains("rank 1 failed with exit code 3; starting every rank again (restart 1 of 2)") && t.contains("[rank 2] done 2"), "{t}");
    let mut starts: Vec<String> = std::fs::read_to_string(&log).unwrap().lines().map(String::from).collect();
    starts.sort();
    assert_eq!(starts, ["0:0:2", "0:1:2", "1:0:2", "1:1:2", "2:0:2", "2:1:2"]);
    // Always failing: 1 + 2 starts, then its code.
    std::fs::remove_file(&log).unwrap();
    let always = format!(r#"echo "$RANK:$TORCHELASTIC_RESTART_COUNT" >> {}; exit 5"#, log.display());
    let out = Command::new(BIN).args(["launch", "--nproc-per-node", "1", "--max-restarts", "2", "--", "sh", "-c", &always]).output().unwrap();
    assert_eq!(out.status.code(), Some(5), "{}", text(&out));
    assert!(text(&out).contains("no restart is left (2 done)"), "{}", text(&out));
    assert_eq!(std::fs::read_to_string(&log).unwrap().lines().count(), 3);
    // A stop signal (here during the pause before the first restart) ends the job, 128 + 15.
    std::fs::remove_file(&log).unwrap();
    let launcher =
        Command::new(BIN).args(["launch", "--nproc-per-node", "1", "--max-restarts", "2", "--", "sh", "-c", &always]).stderr(Stdio::piped()).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    Command::new("kill").args(["-TERM", &launcher.id().to_string()]).status().unwrap();
    let out = launcher.wait_with_output().unwrap();
    let starts = std::fs::read_to_string(&log).map(|t| t.lines().count()).unwrap_or(0);
    assert_eq!((out.status.code(), starts <= 1), (Some(128 + 15), true), "{} starts; {}", starts, String::from_utf8_lossy(&out.stderr));
    // Without --max-restarts, the first failure ends the job.
    let _ = std::fs::remove_file(&log);
    let out = Command::new(BIN).args(["launch", "--nproc-per-node", "1", "--", "sh", "-c", &always]).output().unwrap();
    assert_eq!((out.status.code(), std::fs::read_to_string(&log).unwrap().lines().count()), (Some(5), 1));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A failed rank's background processes die with it (they held its output pipes open, and the
/// launcher waited for them), and so do a finished rank's; output that is not UTF-8 is shown
/// lossily instead of closing the pipe (the rank died of SIGPIPE on its next write).
#[test]
fn leftovers_of_a_rank_are_stopped_and_odd_bytes_are_forwarded() {
    let start = Instant::now();
    let script = r#"if [ "$RANK" = 1 ]; then sleep 30 & exit 7; fi; sleep 30"#;
    let out = Command::new(BIN).args(["launch", "--nproc-per-node", "2", "--", "sh", "-c", script]).output().unwrap();
    assert_eq!(out.status.code(), Some(7), "{}", text(&out));
    assert!(start.elapsed() < Duration::from_secs(10), "waited {:?} for the failed rank's background sleep", start.elapsed());
    let start = Instant::now();
    let out = Command::new(BIN).args(["launch", "--nproc-per-node", "1", "--", "sh", "-c", "sleep 30 & echo done"]).output().unwrap();
    assert!(out.status.success() && start.elapsed() < Duration::from_secs(10), "{:?}: {}", start.elapsed(), text(&out));
    let script = r#"printf 'odd \377 byte\n'; sleep 0.2; echo after"#;
    let out = Command::new(BIN).args(["launch", "--nproc-per-node", "1", "--", "sh", "-c", script]).output().unwrap();
    let t = text(&out);
    assert!(out.status.success() && t.contains("[rank 0] odd \u{FFFD} byte") && t.contains("[rank 0] after"), "{t:?}");
}

/// Waits (10 s at most) until ranks 0 and 1 wrote `dir/NAME.0` and `dir/NAME.1`.
fn wait_for_ranks(dir: &std::path::Path, name: &str) {
    let start = Instant::now();
    while !(dir.join(format!("{name}.0")).exists() && dir.join(format!("{name}.1")).exists()) {
        assert!(start.elapsed() < Duration::from_secs(10), "ranks never started");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_signal_to_the_launcher_stops_every_rank() {
    let dir = std::env::temp_dir().join(format!("bp-launch-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let script = format!("echo $$ > {}/pid.$RANK; sleep 60", dir.display());
    let mut launcher = Command::new(BIN).args(["launch", "--nproc-per-node", "2", "--", "sh", "-c", &script]).stdout(Stdio::null()).spawn().unwrap();
    wait_for_ranks(&dir, "pid");
    std::thread::sleep(Duration::from_millis(100));
    Command::new("kill").args(["-TERM", &launcher.id().to_string()]).status().unwrap();
    let status = launcher.wait().unwrap();
    assert_eq!(status.code(), Some(128 + 15));
    for r in 0..2 {
        let pid = std::fs::read_to_string(dir.join(format!("pid.{r}"))).unwrap();
        let alive = Command::new("kill").args(["-0", pid.trim()]).stderr(Stdio::null()).status().unwrap().success();
        assert!(!alive, "rank {r} (pid {}) still running", pid.trim());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A stop signal is passed on to the ranks, which get the grace period to finish (save a
/// checkpoint) before they are killed; one that ignores it is killed when the grace ends.
#[test]
fn a_signal_to_the_launcher_gives_the_ranks_their_grace_period() {
    let dir = std::env::temp_dir().join(format!("bp-launch-grace-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let script = format!(
        r#"if [ "$RANK" = 0 ]; then trap 'sleep 0.3; echo saved; exit 0' TERM; else trap '' TERM; fi; echo up > {}/up.$RANK; while true; do sleep 0.05; done"#,
        dir.display()
    );
    let args = ["launch", "--nproc-per-node", "2", "--stop-grace-secs", "2", "--", "sh", "-c", &script];
    let launcher = Command::new(BIN).args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    wait_for_ranks(&dir, "up");
    let signalled = Instant::now();
    Command::new("kill").args(["-TERM", &launcher.id().to_string()]).status().unwrap();
    let out = launcher.wait_with_output().unwrap();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(128 + 15), "{t}");
    assert!(t.contains("[rank 0] saved"), "rank 0 finished its save in the grace period: {t}");
    let waited = signalled.elapsed();
    assert!(waited >= Duration::from_secs(2) && waited < Duration::from_secs(8), "rank 1 ignores SIGTERM: killed after the grace, waited {waited:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// After a stop signal: every rank exiting 0 (a clean, saved stop) makes the launcher exit 0;
/// a second Ctrl-C ends the grace period at once, a repeated SIGTERM or SIGHUP does not.
#[test]
fn a_clean_stop_exits_0_and_a_second_signal_ends_the_grace() {
    let dir = std::env::temp_dir().join(format!("bp-launch-stop-{}", std::process::id()));
    let run = |trap: &str, signals: &[&str]| {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let script = format!("trap '{trap}' TERM HUP INT; echo up > {}/up.$RANK; while true; do sleep 0.05; done", dir.display());
        let args = ["launch", "--nproc-per-node", "2", "--stop-grace-secs", "30", "--", "sh", "-c", &script];
        let mut launcher = Command::new(BIN).args(args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        wait_for_ranks(&dir, "up");
        let signalled = Instant::now();
        for sig in signals {
            Command::new("kill").args([*sig, &launcher.id().to_string()]).status().unwrap();
            std::thread::sleep(Duration::from_millis(300));
        }
        (launcher.wait().unwrap().code(), signalled.elapsed())
    };
    let (code, _) = run("exit 0", &["-TERM"]);
    assert_eq!(code, Some(0), "every rank stopped cleanly");
    // A repeated SIGTERM (a script and a scheduler both send one) leaves the grace running.
    let (code, waited) = run("sleep 1; exit 0", &["-TERM", "-TERM", "-HUP"]);
    assert!(code == Some(0) && waited >= Duration::from_secs(1), "{code:?} after {waited:?}");
    let (code, waited) = run("", &["-INT", "-INT"]);
    assert_eq!(code, Some(128 + 2));
    assert!(waited < Duration::from_secs(10), "the second Ctrl-C ended the 30 s grace: {waited:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `burn-parallel memory --attention`: chunked and fused drop the `s²` terms from the table;
/// a bad name or an attention without dropout under `--dropout` is a clear error.
#[test]
fn the_memory_command_takes_the_attention_core() {
    let table = |extra: &[&str]| {
        let mut args = vec!["memory", "--d-model", "64", "--heads", "4", "--layers", "2", "--seq-len", "512", "--batch-size", "2", "--vocab", "128"];
        args.extend_from_slice(extra);
        Command::new(BIN).args(&args).output().unwrap()
    };
    let peak = |o: &Output| -> String { text(o).lines().rfind(|l| l.contains('|')).unwrap_or_default().to_string() };
    let (composed, chunked, fused) = (table(&[]), table(&["--attention", "chunked:64"]), table(&["--attention", "fused"]));
    for o in [&composed, &chunked, &fused] {
        assert!(o.status.success(), "{}", text(o));
    }
    assert!(text(&chunked).contains("Chunked(64)") && text(&fused).contains("Fused"), "{}", text(&chunked));
    assert_ne!(peak(&composed), peak(&chunked), "chunked attention changes the table");
    let bad = table(&["--attention", "chunked:0"]);
    assert!(!bad.status.success() && text(&bad).contains("unknown attention kernel \"chunked:0\""), "{}", text(&bad));
    let drop = table(&["--attention", "chunked", "--dropout"]);
    assert!(!drop.status.success() && text(&drop).contains("--attention chunked:256 has no dropout"), "{}", text(&drop));
    // Without a pipeline, micro-batches are gradient accumulation: a quarter of the activations.
    let accumulated = table(&["--microbatches", "2"]);
    assert!(accumulated.status.success(), "{}", text(&accumulated));
    let activations = |o: &Output| peak(o).split('|').nth(5).and_then(|c| c.split_whitespace().next()?.parse::<f64>().ok()).unwrap();
    let (one, two) = (activations(&composed), activations(&accumulated));
    assert!((two / one - 0.5).abs() < 0.01, "activations {one} MB in one micro-batch, {two} MB in two");
    // Tied embeddings: the parameters column loses the head's 64 × 128 f32 weights (the table
    // rounds to 0.01 MB).
    // A Llama-style block: RMS norms without β, no wpe, no biases, a gate, half the key/value
    // heads: other parameters (checked against the model's count in tests/memory.rs).
    let llama = table(&["--norm", "rms-norm", "--position", "rope", "--no-bias", "--activation", "swiglu", "--kv-heads", "2"]);
    assert!(llama.status.success() && peak(&llama) != peak(&composed), "{}", text(&llama));
    let tied = table(&["--tie-embeddings"]);
    assert!(tied.status.success(), "{}", text(&tied));
    let params = |o: &Output| peak(o).split('|').nth(2).and_then(|c| c.split_whitespace().next()?.parse::<f64>().ok()).unwrap();
    assert!((params(&composed) - params(&tied) - 64.0 * 128.0 * 4.0 / 1e6).abs() < 0.011, "{} vs {}", text(&composed), text(&tied));
}

/// `burn-parallel memory --model`: Llama 3.1 8B's shape (vocabulary 128256 padded to 129024 at
/// tp 8 as gpt_pretrain pads it, context 8192, 8 key/value heads, the loss in chunks of 1024
/// rows) with explicit flags over it; bf16 parameters of 8.03B over tp 8 × pp 4 are about 0.5
/// GB per rank; switches a model sets can be turned off; an unknown name lists the choices.
#[test]
fn the_memory_command_takes_a_named_model() {
    let run = |extra: &[&str]| Command::new(BIN).args(["memory", "--model", "llama3.1-8b"]).args(extra).output().unwrap();
    let o = run(&["--tp", "8", "--pp", "4", "--precision", "bf16", "--attention", "fused"]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("vocab: 129024, seq: 8192, hidden: 4096, heads: 32, layers: 32, ffn: 14336, tied_embeddings: false, activation: SwiGlu"), "{out}");
    assert!(out.contains("kv_heads: Some(8)") && out.contains("microbatch: 1, microbatches: 8") && out.contains("loss_chunk: Some(1024)"), "{out}");
    // bf16 parameters: 2 B × 8.03B / (tp 8 × pp 4), the first and last stages holding the
    // embedding and the head.
    let params: Vec<f64> =
        out.lines().filter(|l| l.starts_with("| ") && !l.starts_with("| pp")).map(|l| l.split('|').nth(2).unwrap().trim().parse().unwrap()).collect();
    let total: f64 = params.iter().sum::<f64>() * 8.0 * 1e6;
    assert!((total / (2.0 * 8_030_261_248.0) - 1.0).abs() < 0.01, "{params:?}: {total} B");
    let o = run(&["--seq-len", "2048", "--kv-heads", "4", "--batch-size", "2", "--loss-chunk", "0", "--vocab", "1000"]);
    let out = text(&o);
    assert!(o.status.success() && out.contains("vocab: 1000, seq: 2048") && out.contains("kv_heads: Some(4)") && out.contains("microbatch: 2"), "{out}");
    assert!(out.contains("loss_chunk: None") && out.contains("no_bias: true"), "{out}");
    let o = Command::new(BIN).args(["memory", "--model", "llama3.2-1b", "--tie-embeddings", "false", "--no-bias", "false"]).output().unwrap();
    assert!(o.status.success() && text(&o).contains("tied_embeddings: false") && text(&o).contains("no_bias: false"), "{}", text(&o));
    let o = Command::new(BIN).args(["memory", "--model", "llama3.2-1b"]).output().unwrap();
    assert!(o.status.success() && text(&o).contains("tied_embeddings: true"), "{}", text(&o));
    let o = Command::new(BIN).args(["memory", "--model", "gpt-5"]).output().unwrap();
    assert!(!o.status.success() && text(&o).contains("unknown model \"gpt-5\" (choose tiny"), "{}", text(&o));
}

/// `burn-parallel memory` takes the example's pipeline defaults: 2 × pp micro-batches, and two
/// chunks per rank for the interleaved schedule.
#[test]
fn the_memory_command_takes_the_examples_pipeline_defaults() {
    let args =
        ["memory", "--d-model", "64", "--heads", "4", "--layers", "4", "--vocab", "128", "--batch-size", "8", "--pp", "2", "--schedule", "interleaved-1f1b"];
    let o = Command::new(BIN).args(args).output().unwrap();
    assert!(o.status.success() && text(&o).contains("virtual_stages: 2") && text(&o).contains("microbatches: 4"), "{}", text(&o));
}

/// `burn-parallel memory` with a degree of 0, heads that tp does not divide, an empty batch or
/// sequence, or micro-batches that do not divide the batch: one line with the numbers, never a panic (a
/// division by zero inside the model) nor a table of an impossible run.
#[test]
fn the_memory_command_refuses_impossible_layouts() {
    let run = |extra: &[&str]| {
        let mut args = vec!["memory", "--d-model", "64", "--heads", "4", "--layers", "2", "--vocab", "128"];
        for (flag, value) in [("--batch-size", "2"), ("--seq-len", "16")] {
            if !extra.contains(&flag) {
                args.extend_from_slice(&[flag, value]);
            }
        }
        args.extend_from_slice(extra);
        Command::new(BIN).args(&args).output().unwrap()
    };
    for (extra, says) in [
        (&["--tp", "0"][..], "tensor_parallel"),
        (&["--tp", "3"][..], "attention heads = 4 is not divisible by tensor_parallel = 3"),
        (&["--pp", "0"][..], "pipeline_parallel"),
        (&["--dp", "0"][..], "data_parallel"),
        (&["--batch-size", "0"][..], "a step needs at least one sample"),
        (&["--seq-len", "0"][..], "sequence length must be at least 1 (got 0)"),
        (&["--d-ff", "0"][..], "ffn size must be at least 1 (got 0)"),
        (&["--microbatches", "3"][..], "--batch-size 2 is not divisible by --microbatches 3"),
        (&["--virtual-stages", "2"][..], "--virtual-stages splits a pipeline: it needs --pp 2 or more"),
        (&["--kv-heads", "3"][..], "3 key/value heads must divide 4 attention heads"),
        (&["--kv-heads", "2", "--tp", "4"][..], "be divisible by tensor_parallel = 4"),
        (&["--norm", "batch-norm"][..], "unknown norm \"batch-norm\" (choose layer-norm or rms-norm)"),
    ] {
        let o = run(extra);
        let t = text(&o);
        assert!(!o.status.success() && t.contains(says) && !t.contains("panicked"), "{extra:?}: {t}");
    }
}
