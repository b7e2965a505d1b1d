"""The backend registry: which implementations of nearest_codeword exist and which one runs.

    auto    the fastest available backend for the tensors' device (VQFAST_BACKEND overrides it)
    torch   pure PyTorch (vqfast/reference.py): every device, always available
    cpu     the C++ CPU kernel in vqfast._C
    cuda    the CUDA C++ kernel in vqfast._C (built with a CUDA torch + nvcc)
    triton  the Triton kernel (CUDA tensors; CPU tensors only under TRITON_INTERPRET=1)

"auto" falls back quietly to the next backend in its preference list; a backend requested by name
(argument or VQFAST_BACKEND) that cannot run the given tensors raises a ValueError saying why.
"Cannot run" covers the process (not built; for cuda, no visible GPU whose compute capability the
kernels were compiled for or can be JIT-compiled to), the device type, and the inputs themselves (a
backend's inputs_reason: e.g. a D outside its kernel's range, or sizes beyond 32-bit offsets).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
from typing import Callable

import torch

from vqfast import _cuda_archs, _ext
from vqfast._validation import PRECISIONS, int32_indices_reason

BACKEND_NAMES = ("torch", "cpu", "cuda", "triton")
ENV_VAR = "VQFAST_BACKEND"


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    # Why this backend cannot run at all in this process, or None when it can.
    unavailable_reason: Callable[[], str | None]
    # Why it cannot run tensors on this device type, or None when it can.
    device_reason: Callable[[str], str | None]
    # Why it cannot run these particular (z, codebook), or None when it can. Reads shapes and dtypes only.
    inputs_reason: Callable[[torch.Tensor, torch.Tensor], str | None] = lambda z, codebook: None


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _triton_import_reason() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    try:
        import vqfast.triton  # noqa: F401
    except ImportError as exc:
        return f"vqfast.triton could not be imported ({exc})"
    return None


def _cpu_reason() -> str | None:
    if not _ext.has_ext():
        return f"the compiled extension vqfast._C is not built (run: {_ext.REBUILD_COMMAND})"
    return None


@functools.cache
def _targets_reason(targets: tuple[str, ...], capability: tuple[int, int]) -> str | None:
    # Cached: "auto" asks on every call, and the answer is fixed per (build, GPU model).
    sass = [t for t in targets if t.startswith("sm_")]
    ptx = [t for t in targets if t.startswith("compute_")]
    return _cuda_archs.arch_reason(sass, ptx, capability)


def _cuda_gpu_reason(index: int) -> str | None:
    """Why the compiled CUDA kernels cannot run on GPU ``index`` (its compute capability), or None."""
    targets = _ext.cuda_archs()
    if targets is None:  # an extension that does not record its targets: trust it, as before
        return None
    return _targets_reason(tuple(targets), tuple(torch.cuda.get_device_capability(index)))


def _cuda_reason() -> str | None:
    if not _ext.has_ext():
        return f"the compiled extension vqfast._C is not built (run: {_ext.REBUILD_COMMAND})"
    if not _ext.has_cuda_ext():
        hint = "" if torch.version.cuda is None else (
            f"; rebuild with the CUDA {torch.version.cuda} nvcc installed (`pip install -v --no-build-isolation .` "
            "prints a line 'vqfast: CUDA kernels: ...' that says why a build left them out)")
        return f"vqfast._C was built without CUDA kernels (needs a CUDA build of torch and nvcc at build time){hint}"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    # Unavailable only when no visible GPU can run the kernels; on a machine with mixed GPUs the
    # tensors' own GPU is checked by _cuda_inputs_reason.
    by_reason: dict[str, list[str]] = {}
    for index in range(torch.cuda.device_count()):
        reason = _cuda_gpu_reason(index)
        if reason is None:
            return None
        by_reason.setdefault(reason, []).append(f"cuda:{index} ({torch.cuda.get_device_name(index)})")
    return "; ".join(f"{', '.join(gpus)}: {reason}" for reason, gpus in by_reason.items())


def _cuda_inputs_reason(z: torch.Tensor, codebook: torch.Tensor) -> str | None:
    reason = int32_indices_reason(z, codebook)
    if reason is None and z.device.type == "cuda":
        index = z.device.index if z.device.index is not None else torch.cuda.current_device()
        gpu_reason = _cuda_gpu_reason(index)
        if gpu_reason is not None:
            reason = f"cuda:{index} ({torch.cuda.get_device_name(index)}): {gpu_reason}"
    return reason


def _triton_reason() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    # Before the import: importing vqfast.triton (triton, torch's inductor) takes seconds.
    if not torch.cuda.is_available() and not _triton_interpret():
        return "no CUDA device is available (set TRITON_INTERPRET=1 to run Triton kernels on CPU tensors)"
    return _triton_import_reason()


def _triton_inputs_reason(z: torch.Tensor, codebook: torch.Tensor) -> str | None:
    import vqfast.triton

    return int32_indices_reason(z, codebook) or vqfast.triton.inputs_reason(z, codebook)


def _only(*device_types: str, hint: str = "") -> Callable[[str], str | None]:
    def reason(device_type: str) -> str | None:
        if device_type in device_types:
            return None
        return f"it runs only on {'/'.join(device_types)} tensors, got {device_type} tensors{hint}"

    return reason


def _triton_device_reason(device_type: str) -> str | None:
    if device_type == "cuda":
        return None
    if device_type == "cpu" and _triton_interpret():
        return None
    return f"it runs on cuda tensors (cpu tensors only under TRITON_INTERPRET=1), got {device_type} tensors"


REGISTRY: dict[str, Backend] = {
    "torch": Backend("torch", lambda: None, lambda device_type: None),
    "cpu": Backend("cpu", _cpu_reason, _only("cpu")),
    # The GPU kernels are assumed to use 32-bit flat offsets until they declare otherwise.
    # The CUDA and Triton kernels address memory with 64-bit offsets and keep indices in int32.
    "cuda": Backend("cuda", _cuda_reason, _only("cuda"), _cuda_inputs_reason),
    "triton": Backend("triton", _triton_reason, _triton_device_reason, _triton_inputs_reason),
}

# "auto" tries these in order and takes the first that can run the tensors.
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cpu": ("cpu", "torch"),
    "cuda": ("cuda", "triton", "torch"),
}


def check_search_options(backend: object, precision: object) -> None:
    """The ``backend=`` / ``precision=`` options every quantizer takes: ValueError naming the one that is wrong."""
    if not isinstance(backend, str) or backend not in ("auto",) + BACKEND_NAMES:
        raise ValueError(f"backend must be one of {('auto',) + BACKEND_NAMES}, got {backend!r}")
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """The backends usable in this process (for tensors on ``device``'s type, when given)."""
    device_type = None if device is None else torch.device(device).type
    out = []
    for name in BACKEND_NAMES:
        b = REGISTRY[name]
        # The device check first: it is cheap, while triton's availability imports triton (seconds).
        if device_type is not None and b.device_reason(device_type) is not None:
            continue
        if b.unavailable_reason() is not None:
            continue
        out.append(name)
    return out


def _inputs_reason(b: Backend, inputs: tuple[torch.Tensor, torch.Tensor] | None) -> str | None:
    return None if inputs is None else b.inputs_reason(*inputs)


def resolve_backend(backend: str, device_type: str, inputs: tuple[torch.Tensor, torch.Tensor] | None = None) -> str:
    """Turn a requested backend name ("auto" included) into the one that will run.

    inputs, when given, is (z, codebook) as the kernel will receive them: backends whose
    inputs_reason rejects them are skipped under "auto" and raise when requested by name.
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, one of {('auto',) + BACKEND_NAMES}, got {type(backend).__name__}")
    source = "backend"
    if backend == "auto":
        env = os.environ.get(ENV_VAR, "").strip()
        if env and env != "auto":
            backend, source = env, f"the environment variable {ENV_VAR}"
        else:
            for name in AUTO_ORDER.get(device_type, ("torch",)):
                b = REGISTRY[name]
                if (b.unavailable_reason() is None and b.device_reason(device_type) is None
                        and _inputs_reason(b, inputs) is None):
                    return name
            return "torch"
    if backend not in REGISTRY:
        raise ValueError(f"{source}={backend!r} is not a vqfast backend; choose one of {('auto',) + BACKEND_NAMES}")
    b = REGISTRY[backend]
    reason = b.unavailable_reason() or b.device_reason(device_type) or _inputs_reason(b, inputs)
    if reason is not None:
        raise ValueError(
            f"{source}={backend!r} was requested but cannot run here: {reason}. "
            f"Available for {device_type} tensors: {available_backends(device_type)}; backend='auto' picks one."
        )
    return backend
