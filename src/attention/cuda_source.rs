//! The flash-attention kernels as CUDA C++ for an H100, without a GPU (feature `cuda-source`;
//! see [`crate::cuda_source`]).

use burn::tensor::DType;
use burn_cubecl::cubecl;
use cubecl::client::ComputeClient;
use cubecl::ir::StorageType;
use cubecl::prelude::*;
use cubecl::KernelSettings;
use cubecl_runtime::compiler::CubeTask;
use cubecl_runtime::kernel::KernelTask;

use super::cube::{shared_bytes, tc_shared_bytes, tc_tiles, tiles, Kernel};
use super::kernels;
use super::kernels::TcTiles;
use crate::cuda_source::{compile, CudaCompiler, CudaKernelSource, H100_SHARED, H100_UNITS};

/// The CUDA C++ of the forward, dq and dk/dv kernels for heads of width `d` and inputs of
/// `dtype` (f32, f16 or bf16), with the tiles an H100 gets, with CubeCL's bounds checks
/// (`checked`, the tests' launches) or without (the library's); for f16/bf16 also the
/// tensor-core kernels (`forward_tc`, `dq_tc`, `dkv_tc`; 16 × 16 × 16 fragments in 32-lane
/// planes: an H100's), which the library runs instead of the FMA ones there. `client` is any CubeCL client: only its type
/// registry is used to expand the kernels (wgpu over lavapipe here).
pub fn attention_cuda_sources<R: Runtime>(client: &ComputeClient<R>, d: usize, dtype: DType, checked: bool) -> Result<Vec<CudaKernelSource>, String> {
    let elem: StorageType = dtype.into();
    let mut sources = fma_sources(client, d, dtype, checked)?;
    if matches!(dtype, DType::F16 | DType::BF16) {
        for kernel in [Kernel::Forward, Kernel::Dq, Kernel::Dkv] {
            if let Some(t) = tc_tiles(kernel, d, 16, 32, H100_SHARED, H100_UNITS) {
                sources.push(
                    tc_source(client, kernel, t, elem, checked)
                        .map_err(|e| format!("CUDA C++ of the tensor-core {} at d {d} ({dtype:?}): {e}", kernel.name()))?,
                );
            }
        }
    }
    Ok(sources)
}

/// One tensor-core kernel's source (see [`attention_cuda_sources`]).
fn tc_source<R: Runtime>(client: &ComputeClient<R>, kernel: Kernel, t: TcTiles, elem: StorageType, checked: bool) -> Result<CudaKernelSource, String> {
    let settings = KernelSettings::default().cube_dim(CubeDim::new_2d(t.lanes as u32, t.planes as u32));
    let arg = || TensorCompilationArg { inplace: None };
    let (task, name): (Box<dyn CubeTask<CudaCompiler>>, _) = match kernel {
        Kernel::Forward => {
            let k =
                kernels::attn_forward_tc_kernel::AttnForwardTcKernel::<R>::new(settings, client.clone(), arg(), arg(), arg(), arg(), arg(), (), (), t, elem);
            (Box::new(KernelTask::new(k)), "forward_tc")
        }
        Kernel::Dq => {
            let k = kernels::attn_backward_dq_tc_kernel::AttnBackwardDqTcKernel::<R>::new(
                settings,
                client.clone(),
                arg(),
                arg(),
                arg(),
                arg(),
                arg(),
                arg(),
                arg(),
                (),
                (),
                t,
                elem,
            );
            (Box::new(KernelTask::new(k)), "dq_tc")
        }
        Kernel::Dkv => {
            let args = [(); 8].map(|_| arg());
            let [a0, a1, a2, a3, a4, a5, a6, a7] = args;
            let k = kernels::attn_backward_dkv_tc_kernel::AttnBackwardDkvTcKernel::<R>::new(
                settings,
                client.clone(),
                a0,
                a1,
                a2,
                a3,
                a4,
                a5,
                a6,
                a7,
                (),
                (),
                t,
                elem,
            );
            (Box::new(KernelTask::new(k)), "dkv_tc")
        }
    };
    let (entry, source, shared) = compile(task, checked)?;
    Ok(CudaKernelSource {
        family: "attention",
        kernel: name,
        entry,
        geometry: format!("{}×{} tile, {} planes of {}, {}×{}×{} fragments", t.rows(), t.cols, t.planes, t.lanes, t.f, t.f, t.f),
        units: t.units(),
        checked,
        shared_bytes: shared,
        budget_bytes: Some(tc_shared_bytes(kernel, t)),
        source,
    })
}

/// The FMA kernels' sources (see [`attention_cuda_sources`]).
fn fma_sources<R: Runtime>(client: &ComputeClient<R>, d: usize, dtype: DType, checked: bool) -> Result<Vec<CudaKernelSource>, String> {
    let elem: StorageType = dtype.into();
    [Kernel::Forward, Kernel::Dq, Kernel::Dkv]
        .into_iter()
        .map(|kernel| {
            let t = tiles(kernel, d, H100_SHARED, H100_UNITS)?;
            let settings = KernelSettings::default().cube_dim(CubeDim::new_2d(t.tx as u32, t.ty as u32));
            // The generated kernel structs take the tensors' compilation arguments, the scalars',
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
            let (entry, source, shared) = compile(task, checked).map_err(|e| format!("CUDA C++ of the {} kernel at d {d} ({dtype:?}): {e}", kernel.name()))?;
            Ok(CudaKernelSource {
                family: "attention",
                kernel: kernel.name(),
                entry,
                geometry: format!("{}×{} tile, {}×{} units, vectors of {}", t.rows, t.cols, t.tx, t.ty, t.vec),
                units: t.tx * t.ty,
                checked,
                shared_bytes: shared,
                budget_bytes: Some(shared_bytes(kernel, t)),
                source,
            })
        })
        .collect()
}
