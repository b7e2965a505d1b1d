"""Drop-in twins of the quantizers other libraries ship, one file per library.

    vqfast.compat.var               VAR's VectorQuantizer2 (models/quant.py)
    vqfast.compat.taming            taming-transformers' VectorQuantizer2 and VectorQuantizer
    vqfast.compat.diffusers         diffusers' VectorQuantizer (models/autoencoders/vae.py)
    vqfast.compat.vector_quantize   vector-quantize-pytorch's VectorQuantize and ResidualVQ

Each class keeps its original's constructor, attribute names, state_dict keys and outputs, and runs
the nearest-codeword search with vqfast's fused op.

``vqfast.accelerate(model)`` (defined here): one table, ``RECOGNISED``, lists the foreign classes vqfast
knows, by library, module path and class name, and the compat class that takes each over. It walks the
module tree and, for every recognised instance whose options the compat class supports, swaps the
instance's class for one deriving from (compat class, original class). The object, its Parameters,
buffers, hooks and every reference to it stay the same (optimizers, EMA copies, ``state_dict()`` and
checkpoints keep working), ``isinstance(m, Original)`` stays true, and the compat class's methods do
the work. This is why a compat class uses its original's attribute names. Recognition reads
``type(m).__module__`` and ``type(m).__name__`` only: a library the user has not imported is never
imported here.

A compat class takes part in ``accelerate`` through two hooks:

    unsupported_reason(module) -> str | None    classmethod: why this instance's options cannot be
                                                accelerated (it then stays on its original code)
    _vqfast_adopt(backend, precision)           called on the converted instance (and again on a
                                                second accelerate call): set what the vqfast code
                                                needs beyond the original's attributes
"""
from __future__ import annotations

import dataclasses
import importlib

import torch.nn as nn

from vqfast.backends import check_search_options


@dataclasses.dataclass(frozen=True)
class Recognised:
    library: str
    class_name: str
    # The defining module's dotted path ends with one of these (VAR and taming are usually vendored
    # into a user's tree, so only the tail of the path is fixed).
    module_suffixes: tuple[str, ...]
    # "module:Class" of the vqfast class that takes over.
    compat: str

    def matches(self, cls: type) -> bool:
        module = cls.__module__ or ""
        return cls.__name__ == self.class_name and any(
            module == s or module.endswith("." + s) for s in self.module_suffixes
        )

    def compat_class(self) -> type:
        module, name = self.compat.split(":")
        return getattr(importlib.import_module(module), name)


RECOGNISED: tuple[Recognised, ...] = (
    Recognised("VAR", "VectorQuantizer2", ("models.quant",), "vqfast.compat.var:VectorQuantizer2"),
    Recognised(
        "taming-transformers", "VectorQuantizer2", ("taming.modules.vqvae.quantize", "modules.vqvae.quantize"),
        "vqfast.compat.taming:VectorQuantizer2",
    ),
    Recognised(
        "taming-transformers", "VectorQuantizer", ("taming.modules.vqvae.quantize", "modules.vqvae.quantize"),
        "vqfast.compat.taming:VectorQuantizer",
    ),
    Recognised(
        "diffusers", "VectorQuantizer", ("diffusers.models.autoencoders.vae", "diffusers.models.vae"),
        "vqfast.compat.diffusers:VectorQuantizer",
    ),
    Recognised(
        "vector-quantize-pytorch", "VectorQuantize", ("vector_quantize_pytorch.vector_quantize_pytorch",),
        "vqfast.compat.vector_quantize:VectorQuantize",
    ),
    Recognised(
        "vector-quantize-pytorch", "ResidualVQ", ("vector_quantize_pytorch.residual_vq",),
        "vqfast.compat.vector_quantize:ResidualVQ",
    ),
)

_ACCELERATED_CLASSES: dict[tuple[type, type], type] = {}


def _restore(compat: type, original: type) -> nn.Module:
    """Unpickling target of an accelerated instance (its class is made at run time, not importable)."""
    return object.__new__(accelerated_class(compat, original))


def _reduce_ex(self, protocol):
    cls = type(self)
    return _restore, (cls._vqfast_compat, cls._vqfast_original), self.__dict__


def accelerated_class(compat: type, original: type) -> type:
    """The class (compat, original) given to a converted instance; one per pair, reused."""
    key = (compat, original)
    if key not in _ACCELERATED_CLASSES:
        _ACCELERATED_CLASSES[key] = type(
            original.__name__,
            (compat, original),
            {
                "__module__": compat.__module__,
                "__qualname__": f"{compat.__qualname__}[{original.__module__}.{original.__qualname__}]",
                "_vqfast_compat": compat,
                "_vqfast_original": original,
                "__reduce_ex__": _reduce_ex,
            },
        )
    return _ACCELERATED_CLASSES[key]


def recognise(module: nn.Module) -> Recognised | None:
    """The table entry for ``module``'s class (or the class it was converted from), else None."""
    cls = getattr(type(module), "_vqfast_original", type(module))
    return next((r for r in RECOGNISED if r.matches(cls)), None)


def _is_compat_instance(module: nn.Module) -> bool:
    """An instance of a vqfast.compat class itself (not a converted foreign instance, not a helper part)."""
    cls = type(module)
    return (cls.__module__.startswith(__name__ + ".") and "_vqfast_original" not in cls.__dict__
            and callable(getattr(module, "_vqfast_adopt", None)))


def _looks_like_quantizer(module: nn.Module) -> bool:
    name = type(module).__name__.lower()
    return "quantiz" in name or name in ("residualvq", "vectorquantize")


def accelerate(model: nn.Module, *, backend: str = "auto", precision: str = "exact", verbose: bool = False) -> nn.Module:
    """Replace, in place, every quantizer in ``model`` (``model`` included) that vqfast recognises.

    Args:
        model: any nn.Module; its recognised quantizers (see ``RECOGNISED`` and the README's table)
            are converted in place, sharing their Parameters and buffers.
        backend: the nearest-codeword backend the converted quantizers use ("auto", "cpu", "cuda",
            "triton" or "torch"; see vqfast.available_backends()).
        precision: "exact" (the same indices as an exact search, the truly nearest codeword) or "fast".
        verbose: print one line per quantizer found: replaced, or left on its original code and why.

    Returns:
        ``model`` itself. Calling it again is harmless: converted quantizers take the new backend and
        precision.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_search_options(backend, precision)
    if not isinstance(verbose, bool):
        raise TypeError(f"verbose must be a bool, got {type(verbose).__name__}")
    for name, module in model.named_modules():
        entry = recognise(module)
        where = name or "(the model)"
        if entry is None and _is_compat_instance(module):
            # One of vqfast.compat's classes built directly: it takes the new backend and precision.
            module._vqfast_adopt(backend=backend, precision=precision)
            if verbose:
                print(f"vqfast.accelerate: {where}: {type(module).__module__}.{type(module).__name__} is vqfast's "
                      f"already (backend={backend!r}, precision={precision!r})")
            continue
        if entry is None:
            if verbose and _looks_like_quantizer(module):
                cls = type(module)
                print(f"vqfast.accelerate: {where}: {cls.__module__}.{cls.__name__} left: not a class vqfast recognises")
            continue
        compat = entry.compat_class()
        original = getattr(type(module), "_vqfast_original", type(module))
        label = f"{where}: {entry.library} {entry.class_name}"
        reason = compat.unsupported_reason(module)
        if reason is not None:
            if verbose:
                print(f"vqfast.accelerate: {label} left on its original code: {reason}")
            continue
        already = isinstance(module, compat)
        if not already:
            module.__class__ = accelerated_class(compat, original)
        module._vqfast_adopt(backend=backend, precision=precision)
        if verbose:
            state = "already accelerated" if already else "replaced"
            print(f"vqfast.accelerate: {label} {state} (backend={backend!r}, precision={precision!r})")
    return model
