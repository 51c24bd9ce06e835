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
