//! Multi-node `burn-parallel launch`: two launchers on loopback acting as two nodes, each
//! starting shell ranks. A failure or a stop signal on one node reaches every node's ranks at
//! once, restarts agree on their count, a mismatched or foreign launcher is turned away, and a
//! launcher that dies or falls silent stops the job naming its node.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_burn-parallel");

/// Two distinct free ports (both bound at once, then released).
fn free_ports() -> (u16, u16) {
    let (a, b) = (TcpListener::bind("127.0.0.1:0").unwrap(), TcpListener::bind("127.0.0.1:0").unwrap());
    (a.local_addr().unwrap().port(), b.local_addr().unwrap().port())
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("bp-nodes-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Two nodes' launchers of one job (node 0 hosts the rendezvous at `port`).
struct Job {
    /// Node 0's launcher's port.
    port: u16,
    /// Rank 0's rendezvous port (another).
    rank0: u16,
    flags: Vec<String>,
}

impl Job {
    fn new(flags: &[&str]) -> Self {
        let (port, rank0) = free_ports();
        Self { port, rank0, flags: flags.iter().map(|f| f.to_string()).collect() }
    }

    /// Node `node`'s launcher running `script` per rank, with `extra` flags.
    fn node(&self, node: usize, extra: &[&str], script: &str) -> Child {
        let (rank0, rdzv) = (self.rank0.to_string(), self.port.to_string());
        let mut args: Vec<&str> = vec!["launch", "--nnodes", "2", "--master-port", &rank0, "--rdzv-port", &rdzv, "--job-id", "test-job"];
        args.extend(["--node-rank", if node == 0 { "0" } else { "1" }]);
        args.extend(self.flags.iter().map(String::as_str));
        args.extend(extra);
        args.extend(["--", "sh", "-c", script]);
        Command::new(BIN).args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
    }
}

/// Waits (20 s at most) until `file` has `n` lines.
fn wait_lines(file: &Path, n: usize) {
    let start = Instant::now();
    while std::fs::read_to_string(file).map_or(0, |t| t.lines().count()) < n {
        assert!(start.elapsed() < Duration::from_secs(20), "{} never got {n} lines", file.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sorted_lines(file: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_to_string(file).unwrap().lines().map(String::from).collect();
    v.sort();
    v
}

/// Whether process `pid` runs (a zombie that no one reaped yet does not).
fn alive(pid: &str) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid.trim())).unwrap_or_default();
    // `pid (comm) S ...`: the state follows the last parenthesis.
    stat.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
}

/// A rank failing on node 1 while node 0's ranks wait (as in a collective on the dead rank)
/// stops node 0's ranks at once; both nodes start again with restart count 1 and finish.
#[test]
fn a_failure_on_one_node_restarts_every_node_with_one_count() {
    let dir = scratch("restart");
    let log = dir.join("starts");
    let script = format!(
        r#"echo "$RANK:$TORCHELASTIC_RESTART_COUNT:$WORLD_SIZE" >> {0}; if [ "$TORCHELASTIC_RESTART_COUNT" = 0 ]; then if [ "$RANK" = 3 ]; then while [ "$(grep -c ':0:' {0})" -lt 4 ]; do sleep 0.05; done; exit 3; fi; sleep 60; fi; echo "done $RANK""#,
        log.display()
    );
    let job = Job::new(&["--nproc-per-node", "2", "--max-restarts", "1"]);
    let start = Instant::now();
    let (n0, n1) = (job.node(0, &[], &script), job.node(1, &[], &script));
    let (o0, o1) = (n0.wait_with_output().unwrap(), n1.wait_with_output().unwrap());
    let (t0, t1) = (text(&o0), text(&o1));
    assert!(o0.status.success() && o1.status.success(), "node 0:\n{t0}\nnode 1:\n{t1}");
    assert!(start.elapsed() < Duration::from_secs(30), "node 0's ranks were not stopped: {:?}", start.elapsed());
    let restart = "rank 3 (node 1) failed with exit code 3; starting every rank of the 2 nodes again (restart 1 of 1)";
    assert!(t0.contains(restart) && t1.contains(restart), "node 0:\n{t0}\nnode 1:\n{t1}");
    assert!(t0.contains("[rank 1] done 1") && t1.contains("[rank 3] done 3"), "{t0}\n{t1}");
    let expected: Vec<String> = (0..4).flat_map(|r| [format!("{r}:0:4"), format!("{r}:1:4")]).collect();
    assert_eq!(sorted_lines(&log), expected);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Without restarts left, a failure ends every node's launcher with the failed rank's code.
#[test]
fn the_last_failure_ends_every_node_with_its_code() {
    let script = r#"if [ "$RANK" = 1 ]; then sleep 0.5; exit 5; fi; sleep 60"#;
    let job = Job::new(&["--nproc-per-node", "2"]);
    let start = Instant::now();
    let (n0, n1) = (job.node(0, &[], script), job.node(1, &[], script));
    let (o0, o1) = (n0.wait_with_output().unwrap(), n1.wait_with_output().unwrap());
    assert_eq!((o0.status.code(), o1.status.code()), (Some(5), Some(5)), "{}\n{}", text(&o0), text(&o1));
    assert!(start.elapsed() < Duration::from_secs(20), "{:?}", start.elapsed());
    assert!(text(&o1).contains("rank 1 (node 0) failed with exit code 5"), "{}", text(&o1));
}

/// A stop signal to one node's launcher reaches every node's ranks at once, which get their
/// grace period (they save and exit 0: every launcher exits 0): node 1's ranks take 5 s to
/// save, node 0's are signalled long before that.
#[test]
fn a_signal_on_one_node_reaches_every_rank() {
    let dir = scratch("signal");
    let log = dir.join("up");
    let script = format!(
        r#"trap 'echo "stopped $RANK $(date +%s.%N)" >> {0}.stopped; if [ "$RANK" -ge 2 ]; then sleep 5; fi; exit 0' TERM; echo $RANK >> {0}; while true; do sleep 0.05; done"#,
        log.display()
    );
    let job = Job::new(&["--nproc-per-node", "2"]);
    let (n0, n1) = (job.node(0, &[], &script), job.node(1, &[], &script));
    wait_lines(&log, 4);
    Command::new("kill").args(["-TERM", &n1.id().to_string()]).status().unwrap();
    let (o0, o1) = (n0.wait_with_output().unwrap(), n1.wait_with_output().unwrap());
    assert!(o0.status.success() && o1.status.success(), "{}\n{}", text(&o0), text(&o1));
    let stopped = sorted_lines(&dir.join("up.stopped"));
    let ranks: Vec<&str> = stopped.iter().map(|l| l.rsplit_once(' ').unwrap().0).collect();
    assert_eq!(ranks, ["stopped 0", "stopped 1", "stopped 2", "stopped 3"]);
    let at: Vec<f64> = stopped.iter().map(|l| l.rsplit_once(' ').unwrap().1.parse().unwrap()).collect();
    let late = at[..2].iter().fold(f64::MIN, |a, b| a.max(*b)) - at[2..].iter().fold(f64::MAX, |a, b| a.min(*b));
    assert!(late < 3.0, "node 0's ranks were signalled {late:.2} s after node 1's (within their 5 s grace)");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Another layout fails the job on both nodes naming both; another job's launcher is turned
/// away without counting (node 0 then times out naming the node that never joined).
#[test]
fn a_mismatched_or_foreign_launcher_is_turned_away() {
    let job = Job::new(&["--rdzv-timeout-secs", "3"]);
    let (n0, n1) = (job.node(0, &["--nproc-per-node", "2"], "sleep 60"), job.node(1, &["--nproc-per-node", "3"], "sleep 60"));
    let (o0, o1) = (n0.wait_with_output().unwrap(), n1.wait_with_output().unwrap());
    let why = "node 1's launcher was started with --nnodes 2 --nproc-per-node 3 --max-restarts 0 --rdzv-timeout-secs 3 --node-timeout-secs 30, \
               node 0's with --nnodes 2 --nproc-per-node 2 --max-restarts 0 --rdzv-timeout-secs 3 --node-timeout-secs 30";
    for o in [&o0, &o1] {
        assert!(!o.status.success() && text(o).contains(why), "{}", text(o));
    }
    let n0 = job.node(0, &["--nproc-per-node", "1"], "sleep 60");
    let foreign = Command::new(BIN)
        .args(["launch", "--nnodes", "2", "--node-rank", "1", "--nproc-per-node", "1", "--rdzv-port", &job.port.to_string(), "--job-id", "other-job"])
        .args(["--rdzv-timeout-secs", "3"])
        .args(["--", "sh", "-c", "sleep 60"])
        .output()
        .unwrap();
    assert!(!foreign.status.success() && text(&foreign).contains(r#"runs job "test-job", this launcher job "other-job""#), "{}", text(&foreign));
    let o0 = n0.wait_with_output().unwrap();
    assert!(!o0.status.success() && text(&o0).contains("nodes [1] never joined node 0's launcher"), "{}", text(&o0));
    // A program that cannot start: both launchers fail at once (node 0's decides nothing more).
    let start = Instant::now();
    let spawn = |node: usize| {
        let (rank0, rdzv) = (job.rank0.to_string(), job.port.to_string());
        let args = ["launch", "--nnodes", "2", "--node-rank", &node.to_string(), "--master-port", &rank0, "--rdzv-port", &rdzv, "--", "/nonexistent/program"];
        Command::new(BIN).args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
    };
    let (n0, n1) = (spawn(0), spawn(1));
    for o in [n0.wait_with_output().unwrap(), n1.wait_with_output().unwrap()] {
        assert!(!o.status.success() && text(&o).contains("cannot start \"/nonexistent/program\""), "{}", text(&o));
    }
    assert!(start.elapsed() < Duration::from_secs(10), "{:?}", start.elapsed());
    let same = Command::new(BIN).args(["launch", "--nnodes", "2", "--master-port", "29611", "--rdzv-port", "29611", "--", "true"]).output().unwrap();
    assert!(!same.status.success() && text(&same).contains("--rdzv-port 29611 is --master-port"), "{}", text(&same));
}

/// A node's launcher that is killed (its ranks die with it) or stops answering (SIGSTOP, past
/// `--node-timeout-secs`) stops every other node's ranks, naming it; node 0's launcher killed
/// stops node 1's.
#[test]
fn a_launcher_that_dies_or_falls_silent_stops_the_job() {
    let dir = scratch("gone");
    let log = dir.join("pids");
    let script = format!("echo $$ >> {}; sleep 60", log.display());
    let job = Job::new(&["--nproc-per-node", "1", "--node-timeout-secs", "2"]);
    let mut cases = Vec::new();
    for (victim, how) in [(1, "KILL"), (1, "STOP"), (0, "KILL")] {
        let _ = std::fs::remove_file(&log);
        let (n0, n1) = (job.node(0, &[], &script), job.node(1, &[], &script));
        let (mut gone, other) = if victim == 0 { (n0, n1) } else { (n1, n0) };
        wait_lines(&log, 2);
        let start = Instant::now();
        Command::new("kill").args([&format!("-{how}"), &gone.id().to_string()]).status().unwrap();
        let out = other.wait_with_output().unwrap();
        cases.push((victim, how, out.status.code(), start.elapsed(), text(&out)));
        let _ = gone.kill();
        let _ = gone.wait();
        // Every rank is gone: the victim's died with its launcher (or when it was killed now).
        std::thread::sleep(Duration::from_millis(300));
        for pid in std::fs::read_to_string(&log).unwrap().lines() {
            assert!(!alive(pid), "{how} of node {victim}: rank process {pid} still runs");
        }
    }
    for (victim, how, code, took, t) in cases {
        assert_eq!(code, Some(1), "{how} node {victim}: {t}");
        assert!(took < Duration::from_secs(10), "{how} node {victim}: {took:?}");
        let why = match (victim, how) {
            (1, "KILL") => "node 1's launcher is gone (its connection closed)",
            (1, _) => "node 1's launcher is gone (silent past the timeout)",
            _ => "lost node 0's launcher",
        };
        assert!(t.contains(why), "{how} node {victim}: {t}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
