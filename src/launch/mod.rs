//! Multi-process runs: where a process sits in the job (torchrun and Slurm conventions), the TCP
//! rendezvous that hands every rank the same bootstrap blob (e.g. an NCCL unique id), and the
//! `burn-parallel launch` process launcher.

mod coordinator;
mod env;
mod launcher;
mod nodes;
mod rendezvous;

pub use env::{job_id_from, JobEnv, JobEnvError, MAX_JOB_ID};
pub use launcher::{launch, LaunchOptions};
pub(crate) use rendezvous::every_interface;
pub use rendezvous::{rendezvous, RendezvousError, MAX_PAYLOAD};
