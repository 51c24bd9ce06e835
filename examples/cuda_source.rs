//! Writes the flash-attention kernels' CUDA C++ (what cubecl-cuda gives NVRTC on an H100) without
//! a GPU: `cargo run --features cuda-source --example cuda_source -- OUT_DIR`. One `.cu` file per
//! kernel, head width (64 and 128: GPT-2's and the wide heads'; 80: the device check's odd one;
//! 32: the tiny preset's),
//! dtype and bounds-check mode, and `kernels.tsv` (file, entry, tiles, shared bytes) for
//! `scripts/cuda_offline_compile.py` (NVRTC and ptxas; `scripts/cuda-offline-check.sh` runs both).

use std::io::Write;

use burn::backend::wgpu::{WgpuDevice, WgpuRuntime};
use burn::tensor::DType;
use burn_cubecl::cubecl::Runtime;
use burn_parallel::attention::attention_cuda_sources;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::path::PathBuf::from(std::env::args().nth(1).ok_or("usage: cuda_source OUT_DIR")?);
    std::fs::create_dir_all(&out)?;
    let client = WgpuRuntime::client(&WgpuDevice::default());
    let mut table = std::fs::File::create(out.join("kernels.tsv"))?;
    writeln!(table, "file\tentry\tkernel\td\tdtype\tchecked\trows\tcols\ttx\tty\tvec\tshared_bytes\tpredicted_shared_bytes")?;
    let mut count = 0;
    for checked in [false, true] {
        for (dtype, name) in [(DType::F32, "f32"), (DType::BF16, "bf16"), (DType::F16, "f16")] {
            for d in [64, 128, 80, 32] {
                for k in attention_cuda_sources(&client, d, dtype, checked)? {
                    let file = format!("attn_{}_d{d}_{name}{}.cu", k.kernel, if checked { "_checked" } else { "" });
                    std::fs::write(out.join(&file), &k.source)?;
                    let t = k.tiles;
                    let geometry = format!("{}\t{}\t{}\t{}\t{}", t.rows, t.cols, t.tx, t.ty, t.vec);
                    let shared = format!("{}\t{}", k.shared_bytes, k.predicted_shared_bytes);
                    writeln!(table, "{file}\t{}\t{}\t{d}\t{name}\t{checked}\t{geometry}\t{shared}", k.entry, k.kernel)?;
                    count += 1;
                }
            }
        }
    }
    println!("wrote {count} kernels to {}", out.display());
    Ok(())
}
