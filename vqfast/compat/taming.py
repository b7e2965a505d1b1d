"""taming-transformers' quantizers (taming/modules/vqvae/quantize.py) with the fused search.

    VectorQuantizer2(n_e, e_dim, beta, remap=None, unknown_index="random", sane_index_shape=False, legacy=True)
        The quantizer of taming's VQGAN and of latent-diffusion / stable-diffusion's VQ models.
        forward(z [B, C, H, W], temp=None, rescale_logits=False, return_logits=False)
            -> (z_q [B, C, H, W], loss, (None, None, indices))
        indices: [B*H*W]; [B*H*W, 1] with remap; [B, H, W] with sane_index_shape (either way).
    VectorQuantizer(n_e, e_dim, beta)   (v1)
        forward(z [B, C, H, W]) -> (z_q, loss, (perplexity [], min_encodings [B*H*W, n_e] one-hot, indices [B*H*W, 1]))

Both keep the originals' constructors, attribute names (n_e, e_dim, beta, legacy, embedding, remap,
used, re_embed, unknown_index, sane_index_shape), state_dict keys (``embedding.weight``, plus the
buffer ``used`` with remap), the uniform [-1/n_e, 1/n_e] initialisation, outputs and gradients:

    loss (legacy=True, and v1)  mean((z_q.detach() - z)^2) + beta * mean((z_q - z.detach())^2)
    loss (legacy=False)         beta * mean((z_q.detach() - z)^2) + mean((z_q - z.detach())^2)
                                (the same value; beta moves from the codebook term to the commitment term)
    z_q                         z + (embedding(indices) - z).detach()   (straight-through)

The originals rank codewords by ||z||^2 + ||e||^2 - 2 z.e in the input's precision, a formula that loses
digits to cancellation; here ``vqfast.nearest_codeword`` picks the truly nearest codeword (the one
allowed difference: rows where the original's argmin picks another) without the N x K distance
matrix. Codewords are then gathered from ``embedding`` exactly as the originals do, so outputs and
gradients are the originals' bit for bit wherever the indices agree. v1's one-hot ``min_encodings`` is
part of its output and is still built (after the search); its perplexity comes from per-code counts.

Remapping (``remap`` = path of a .npy file holding the used codes, loaded with allow_pickle=False):
indices map to their position in ``used`` (the first one on duplicates) by a sorted search, not by an
N x len(used) match matrix; unknown codes go to ``unknown_index`` ("extra": len(used), which widens
``re_embed`` by one) or, with "random", to ``torch.randint(0, re_embed, (count,))`` drawn from the
default CPU generator, exactly the draw of the original, so seeded runs match.

Extra keyword-only constructor options ``backend`` and ``precision`` choose the search (see
``vqfast.nearest_codeword``); ``vqfast.accelerate`` sets them on a converted instance.
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn as nn

from vqfast.backends import check_search_options
from vqfast.compat._checks import embedding_problem
from vqfast.ops import nearest_codeword


def _like_matmul_output(t: torch.Tensor) -> torch.Tensor:
    """v1 gathers codewords by a one-hot matmul, which autocast runs in its lower precision: match its dtype."""
    if torch.is_autocast_enabled(t.device.type):
        return t.to(torch.get_autocast_dtype(t.device.type))
    return t


def load_used_codes(path: object) -> torch.Tensor:
    """The codes a remapped quantizer keeps: a 1-D numeric array in a .npy file -> tensor (the file's dtype)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"remap must be the path of a .npy file (str or os.PathLike), got {type(path).__name__}")
    used = np.load(path, allow_pickle=False)  # a file a user hands in: never unpickle it
    if not isinstance(used, np.ndarray):
        raise ValueError(f"remap={str(path)!r} must hold one array (a .npy file), got {type(used).__name__}")
    if used.ndim != 1 or not (np.issubdtype(used.dtype, np.integer) or np.issubdtype(used.dtype, np.floating)):
        raise ValueError(f"remap={str(path)!r} must hold a 1-D array of code indices, got shape {used.shape}, "
                         f"dtype {used.dtype}")
    if used.shape[0] == 0:
        raise ValueError(f"remap={str(path)!r} holds no codes: list at least one used code index")
    return torch.tensor(used)


class _FusedSearchQuantizer(nn.Module):
    """What every taming-style quantizer shares: the accelerate hooks, input checks, the fused search
    and the loss. Subclasses name their dimension attribute in ``_dim_name`` ("e_dim" in taming,
    "vq_embed_dim" in diffusers) and list the attributes their methods read in ``_needs``."""

    _dim_name = "e_dim"
    _needs: tuple[str, ...] = ("n_e", "beta", "embedding")

    @classmethod
    def unsupported_reason(cls, module: nn.Module) -> str | None:
        """Why ``module`` (an instance of the original class) cannot run on this class's code, or None."""
        for name in cls._needs + (cls._dim_name,):
            if not hasattr(module, name):
                return f"it has no attribute {name!r} (a modified copy of the class?)"
        return embedding_problem(module, "n_e", cls._dim_name)

    def _init_codebook(self, n_e: int, dim: int, beta: float, backend: str, precision: str) -> None:
        """The originals' first steps: n_e, the dimension, beta and ``embedding`` uniform in [-1/n_e, 1/n_e]."""
        for name, value in (("n_e", n_e), (self._dim_name, dim)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self._vqfast_adopt(backend, precision)
        self.n_e = n_e
        setattr(self, self._dim_name, dim)
        self.beta = beta
        self.embedding = nn.Embedding(n_e, dim)
        self.embedding.weight.data.uniform_(-1.0 / n_e, 1.0 / n_e)

    def _vqfast_adopt(self, backend: str = "auto", precision: str = "exact") -> None:
        check_search_options(backend, precision)
        self.vqfast_backend = backend
        self.vqfast_precision = precision

    def extra_repr(self) -> str:
        dim = getattr(self, self._dim_name)
        return (f"n_e={self.n_e}, {self._dim_name}={dim}, beta={self.beta}, "
                f"backend={self.vqfast_backend!r}, precision={self.vqfast_precision!r}")

    def _channels_last(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, C, H, W] -> [B, H, W, C] contiguous, C = the codebook dimension."""
        dim = getattr(self, self._dim_name)
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"z must be a torch.Tensor, got {type(z).__name__}")
        if z.dim() != 4 or z.shape[1] != dim:
            raise ValueError(f"z must be [B, C, H, W] with C = {self._dim_name} = {dim}, got shape {tuple(z.shape)}")
        return z.permute(0, 2, 3, 1).contiguous()

    def _nearest(self, z_flat: torch.Tensor) -> torch.Tensor:
        """[N, D] -> [N] int64: the index of each row's nearest codeword (lowest index on ties)."""
        with torch.no_grad():  # the codewords are gathered (and differentiated) through self.embedding
            indices, _, _ = nearest_codeword(
                z_flat, self.embedding.weight, precision=self.vqfast_precision, backend=self.vqfast_backend
            )
        return indices

    def _loss(self, z_q: torch.Tensor, z: torch.Tensor, legacy: bool) -> torch.Tensor:
        to_encoder = torch.mean((z_q.detach() - z) ** 2)
        to_codebook = torch.mean((z_q - z.detach()) ** 2)
        if legacy:
            return to_encoder + self.beta * to_codebook
        return self.beta * to_encoder + to_codebook


class VectorQuantizer2(_FusedSearchQuantizer):
    """taming's VectorQuantizer2: codebook ``embedding`` [n_e, e_dim]; see the module docstring."""

    _needs = ("n_e", "beta", "embedding", "legacy", "remap", "re_embed", "sane_index_shape")

    def __init__(
        self,
        n_e: int,
        e_dim: int,
        beta: float,
        remap=None,
        unknown_index="random",
        sane_index_shape: bool = False,
        legacy: bool = True,
        *,
        backend: str = "auto",
        precision: str = "exact",
    ):
        super().__init__()
        self._init_codebook(n_e, e_dim, beta, backend, precision)
        self.legacy = legacy
        self.remap = remap
        if remap is None:
            self.re_embed = n_e
        else:
            self.register_buffer("used", load_used_codes(remap))
            self.re_embed = self.used.shape[0]
            if unknown_index == "extra":  # one more index, past the used codes, for every unknown one
                unknown_index = self.re_embed
                self.re_embed += 1
            elif unknown_index != "random" and (not isinstance(unknown_index, int) or isinstance(unknown_index, bool)):
                raise ValueError(f"unknown_index must be 'random', 'extra' or an int, got {unknown_index!r}")
            self.unknown_index = unknown_index
        self.sane_index_shape = sane_index_shape

    @classmethod
    def unsupported_reason(cls, module: nn.Module) -> str | None:
        reason = super().unsupported_reason(module)
        if reason is None and module.remap is not None:
            if not isinstance(getattr(module, "used", None), torch.Tensor) or not hasattr(module, "unknown_index"):
                return "remap is set but the buffer 'used' or the attribute 'unknown_index' is missing"
        return reason

    # ---- remapping ---------------------------------------------------------------------------
    def remap_to_used(self, inds: torch.Tensor) -> torch.Tensor:
        """Codebook indices [B, ...] -> their positions in ``used`` (unknown ones per ``unknown_index``), same shape."""
        shape = inds.shape
        if len(shape) < 2:
            raise ValueError(f"inds must have a batch axis ([B, ...]), got shape {tuple(shape)}")
        flat = inds.reshape(shape[0], -1)
        used = self.used.to(flat)
        # A stable sort keeps duplicates of a code in their original order, so the leftmost match of
        # the sorted search is the code's first position in `used`: O(N log U), no [N, U] match tensor.
        sorted_used, order = torch.sort(used, stable=True)
        pos = torch.searchsorted(sorted_used, flat).clamp_max(used.shape[0] - 1)
        known = sorted_used[pos] == flat
        new = torch.where(known, order[pos], 0)
        if self.unknown_index == "random":
            unknown = ~known
            # The original's draw: one randint of the unknowns' count from the default CPU generator.
            new[unknown] = torch.randint(0, self.re_embed, size=(int(unknown.sum()),)).to(device=new.device)
        else:
            new = torch.where(known, new, self.unknown_index)
        return new.reshape(shape)

    def unmap_to_all(self, inds: torch.Tensor) -> torch.Tensor:
        """Positions in ``used`` [B, ...] -> codebook indices, same shape (the "extra" index maps to used[0]).

        Unlike the original, the tensor passed in is not modified.
        """
        shape = inds.shape
        if len(shape) < 2:
            raise ValueError(f"inds must have a batch axis ([B, ...]), got shape {tuple(shape)}")
        flat = inds.reshape(shape[0], -1)
        used = self.used.to(flat)
        if self.re_embed > used.shape[0]:  # the "extra" index has no code of its own
            flat = flat.masked_fill(flat >= used.shape[0], 0)
        return torch.gather(used.expand(flat.shape[0], -1), 1, flat).reshape(shape)

    # ---- forward and lookup ------------------------------------------------------------------------
    def forward(self, z: torch.Tensor, temp=None, rescale_logits: bool = False, return_logits: bool = False):
        """z [B, C, H, W] -> (z_q [B, C, H, W], loss [], (None, None, indices)); temp, rescale_logits and
        return_logits exist for GumbelQuantize's interface only (temp None or 1.0, the others False)."""
        if not (temp is None or temp == 1.0):
            raise ValueError(f"temp must be None or 1.0 (it exists for GumbelQuantize's interface), got {temp!r}")
        if rescale_logits is not False or return_logits is not False:
            raise ValueError(
                "rescale_logits and return_logits must be False (they exist for GumbelQuantize's interface)"
            )
        return self._quantize(z)

    def _quantize(self, z: torch.Tensor):
        z = self._channels_last(z)
        b, h, w, _ = z.shape
        indices = self._nearest(z.view(-1, z.shape[-1]))
        z_q = self.embedding(indices).view(z.shape)
        loss = self._loss(z_q, z, self.legacy)
        z_q = (z + (z_q - z).detach()).permute(0, 3, 1, 2).contiguous()
        if self.remap is not None:
            indices = self.remap_to_used(indices.reshape(b, -1)).reshape(-1, 1)
        if self.sane_index_shape:
            indices = indices.reshape(b, h, w)
        return z_q, loss, (None, None, indices)

    def get_codebook_entry(self, indices: torch.Tensor, shape) -> torch.Tensor:
        """indices (remapped ones with remap) -> codewords: [N, C], or [B, C, H, W] for shape = (B, H, W, C).

        With remap, shape is required (its batch size splits the indices for unmap_to_all).
        """
        if self.remap is not None:
            if shape is None:
                raise ValueError("shape (B, H, W, C) is required with remap: unmap_to_all needs the batch size")
            indices = self.unmap_to_all(indices.reshape(shape[0], -1)).reshape(-1)
        z_q = self.embedding(indices)
        if shape is not None:
            z_q = z_q.view(shape).permute(0, 3, 1, 2).contiguous()
        return z_q


class VectorQuantizer(_FusedSearchQuantizer):
    """taming's VectorQuantizer (v1): loss with beta on the codebook term, one-hot ``min_encodings`` and
    perplexity in the output; see the module docstring."""

    def __init__(self, n_e: int, e_dim: int, beta: float, *, backend: str = "auto", precision: str = "exact"):
        super().__init__()
        self._init_codebook(n_e, e_dim, beta, backend, precision)

    def forward(self, z: torch.Tensor):
        """z [B, C, H, W] -> (z_q [B, C, H, W], loss [], (perplexity [], min_encodings [N, n_e], indices [N, 1]))."""
        z = self._channels_last(z)
        n = z.shape[0] * z.shape[1] * z.shape[2]
        indices = self._nearest(z.view(n, self.e_dim))
        # The one-hot is part of v1's output (N x n_e in z's dtype, as the original returns it).
        min_encodings = torch.zeros(n, self.n_e, dtype=z.dtype, device=z.device)
        min_encodings.scatter_(1, indices[:, None], 1)
        z_q = _like_matmul_output(self.embedding(indices)).view(z.shape)
        loss = self._loss(z_q, z, legacy=True)
        z_q = (z + (z_q - z).detach()).permute(0, 3, 1, 2).contiguous()
        # The mean of the one-hot's columns, from counts: a [n_e] sum instead of an [N, n_e] one.
        counts = torch.zeros(self.n_e, dtype=torch.float64, device=z.device)
        counts.index_add_(0, indices, torch.ones(n, dtype=torch.float64, device=z.device))
        e_mean = (counts / n).to(z.dtype)  # N = 0: NaN, as the original's mean over no rows
        perplexity = torch.exp(-torch.sum(e_mean * torch.log(e_mean + 1e-10)))
        return z_q, loss, (perplexity, min_encodings, indices[:, None])

    def get_codebook_entry(self, indices: torch.Tensor, shape) -> torch.Tensor:
        """indices [N] (or [N, 1], as forward returns them) -> codewords [N, e_dim], or [B, C, H, W] for
        shape = (B, H, W, C)."""
        if indices.dim() == 2 and indices.shape[1] == 1:
            indices = indices[:, 0]
        if indices.dim() != 1:
            raise ValueError(f"indices must be [N] or [N, 1], got shape {tuple(indices.shape)}")
        z_q = _like_matmul_output(self.embedding(indices))
        if shape is not None:
            z_q = z_q.view(shape).permute(0, 3, 1, 2).contiguous()
        return z_q
