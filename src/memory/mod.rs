//! Memory per rank: measured ([`tracker`]: host allocations attributed to rank threads) and
//! predicted ([`model`]: from the shapes, the layout and the options).

pub mod model;
mod plan;
mod steps;
mod table;
pub mod tracker;

pub use model::{estimate, GptShape, RankMemory, TrainPlan};
pub use tracker::{adopt, current, installed, peak, peak_of, reset_peak, set_rank, TrackingAllocator};

/// Bytes of device memory in use on `device` of a Cube backend `B` on runtime `R` (cubecl's
/// memory pools, as this thread's stream sees them; cubecl keeps no peak), after `B::sync`:
/// under `Fusion` (burn's `Cuda`, `Wgpu`) that first runs the queued operations, which the
/// runtime client's own sync would leave unexecuted and uncounted.
/// `cube_bytes_in_use::<Cuda, CudaRuntime>(&device)`, `cube_bytes_in_use::<Wgpu, WgpuRuntime>(..)`.
#[cfg(feature = "cube")]
pub fn cube_bytes_in_use<B, R>(device: &B::Device) -> Result<u64, String>
where
    B: burn::tensor::backend::Backend,
    R: burn_cubecl::cubecl::Runtime<Device = B::Device>,
{
    B::sync(device).map_err(|e| format!("synchronising: {e:?}"))?;
    R::client(device).memory_usage().map(|u| u.bytes_in_use).map_err(|e| format!("memory usage: {e:?}"))
}
