//! Graceful stop on a signal (preemption: Slurm and Kubernetes send SIGTERM some seconds before
//! SIGKILL; Ctrl-C sends SIGINT), as Megatron's `--exit-signal-handler`: [`install`] the
//! handler once, then after every step ask [`agreed_stop`] — one 4-byte max all-reduce over the
//! world, so every rank stops after the same step whichever rank (or process) got the signal —
//! and save before leaving. A second signal ends the process at once (exit code 128 + signal).
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

use burn::tensor::TensorData;

use crate::error::CommError;
use crate::{Comm, ReduceOp};

/// The code [`request`] takes for a time limit (not a signal number: above them all).
pub const TIME_LIMIT: i32 = 1000;

/// The first stop signal this process received (0: none).
static SIGNAL: AtomicI32 = AtomicI32::new(0);

#[cfg(unix)]
extern "C" fn on_signal(sig: libc::c_int) {
    if SIGNAL.swap(sig, Ordering::SeqCst) != 0 {
        // SAFETY: _exit is async-signal-safe; a second signal means "now".
        unsafe { libc::_exit(128 + sig) }
    }
}

/// Installs the handler of SIGTERM and SIGINT (idempotent). Until then, and on other systems,
/// the signals keep their default action.
pub fn install() {
    #[cfg(unix)]
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only touches an atomic and may call _exit (async-signal-safe).
        unsafe {
            libc::signal(sig, on_signal as *const () as libc::sighandler_t);
        }
    }
}

/// The stop signal this process received, if any (no communication).
pub fn requested() -> Option<i32> {
    Some(SIGNAL.load(Ordering::SeqCst)).filter(|&s| s != 0)
}

/// Whether any rank of `world` received a stop signal: every rank gets the same answer (the
/// largest signal number any rank saw). Call it at the same point of every step on every rank.
pub fn agreed_stop(world: &Comm) -> Result<Option<i32>, CommError> {
    let mine = SIGNAL.load(Ordering::SeqCst) as f32;
    if world.size() == 1 {
        return Ok(requested());
    }
    let all = world.all_reduce(TensorData::new(vec![mine], [1]), ReduceOp::Max)?;
    let sig = all.to_vec::<f32>().map_err(|e| CommError::Backend(format!("stop flag: {e:?}")))?[0] as i32;
    Ok(Some(sig).filter(|&s| s != 0))
}

/// Sets the stop signal as if `signal` had arrived (tests, or a program that decides to stop
/// for its own reasons, e.g. a time limit: [`TIME_LIMIT`]).
pub fn request(signal: i32) {
    SIGNAL.store(signal, Ordering::SeqCst);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rank_agrees_on_a_signal_one_rank_saw() {
        let world = crate::LocalWorld::new(3);
        let comms: Vec<Comm> = (0..3).map(|r| world.communicator(r)).collect();
        let run = |comms: &[Comm]| -> Vec<Option<i32>> {
            std::thread::scope(|s| {
                comms.iter().map(|c| s.spawn(|| agreed_stop(c).unwrap())).collect::<Vec<_>>().into_iter().map(|h| h.join().unwrap()).collect()
            })
        };
        assert_eq!(run(&comms), [None, None, None]);
        request(15);
        assert_eq!(run(&comms), [Some(15); 3]);
        assert_eq!(requested(), Some(15));
        request(0);
    }
}
