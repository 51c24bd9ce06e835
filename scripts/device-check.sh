#!/usr/bin/env bash
# Everything that needs the GPU machine, each step under its own time limit, all of them under one
# budget (seconds since start; a step that no longer fits is skipped, so the command always ends
# in time and its logs come back).
# Build here (x86_64, no GPU needed):   scripts/build-device-bin.sh   (-> gpu-bin/, git-ignored)
# Run there:  BUDGET=540 bash scripts/device-check.sh STEP...     (default: the open issues' steps, in order)
#   steps: checks (kernels + nccl) kernels gpt gpt-local gpt-cp (--cp 2 × tp 2 SP thread ranks on CUDA, the fused kernels at
#   each query chunk's offset, then the chunked core, then the same run without --cp: the loss lines must agree to rounding) ln-bench ln-tune ln-profile (ncu, if installed)
#   torch-ln nccl-bench torch-nccl gpt2 gpt2-f32 torch-gpt2 (GPT-2 124M: ours bf16/f32, PyTorch eager) memory
#   attention torch-attention (flash-attention kernels: checks, then fused vs composed vs torch SDPA)
#   attn-profile (ncu, if installed: the flash kernels' registers per thread, occupancy, waves)
#   burn-nn-gpt2 (plain Burn's GPT-2 124M) gpt2-composed (ours, composed attention); gpt2-chunked (ours, chunked attention);
#   gpt2-optim-per-param (ours, AdamW one parameter at a time: against gpt2's fused 25 MiB groups);
#   gpt2-fma (ours, bf16 attention on the FMA kernels: what the tensor-core kernels gain end to end);
#   llama (a Llama-style GPT on CUDA, fused attention with grouped-query heads and the RMS-norm kernels, f32 and bf16,
#     against the CPU; then the RMS-norm kernels alone against the composed formula, timed);
#   `a+b` runs two steps side by side (e.g. `checks+gpt`: correctness checks while the GPT's
#   kernels compile — never two benchmarks).
# Output: $OUT/log.txt (every step's full log) and $OUT/cache.tgz (cubecl's kernel and autotune
# cache: copy it to gpu-bin/cache.tgz to skip next time the cold NVRTC compilation that dominates
# first runs). Only a summary goes to stdout.
set -u
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${OUT:-$root/device-out}"
budget="${BUDGET:-540}"
mkdir -p "$out" "$root/gpu-cache" "$out/.steps"
# The binaries come gzipped (scripts/build-device-bin.sh: the carry limit).
for z in "$root"/gpu-bin/*.gz; do [ -f "$z" ] && gunzip -f "$z" && chmod +x "${z%.gz}"; done
# A previous run's caches, if carried as gpu-bin/cache.tgz (gpu-cache itself is too big to carry).
[ -f "$root/gpu-bin/cache.tgz" ] && tar xzf "$root/gpu-bin/cache.tgz" -C "$root"
export LD_LIBRARY_PATH="/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export RUST_LOG="${RUST_LOG:-info}" PYTHONUNBUFFERED=1
# enable_kernel_caches() puts cubecl's caches under $XDG_CACHE_HOME/burn-parallel/cubecl.
export XDG_CACHE_HOME="$root/gpu-cache"
cd "$root/gpu-bin"
rm -f cubecl.toml # an old build's cubecl.toml would move the caches out of gpu-cache
log="$out/log.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee -a "$log"

limit_of() {
  case "$1" in
    checks) echo 300 ;; kernels) echo 180 ;; gpt) echo 300 ;; gpt-local) echo 240 ;; gpt-cp) echo 300 ;;
    ln-bench) echo 150 ;; attn-profile) echo 180 ;; ln-tune) echo 180 ;; ln-profile) echo 150 ;; torch-ln) echo 60 ;; nccl-bench) echo 90 ;;
    torch-nccl) echo 60 ;; gpt2) echo 420 ;; memory) echo 240 ;; gpt2-f32) echo 240 ;; torch-gpt2) echo 150 ;; attention) echo 240 ;; torch-attention) echo 60 ;; burn-nn-gpt2) echo 300 ;; gpt2-composed) echo 300 ;; gpt2-chunked) echo 300 ;; gpt2-fma) echo 300 ;; gpt2-optim-per-param) echo 300 ;; llama) echo 240 ;; *) echo 0 ;;
  esac
}
run_step() { # name: runs it in the foreground, log to $out/.steps/name.txt
  local gpt=(--steps 20 --eval-every 0 --eval-batches 2 --sample-tokens 64 --timeout-secs 900)
  case "$1" in
    checks) exec ./device_check kernels nccl ;;
    kernels) exec ./device_check kernels ;;
    gpt) exec ./burn-parallel launch --nproc-per-node 1 -- ./gpt_pretrain --device cuda --comm nccl "${gpt[@]}" ;;
    gpt-local) exec ./gpt_pretrain --device cuda --comm local --tp 2 --pp 2 --microbatches 4 "${gpt[@]}" ;;
    gpt-cp) ./gpt_pretrain --device cuda --comm local --cp 2 --tp 2 --sequence-parallel "${gpt[@]}" || return 1
      ./gpt_pretrain --device cuda --comm local --cp 2 --tp 2 --sequence-parallel --attention chunked "${gpt[@]}" || return 1
      exec ./gpt_pretrain --device cuda --comm local --tp 2 --sequence-parallel "${gpt[@]}" ;;
    ln-bench) exec ./device_check ln-bench ;;
    ln-tune) exec ./device_check ln-tune ;;
    ln-profile) # the forward's launches under Nsight Compute: registers, occupancy, waves, DRAM throughput
      local ncu
      ncu="$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)"
      [ -n "$ncu" ] || { echo "ncu: not installed"; return 1; }
      exec "$ncu" --kernel-name regex:"ln_|binop|scalar" --launch-count 40 --section LaunchStats --section Occupancy --section SpeedOfLight \
        --section WarpStateStats ./device_check ln-profile ;;
    attn-profile) # the flash kernels' first launches under Nsight Compute (registers decide cubes per SM)
      local ncu
      ncu="$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)"
      [ -n "$ncu" ] || { echo "ncu: not installed"; return 1; }
      exec "$ncu" --kernel-name regex:"attn_" --launch-count 6 --section LaunchStats --section Occupancy --section SpeedOfLight ./device_check attention ;;
    torch-ln) exec python3 "$root/benches/torch_layer_norm.py" ;;
    nccl-bench) exec ./device_check nccl-bench ;;
    torch-nccl) exec python3 "$root/benches/torch_collectives.py" ;;
    # GPT-2 124M, B 8, T 1024 (the preset), the generated corpus through GPT-2's BPE: tokens/s and MFU.
    # Each step's tokens/s, loss and gradient norm come back in $OUT/gpt2*.jsonl (--metrics).
    gpt2) exec ./gpt_pretrain --model gpt2-124m --device cuda --precision bf16 --steps 25 --eval-every 0 --eval-batches 1 --sample-tokens 16 --print-every 5 --timeout-secs 900 --metrics "$out/gpt2.jsonl" ;;
    gpt2-f32) exec ./gpt_pretrain --model gpt2-124m --device cuda --precision f32 --steps 15 --eval-every 0 --eval-batches 1 --sample-tokens 16 --print-every 5 --timeout-secs 900 --metrics "$out/gpt2-f32.jsonl" ;;
    torch-gpt2) exec python3 "$root/benches/torch_gpt2.py" ;;
    memory) exec ./device_check memory ;;
    attention) exec ./device_check attention ;;
    llama) exec ./device_check llama ;;
    burn-nn-gpt2) exec ./device_check burn-nn-gpt2 ;;
    gpt2-composed) exec ./gpt_pretrain --model gpt2-124m --device cuda --precision bf16 --attention composed --steps 15 --eval-every 0 --eval-batches 1 --sample-tokens 16 --print-every 5 --timeout-secs 900 ;;
    gpt2-chunked) exec ./gpt_pretrain --model gpt2-124m --device cuda --precision bf16 --attention chunked:256 --steps 15 --eval-every 0 --eval-batches 1 --sample-tokens 16 --print-every 5 --timeout-secs 900 ;;
    gpt2-fma) exec ./gpt_pretrain --model gpt2-124m --device cuda --precision bf16 --attention-tensor-cores false --steps 15 --eval-every 0 --eval-batches 1 --sample-tokens 16 --print-every 5 --timeout-secs 900 ;;
    gpt2-optim-per-param) exec ./gpt_pretrain --model gpt2-124m --device cuda --precision bf16 --optimizer-group-mb 0 --steps 15 --eval-every 0 --eval-batches 1 --sample-tokens 16 --print-every 5 --timeout-secs 900 ;;
    torch-attention) exec python3 "$root/benches/torch_attention.py" ;;
    *) echo "unknown step $1"; return 2 ;;
  esac
}
start() { # name: starts the step in the background under its limit, clipped to the budget
  local name="$1" lim left
  lim="$(limit_of "$name")"
  left=$((budget - SECONDS - 20))
  ((lim > left)) && lim=$left
  if ((lim < 20)); then echo "== $name: skipped (budget)" | tee -a "$log"; return 1; fi
  echo "== $name (limit ${lim}s, at ${SECONDS}s)"
  ( t0=$SECONDS; timeout "$lim" bash -c "$(declare -f run_step); root='$root'; out='$out'; run_step $name" \
      > "$out/.steps/$name.txt" 2>&1
    echo "rc=$? in $((SECONDS - t0))s" >> "$out/.steps/$name.txt" ) &
}
finish() { # name: appends its log; prints the summary lines
  local f="$out/.steps/$1.txt"
  [ -f "$f" ] || return 0
  { echo; echo "==================== $1"; cat "$f"; } >> "$log"
  echo "-- $1: $(tail -n 1 "$f")"
  grep -E '(^(FAIL|\||[0-9]+ passed|error|Error|panicked|final|torch|element-wise|per-call|GPU-side|fusion|profiled|ncu|model FLOPs|step |.*fused attention)|loss: |tokens/s=|Context [0-9]|Registers Per Thread|Waves Per SM|Occupancy|Duration|DRAM Throughput|Block Limit)' "$f" | grep -v '^|---' | head -n 200
  rm -f "$f"
}
steps=("$@")
# Default: what the open issues still need, most important first (steps that no longer fit the
# budget are skipped, so a short budget runs the head of this list). `memory` first: it is all
# that #15 still needs (a small GPT, no timing: torch's SDPA is timed beside it while its
# kernels compile); then #16's attention kernels and the GPT-2 benchmark.
((${#steps[@]})) || steps=(memory+torch-attention attention gpt2 torch-gpt2 gpt2-chunked burn-nn-gpt2 gpt2-fma gpt2-optim-per-param checks nccl-bench ln-tune gpt2-composed gpt2-f32 llama)
for s in "${steps[@]}"; do
  IFS=+ read -r -a group <<< "$s"
  started=()
  for name in "${group[@]}"; do start "$name" && started+=("$name"); done
  wait
  for name in "${started[@]}"; do finish "$name"; done
done
tar czf "$out/cache.tgz" -C "$root" gpu-cache 2>/dev/null
echo "cache.tgz: $(du -h "$out/cache.tgz" | cut -f1); total ${SECONDS}s"
rm -rf "$out/.steps"
