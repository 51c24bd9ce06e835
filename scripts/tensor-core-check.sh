#!/usr/bin/env bash
# The tensor-core (cmma) attention kernels, forward and backward, tested on the CPU: Debian
# bookworm's lavapipe has no cooperative matrices, Debian sid's (Mesa >= 26) has them (8 x 8 x 8
# f16 -> f32, 8-lane planes).
# Builds the attention tests with `--features vulkan` (CubeCL's SPIR-V compiler: WGSL has no
# cmma) here, then runs them in a minimal Debian sid chroot holding only Mesa's Vulkan drivers:
#   tests/attention_tensor_core.rs (with BURN_PARALLEL_REQUIRE_TENSOR_CORES=1: a device without
#   cooperative matrices fails instead of skipping), and from tests/attention_kernel.rs the f16
#   GPT against the CPU (its fused attention runs on the tensor cores there; ATTENTION_KERNEL_TESTS
#   selects others: "" runs all of that file, the FMA kernels through SPIR-V too, ~6 min).
#   scripts/tensor-core-check.sh        # chroot kept in ~/.cache/burn-parallel-sid (~650 MB)
# Needs root (chroot, a proc mount) and debootstrap (installed with apt-get when missing).
# Exit 2 (nothing checked) when that is impossible: not root, or no Debian mirror reachable.
# The chroot gets its own proc mount and debootstrap's own /dev nodes: nothing of the host's /dev
# is mounted into it, and this script never deletes anything under it.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
root="${BURN_PARALLEL_SID_ROOT:-$HOME/.cache/burn-parallel-sid}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
skip() { echo "tensor-core-check: $1: nothing checked" >&2; exit 2; }
[ "$(id -u)" -eq 0 ] || skip "not root (chroot needs it)"
lvp() { ls "$root"/usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1; }
if [ ! -x "$root/usr/bin/dpkg" ] || ! lvp; then
  if [ -e "$root" ]; then
    echo "tensor-core-check: $root is not a sid chroot with lavapipe: move it away and rerun" >&2
    exit 1
  fi
  python3 -c "import urllib.request; urllib.request.urlopen('$mirror/dists/sid/Release', timeout=30)" 2>/dev/null \
    || skip "$mirror is not reachable"
  if ! command -v debootstrap >/dev/null; then
    (apt-get update -qq && apt-get install -y -qq --no-install-recommends debootstrap) >/dev/null
  fi
  mkdir -p "$(dirname "$root")"
  fresh="$root.new.$$"
  debootstrap --variant=minbase --include=mesa-vulkan-drivers,libvulkan1 sid "$fresh" "$mirror" >"$fresh.log" 2>&1 \
    || { tail -20 "$fresh.log"; echo "tensor-core-check: debootstrap failed (left in $fresh)" >&2; exit 1; }
  mv "$fresh" "$root"
fi
echo "sid chroot: $(chroot "$root" dpkg-query -W -f '${Package} ${Version}' mesa-vulkan-drivers)"
tests=(attention_tensor_core attention_kernel)
args=()
for t in "${tests[@]}"; do args+=(--test "$t"); done
cargo test --features vulkan --no-run "${args[@]}"
bins=$(cargo test --features vulkan --no-run --message-format=json "${args[@]}" 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["executable"])')
[ "$(echo "$bins" | wc -l)" -eq "${#tests[@]}" ] || { echo "tensor-core-check: expected ${#tests[@]} test binaries, got: $bins" >&2; exit 1; }
proc_mounted=0
cleanup() {
  if [ "$proc_mounted" -eq 1 ]; then umount "$root/proc" || umount -l "$root/proc"; fi
}
trap cleanup EXIT
if ! mountpoint -q "$root/proc"; then
  mount -t proc proc "$root/proc"
  proc_mounted=1
fi
mkdir -p "$root/bp-tests"
for b in $bins; do
  name=$(basename "$b")
  filter=()
  if [ "${name%-*}" = attention_kernel ]; then
    filter=(${ATTENTION_KERNEL_TESTS-half_precision_gpt_on_wgpu_equals_the_cpu})
  fi
  cp "$b" "$root/bp-tests/$name"
  echo "== ${name%-*} ${filter[*]} on sid's lavapipe (SPIR-V, cooperative matrices)"
  chroot "$root" env BURN_PARALLEL_REQUIRE_TENSOR_CORES=1 HOME=/root "/bp-tests/$name" "${filter[@]}"
  rm -f "$root/bp-tests/$name"
done
