//! CUDA helpers (feature `cuda`).

use std::path::PathBuf;

use cubecl_runtime::config::{cache::CacheConfig, CubeClRuntimeConfig, RuntimeConfig};

/// Turns on cubecl's persistent kernel-compilation and autotune caches under `dir` (default:
/// `$XDG_CACHE_HOME/burn-parallel/cubecl`, else `~/.cache/burn-parallel/cubecl`), unless a
/// `cubecl.toml` / `burn.toml` in the working directory already configures cubecl. A first GPT
/// step compiles kernels for minutes; with the caches the next run starts in seconds.
/// Call it once, before the first CUDA tensor is created. Returns the cache directory.
pub fn enable_kernel_caches(dir: Option<PathBuf>) -> PathBuf {
    let dir = dir.unwrap_or_else(default_cache_dir);
    let has_file = ["cubecl.toml", "CubeCL.toml", "burn.toml", "Burn.toml"].iter().any(|f| PathBuf::from(f).exists());
    if !has_file {
        let _ = std::fs::create_dir_all(&dir);
        let mut config = CubeClRuntimeConfig::default();
        config.compilation.cache = Some(CacheConfig::File(dir.clone()));
        config.autotune.cache = CacheConfig::File(dir.clone());
        CubeClRuntimeConfig::set(config);
    }
    dir
}

fn default_cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("burn-parallel").join("cubecl")
}

/// Checks, before anything touches a CUDA device, that the CUDA driver (`libcuda.so`) and
/// NVRTC (`libnvrtc.so`, cubecl compiles its kernels with it) can be loaded and that there is a
/// device. Without this, burn-cuda panics inside cudarc on a device thread and the rank dies on
/// a `RecvError`. Returns the number of devices.
pub fn check_cuda() -> Result<usize, String> {
    // SAFETY: only tries to dlopen the candidate library names.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(
            "no CUDA driver: `libcuda.so` cannot be loaded (install the NVIDIA driver; in a container, start it with the GPU runtime); run with --device cpu"
                .into(),
        );
    }
    let nvrtc = cudarc::get_lib_name_candidates("nvrtc").into_iter().any(|name| {
        let Ok(c) = std::ffi::CString::new(name) else { return false };
        // SAFETY: dlopen of a library name, closed again at once.
        unsafe {
            let h = libc::dlopen(c.as_ptr(), libc::RTLD_LAZY);
            if !h.is_null() {
                libc::dlclose(h);
            }
            !h.is_null()
        }
    });
    if !nvrtc {
        return Err(
            "NVRTC not found: `libnvrtc.so` cannot be loaded (install the CUDA toolkit's NVRTC, or put /usr/local/cuda/lib64 on LD_LIBRARY_PATH)".into()
        );
    }
    cudarc::driver::result::init().map_err(|e| format!("the CUDA driver failed to initialise: {e:?}"))?;
    let n = cudarc::driver::result::device::get_count().map_err(|e| format!("the CUDA driver cannot count devices: {e:?}"))?;
    if n < 1 {
        return Err("the CUDA driver reports no device".into());
    }
    Ok(n as usize)
}

/// The dense peak TFLOP/s of device `ordinal` (bf16 tensor cores, or f32 without them) for the
/// cards this project knows (H100/H200 SXM: 989 / 67; A100: 312 / 19.5); `None` otherwise.
pub fn dense_peak_tflops(ordinal: usize, bf16: bool) -> Option<f64> {
    check_cuda().ok()?;
    let dev = cudarc::driver::result::device::get(ordinal as i32).ok()?;
    let name = cudarc::driver::result::device::get_name(dev).ok()?;
    let table = [("H200", 989.0, 67.0), ("H100", 989.0, 67.0), ("A100", 312.0, 19.5)];
    table.iter().find(|(n, _, _)| name.contains(n)).map(|&(_, b, f)| if bf16 { b } else { f })
}

/// Bytes of CUDA memory in use on `device` by this thread's stream (cubecl's memory pools, after
/// draining the stream; cubecl keeps no peak).
pub fn memory_in_use(device: &burn::backend::cuda::CudaDevice) -> Result<u64, String> {
    crate::memory::cube_bytes_in_use::<burn::backend::Cuda, burn_cubecl::cubecl::cuda::CudaRuntime>(device)
}

/// Checks that NCCL can be loaded, without cudarc's panic when it cannot: cudarc looks for
/// `libnccl.so` (and versioned names, but never `libnccl.so.2` alone). Returns NCCL's version
/// (e.g. 22803 for 2.28.3).
pub fn nccl_version() -> Result<i32, crate::CommError> {
    // SAFETY: only tries to dlopen the candidate library names.
    if !unsafe { cudarc::nccl::sys::is_culib_present() } {
        return Err(crate::CommError::Backend(
            "NCCL not found: cudarc loads `libnccl.so`. Install NCCL's development package \
             (e.g. `libnccl-dev`), or create a directory with a symlink `libnccl.so -> libnccl.so.2` \
             and put it on LD_LIBRARY_PATH before starting the process"
                .into(),
        ));
    }
    cudarc::nccl::result::get_nccl_version().map_err(|e| crate::CommError::Backend(format!("NCCL failed to report its version: {e:?}")))
}

#[cfg(test)]
mod tests {
    /// Without a driver (CI) a one-line error naming the library, not a panic; with a GPU the
    /// device count.
    #[test]
    fn cuda_probe_never_panics() {
        match super::check_cuda() {
            Ok(n) => assert!(n >= 1),
            Err(e) => assert!(["libcuda.so", "libnvrtc.so", "no device", "failed to initialise", "cannot count devices"].iter().any(|m| e.contains(m)), "{e}"),
        }
    }

    /// On a machine without NCCL (CI) this must be a clear error, not cudarc's panic; with NCCL
    /// (the GPU machine) a 2.x version.
    #[test]
    fn nccl_probe_never_panics() {
        match super::nccl_version() {
            Ok(v) => assert!(v >= 20000, "NCCL version {v}"),
            Err(e) => assert!(e.to_string().contains("NCCL not found") && e.to_string().contains("libnccl.so"), "{e}"),
        }
    }
}
