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
the work. This is why a compat class uses its original's attribute names. A second table,
``SEARCH_FREE``, lists the foreign quantizers that have no nearest-codeword search to speed up
(vector-quantize-pytorch's FSQ, LFQ and their residual forms, ...): ``accelerate(verbose=True)`` says so
and leaves them as they are. Recognition reads ``type(m).__module__`` and ``type(m).__name__`` only: a
library the user has not imported is never imported here.

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
class ForeignClass:
    library: str
    class_name: str
    # The defining module's dotted path ends with one of these (VAR and taming are usually vendored
    # into a user's tree, so only the tail of the path is fixed).
    module_suffixes: tuple[str, ...]

    def matches(self, cls: type) -> bool:
        module = cls.__module__ or ""
        return cls.__name__ == self.class_name and any(
            module == s or module.endswith("." + s) for s in self.module_suffixes
        )


@dataclasses.dataclass(frozen=True)
class Recognised(ForeignClass):
    """A foreign quantizer with a nearest-codeword search, and the vqfast class that takes it over."""

    # "module:Class" of the vqfast class that takes over.
    compat: str

    def compat_class(self) -> type:
        module, name = self.compat.split(":")
        return getattr(importlib.import_module(module), name)


@dataclasses.dataclass(frozen=True)
class SearchFree(ForeignClass):
    """A foreign quantizer without a nearest-codeword search: nothing for vqfast to speed up."""

    # What it does instead, for accelerate(verbose=True).
    how: str


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

# vector-quantize-pytorch's quantizers that round, take signs or map to bits instead of searching a
# codebook (1.32); accelerate(verbose=True) says so and leaves them (and their parts) as they are.
_VQ_PYTORCH = "vector-quantize-pytorch"
SEARCH_FREE: tuple[SearchFree, ...] = (
    SearchFree(_VQ_PYTORCH, "FSQ", ("vector_quantize_pytorch.finite_scalar_quantization",),
               "it rounds each dimension to a fixed set of levels"),
    SearchFree(_VQ_PYTORCH, "LFQ", ("vector_quantize_pytorch.lookup_free_quantization",),
               "it takes the sign of each dimension"),
    SearchFree(_VQ_PYTORCH, "EvoLFQ", ("vector_quantize_pytorch.evo_lookup_free_quantization",),
               "it takes the sign of each dimension"),
    SearchFree(_VQ_PYTORCH, "ResidualFSQ", ("vector_quantize_pytorch.residual_fsq",), "its stages are FSQs"),
    SearchFree(_VQ_PYTORCH, "GroupedResidualFSQ", ("vector_quantize_pytorch.residual_fsq",), "its stages are FSQs"),
    SearchFree(_VQ_PYTORCH, "ResidualLFQ", ("vector_quantize_pytorch.residual_lfq",), "its stages are LFQs"),
    SearchFree(_VQ_PYTORCH, "GroupedResidualLFQ", ("vector_quantize_pytorch.residual_lfq",), "its stages are LFQs"),
    SearchFree(_VQ_PYTORCH, "LatentQuantize", ("vector_quantize_pytorch.latent_quantization",),
               "it rounds each dimension to its own set of levels"),
    SearchFree(_VQ_PYTORCH, "FSP", ("vector_quantize_pytorch.finite_scalar_perturbation",),
               "it quantizes each dimension on its own"),
    SearchFree(_VQ_PYTORCH, "BinaryMapper", ("vector_quantize_pytorch.binary_mapper",),
               "it maps logits to bits"),
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


def search_free(module: nn.Module) -> SearchFree | None:
    """The SEARCH_FREE entry for ``module``'s class, else None."""
    return next((r for r in SEARCH_FREE if r.matches(type(module))), None)


def _is_compat_instance(module: nn.Module) -> bool:
    """An instance of a vqfast.compat class itself (not a converted foreign instance, not a helper part)."""
    cls = type(module)
    return (cls.__module__.startswith(__name__ + ".") and "_vqfast_original" not in cls.__dict__
            and callable(getattr(module, "_vqfast_adopt", None)))


def _looks_like_quantizer(module: nn.Module) -> bool:
    name = type(module).__name__.lower()
    return "quantiz" in name or name.endswith("vq") or name == "vectorquantize"


def _is_vqfast_quantizer(module: nn.Module) -> bool:
    """One of vqfast's own quantizers (vqfast.modules, vqfast.models, vqfast.multiscale): it searches
    with vqfast already."""
    return type(module).__module__.startswith("vqfast.") and _looks_like_quantizer(module)


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__name__}"


def accelerate(model: nn.Module, *, backend: str = "auto", precision: str = "exact", verbose: bool = False) -> nn.Module:
    """Replace, in place, every quantizer in ``model`` (``model`` included) that vqfast recognises.

    Args:
        model: any nn.Module; its recognised quantizers (see ``RECOGNISED`` and docs/dropin.md's table)
            are converted in place, sharing their Parameters and buffers.
        backend: the nearest-codeword backend the converted quantizers use ("auto", "cpu", "cuda",
            "triton" or "torch"; see vqfast.available_backends()).
        precision: "exact" (the same indices as an exact search, the truly nearest codeword) or "fast".
        verbose: print what was found: one line per quantizer (replaced; left on its original code
            and why; vqfast's own; needing no search, as vector-quantize-pytorch's FSQ and LFQ; a
            quantizer vqfast does not recognise), and when nothing was converted one line saying so,
            naming the model's class.

    Returns:
        ``model`` itself. Calling it again is harmless: converted quantizers take the new backend and
        precision.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_search_options(backend, precision)
    if not isinstance(verbose, bool):
        raise TypeError(f"verbose must be a bool, got {type(verbose).__name__}")

    def say(line: str) -> None:
        if verbose:
            print(f"vqfast.accelerate: {line}")

    converted = recognised_left = vqfast_own = 0
    reported: list[str] = []  # search-free and vqfast quantizers: their parts get no lines of their own
    for name, module in model.named_modules():
        if any(p == "" or name.startswith(p + ".") for p in reported):
            continue
        where = name or "(the model)"
        entry = recognise(module)
        if entry is None and _is_compat_instance(module):
            # One of vqfast.compat's classes built directly: it takes the new backend and precision.
            module._vqfast_adopt(backend=backend, precision=precision)
            converted += 1
            say(f"{where}: {type(module).__module__}.{type(module).__name__} is vqfast's already "
                f"(backend={backend!r}, precision={precision!r})")
            continue
        if entry is None:
            free = search_free(module)
            if free is not None:
                reported.append(name)
                say(f"{where}: {free.library} {free.class_name} needs no nearest-codeword search ({free.how}): "
                    f"left as it is")
            elif _is_vqfast_quantizer(module):
                reported.append(name)
                vqfast_own += 1
                say(f"{where}: {_class_path(type(module))} is vqfast's own quantizer (it searches with vqfast "
                    f"already): left as built")
            elif _looks_like_quantizer(module):
                say(f"{where}: {_class_path(type(module))} left: not a class vqfast recognises")
            continue
        compat = entry.compat_class()
        original = getattr(type(module), "_vqfast_original", type(module))
        label = f"{where}: {entry.library} {entry.class_name}"
        reason = compat.unsupported_reason(module)
        if reason is not None:
            recognised_left += 1
            say(f"{label} left on its original code: {reason}")
            continue
        already = isinstance(module, compat)
        if not already:
            module.__class__ = accelerated_class(compat, original)
        module._vqfast_adopt(backend=backend, precision=precision)
        converted += 1
        say(f"{label} {'already accelerated' if already else 'replaced'} (backend={backend!r}, precision={precision!r})")
    if converted == 0 and vqfast_own == 0:
        what = (f"its {recognised_left} recognised quantizer(s) are left on their original code"
                if recognised_left else "no quantizer vqfast recognises")
        say(f"nothing converted in {type(model).__name__} ({type(model).__module__}): {what}")
    return model
