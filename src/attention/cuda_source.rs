//! The flash-attention kernels as CUDA C++, without a GPU (feature `cuda-source`).
//!
//! cubecl-cuda compiles a kernel only when it is first launched on a device (NVRTC at run time),
//! so a kernel that NVRTC rejects, or that needs more registers than its tiles assume, shows only
//! on the GPU. This module expands the kernels here (the `#[cube]` definitions through a wgpu
//! client's type registry) and hands their definitions to cubecl-cpp's CUDA compiler, the one
//! cubecl-cuda runs, with an H100's options (sm_90, 227 KiB of shared memory, 1024 units): the
//! CUDA C++ that cubecl-cuda would give NVRTC there. `scripts/cuda-offline-check.sh` compiles it
//! with NVRTC and `ptxas -v` from NVIDIA's wheels (no driver needed) and prints each kernel's
//! registers, spills and cubes per multiprocessor.

use burn::tensor::DType;
use burn_cubecl::cubecl;
use cubecl::client::ComputeClient;
use cubecl::ir::StorageType;
use cubecl::prelude::*;
use cubecl::{ExecutionMode, KernelSettings};
use cubecl_cpp::cuda::mma::CudaWmmaCompiler;
use cubecl_cpp::cuda::CudaDialect;
use cubecl_cpp::shared::{CompilationOptions, CppCompiler, CppSupportedFeatures};
use cubecl_runtime::compiler::CubeTask;
use cubecl_runtime::kernel::KernelTask;

use super::cube::{shared_bytes, tiles, Kernel};
use super::kernels::{self, Tiles};

/// cubecl-cuda's compiler (its `CudaCompiler`, with CUDA's own `wmma` headers).
type CudaCompiler = CppCompiler<CudaDialect<CudaWmmaCompiler>>;

/// An H100's opt-in shared memory per cube (bytes) and units per cube.
const H100_SHARED: usize = 227 << 10;
const H100_UNITS: usize = 1024;

/// One kernel's CUDA C++ and geometry.
#[derive(Debug, Clone)]
pub struct CudaKernelSource {
    /// `forward`, `dq` or `dkv`.
    pub kernel: &'static str,
    /// The entry point's name in `source`.
    pub entry: String,
    /// The tiles picked for an H100.
    pub tiles: Tiles,
    /// Shared memory of one cube (bytes), as the compiled kernel lays it out.
    pub shared_bytes: usize,
    /// Shared memory the tile picker budgeted (`tiles()`'s formula).
    pub predicted_shared_bytes: usize,
    /// The CUDA C++ cubecl-cuda gives NVRTC.
    pub source: String,
}

/// cubecl-cuda's options on an sm_90 device (`CudaRuntime`'s initialisation for arch ≥ 90).
fn sm90_options() -> CompilationOptions {
    let supports_features = CppSupportedFeatures { grid_constants: true, clusters: true, fast_math: true, fast_tanh: true, elect_sync: true };
    CompilationOptions { warp_size: 32, supports_features }
}

/// The CUDA C++ of the forward, dq and dk/dv kernels for heads of width `d` and inputs of
/// `dtype` (f32, f16 or bf16), with the tiles an H100 gets, with CubeCL's bounds checks
/// (`checked`, the tests' launches) or without (the library's). `client` is any CubeCL client:
/// only its type registry is used to expand the kernels (wgpu over lavapipe here).
pub fn attention_cuda_sources<R: Runtime>(client: &ComputeClient<R>, d: usize, dtype: DType, checked: bool) -> Result<Vec<CudaKernelSource>, String> {
    let elem: StorageType = dtype.into();
    let mode = if checked { ExecutionMode::Checked } else { ExecutionMode::Unchecked };
    [Kernel::Forward, Kernel::Dq, Kernel::Dkv]
        .into_iter()
        .map(|kernel| {
            let t = tiles(kernel, d, H100_SHARED, H100_UNITS)?;
            let settings = KernelSettings::default().cube_dim(CubeDim::new_2d(t.tx as u32, t.ty as u32));
            // The generated kernel structs take the tensors' compilation arguments, the scalar's,
            // the vector sizes `N` and `M`, the tiles and the element type, in that order.
            macro_rules! task {
                ($kernel:ident::$ty:ident, [$($tensor:ident),*]) => {
                    Box::new(KernelTask::new(kernels::$kernel::$ty::<R>::new(
                        settings,
                        client.clone(),
                        $({
                            let _ = stringify!($tensor);
                            TensorCompilationArg { inplace: None }
                        },)*
                        (),
                        t.vec,
                        t.rm(),
                        t,
                        elem,
                    )))
                };
            }
            let task: Box<dyn CubeTask<CudaCompiler>> = match kernel {
                Kernel::Forward => task!(attn_forward_kernel::AttnForwardKernel, [q, k, v, o, lse]),
                Kernel::Dq => task!(attn_backward_dq_kernel::AttnBackwardDqKernel, [dout, q, k, v, lse, delta, dq]),
                Kernel::Dkv => task!(attn_backward_dkv_kernel::AttnBackwardDkvKernel, [dout, q, k, v, lse, delta, dk, dv]),
            };
            let compiled = task
                .compile(&mut CudaCompiler::default(), &sm90_options(), mode, task.address_type())
                .map_err(|e| format!("CUDA C++ of the {} kernel at d {d} ({dtype:?}): {e:?}", kernel.name()))?;
            let shared = compiled.repr.as_ref().map_or(0, |repr| repr.shared_memory_size());
            Ok(CudaKernelSource {
                kernel: kernel.name(),
                entry: compiled.entrypoint_name,
                tiles: t,
                shared_bytes: shared,
                predicted_shared_bytes: shared_bytes(kernel, t),
                source: compiled.source,
            })
        })
        .collect()
}
