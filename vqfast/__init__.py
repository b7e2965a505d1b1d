"""vqfast: fast fused nearest-codeword search and drop-in vector quantizers for PyTorch.

The public names below load on first use (PEP 562), so `import vqfast.cli` and `vqfast --help` start
without importing torch. The first of them that is touched imports torch and the compiled extension
vqfast._C, which registers the torch.ops.vqfast.* ops (so does `import vqfast.ops`).
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC = {
    "nearest_codeword": "vqfast.ops",
    "accelerate": "vqfast.compat",
    "available_backends": "vqfast.backends",
    "has_ext": "vqfast._ext",
    "has_cuda_ext": "vqfast._ext",
    "cpu_isa": "vqfast._ext",
    "cuda_archs": "vqfast._ext",
    "VectorQuantizer": "vqfast.modules",
    "VectorQuantizer2": "vqfast.modules",
    "ResidualVectorQuantizer": "vqfast.modules",
}

__all__ = list(_PUBLIC)


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'vqfast' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
