//! TCP rendezvous: rank 0 serves a bootstrap blob (an NCCL unique id, say) at
//! `MASTER_ADDR:MASTER_PORT`; every other rank connects, introduces itself, and receives it once
//! all `world_size − 1` ranks have arrived.
//!
//! Wire format (little-endian). Hello, client → server: magic `BURNPAR1`, version `u32` (2),
//! rank `u32`, world size `u32`, job id length `u32` (at most [`MAX_JOB_ID`]), the job id (UTF-8).
//! Reply, server → client: magic, status `u8` (0 ok, 1 error), length `u32` (at most
//! [`MAX_PAYLOAD`]), then the blob or a UTF-8 error message. A connection that does not start
//! with a valid hello within 5 s is dropped and logged (garbage on the port never counts as a
//! rank). A rank of another job ([`JobEnv::job_id`]: two jobs given one port) is turned away with
//! an error naming both ids, and the rendezvous goes on waiting for its own ranks. A wrong world
//! size, a duplicate or out-of-range rank, or ranks still missing at the timeout fail the
//! rendezvous on rank 0 and every connected rank, naming the ranks.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use super::env::{JobEnv, MAX_JOB_ID};

const MAGIC: &[u8; 8] = b"BURNPAR1";
const VERSION: u32 = 2;
/// How long rank 0 waits for a connection's whole hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a joining rank waits for rank 0's answer past its own deadline.
const REPLY_GRACE: Duration = Duration::from_secs(5);
/// Largest blob a rendezvous carries (1 MiB).
pub const MAX_PAYLOAD: usize = 1 << 20;

/// Why a rendezvous failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RendezvousError {
    /// Not every rank arrived in time.
    #[error("rendezvous timeout after {waited:?} at {addr}: ranks {missing:?} never arrived")]
    Timeout {
        /// `host:port`.
        addr: String,
        /// Ranks that never arrived (on rank 0), or `[0]` when rank 0 could not be reached.
        missing: Vec<usize>,
        /// How long it waited.
        waited: Duration,
    },
    /// Two processes claimed the same rank.
    #[error("rendezvous: rank {rank} joined twice")]
    DuplicateRank {
        /// The rank.
        rank: usize,
    },
    /// A process was started with another world size or an out-of-range rank.
    #[error("rendezvous: rank {rank} says world size {got}, but rank 0 has world size {expected}")]
    WorldMismatch {
        /// Rank 0's world size.
        expected: usize,
        /// The joining process's.
        got: usize,
        /// The joining rank.
        rank: usize,
    },
    /// Rank 0 refused this process (its message).
    #[error("rendezvous rejected by rank 0: {0}")]
    Rejected(String),
    /// The peer does not speak this protocol, or sent too much.
    #[error("rendezvous protocol error: {0}")]
    Protocol(String),
    /// A socket error.
    #[error("rendezvous I/O error at {addr}: {error}")]
    Io {
        /// `host:port`.
        addr: String,
        /// The error.
        error: String,
    },
}

/// Joins the rendezvous described by `env`; rank 0 passes the blob to hand out. Returns the blob
/// on every rank.
pub fn rendezvous(env: &JobEnv, payload: Option<Vec<u8>>) -> Result<Vec<u8>, RendezvousError> {
    let addr = format!("{}:{}", env.master_addr, env.master_port);
    // (A timeout past what `Instant` can hold waits for a year: no overflow panic.)
    let deadline = Instant::now().checked_add(env.timeout).unwrap_or_else(|| Instant::now() + Duration::from_secs(365 * 24 * 3600));
    if env.rank == 0 {
        let payload = payload.unwrap_or_default();
        if payload.len() > MAX_PAYLOAD {
            return Err(RendezvousError::Protocol(format!("payload of {} bytes exceeds {MAX_PAYLOAD}", payload.len())));
        }
        serve(env, &addr, payload, deadline)
    } else {
        join(env, &addr, deadline)
    }
}

fn io(addr: &str) -> impl Fn(std::io::Error) -> RendezvousError + '_ {
    move |e| RendezvousError::Io { addr: addr.to_string(), error: e.to_string() }
}

fn reply(stream: &mut TcpStream, ok: bool, body: &[u8]) -> std::io::Result<()> {
    let mut msg = Vec::with_capacity(13 + body.len());
    msg.extend_from_slice(MAGIC);
    msg.push(u8::from(!ok));
    msg.extend_from_slice(&(body.len() as u32).to_le_bytes());
    msg.extend_from_slice(body);
    stream.write_all(&msg)
}

/// A joining rank's hello: its rank, world size and job id.
struct Hello {
    rank: usize,
    world: usize,
    job_id: String,
}

/// Fills `buf` from `stream` by `deadline` (each read waits only for what is left of it: a
/// peer that trickles bytes cannot hold rank 0 past it).
fn read_by(stream: &mut TcpStream, buf: &mut [u8], deadline: Instant) -> Result<(), String> {
    let mut filled = 0;
    while filled < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("no complete hello in time ({filled} of {} bytes)", buf.len()));
        }
        stream.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
        match stream.read(&mut buf[filled..]) {
            Ok(0) => return Err(format!("no complete hello (the connection closed after {filled} bytes)")),
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return Err(format!("no complete hello in time ({filled} of {} bytes)", buf.len()));
            }
            Err(e) => return Err(format!("no complete hello ({e})")),
        }
    }
    Ok(())
}

fn read_hello(stream: &mut TcpStream, deadline: Instant) -> Result<Hello, String> {
    let mut buf = [0u8; 24];
    read_by(stream, &mut buf[..12], deadline)?;
    if &buf[..8] != MAGIC {
        return Err(format!("bad magic {:?}", String::from_utf8_lossy(&buf[..8])));
    }
    let word = |buf: &[u8; 24], i: usize| u32::from_le_bytes(buf[i..i + 4].try_into().expect("4 bytes"));
    if word(&buf, 8) != VERSION {
        return Err(format!("protocol version {} (this is {VERSION}: a burn-parallel of another version?)", word(&buf, 8)));
    }
    read_by(stream, &mut buf[12..], deadline)?;
    let len = word(&buf, 20) as usize;
    if len > MAX_JOB_ID {
        return Err(format!("a job id of {len} bytes (at most {MAX_JOB_ID})"));
    }
    let mut id = vec![0u8; len];
    read_by(stream, &mut id, deadline)?;
    let job_id = String::from_utf8(id).map_err(|_| "a job id that is not UTF-8".to_string())?;
    Ok(Hello { rank: word(&buf, 12) as usize, world: word(&buf, 16) as usize, job_id })
}

/// Rank 0 listens on every interface (as torch's TCPStore does): `MASTER_ADDR` is how the others
/// reach it, and a host name may resolve to a loopback address on rank 0's own host (e.g.
/// `127.0.1.1` from `/etc/hosts`) that no other node can connect to. IPv6 only if the name
/// resolves to nothing else.
fn listen(env: &JobEnv, addr: &str) -> Result<TcpListener, RendezvousError> {
    (env.master_addr.as_str(), env.master_port).to_socket_addrs().map_err(io(addr))?;
    TcpListener::bind((every_interface(env), env.master_port)).map_err(io(addr))
}

/// The unspecified address of the master's family: IPv6 where its name resolves to IPv6
/// addresses only, else IPv4 (also where it does not resolve).
pub(crate) fn every_interface(env: &JobEnv) -> std::net::IpAddr {
    every_interface_of(&env.master_addr, env.master_port)
}

/// [`every_interface`] for `host`.
pub(super) fn every_interface_of(host: &str, port: u16) -> std::net::IpAddr {
    let resolved: Vec<std::net::SocketAddr> = (host, port).to_socket_addrs().map(|a| a.collect()).unwrap_or_default();
    if !resolved.is_empty() && resolved.iter().all(|a| a.is_ipv6()) {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    } else {
        std::net::Ipv4Addr::UNSPECIFIED.into()
    }
}

fn serve(env: &JobEnv, addr: &str, payload: Vec<u8>, deadline: Instant) -> Result<Vec<u8>, RendezvousError> {
    let listener = listen(env, addr)?;
    listener.set_nonblocking(true).map_err(io(addr))?;
    let start = Instant::now();
    let mut peers: BTreeMap<usize, TcpStream> = BTreeMap::new();
    let fail = |peers: &mut BTreeMap<usize, TcpStream>, e: RendezvousError| {
        for s in peers.values_mut() {
            let _ = reply(s, false, e.to_string().as_bytes());
        }
        Err(e)
    };
    while peers.len() + 1 < env.world_size {
        if Instant::now() >= deadline {
            let missing = (1..env.world_size).filter(|r| !peers.contains_key(r)).collect();
            return fail(&mut peers, RendezvousError::Timeout { addr: addr.into(), missing, waited: start.elapsed() });
        }
        let (mut stream, from) = match listener.accept() {
            Ok(conn) => conn,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            Err(e) => return fail(&mut peers, io(addr)(e)),
        };
        let _ = stream.set_nonblocking(false);
        let hello_by = deadline.min(Instant::now() + HELLO_TIMEOUT);
        let Hello { rank, world, job_id } = match read_hello(&mut stream, hello_by) {
            Ok(h) => h,
            Err(why) => {
                tracing::warn!(%from, %why, "rendezvous: rejected a connection");
                // (A peer of another version learns why at once instead of at its timeout.)
                let _ = reply(&mut stream, false, format!("rendezvous rejected this connection: {why}").as_bytes());
                continue;
            }
        };
        if job_id != env.job_id {
            // Another job's rank: turned away, and not counted (its own rank 0 is elsewhere).
            let why = format!(
                "rank 0 at {addr} serves job {:?}, but this process (rank {rank}) is of job {job_id:?}: two jobs on one MASTER_PORT? \
                 (job ids: BURN_PARALLEL_JOB_ID, TORCHELASTIC_RUN_ID or SLURM_JOB_ID)",
                env.job_id
            );
            tracing::warn!(%from, %why, "rendezvous: turned away a rank of another job");
            let _ = reply(&mut stream, false, why.as_bytes());
            continue;
        }
        let error = if world != env.world_size || rank == 0 || rank >= env.world_size {
            Some(RendezvousError::WorldMismatch { expected: env.world_size, got: world, rank })
        } else if peers.contains_key(&rank) {
            Some(RendezvousError::DuplicateRank { rank })
        } else {
            None
        };
        if let Some(e) = error {
            let _ = reply(&mut stream, false, e.to_string().as_bytes());
            return fail(&mut peers, e);
        }
        peers.insert(rank, stream);
    }
    for s in peers.values_mut() {
        reply(s, true, &payload).map_err(io(addr))?;
    }
    Ok(payload)
}

/// Rank 0 through any of its name's addresses (`localhost` may resolve to `::1` before
/// `127.0.0.1`, and rank 0 listens on one family), retried until the deadline (rank 0 may not be
/// listening yet), or until `give_up` says so.
pub(super) fn connect(addr: &str, deadline: Instant, give_up: &dyn Fn() -> bool) -> Option<TcpStream> {
    while Instant::now() < deadline && !give_up() {
        for sa in addr.to_socket_addrs().map(|a| a.collect::<Vec<_>>()).unwrap_or_default() {
            let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
            if let Ok(s) = TcpStream::connect_timeout(&sa, left.min(Duration::from_secs(2))) {
                return Some(s);
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

fn join(env: &JobEnv, addr: &str, deadline: Instant) -> Result<Vec<u8>, RendezvousError> {
    let start = Instant::now();
    let timeout = || RendezvousError::Timeout { addr: addr.into(), missing: vec![0], waited: start.elapsed() };
    let mut stream = connect(addr, deadline, &|| false).ok_or_else(timeout)?;
    if env.job_id.len() > MAX_JOB_ID {
        return Err(RendezvousError::Protocol(format!("a job id of {} bytes (at most {MAX_JOB_ID})", env.job_id.len())));
    }
    let mut hello = Vec::with_capacity(24 + env.job_id.len());
    hello.extend_from_slice(MAGIC);
    for w in [VERSION, env.rank as u32, env.world_size as u32, env.job_id.len() as u32] {
        hello.extend_from_slice(&w.to_le_bytes());
    }
    hello.extend_from_slice(env.job_id.as_bytes());
    stream.write_all(&hello).map_err(io(addr))?;
    // Rank 0 decides (it also times out and then tells everyone who is missing): wait for its
    // answer a grace period past our own deadline.
    let grace = deadline.saturating_duration_since(Instant::now()).saturating_add(REPLY_GRACE);
    stream.set_read_timeout(Some(grace)).map_err(io(addr))?;
    let mut head = [0u8; 13];
    stream.read_exact(&mut head).map_err(|e| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            RendezvousError::Io { addr: addr.into(), error: format!("connected, but rank 0 sent no answer within {:?}", start.elapsed()) }
        }
        _ => io(addr)(e),
    })?;
    if &head[..8] != MAGIC {
        return Err(RendezvousError::Protocol(format!("{addr} is not a burn-parallel rendezvous")));
    }
    let len = u32::from_le_bytes(head[9..13].try_into().expect("4 bytes")) as usize;
    if len > MAX_PAYLOAD {
        return Err(RendezvousError::Protocol(format!("reply of {len} bytes exceeds {MAX_PAYLOAD}")));
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).map_err(io(addr))?;
    match head[8] {
        0 => Ok(body),
        _ => Err(RendezvousError::Rejected(String::from_utf8_lossy(&body).into_owned())),
    }
}
