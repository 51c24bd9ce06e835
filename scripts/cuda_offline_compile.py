#!/usr/bin/env python3
"""Compile the kernels `cargo run --features cuda-source --example cuda_source -- DIR` wrote (flash
attention and layer norm) as cubecl-cuda does on an H100 (NVRTC, `--gpu-architecture=sm_90a
-lineinfo`, CUDA's include directories), assemble the PTX with `ptxas -v`, and print each
kernel's registers, spills and cubes per multiprocessor (H100: 65536 registers, 64 warps, 228 KiB
of shared memory with 1 KiB reserved per cube, 32 cubes). cubecl-cuda hands the PTX to the
driver, whose JIT assembles it: the device's register counts may differ from this ptxas's by a
few. With cuobjdump and nvdisasm, also the inner loops of the d 64 attention kernels in SASS
(FMAs and shared-memory loads per iteration). No GPU or driver is needed.

usage: cuda_offline_compile.py KERNEL_DIR CUDA_ROOT
  CUDA_ROOT: lib/ (or lib64/) libnvrtc.so*, bin/ptxas and include/ (NVIDIA's nvidia-cuda-{nvrtc,nvcc,runtime,
  cccl} wheels unpacked; scripts/cuda-offline-check.sh fetches them)
Exit status 1 if a kernel fails to compile or assemble, uses more shared memory than its launch
code budgeted (attention's tile picker), or is a flash-attention kernel the library launches (no
bounds checks) that spills registers, or is a tensor-core attention kernel without HMMA
instructions (tensor-core products) in its SASS; layer-norm spills are printed. cubecl lays out a
kernel's shared arrays in an order that changes from process to process, and ptxas answers some
orders of the register-bound tensor-core kernels (d 80: 168 registers) with an 8-byte spill and
others with none: tensor-core spills up to LAYOUT_SPILL bytes are printed as layout-dependent, not
failed; larger ones fail."""
import csv, ctypes, glob, os, re, subprocess, sys

SM_REGS, SM_WARPS, SM_SHARED, CUBE_RESERVED, SM_CUBES = 65536, 64, 228 << 10, 1 << 10, 32
# Spill bytes (stores and loads each) of a tensor-core kernel that a shared-memory order alone can cause.
LAYOUT_SPILL = 16


def nvrtc_lib(root):
    """libnvrtc, its builtins loaded first (NVRTC dlopens them by name; the wheels set no rpath);
    under lib/ (the wheels), lib64/ or targets/*/lib/ (a toolkit install)."""
    dirs = ["lib", "lib64"] + sorted(glob.glob(os.path.join(root, "targets", "*", "lib")))
    lib = lambda pattern: sorted(l for d in dirs for l in glob.glob(os.path.join(root, d, pattern)))
    for builtins in lib("libnvrtc-builtins.so.*"):
        ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
    libs = lib("libnvrtc.so*")
    if not libs:
        sys.exit(f"no libnvrtc.so* under {root}/lib")
    return ctypes.CDLL(libs[0])


def nvrtc_compile(lib, source, options):
    """(PTX or None, NVRTC's log)."""
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), None, 0, None, None) != 0:
        return None, "nvrtcCreateProgram failed"
    opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
    status = lib.nvrtcCompileProgram(prog, len(options), opts)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    ptx = None
    if status == 0:
        lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
        buf = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetPTX(prog, buf)
        ptx = buf.value.decode()
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return ptx, log.value.decode(errors="replace")


def cubes_per_sm(regs, units, shared):
    """(cubes per SM, limit by registers, limit by shared memory); registers are allocated per
    warp in units of 256, from the 16384 of the warp's scheduler (four per SM)."""
    warps = -(-units // 32)
    by_regs = (SM_REGS // 4 // (-(-regs * 32 // 256) * 256)) * 4 // warps
    by_shared = SM_SHARED // (shared + CUBE_RESERVED)
    return min(by_regs, SM_WARPS // warps, by_shared, SM_CUBES), by_regs, by_shared


def sass_loops(cubin, bindir):
    """Innermost loops with FMAs: (instructions, FFMA, LDS, LDS.128) per iteration."""
    env = dict(os.environ, PATH=bindir + os.pathsep + os.environ.get("PATH", ""))
    sass = subprocess.run([os.path.join(bindir, "cuobjdump"), "-sass", cubin], capture_output=True, text=True, env=env).stdout
    ins = [(int(a, 16), t.strip()) for a, t in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    loops = []
    for addr, text in ins:
        m = re.search(r"BRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            ops = [t.split()[1] if t.startswith("@") else t.split()[0] for a, t in ins if int(m.group(1), 16) <= a <= addr]
            n = lambda p: sum(o.startswith(p) for o in ops)
            loops.append((len(ops), n("FFMA"), n("LDS"), n("LDS.128"), n("BAR")))
    return [l for l in loops if l[1] and not l[4]]


def sass_count(cubin, bindir, prefix):
    """Instructions of the kernel's SASS whose opcode starts with `prefix`."""
    env = dict(os.environ, PATH=bindir + os.pathsep + os.environ.get("PATH", ""))
    sass = subprocess.run([os.path.join(bindir, "cuobjdump"), "-sass", cubin], capture_output=True, text=True, env=env).stdout
    ops = [t.split()[1] if t.startswith("@") else t.split()[0] for t in re.findall(r"/\*[0-9a-f]{4,}\*/\s+([^;]*);", sass)]
    return sum(o.startswith(prefix) for o in ops)


def main():
    kdir, root = sys.argv[1], sys.argv[2]
    lib, include, bindir = nvrtc_lib(root), os.path.join(root, "include"), os.path.join(root, "bin")
    options = ["--gpu-architecture=sm_90a", f"--include-path={include}", "-lineinfo"]
    if os.path.isdir(os.path.join(include, "cccl")):
        options.append(f"--include-path={os.path.join(include, 'cccl')}")
    failed, checked, rows, layout_spills = [], [], [], []
    with open(os.path.join(kdir, "kernels.tsv"), encoding="utf-8") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            name = row["file"]
            ptx, log = nvrtc_compile(lib, open(os.path.join(kdir, name), encoding="utf-8").read(), options)
            if ptx is None:
                failed.append(f"NVRTC rejected {name}:\n{log}")
                continue
            ptx_path, cubin = [os.path.join(kdir, name.replace(".cu", ext)) for ext in (".ptx", ".cubin")]
            open(ptx_path, "w").write(ptx)
            out = subprocess.run([os.path.join(bindir, "ptxas"), "-v", "--gpu-name", "sm_90a", ptx_path, "-o", cubin], capture_output=True, text=True)
            info = out.stdout + out.stderr
            if out.returncode != 0:
                failed.append(f"ptxas rejected {ptx_path}:\n{info}")
                continue
            used = re.search(r"Used (\d+) registers", info)
            if f".entry {row['entry']}" not in ptx or not used:
                failed.append(f"{name}: no entry point {row['entry']} with a register count in the PTX")
                continue
            regs = int(used.group(1))
            spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
            row.update(regs=regs, spill=(int(spill.group(1)), int(spill.group(2))) if spill else (0, 0), cubin=cubin)
            (checked if row["role"] == "tests" else rows).append(row)
            if row["budget_bytes"] and int(row["shared_bytes"]) > int(row["budget_bytes"]):
                failed.append(f"{name}: {row['shared_bytes']} bytes of shared memory, the launch code budgeted {row['budget_bytes']}")
            layout_only = row["kernel"].endswith("_tc") and max(row["spill"]) <= LAYOUT_SPILL
            if row["family"] == "attention" and row["role"] == "library" and row["spill"] != (0, 0) and layout_only:
                layout_spills.append(f"{row['kernel']} {row['shape']} {row['dtype']} {row['spill'][0]}/{row['spill'][1]}")
            elif row["family"] == "attention" and row["role"] == "library" and row["spill"] != (0, 0):
                failed.append(f"{name} ({row['family']} {row['kernel']} {row['shape']} {row['dtype']}) spills {row['spill']} bytes (stores, loads)")
    print(f"NVRTC ({' '.join(options[:1] + options[2:3])}) and ptxas for sm_90a: {len(rows) + len(checked)} kernels compiled, {len(failed)} problems")
    for title, keep in [("launched by default", lambda r: r["default"] == "true"), ("the tuning knobs' variants", lambda r: r["default"] != "true")]:
        listed = [r for r in rows if keep(r)]
        if not listed:
            continue
        print(f"\nThe library's launches (without bounds checks but v1's), {title}:\n")
        print("| family | kernel | variant | shape | dtype | geometry | shared KiB | registers | spills B | cubes/SM (by registers, by shared) |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in listed:
            c = cubes_per_sm(r["regs"], int(r["units"]), int(r["shared_bytes"]))
            print(f"| {r['family']} | {r['kernel']} | {r['variant']} | {r['shape']} | {r['dtype']} | {r['geometry']} | {int(r['shared_bytes']) / 1024:.1f} "
                  f"| {r['regs']} | {r['spill'][0]}/{r['spill'][1]} | {c[0]} ({c[1]}, {c[2]}) |")
    if layout_spills:
        print(f"\ntensor-core kernels with a layout-dependent spill (<= {LAYOUT_SPILL} B; cubecl's shared-memory order of this run): " + "; ".join(layout_spills))
    spilled = [r for r in rows if r["spill"] != (0, 0) and r["family"] != "attention"]
    print("\nlayer-norm kernels that spill (stores/loads B; printed, not failed): "
          + ("; ".join(f"{r['kernel']} {r['variant']} {r['shape']} {r['dtype']} {r['spill'][0]}/{r['spill'][1]}" for r in spilled) or "none"))
    spills = [f"{r['file']} {r['spill'][0]}/{r['spill'][1]} B" for r in checked if r["spill"] != (0, 0)]
    print(f"\nwith bounds checks (the tests' launches): {len(checked)} kernels, registers {min((r['regs'] for r in checked), default=0)}–"
          f"{max((r['regs'] for r in checked), default=0)}, spills: {', '.join(spills) or 'none'}")
    if os.path.exists(os.path.join(bindir, "cuobjdump")) and os.path.exists(os.path.join(bindir, "nvdisasm")):
        print("SASS inner loops of the attention kernels with FMAs (per iteration: instructions, FFMA, LDS of which 128-bit):")
        for r in rows:
            if r["family"] == "attention" and r["shape"] == "d 64" and r["dtype"] in ("f32", "bf16"):
                loops = "; ".join(f"{n} instr, {ffma} FFMA, {lds} LDS ({l128} .128)" for n, ffma, lds, l128, _ in sass_loops(r["cubin"], bindir))
                if loops:
                    print(f"  {r['kernel']} d 64 {r['dtype']}: {loops}")
        # The tensor-core kernels must run their products on tensor cores: HMMA in their SASS.
        for r in rows + checked:
            if r["kernel"].endswith("_tc"):
                hmma = sass_count(r["cubin"], bindir, "HMMA")
                if r["shape"] == "d 64" and r["dtype"] == "bf16" and r["role"] == "library":
                    print(f"  {r['kernel']} d 64 bf16: {hmma} HMMA instructions")
                if hmma == 0:
                    failed.append(f"{r['file']} ({r['kernel']} {r['shape']} {r['dtype']}): no HMMA instruction in its SASS")
    if not rows:
        failed.append(f"no kernels listed in {kdir}/kernels.tsv")
    for problem in failed:
        print(problem, file=sys.stderr)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
