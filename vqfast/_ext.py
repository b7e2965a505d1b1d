"""Guarded import of the compiled extension ``vqfast._C``.

vqfast works without it (the pure-PyTorch backend), but warns once with the command that builds it.

The CPU kernel inside it is compiled for several instruction levels (x86-64: generic, avx2,
avx512; aarch64: generic, neon) and runs the best one this CPU has. ``VQFAST_CPU_ISA`` forces a
level; a level that this build lacks or this CPU cannot run makes ``import vqfast`` raise a
ValueError that lists the levels it can run (never a silent fallback: a benchmark or test that
forces a level must not measure another one).
"""
from __future__ import annotations

import contextlib
import functools
import os
import warnings

import torch

REBUILD_COMMAND = "pip install --no-build-isolation -e ."

_C = None
_IMPORT_ERROR: Exception | None = None

try:
    from vqfast import _C  # noqa: F401  (loading it runs the TORCH_LIBRARY registrations)
except ImportError as exc:  # pragma: no cover - exercised by tests/test_fallback.py in a subprocess
    _IMPORT_ERROR = exc
    if os.environ.get("VQFAST_NO_EXT_WARNING", "0") != "1":
        warnings.warn(
            f"vqfast: the compiled extension vqfast._C could not be loaded ({exc}); using the pure-PyTorch "
            f"backend, which is correct but slower. Rebuild it from the repository root with: {REBUILD_COMMAND}",
            RuntimeWarning,
            stacklevel=2,
        )


CPU_ISA_ENV = "VQFAST_CPU_ISA"


def _check_cpu_isa() -> None:
    try:
        torch.ops.vqfast.cpu_isa()  # the level is chosen here, once, from the CPU or VQFAST_CPU_ISA
    except (ValueError, RuntimeError) as exc:
        # The C++ message first line names the variable, the level and what this CPU runs.
        raise ValueError(str(exc).splitlines()[0]) from None


if _C is not None:
    _check_cpu_isa()


def has_ext() -> bool:
    """True when the compiled extension loaded (the "cpu" backend and the vqfast::nearest_codeword op)."""
    return _C is not None


@functools.cache
def has_cuda_ext() -> bool:
    """True when the extension was compiled with its CUDA kernels (a GPU need not be visible)."""
    return has_ext() and bool(torch.ops.vqfast.cuda_built())


@functools.cache
def cuda_archs() -> tuple[str, ...] | None:
    """The nvcc targets the CUDA kernels were compiled for, e.g. ("sm_80", "sm_90", "compute_90").

    sm_XY is machine code, compute_XY PTX that the driver compiles for newer GPUs at first launch
    (vqfast/_cuda_archs.py has the rules); () when the extension has no CUDA kernels, None when it
    does not say (an extension built before it recorded them).
    """
    if not has_cuda_ext():
        return ()
    try:
        text = torch.ops.vqfast.cuda_archs()
    except (AttributeError, RuntimeError):
        return None
    return tuple(t for t in text.split(":") if t) or None


def import_error() -> Exception | None:
    return _IMPORT_ERROR


def cpu_isa() -> str | None:
    """The instruction level the "cpu" backend runs: "generic", "avx2", "avx512" or "neon".

    None when the extension is not built. The best level this CPU has unless VQFAST_CPU_ISA forces one.
    """
    return str(torch.ops.vqfast.cpu_isa()) if has_ext() else None


def cpu_isa_levels() -> tuple[str, ...]:
    """The levels this build has and this CPU runs, lowest first (empty without the extension)."""
    return tuple(torch.ops.vqfast.cpu_isa_levels()) if has_ext() else ()


@contextlib.contextmanager
def forced_cpu_isa(level: str):
    """Run the "cpu" backend at ``level`` inside the block (tests comparing levels in one process)."""
    if level not in cpu_isa_levels():
        raise ValueError(f"level={level!r} is not a CPU instruction level this build and CPU run; "
                         f"choose one of {cpu_isa_levels()}")
    previous = torch.ops.vqfast._set_cpu_isa(level)
    try:
        yield level
    finally:
        torch.ops.vqfast._set_cpu_isa(previous)
