#!/usr/bin/env bash
# Everything that needs the GPU machine, in priority order, each step under its own time limit.
# Build here (x86_64, no GPU needed):   scripts/build-device-bin.sh   (-> gpu-bin/, git-ignored)
# Run there:  bash scripts/device-check.sh [checks|bench|gpt|all]   (logs under $OUT, else ./device-out)
# Cold NVRTC compilation dominates first runs; gpu-bin/cubecl.toml keeps a kernel/autotune cache
# next to the binaries, so a second command on the same warm machine starts fast.
# One `device` command may run 10 minutes and a session has ~15 device-minutes in all, so run the
# parts as separate commands, in this order: `checks` (≤ 6 min), then `bench` (≤ 8 min), then
# `gpt` (≤ 5 min) as the budget allows (`all` exceeds one command's limit).
set -u
what="${1:-all}"
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${OUT:-$root/device-out}"
mkdir -p "$out"
export LD_LIBRARY_PATH="/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export RUST_LOG="${RUST_LOG:-info}"
cd "$root/gpu-bin"
step() { # name, seconds, command...
  local name="$1" secs="$2"; shift 2
  echo "== $name (limit ${secs}s)"
  local t0=$SECONDS
  timeout "$secs" "$@" > "$out/$name.txt" 2>&1
  local rc=$?
  echo "   rc=$rc in $((SECONDS - t0))s"; tail -n 40 "$out/$name.txt"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1; cat "$out/gpu.txt"
case "$what" in checks|all)
  step checks 240 ./device_check kernels nccl
  step checks-v3 120 ./device_check kernels-v3 ;;
esac
case "$what" in bench|all)
  step ln-bench 150 ./device_check ln-bench
  step ln-bench-v3 90 ./device_check ln-bench-v3
  step torch-ln 60 python3 "$root/benches/torch_layer_norm.py"
  step nccl-bench 90 ./device_check nccl-bench
  step torch-nccl 60 python3 "$root/benches/torch_collectives.py" ;;
esac
case "$what" in gpt|all)
  step gpt-nccl 300 ./burn-parallel launch --nproc-per-node 1 -- ./gpt_pretrain --device cuda --comm nccl \
    --steps 20 --eval-every 0 --eval-batches 2 --sample-tokens 64 --timeout-secs 900 ;;
esac
