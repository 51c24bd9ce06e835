#!/usr/bin/env bash
# Our CubeCL kernels (flash attention, layer norm with its tuning knobs) compiled for an H100
# without a GPU: their CUDA C++ as cubecl-cuda generates it (`--features cuda-source`, example
# `cuda_source`), then NVRTC and ptxas for sm_90a from NVIDIA's PyPI wheels (CUDA 13.0, the
# device's toolkit era; cuobjdump/nvdisasm 13.2, the oldest on PyPI, for the SASS loop counts).
# Prints registers, spills and cubes per multiprocessor; exit 1 if a kernel fails to compile, a
# flash-attention launch of the library spills, the tensor-core forward has no HMMA in its SASS,
# or an attention kernel uses more shared memory than the tile picker budgeted (layer-norm spills
# are printed, not failed). The crt wheel holds the wmma headers (crt/mma.h) since CUDA 13.
#   scripts/cuda-offline-check.sh            # wheels cached under ~/.cache/burn-parallel-cuda
#   CUDA_OFFLINE_ROOT=/usr/local/cuda scripts/cuda-offline-check.sh   # an installed toolkit
# Exit 2 (nothing checked) when PyPI cannot be reached.
set -euo pipefail
cd "$(dirname "$0")/.."
root="${CUDA_OFFLINE_ROOT:-}"
if [ -z "$root" ]; then
  cache="${BURN_PARALLEL_CUDA_CACHE:-$HOME/.cache/burn-parallel-cuda}/13.0.88"
  root="$cache/nvidia/cu13"
  if [ ! -x "$root/bin/ptxas" ] || [ ! -x "$root/bin/nvdisasm" ] || [ ! -f "$root/include/crt/mma.h" ]; then
    mkdir -p "$cache/wheels"
    # Only an unreachable index skips the check (exit 2); any other pip failure (a pinned wheel
    # gone, no pip) fails it.
    if ! python3 -c "import urllib.request; urllib.request.urlopen('https://pypi.org/simple/nvidia-cuda-nvrtc/', timeout=30)" 2>/dev/null; then
      echo "cuda-offline-check: PyPI is not reachable: nothing checked" >&2
      exit 2
    fi
    python3 -m pip download --quiet --no-deps -d "$cache/wheels" \
      nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.88 \
      nvidia-cuda-cccl==13.0.85 nvidia-cuda-crt==13.0.88 nvidia-cuda-cuobjdump==13.2.86 nvidia-cuda-nvdisasm==13.2.86
    for w in "$cache"/wheels/*.whl; do python3 -m zipfile -e "$w" "$cache"; done
    chmod +x "$root"/bin/*
  fi
fi
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
# cubecl lays out a kernel's shared arrays in a random order per process, and ptxas spills in
# some orders of the register-bound tensor-core kernels and not in others (BENCHMARKS.md): a
# failed check is run once more on sources from a second process, and fails only if that fails
# too (a compile error, a missing HMMA or a spill in every order still fails).
cargo run --quiet --features cuda-source --example cuda_source -- "$out"
if ! python3 scripts/cuda_offline_compile.py "$out" "$root"; then
  echo "cuda-offline-check: failed on this process's shared-memory order; once more from a second process" >&2
  rm -rf "$out" && mkdir -p "$out"
  cargo run --quiet --features cuda-source --example cuda_source -- "$out"
  python3 scripts/cuda_offline_compile.py "$out" "$root"
fi
