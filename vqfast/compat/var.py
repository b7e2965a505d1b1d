"""VAR's multi-scale residual quantizer (FoundationVision/VAR, models/quant.py) with the fused search.

    VectorQuantizer2(vocab_size, Cvae, using_znorm, beta=0.25, default_qresi_counts=0, v_patch_nums=None,
                     quant_resi=0.5, share_quant_resi=4, *, backend="auto", precision="exact")

The drop-in that ``vqfast.accelerate`` gives VAR's instances (and a class to build directly). It is
``vqfast.multiscale.VARQuantizer`` -- VAR's constructor, attribute names, state_dict keys in VAR's order,
initialisation, methods and outputs, with every scale's search done by ``vqfast.nearest_codeword``; see
that module for the scale loop -- plus the two hooks vqfast.accelerate calls (``unsupported_reason``,
``_vqfast_adopt``). VAR's helper classes are here under VAR's names: Phi, PhiShared,
PhiPartiallyShared, PhiNonShared.

Outputs, losses and gradients are VAR's bit for bit wherever the indices agree. They differ only on rows
where VAR's expanded formula ||z||^2 + ||e||^2 - 2 z.e (fp32, cancellation) picks a codeword that is not
the nearest: vqfast picks the nearest ("exact" precision).

Differences from VAR, all deliberate:
- No process group is needed: VAR's forward reads torch.distributed.get_world_size() (for the usages
  margin) and raises without one; here a missing process group counts as world size 1, what VAR
  computes under a world-size-1 group. The world size is read only when ret_usages is True.
- VAR updates ``ema_vocab_hit_SV`` and ``record_hit`` in training only when its own
  ``dist.initialized()`` flag is set (its dist.initialize with RANK and CUDA): a converted VAR instance
  reads that flag from VAR's module, so it updates exactly when VAR would; a directly constructed
  instance always updates in training. The updates run after the scale loop, outside torch.compile's
  graph, so a compiled forward is not recompiled as record_hit counts up.
- Non-finite values raise a ValueError naming the scale (VAR would pick arbitrary codes). Values so
  large that fp32 squared distances could overflow (|x| > 6.5e18 / sqrt(Cvae)) make the pass run again
  with a float64 search.
- f_to_idxBl_or_fhat casts a non-fp32 input to fp32 as forward does (VAR's version fails on it).
- With ``using_znorm`` a row that is exactly zero takes code 0, as VAR's argmax of an all-zero cosine row
  does. A codeword of norm below 1e-12 (F.normalize's eps) is ranked by its squared distance to the
  row rather than by VAR's dot product (it is not a unit vector after normalising); VAR's N(0, 1) init
  and training never produce one.

Speed at tiny N: the ten searches of a pass share one set of checks (the codebook validated and the
backend resolved once, the values scanned on the device and read back once), and each scale launches
only the op itself; see ``vqfast.multiscale.ScaleSearches``.
"""
from __future__ import annotations

import sys
from typing import Optional

import torch
import torch.nn as nn

from vqfast.compat._checks import embedding_problem
from vqfast.multiscale import (
    Phi,
    PhiNonShared,
    PhiPartiallyShared,
    PhiShared,
    VARQuantizer,
    patch_nums_problem,
)

__all__ = ["VectorQuantizer2", "Phi", "PhiShared", "PhiPartiallyShared", "PhiNonShared"]

# The attributes VAR's forward and methods read, all of which the converted instance must have.
_VAR_ATTRIBUTES = ("vocab_size", "Cvae", "using_znorm", "v_patch_nums", "quant_resi", "ema_vocab_hit_SV",
                   "record_hit", "beta", "embedding", "prog_si")


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class VectorQuantizer2(VARQuantizer):
    """VAR's multi-scale residual quantizer, codebook ``embedding`` [vocab_size, Cvae]; see the module docstring."""

    # ---- vqfast.accelerate hooks ------------------------------------------------------------------
    @classmethod
    def unsupported_reason(cls, module: nn.Module) -> Optional[str]:
        """Why ``module`` (an instance of VAR's class) cannot run on this class's code, or None."""
        for name in _VAR_ATTRIBUTES:
            if not hasattr(module, name):
                return f"it has no attribute {name!r} (a modified copy of the class?)"
        problem = patch_nums_problem(module.v_patch_nums)
        if problem is not None:
            return problem
        problem = embedding_problem(module, "vocab_size", "Cvae")
        if problem is not None:
            return problem
        if not callable(getattr(module.quant_resi, "__getitem__", None)):
            return f"its quant_resi ({type(module.quant_resi).__name__}) cannot be indexed by scale position"
        ema = module.ema_vocab_hit_SV
        if not isinstance(ema, torch.Tensor) or ema.dim() != 2 or ema.shape[1] != module.vocab_size:
            return "its ema_vocab_hit_SV is not a [scales, vocab_size] tensor"
        if not _is_int(module.record_hit) or not _is_int(module.prog_si):
            return "its record_hit / prog_si are not ints"
        return None

    def _vqfast_adopt(self, backend: str = "auto", precision: str = "exact") -> None:
        self.set_search_options(backend, precision)

    def updates_vocab_hits(self) -> bool:
        """VAR updates ema_vocab_hit_SV in training only when its own dist module (the ``dist`` that
        VAR's models/quant.py imports) says it is initialised; a converted instance asks it."""
        original = getattr(type(self), "_vqfast_original", None)
        var_dist = getattr(sys.modules.get(original.__module__), "dist", None) if original is not None else None
        initialized = getattr(var_dist, "initialized", None)
        return bool(initialized()) if callable(initialized) else True
