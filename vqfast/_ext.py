"""Guarded import of the compiled extension ``vqfast._C``.

vqfast works without it (the pure-PyTorch backend), but warns once with the command that builds it.
"""
from __future__ import annotations

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
