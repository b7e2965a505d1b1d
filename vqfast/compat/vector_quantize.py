"""vector-quantize-pytorch's ``VectorQuantize`` and ``ResidualVQ`` (1.x), searched with vqfast's fused op.

An accelerated ``VectorQuantize`` keeps its original ``forward`` (projections, heads, rotation trick or
straight-through, commitment and orthogonal losses, masks, image / 3-D feature maps, loss breakdown)
and its codebook's original methods for everything that touches no N x K tensor (``update_ema``,
``expire_codes_`` and its dead-code sampling, ``update_affine``). What it replaces lives in its
``_codebook``, whose class is swapped too (one deriving from (``Codebook`` below, the original
``Codebook``)):

    the search      the original ranks an fp32 [h, N, K] distance matrix (Euclidean:
                    -sqrt(clamp(|x|^2 + |e|^2 - 2 x.e, 1e-8)); cosine: the dot product of the
                    l2-normalised rows) and takes its argmax; here one ``nearest_codeword`` per codebook.
    the lookup      the original multiplies an N x K one-hot by the codebook in training; here a gather
                    (``index_select``), whose backward, for a learnable codebook, is a segment sum.
    EMA statistics  cluster sizes and per-code sums are segment sums (``index_add``) instead of one-hot
                    reductions; then the same all-reduces, lerps, Laplace smoothing and dead-code expiry.
    k-means init    the same sampling (the codebook's own ``sample_fn``, so the same random numbers and,
                    under DDP, the same collectives), Lloyd assignments by the fused search, counts and
                    means by segment sums, the same two all-reduces per iteration.

Exact mode returns the codeword whose distance is truly the minimum; the original's fp32 expansion
(and its clamp at 1e-8, inside which every code ties) can pick another on near-ties: the one
difference. The random numbers drawn, the collectives run (count, order, shapes, dtypes), the
buffers and the state_dict are the original's, so a seeded run matches and accelerated and original
ranks can train together.

Calls and options that need every distance stay on the original code: per call, ``topk`` (and so
ResidualVQ's beam search), ``codebook_transform_fn`` (QINCo's implicit codebooks) and
``indices=`` (the cross-entropy loss against given codes); per module (``unsupported_reason``), the
cross-entropy commitment, the codebook diversity loss, stochastic code sampling and Gumbel
straight-through. ``Codebook.forward`` returns ``None`` in place of the distance matrix.
"""
from __future__ import annotations

import functools
import inspect
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from vqfast.compat import accelerated_class
from vqfast.ops import nearest_codeword

_LIBRARY_MODULE = "vector_quantize_pytorch.vector_quantize_pytorch"

# The parameters of the original methods as of 1.32. A release that adds one may have added maths
# that needs the distances: such a module stays on its original code rather than guess.
_CODEBOOK_FORWARD_PARAMS = (
    "self", "x", "sample_codebook_temp", "mask", "freeze_codebook", "codebook_transform_fn",
    "ema_update_weight", "accum_ema_update", "ema_update", "topk", "update_usage",
)
_CODEBOOK_UPDATE_INDICES_PARAMS = (
    "self", "x", "embed_ind", "mask", "ema_update_weight", "accum_ema_update", "ema_update",
)
_VQ_FORWARD_PARAMS = (
    "self", "x", "indices", "mask", "lens", "topk", "sample_codebook_temp", "freeze_codebook",
    "return_loss_breakdown", "codebook_transform_fn", "ema_update_weight", "accum_ema_update", "ema_update",
)
_CODEBOOK_ATTRIBUTES = (
    "embed", "embed_avg", "cluster_size", "initted", "codebook_size", "num_codebooks", "kmeans_iters",
    "use_cosine_sim", "ema_update", "manual_ema_update", "learnable_codebook", "affine_param", "vq_bridge",
    "has_dead_code_replacement", "sample_fn", "kmeans_all_reduce_fn", "all_reduce_fn", "gumbel_sample", "decay",
    "update_ema", "expire_codes_", "update_affine",
)
_VQ_ATTRIBUTES = (
    "_codebook", "heads", "separate_codebook_per_head", "channel_last", "accept_image_fmap", "accept_3d_fmap",
    "has_commitment_loss", "commitment_use_cross_entropy_loss", "has_codebook_diversity_loss", "codebook",
)
# Helpers of the original module that the EMA update calls, so that it weighs and accumulates as it does.
_LIBRARY_HELPERS = ("ema_inplace", "accum_grad_", "gumbel_sample", "logger")


def _library(module: nn.Module):
    """The module vector-quantize-pytorch defines its Codebook in (imported already: ``module`` is one)."""
    return sys.modules[getattr(type(module), "_vqfast_original", type(module)).__module__]


def _original_class(module: nn.Module) -> type:
    return getattr(type(module), "_vqfast_original", type(module))


def _params(fn) -> tuple[str, ...]:
    return tuple(inspect.signature(fn).parameters)


def _l2norm(t: torch.Tensor) -> torch.Tensor:
    # The original's normalisation for cosine codebooks (its eps is 1e-6, not F.normalize's 1e-12).
    return F.normalize(t, p=2, dim=-1, eps=1e-6)


# ---- searches and segment sums: no N x K tensor ------------------------------------------------------


def _argmin_l2(z: torch.Tensor, codes: torch.Tensor, backend: str, precision: str) -> torch.Tensor:
    """Nearest code by squared Euclidean distance: z [N, d], codes [K, d] -> [N] int64."""
    return nearest_codeword(z, codes, metric="l2", precision=precision, backend=backend)[0]


def _argmax_dot(z: torch.Tensor, codes: torch.Tensor, backend: str, precision: str) -> torch.Tensor:
    """argmax_k z . codes_k as an L2 search: z [N, d], codes [K, d] -> [N] int64.

    The original ranks cosine codebooks by the raw dot product of the stored vectors. Appending
    e_k = sqrt(M - |c_k|^2) to every code (M = max_k |c_k|^2) and 0 to every row makes every code's
    norm M, so |z' - c'_k|^2 = |z|^2 + M - 2 z.c_k: the nearest augmented code is the largest dot
    product, for unit codes as for any others (a user may set ``vq.codebook`` to anything). For the
    unit codes of a cosine codebook M - |c_k|^2 is ~1e-7, so rounding e_k to fp32 moves |c'_k|^2 by
    ~1e-14, far below what fp32 dot products resolve (~1e-7), while normalising the codes again for
    metric="cosine" would move them by ~1e-7. A zero row has every dot product 0: the first code
    wins, as torch.argmax picks it.
    """
    sq = codes.double().square().sum(1)
    extra = (sq.max() - sq).clamp_min(0.0).sqrt().to(codes.dtype)
    augmented_codes = torch.cat([codes, extra[:, None]], dim=1)
    augmented_z = F.pad(z, (0, 1))
    indices = nearest_codeword(augmented_z, augmented_codes, metric="l2", precision=precision, backend=backend)[0]
    return indices.masked_fill((z == 0).all(1), 0)


def _flat_codes(indices: torch.Tensor, num_codes: int) -> torch.Tensor:
    """Codebook c's code k becomes row c * K + k of the [h * K] flattened codebooks: [h, N] -> [h * N]."""
    offsets = torch.arange(indices.shape[0], device=indices.device)[:, None] * num_codes
    return (indices + offsets).reshape(-1)


def _segment_count(indices: torch.Tensor, num_codes: int, weights: torch.Tensor) -> torch.Tensor:
    """Sum of ``weights`` [h, N] per code: [h, N] indices -> [h, K] in weights' dtype."""
    out = weights.new_zeros(indices.shape[0] * num_codes)
    return out.index_add_(0, _flat_codes(indices, num_codes), weights.reshape(-1)).view(indices.shape[0], num_codes)


def _segment_sum(rows: torch.Tensor, indices: torch.Tensor, num_codes: int) -> torch.Tensor:
    """Sum of the rows assigned to each code: rows [h, N, d], indices [h, N] -> [h, K, d]."""
    h, d = rows.shape[0], rows.shape[-1]
    out = rows.new_zeros(h * num_codes, d)
    return out.index_add_(0, _flat_codes(indices, num_codes), rows.reshape(-1, d)).view(h, num_codes, d)


def _lookup(codes: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """codes [h, K, d], indices [h, N] -> [h, N, d]; the backward (learnable codes) is a segment sum."""
    h, k, d = codes.shape
    return codes.reshape(h * k, d).index_select(0, _flat_codes(indices, k)).view(h, -1, d)


def _repeat_mask(mask: torch.Tensor, flatten: torch.Tensor) -> torch.Tensor:
    """mask [b, n] -> [c, b * heads * n], the row order of ``flatten`` [c, N, d] (heads sharing a codebook
    are folded between b and n)."""
    b, n = mask.shape
    heads = flatten.shape[-2] // (b * n)
    return mask[:, None, :].expand(b, heads, n).reshape(1, -1).expand(flatten.shape[0], -1)


# ---- the codebook ---------------------------------------------------------------------------------------


class Codebook(nn.Module):
    """Takes over an accelerated VectorQuantize's ``_codebook``: search, lookup, EMA sums, k-means init.

    ``forward`` returns (quantize [like x], indices [x.shape[:-1]], None); the original's third output is
    the [h, *, K] distance matrix, which nothing on the accelerated paths reads.
    """

    _vqfast_backend = "auto"
    _vqfast_precision = "exact"
    # Set by VectorQuantize.forward for a call that needs the distance matrix (indices=...).
    _vqfast_use_original = False

    @torch.amp.autocast("cuda", enabled=False)
    def forward(
        self,
        x,
        sample_codebook_temp=None,
        mask=None,
        freeze_codebook=False,
        codebook_transform_fn=None,
        ema_update_weight=None,
        accum_ema_update=False,
        ema_update=None,
        topk=None,
        update_usage=True,
    ):
        if self._vqfast_use_original or topk is not None or codebook_transform_fn is not None:
            return super().forward(
                x, sample_codebook_temp=sample_codebook_temp, mask=mask, freeze_codebook=freeze_codebook,
                codebook_transform_fn=codebook_transform_fn, ema_update_weight=ema_update_weight,
                accum_ema_update=accum_ema_update, ema_update=ema_update, topk=topk, update_usage=update_usage,
            )
        ema_update = self.ema_update if ema_update is None else ema_update
        needs_codebook_dim = x.ndim < 4  # [b, n, d] -> one codebook; [c, b, n, d] -> c of them
        x = x.float()
        if needs_codebook_dim:
            x = x.unsqueeze(0)
        flatten = x.reshape(x.shape[0], -1, x.shape[-1])  # [c, N, d]
        if mask is not None:
            mask = _repeat_mask(mask, flatten)
        self.init_embed_(flatten, mask=mask)
        if self.affine_param:
            self.update_affine(flatten, self.embed, mask=mask)
        embed = self.embed if self.learnable_codebook else self.embed.detach()
        embed = embed.to(flatten.dtype)
        if self.vq_bridge is not None:
            embed = self.vq_bridge(embed)
        if self.affine_param:
            # The codes move to the batch's statistics (the EMA update moves the batch the other way).
            embed = (embed - self.codebook_mean) * (self._batch_std() / self._codebook_std()) + self.batch_mean
        embed_ind = self._nearest(flatten, embed)
        # Gathered before the EMA update below rewrites self.embed: the codes returned are the ones searched.
        quantize = _lookup(embed, embed_ind)
        if self.training and update_usage and not freeze_codebook:
            self._update_from_indices(flatten, embed_ind, mask, ema_update_weight, accum_ema_update, ema_update)
        quantize = quantize.view(x.shape)
        embed_ind = embed_ind.view(x.shape[:-1])
        if needs_codebook_dim:
            quantize, embed_ind = quantize.squeeze(0), embed_ind.squeeze(0)
        return quantize, embed_ind, None

    def _codebook_std(self) -> torch.Tensor:
        return self.codebook_variance.clamp(min=1e-5).sqrt()

    def _batch_std(self) -> torch.Tensor:
        return self.batch_variance.clamp(min=1e-5).sqrt()

    @torch.no_grad()
    def _nearest(self, flatten: torch.Tensor, embed: torch.Tensor) -> torch.Tensor:
        """The original's argmax code per row, one fused search per codebook: [c, N, d], [c, K, d] -> [c, N]."""
        search = _argmax_dot if self.use_cosine_sim else _argmin_l2
        return torch.stack([
            search(flatten[c], embed[c].detach(), self._vqfast_backend, self._vqfast_precision)
            for c in range(flatten.shape[0])
        ])

    def update_indices(self, x, embed_ind, mask=None, ema_update_weight=None, accum_ema_update=False, ema_update=None):
        """The original's EMA update from given indices (ResidualVQ's beam search), without its one-hot."""
        needs_codebook_dim = x.ndim < 4
        x = x.float()
        if needs_codebook_dim:
            x, embed_ind = x.unsqueeze(0), embed_ind.unsqueeze(0)
        flatten = x.reshape(x.shape[0], -1, x.shape[-1])
        if mask is not None:
            mask = _repeat_mask(mask, flatten)
        embed_ind = embed_ind.reshape(embed_ind.shape[0], -1)
        embed_ind = embed_ind.masked_fill(embed_ind == -1, 0)
        self._update_from_indices(flatten, embed_ind, mask, ema_update_weight, accum_ema_update, ema_update)

    update_ema_indices = update_indices

    @torch.no_grad()
    def _update_from_indices(self, flatten, embed_ind, mask, ema_update_weight, accum_ema_update, ema_update):
        """The original's update_codebook with its one-hot reductions as segment sums.

        flatten [c, N, d] fp32, embed_ind [c, N], mask [c, N] or None. The same all-reduces (cluster sizes
        [c, K], then sums [c, K, d], both fp32), the same lerps by 1 - decay, then the original's
        update_ema and expire_codes_.
        """
        ema_update = self.ema_update if ema_update is None else ema_update
        if not ema_update and not self.has_dead_code_replacement:
            return
        rows = flatten
        if self.affine_param:
            rows = (rows - self.batch_mean) * (self._codebook_std() / self._batch_std()) + self.codebook_mean
        weights = torch.ones_like(rows[..., 0])
        if mask is not None:
            weights = mask.to(rows.dtype)
            rows = torch.where(mask[..., None], rows, 0.0)
        cluster_size = _segment_count(embed_ind, self.codebook_size, weights)
        self.all_reduce_fn(cluster_size)
        embed_sum = _segment_sum(rows, embed_ind, self.codebook_size)
        self.all_reduce_fn(embed_sum)
        if callable(ema_update_weight):
            ema_update_weight = ema_update_weight(embed_sum, cluster_size)
        lib = _library(self)
        if accum_ema_update:
            lib.accum_grad_(self.cluster_size, cluster_size)
            lib.accum_grad_(self.embed_avg, embed_sum)
            return
        lib.ema_inplace(self.cluster_size, cluster_size, self.decay, ema_update_weight)
        lib.ema_inplace(self.embed_avg, embed_sum, self.decay, ema_update_weight)
        if ema_update and not self.manual_ema_update:
            self.update_ema()
        self.expire_codes_(flatten, seq_mask=mask)

    @torch.jit.ignore
    @torch.no_grad()
    def init_embed_(self, data, mask=None):
        """k-means on the first batch, as the original, with the fused search for Lloyd's assignments."""
        if self.initted:
            return
        if mask is not None:
            data = data[mask].reshape(data.shape[0], -1, data.shape[-1])
        if data.shape[-2] < self.codebook_size:
            _library(self).logger.warning(
                f"k-means init has {data.shape[-2]} vectors for {self.codebook_size} codes: some codes start as duplicates"
            )
        embed, cluster_size = self._kmeans(data)
        self.embed_avg.data.copy_(embed * cluster_size[..., None])
        self.cluster_size.data.copy_(cluster_size)
        self.update_ema()
        self.initted.data.copy_(torch.tensor(True))

    def _kmeans(self, samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """samples [c, n, d] -> (means [c, K, d] fp32, counts [c, K] int64), as the original's kmeans.

        An empty cluster keeps its previous mean. Under DDP with sync_kmeans, ``kmeans_all_reduce_fn``
        sums the counts and the (already divided) means over ranks, as the original does.
        """
        k = self.codebook_size
        means = self.sample_fn(samples, k)
        counts = None
        for _ in range(self.kmeans_iters):
            buckets = self._nearest(samples, means)
            counts = _segment_count(buckets, k, torch.ones_like(buckets))
            self.kmeans_all_reduce_fn(counts)
            empty = counts == 0
            new_means = _segment_sum(samples, buckets, k) / counts.masked_fill(empty, 1)[..., None]
            self.kmeans_all_reduce_fn(new_means)
            if self.use_cosine_sim:
                new_means = _l2norm(new_means)
            means = torch.where(empty[..., None], means, new_means)
        return means, counts


# ---- the modules accelerate() converts ---------------------------------------------------------------


class VectorQuantize(nn.Module):
    """vector-quantize-pytorch's VectorQuantize with its codebook on vqfast (see the module docstring).

    forward(x, indices=None, mask=None, lens=None, ...) -> (quantize [like x], indices, loss
    [, LossBreakdown]), exactly the original's: x is [b, n, dim] (channel_last), [b, dim, n], [b, dim],
    [b, dim, h, w] (accept_image_fmap) or [b, dim, t, h, w] (accept_3d_fmap); indices are [b, n],
    [b, n, heads], [b, h, w] ... as the original returns them.
    """

    @classmethod
    def unsupported_reason(cls, module: nn.Module) -> str | None:
        missing = [a for a in _VQ_ATTRIBUTES if not hasattr(module, a)]
        if missing:
            return f"this vector-quantize-pytorch release lacks attributes vqfast relies on ({', '.join(missing)})"
        codebook = module._codebook
        codebook_class = _original_class(codebook)
        if codebook_class.__name__ != "Codebook" or codebook_class.__module__ != _LIBRARY_MODULE:
            return f"its codebook is a {codebook_class.__module__}.{codebook_class.__qualname__}, not the library's Codebook"
        missing = [a for a in _CODEBOOK_ATTRIBUTES if not hasattr(codebook, a)]
        missing += [f"{_LIBRARY_MODULE}.{h}" for h in _LIBRARY_HELPERS if not hasattr(_library(codebook), h)]
        if missing:
            return f"this vector-quantize-pytorch release lacks attributes vqfast relies on ({', '.join(missing)})"
        for fn, known in (
            (codebook_class.forward, _CODEBOOK_FORWARD_PARAMS),
            (codebook_class.update_indices, _CODEBOOK_UPDATE_INDICES_PARAMS),
            (_original_class(module).forward, _VQ_FORWARD_PARAMS),
        ):
            new = [p for p in _params(fn) if p not in known]
            if new:
                return f"{fn.__qualname__} takes parameters vqfast does not know ({', '.join(new)})"
        if module.has_commitment_loss and module.commitment_use_cross_entropy_loss:
            return (
                "commitment_use_cross_entropy_loss=True: the cross-entropy commitment is a softmax over every "
                "code's distance (N x K)"
            )
        if module.has_codebook_diversity_loss:
            return "codebook_diversity_loss_weight > 0: the diversity loss is a softmax over every code's distance (N x K)"
        sampler = codebook.gumbel_sample
        if not (
            isinstance(sampler, functools.partial)
            and sampler.func is _library(codebook).gumbel_sample
            and set(sampler.keywords) <= {"stochastic", "straight_through"}
        ):
            return "its codebook samples codes with a custom gumbel_sample"
        if sampler.keywords.get("stochastic"):
            return "stochastic_sample_codes=True: Gumbel sampling draws from every code's distance (N x K)"
        if sampler.keywords.get("straight_through"):
            return "straight_through=True: the Gumbel-softmax gradient is a softmax over every code's distance (N x K)"
        if not bool(codebook.initted) and codebook.kmeans_iters < 1:
            return "kmeans_init=True with kmeans_iters=0, which the original cannot run either"
        return None

    def _vqfast_adopt(self, backend: str, precision: str) -> None:
        codebook = self._codebook
        if not isinstance(codebook, Codebook):
            codebook.__class__ = accelerated_class(Codebook, type(codebook))
        codebook._vqfast_backend = backend
        codebook._vqfast_precision = precision

    def forward(self, x, indices=None, *args, **kwargs):
        if indices is None:
            return super().forward(x, None, *args, **kwargs)
        # The cross-entropy loss against given codes is computed from every distance: the original's path.
        codebook = self._codebook
        codebook._vqfast_use_original = True
        try:
            return super().forward(x, indices, *args, **kwargs)
        finally:
            codebook._vqfast_use_original = False

    def get_codes_from_indices(self, indices):
        """indices as forward returns them -> codes: [b, ..., heads * codebook_dim] (channel-first where forward is).

        With one codebook per head the original gathers from the codebook repeated batch-fold
        ([b, h, K, d]); here one gather from the [h, K, d] codebook.
        """
        codebook = self.codebook
        if codebook.ndim == 2:
            return super().get_codes_from_indices(indices)
        heads, num_codes = codebook.shape[0], codebook.shape[1]
        if indices.ndim < 2 or indices.shape[-1] != heads:
            raise ValueError(f"indices must be [b, ..., {heads}] (one code per head), got shape {tuple(indices.shape)}")
        if bool(((indices < 0) | (indices >= num_codes)).any()):
            raise ValueError(f"indices must lie in [0, {num_codes}) (the codebook size)")
        codes = codebook[torch.arange(heads, device=indices.device), indices].flatten(-2)
        if not self.channel_last or self.accept_image_fmap or self.accept_3d_fmap:
            codes = codes.movedim(-1, 1)
        return codes


class ResidualVQ(nn.Module):
    """vector-quantize-pytorch's ResidualVQ: its own forward, ``get_codes_from_indices`` and
    ``get_output_from_indices`` are the original's (a gather and sums, no N x K tensor); its quantizers
    ``layers.{i}`` are VectorQuantize instances, which accelerate converts as it walks the tree.
    Here only the options whose search needs every distance are recognised and reported.
    """

    @classmethod
    def unsupported_reason(cls, module: nn.Module) -> str | None:
        if getattr(module, "implicit_neural_codebook", False):
            return "implicit_neural_codebook=True: every row has its own codebook (an MLP of the codes), N x K x d"
        if getattr(module, "beam_size", None) is not None or getattr(module, "eval_beam_size", None) is not None:
            return "beam search (beam_size): the top-k codes of every row need every distance (N x K)"
        layers = getattr(module, "layers", None)
        if layers is None:
            return "this vector-quantize-pytorch release has no ResidualVQ.layers"
        for i, layer in enumerate(layers):
            reason = VectorQuantize.unsupported_reason(layer)
            if reason is not None:
                return f"layers.{i}: {reason}"
        return None

    def _vqfast_adopt(self, backend: str, precision: str) -> None:
        # Nothing of its own to set: accelerate reaches layers.{i} next (named_modules lists them after it).
        return None
