//! One process per rank over TCP (`--comm tcp`), started as `burn-parallel launch` would (the
//! torchrun variables): the thread ranks' losses bit for bit, a checkpoint the processes write
//! resumes on threads, a killed rank process is named by the others at once (no hang),
//! SIGTERM to one rank's process alone stops every rank after the same step, saved, and a job
//! of two launchers (two nodes) restarted after a SIGKILL goes on from its newest checkpoint.

use std::io::Read;
use std::process::ExitStatus;
use std::thread::JoinHandle;
use std::time::Instant;

use super::*;

/// A free loopback port (for a job's rendezvous).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Starts the `n` rank processes of one `--comm tcp` job.
pub(super) fn ranks(n: usize, flags: &str) -> Vec<Child> {
    ranks_with(n, |_| flags.to_string())
}

/// Starts the `n` rank processes of one `--comm tcp` job, rank `r` with `flags(r)`.
fn ranks_with(n: usize, flags: impl Fn(usize) -> String) -> Vec<Child> {
    let port = free_port();
    (0..n)
        .map(|r| {
            child(&format!("{} --comm tcp", flags(r)))
                .env("RANK", r.to_string())
                .env("WORLD_SIZE", n.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect()
}

/// Reads a pipe to its end in a thread (a rank blocked on a full pipe would stall the job).
fn drain(pipe: Option<impl Read + Send + 'static>) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_string(&mut s);
        }
        s
    })
}

/// Waits for every rank: (exit status, stdout, stderr) each; what was already taken from a
/// pipe is not in it.
pub(super) fn finish(procs: Vec<Child>) -> Vec<(ExitStatus, String, String)> {
    let pipes: Vec<_> = procs.into_iter().map(|mut c| (drain(c.stdout.take()), drain(c.stderr.take()), c)).collect();
    pipes.into_iter().map(|(o, e, mut c)| (c.wait().unwrap(), o.join().unwrap(), e.join().unwrap())).collect()
}

/// Reads rank 0's stdout until its `step N loss` line; the lines read, and the rest in a thread.
fn until_step(c: &mut Child, step: usize) -> (Vec<String>, JoinHandle<String>) {
    let mut reader = BufReader::new(c.stdout.take().unwrap());
    let mut seen = Vec::new();
    let mut line = String::new();
    while reader.read_line(&mut line).unwrap() > 0 {
        seen.push(line.trim_end().to_string());
        line.clear();
        if seen.last().unwrap().contains(&format!("step {step} loss")) {
            return (seen, drain(Some(reader)));
        }
    }
    panic!("rank 0 never printed step {step}:\n{}", seen.join("\n"));
}

#[test]
fn tcp_rank_processes_print_the_thread_ranks_losses_and_their_checkpoint_resumes_on_threads() {
    for layout in ["--dp 2 --tp 2 --dropout 0.1", "--pp 2 --tp 2 --microbatches 4 --sequence-parallel"] {
        let base = format!("{TINY} --layers 2 --steps 6 {layout}");
        let whole = losses(&base);
        let dir = fresh("tcp");
        let out = finish(ranks(4, &format!("{base} --exit-at-step 3 --save-dir {}", dir.display())));
        for (rank, (status, stdout, stderr)) in out.iter().enumerate() {
            assert!(status.success(), "{layout}: rank {rank}: {status:?}\n{stdout}\n{stderr}");
        }
        assert_eq!(step_lines(&out[0].1), whole[..3], "{layout}: processes and threads differ");
        assert!(out[1..].iter().all(|o| step_lines(&o.1).is_empty()), "{layout}: only rank 0 prints the losses");
        assert!(out[3].1.contains("| 3 | "), "{layout}: each process prints its memory row:\n{}", out[3].1);
        assert_eq!(latest_step(&dir), Some(3), "{layout}");
        let rest = losses(&format!("{base} --resume latest --save-dir {}", dir.display()));
        assert_eq!(rest, whole[3..], "{layout}: the processes' checkpoint resumed on threads differs");
        std::fs::remove_dir_all(dir).unwrap();
    }
}

#[test]
fn a_killed_rank_process_is_named_by_the_others_at_once_and_the_last_checkpoint_resumes() {
    // Far more steps than run before the kill lands (the schedule spans them all).
    let base = format!("{TINY} --layers 2 --steps 1000000 --dp 2 --tp 2");
    let dir = fresh("tcp-kill");
    let mut procs = ranks(4, &format!("{base} --save-every 2 --timeout-secs 600 --save-dir {}", dir.display()));
    let (_, rest0) = until_step(&mut procs[0], 5);
    let killed = Instant::now();
    kill(&mut procs[2]);
    let out = finish(procs);
    let _ = rest0.join();
    assert!(killed.elapsed() < Duration::from_secs(60), "the other ranks took {:?} (a hang?)", killed.elapsed());
    for rank in [0, 1, 3] {
        let (status, _, stderr) = &out[rank];
        assert!(!status.success(), "rank {rank} exited 0 without rank 2");
        // Each names rank 2, directly or as the cause of the rank it waited for.
        let named = stderr.find("rank 2 is gone: its connection").map(|at| &stderr[at..]);
        assert!(named.is_some_and(|t| t.contains("(the process exited or was killed)")), "rank {rank}:\n{stderr}");
    }
    let step = latest_step(&dir).expect("a checkpoint") as usize;
    assert!(step >= 4, "latest is step {step}");
    let end = format!("--exit-at-step {}", step + 2);
    let resumed = losses(&format!("{base} {end} --resume latest --save-dir {}", dir.display()));
    assert_eq!(resumed, losses(&format!("{base} {end}"))[step..], "the last checkpoint before the kill resumes the uninterrupted run");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn sigterm_to_one_rank_process_stops_every_rank_after_the_same_step() {
    let base = format!("{TINY} --layers 2 --steps 1000000 --dp 2 --tp 2 --dropout 0.1");
    let dir = fresh("tcp-term");
    let mut procs = ranks(4, &format!("{base} --save-dir {}", dir.display()));
    let (_, rest0) = until_step(&mut procs[0], 3);
    Command::new("kill").args(["-TERM", &procs[3].id().to_string()]).status().unwrap();
    let out = finish(procs);
    let rest0 = rest0.join().unwrap();
    let said = |rank: usize| if rank == 0 { rest0.clone() } else { out[rank].1.clone() };
    let mut steps = Vec::new();
    for (rank, (status, _, stderr)) in out.iter().enumerate() {
        assert!(status.success(), "rank {rank}: {status:?}\n{}\n{stderr}", said(rank));
        let text = said(rank);
        let at = text.find("stopped by signal 15 after step ").unwrap_or_else(|| panic!("rank {rank}: {text}"));
        steps.push(text[at..].split_whitespace().nth(6).and_then(|n| n.parse::<usize>().ok()).unwrap());
    }
    assert!(steps.iter().all(|s| *s == steps[0] && *s >= 3), "every rank stops after the same step: {steps:?}");
    let step = steps[0];
    assert_eq!(latest_step(&dir), Some(step as u64));
    let end = format!("--exit-at-step {}", step + 2);
    let resumed = losses(&format!("{base} {end} --resume latest --save-dir {}", dir.display()));
    assert_eq!(resumed, losses(&format!("{base} {end}"))[step..]);
    std::fs::remove_dir_all(dir).unwrap();
}

/// Rank processes that found different checkpoints (each reads the save directory on its own)
/// refuse to train from different states.
#[test]
fn rank_processes_resuming_different_checkpoints_refuse_to_train() {
    let base = format!("{TINY} --layers 2 --steps 6 --dp 2");
    let dir = fresh("tcp-apart");
    losses(&format!("{base} --exit-at-step 4 --save-every 2 --save-dir {}", dir.display()));
    // Rank 0 resumes step 2, rank 1 step 4.
    let procs = ranks_with(2, |r| format!("{base} --resume {}", dir.join(format!("step-{:06}", 2 + 2 * r)).display()));
    for (rank, (status, _, stderr)) in finish(procs).into_iter().enumerate() {
        assert!(!status.success(), "rank {rank} trained");
        assert!(stderr.contains("the ranks start from different steps (2 to 4"), "rank {rank}:\n{stderr}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

const LAUNCH_ENV: &str = "GPT_PRETRAIN_TEST_LAUNCH";

/// `burn-parallel launch` (the library's `launch`) in a child of the tests, starting the test
/// binary's `child_process` per rank: `GPT_PRETRAIN_TEST_LAUNCH="NPROC MAX_RESTARTS PORT NNODES
/// NODE_RANK RDZV_PORT"` (one node of a job of NNODES, node 0's launcher at RDZV_PORT).
#[test]
#[ignore = "the launcher process of the test below (runs only with its environment)"]
fn launcher_process() {
    let Ok(spec) = std::env::var(LAUNCH_ENV) else { return };
    let n: Vec<usize> = spec.split_whitespace().map(|w| w.parse().unwrap()).collect();
    let exe = std::env::current_exe().unwrap().display().to_string();
    let command = [exe.as_str(), "tests::child_process", "--exact", "--ignored", "--nocapture", "--test-threads", "1"].map(String::from).to_vec();
    let options = burn_parallel::launch::LaunchOptions {
        master_port: n[2] as u16,
        max_restarts: n[1],
        nnodes: n[3],
        node_rank: n[4],
        rdzv_port: Some(n[5] as u16),
        job_id: Some(format!("processes-{}", n[5])),
        ..burn_parallel::launch::LaunchOptions::new(n[0], command)
    };
    std::process::exit(burn_parallel::launch::launch(&options).unwrap_or(2));
}

/// The pid of the rank process whose environment has all of `vars` (Linux `/proc`).
fn rank_pid(vars: &[String]) -> Option<i32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let environ = std::fs::read(e.path().join("environ")).ok()?;
        let env: Vec<&[u8]> = environ.split(|b| *b == 0).collect();
        vars.iter().all(|v| env.contains(&v.as_bytes())).then_some(pid)
    })
}

/// A rank process killed in the middle of a job under `launch --max-restarts 1`, on two nodes
/// (two launchers of 2 ranks each): every rank of both nodes is started again, with one restart
/// count, resumes the newest checkpoint (`--resume auto`; the first start had none) and
/// finishes; the losses before the kill and after the restart are the uninterrupted run's.
#[test]
fn a_job_restarted_by_the_launcher_goes_on_from_its_newest_checkpoint() {
    // Long enough that the kill lands mid-run even on a loaded machine (~150 tiny steps).
    let base = format!("{TINY} --layers 2 --steps 1000000 --dp 2 --tp 2 --dropout 0.1 --exit-at-step 150");
    let whole = losses(&base);
    let dir = fresh("restart");
    // Both bound at once: two distinct ports.
    let (a, b) = (std::net::TcpListener::bind("127.0.0.1:0").unwrap(), std::net::TcpListener::bind("127.0.0.1:0").unwrap());
    let (port, rdzv_port) = (a.local_addr().unwrap().port(), b.local_addr().unwrap().port());
    drop((a, b));
    let marker = format!("BP_TEST_RESTART_JOB={}-{port}", std::process::id());
    let flags = format!("{base} --comm tcp --save-every 5 --resume auto --save-dir {}", dir.display());
    let node = |node: usize| {
        Command::new(std::env::current_exe().unwrap())
            .args(["tests::processes::launcher_process", "--exact", "--ignored", "--nocapture", "--test-threads", "1"])
            .env(CHILD_ENV, &flags)
            .env(LAUNCH_ENV, format!("2 1 {port} 2 {node} {rdzv_port}"))
            .env(marker.split_once('=').unwrap().0, marker.split_once('=').unwrap().1)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (mut launcher, mut node1) = (node(0), node(1));
    let node1_out = (drain(node1.stdout.take()), drain(node1.stderr.take()));
    let stderr = drain(launcher.stderr.take());
    let (seen, rest) = until_step(&mut launcher, 7);
    let victim = [marker.clone(), "RANK=2".into(), "TORCHELASTIC_RESTART_COUNT=0".into()];
    let pid = rank_pid(&victim).expect("rank 2's process of the first start");
    Command::new("kill").args(["-KILL", &pid.to_string()]).status().unwrap();
    let (status, status1) = (launcher.wait().unwrap(), node1.wait().unwrap());
    let out = format!("{}\n{}", seen.join("\n"), rest.join().unwrap());
    let err = stderr.join().unwrap();
    let err1 = node1_out.1.join().unwrap();
    assert!(status.success() && status1.success(), "{status:?} {status1:?}\n{out}\n{err}\nnode 1:\n{}\n{err1}", node1_out.0.join().unwrap());
    for e in [&err, &err1] {
        assert!(e.contains("starting every rank of the 2 nodes again (restart 1 of 1)"), "{e}");
    }
    // Rank 0's steps: the first start's, then (after the restarted test harness's header)
    // the restart's from its checkpoint on.
    let at = out.match_indices("[rank 0] running 1 test").nth(1).map(|(i, _)| i).unwrap_or_else(|| panic!("rank 0 never started again:\n{out}"));
    let (first, second) = (step_lines(&out[..at]), step_lines(&out[at..]));
    assert!(!second.is_empty(), "the restart ran no step (killed after the last save?):\n{out}");
    let resumed_from: usize = second[0].split_whitespace().nth(1).unwrap().parse::<usize>().unwrap() - 1;
    assert!(resumed_from >= 5 && resumed_from.is_multiple_of(5), "resumed after step {resumed_from}: {second:?}");
    assert_eq!(first, whole[..first.len()], "the first start");
    assert_eq!(second, whole[resumed_from..], "the restart goes on as the uninterrupted run");
    assert_eq!(latest_step(&dir), Some(150));
    std::fs::remove_dir_all(dir).unwrap();
}
