//! The layer-norm kernels as CUDA C++ for an H100, without a GPU (feature `cuda-source`; see
//! [`crate::cuda_source`]).

use burn::tensor::DType;
use burn_cubecl::cubecl;
use cubecl::client::ComputeClient;
use cubecl::ir::StorageType;
use cubecl::prelude::*;
use cubecl::KernelSettings;
use cubecl_runtime::compiler::CubeTask;
use cubecl_runtime::kernel::KernelTask;

use super::cube::kernel as v1;
use super::cube::plan::{backward_plan, forward_plan, partials_lanes, RowDevice};
use super::cube::BLOCK;
use super::cube_vec::{self, rows_per_cube};
use crate::cuda_source::{compile, CudaCompiler, CudaKernelSource};

/// A tensor argument's compilation argument (not in place).
fn t() -> TensorCompilationArg {
    TensorCompilationArg { inplace: None }
}

/// One kernel to compile: its name, geometry in words, units per cube and the task.
struct Task {
    kernel: &'static str,
    geometry: String,
    units: usize,
    task: Box<dyn CubeTask<CudaCompiler>>,
}

fn settings(x: usize, y: usize) -> KernelSettings {
    KernelSettings::default().cube_dim(CubeDim::new_2d(x as u32, y as u32))
}

/// The CUDA C++ of the layer-norm kernels (and the RMS norm's `rms_forward`/`rms_backward`) the
/// library launches on an H100 for rows of width `h` in `dtype`, with the kernel variant and tuning knobs in effect (`set_variant`,
/// `set_vector_cache`, `set_affine_staging`, …): `v4`'s forward, one-pass backward and partials
/// sum, or `v1`'s forward, `dx` and dγ/dβ partials (then the same partials sum) where `v4` does
/// not take the row (also the forward of more than `u32::MAX` rows, which this listing does not
/// see: the launch decides that on the row count). With CubeCL's bounds checks (`checked`) or without (the library's `v4`
/// launches; `v1` always launches checked). `client`: any CubeCL client (its type registry).
pub fn layer_norm_cuda_sources<R: Runtime>(client: &ComputeClient<R>, h: usize, dtype: DType, checked: bool) -> Result<Vec<CudaKernelSource>, String> {
    let elem: StorageType = dtype.into();
    let dev = RowDevice::cuda();
    let mut tasks = vec![forward_task(client, &dev, h, dtype, elem, false)];
    tasks.extend(backward_tasks(client, &dev, h, dtype, elem, false));
    // The RMS norm's `v4` kernels (the composed ops run where `v4` does not take the row).
    if forward_plan(&dev, h, dtype).is_some() {
        tasks.push(forward_task(client, &dev, h, dtype, elem, true));
    }
    if backward_plan(&dev, h, dtype).is_some() {
        tasks.extend(backward_tasks(client, &dev, h, dtype, elem, true));
    }
    let lanes = partials_lanes(&dev);
    let k = cube_vec::ln_partials_sum_kernel::LnPartialsSumKernel::<R>::new(settings(32, lanes), client.clone(), t(), t(), lanes, elem);
    tasks.push(Task { kernel: "partials_sum", geometry: format!("32 columns × {lanes} lanes"), units: 32 * lanes, task: Box::new(KernelTask::new(k)) });
    tasks
        .into_iter()
        .map(|Task { kernel, geometry, units, task }| {
            // v1 launches with bounds checks (`launch`, not `launch_unchecked`).
            let checked = checked || kernel.starts_with("v1");
            let (entry, source, shared) =
                compile(task, checked).map_err(|e| format!("CUDA C++ of the layer-norm {kernel} kernel at h {h} ({dtype:?}): {e}"))?;
            Ok(CudaKernelSource { family: "layer_norm", kernel, entry, geometry, units, checked, shared_bytes: shared, budget_bytes: None, source })
        })
        .collect()
}

/// `v4`'s forward where it takes the row, else `v1`'s (`rms`: the RMS norm's, `v4` only).
fn forward_task<R: Runtime>(client: &ComputeClient<R>, dev: &RowDevice, h: usize, dtype: DType, elem: StorageType, rms: bool) -> Task {
    let Some(p) = forward_plan(dev, h, dtype) else {
        let k = v1::ln_forward_kernel::LnForwardKernel::<R>::new(settings(BLOCK as usize, 1), client.clone(), t(), t(), t(), t(), t(), t(), (), BLOCK, elem);
        return Task { kernel: "v1_forward", geometry: format!("{BLOCK} units per row"), units: BLOCK as usize, task: Box::new(KernelTask::new(k)) };
    };
    let geometry = format!("{} units × {} rows, {} vectors of {} per unit, planes {}, staging {}", p.block, p.rows, p.per_unit, p.vector, p.plane, p.stage);
    // Tensors x, γ, β, y, μ, r; scalars n, n_vec, 1/h, ε; the vector size; the comptime geometry.
    let k = cube_vec::ln_forward_vec_kernel::LnForwardVecKernel::<R>::new(
        settings(p.block, p.rows),
        client.clone(),
        t(),
        t(),
        t(),
        t(),
        t(),
        t(),
        (),
        (),
        (),
        (),
        p.vector,
        p.block,
        p.rows,
        p.per_unit,
        p.plane,
        p.stage,
        rms,
        elem,
    );
    let kernel = if rms { "rms_forward" } else { "forward" };
    Task { kernel, geometry, units: p.block * p.rows, task: Box::new(KernelTask::new(k)) }
}

/// `v4`'s one-pass backward where it takes the row, else `v1`'s `dx` and dγ/dβ partials (`rms`:
/// the RMS norm's, `v4` only).
fn backward_tasks<R: Runtime>(client: &ComputeClient<R>, dev: &RowDevice, h: usize, dtype: DType, elem: StorageType, rms: bool) -> Vec<Task> {
    let Some(p) = backward_plan(dev, h, dtype) else {
        let units = BLOCK as usize;
        let dx = v1::ln_backward_dx_kernel::LnBackwardDxKernel::<R>::new(settings(units, 1), client.clone(), t(), t(), t(), t(), t(), t(), BLOCK, elem);
        let params = v1::ln_backward_params_kernel::LnBackwardParamsKernel::<R>::new(settings(units, 1), client.clone(), t(), t(), t(), t(), t(), (), elem);
        return vec![
            Task { kernel: "v1_backward_dx", geometry: format!("{BLOCK} units per row"), units, task: Box::new(KernelTask::new(dx)) },
            Task { kernel: "v1_backward_params", geometry: format!("{BLOCK} columns per cube"), units, task: Box::new(KernelTask::new(params)) },
        ];
    };
    let rows = rows_per_cube(p.block);
    let geometry = format!(
        "{} units × {rows} rows, {} vectors of {} per unit, planes {}, prefetch {}, lean {}",
        p.block, p.per_unit, p.vector, p.plane, p.prefetch, p.lean
    );
    // Tensors dy, x, γ, μ, r, dx, partials; the vector size; the comptime geometry and knobs.
    let k = cube_vec::ln_backward_fused_vec_kernel::LnBackwardFusedVecKernel::<R>::new(
        settings(p.block, rows),
        client.clone(),
        t(),
        t(),
        t(),
        t(),
        t(),
        t(),
        t(),
        p.vector,
        p.block,
        p.per_unit,
        p.plane,
        p.prefetch,
        p.lean,
        rms,
        elem,
    );
    let kernel = if rms { "rms_backward" } else { "backward" };
    vec![Task { kernel, geometry, units: p.block * rows, task: Box::new(KernelTask::new(k)) }]
}
