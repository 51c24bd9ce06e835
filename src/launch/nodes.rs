//! A multi-node job's launchers: node 0's hosts the [`Coordinator`] at `master_addr:rdzv_port`,
//! the others join it and follow its commands.
//!
//! Wire format: one JSON object per line ([`Report`] up, [`Cmd`] down), at most 64 KiB each. A
//! joining launcher's first line is its [`Hello`]; node 0 answers once every node joined (`go`
//! for round 0) or turns it away (`rejected`, with the reason): another job's launcher (its job
//! id) is turned away without counting; another layout (`--nnodes`, `--nproc-per-node`,
//! `--max-restarts`, the two timeouts), a node index out of range or taken twice fails the job
//! on every node.
//! Both sides send a heartbeat every sixth of [`LaunchOptions::node_timeout`] and count the
//! other as gone after that long without a line.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::coordinator::{Cmd, Coordinator, Hello, Input, Report, HELLO_MAGIC, PROTOCOL_VERSION};
use super::launcher::{raise, run_attempt, stop_signal, Attempt, LaunchOptions, Supervisor, RESTART_PAUSE};

/// The longest line either side accepts.
const MAX_LINE: u64 = 64 << 10;
/// How long a connection may take to send its hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// One line of JSON to `w`. A failed write (its timeout included) may have sent part of the
/// line: the connection is shut, so that the peer reads its end rather than a broken line.
fn send<T: serde::Serialize>(w: &Mutex<TcpStream>, msg: &T) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(msg).expect("messages serialize");
    line.push(b'\n');
    let mut stream = w.lock().expect("the writer's lock");
    stream.write_all(&line).inspect_err(|_| {
        let _ = stream.shutdown(Shutdown::Both);
    })
}

/// The next line of JSON from `r`; `Ok(None)` at the end of the stream.
fn receive<T: serde::de::DeserializeOwned>(r: &mut BufReader<TcpStream>) -> Result<Option<T>, String> {
    let mut line = Vec::new();
    match r.by_ref().take(MAX_LINE + 1).read_until(b'\n', &mut line) {
        Ok(0) => Ok(None),
        Ok(_) if line.last() != Some(&b'\n') => Err(match line.len() as u64 > MAX_LINE {
            true => format!("a line longer than {MAX_LINE} bytes"),
            false => "its connection closed in the middle of a line".into(),
        }),
        Ok(_) => serde_json::from_slice(&line).map(Some).map_err(|e| format!("a line that is not this protocol's ({e}): a burn-parallel of another version?")),
        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => Err("silent past the timeout".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// Sends a heartbeat on every writer every `every`, until `closing`.
fn heartbeat<T: serde::Serialize + Send + 'static>(writers: Vec<Arc<Mutex<TcpStream>>>, ping: T, every: Duration, closing: Arc<AtomicBool>) {
    std::thread::spawn(move || {
        let mut next = Instant::now() + every;
        while !closing.load(Ordering::SeqCst) {
            if Instant::now() >= next {
                for w in &writers {
                    let _ = send(w, &ping); // a broken connection is the reader's to report
                }
                next = Instant::now() + every;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
}

/// This node's launcher's line to the coordinator.
struct Link {
    cmds: Receiver<Result<Cmd, String>>,
    report: Box<dyn Fn(Report)>,
    closing: Arc<AtomicBool>,
    /// Node 0: the coordinator's thread, and how to tell it that node 0's launcher leaves.
    coordinator: Option<Hosted>,
    /// Node n > 0: its connection to node 0, closed cleanly at the end.
    stream: Option<Arc<Mutex<TcpStream>>>,
}

/// Node 0's coordinator, as its own launcher holds it.
struct Hosted {
    thread: std::thread::JoinHandle<()>,
    leave: Box<dyn Fn()>,
}

impl Link {
    /// The next command (heartbeats skipped), a lost coordinator as an `Exit`; a stop signal
    /// received here meanwhile is reported and returned as a `Signal`.
    fn wait(&self) -> Cmd {
        loop {
            let sig = stop_signal();
            if sig != 0 {
                (self.report)(Report::Signalled { signal: sig });
                return Cmd::Signal { signal: sig };
            }
            match self.cmds.recv_timeout(Duration::from_millis(20)) {
                Ok(Ok(Cmd::Ping)) | Err(RecvTimeoutError::Timeout) => {}
                Ok(Ok(cmd)) => return cmd,
                Ok(Err(why)) => return lost(&why),
                Err(RecvTimeoutError::Disconnected) => return lost("it stopped"),
            }
        }
    }

    /// While the ranks run: whether a command stops them (then in `pending`). A `Signal` is
    /// raised as if received here.
    fn poll(&self, pending: &mut Option<Cmd>) -> bool {
        let cmd = match self.cmds.try_recv() {
            Ok(Ok(Cmd::Ping)) | Err(std::sync::mpsc::TryRecvError::Empty) => return false,
            Ok(Ok(Cmd::Signal { signal })) => {
                raise(signal);
                return false;
            }
            Ok(Ok(cmd)) => cmd,
            Ok(Err(why)) => lost(&why),
            Err(std::sync::mpsc::TryRecvError::Disconnected) => lost("it stopped"),
        };
        *pending = Some(cmd);
        true
    }

    /// Stops the heartbeats; on node 0 lets the coordinator deliver its last command (an
    /// `Exit` for the others if node 0's launcher leaves undecided, e.g. unable to start a
    /// rank).
    fn close(self) {
        self.closing.store(true, Ordering::SeqCst);
        if let Some(Hosted { thread, leave }) = self.coordinator {
            leave();
            let _ = thread.join();
        }
        if let Some(stream) = self.stream {
            // Our last report must arrive: a close with unread data would reset the connection
            // and could drop it. Shut our side, then read node 0's to its end (2 s at most).
            let _ = stream.lock().expect("the writer's lock").shutdown(Shutdown::Write);
            let deadline = Instant::now() + Duration::from_secs(2);
            while Instant::now() < deadline && matches!(self.cmds.recv_timeout(Duration::from_millis(20)), Ok(Ok(_)) | Err(RecvTimeoutError::Timeout)) {}
        }
    }
}

fn lost(why: &str) -> Cmd {
    Cmd::Exit { code: 1, why: format!("lost node 0's launcher ({why}): stopping this node's ranks") }
}

/// Runs this node's share of a multi-node job (see [`super::launch`]).
pub(super) fn launch_nodes(o: &LaunchOptions, job_id: Option<&str>) -> Result<i32, String> {
    let link = match o.node_rank {
        0 => host(o, job_id.unwrap_or_default())?,
        _ => join(o, job_id.unwrap_or_default())?,
    };
    match link {
        Ok(link) => {
            let code = follow(o, job_id, &link);
            link.close();
            code
        }
        Err(code) => Ok(code),
    }
}

/// A round's ranks under the coordinator: its commands may stop them, and a stop signal here
/// is reported at once (the other nodes pass it on while this one's ranks have their grace).
struct Following<'a> {
    link: &'a Link,
    pending: Option<Cmd>,
}

impl Supervisor for Following<'_> {
    fn interrupt(&mut self) -> bool {
        self.link.poll(&mut self.pending)
    }

    fn signalled(&mut self, signal: i32) {
        (self.link.report)(Report::Signalled { signal });
    }
}

/// Follows the coordinator's commands: starts the rounds, reports how they end.
fn follow(o: &LaunchOptions, job_id: Option<&str>, link: &Link) -> Result<i32, String> {
    let mut next = link.wait();
    let mut done = false;
    loop {
        next = match next {
            Cmd::Go { round } => {
                done = false;
                let mut following = Following { link, pending: None };
                match run_attempt(o, job_id, round, &mut following)? {
                    Attempt::Signalled { code } => return Ok(code),
                    Attempt::Done => {
                        done = true;
                        (link.report)(Report::Done { round });
                        link.wait()
                    }
                    Attempt::Failed { rank, code } => {
                        (link.report)(Report::Failed { round, rank, code });
                        link.wait()
                    }
                    Attempt::Interrupted => following.pending.expect("an interrupt leaves its command"),
                }
            }
            Cmd::Restart { round, rank, node, code } => {
                done = false;
                eprintln!(
                    "burn-parallel launch: rank {rank} (node {node}) failed with exit code {code}; starting every rank of the {} nodes again (restart {round} of {})",
                    o.nnodes, o.max_restarts
                );
                (link.report)(Report::Ready { round });
                link.wait()
            }
            Cmd::Exit { code, why } => {
                if code != 0 {
                    eprintln!("burn-parallel launch: {why}");
                }
                return Ok(code);
            }
            // Nothing of this node runs: its ranks finished, or had stopped for a restart.
            Cmd::Signal { signal } => return Ok(if done { 0 } else { 128 + signal }),
            Cmd::Rejected { why } => return Err(why),
            Cmd::Ping => link.wait(),
        };
    }
}

/// Node 0's rendezvous port.
fn rdzv_addr(o: &LaunchOptions) -> Result<(String, u16), String> {
    let port = match o.rdzv_port {
        Some(p) => p,
        None => o.master_port.checked_add(1).ok_or("--master-port 65535 leaves no port for --rdzv-port: give one")?,
    };
    if port == o.master_port {
        return Err(format!("--rdzv-port {port} is --master-port, where rank 0 serves the ranks' rendezvous: give another"));
    }
    Ok((o.master_addr.clone(), port))
}

/// A connection's hello, read within [`HELLO_TIMEOUT`].
fn read_hello(stream: &TcpStream) -> Result<(BufReader<TcpStream>, Hello), String> {
    stream.set_read_timeout(Some(HELLO_TIMEOUT)).map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(stream.try_clone().map_err(|e| e.to_string())?);
    match receive::<Report>(&mut reader)? {
        Some(Report::Hello(h)) if h.magic == HELLO_MAGIC && h.version == PROTOCOL_VERSION => Ok((reader, h)),
        Some(Report::Hello(h)) => Err(format!("protocol {:?} version {} (this is {HELLO_MAGIC:?} {PROTOCOL_VERSION})", h.magic, h.version)),
        Some(other) => Err(format!("{other:?} before its hello")),
        None => Err("it closed the connection before its hello".into()),
    }
}

/// Why `h` cannot join `o`'s job, if it cannot.
fn mismatch(o: &LaunchOptions, h: &Hello, joined: &[JoinedNode]) -> Option<String> {
    let flags = |nnodes, nproc, restarts, rdzv: f64, node: f64| {
        format!("--nnodes {nnodes} --nproc-per-node {nproc} --max-restarts {restarts} --rdzv-timeout-secs {rdzv} --node-timeout-secs {node}")
    };
    let theirs = flags(h.nnodes, h.nproc_per_node, h.max_restarts, h.rdzv_timeout_secs, h.node_timeout_secs);
    let ours = flags(o.nnodes, o.nproc_per_node, o.max_restarts, o.rdzv_timeout.as_secs_f64(), o.node_timeout.as_secs_f64());
    if theirs != ours {
        Some(format!("node {}'s launcher was started with {theirs}, node 0's with {ours}", h.node_rank))
    } else if h.node_rank == 0 || h.node_rank >= o.nnodes {
        Some(format!("a launcher with --node-rank {} joined a job of {} nodes (node 0 hosts it)", h.node_rank, o.nnodes))
    } else if joined.iter().any(|j| j.node == h.node_rank) {
        Some(format!("two launchers with --node-rank {}", h.node_rank))
    } else {
        None
    }
}

/// A node's launcher that joined node 0's.
struct JoinedNode {
    node: usize,
    writer: Arc<Mutex<TcpStream>>,
    reader: BufReader<TcpStream>,
}

/// Node 0: waits for every other node's launcher, then starts the coordinator. `Err(code)`: a
/// stop signal came first.
fn host(o: &LaunchOptions, job_id: &str) -> Result<Result<Link, i32>, String> {
    let (host, port) = rdzv_addr(o)?;
    let listener = TcpListener::bind((super::rendezvous::every_interface_of(&host, port), port))
        .map_err(|e| format!("node 0's launcher cannot listen on port {port} (--rdzv-port): {e}"))?;
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + o.rdzv_timeout;
    let mut joined: Vec<JoinedNode> = Vec::new();
    let fail = |joined: &[JoinedNode], why: String| {
        for j in joined {
            let _ = send(&j.writer, &Cmd::Rejected { why: why.clone() });
        }
        Err(why)
    };
    while joined.len() + 1 < o.nnodes {
        let sig = stop_signal();
        if sig != 0 {
            // The joined nodes end as on any stop signal: 128 + it.
            for j in &joined {
                let _ = send(&j.writer, &Cmd::Signal { signal: sig });
            }
            return Ok(Err(128 + sig));
        }
        if Instant::now() >= deadline {
            let missing: Vec<usize> = (1..o.nnodes).filter(|n| !joined.iter().any(|j| j.node == *n)).collect();
            return fail(&joined, format!("nodes {missing:?} never joined node 0's launcher at {host}:{port} within {:?}", o.rdzv_timeout));
        }
        let (stream, from) = match listener.accept() {
            Ok(conn) => conn,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Err(e) => return fail(&joined, format!("accepting a node's launcher: {e}")),
        };
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_nodelay(true); // each line goes out at once
        let writer = Arc::new(Mutex::new(stream.try_clone().map_err(|e| e.to_string())?));
        let (reader, hello) = match read_hello(&stream) {
            Ok(h) => h,
            Err(why) => {
                tracing::warn!(%from, %why, "launch: turned away a connection");
                let _ = send(&writer, &Cmd::Rejected { why: format!("node 0's launcher turned this connection away: {why}") });
                continue;
            }
        };
        if hello.job_id != job_id {
            let why = format!("node 0's launcher at {host}:{port} runs job {job_id:?}, this launcher job {:?}: two jobs on one port? (--job-id)", hello.job_id);
            tracing::warn!(%from, %why, "launch: turned away a launcher of another job");
            let _ = send(&writer, &Cmd::Rejected { why });
            continue;
        }
        if let Some(why) = mismatch(o, &hello, &joined) {
            let _ = send(&writer, &Cmd::Rejected { why: why.clone() });
            return fail(&joined, why);
        }
        joined.push(JoinedNode { node: hello.node_rank, writer, reader });
    }
    Ok(Ok(coordinate(o, joined)))
}

/// Starts node 0's coordinator over the joined nodes; node 0's own launcher talks to it through
/// channels.
fn coordinate(o: &LaunchOptions, joined: Vec<JoinedNode>) -> Link {
    let (inputs, input_rx) = channel::<(usize, Input)>();
    let (cmd0, cmds) = channel::<Result<Cmd, String>>();
    let closing = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    let mut readers = Vec::new();
    for JoinedNode { node, writer, mut reader } in joined {
        // (A peer that stops reading cannot block a broadcast for longer either.)
        let _ = reader.get_ref().set_read_timeout(Some(o.node_timeout));
        let _ = reader.get_ref().set_write_timeout(Some(o.node_timeout));
        let inputs = inputs.clone();
        readers.push(std::thread::spawn(move || loop {
            let input = match receive::<Report>(&mut reader) {
                Ok(Some(r)) => Input::Report(r),
                Ok(None) => Input::Lost("its connection closed".into()),
                Err(why) => Input::Lost(why),
            };
            let last = matches!(input, Input::Lost(_));
            if inputs.send((node, input)).is_err() || last {
                break;
            }
        }));
        writers.push(writer);
    }
    heartbeat(writers.clone(), Cmd::Ping, o.node_timeout / 6, closing.clone());
    let mut c = Coordinator::new(o.nnodes, o.max_restarts, o.rdzv_timeout);
    let coordinator = std::thread::spawn(move || {
        let broadcast = |cmd: Cmd| {
            let _ = cmd0.send(Ok(cmd.clone()));
            for w in &writers {
                let _ = send(w, &cmd);
            }
        };
        decide(&mut c, &input_rx, broadcast);
        // The last command is out: let the others read it (they close their end), at most 2 s.
        for w in &writers {
            let _ = w.lock().expect("the writer's lock").shutdown(Shutdown::Write);
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while readers.iter().any(|r| !r.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    let leaving = inputs.clone();
    let leave = Box::new(move || {
        let _ = leaving.send((0, Input::Lost("it stopped undecided".into())));
    });
    let report = Box::new(move |r: Report| {
        let _ = inputs.send((0, Input::Report(r)));
    });
    Link { cmds, report, closing, coordinator: Some(Hosted { thread: coordinator, leave }), stream: None }
}

/// The coordinator's loop: every node's reports in, its commands out, until the job is decided
/// (or no input can come any more).
fn decide(c: &mut Coordinator, inputs: &Receiver<(usize, Input)>, broadcast: impl Fn(Cmd)) {
    broadcast(c.start());
    while !c.ended() {
        let cmd = match inputs.recv_timeout(Duration::from_millis(100)) {
            // (The restart's deadline is checked however busy the line is.)
            Ok((node, input)) => c.on(node, input).or_else(|| c.tick(Instant::now())),
            Err(RecvTimeoutError::Timeout) => c.tick(Instant::now()),
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let Some(mut cmd) = cmd else { continue };
        if matches!(cmd, Cmd::Go { .. }) {
            // So that a job failing as it starts does not spend its restarts at once; what came
            // meanwhile (a stop signal, a lost node) goes out instead of the start.
            std::thread::sleep(RESTART_PAUSE);
            while let Ok((node, input)) = inputs.try_recv() {
                if let Some(other) = c.on(node, input) {
                    cmd = other;
                    break;
                }
            }
        }
        broadcast(cmd);
    }
}

/// Node n > 0: joins node 0's launcher. `Err(code)`: a stop signal came first.
fn join(o: &LaunchOptions, job_id: &str) -> Result<Result<Link, i32>, String> {
    let (host, port) = rdzv_addr(o)?;
    let addr = format!("{host}:{port}");
    // Node 0's launcher may not listen yet: retried until the deadline or a stop signal.
    let stream = match super::rendezvous::connect(&addr, Instant::now() + o.rdzv_timeout, &|| stop_signal() != 0) {
        _ if stop_signal() != 0 => return Ok(Err(128 + stop_signal())),
        None => return Err(format!("node 0's launcher at {addr} (--master-addr, --rdzv-port) could not be reached within {:?}", o.rdzv_timeout)),
        Some(s) => s,
    };
    let io = |e: std::io::Error| format!("node 0's launcher at {addr}: {e}");
    stream.set_nodelay(true).map_err(io)?; // each line goes out at once
    let writer = Arc::new(Mutex::new(stream.try_clone().map_err(io)?));
    let hello = Hello {
        magic: HELLO_MAGIC.into(),
        version: PROTOCOL_VERSION,
        job_id: job_id.into(),
        node_rank: o.node_rank,
        nnodes: o.nnodes,
        nproc_per_node: o.nproc_per_node,
        max_restarts: o.max_restarts,
        rdzv_timeout_secs: o.rdzv_timeout.as_secs_f64(),
        node_timeout_secs: o.node_timeout.as_secs_f64(),
    };
    send(&writer, &Report::Hello(hello)).map_err(io)?;
    // Until every node joined, node 0 says nothing: wait as long as it does, then heartbeats.
    stream.set_read_timeout(Some(o.rdzv_timeout + HELLO_TIMEOUT)).map_err(io)?;
    stream.set_write_timeout(Some(o.node_timeout)).map_err(io)?;
    let (cmd_tx, cmds): (Sender<Result<Cmd, String>>, _) = channel();
    let node_timeout = o.node_timeout;
    let mut reader = BufReader::new(stream);
    std::thread::spawn(move || loop {
        let msg = receive::<Cmd>(&mut reader).and_then(|m| m.ok_or_else(|| "it closed the connection".to_string()));
        let _ = reader.get_ref().set_read_timeout(Some(node_timeout));
        let last = msg.is_err();
        if cmd_tx.send(msg).is_err() || last {
            break;
        }
    });
    let closing = Arc::new(AtomicBool::new(false));
    heartbeat(vec![writer.clone()], Report::Ping, o.node_timeout / 6, closing.clone());
    let reporter = writer.clone();
    let report = Box::new(move |r: Report| {
        let _ = send(&reporter, &r);
    });
    Ok(Ok(Link { cmds, report, closing, coordinator: None, stream: Some(writer) }))
}
