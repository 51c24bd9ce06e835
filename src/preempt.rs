//! Graceful stop on a signal (preemption: Slurm and Kubernetes send SIGTERM some seconds before
//! SIGKILL; Ctrl-C sends SIGINT; a closed terminal SIGHUP), as Megatron's
//! `--exit-signal-handler`: [`install`] the handler once training can be saved, then after every
//! step ask [`agreed_stop`] — one 4-byte max all-reduce over the world, so every rank stops after
//! the same step whichever rank (or process) got the signal — and save before leaving. A second
//! Ctrl-C ends the process at once (exit code 130); repeated SIGTERM/SIGHUP are ignored (a
//! scheduler and a launcher may both send one: the save must not be cut short).
//!
//! ```no_run
//! # fn train_step() {}
//! # fn save() {}
//! # let world: burn_parallel::Comm = burn_parallel::LocalWorld::new(1).communicator(0);
//! burn_parallel::preempt::install();
//! loop {
//!     train_step();
//!     if let Some(signal) = burn_parallel::preempt::agreed_stop(&world).unwrap() {
//!         save();
//!         eprintln!("stopped by signal {signal}");
//!         break;
//!     }
//! }
//! ```

use std::sync::atomic::{AtomicI32, Ordering};

use crate::error::CommError;
use crate::{Comm, ReduceOp};

/// The code [`request`] takes for a time limit (not a signal number: above them all).
pub const TIME_LIMIT: i32 = 1000;

/// The first stop signal this process received (0: none).
static SIGNAL: AtomicI32 = AtomicI32::new(0);

/// A stop the program asked for ([`request`]; 0: none), kept apart from the signals so a real
/// signal after it is still a first one.
static REQUESTED: AtomicI32 = AtomicI32::new(0);

#[cfg(unix)]
extern "C" fn on_signal(sig: libc::c_int) {
    let first = SIGNAL.compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst).is_ok();
    if !first && sig == libc::SIGINT {
        // SAFETY: _exit is async-signal-safe; a second Ctrl-C means "now".
        unsafe { libc::_exit(128 + sig) }
    }
}

/// Installs the handler of SIGTERM, SIGINT and SIGHUP (idempotent), except for a signal this
/// process was told to ignore (`nohup`'s SIGHUP). Until then, and on other systems, the signals
/// keep their default action (install it once there is something to save).
pub fn install() {
    #[cfg(unix)]
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        if ignored(sig) {
            continue;
        }
        // SAFETY: the handler only touches an atomic and may call _exit (async-signal-safe).
        unsafe {
            libc::signal(sig, on_signal as *const () as libc::sighandler_t);
        }
    }
}

/// Whether `sig` is set to be ignored (e.g. SIGHUP under `nohup`).
#[cfg(unix)]
pub fn ignored(sig: libc::c_int) -> bool {
    // SAFETY: sigaction with no new action only reads the current one into `old`.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(sig, std::ptr::null(), &mut old) == 0 && old.sa_sigaction == libc::SIG_IGN
    }
}

/// Why this process wants to stop, if it does (the signal it received, else a [`request`]; no
/// communication).
pub fn requested() -> Option<i32> {
    [SIGNAL.load(Ordering::SeqCst), REQUESTED.load(Ordering::SeqCst)].into_iter().find(|&s| s != 0)
}

/// Whether any rank of `world` wants to stop ([`requested`]): every rank gets the same answer.
/// Call it at the same point of every step on every rank.
pub fn agreed_stop(world: &Comm) -> Result<Option<i32>, CommError> {
    agree(world, requested())
}

/// Every rank's `mine` combined: the largest code any rank of `world` passed, on every rank
/// (one 4-byte max all-reduce; none for a world of one).
pub fn agree(world: &Comm, mine: Option<i32>) -> Result<Option<i32>, CommError> {
    if world.size() == 1 {
        return Ok(mine);
    }
    let code = crate::comm::ops::all_reduce_scalar(mine.unwrap_or(0) as f32, ReduceOp::Max, world)? as i32;
    Ok(Some(code).filter(|&s| s != 0))
}

/// Asks this process to stop as if a signal had arrived (a program's own reason, e.g. a time
/// limit: [`TIME_LIMIT`]); 0 withdraws the request. Signals are kept apart: one arriving later
/// is still handled as a first signal.
pub fn request(code: i32) {
    REQUESTED.store(code, Ordering::SeqCst);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rank_agrees_on_what_one_rank_saw() {
        let world = crate::LocalWorld::new(3);
        let comms: Vec<Comm> = (0..3).map(|r| world.communicator(r)).collect();
        let run = |seen: [Option<i32>; 3]| -> Vec<Option<i32>> {
            std::thread::scope(|s| {
                let handles: Vec<_> = comms.iter().zip(seen).map(|(c, mine)| s.spawn(move || agree(c, mine).unwrap())).collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            })
        };
        assert_eq!(run([None, None, None]), [None, None, None]);
        assert_eq!(run([None, Some(15), None]), [Some(15); 3], "rank 1 alone got SIGTERM");
        assert_eq!(run([Some(2), None, Some(TIME_LIMIT)]), [Some(TIME_LIMIT); 3]);
        request(TIME_LIMIT);
        assert_eq!(requested(), Some(TIME_LIMIT));
        request(0);
        assert_eq!(requested(), None);
    }
}
