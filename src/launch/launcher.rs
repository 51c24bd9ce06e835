//! `burn-parallel launch`: start one process per local rank with the torchrun variables set,
//! prefix their output by rank, and stop everything when one fails (then, with
//! `--max-restarts`, start them all again).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use std::time::Duration;

/// The signal that asked the launcher to stop (0: none).
static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);

/// Ctrl-Cs received (a second one ends the grace period; repeated SIGTERM/SIGHUP do not: a
/// batch script and a scheduler may both send one).
static INTERRUPTS: AtomicUsize = AtomicUsize::new(0);

#[cfg(unix)]
extern "C" fn on_signal(sig: libc::c_int) {
    if sig == libc::SIGINT {
        INTERRUPTS.fetch_add(1, Ordering::SeqCst);
    }
    let _ = STOP_SIGNAL.compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst);
}

/// Ctrl-C / SIGTERM / SIGHUP on the launcher stop every rank: the signal is passed on to each
/// rank's process group (the ranks lead their own groups, so the terminal's signal reaches only
/// the launcher), which gets [`LaunchOptions::grace`] to finish (e.g. save a checkpoint:
/// `burn_parallel::preempt`) before SIGKILL; a second Ctrl-C ends the grace at once (repeated
/// SIGTERM/SIGHUP are ignored). The
/// launcher then exits 0 if every rank exited 0 (a clean stop), else 128 + the signal.
fn install_signal_handlers() {
    #[cfg(unix)]
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        if crate::preempt::ignored(sig) {
            continue; // nohup
        }
        // SAFETY: the handler only stores into an atomic (async-signal-safe).
        unsafe {
            libc::signal(sig, on_signal as *const () as libc::sighandler_t);
        }
    }
}

/// What to launch.
#[derive(Debug, Clone)]
pub struct LaunchOptions {
    /// Processes on this node.
    pub nproc_per_node: usize,
    /// Nodes in the job.
    pub nnodes: usize,
    /// This node's index.
    pub node_rank: usize,
    /// Rank 0's host.
    pub master_addr: String,
    /// Rank 0's rendezvous port.
    pub master_port: u16,
    /// The program and its arguments.
    pub command: Vec<String>,
    /// After a stop signal, how long the ranks may take to exit before they are killed.
    pub grace: Duration,
    /// How many times to start every rank again after one failed (torchrun's
    /// `--max-restarts`; 0: the job fails with the first failure). The ranks see
    /// `TORCHELASTIC_RESTART_COUNT` (0 on the first start) and `TORCHELASTIC_MAX_RESTARTS`; a
    /// program that resumes its newest checkpoint (`gpt_pretrain --resume auto`) goes on from it.
    pub max_restarts: usize,
    /// The job id the ranks' rendezvous checks (torchrun's `--rdzv-id`), passed on as
    /// `BURN_PARALLEL_JOB_ID`. `None`: the launcher's own environment's ([`super::job_id_from`]),
    /// else on one node a fresh one (its ranks are all this launcher's), else none: on several
    /// nodes give the same id to every node's launcher.
    pub job_id: Option<String>,
    /// With several nodes: the port node 0's launcher listens on for the other nodes' launchers
    /// (torchrun's rendezvous endpoint; `None`: `master_port + 1`). The launchers agree on every
    /// start (`TORCHELASTIC_RESTART_COUNT`), and a failure or stop signal on one node stops
    /// every node's ranks at once (see [`launch`]).
    pub rdzv_port: Option<u16>,
    /// How long node 0's launcher waits for the others to join, and a restart for every node to
    /// stop its ranks (torchrun's join timeout, 600 s).
    pub rdzv_timeout: Duration,
    /// A launcher silent this long (heartbeats go every sixth of it) counts as gone: the job
    /// stops, naming its node.
    pub node_timeout: Duration,
}

impl LaunchOptions {
    /// `command` once on this one node, with the defaults of `burn-parallel launch`: rank 0 at
    /// `127.0.0.1:29500`, 30 s of grace, no restart, the job id from the environment.
    pub fn new(nproc_per_node: usize, command: Vec<String>) -> Self {
        Self {
            nproc_per_node,
            nnodes: 1,
            node_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port: 29500,
            command,
            grace: Duration::from_secs(30),
            max_restarts: 0,
            job_id: None,
            rdzv_port: None,
            rdzv_timeout: Duration::from_secs(600),
            node_timeout: Duration::from_secs(30),
        }
    }
}

/// The job id of `o` (see [`LaunchOptions::job_id`]).
fn job_id(o: &LaunchOptions) -> Result<Option<String>, String> {
    let inherited = super::job_id_from(|k| std::env::var(k).ok()).map_err(|e| e.to_string())?;
    let id = o.job_id.clone().or((!inherited.is_empty()).then_some(inherited)).or_else(|| {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        (o.nnodes == 1).then(|| format!("launch-{}-{nanos}", std::process::id()))
    });
    match id {
        Some(id) if id.len() > super::MAX_JOB_ID => Err(format!("--job-id of {} bytes: at most {}", id.len(), super::MAX_JOB_ID)),
        id => Ok(id),
    }
}

/// The pause before a restart.
pub(super) const RESTART_PAUSE: Duration = Duration::from_secs(1);

/// The stop signal received (0: none).
pub(super) fn stop_signal() -> i32 {
    STOP_SIGNAL.load(Ordering::SeqCst)
}

/// Acts as if `sig` had been received (another node's launcher got it).
pub(super) fn raise(sig: i32) {
    let _ = STOP_SIGNAL.compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst);
}

/// How one start of the ranks ended.
pub(super) enum Attempt {
    /// Every rank exited 0.
    Done,
    /// A stop signal ended it (passed on to the ranks): the launcher's exit code (0 when every
    /// rank exited 0).
    Signalled { code: i32 },
    /// A rank failed (the others were stopped).
    Failed { rank: usize, code: i32 },
    /// The supervisor asked to stop the ranks: they were stopped and are gone.
    Interrupted,
}

/// Forwards a rank's output line by line (bytes that are not UTF-8 shown lossily: stopping at
/// them would close the pipe and kill the rank with SIGPIPE on its next write).
fn pipe_lines<R: std::io::Read + Send + 'static>(r: R, rank: usize, err: bool) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(r);
        let mut buf = Vec::new();
        while matches!(reader.read_until(b'\n', &mut buf), Ok(n) if n > 0) {
            let line = String::from_utf8_lossy(&buf);
            let line = line.trim_end_matches(['\n', '\r']);
            if err {
                eprintln!("[rank {rank}] {line}");
            } else {
                println!("[rank {rank}] {line}");
            }
            buf.clear();
        }
    })
}

/// Runs the job's processes of this node; returns the exit code of the first process that failed
/// (after stopping the others) once no restart is left, or 0 when all succeed. With
/// [`LaunchOptions::max_restarts`], a failure stops every rank and starts them all again.
///
/// With several nodes, node 0's launcher decides for all (torchrun's rendezvous rounds; the
/// others join it at [`LaunchOptions::rdzv_port`]): a rank failing anywhere stops every node's
/// ranks at once (those blocked in a collective on the dead rank need not wait for their
/// watchdog), every node waits until its ranks are gone, and then all start again with the same
/// `TORCHELASTIC_RESTART_COUNT`, or all exit with the failed rank's code; a stop signal on any
/// node is passed on to every rank; a node's launcher that is gone stops the job naming it.
pub fn launch(o: &LaunchOptions) -> Result<i32, String> {
    if o.command.is_empty() {
        return Err("nothing to launch: give a program after --".into());
    }
    if o.nproc_per_node == 0 || o.nnodes == 0 || o.node_rank >= o.nnodes {
        return Err(format!("invalid layout: --nproc-per-node {} --nnodes {} --node-rank {}", o.nproc_per_node, o.nnodes, o.node_rank));
    }
    let job_id = job_id(o)?;
    install_signal_handlers();
    if o.nnodes > 1 {
        return super::nodes::launch_nodes(o, job_id.as_deref());
    }
    let mut attempt = 0;
    loop {
        match run_attempt(o, job_id.as_deref(), attempt, &mut Alone)? {
            Attempt::Done => return Ok(0),
            Attempt::Signalled { code, .. } => return Ok(code),
            Attempt::Interrupted => unreachable!("nothing interrupts a single node's launcher"),
            Attempt::Failed { rank, code } if attempt < o.max_restarts && STOP_SIGNAL.load(Ordering::SeqCst) == 0 => {
                attempt += 1;
                eprintln!(
                    "burn-parallel launch: rank {rank} failed with exit code {code}; starting every rank again (restart {attempt} of {})",
                    o.max_restarts
                );
                // A pause, so that a job failing as it starts does not spend its restarts at once.
                std::thread::sleep(RESTART_PAUSE);
                let sig = STOP_SIGNAL.load(Ordering::SeqCst);
                if sig != 0 {
                    eprintln!("burn-parallel launch: got signal {sig} before the restart: stopping");
                    return Ok(128 + sig);
                }
            }
            Attempt::Failed { rank, code } => {
                let sig = STOP_SIGNAL.load(Ordering::SeqCst);
                if sig != 0 {
                    // Asked to stop: as a stop at any other moment, 128 + the signal.
                    eprintln!("burn-parallel launch: rank {rank} failed with exit code {code}; got signal {sig}: stopping (no restart)");
                    return Ok(128 + sig);
                } else if o.max_restarts > 0 {
                    eprintln!("burn-parallel launch: rank {rank} failed with exit code {code} and no restart is left ({attempt} done)");
                }
                return Ok(code);
            }
        }
    }
}

/// What a multi-node launcher adds to a start of its ranks (nothing on one node).
pub(super) trait Supervisor {
    /// Polled every 20 ms while the ranks run: whether to stop them (another node decided).
    fn interrupt(&mut self) -> bool {
        false
    }
    /// A stop signal came: told before it is passed on to the ranks and their grace begins.
    fn signalled(&mut self, _signal: i32) {}
}

/// A single node's launcher decides alone.
struct Alone;

impl Supervisor for Alone {}

/// The command of local rank `local` (global `rank`) of start `attempt`.
fn rank_command(o: &LaunchOptions, job_id: Option<&str>, attempt: usize, local: usize) -> Command {
    let (program, args) = o.command.split_first().expect("checked");
    let rank = o.node_rank * o.nproc_per_node + local;
    let mut cmd = Command::new(program);
    #[cfg(unix)]
    {
        // Each rank leads its own process group, so stopping it also stops what it started.
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
    }
    #[cfg(target_os = "linux")]
    {
        // A launcher that dies (SIGKILL, OOM) takes its ranks with it: nothing runs on
        // unsupervised, and the other nodes' launchers see its connection close. (Only the rank
        // process itself: a wrapper script should `exec` the program.)
        use std::os::unix::process::CommandExt;
        // SAFETY: getpid(2) here; in the child only prctl(2) and getppid(2), both
        // async-signal-safe, between fork and exec.
        let launcher = unsafe { libc::getpid() };
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 || libc::getppid() != launcher {
                    return Err(std::io::Error::other("the launcher is gone"));
                }
                Ok(())
            });
        }
    }
    if let Some(id) = job_id {
        cmd.env("BURN_PARALLEL_JOB_ID", id);
    }
    cmd.args(args)
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", (o.nproc_per_node * o.nnodes).to_string())
        .env("LOCAL_RANK", local.to_string())
        .env("LOCAL_WORLD_SIZE", o.nproc_per_node.to_string())
        .env("MASTER_ADDR", &o.master_addr)
        .env("MASTER_PORT", o.master_port.to_string())
        .env("TORCHELASTIC_RESTART_COUNT", attempt.to_string())
        .env("TORCHELASTIC_MAX_RESTARTS", o.max_restarts.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Starts every local rank (start number `attempt`) and waits until they all exited, one failed
/// (the others are stopped), a stop signal came (`supervisor` told, then the signal passed on,
/// with the grace period) or the supervisor interrupts (the ranks are stopped).
pub(super) fn run_attempt(o: &LaunchOptions, job_id: Option<&str>, attempt: usize, supervisor: &mut dyn Supervisor) -> Result<Attempt, String> {
    let program = &o.command[0];
    let mut children: Vec<(usize, Child)> = Vec::new();
    let mut pipes = Vec::new();
    for local in 0..o.nproc_per_node {
        let rank = o.node_rank * o.nproc_per_node + local;
        let spawned = rank_command(o, job_id, attempt, local).spawn();
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                stop(&mut children);
                return Err(format!("cannot start {program:?} for rank {rank}: {e}"));
            }
        };
        pipes.push(pipe_lines(child.stdout.take().expect("piped"), rank, false));
        pipes.push(pipe_lines(child.stderr.take().expect("piped"), rank, true));
        children.push((rank, child));
    }
    let outcome = loop {
        let sig = STOP_SIGNAL.load(Ordering::SeqCst);
        if sig != 0 {
            supervisor.signalled(sig);
            eprintln!("burn-parallel launch: got signal {sig}; passing it on to every rank ({:?} to exit before SIGKILL)", o.grace);
            let clean = signal_all(&mut children, sig, o.grace);
            stop(&mut children);
            break Attempt::Signalled { code: if clean { 0 } else { 128 + sig } };
        }
        if supervisor.interrupt() {
            stop(&mut children);
            wait_gone(&children);
            break Attempt::Interrupted;
        }
        let mut running = 0;
        let mut failed = None;
        for (rank, child) in children.iter_mut() {
            match child.try_wait() {
                Ok(Some(status)) if !status.success() => {
                    failed = failed.or(Some((*rank, exit_code(status))));
                }
                Ok(Some(_)) => {}
                _ => running += 1,
            }
        }
        if let Some((rank, code)) = failed {
            eprintln!("burn-parallel launch: rank {rank} failed with exit code {code}; stopping the other ranks");
            stop(&mut children);
            if attempt < o.max_restarts {
                wait_gone(&children);
            }
            break Attempt::Failed { rank, code };
        }
        if running == 0 {
            // What the ranks left running in the background would keep their output pipes open.
            stop(&mut children);
            break Attempt::Done;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // The last output; a process that left its rank's group may hold a pipe open: not forever.
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while pipes.iter().any(|p| !p.is_finished()) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(outcome)
}

/// Sends `sig` to every running rank's process group and waits up to `grace` (or until another
/// signal) for them to exit; whether every rank exited 0.
fn signal_all(children: &mut [(usize, Child)], sig: i32, grace: Duration) -> bool {
    for (_, c) in children.iter_mut() {
        if !matches!(c.try_wait(), Ok(Some(_))) {
            #[cfg(unix)]
            // SAFETY: kill(2) on the process group the child leads; no memory is touched.
            unsafe {
                libc::kill(-(c.id() as i32), sig);
            }
        }
    }
    let deadline = std::time::Instant::now() + grace;
    // A Ctrl-C on top of the signal that started the stop ends the grace (as it ends a rank).
    let allowed = usize::from(sig == libc::SIGINT);
    while std::time::Instant::now() < deadline
        && INTERRUPTS.load(Ordering::SeqCst) <= allowed
        && children.iter_mut().any(|(_, c)| !matches!(c.try_wait(), Ok(Some(_))))
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    children.iter_mut().all(|(_, c)| matches!(c.try_wait(), Ok(Some(s)) if s.success()))
}

/// Kills every rank's process group (what a rank started too, also for a rank that already
/// exited: its group lives on while any member does, and Linux reuses no pid still in use as a
/// group id), then reaps the ranks.
fn stop(children: &mut [(usize, Child)]) {
    for (_, c) in children.iter_mut() {
        #[cfg(unix)]
        // SAFETY: kill(2) on the process group the child leads; no memory is touched.
        unsafe {
            libc::kill(-(c.id() as i32), libc::SIGKILL);
        }
        if !matches!(c.try_wait(), Ok(Some(_))) {
            let _ = c.kill();
        }
    }
    for (_, c) in children.iter_mut() {
        let _ = c.wait();
    }
}

/// Before a restart: what the stopped ranks started may take a moment to die (holding ports,
/// files, GPU memory); waits until each rank's group is empty (at most 5 s: a dead member no
/// init reaps still counts).
fn wait_gone(children: &[(usize, Child)]) {
    #[cfg(unix)]
    {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        // SAFETY: kill(2) with signal 0 only checks whether the group still has a member;
        // waitpid(2) on the group with WNOHANG reaps members that became ours (the launcher as
        // PID 1 or a subreaper adopts them), else they would stay as zombies.
        let alive = |c: &Child| unsafe {
            let group = -(c.id() as i32);
            while libc::waitpid(group, std::ptr::null_mut(), libc::WNOHANG) > 0 {}
            libc::kill(group, 0) == 0
        };
        while children.iter().any(|(_, c)| alive(c)) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn exit_code(status: std::process::ExitStatus) -> i32 {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = status.signal() {
            return 128 + sig;
        }
    }
    status.code().unwrap_or(1)
}
