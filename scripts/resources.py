#!/usr/bin/env python3
"""Registers, spills, shared memory and resident warps per SM of every GPU kernel, with no GPU.

    python scripts/resources.py            # rewrite benchmarks/results/gpu_resources.md
    python scripts/resources.py --check    # exit 1 when the committed table differs (nothing written)

Every CUDA kernel instantiation of csrc/cuda/*.cu is compiled for sm_80 and sm_90 with
`nvcc -Xptxas -v` (the flags torch's extension build passes); every Triton kernel configuration
vqfast/triton can launch (vqfast.triton.kernel_builds: each mode's search tiles x dtypes, the merge,
the gather, the row pass and the re-rank kernels) is compiled with `triton.compile` for
GPUTarget("cuda", 80 / 90, 32) and its PTX assembled with Triton's own ptxas, as Triton does, with -v. From the registers and shared memory the CUDA occupancy
rules give the resident thread blocks and warps per SM (`occupancy`, below). tests/test_resources.py
fails on any spill, on shared memory above an architecture's limit, and when a row differs from the
committed table.

What this cannot show: the achieved occupancy and speed on a GPU, tensor-core rounding, and the real
limits of a given board (these figures assume the full SM of an A100 / H100).
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")
TABLE = os.path.join(ROOT, "benchmarks", "results", "gpu_resources.md")
ARCHS = (80, 90)

# The CUDA occupancy rules of compute capability 8.0 and 9.0 (CUDA C Programming Guide, "Compute
# capabilities"; the occupancy calculator's allocation granularities).
REGISTERS_PER_SM = 65536
REGISTER_GRANULE = 256  # registers are allocated per warp in units of 256
MAX_WARPS_PER_SM = 64
MAX_THREADS_PER_SM = 2048
MAX_BLOCKS_PER_SM = 32
SHARED_PER_SM = {80: 164 * 1024, 90: 228 * 1024}
RESERVED_SHARED_PER_BLOCK = 1024  # taken by the system from every resident block's share
MAX_SHARED_PER_BLOCK = {arch: SHARED_PER_SM[arch] - RESERVED_SHARED_PER_BLOCK for arch in ARCHS}

# torch.utils.cpp_extension passes these to every nvcc call of the extension build.
TORCH_NVCC_FLAGS = [
    "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr",
]
# Threads per block of each CUDA kernel, as csrc/cuda/nearest_codeword.* launches them (kThreads,
# kRowWarps * 32, kMergeThreads, kMaxAbsThreads, kMarkThreads); tests/test_resources.py checks them
# against the sources.
CUDA_THREADS = {
    "nearest_codeword_kernel": 128,
    "merge_splits_kernel": 256,
    "row_sqnorms_kernel": 256,
    "gather_distance_kernel": 256,
    "max_abs_kernel": 256,
    "mark_ambiguous_kernel": 256,
    "rerank_kernel": 256,
}
# The search kernel's launcher keeps z resident in dynamic shared memory only when this many blocks
# still fit an SM (kResidentBlocks in nearest_codeword.h): its rows show that largest allotment.
CUDA_RESIDENT_BLOCKS = 3


@dataclasses.dataclass(frozen=True)
class Row:
    kernel: str
    config: str
    arch: int
    threads: int
    registers: int
    spill_stores: int
    spill_loads: int
    stack: int
    static_smem: int
    dynamic_smem: int

    @property
    def key(self) -> tuple[str, str, int]:
        return self.kernel, self.config, self.arch

    @property
    def shared_per_block(self) -> int:
        return self.static_smem + self.dynamic_smem

    def occupancy(self) -> tuple[int, str]:
        return occupancy(self.arch, self.threads, self.registers, self.shared_per_block)

    def cells(self) -> list[str]:
        blocks, limit = self.occupancy()
        warps = blocks * (self.threads // 32)
        return [self.kernel, self.config, f"sm_{self.arch}", str(self.threads), str(self.registers),
                f"{self.spill_stores} / {self.spill_loads}", str(self.stack), str(self.static_smem),
                str(self.dynamic_smem), str(blocks), str(warps), limit]


HEADER = ["kernel", "config", "arch", "threads", "registers", "spills st / ld (B)", "stack (B)",
          "smem static (B)", "smem dynamic (B)", "blocks / SM", "warps / SM", "limited by"]


def occupancy(arch: int, threads: int, registers: int, shared_per_block: int) -> tuple[int, str]:
    """Resident blocks per SM and what limits them ("registers", "shared memory", "threads", "blocks")."""
    warps = -(-threads // 32)
    regs_per_warp = -(-registers * 32 // REGISTER_GRANULE) * REGISTER_GRANULE
    limits = {
        "threads": min(MAX_THREADS_PER_SM // threads, MAX_WARPS_PER_SM // warps),
        "blocks": MAX_BLOCKS_PER_SM,
        "registers": (REGISTERS_PER_SM // regs_per_warp) // warps if regs_per_warp else MAX_BLOCKS_PER_SM,
        "shared memory": SHARED_PER_SM[arch] // (shared_per_block + RESERVED_SHARED_PER_BLOCK),
    }
    # The first of equal limits in the order above: a kernel at the hardware's maxima says so.
    limit = min(limits, key=lambda name: limits[name])
    return limits[limit], limit


# ----------------------------------------------------------------------------------------- ptxas

def parse_ptxas_report(text: str) -> dict[str, dict[str, int]]:
    """Per kernel (mangled name) from `ptxas -v` output: registers, spill stores / loads, stack and
    static shared memory bytes."""
    out: dict[str, dict[str, int]] = {}
    current = None
    for line in text.splitlines():
        m = re.search(r"(?:Compiling entry function '|Function properties for )([^'\s]+)", line)
        if m:
            current = m.group(1)
            out.setdefault(current, {})
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            out[current].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m:
            out[current]["registers"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            out[current]["static_smem"] = int(s.group(1)) if s else 0
    return out


def _demangle(names: list[str]) -> list[str]:
    tool = shutil.which("c++filt")
    if tool is None:
        return names
    proc = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=True)
    return proc.stdout.splitlines()


def _nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def _cuda_name(demangled: str) -> tuple[str, str]:
    """(kernel, config) of a demangled CUDA kernel name: the search kernel's template arguments
    <T, kTensor, kVec, kResident, kFeat> and the re-rank's <T, kCompensated> read as words."""
    head = demangled.replace("(anonymous namespace)::", "").split("(", 1)[0]
    head = re.sub(r"^void\s+", "", head)
    base = head.split("<", 1)[0].rsplit("::", 1)[-1]
    args = [a.strip() for a in head.split("<", 1)[1].rstrip(">").split(",")] if "<" in head else []
    dtype = {"float": "fp32", "__half": "fp16", "__nv_bfloat16": "bf16", "double": "fp64"}
    if base == "nearest_codeword_kernel" and len(args) == 5:
        tensor, vec, resident = (a == "true" for a in args[1:4])
        words = ["fast mma" if tensor else "exact fma"]
        if args[4] != "16":  # narrow stages for small D (16 features a stage otherwise)
            words.append(f"{args[4]}-feature stages")
        words += ["16-byte loads" if vec else "element loads", "z resident" if resident else "z streamed"]
        return f"{base}<{dtype.get(args[0], args[0])}>", ", ".join(words)
    if base == "rerank_kernel" and len(args) == 2:
        return f"{base}<{dtype.get(args[0], args[0])}>", "compensated fp32" if args[1] == "true" else "fp64"
    if args:
        return f"{base}<{', '.join(dtype.get(a, a) for a in args)}>", "-"
    return base, "-"


def cuda_rows(arch: int) -> list[Row]:
    nvcc = _nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found (set CUDA_HOME)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for source in sorted(glob.glob(os.path.join(CUDA_DIR, "*.cu"))):
            cmd = [nvcc, "-std=c++17", "-O3", *TORCH_NVCC_FLAGS, "-c", source, "-o", os.path.join(tmp, "k.o"),
                   f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v"]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            if proc.returncode != 0:
                raise RuntimeError(f"nvcc failed for sm_{arch} on {source}:\n{proc.stderr[-4000:]}")
            report = parse_ptxas_report(proc.stdout + proc.stderr)
            mangled = sorted(name for name, r in report.items() if "registers" in r)  # entry functions
            for name, demangled in zip(mangled, _demangle(mangled)):
                kernel, config = _cuda_name(demangled)
                base = kernel.split("<", 1)[0]
                r = report[name]
                threads = CUDA_THREADS[base]
                dynamic = 0
                if base == "nearest_codeword_kernel" and config.endswith("z resident"):
                    dynamic = SHARED_PER_SM[arch] // CUDA_RESIDENT_BLOCKS - r["static_smem"] - RESERVED_SHARED_PER_BLOCK
                rows.append(Row(kernel, config, arch, threads, r["registers"], r.get("spill_stores", 0),
                                r.get("spill_loads", 0), r.get("stack", 0), r["static_smem"], dynamic))
    return rows


# ---------------------------------------------------------------------------------------- Triton

def triton_compiles(arch: int):
    """(kernel, config, CompiledKernel) of every Triton kernel configuration for sm_<arch>."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from vqfast import triton as vt

    target = GPUTarget("cuda", arch, 32)
    # Every configuration the launcher can run (vqfast.triton.kernel_builds): the search in each mode's
    # own tiles, the split merge, the gather, the codebook/row pass and both re-rank kernels.
    for kernel, config, fn, signature, constexprs, options in vt.kernel_builds():
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        yield kernel, config, triton.compile(src, target=target, options=options)


def _triton_ptxas(arch: int):
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    return get_ptxas(arch).path, sm_arch_from_capability(arch)


def triton_rows(arch: int) -> list[Row]:
    ptxas, gpu_name = _triton_ptxas(arch)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ptx_path = os.path.join(tmp, "k.ptx")
        for kernel, config, compiled in triton_compiles(arch):
            with open(ptx_path, "w", encoding="utf-8") as f:
                f.write(compiled.asm["ptx"])
            # The options Triton's make_cubin passes (line info, its register-allocation level), plus -v.
            cmd = [ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu_name}", ptx_path,
                   "-o", os.path.join(tmp, "k.cubin")]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            if proc.returncode != 0:
                raise RuntimeError(f"ptxas failed for {kernel} {config} sm_{arch}:\n{proc.stderr[-4000:]}")
            (r,) = parse_ptxas_report(proc.stdout + proc.stderr).values()
            rows.append(Row(kernel, config, arch, compiled.metadata.num_warps * 32, r["registers"],
                            r.get("spill_stores", 0), r.get("spill_loads", 0), r.get("stack", 0), r["static_smem"],
                            compiled.metadata.shared))
    return rows


# ----------------------------------------------------------------------------------------- table

def tool_versions() -> str:
    import triton

    nvcc = subprocess.run([_nvcc(), "--version"], capture_output=True, text=True).stdout
    release = re.search(r"release ([\d.]+)", nvcc)
    ptxas, _ = _triton_ptxas(90)
    triton_ptxas = re.search(r"release ([\d.]+)", subprocess.run([ptxas, "--version"], capture_output=True,
                                                                  text=True).stdout)
    return (f"nvcc {release.group(1) if release else '?'}, triton {triton.__version__} "
            f"(ptxas {triton_ptxas.group(1) if triton_ptxas else '?'})")


def all_rows() -> list[Row]:
    return [row for arch in ARCHS for row in cuda_rows(arch) + triton_rows(arch)]


def render(rows: list[Row], versions: str) -> str:
    lines = [
        "# GPU kernel resources (compiled here, no GPU)",
        "",
        "Generated by `python scripts/resources.py`; checked by tests/test_resources.py. Do not edit by hand.",
        "",
        f"Compilers: {versions}.",
        "",
        "Registers and spills from `ptxas -v`; shared memory static (ptxas) + dynamic (Triton: its",
        "pipeline buffers; CUDA search kernel with z resident: the largest allotment its launcher gives,",
        f"{CUDA_RESIDENT_BLOCKS} blocks per SM). Resident blocks per SM from the CUDA occupancy rules: "
        f"{REGISTERS_PER_SM} registers per SM",
        f"allocated per warp in units of {REGISTER_GRANULE}, at most {MAX_WARPS_PER_SM} warps / "
        f"{MAX_THREADS_PER_SM} threads / {MAX_BLOCKS_PER_SM} blocks per SM,",
        f"shared memory per SM {SHARED_PER_SM[80] // 1024} KiB (sm_80) / {SHARED_PER_SM[90] // 1024} KiB (sm_90) "
        f"with {RESERVED_SHARED_PER_BLOCK} B reserved per block.",
        "Not shown here: achieved occupancy, speed, tensor-core rounding, a given board's real limits.",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "|".join("---" for _ in HEADER) + "|",
    ]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def parse_table(text: str) -> tuple[str | None, dict[tuple[str, str, str], list[str]]]:
    """(compiler line, rows by (kernel, config, arch)) of a rendered table."""
    m = re.search(r"^Compilers: (.*)\.$", text, re.M)
    rows = {}
    for line in text.splitlines():
        if not line.startswith("| ") or line.startswith("| kernel |"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[tuple(cells[:3])] = cells
    return (m.group(1) if m else None), rows


def differences(committed: str, rows: list[Row]) -> list[str]:
    """How the rows differ from a committed table: rows added, removed or changed."""
    _, old = parse_table(committed)
    new = {tuple(row.cells()[:3]): row.cells() for row in rows}
    out = [f"new row {' | '.join(new[key])}" for key in new if key not in old]
    out += [f"row gone {' | '.join(old[key])}" for key in old if key not in new]
    for key in new:
        if key in old and old[key] != new[key]:
            changed = [f"{name} {a} -> {b}" for name, a, b in zip(HEADER, old[key], new[key]) if a != b]
            out.append(f"{' '.join(key)}: {', '.join(changed)}")
    return out


def problems(rows: list[Row]) -> list[str]:
    """Spills, local-memory stacks, and shared memory above an architecture's per-block limit."""
    out = []
    for row in rows:
        where = f"{row.kernel} [{row.config}] sm_{row.arch}"
        if row.spill_stores or row.spill_loads:
            out.append(f"{where} spills ({row.spill_stores} B stored / {row.spill_loads} B loaded)")
        if row.shared_per_block > MAX_SHARED_PER_BLOCK[row.arch]:
            out.append(f"{where} needs {row.shared_per_block} B of shared memory, above sm_{row.arch}'s "
                       f"{MAX_SHARED_PER_BLOCK[row.arch]} B a block")
        if row.registers > 255:
            out.append(f"{where} uses {row.registers} registers")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the committed table differs")
    args = parser.parse_args(argv)
    sys.path.insert(0, ROOT)
    text = render(all_rows(), tool_versions())
    if args.check:
        old = open(TABLE, encoding="utf-8").read() if os.path.exists(TABLE) else ""
        if old != text:
            print(f"{os.path.relpath(TABLE, ROOT)} is stale: run python scripts/resources.py")
            return 1
        print(f"{os.path.relpath(TABLE, ROOT)} is up to date")
        return 0
    with open(TABLE, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {os.path.relpath(TABLE, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
