"""Drop-in vector quantizers: the constructors, parameter names, initialisation, outputs and
gradients of the classic VectorQuantizer / VectorQuantizer2 / ResidualVectorQuantizer, with the
nearest-codeword search done by vqfast's fused op.

Inputs are channels-first: [B, C, T], [B, C, H, W] or [B, C, D, H, W] with C = embedding_dim.
forward returns (quantized [same shape as z], loss, indices [B * spatial]). quantized carries the
straight-through gradient (z + (q - z).detach()). The losses are computed in one consistent
channels-last layout from the chosen codewords: no one-hot and no N x K tensor, forward or backward.
The codebook gradient is the op's backward: a segment sum (index_add) of the rows assigned to each code.

Codebook learning options (keyword-only; the defaults are the drop-in behaviour, bit for bit):

    ema=True              the codebook follows an exponential moving average of the rows assigned to it
                          (VQ-VAE-2 / SoundStream): updated inside forward in training mode, with
                          Laplace-smoothed cluster sizes; ``embedding.weight`` gets no gradient and the
                          loss keeps only the commitment term, beta * mse(q.detach(), z).
    kmeans_init=True      the first training batch initialises the codebook: k-means++ seeds, then
                          ``kmeans_iters`` Lloyd steps with the fused search for assignments.
    dead_code_threshold   codes whose EMA usage (assignments per training step, decayed by ``decay``,
                          starting at 1) falls below it are re-seeded from rows of the current batch
                          before it is quantised, and their EMA state reset.
    metric                "l2" or "cosine" for the search (cosine: EMA codewords are kept L2-normalised).

Index maps and lookups: ``index_shape="spatial"`` (keyword-only) makes forward return indices shaped
[B, *S] (for [B, C, H, W]: [B, H, W]) instead of the flat [B * prod(S)]; ``indices_to_codes(indices)``
turns such a map back into codewords [B, C, *S], and ``get_codebook_entry(indices, shape)`` is the same
lookup with taming-transformers' signature (shape = (B, *S, C), channels-last, or None for [*indices.shape, C]).

An empty batch (zero vectors, e.g. [0, C, H, W] or [B, C, 0]) gives empty outputs and loss 0, not
the NaN of the classic mean over no elements: it carries no quantisation error, and a NaN loss would
poison every parameter's optimizer state (on every rank, under DDP, when one rank's shard is empty).
The zero stays attached to z and the codebook, so backward runs and gives zero gradients.

Usage statistics: ``code_counts`` (assignments per code since construction or ``reset_usage()``,
this process only), ``perplexity()`` and ``dead_code_fraction()``. They live in a non-persistent
buffer, and EMA / k-means state is registered only when its option is on, so a state_dict saved from
the classic classes loads with strict=True into a module built with the defaults. It also loads with
strict=True into a module built with ema / kmeans_init / dead_code_threshold: state that the classic
state_dict lacks starts from its codebook (EMA usage 1 per code and EMA sums equal to the codewords,
the state of a freshly built module; k-means marked done, so the loaded codebook is kept).

Under torch.distributed the EMA statistics are all-reduced as (counts, sums), k-means runs on rank 0
over every rank's rows and is broadcast, and dead-code seeds are drawn on rank 0 and broadcast: every
rank keeps the same codebook whatever its batch size, and every rank runs the same collectives.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from vqfast import distributed
from vqfast._validation import METRICS, check_choice
from vqfast.backends import check_search_options
from vqfast.kmeans import kmeans
from vqfast.ops import nearest_codeword
from vqfast.reference import normalize_for_metric


def _check_learning_options(ema, decay, eps, kmeans_init, kmeans_iters, dead_code_threshold) -> None:
    for name, value in (("ema", ema), ("kmeans_init", kmeans_init)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    if not isinstance(decay, (int, float)) or isinstance(decay, bool) or not 0.0 < decay < 1.0:
        raise ValueError(f"decay must be a float in (0, 1), got {decay!r}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0.0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    if not isinstance(kmeans_iters, int) or isinstance(kmeans_iters, bool) or kmeans_iters < 0:
        raise ValueError(f"kmeans_iters must be a non-negative int, got {kmeans_iters!r}")
    if (
        not isinstance(dead_code_threshold, (int, float))
        or isinstance(dead_code_threshold, bool)
        or not dead_code_threshold >= 0.0
    ):
        raise ValueError(f"dead_code_threshold must be a non-negative number, got {dead_code_threshold!r}")


def _sync_kmeans_flag(module: nn.Module, incompatible_keys) -> None:
    module._kmeans_pending = not bool(module.initted)


INDEX_SHAPES = ("flat", "spatial")


def _fill_learning_state(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    """Load-state pre-hook: a classic state_dict (embedding.weight, none of the learning buffers) gets the
    learning state of a module freshly built around its codebook, so that it loads with strict=True."""
    weight = state_dict.get(prefix + "embedding.weight")
    names = [n for n in ("cluster_size", "embed_avg", "initted") if n in module._buffers]
    if weight is None or any(prefix + n in state_dict for n in names):
        return  # not a classic state_dict: a partial one must still fail strict loading
    fresh = {
        # usage 1 and sums = codewords keep weight = embed_avg / smoothed usage (smoothing maps 1 to 1)
        "cluster_size": lambda: torch.ones(weight.shape[0]),
        "embed_avg": lambda: weight,
        "initted": lambda: torch.tensor(True),  # the checkpoint's codebook is kept, not re-seeded by k-means
    }
    for name in names:
        state_dict[prefix + name] = fresh[name]()


def _check_indices(indices: object, num_embeddings: int) -> None:
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"indices must be a torch.Tensor, got {type(indices).__name__}")
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise TypeError(f"indices must be an integer tensor, got {indices.dtype}")
    if indices.numel() and not torch.compiler.is_compiling():
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= num_embeddings:
            raise ValueError(f"indices must lie in [0, num_embeddings = {num_embeddings}), got values in [{lo}, {hi}]")


class CodebookLearning(nn.Module):
    """The codebook-learning steps (EMA, k-means init, dead-code restarts), shared by VectorQuantizer
    and the multi-scale quantizer of vqfast.models. A subclass sets ``num_embeddings``,
    ``embedding_dim``, ``metric`` and ``backend``, builds ``embedding`` (its ``weight``
    [num_embeddings, embedding_dim] is the searched codebook), then calls ``_init_codebook_learning``.
    The steps take flat rows [N, embedding_dim] and their indices [N]; they run without autograd.
    """

    def _init_codebook_learning(self, ema, decay, eps, kmeans_init, kmeans_iters, dead_code_threshold) -> None:
        """Set the options and register the state they need (after ``embedding`` exists)."""
        _check_learning_options(ema, decay, eps, kmeans_init, kmeans_iters, dead_code_threshold)
        self.ema = ema
        self.decay = float(decay)
        self.eps = float(eps)
        self.kmeans_init = kmeans_init
        self.kmeans_iters = kmeans_iters
        self.dead_code_threshold = float(dead_code_threshold)
        if ema or self.dead_code_threshold > 0:
            # EMA usage per code, in assignments per training step. Starting at 1 with embed_avg = weight
            # keeps weight = embed_avg / cluster_size for codes that are never used (no blow-up at step 1).
            self.register_buffer("cluster_size", torch.ones(self.num_embeddings))
        if ema:
            self.register_buffer("embed_avg", self.embedding.weight.detach().clone())
            self.embedding.weight.requires_grad_(False)
        # A Python flag mirrors the ``initted`` buffer so forward branches on no tensor value: once the
        # codebook is initialised, torch.compile(fullgraph=True) traces a graph without k-means in it.
        self._kmeans_pending = kmeans_init
        if kmeans_init:
            self.register_buffer("initted", torch.tensor(False))
            self.register_load_state_dict_post_hook(_sync_kmeans_flag)

    def _learning_repr(self) -> str:
        out = ""
        if self.ema:
            out += f", ema=True, decay={self.decay}, eps={self.eps}"
        if self.kmeans_init:
            out += f", kmeans_init=True, kmeans_iters={self.kmeans_iters}"
        if self.dead_code_threshold > 0:
            out += f", dead_code_threshold={self.dead_code_threshold}"
        return out

    @torch.no_grad()
    def _assignment_stats(self, flat: torch.Tensor, indices: torch.Tensor, with_sums: bool = True):
        """Rows flat [N, D] assigned to indices [N] -> (counts [K], sums [K, D]) over every rank's rows."""
        k, d = self.num_embeddings, self.embedding_dim
        data = normalize_for_metric(flat.float(), self.metric)
        # counts and sums in one [K, 1 + D] tensor: a single all_reduce gives every rank the statistics
        # of the concatenated global batch, whatever each rank's batch size.
        stats = torch.zeros(k, 1 + d, dtype=torch.float32, device=flat.device)
        stats[:, 0].index_add_(0, indices, torch.ones_like(data[:, 0]))
        if with_sums:
            stats[:, 1:].index_add_(0, indices, data)
        distributed.all_reduce_sum_(stats)
        return stats[:, 0], stats[:, 1:]

    @torch.no_grad()
    def _update_ema(self, flat: torch.Tensor, indices: torch.Tensor) -> None:
        k = self.num_embeddings
        counts, sums = self._assignment_stats(flat, indices, with_sums=self.ema)
        self.cluster_size.mul_(self.decay).add_(counts.to(self.cluster_size.dtype), alpha=1 - self.decay)
        if not self.ema:
            return
        self.embed_avg.mul_(self.decay).add_(sums.to(self.embed_avg.dtype), alpha=1 - self.decay)
        # Laplace smoothing: no code divides by ~0, and the total usage n is preserved.
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + k * self.eps) * n
        new = self.embed_avg / smoothed[:, None]
        self.embedding.weight.copy_(normalize_for_metric(new, self.metric).to(self.embedding.weight.dtype))

    @torch.no_grad()
    def _set_codes(self, mask: torch.Tensor, values: torch.Tensor, usage: torch.Tensor) -> None:
        """Codes where mask [K] is True take codewords values [K, D] and EMA usage usage [K] (EMA state reset)."""
        w = self.embedding.weight
        m = mask[:, None]
        w.copy_(torch.where(m, values.to(w.dtype), w))
        if hasattr(self, "cluster_size"):
            self.cluster_size.copy_(torch.where(mask, usage.to(self.cluster_size.dtype), self.cluster_size))
        if self.ema:
            reset = (values.float() * usage.float()[:, None]).to(self.embed_avg.dtype)
            self.embed_avg.copy_(torch.where(m, reset, self.embed_avg))

    @torch.no_grad()
    def _kmeans_init(self, flat: torch.Tensor) -> None:
        k, d = self.num_embeddings, self.embedding_dim
        data = distributed.gather_rows(flat.float())  # every rank's rows, in rank order
        if data.shape[0] == 0:  # the same on every rank: wait for a batch with rows
            return
        if distributed.rank() == 0:
            centroids, counts = kmeans(data, k, iters=self.kmeans_iters, metric=self.metric, backend=self.backend)
        else:
            centroids = torch.empty(k, d, dtype=torch.float32, device=flat.device)
            counts = torch.empty(k, dtype=torch.float32, device=flat.device)
        distributed.broadcast_(centroids)
        distributed.broadcast_(counts)
        # A cluster left empty by Lloyd keeps its centroid; usage 1 keeps it from collapsing to 0 in EMA.
        self._set_codes(torch.ones(k, dtype=torch.bool, device=flat.device), centroids, counts.clamp_min(1.0))
        self.initted.fill_(True)
        self._kmeans_pending = False

    @torch.no_grad()
    def _restart_dead_codes(self, flat: torch.Tensor) -> None:
        k = self.num_embeddings
        dead = self.cluster_size < self.dead_code_threshold  # [K] bool
        # One uniform draw per code, every step, before any branch: the random stream (and so the
        # codebook) is the same for one process and for rank 0 of a group seeing the same global batch.
        u = torch.rand(k, device=flat.device)
        if distributed.is_distributed():
            # Rank 0 decides which codes are dead and whether rows are gathered at all, so every rank
            # enters the same collectives; skipping the gather when nothing is dead saves a round trip.
            dead = distributed.broadcast_(dead.to(torch.uint8)).bool()
            if not bool(dead.any()):
                return
            data = distributed.gather_rows(flat.float())
            if data.shape[0] == 0:  # the same on every rank: nothing to seed from
                return
            seeds = data[(u * data.shape[0]).long().clamp_max(data.shape[0] - 1)]
            distributed.broadcast_(seeds)  # rank 0's draw wins
        elif flat.shape[0] == 0:
            return
        else:
            # Branch-free on one process: a candidate row for every code, kept where the code is dead.
            # Static shapes and no host sync, so torch.compile(fullgraph=True) traces it; K x D extra work.
            seeds = flat.float()[(u * flat.shape[0]).long().clamp_max(flat.shape[0] - 1)]
        seeds = normalize_for_metric(seeds, self.metric)
        usage = torch.full((k,), self.dead_code_threshold, dtype=torch.float32, device=flat.device)
        self._set_codes(dead, seeds, usage)


class VectorQuantizer(CodebookLearning):
    """Codebook of ``num_embeddings`` vectors of size ``embedding_dim``.

    loss = mse(q, z.detach()) + beta * mse(q.detach(), z)   (codebook term + commitment term)
    With ema=True: loss = beta * mse(q.detach(), z) and the codebook is learnt by EMA in forward.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        beta: float = 0.25,
        *,
        backend: str = "auto",
        precision: str = "exact",
        metric: str = "l2",
        ema: bool = False,
        decay: float = 0.99,
        eps: float = 1e-5,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        dead_code_threshold: float = 0.0,
        index_shape: str = "flat",
    ):
        super().__init__()
        for name, value in (("num_embeddings", num_embeddings), ("embedding_dim", embedding_dim)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        check_search_options(backend, precision)
        check_choice("metric", metric, METRICS)
        check_choice("index_shape", index_shape, INDEX_SHAPES)
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.beta = beta
        self.backend = backend
        self.precision = precision
        self.metric = metric
        self.index_shape = index_shape
        self.embedding = nn.Embedding(num_embeddings, embedding_dim)
        self.embedding.weight.data.uniform_(-1 / num_embeddings, 1 / num_embeddings)
        # Not persistent: a classic state_dict (embedding.weight only) must load with strict=True.
        self.register_buffer("code_counts", torch.zeros(num_embeddings, dtype=torch.int64), persistent=False)
        self._init_codebook_learning(ema, decay, eps, kmeans_init, kmeans_iters, dead_code_threshold)
        self.register_load_state_dict_pre_hook(_fill_learning_state)

    def get_codebook(self) -> torch.Tensor:
        return self.embedding.weight.data

    def get_codebook_entry(self, indices: torch.Tensor, shape=None) -> torch.Tensor:
        """Codewords of ``indices`` (any shape): [*indices.shape, C], or with shape = (B, *S, C) (channels-last,
        taming-transformers' (b, h, w, c)) the channels-first [B, C, *S]. Differentiable w.r.t. the codebook."""
        _check_indices(indices, self.num_embeddings)
        codes = F.embedding(indices, self.embedding.weight)
        if shape is None:
            return codes
        shape = tuple(shape)
        if len(shape) < 2 or shape[-1] != self.embedding_dim or math.prod(shape) != codes.numel():
            raise ValueError(
                f"shape must be (B, *S, C) with C = embedding_dim = {self.embedding_dim} and B * prod(S) = "
                f"indices.numel() = {indices.numel()}, got {shape}"
            )
        return codes.reshape(shape).movedim(-1, 1).contiguous()

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """forward's indices back to codewords: an index map [B, *S] -> [B, C, *S] (forward's layout);
        flat indices [N] -> [N, C]."""
        codes = self.get_codebook_entry(indices)
        return codes if indices.dim() < 2 else codes.movedim(-1, 1).contiguous()

    def extra_repr(self) -> str:
        return (
            f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, beta={self.beta}, "
            f"backend={self.backend!r}, precision={self.precision!r}, metric={self.metric!r}"
        ) + self._learning_repr()

    def _learning_repr(self) -> str:
        shape = "" if self.index_shape == "flat" else f", index_shape={self.index_shape!r}"
        return shape + super()._learning_repr()

    # ---- usage statistics -------------------------------------------------------------------
    @torch.no_grad()
    def reset_usage(self) -> None:
        """Zero ``code_counts`` (e.g. at every logging interval)."""
        self.code_counts.zero_()

    @torch.no_grad()
    def perplexity(self) -> float:
        """exp(entropy) of the code distribution in ``code_counts``: 1 (one code) .. num_embeddings (uniform)."""
        total = self.code_counts.sum()
        if int(total) == 0:
            return 0.0
        p = self.code_counts.double() / total
        return float(torch.exp(-torch.special.xlogy(p, p).sum()))

    @torch.no_grad()
    def dead_code_fraction(self) -> float:
        """Fraction of codes never chosen since construction or the last ``reset_usage()``."""
        return float((self.code_counts == 0).double().mean())

    # ---- forward ------------------------------------------------------------------------------
    def _channels_last(self, z: torch.Tensor) -> torch.Tensor:
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"z must be a torch.Tensor, got {type(z).__name__}")
        if z.dim() not in (3, 4, 5):
            raise ValueError(
                f"z must be [B, C, T], [B, C, H, W] or [B, C, D, H, W] with C = embedding_dim = {self.embedding_dim}, "
                f"got shape {tuple(z.shape)}"
            )
        if z.shape[1] != self.embedding_dim:
            raise ValueError(
                f"z has {z.shape[1]} channels (dim 1) but embedding_dim = {self.embedding_dim}; inputs are channels-first"
            )
        return z.movedim(1, -1).contiguous()

    def _search(self, flat: torch.Tensor):
        return nearest_codeword(
            flat, self.embedding.weight, metric=self.metric, precision=self.precision, backend=self.backend
        )

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z [B, C, *S] -> (z channels-last [B, *S, C], codewords [B, *S, C], indices [B * prod(S)]).

        The search alone: no codebook learning and no usage statistics.
        """
        z_cl = self._channels_last(z)
        indices, q, _ = self._search(z_cl.view(-1, self.embedding_dim))
        return z_cl, q.view(z_cl.shape), indices

    def _loss(self, q: torch.Tensor, z_cl: torch.Tensor) -> torch.Tensor:
        if z_cl.numel() == 0:  # no vectors: loss 0, not the NaN of a mean over nothing (module docstring)
            return (q.sum() + z_cl.sum()) * 0.0
        if self.ema:  # the codebook is learnt by EMA: only the commitment term trains the encoder
            return self.beta * F.mse_loss(q.detach(), z_cl)
        return F.mse_loss(q, z_cl.detach()) + self.beta * F.mse_loss(q.detach(), z_cl)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z_cl = self._channels_last(z)
        flat = z_cl.view(-1, self.embedding_dim)
        learn = self.training
        if learn and self._kmeans_pending:
            self._kmeans_init(flat.detach())
        if learn and self.dead_code_threshold > 0:
            self._restart_dead_codes(flat.detach())
        if self.ema:
            # No gradient reaches the codebook in EMA mode, and the in-place update below must not
            # touch a tensor saved for backward: search outside autograd.
            with torch.no_grad():
                indices, q, _ = self._search(flat)
        else:
            indices, q, _ = self._search(flat)
        self._record_usage(indices)
        if learn and (self.ema or self.dead_code_threshold > 0):
            self._update_ema(flat.detach(), indices)
        q = q.view(z_cl.shape)
        loss = self._loss(q, z_cl)
        quantized = z_cl + (q - z_cl).detach()  # straight-through estimator
        if self.index_shape == "spatial":
            indices = indices.view(z_cl.shape[:-1])  # [B, *S]
        return quantized.movedim(-1, 1).contiguous(), loss, indices

    # ---- codebook learning (training mode only, no autograd) ------------------------------------
    @torch.no_grad()
    def _record_usage(self, indices: torch.Tensor) -> None:
        # index_add, not bincount: a static [K] shape keeps torch.compile free of graph breaks.
        self.code_counts.index_add_(0, indices, torch.ones_like(indices))


class VectorQuantizer2(VectorQuantizer):
    """VectorQuantizer with the commitment term unweighted: loss = mse(q, z.detach()) + mse(q.detach(), z)."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        backend: str = "auto",
        precision: str = "exact",
        metric: str = "l2",
        **learning,
    ):
        super().__init__(
            num_embeddings, embedding_dim, 1.0, backend=backend, precision=precision, metric=metric, **learning
        )

    def extra_repr(self) -> str:
        return (
            f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, "
            f"backend={self.backend!r}, precision={self.precision!r}, metric={self.metric!r}"
        ) + self._learning_repr()


class ResidualVectorQuantizer(nn.Module):
    """``num_quantizers`` VectorQuantizers in sequence, each quantising what the previous ones left.

    forward returns (sum of the stages' quantized outputs, sum of their losses, [indices per stage]).
    The codebook learning options (ema, decay, eps, kmeans_init, kmeans_iters, dead_code_threshold)
    apply to every stage.
    """

    def __init__(
        self,
        num_quantizers: int,
        num_embeddings: int,
        embedding_dim: int,
        beta: float = 0.25,
        *,
        backend: str = "auto",
        precision: str = "exact",
        metric: str = "l2",
        **learning,
    ):
        super().__init__()
        if not isinstance(num_quantizers, int) or isinstance(num_quantizers, bool) or num_quantizers < 1:
            raise ValueError(f"num_quantizers must be a positive int, got {num_quantizers!r}")
        self.num_quantizers = num_quantizers
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.quantizers = nn.ModuleList(
            [
                VectorQuantizer(
                    num_embeddings, embedding_dim, beta, backend=backend, precision=precision, metric=metric, **learning
                )
                for _ in range(num_quantizers)
            ]
        )

    def get_codebook(self) -> torch.Tensor:
        """[num_quantizers, num_embeddings, embedding_dim]: every stage's codebook."""
        return torch.stack([q.get_codebook() for q in self.quantizers])

    def _per_stage(self, indices) -> list:
        if not hasattr(indices, "__len__") or (isinstance(indices, torch.Tensor) and indices.dim() == 0):
            raise TypeError(
                f"indices must be a list of {self.num_quantizers} tensors (one per stage, as forward returns)"
            )
        if len(indices) != self.num_quantizers:
            raise ValueError(f"indices must hold one tensor per stage ({self.num_quantizers}), got {len(indices)}")
        return list(indices)

    def get_codebook_entry(self, indices, shape=None) -> torch.Tensor:
        """The sum of every stage's codewords (see VectorQuantizer.get_codebook_entry); indices: one tensor
        per stage."""
        stages = self._per_stage(indices)
        return sum(q.get_codebook_entry(i, shape) for q, i in zip(self.quantizers, stages))

    def indices_to_codes(self, indices) -> torch.Tensor:
        """forward's per-stage indices -> the sum of the stages' codewords: [B, C, *S] for index maps,
        [N, C] for flat ones."""
        stages = self._per_stage(indices)
        return sum(q.indices_to_codes(i) for q, i in zip(self.quantizers, stages))

    def reset_usage(self) -> None:
        for q in self.quantizers:
            q.reset_usage()

    def perplexity(self) -> list[float]:
        """Per-stage perplexity of the codes chosen since the last ``reset_usage()``."""
        return [q.perplexity() for q in self.quantizers]

    def dead_code_fraction(self) -> list[float]:
        """Per-stage fraction of codes never chosen since the last ``reset_usage()``."""
        return [q.dead_code_fraction() for q in self.quantizers]

    def forward(self, x: torch.Tensor):
        quantized = torch.zeros_like(x)
        total_loss = 0
        all_indices = []
        for quantizer in self.quantizers:
            quantized_stage, loss, indices = quantizer(x - quantized)
            quantized = quantized + quantized_stage
            total_loss = total_loss + loss
            all_indices.append(indices)
        return quantized, total_loss, all_indices
