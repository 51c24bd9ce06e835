//! The devices the example runs on: CUDA (thread ranks sharing GPU 0, or one NCCL process per
//! rank and GPU), wgpu (thread ranks sharing the default adapter), the CPU as one TCP process per
//! rank, and what each rank's device holds after training ([`DeviceBytes`]).

use std::time::Duration;

use super::{Args, CommKind, DeviceKind, Summary};
use crate::checkpointing::Start;
use crate::corpus::Corpus;

/// Device memory a rank's stream holds (cubecl's pools, after the queued work ran; cubecl
/// keeps no peak). `None` on the CPU, where the tracking allocator measures each rank thread's
/// peak instead.
pub(crate) trait DeviceBytes: burn::tensor::backend::Backend {
    fn bytes_in_use(_device: &Self::Device) -> Option<u64> {
        None
    }
}

impl DeviceBytes for burn::backend::Autodiff<burn::backend::Flex> {}

#[cfg(feature = "wgpu")]
impl DeviceBytes for burn::backend::Autodiff<burn::backend::Wgpu> {
    fn bytes_in_use(device: &Self::Device) -> Option<u64> {
        use burn::backend::{wgpu::WgpuRuntime, Wgpu};
        burn_parallel::memory::cube_bytes_in_use::<Wgpu, WgpuRuntime>(device).map_err(|e| tracing::warn!(error = %e, "wgpu memory usage")).ok()
    }
}

#[cfg(feature = "cuda")]
impl DeviceBytes for burn::backend::Autodiff<burn::backend::Cuda> {
    fn bytes_in_use(device: &Self::Device) -> Option<u64> {
        burn_parallel::cuda::memory_in_use(device).map_err(|e| tracing::warn!(error = %e, "CUDA memory usage")).ok()
    }
}

/// The detected card's dense peak TFLOP/s for the MFU line (CUDA only).
#[cfg(feature = "cuda")]
pub(crate) fn detected_peak(args: &Args) -> Option<f64> {
    if args.device != DeviceKind::Cuda {
        return None;
    }
    burn_parallel::cuda::dense_peak_tflops(0, args.precision == burn_parallel::precision::Precision::Bf16)
}

#[cfg(not(feature = "cuda"))]
pub(crate) fn detected_peak(_: &Args) -> Option<f64> {
    None
}

/// `--device cuda`: thread ranks on GPU 0 (`--comm local`) or this process as one NCCL rank.
#[cfg(feature = "cuda")]
pub(crate) fn run_cuda(args: &Args, data: &Corpus, start: &Start) -> Result<Vec<Summary>, String> {
    let devices = burn_parallel::cuda::check_cuda().map_err(|e| format!("--device cuda: {e}"))?;
    tracing::info!(devices, "CUDA");
    let dir = burn_parallel::cuda::enable_kernel_caches(args.kernel_cache.clone());
    tracing::info!(cache = %dir.display(), "cubecl kernel and autotune caches");
    if args.comm == CommKind::Nccl {
        return run_nccl(args, data, start).map(|s| vec![s]);
    }
    super::run::<burn::backend::Autodiff<burn::backend::Cuda>>(args, Default::default(), data, start)
}

/// This process is one rank of a launched job; NCCL connects it to the others.
#[cfg(feature = "cuda")]
fn run_nccl(args: &Args, data: &Corpus, start: &Start) -> Result<Summary, String> {
    type B = burn::backend::Autodiff<burn::backend::Cuda>;
    let env = job_env(args)?;
    let comm = burn_parallel::NcclComm::from_env(&env).map_err(|e| e.to_string())?;
    let device = burn::backend::cuda::CudaDevice::new(env.local_rank);
    tracing::info!(rank = env.rank, world = env.world_size, gpu = env.local_rank, "NCCL rank");
    super::prepare::<B>(args, &device)?;
    if args.pp > 1 {
        return crate::pipelined::train_rank::<B>(args, comm, device, data, start);
    }
    super::train_rank::<B>(args, comm, device, data, start)
}

/// `--comm tcp`: this process is one CPU rank of a launched job; TCP connects it to the others
/// (`burn_parallel::TcpComm`). Everything this process allocates is this rank's (its memory row).
pub(crate) fn run_tcp(args: &Args, data: &Corpus, start: &Start) -> Result<Summary, String> {
    type B = burn::backend::Autodiff<burn::backend::Flex>;
    let env = job_env(args)?;
    burn_parallel::memory::set_rank(Some(env.rank));
    let comm = burn_parallel::TcpComm::from_env(&env).map_err(|e| e.to_string())?;
    tracing::info!(rank = env.rank, world = env.world_size, "TCP rank");
    let device = Default::default();
    let result = super::prepare::<B>(args, &device).and_then(|_| match args.pp {
        1 => super::train_rank::<B>(args, comm.clone(), device, data, start),
        _ => crate::pipelined::train_rank::<B>(args, comm.clone(), device, data, start),
    });
    if let (Err(e), Some(tcp)) = (&result, comm.as_any().downcast_ref::<burn_parallel::TcpComm>()) {
        // The other ranks fail naming this one and why (not "its connection closed").
        tcp.abort(e);
    }
    result
}

/// This process's place in a launched job (torchrun/Slurm variables; without them a world of
/// one), checked against the layout's world size; `--timeout-secs` bounds every wait.
fn job_env(args: &Args) -> Result<burn_parallel::launch::JobEnv, String> {
    use burn_parallel::launch::{JobEnv, JobEnvError};
    let env = match JobEnv::from_env() {
        Ok(env) => env,
        Err(JobEnvError::Missing) => JobEnv::from_lookup(|k| match k {
            "RANK" => Some("0".into()),
            "WORLD_SIZE" => Some("1".into()),
            _ => std::env::var(k).ok(),
        })
        .map_err(|e| e.to_string())?,
        Err(e) => return Err(e.to_string()),
    };
    // Cold CUDA kernel compilation can keep one rank minutes away from the first collective.
    let env = JobEnv { timeout: Duration::from_secs(args.timeout_secs), ..env };
    let world = args.world();
    if env.world_size != world {
        return Err(format!("WORLD_SIZE={} but --dp {} x --cp {} x --pp {} x --tp {} = {world}", env.world_size, args.dp, args.cp, args.pp, args.tp));
    }
    Ok(env)
}

#[cfg(not(feature = "cuda"))]
pub(crate) fn run_cuda(_: &Args, _: &Corpus, _: &Start) -> Result<Vec<Summary>, String> {
    let _ = (CommKind::Nccl, DeviceKind::Cuda);
    Err("this binary was built without CUDA: rebuild with `--features cuda` (and CUDARC_CUDA_VERSION=13000)".into())
}

/// `--device wgpu`: thread ranks on the default adapter.
#[cfg(feature = "wgpu")]
pub(crate) fn run_wgpu(args: &Args, data: &Corpus, start: &Start) -> Result<Vec<Summary>, String> {
    super::run::<burn::backend::Autodiff<burn::backend::Wgpu>>(args, Default::default(), data, start)
}

#[cfg(not(feature = "wgpu"))]
pub(crate) fn run_wgpu(_: &Args, _: &Corpus, _: &Start) -> Result<Vec<Summary>, String> {
    Err("this binary was built without wgpu: rebuild with `--features wgpu`".into())
}
