#!/usr/bin/env bash
# Builds the stripped release binaries the GPU machine runs (it has no Rust toolchain) into
# gpu-bin/ (git-ignored; carry it with the `device` tool): device_check, gpt_pretrain, burn-parallel
# (gzipped).
# Kernel caches: scripts/device-check.sh points cubecl at gpu-cache/ (returned as $OUT/cache.tgz).
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-$HOME/.cache/burn-parallel-release}"
CUDARC_CUDA_VERSION=13000 cargo build --release --features cuda --target-dir "$target" \
  --example device_check --example gpt_pretrain --bin burn-parallel
mkdir -p gpu-bin
# Stripped and gzipped: the three binaries are ~65 MiB stripped, over the device tool's 64 MiB
# carry limit; scripts/device-check.sh unpacks gpu-bin/*.gz before the first step.
rm -f gpu-bin/device_check gpu-bin/gpt_pretrain gpu-bin/burn-parallel
for b in examples/device_check examples/gpt_pretrain burn-parallel; do
  cp "$target/release/$b" gpu-bin/
  strip "gpu-bin/$(basename "$b")"
  gzip -9 -f "gpu-bin/$(basename "$b")"
done
du -sh gpu-bin/*
