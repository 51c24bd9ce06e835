//! Which layer-norm kernel runs, with which compile-time geometry, for rows of a width and dtype
//! on a device: the launch code's decisions as data, so that the CUDA C++ of exactly the
//! launched kernels can be written without a GPU (`crate::cuda_source`).

use burn::tensor::DType;
use burn_cubecl::cubecl::client::ComputeClient;
use burn_cubecl::cubecl::features::Plane;
use burn_cubecl::CubeRuntime;

use super::super::cube_vec;
use super::super::{affine_staging, backward_cache, backward_lean, backward_prefetch, forward_cache, variant, vector_cache, LnKernel};

/// What the launches read of a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RowDevice {
    /// Bits per efficient load (cubecl's `load_width`) and the widest vector the runtime takes:
    /// the vector of a row is the widest power of two within both that divides it (cubecl's
    /// `io_optimized_vector_sizes`).
    pub load_bits: usize,
    pub max_vector: usize,
    /// Units per cube, along x included; and along y (the partials' sum lays lanes there).
    pub max_units: usize,
    pub max_units_y: usize,
    /// Plane ops of exactly 32 lanes.
    pub plane: bool,
}

impl RowDevice {
    pub(crate) fn of<R: CubeRuntime>(client: &ComputeClient<R>) -> Self {
        let hw = &client.properties().hardware;
        let plane = client.features().plane.contains(Plane::Ops) && hw.plane_size_min == 32 && hw.plane_size_max == 32;
        let max_units = hw.max_units_per_cube.min(hw.max_cube_dim.0) as usize;
        let max_units_y = hw.max_units_per_cube.min(hw.max_cube_dim.1) as usize;
        Self { load_bits: hw.load_width as usize, max_vector: hw.max_vector_size, max_units, max_units_y, plane }
    }

    /// cubecl-cuda's properties on an H100 (and any CUDA device of compute capability ≥ 7).
    #[cfg(feature = "cuda-source")]
    pub(crate) fn cuda() -> Self {
        Self { load_bits: 128, max_vector: usize::MAX, max_units: 1024, max_units_y: 1024, plane: true }
    }

    /// The widest vector of `size`-byte elements that divides `h`.
    fn vector(&self, h: usize, size: usize) -> usize {
        let widest = (self.load_bits / (8 * size)).min(self.max_vector).max(1);
        let mut v = 1 << widest.trailing_zeros();
        while v > 1 && !h.is_multiple_of(v) {
            v /= 2;
        }
        v
    }
}

/// `v4`'s row geometry: `(vector, block, rows per cube, vectors per unit)`, if `v4` is selected
/// and the row fits a register cache of `cache` f32 values (`cube_vec::geometry`).
fn vectorized(dev: &RowDevice, h: usize, dtype: DType, one_plane: bool, cache: usize) -> Option<(usize, usize, usize, usize)> {
    if variant() != LnKernel::Vectorized {
        return None;
    }
    let vector = dev.vector(h, dtype.size());
    let (block, rows, per_unit) = cube_vec::geometry(h, vector, dev.max_units, cache, one_plane)?;
    Some((vector, block, rows, per_unit))
}

/// `v4`'s forward launch (its compile-time arguments).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ForwardPlan {
    pub vector: usize,
    pub block: usize,
    pub rows: usize,
    pub per_unit: usize,
    pub plane: bool,
    /// γ/β staged in shared memory (the experimental knob, where a cube holds several rows and
    /// they take ≤ 16 KiB as f32).
    pub stage: bool,
}

/// The forward `v4` launches for rows of width `h`, or `None` (then `v1` runs).
pub(crate) fn forward_plan(dev: &RowDevice, h: usize, dtype: DType) -> Option<ForwardPlan> {
    let (vector, block, rows, per_unit) = vectorized(dev, h, dtype, true, forward_cache(dtype.size()))?;
    let stage = rows > 1 && 2 * block * per_unit * vector * 4 <= 16 << 10 && affine_staging();
    Some(ForwardPlan { vector, block, rows, per_unit, plane: dev.plane, stage })
}

/// `v4`'s one-pass backward launch (its compile-time arguments; rows per cube follow `block`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BackwardPlan {
    pub vector: usize,
    pub block: usize,
    pub per_unit: usize,
    pub plane: bool,
    pub prefetch: bool,
    pub lean: bool,
}

/// The backward `v4` launches for rows of width `h`, or `None` (then `v1` runs). It holds four
/// cached arrays: the plain register cache, no one-plane rows with 32 values per array (they
/// would spill); half of it for rows that fill a 256-unit cube anyway (more units, fewer
/// registers each: on the H200 6–16% faster at h = 4096 and 8192, slower at h ≤ 1024), unless
/// `set_backward_cache` says otherwise.
pub(crate) fn backward_plan(dev: &RowDevice, h: usize, dtype: DType) -> Option<BackwardPlan> {
    let cache = vector_cache();
    let g = vectorized(dev, h, dtype, false, cache)?;
    let (vector, block, _, per_unit) = match backward_cache() {
        Some(c) => vectorized(dev, h, dtype, false, c).unwrap_or(g),
        None if g.1 >= 256 => vectorized(dev, h, dtype, false, cache / 2).unwrap_or(g),
        None => g,
    };
    Some(BackwardPlan { vector, block, per_unit, plane: dev.plane, prefetch: backward_prefetch(), lean: backward_lean() })
}

/// Lanes over chunks of the partials' column-sum kernel (a power of two, 32 columns per cube).
pub(crate) fn partials_lanes(dev: &RowDevice) -> usize {
    let lanes = (dev.max_units_y / 32).clamp(1, 32);
    1 << lanes.ilog2()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vector rule is cubecl's `io_optimized_vector_sizes` (the widest power of two within
    /// the load width and the runtime's maximum that divides the row).
    #[test]
    fn row_vectors_follow_the_load_width() {
        let cuda = RowDevice { load_bits: 128, max_vector: usize::MAX, max_units: 1024, max_units_y: 1024, plane: true };
        for (h, size, vector) in [(768, 4, 4), (768, 2, 8), (1600, 2, 8), (1004, 2, 4), (6, 4, 2), (7, 2, 1), (4096, 1, 16)] {
            assert_eq!(cuda.vector(h, size), vector, "h {h}, {size}-byte elements");
        }
        let narrow = RowDevice { max_vector: 4, ..cuda };
        assert_eq!(narrow.vector(768, 2), 4);
    }

    #[cfg(feature = "wgpu")]
    #[test]
    fn row_vectors_match_the_clients_own() {
        use burn::backend::wgpu::{WgpuDevice, WgpuRuntime};
        use burn_cubecl::cubecl::Runtime;
        let client = WgpuRuntime::client(&WgpuDevice::default());
        let dev = RowDevice::of(&client);
        for size in [1, 2, 4] {
            for h in [1, 2, 3, 6, 12, 96, 100, 768, 1600, 4097] {
                let expected = client.io_optimized_vector_sizes(size).find(|v| h % v == 0).unwrap_or(1);
                assert_eq!(dev.vector(h, size), expected, "h {h}, {size}-byte elements");
            }
        }
    }
}
