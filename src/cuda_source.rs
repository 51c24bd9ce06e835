//! Our CubeCL kernels as CUDA C++, without a GPU (feature `cuda-source`).
//!
//! cubecl-cuda compiles a kernel only when it is first launched on a device (NVRTC at run time),
//! so a kernel that NVRTC rejects, or that needs more registers than its launch assumes, shows
//! only on the GPU. This module expands the kernels here (their `#[cube]` definitions through any
//! CubeCL client's type registry: wgpu over lavapipe in CI) and hands them to cubecl-cpp's CUDA
//! compiler, the one cubecl-cuda runs, with an H100's options (sm_90, 227 KiB of shared memory,
//! 1024 units, 128-bit loads, 32-lane planes): the CUDA C++ cubecl-cuda would give NVRTC there.
//!
//! - [`attention_cuda_sources`]: the flash-attention forward, dq and dk/dv kernels for a head
//!   width and dtype, with the tiles an H100 gets.
//! - [`layer_norm_cuda_sources`]: the layer-norm kernels the library launches for rows of a
//!   width and dtype, with the geometry and tuning knobs (`kernels::set_*`) in effect.
//!
//! `examples/cuda_source.rs` writes them with a table; `scripts/cuda-offline-check.sh` compiles
//! them with NVRTC and `ptxas -v` from NVIDIA's wheels (no driver needed) and prints each kernel's
//! registers, spills and cubes per multiprocessor.

use burn_cubecl::cubecl;
use cubecl::ExecutionMode;
use cubecl_cpp::cuda::mma::CudaWmmaCompiler;
use cubecl_cpp::cuda::CudaDialect;
use cubecl_cpp::shared::{CompilationOptions, CppCompiler, CppSupportedFeatures};
use cubecl_runtime::compiler::CubeTask;

pub use crate::attention::attention_cuda_sources;
pub use crate::kernels::layer_norm_cuda_sources;

/// cubecl-cuda's compiler (its `CudaCompiler`, with CUDA's own `wmma` headers).
pub(crate) type CudaCompiler = CppCompiler<CudaDialect<CudaWmmaCompiler>>;

/// An H100's opt-in shared memory per cube (bytes).
pub(crate) const H100_SHARED: usize = 227 << 10;
/// An H100's units per cube (and along a cube's x).
pub(crate) const H100_UNITS: usize = 1024;

/// One kernel's CUDA C++ and launch geometry.
#[derive(Debug, Clone)]
pub struct CudaKernelSource {
    /// `attention` or `layer_norm`.
    pub family: &'static str,
    /// The kernel: `forward`, `dq`, `dkv` (attention); `forward`, `backward`, `partials_sum`,
    /// `v1_forward`, `v1_backward_dx`, `v1_backward_params` (layer norm).
    pub kernel: &'static str,
    /// The entry point's name in `source`.
    pub entry: String,
    /// The launch geometry, in words (tiles, units, vectors).
    pub geometry: String,
    /// Units per cube.
    pub units: usize,
    /// Compiled with CubeCL's bounds checks.
    pub checked: bool,
    /// Shared memory of one cube (bytes), as the compiled kernel lays it out.
    pub shared_bytes: usize,
    /// Shared memory the launch code budgets for it, where it sizes tiles by it (attention).
    pub budget_bytes: Option<usize>,
    /// The CUDA C++ cubecl-cuda gives NVRTC.
    pub source: String,
}

/// cubecl-cuda's options on an sm_90 device (`CudaRuntime`'s initialisation for arch ≥ 90).
fn sm90_options() -> CompilationOptions {
    let supports_features = CppSupportedFeatures { grid_constants: true, clusters: true, fast_math: true, fast_tanh: true, elect_sync: true };
    CompilationOptions { warp_size: 32, supports_features }
}

/// Compiles one kernel task to CUDA C++ as cubecl-cuda would on an H100, with CubeCL's bounds
/// checks (`checked`) or without: `(entry point, source, shared bytes)`.
pub(crate) fn compile(task: Box<dyn CubeTask<CudaCompiler>>, checked: bool) -> Result<(String, String, usize), String> {
    let mode = if checked { ExecutionMode::Checked } else { ExecutionMode::Unchecked };
    let address = task.address_type();
    let compiled = task.compile(&mut CudaCompiler::default(), &sm90_options(), mode, address).map_err(|e| format!("{e:?}"))?;
    let shared = compiled.repr.as_ref().map_or(0, |repr| repr.shared_memory_size());
    Ok((compiled.entrypoint_name, compiled.source, shared))
}
