//! Running a world of ranks as threads: the driver behind the tests, the example and the benches.

use std::fmt::Display;
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::collective::take_comm_error;
use crate::comm::{Comm, LocalWorld, LocalWorldOptions};
use crate::error::RankError;

/// Runs `f` on `size` threads, rank `r` getting the world communicator of rank `r`, and returns
/// each rank's result in rank order. A rank that returns an error or panics is marked failed, so
/// peers blocked on it fail promptly (with [`CommError::PeerGone`](crate::CommError::PeerGone))
/// instead of waiting for the timeout; collectives failing inside forward/backward come back as
/// [`RankError::Comm`].
pub fn run_world<T, E, F>(size: usize, options: LocalWorldOptions, f: F) -> Vec<Result<T, RankError>>
where
    T: Send,
    E: Display,
    F: Fn(Comm) -> Result<T, E> + Send + Sync,
{
    let world = LocalWorld::with_options(size, options);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..size)
            .map(|rank| {
                let (world, f) = (&world, &f);
                std::thread::Builder::new()
                    .name(format!("rank-{rank}"))
                    .stack_size(32 << 20)
                    .spawn_scoped(s, move || run_rank(world, rank, f))
                    .expect("spawning a rank thread")
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("rank thread result")).collect()
    })
}

fn run_rank<T, E: Display>(world: &LocalWorld, rank: usize, f: &(dyn Fn(Comm) -> Result<T, E> + Sync)) -> Result<T, RankError> {
    // Allocations of this thread count as the rank's (where the tracking allocator is installed).
    crate::memory::set_rank(Some(rank));
    let out = catch_unwind(AssertUnwindSafe(|| f(world.communicator(rank))));
    let result = match out {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(RankError::Failed { rank, message: e.to_string() }),
        Err(payload) => Err(match take_comm_error() {
            Some(error) => RankError::Comm { rank, error },
            None => RankError::Panicked { rank, message: panic_message(&payload) },
        }),
    };
    match &result {
        Ok(_) => world.mark_exited(rank),
        Err(e) => world.mark_failed(rank, e.to_string()),
    }
    result
}

fn panic_message(payload: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".into()
    }
}

/// Every rank's value, or the first error (in rank order) with every failure listed.
pub fn all_ok<T>(results: Vec<Result<T, RankError>>) -> Result<Vec<T>, String> {
    let errors: Vec<String> = results.iter().filter_map(|r| r.as_ref().err().map(|e| e.to_string())).collect();
    if errors.is_empty() {
        Ok(results.into_iter().map(|r| r.unwrap_or_else(|_| unreachable!("checked"))).collect())
    } else {
        Err(errors.join("\n"))
    }
}
