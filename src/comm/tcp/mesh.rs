//! Connecting every pair of ranks: a full mesh of TCP connections.
//!
//! 1. Every rank listens on an ephemeral port of every interface (IPv4, or IPv6 where the
//!    master's name has IPv6 addresses only, as the rendezvous does).
//! 2. The job's [`rendezvous`] (rank 0 at `MASTER_ADDR:MASTER_PORT`; it checks the world size and
//!    names missing ranks) hands every rank a job nonce and rank 0's port.
//! 3. Every other rank connects to rank 0 and introduces itself (magic, nonce, rank, its port);
//!    rank 0 answers each with the address table (the address each rank connected from, and its
//!    port; a loopback one is taken to mean rank 0's host, as reached by the reader).
//! 4. Rank `r` connects to ranks `1..r` and accepts ranks `r+1..` (a listener queues connections
//!    before anyone accepts them, so no order of arrival deadlocks). A hello with another nonce
//!    (a stale process of an earlier job) or garbage is dropped.
//!
//! The rendezvous has the job's timeout, and the connections after it the timeout again; a
//! refused connection fails at once (every listener exists before the rendezvous); errors name
//! the ranks. A world of one connects nothing.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::error::CommError;
use crate::launch::{rendezvous, JobEnv};

const MAGIC: &[u8; 8] = b"BURNTCP1";
/// magic, nonce u64, rank u32, port u16.
const HELLO: usize = 22;

fn err(env: &JobEnv, what: impl std::fmt::Display) -> CommError {
    CommError::Backend(format!("tcp mesh, rank {} of {}: {what}", env.rank, env.world_size))
}

fn hello(nonce: u64, rank: usize, port: u16) -> Vec<u8> {
    let mut h = Vec::with_capacity(HELLO);
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&nonce.to_le_bytes());
    h.extend_from_slice(&(rank as u32).to_le_bytes());
    h.extend_from_slice(&port.to_le_bytes());
    h
}

/// A hello's (rank, port) if it is one of this job's.
fn read_hello(s: &mut TcpStream, nonce: u64) -> Result<(usize, u16), String> {
    let mut b = [0u8; HELLO];
    s.read_exact(&mut b).map_err(|e| format!("no complete hello ({e})"))?;
    if &b[..8] != MAGIC || u64::from_le_bytes(b[8..16].try_into().expect("8")) != nonce {
        return Err("not a hello of this job".into());
    }
    Ok((u32::from_le_bytes(b[16..20].try_into().expect("4")) as usize, u16::from_le_bytes(b[20..22].try_into().expect("2"))))
}

/// Accepts hellos until `want` ranks (by `accept_rank`) are in `peers`.
fn accept(
    env: &JobEnv,
    listener: &TcpListener,
    nonce: u64,
    deadline: Instant,
    peers: &mut [Option<(TcpStream, u16)>],
    accept_rank: impl Fn(usize) -> bool,
) -> Result<(), CommError> {
    listener.set_nonblocking(true).map_err(|e| err(env, e))?;
    let waiting = |peers: &[Option<(TcpStream, u16)>]| (0..peers.len()).filter(|&r| accept_rank(r) && peers[r].is_none()).collect::<Vec<_>>();
    while !waiting(peers).is_empty() {
        if Instant::now() >= deadline {
            return Err(err(env, format!("ranks {:?} never connected within {:?}", waiting(peers), env.timeout)));
        }
        let mut s = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            Err(e) => return Err(err(env, e)),
        };
        let _ = s.set_nonblocking(false);
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        match read_hello(&mut s, nonce) {
            Ok((r, port)) if r < peers.len() && accept_rank(r) && peers[r].is_none() => peers[r] = Some((s, port)),
            Ok((r, _)) => return Err(err(env, format!("rank {r} connected twice or out of turn"))),
            Err(why) => tracing::warn!(%why, "tcp mesh: dropped a connection"),
        }
    }
    Ok(())
}

/// Every listener is bound before the rendezvous, so a refused connection means the rank's
/// process is gone (or the address is wrong): an error at once, naming it.
fn connect(env: &JobEnv, addr: SocketAddr, rank: usize, deadline: Instant) -> Result<TcpStream, CommError> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match TcpStream::connect_timeout(&addr, left.clamp(Duration::from_millis(1), Duration::from_secs(2))) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline || e.kind() == std::io::ErrorKind::ConnectionRefused => {
                return Err(err(env, format!("cannot reach rank {rank} at {addr}: {e}")))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Rank 0 at `port0`, through whichever of its name's addresses answers (`localhost` may
/// resolve to `::1` first and to `127.0.0.1`, where an IPv4 listener is); the connection and
/// the address that answered.
fn connect_master(env: &JobEnv, port0: u16, deadline: Instant) -> Result<(TcpStream, SocketAddr), CommError> {
    let addrs: Vec<SocketAddr> = (env.master_addr.as_str(), port0).to_socket_addrs().map(|a| a.collect()).unwrap_or_default();
    let mut last = err(env, format!("cannot resolve {}", env.master_addr));
    for (i, &a) in addrs.iter().enumerate() {
        // The last address gets the whole deadline; the others a quick try.
        let until = if i + 1 == addrs.len() { deadline } else { deadline.min(Instant::now() + Duration::from_secs(1)) };
        match connect(env, a, 0, until) {
            Ok(s) => return Ok((s, a)),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Listens where the rendezvous does: every IPv4 interface, or every IPv6 one when the master's
/// name resolves to IPv6 addresses only.
fn listen(env: &JobEnv) -> Result<TcpListener, CommError> {
    TcpListener::bind((crate::launch::every_interface(env), 0)).map_err(|e| err(env, format!("cannot listen: {e}")))
}

/// The job's nonce: tells this job's connections from a stale process's.
fn nonce() -> u64 {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    (t.as_nanos() as u64) ^ ((std::process::id() as u64) << 32) ^ 0x9e37_79b9_7f4a_7c15
}

/// One connection to every other rank (`None` at this rank's own index).
pub(super) fn connect_mesh(env: &JobEnv) -> Result<Vec<Option<TcpStream>>, CommError> {
    if env.world_size == 1 {
        return Ok(vec![None]);
    }
    let listener = listen(env)?;
    let port = listener.local_addr().map_err(|e| err(env, e))?.port();
    let blob = (env.rank == 0).then(|| [nonce().to_le_bytes().as_slice(), &port.to_le_bytes()].concat());
    let blob = rendezvous(env, blob).map_err(|e| err(env, e))?;
    // Everyone has arrived: the connections get the whole timeout again.
    let deadline = Instant::now().checked_add(env.timeout).unwrap_or_else(|| Instant::now() + Duration::from_secs(365 * 24 * 3600));
    let nonce = u64::from_le_bytes(blob.get(..8).and_then(|b| b.try_into().ok()).ok_or_else(|| err(env, "short rendezvous blob"))?);
    let port0 = u16::from_le_bytes(blob.get(8..10).and_then(|b| b.try_into().ok()).ok_or_else(|| err(env, "short rendezvous blob"))?);
    let n = env.world_size;
    let mut peers: Vec<Option<(TcpStream, u16)>> = (0..n).map(|_| None).collect();
    if env.rank == 0 {
        accept(env, &listener, nonce, deadline, &mut peers, |r| r > 0)?;
        let table = address_table(env, &peers)?;
        for (r, p) in peers.iter_mut().enumerate().skip(1) {
            let s = &mut p.as_mut().expect("accepted").0;
            s.write_all(&(table.len() as u32).to_le_bytes()).and_then(|_| s.write_all(table.as_bytes())).map_err(|e| err(env, format!("rank {r}: {e}")))?;
        }
    } else {
        let (mut s, addr0) = connect_master(env, port0, deadline)?;
        s.write_all(&hello(nonce, env.rank, port)).map_err(|e| err(env, e))?;
        let table = read_table(env, &mut s, deadline, addr0.ip())?;
        peers[0] = Some((s, port0));
        for (r, addr) in table.iter().enumerate().take(env.rank).skip(1) {
            let mut s = connect(env, *addr, r, deadline)?;
            s.write_all(&hello(nonce, env.rank, port)).map_err(|e| err(env, e))?;
            peers[r] = Some((s, addr.port()));
        }
        let me = env.rank;
        accept(env, &listener, nonce, deadline, &mut peers, |r| r > me)?;
    }
    peers
        .into_iter()
        .map(|p| {
            p.map(|(s, _)| {
                s.set_read_timeout(None).and_then(|_| s.set_nodelay(true)).map_err(|e| err(env, e))?;
                Ok(s)
            })
            .transpose()
        })
        .collect()
}

/// Rank 0's table: `ip:port` per rank, one per line (its own line empty).
fn address_table(env: &JobEnv, peers: &[Option<(TcpStream, u16)>]) -> Result<String, CommError> {
    let mut lines = vec![String::new()];
    for p in &peers[1..] {
        let (s, port) = p.as_ref().expect("accepted");
        let ip: IpAddr = s.peer_addr().map_err(|e| err(env, e))?.ip();
        lines.push(SocketAddr::new(ip, *port).to_string());
    }
    Ok(lines.join("\n"))
}

/// The address table rank 0 sent. A loopback entry is a rank on rank 0's host that reached it
/// through a loopback name: from here, it is at the address we reached rank 0 at (`host0`).
fn read_table(env: &JobEnv, s: &mut TcpStream, deadline: Instant, host0: IpAddr) -> Result<Vec<SocketAddr>, CommError> {
    s.set_read_timeout(Some(deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1)))).map_err(|e| err(env, e))?;
    let mut len = [0u8; 4];
    s.read_exact(&mut len).map_err(|e| err(env, format!("no address table from rank 0: {e}")))?;
    let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
    s.read_exact(&mut body).map_err(|e| err(env, format!("address table: {e}")))?;
    let text = String::from_utf8(body).map_err(|_| err(env, "address table is not UTF-8"))?;
    let table: Vec<SocketAddr> = text
        .split('\n')
        .enumerate()
        .map(|(r, l)| if r == 0 { Ok(SocketAddr::from(([0, 0, 0, 0], 0))) } else { l.parse().map_err(|_| err(env, format!("bad address {l:?}"))) })
        .map(|a: Result<SocketAddr, CommError>| a.map(|a| if a.ip().is_loopback() { SocketAddr::new(host0, a.port()) } else { a }))
        .collect::<Result<_, _>>()?;
    if table.len() != env.world_size {
        return Err(err(env, format!("address table of {} ranks", table.len())));
    }
    Ok(table)
}
