"""CUDA architectures: which ones the build compiles, and whether a GPU can run the result.

An architecture list, in torch's ``TORCH_CUDA_ARCH_LIST`` syntax ("8.0;9.0+PTX", ";", "," or spaces
between entries) or the short form "80;90", becomes two lists of nvcc targets:

    sass  machine code for one architecture: "sm_80"; "sm_90a" (architecture-specific features)
    ptx   virtual code that the driver compiles at first launch on newer GPUs: "compute_90"

A GPU of compute capability X.y runs the kernels when CUDA's compatibility rules allow it:

    sm_XY        machine code runs on X.y for every y >= Y (sm_80 runs on 8.6 and 8.9, not on 9.0)
    sm_XYf       the same within the family (CUDA 12.9+)
    sm_XYa       only on X.Y exactly (its features are not forward compatible)
    compute_XY   PTX is compiled by the driver for any capability >= X.Y (Blackwell's 10.0 and 12.0
                 run compute_90); compute_XYf within family X, compute_XYa only on X.Y

This file imports neither torch nor vqfast: setup.py loads it by path before vqfast is installed.
"""
from __future__ import annotations

import re
from typing import Sequence

# cp.async and mma.sync on bf16 / tf32 operands (csrc/cuda/nearest_codeword.cu) need sm_80.
MIN_CAPABILITY = (8, 0)
# Machine code for the A100 / A10 / L4 / RTX 30-40 family (8.x) and the H100 / H200 (9.0); PTX of
# 9.0 lets newer GPUs (Blackwell B200 10.0, RTX 50 12.0) compile the kernels at first launch.
DEFAULT_ARCHS = "8.0;9.0+PTX"

_ENTRY = re.compile(r"^(?:(?P<dotted>\d+\.\d)|(?P<short>\d{2,3}))(?P<suffix>[af]?)(?P<ptx>\+PTX)?$", re.IGNORECASE)
_TARGET = re.compile(r"^(?P<kind>sm|compute)_(?P<major>\d+)(?P<minor>\d)(?P<suffix>[af]?)$")


def parse_arch_list(text: str, source: str) -> tuple[list[str], list[str]]:
    """Parse an architecture list into (sass targets, ptx targets), each sorted and without repeats.

    "8.0;9.0+PTX" -> (["sm_80", "sm_90"], ["compute_90"]); "80, 90" -> (["sm_80", "sm_90"], []);
    "9.0a" -> (["sm_90a"], []). ``source`` names where the text came from, for the error message.
    Raises ValueError on an entry it cannot read (torch's names such as "Ampere" and "native" included).
    """
    sass, ptx = set(), set()
    for entry in filter(None, re.split(r"[;,\s]+", text.strip())):
        m = _ENTRY.match(entry)
        if m is None:
            raise ValueError(
                f"{source}={text!r}: cannot read the architecture {entry!r}; write compute capabilities as "
                f"X.Y with an optional a or f suffix and +PTX, separated by ';' (e.g. \"8.0;8.6;9.0+PTX\"), "
                f"or as XY (e.g. \"80;90\")"
            )
        number = m["dotted"].replace(".", "") if m["dotted"] else m["short"]
        suffix = m["suffix"].lower()
        sass.add(f"sm_{number}{suffix}")
        if m["ptx"]:
            ptx.add(f"compute_{number}{suffix}")
    if not sass:
        raise ValueError(f"{source}={text!r} names no architecture")
    return sorted(sass, key=_target_key), sorted(ptx, key=_target_key)


def choose_archs(environ) -> tuple[list[str], list[str], str, list[str]]:
    """The architectures to build: (sass, ptx, where the list came from, targets left out).

    VQFAST_CUDA_ARCHS, when set, wins: it is meant for this package alone, while TORCH_CUDA_ARCH_LIST
    is often set for every extension by a container image. Then TORCH_CUDA_ARCH_LIST, then DEFAULT_ARCHS.
    Targets below MIN_CAPABILITY are an error in VQFAST_CUDA_ARCHS and are left out of
    TORCH_CUDA_ARCH_LIST (images list 5.2 to 9.0); sass comes back empty when nothing is left.
    """
    for name in ("VQFAST_CUDA_ARCHS", "TORCH_CUDA_ARCH_LIST"):
        text = environ.get(name, "").strip()
        if text:
            break
    else:
        name, text = "default", DEFAULT_ARCHS
    sass, ptx = parse_arch_list(text, name)
    too_old = [t for t in sass + ptx if capability_of(t) < MIN_CAPABILITY]
    if too_old and name == "VQFAST_CUDA_ARCHS":
        raise ValueError(
            f"VQFAST_CUDA_ARCHS={text!r} asks for {', '.join(too_old)}, below the compute capability "
            f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} that the CUDA kernels need (cp.async, bf16 / tf32 mma.sync); "
            f"on such GPUs the triton and torch backends run"
        )
    keep = [t for t in sass if t not in too_old], [t for t in ptx if t not in too_old]
    source = "the default" if name == "default" else f"{name}={text!r}"
    return keep[0], keep[1], source, too_old


def split_target(target: str) -> tuple[str, tuple[int, int], str]:
    """"sm_90a" -> ("sm", (9, 0), "a"); "compute_100" -> ("compute", (10, 0), "")."""
    m = _TARGET.match(target)
    if m is None:
        raise ValueError(f"not an nvcc target (sm_XY or compute_XY): {target!r}")
    return m["kind"], (int(m["major"]), int(m["minor"])), m["suffix"]


def _target_key(target: str) -> tuple:
    _, capability, suffix = split_target(target)
    return capability, suffix


def capability_of(target: str) -> tuple[int, int]:
    return split_target(target)[1]


def nvcc_flags(sass: Sequence[str], ptx: Sequence[str]) -> list[str]:
    """nvcc flags: one -gencode per target, and the macro VQFAST_CUDA_ARCHS that bakes the list into the library.

    The macro is a bare token list ("sm_80:sm_90:compute_90") that csrc/cuda/nearest_codeword.cu
    turns into a string: a quoted value would not survive the shell that ninja runs nvcc from.
    """
    flags = [f"-gencode=arch={t.replace('sm_', 'compute_')},code={t}" for t in sass]
    flags += [f"-gencode=arch={t},code={t}" for t in ptx]
    return flags + [f"-DVQFAST_CUDA_ARCHS={':'.join(list(sass) + list(ptx))}"]


def runs_on(target: str, capability: tuple[int, int]) -> bool:
    """Whether the driver can run (sm_) or compile and run (compute_) ``target`` on a GPU of ``capability``."""
    kind, (major, minor), suffix = split_target(target)
    if suffix == "a":
        return capability == (major, minor)
    if kind == "sm" or suffix == "f":
        return capability[0] == major and capability[1] >= minor
    return tuple(capability) >= (major, minor)


def describe(sass: Sequence[str], ptx: Sequence[str]) -> str:
    """"machine code for sm_80, sm_90 and PTX for compute_90" (the build line and the run-time reason)."""
    text = "machine code for " + (", ".join(sass) if sass else "no architecture")
    return text + (" and PTX for " + ", ".join(ptx) if ptx else " and no PTX")


def arch_reason(sass: Sequence[str], ptx: Sequence[str], capability: tuple[int, int]) -> str | None:
    """Why kernels built as (sass, ptx) cannot run on a GPU of compute ``capability``, or None when they can."""
    capability = (int(capability[0]), int(capability[1]))
    if any(runs_on(t, capability) for t in list(sass) + list(ptx)):
        return None
    cc = f"{capability[0]}.{capability[1]}"
    if capability < MIN_CAPABILITY:
        return (f"compute capability {cc} is below the {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} that the CUDA "
                f"kernels need (cp.async, bf16 / tf32 mma.sync)")
    return (f"vqfast._C holds {describe(sass, ptx)}, none of which runs on compute capability {cc} (machine code "
            f"runs on the same major version with an equal or lower minor, PTX on any equal or lower capability); "
            f"rebuild with VQFAST_CUDA_ARCHS=\"{cc}\"")


# ---- what a built library really holds ---------------------------------------------------------------

_FATBIN_MAGIC = 0xBA55ED50
_FATBIN_KINDS = {1: "compute", 2: "sm"}  # an entry's kind: PTX text or machine code (an ELF cubin)


def fatbin_targets(path) -> list[str]:
    """The CUDA code an ELF file (a shared library or an object) carries in its .nv_fatbin section:
    ["sm_80", "sm_90", "compute_90"] for machine code of sm_80 and sm_90 and PTX of compute_90, sorted
    and without repeats; [] when it has no such section. What cuobjdump --list-elf / --list-ptx would
    show, read without the CUDA toolkit (which cuobjdump belongs to) so the check runs anywhere."""
    import struct

    with open(path, "rb") as f:
        elf = f.read()
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise ValueError(f"{path} is not a little-endian 64-bit ELF file")
    shoff, = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)

    def section(i):  # (name offset, file offset, size)
        base = shoff + i * shentsize
        return struct.unpack_from("<I", elf, base)[0], *struct.unpack_from("<QQ", elf, base + 24)

    names = section(shstrndx)[1]
    blob = b""
    for i in range(shnum):
        name, offset, size = section(i)
        if elf[names + name: names + name + 11] == b".nv_fatbin\0":
            blob = elf[offset: offset + size]
    found = set()
    pos = 0
    while pos + 16 <= len(blob):
        magic, _, header, size = struct.unpack_from("<IHHQ", blob, pos)
        if magic != _FATBIN_MAGIC:  # fatbins are 8-byte aligned inside the section
            pos += 8
            continue
        entry, end = pos + header, pos + header + size
        while entry < end:  # entry header: kind u16, u16, header size u32, payload size u64, ..., arch u32 at 28
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", blob, entry)
            arch, = struct.unpack_from("<I", blob, entry + 28)
            if kind in _FATBIN_KINDS:
                found.add((_FATBIN_KINDS[kind], arch))
            entry += entry_header + payload
        pos = end
    return [f"{kind}_{arch}" for kind, arch in sorted(found, key=lambda t: (t[0] == "compute", t[1]))]
