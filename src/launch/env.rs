//! Reading a process's place in the job from the environment.
//!
//! torchrun: `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`.
//! Slurm (`srun`): `SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`, `SLURM_NTASKS_PER_NODE`, and
//! the master is the first host of `SLURM_JOB_NODELIST` (simple lists and `prefix[a-b,c]` ranges)
//! unless `MASTER_ADDR` is set; the port comes from `MASTER_PORT` (default 29500).
//!
//! The job id, which the rendezvous checks so that two jobs given one port never mix their
//! ranks: `BURN_PARALLEL_JOB_ID` (`burn-parallel launch` sets it), else torchrun's
//! `TORCHELASTIC_RUN_ID` (its `--rdzv-id`), else Slurm's `SLURM_JOB_ID` with `.SLURM_STEP_ID`
//! (two steps of one allocation are two jobs), else none (the empty id).

use std::time::Duration;

/// A process's coordinates in a multi-process job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobEnv {
    /// Global rank.
    pub rank: usize,
    /// Number of processes.
    pub world_size: usize,
    /// Rank on this node (selects the GPU).
    pub local_rank: usize,
    /// Processes on this node.
    pub local_world_size: usize,
    /// Host of rank 0's rendezvous server.
    pub master_addr: String,
    /// Its port.
    pub master_port: u16,
    /// How long the rendezvous waits (env `BURN_PARALLEL_TIMEOUT_SECS`, default 300 s).
    pub timeout: Duration,
    /// Which job this process belongs to (empty: none given); at most [`MAX_JOB_ID`] bytes.
    pub job_id: String,
}

/// The longest job id, in bytes.
pub const MAX_JOB_ID: usize = 256;

/// The job id of the variables `get` reads (see the module docs; empty if none is set).
pub fn job_id_from(get: impl Fn(&str) -> Option<String>) -> Result<String, JobEnvError> {
    let slurm = || get("SLURM_JOB_ID").map(|j| ("SLURM_JOB_ID", get("SLURM_STEP_ID").map_or(j.clone(), |s| format!("{j}.{s}"))));
    let named = |var: &'static str| get(var).map(|v| (var, v));
    let (var, id) = named("BURN_PARALLEL_JOB_ID").or_else(|| named("TORCHELASTIC_RUN_ID")).or_else(slurm).unwrap_or(("", String::new()));
    match id.len() <= MAX_JOB_ID {
        true => Ok(id),
        false => Err(JobEnvError::Invalid { name: var.into(), value: id.clone(), why: format!("{} bytes, at most {MAX_JOB_ID}", id.len()) }),
    }
}

/// A missing or malformed variable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobEnvError {
    /// Neither torchrun's nor Slurm's variables are set.
    #[error(
        "no job environment: set RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT (torchrun, `burn-parallel launch`) or run under srun (SLURM_PROCID/SLURM_NTASKS)"
    )]
    Missing,
    /// A variable that is not a number, or out of range.
    #[error("invalid {name}={value:?}: {why}")]
    Invalid {
        /// Variable name.
        name: String,
        /// Its value.
        value: String,
        /// What is wrong.
        why: String,
    },
}

impl JobEnv {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, JobEnvError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Reads variables through `get` (testable without touching the process environment).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, JobEnvError> {
        let num = |name: &str| -> Result<Option<usize>, JobEnvError> {
            get(name)
                .map(|v| v.trim().parse::<usize>().map_err(|_| JobEnvError::Invalid { name: name.into(), value: v.clone(), why: "not a number".into() }))
                .transpose()
        };
        let (rank, world, local, local_world) = if let (Some(r), Some(w)) = (num("RANK")?, num("WORLD_SIZE")?) {
            (r, w, num("LOCAL_RANK")?.unwrap_or(r), num("LOCAL_WORLD_SIZE")?.unwrap_or(w))
        } else if let (Some(r), Some(w)) = (num("SLURM_PROCID")?, num("SLURM_NTASKS")?) {
            let per_node = get("SLURM_NTASKS_PER_NODE").and_then(|v| v.split('(').next().and_then(|n| n.parse().ok())).unwrap_or(w);
            (r, w, num("SLURM_LOCALID")?.unwrap_or(r), per_node)
        } else {
            return Err(JobEnvError::Missing);
        };
        if world == 0 || rank >= world {
            return Err(JobEnvError::Invalid { name: "RANK".into(), value: rank.to_string(), why: format!("must be below WORLD_SIZE={world}") });
        }
        let master_addr = match get("MASTER_ADDR") {
            Some(a) => a,
            None => match get("SLURM_JOB_NODELIST").or_else(|| get("SLURM_NODELIST")) {
                Some(list) => {
                    first_host(&list).ok_or_else(|| JobEnvError::Invalid { name: "SLURM_JOB_NODELIST".into(), value: list.clone(), why: "no host".into() })?
                }
                None if world == 1 => "127.0.0.1".into(),
                None => return Err(JobEnvError::Invalid { name: "MASTER_ADDR".into(), value: String::new(), why: "not set".into() }),
            },
        };
        let master_port = match get("MASTER_PORT") {
            Some(p) => p.trim().parse().map_err(|_| JobEnvError::Invalid { name: "MASTER_PORT".into(), value: p.clone(), why: "not a port number".into() })?,
            None => 29500,
        };
        let timeout = Duration::from_secs(num("BURN_PARALLEL_TIMEOUT_SECS")?.unwrap_or(300) as u64);
        let job_id = job_id_from(&get)?;
        Ok(Self { rank, world_size: world, local_rank: local, local_world_size: local_world, master_addr, master_port, timeout, job_id })
    }
}

/// The first host of a Slurm node list: `node[03-05,07],gpu1` → `node03`.
pub fn first_host(list: &str) -> Option<String> {
    let first = list.split(',').next()?.trim();
    match first.split_once('[') {
        None => (!first.is_empty()).then(|| first.to_string()),
        Some((prefix, rest)) => {
            let range = rest.trim_end_matches(']').split(',').next()?;
            Some(format!("{prefix}{}", range.split('-').next()?))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<JobEnv, JobEnvError> {
        let m: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        JobEnv::from_lookup(|k| m.get(k).cloned())
    }

    #[test]
    fn torchrun_and_slurm_conventions() {
        let e =
            env(&[("RANK", "3"), ("WORLD_SIZE", "8"), ("LOCAL_RANK", "1"), ("LOCAL_WORLD_SIZE", "2"), ("MASTER_ADDR", "10.0.0.1"), ("MASTER_PORT", "1234")])
                .unwrap();
        assert_eq!((e.rank, e.world_size, e.local_rank, e.local_world_size, e.master_port), (3, 8, 1, 2, 1234));
        let s = env(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_NTASKS_PER_NODE", "4(x2)"),
            ("SLURM_JOB_NODELIST", "gpu[07-08]"),
        ])
        .unwrap();
        assert_eq!((s.rank, s.local_rank, s.local_world_size, s.master_addr.as_str(), s.master_port), (5, 1, 4, "gpu07", 29500));
        assert_eq!(env(&[]).unwrap_err(), JobEnvError::Missing);
        assert!(env(&[("RANK", "8"), ("WORLD_SIZE", "8"), ("MASTER_ADDR", "h")]).unwrap_err().to_string().contains("must be below WORLD_SIZE=8"));
        assert!(env(&[("RANK", "x"), ("WORLD_SIZE", "8")]).unwrap_err().to_string().contains("invalid RANK=\"x\""));
        assert_eq!(first_host("a1,b2"), Some("a1".into()));
    }

    #[test]
    fn the_job_id_comes_from_ours_then_torchruns_then_slurms() {
        let id = |pairs: &[(&str, &str)]| {
            let mut all = vec![("RANK", "0"), ("WORLD_SIZE", "1")];
            all.extend_from_slice(pairs);
            env(&all).map(|e| e.job_id)
        };
        assert_eq!(id(&[]).unwrap(), "");
        assert_eq!(id(&[("SLURM_JOB_ID", "41"), ("SLURM_STEP_ID", "2")]).unwrap(), "41.2");
        assert_eq!(id(&[("SLURM_JOB_ID", "41")]).unwrap(), "41");
        assert_eq!(id(&[("SLURM_JOB_ID", "41"), ("TORCHELASTIC_RUN_ID", "t")]).unwrap(), "t");
        assert_eq!(id(&[("TORCHELASTIC_RUN_ID", "t"), ("BURN_PARALLEL_JOB_ID", "ours")]).unwrap(), "ours");
        let long = "x".repeat(MAX_JOB_ID + 1);
        assert!(id(&[("BURN_PARALLEL_JOB_ID", &long)]).unwrap_err().to_string().contains("257 bytes, at most 256"));
        assert!(id(&[("TORCHELASTIC_RUN_ID", &long)]).unwrap_err().to_string().contains("invalid TORCHELASTIC_RUN_ID="));
        assert_eq!(first_host("n[3,5-9]"), Some("n3".into()));
    }
}
