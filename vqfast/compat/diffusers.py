"""diffusers' VectorQuantizer (diffusers/models/autoencoders/vae.py) with the fused search.

    VectorQuantizer(n_e, vq_embed_dim, beta, remap=None, unknown_index="random", sane_index_shape=False, legacy=True)
        forward(z [B, C, H, W]) -> (z_q [B, C, H, W], loss, (None, None, indices))
        get_codebook_entry(indices, shape), remap_to_used, unmap_to_all

It is taming-transformers' VectorQuantizer2 with the dimension named ``vq_embed_dim`` and the search
``argmin(torch.cdist(z, embedding.weight))``, so it is ``vqfast.compat.taming.VectorQuantizer2``'s
implementation under diffusers' names (see that module for the outputs, losses and remapping).
``VQModel`` (vq_model.py) holds one as ``quantize``: after ``vqfast.accelerate(vq_model)`` its
``forward``, ``encode`` / ``decode`` and ``decode(..., force_not_quantize=True)`` with
``lookup_from_codebook`` run on this code.

One difference in dtypes: on the CPU torch.cdist has no float16 / bfloat16 kernel, so the original
raises on a half-precision model there; this class searches half-precision inputs in float32 and
returns what the original returns on a GPU (codewords, loss and z_q in the model's dtype).
"""
from __future__ import annotations

import torch

from vqfast.compat.taming import VectorQuantizer2 as _TamingVectorQuantizer2


class VectorQuantizer(_TamingVectorQuantizer2):
    """diffusers' VectorQuantizer: codebook ``embedding`` [n_e, vq_embed_dim]; forward takes z only."""

    _dim_name = "vq_embed_dim"

    def __init__(
        self,
        n_e: int,
        vq_embed_dim: int,
        beta: float,
        remap=None,
        unknown_index: str = "random",
        sane_index_shape: bool = False,
        legacy: bool = True,
        *,
        backend: str = "auto",
        precision: str = "exact",
    ):
        super().__init__(
            n_e, vq_embed_dim, beta, remap, unknown_index, sane_index_shape, legacy,
            backend=backend, precision=precision,
        )

    def forward(self, z: torch.Tensor):
        """z [B, C, H, W] -> (z_q [B, C, H, W], loss [], (None, None, indices))."""
        return self._quantize(z)
