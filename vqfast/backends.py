"""The backend registry: which implementations of nearest_codeword exist and which one runs.

    auto    the fastest available backend for the tensors' device (VQFAST_BACKEND overrides it)
    torch   pure PyTorch (vqfast/reference.py): every device, always available
    cpu     the C++ CPU kernel in vqfast._C
    cuda    the CUDA C++ kernel in vqfast._C (built with a CUDA torch + nvcc)
    triton  the Triton kernel (CUDA tensors; CPU tensors only under TRITON_INTERPRET=1)

Each backend is one record (``Backend``) in ``REGISTRY``: why it cannot run (the process, the
device type, the inputs), how to load its op, and where "auto" considers it. ``BACKEND_NAMES`` and
``AUTO_ORDER`` are derived from the records; adding a backend is adding a record.

"auto" falls back quietly to the next backend in its preference list; a backend requested by name
(argument or VQFAST_BACKEND) that cannot run the given tensors raises a ValueError saying why.
"Cannot run" covers the process (not built; for cuda, no visible GPU whose compute capability the
kernels were compiled for or can be JIT-compiled to), the device type, and the inputs themselves (a
backend's inputs_reason: e.g. a D outside its kernel's range, or sizes beyond 32-bit offsets).

GPU kernels are the automatic choice only where they have run: "auto" takes a GPU kernel for CUDA
tensors only on GPU architectures that vqfast/gpu_validated.json lists for it (written by a fully
passing scripts/gpu_check.sh). Elsewhere it takes torch and warns once per process, in one line,
which kernels could run and how to opt in (backend="cuda" / "triton", or VQFAST_BACKEND).
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import importlib.util
import json
import os
import warnings
from pathlib import Path
from typing import Callable

import torch

from vqfast import _cuda_archs, _ext, _opdef
from vqfast._validation import PRECISIONS, int32_indices_reason

ENV_VAR = "VQFAST_BACKEND"
Tensor = torch.Tensor
# An op with the nearest_codeword signature: (z, codebook, metric, precision) -> (indices, codewords, distances).
Op = Callable[..., "tuple[Tensor, Tensor, Tensor]"]


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    # Why this backend cannot run at all in this process, or None when it can.
    unavailable_reason: Callable[[], str | None]
    # Why it cannot run tensors on this device type, or None when it can.
    device_reason: Callable[[str], str | None]
    # Its op (called only once the backend is known to be available).
    load_op: Callable[[], Op]
    # Why it cannot run these particular (z, codebook), or None when it can. Reads shapes and dtypes only.
    inputs_reason: Callable[[Tensor, Tensor], str | None] = lambda z, codebook: None
    # The op that also runs check_finite's value tests inside the search, where the backend has one.
    load_checked_op: Callable[[], Op] | None = None
    # GPU kernels: the op with check_finite's value test fused into the search, which returns a fourth
    # output, ``extremes`` (max |z|, max |codebook|, float64 [2], on the device) for the caller to read
    # back once (vqfast/_opdef.py); it returns None where this build or install has no such op.
    load_flagged_op: Callable[[], Op | None] | None = None
    # The device types it serves natively, in the registry's order of preference for "auto" (and the
    # (device, backend) pairs the tests cover).
    devices: tuple[str, ...] = ()
    # "auto"'s last resort on every device type.
    fallback: bool = False
    # A GPU kernel: "auto" takes it for CUDA tensors only on architectures the validation record lists.
    needs_gpu_validation: bool = False


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


def _torch_op() -> Op:
    return torch.ops.vqfast.nearest_codeword_torch.default  # defined in vqfast._opdef


def _cpp_op() -> Op:
    return torch.ops.vqfast.nearest_codeword.default  # vqfast._C: CPU and CUDA kernels under one schema


def _cpp_checked_op() -> Op:
    return torch.ops.vqfast.nearest_codeword_checked.default


def _triton_op() -> Op:
    import vqfast.triton  # noqa: F401  (defines and registers the op; imports triton, so only when used)

    return torch.ops.vqfast.nearest_codeword_triton.default


def _defined_op(name: str) -> Op | None:
    """torch.ops.vqfast.<name>.default, or None where it is not defined (a build from before it existed)."""
    return getattr(torch.ops.vqfast, name).default if hasattr(torch.ops.vqfast, name) else None


def _cuda_flagged_op() -> Op | None:
    return _defined_op("nearest_codeword_flagged")  # vqfast._C's CUDA kernel with the fused value test


def _triton_flagged_op() -> Op | None:
    import vqfast.triton  # noqa: F401  (defines the op, where this version of vqfast.triton has it)

    return _defined_op("nearest_codeword_triton_flagged")


# In the order of "auto"'s preference on each device (the fallback comes last whatever its place).
# The CUDA and Triton kernels address memory with 64-bit offsets and keep indices in int32.
REGISTRY: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("torch", lambda: None, lambda device_type: None, _torch_op, devices=("cpu", "cuda"), fallback=True),
        Backend("cpu", _cpu_reason, _only("cpu"), _cpp_op, load_checked_op=_cpp_checked_op, devices=("cpu",)),
        Backend("cuda", _cuda_reason, _only("cuda"), _cpp_op, _cuda_inputs_reason, load_flagged_op=_cuda_flagged_op,
                devices=("cuda",), needs_gpu_validation=True),
        Backend("triton", _triton_reason, _triton_device_reason, _triton_op, _triton_inputs_reason,
                load_flagged_op=_triton_flagged_op, devices=("cuda",), needs_gpu_validation=True),
    )
}

BACKEND_NAMES: tuple[str, ...] = tuple(REGISTRY)
FALLBACK: str = next(b.name for b in REGISTRY.values() if b.fallback)
# "auto" tries these in order and takes the first that can run the tensors (other device types: FALLBACK).
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    device: tuple(b.name for b in REGISTRY.values() if device in b.devices and not b.fallback) + (FALLBACK,)
    for device in dict.fromkeys(d for b in REGISTRY.values() for d in b.devices)
}


def load_op(name: str, checked: bool = False) -> Op:
    """The op of backend ``name``; checked=True: the one that also tests the values (cpu only)."""
    b = REGISTRY[name]
    if not checked:
        return b.load_op()
    if b.load_checked_op is None:
        raise ValueError(f"backend {name!r} has no op with fused value checks")
    return b.load_checked_op()


def load_flagged_op(name: str) -> Op | None:
    """The op of backend ``name`` with check_finite's value test fused into its kernels (the GPU
    backends: (z, codebook, metric, precision) -> (indices, codewords, distances, extremes)), or None
    where the backend or this build has none."""
    load = REGISTRY[name].load_flagged_op
    return None if load is None else load()


# ---------------------------------------------------------------- the GPU validation record

VALIDATION_RECORD = Path(__file__).with_name("gpu_validated.json")
UNVALIDATED_HINT = "scripts/gpu_check.sh all validates this GPU"


class UnvalidatedKernelWarning(UserWarning):
    """backend="auto" took torch on a GPU where vqfast's GPU kernels run but have not been validated."""


def _read_record(path: Path) -> dict[str, dict[str, dict]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:  # a build that left the file out: nothing is validated
        return {}
    return dict(data.get("architectures", {}))


# Read once, at import: "auto" consults it on every call, also while torch.compile traces (no file I/O there).
_RECORD = _read_record(VALIDATION_RECORD)


def validation_record() -> dict[str, dict[str, dict]]:
    """vqfast/gpu_validated.json's entries: {architecture ("sm_90"): {backend: {date, commit, device, passed, ...}}}."""
    return _RECORD


def reload_validation_record() -> None:
    """Read VALIDATION_RECORD again (after record_validation, or in tests)."""
    global _RECORD
    _RECORD = _read_record(VALIDATION_RECORD)


def gpu_arch(index: int | None = None) -> str:
    """The architecture of CUDA device ``index`` (current device when None) as the record names it: "sm_90"."""
    if index is None:
        index = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return f"sm_{major}{minor}"


def is_validated(backend: str, arch: str) -> bool:
    """True when the validation record lists ``backend`` for GPU architecture ``arch``."""
    return backend in validation_record().get(arch, {})


def validation_summary() -> str:
    """One line per kernel: where it is validated and what "auto" does with it (install report, docs)."""
    record = validation_record()
    here = None
    if torch.cuda.is_available():
        here = gpu_arch()
    lines = []
    for b in REGISTRY.values():
        if b.fallback:
            continue
        if not b.needs_gpu_validation:
            lines.append(f"{b.name}: backend='auto' takes it for {'/'.join(b.devices)} tensors "
                         "(the test suite checks it on the machine it runs on)")
            continue
        archs = sorted(a for a, entry in record.items() if b.name in entry)
        if archs:
            done = ", ".join(f"{a} ({record[a][b.name].get('device', '?')}, {record[a][b.name].get('date', '?')})"
                             for a in archs)
            state = f"validated on {done}: backend='auto' takes it there"
        else:
            state = "not validated on any GPU yet: backend='auto' takes torch for CUDA tensors"
        if here is not None:
            state += f"; this GPU ({here}) {'is' if here in archs else 'is not'} validated"
        lines.append(f"{b.name}: {state}; opt in with backend='{b.name}' or {ENV_VAR}={b.name}")
    return "\n".join(lines)


def record_validation(arch: str, backends: list[str], device: str, commit: str, passed: str,
                      path: Path | str = VALIDATION_RECORD, date: str | None = None, **details: str) -> None:
    """Add (or replace) the entries of ``backends`` for GPU architecture ``arch`` in the record at ``path``.

    Called by scripts/gpu_check.sh after every stage passed, nowhere else.
    """
    path = Path(path)
    data = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    entry = {"date": date or datetime.date.today().isoformat(), "commit": commit, "device": device,
             "passed": passed, **details}
    data.setdefault("architectures", {}).setdefault(arch, {}).update({name: dict(entry) for name in backends})
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    reload_validation_record()


_unvalidated_checked = False


def _warn_unvalidated(skipped: list[str], arch: str) -> None:
    """Once per process: which GPU kernels "auto" passed over on this GPU, and how to opt in."""
    global _unvalidated_checked
    if _unvalidated_checked or torch.compiler.is_compiling():  # said in eager mode, not while tracing
        return
    _unvalidated_checked = True
    runnable = [n for n in skipped if REGISTRY[n].unavailable_reason() is None]
    if not runnable:
        return
    kernels = " and ".join(runnable)
    opt = " or ".join(f"backend={n!r}" for n in runnable)
    warnings.warn(
        f"vqfast: backend='auto' runs the torch backend on this GPU ({arch}): the {kernels} "
        f"kernel{'s' if len(runnable) > 1 else ''} can run here but {'have' if len(runnable) > 1 else 'has'} not "
        f"been validated on {arch} (vqfast/gpu_validated.json); opt in with {opt} or {ENV_VAR}={runnable[0]} "
        f"({UNVALIDATED_HINT})",
        UnvalidatedKernelWarning,
        stacklevel=4,
    )


def _cuda_index(inputs: tuple[Tensor, Tensor] | None) -> int | None:
    if inputs is not None and inputs[0].device.type == "cuda":
        return inputs[0].device.index
    return None


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
            unvalidated, arch = [], None
            for name in AUTO_ORDER.get(device_type, (FALLBACK,)):
                b = REGISTRY[name]
                if b.fallback:
                    break
                if b.needs_gpu_validation and device_type == "cuda" and torch.cuda.is_available():
                    arch = arch or gpu_arch(_cuda_index(inputs))  # once per call, for every GPU kernel
                    if not is_validated(name, arch):
                        unvalidated.append(name)
                        continue
                if (b.unavailable_reason() is None and b.device_reason(device_type) is None
                        and _inputs_reason(b, inputs) is None):
                    return name
            if unvalidated:
                _warn_unvalidated(unvalidated, arch)
            return FALLBACK
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
