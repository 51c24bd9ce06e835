//! Writes our CubeCL kernels' CUDA C++ (what cubecl-cuda gives NVRTC on an H100) without a GPU:
//! `cargo run --features cuda-source --example cuda_source -- OUT_DIR`. One `.cu` file per
//! distinct kernel and `kernels.tsv` (file, entry, family, kernel, shape, dtype, bounds checks,
//! whose launch it is (the library's or the tests'), variant, whether the library launches it by
//! default, geometry, units, shared bytes, budget)
//! for `scripts/cuda_offline_compile.py` (NVRTC and ptxas; `scripts/cuda-offline-check.sh` runs
//! both).
//!
//! - Flash attention: head widths 64 and 128 (GPT-2's and the wide heads'), 80 (the device
//!   check's odd one), 32 (the tiny preset's); f32/bf16/f16; with and without bounds checks.
//! - Layer norm: GPT-2's widths (768 to 1600), the benchmarks' (4096, 8192) and one past `v4`'s
//!   register cache (32768: `v1`); f32/bf16 (f16 by default only); the default launches, and the
//!   knobs `device_check kernels` and `ln-tune` run (`v1`, register caches, γ/β staging, backward
//!   prefetch and lean). A knob setting whose kernel is the same as an earlier one is not repeated.

use std::collections::HashSet;
use std::io::Write;

use burn::backend::wgpu::{WgpuDevice, WgpuRuntime};
use burn::tensor::DType;
use burn_cubecl::cubecl::Runtime;
use burn_parallel::cuda_source::{attention_cuda_sources, layer_norm_cuda_sources, CudaKernelSource};
use burn_parallel::kernels::{set_affine_staging, set_backward_cache, set_backward_lean, set_backward_prefetch, set_variant, set_vector_cache, LnKernel};

const DTYPES: [(DType, &str); 3] = [(DType::F32, "f32"), (DType::BF16, "bf16"), (DType::F16, "f16")];

/// Layer-norm knob settings: (name, set it). Every setting starts from the defaults.
type Knobs = (&'static str, fn());
const LN_VARIANTS: [Knobs; 11] = [
    ("default", || {}),
    ("v1", || set_variant(LnKernel::Strided)),
    ("cache 8", || set_vector_cache(8)),
    ("cache 32", || set_vector_cache(32)),
    ("backward cache 4", || set_backward_cache(Some(4))),
    ("backward cache 8", || set_backward_cache(Some(8))),
    ("backward cache 16", || set_backward_cache(Some(16))),
    ("staging", || set_affine_staging(true)),
    ("prefetch", || set_backward_prefetch(true)),
    ("lean", || set_backward_lean(true)),
    ("prefetch lean", || {
        set_backward_prefetch(true);
        set_backward_lean(true);
    }),
];

fn reset_knobs() {
    set_variant(LnKernel::Vectorized);
    set_vector_cache(16);
    set_backward_cache(None);
    set_affine_staging(false);
    set_backward_prefetch(false);
    set_backward_lean(false);
}

struct Writer {
    out: std::path::PathBuf,
    table: std::fs::File,
    seen: HashSet<String>,
}

impl Writer {
    /// Writes `k` unless a kernel of the same compile-time arguments was written already (cubecl
    /// lays out a kernel's shared arrays in a different order each time it compiles it, so the
    /// same kernel's source text differs between compilations). `tests`: listed as the tests'
    /// launch (bounds checks asked for) rather than the library's.
    fn write(&mut self, k: &CudaKernelSource, shape: &str, dtype: &str, variant: &str, tests: bool) -> std::io::Result<()> {
        // Attention's compile-time arguments include the head width; layer norm's geometry says all.
        let scope = if k.family == "attention" { shape } else { "" };
        if !self.seen.insert(format!("{} {} {scope} {dtype} {} {}", k.family, k.kernel, k.checked, k.geometry)) {
            return Ok(());
        }
        let file = format!("{:03}_{}_{}.cu", self.seen.len(), k.family, k.kernel);
        std::fs::write(self.out.join(&file), &k.source)?;
        let budget = k.budget_bytes.map_or(String::new(), |b| b.to_string());
        let default = variant == "default";
        let geometry = format!("{}\t{}\t{}\t{budget}", k.geometry, k.units, k.shared_bytes);
        let role = if tests { "tests" } else { "library" };
        let what = format!("{}\t{}\t{shape}\t{dtype}\t{}\t{role}\t{variant}\t{default}", k.family, k.kernel, k.checked);
        writeln!(self.table, "{file}\t{}\t{what}\t{geometry}", k.entry)
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::path::PathBuf::from(std::env::args().nth(1).ok_or("usage: cuda_source OUT_DIR")?);
    std::fs::create_dir_all(&out)?;
    let client = WgpuRuntime::client(&WgpuDevice::default());
    let mut table = std::fs::File::create(out.join("kernels.tsv"))?;
    writeln!(table, "file\tentry\tfamily\tkernel\tshape\tdtype\tchecked\trole\tvariant\tdefault\tgeometry\tunits\tshared_bytes\tbudget_bytes")?;
    let mut w = Writer { out: out.clone(), table, seen: HashSet::new() };
    for checked in [false, true] {
        for (dtype, name) in DTYPES {
            for d in [64, 128, 80, 32] {
                for k in attention_cuda_sources(&client, d, dtype, checked)? {
                    w.write(&k, &format!("d {d}"), name, "default", checked)?;
                }
            }
        }
    }
    for (variant, set) in LN_VARIANTS {
        for checked in [false, true] {
            for (dtype, name) in DTYPES {
                // Experiments in f32/bf16 without bounds checks; the defaults in every mode.
                if variant != "default" && (checked || dtype == DType::F16) {
                    continue;
                }
                for h in [768, 1024, 1280, 1600, 4096, 8192, 32768] {
                    reset_knobs();
                    set();
                    for k in layer_norm_cuda_sources(&client, h, dtype, checked)? {
                        w.write(&k, &format!("h {h}"), name, variant, checked)?;
                    }
                }
            }
        }
    }
    reset_knobs();
    println!("wrote {} kernels to {}", w.seen.len(), out.display());
    Ok(())
}
