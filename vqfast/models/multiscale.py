"""The multi-scale quantizer of vqfast's VQVAE: VAR's VectorQuantizer2 with vqfast's codebook options.

``MultiScaleQuantizer`` is ``vqfast.multiscale.VARQuantizer`` (VAR's constructor, state_dict, methods
and outputs; every scale's search is ``vqfast.nearest_codeword``) plus keyword-only options against
codebook collapse. With every option off it is VAR's quantizer, bit for bit and key for key (the same
engine as vqfast.compat.var.VectorQuantizer2). The options reach the scale loop through the engine's
two extension points: ``embedding`` (a ``CodebookTable`` when the codes are not VAR's plain table) and
``scale_search`` (the search in the lookup space, and every scale's rows recorded for learning).

One codebook serves every scale s of ``v_patch_nums``; scale s searches the rows of the residual
area-downsampled to p_s x p_s (B * p_s^2 rows: 16 rows at the 1 x 1 scale of a batch of 16, 1024 at
8 x 8), so the options work on the rows of all scales pooled ("all_rows" below):

    kmeans_init=True        first training forward: k-means++ and ``kmeans_iters`` Lloyd steps on the
                            rows of f area-downsampled to every scale, then ``kmeans_iters`` Lloyd steps
                            on the residual rows the scale loop itself produces with those codes
    dead_code_threshold=t   after each training forward, codes whose EMA usage (hits per step summed
                            over the scales, decayed by ``decay``) is below t are re-seeded from
                            random rows of all scales
    ema=True                codes follow the EMA of the rows of all scales assigned to them (Laplace-
                            smoothed); ``embedding`` gets no gradient (the Phi convolutions still do)
    l2_codes=True           rows and codes are l2-normalised in the lookup space: cosine search, and the
                            unit code is what the scale adds (VAR's ``using_znorm`` searches by cosine
                            but adds the raw code)
    codebook_dim=d          low-dimensional lookup: rows are projected by ``project_in`` (Cvae -> d),
                            codes live in d dimensions, ``embedding.project_out`` (d -> Cvae) maps a code
                            back. The loss gains, per scale, mse(project_out(row), rest) (the projection
                            must keep what the scale needs; without it project_in collapses every row
                            onto one code) + beta * mse(row, its code)
    simvq=True              SimVQ (Zhu et al. 2024): codes = frozen table x a learned linear map
                            ``embedding.transform`` (identity at initialisation)

All steps that change the codebook run without autograd, in training mode only, with their
statistics all-reduced and their random draws made on rank 0 under torch.distributed (shared with
vqfast.VectorQuantizer through vqfast.modules.CodebookLearning).

Usage per scale: ``code_hits_SV`` [S, V] counts the hits of every forward since construction or
``reset_usage()`` (a non-persistent buffer, so VAR's state_dict layout is unchanged), read with
``usage_per_scale()``, ``codebook_usage()`` and ``perplexity()``. VAR's own ``ema_vocab_hit_SV``
keeps VAR's semantics.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from vqfast.modules import CodebookLearning
from vqfast.multiscale import Search, VARQuantizer
from vqfast.ops import nearest_codeword

# The options and their defaults (VAR's behaviour).
CODEBOOK_OPTIONS = dict(ema=False, decay=0.99, eps=1e-5, kmeans_init=False, kmeans_iters=10, dead_code_threshold=0.0,
                        l2_codes=False, codebook_dim=None, simvq=False)


class CodebookTable(nn.Module):
    """``quantize.embedding`` when codes are not VAR's plain [V, Cvae] table.

    weight       [V, d] the table (frozen under simvq)
    transform    simvq only: Linear(d, d, bias=False), identity at initialisation
    project_out  codebook_dim only: Linear(d, Cvae)

    codes()      -> [V, d]: the searched codes, weight (or transform(weight)), unit-norm with l2_codes
    forward(idx) -> [*idx.shape, Cvae]: what a token adds, like VAR's ``embedding(idx)``
    """

    def __init__(self, vocab_size: int, Cvae: int, dim: int, *, l2_codes: bool, project: bool, simvq: bool):
        super().__init__()
        self.l2_codes = l2_codes
        self.weight = nn.Parameter(torch.randn(vocab_size, dim))  # nn.Embedding's N(0, 1), as VAR
        if simvq:
            self.weight.requires_grad_(False)
            self.transform = nn.Linear(dim, dim, bias=False)
            nn.init.eye_(self.transform.weight)
        if project:
            self.project_out = nn.Linear(dim, Cvae)

    def codes(self) -> torch.Tensor:
        # A copy, not the Parameter itself, enters the graph: the in-place codebook updates made after
        # the scale loop (EMA, restarts) must not touch a tensor autograd saved for the backward.
        w = self.weight.clone()
        if hasattr(self, "transform"):
            w = self.transform(w)
        return F.normalize(w, dim=-1) if self.l2_codes else w

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = F.embedding(idx, self.codes())
        return self.project_out(h) if hasattr(self, "project_out") else h


def _check_options(options: dict) -> dict:
    unknown = sorted(set(options) - set(CODEBOOK_OPTIONS))
    if unknown:
        raise TypeError(f"unknown codebook option(s) {unknown}: choose from {sorted(CODEBOOK_OPTIONS)}")
    opts = {**CODEBOOK_OPTIONS, **options}
    for name in ("l2_codes", "simvq"):
        if not isinstance(opts[name], bool):
            raise TypeError(f"{name} must be a bool, got {type(opts[name]).__name__}")
    d = opts["codebook_dim"]
    if d is not None and (not isinstance(d, int) or isinstance(d, bool) or d < 1):
        raise ValueError(f"codebook_dim must be None or a positive int, got {d!r}")
    if opts["simvq"] and (opts["ema"] or opts["dead_code_threshold"]):
        raise ValueError("simvq learns its linear map by gradient over a fixed table: it cannot be combined with "
                         "ema or dead_code_threshold (kmeans_init is allowed)")
    return opts


def _image_major(parts: list[torch.Tensor], batch: int) -> torch.Tensor:
    """Per-scale rows (scale s: [B * n_s, ...], image-major within the scale) -> one tensor ordered by
    image, then scale: [B * sum(n_s), ...]. Under torch.distributed each rank holds consecutive images
    of the global batch, so the ranks' rows gathered in rank order are the rows of one process in the
    same order: k-means and dead-code restarts then pick the same rows."""
    if batch == 0:
        return torch.cat(parts)
    return torch.cat([p.reshape(batch, -1, *p.shape[1:]) for p in parts], dim=1).flatten(0, 1)


def _records_image_major(records: list, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale loop's records (rows, indices, residual rows) -> (rows, indices), image-major."""
    return (_image_major([r.detach() for r, _, _ in records], batch),
            _image_major([i for _, i, _ in records], batch))


class MultiScaleQuantizer(VARQuantizer, CodebookLearning):
    """VAR's ``VectorQuantizer2(vocab_size, Cvae, using_znorm, beta, default_qresi_counts, v_patch_nums,
    quant_resi, share_quant_resi)`` with the keyword-only ``backend``, ``precision`` and codebook
    options of the module docstring (defaults: VAR's behaviour).

    forward(f [B, Cvae, H, W], ret_usages=False) -> (f_hat [B, Cvae, H, W], usages, vq_loss), as VAR.
    """

    def __init__(self, vocab_size: int, Cvae: int, using_znorm: bool, beta: float = 0.25,
                 default_qresi_counts: int = 0, v_patch_nums=None, quant_resi: float = 0.5,
                 share_quant_resi: int = 4, *, backend: str = "auto", precision: str = "exact", **options):
        super().__init__(vocab_size, Cvae, using_znorm, beta, default_qresi_counts, v_patch_nums, quant_resi,
                         share_quant_resi, backend=backend, precision=precision)
        opts = _check_options(options)
        self.l2_codes, self.codebook_dim, self.simvq = opts["l2_codes"], opts["codebook_dim"], opts["simvq"]
        # CodebookLearning's names: the searched table is [num_embeddings, embedding_dim].
        self.num_embeddings = vocab_size
        self.embedding_dim = self.codebook_dim or Cvae
        self.metric = "cosine" if self.l2_codes else "l2"
        if self._custom_lookup():
            self.embedding = CodebookTable(vocab_size, Cvae, self.embedding_dim, l2_codes=self.l2_codes,
                                           project=self.codebook_dim is not None, simvq=self.simvq)
        if self.codebook_dim is not None:
            self.project_in = nn.Linear(Cvae, self.codebook_dim)
        self._init_codebook_learning(opts["ema"], opts["decay"], opts["eps"], opts["kmeans_init"],
                                     opts["kmeans_iters"], opts["dead_code_threshold"])
        self.register_buffer("code_hits_SV", torch.zeros(len(self.v_patch_nums), vocab_size, dtype=torch.int64),
                             persistent=False)
        # Per scale (searched rows [N, d], indices [N], residual rows [N, Cvae]) while recording.
        self._collected: list | None = None

    def codebook_options(self) -> dict:
        """The options that differ from VAR's behaviour (constructor keywords, plain types)."""
        now = dict(ema=self.ema, decay=self.decay, eps=self.eps, kmeans_init=self.kmeans_init,
                   kmeans_iters=self.kmeans_iters, dead_code_threshold=self.dead_code_threshold,
                   l2_codes=self.l2_codes, codebook_dim=self.codebook_dim, simvq=self.simvq)
        return {k: v for k, v in now.items() if v != CODEBOOK_OPTIONS[k]}

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.codebook_options().items())
        return super().extra_repr() + (f"  |  {opts}" if opts else "")

    # ---- usage ----------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_usage(self) -> None:
        self.code_hits_SV.zero_()

    @torch.no_grad()
    def usage_per_scale(self) -> list[float]:
        """Fraction of the vocabulary hit at each scale since the last ``reset_usage()``."""
        return (self.code_hits_SV > 0).double().mean(1).tolist()

    @torch.no_grad()
    def codebook_usage(self) -> float:
        """Fraction of the vocabulary hit at any scale since the last ``reset_usage()``."""
        return float((self.code_hits_SV.sum(0) > 0).double().mean())

    @torch.no_grad()
    def perplexity(self) -> float:
        """exp(entropy) of the hits over all scales: 1 (one code) .. vocab_size (uniform); 0 before any hit."""
        counts = self.code_hits_SV.sum(0)
        total = counts.sum()
        if int(total) == 0:
            return 0.0
        p = counts.double() / total
        return float(torch.exp(-torch.special.xlogy(p, p).sum()))

    # ---- the search -----------------------------------------------------------------------------
    @property
    def backend(self) -> str:  # CodebookLearning's name for VARQuantizer's vqfast_backend
        return self.vqfast_backend

    @property
    def precision(self) -> str:
        return self.vqfast_precision

    def _custom_lookup(self) -> bool:
        return self.l2_codes or self.codebook_dim is not None or self.simvq

    def _lookup_rows(self, rest_NC: torch.Tensor) -> torch.Tensor:
        """Residual rows [N, Cvae] -> the rows searched [N, embedding_dim]: projected by project_in
        (its graph kept) with codebook_dim, unit-norm with l2_codes."""
        rows = self.project_in(rest_NC) if self.codebook_dim is not None else rest_NC
        return F.normalize(rows, dim=-1) if self.l2_codes else rows

    def scale_search(self, search: Search) -> Search:
        """VARQuantizer's extension point: every scale searches in the lookup space when an option changes
        it, and records its (rows, indices, residual rows) while ``_collected`` is a list."""
        if self._collected is not None:
            self._collected.clear()  # a pass run again (float64 retry) replaces the first one's records
        if self._custom_lookup():
            with torch.no_grad():
                codes = self.embedding.codes()
            metric = "cosine" if self.l2_codes or self.using_znorm else "l2"

        def lookup_search(z_NC: torch.Tensor) -> torch.Tensor:
            # A copy: at the last scale z_NC can be a view of the residual the loop then updates in place.
            z = z_NC.detach().clone()
            if self._custom_lookup():
                rows = self._lookup_rows(z)
                # The public op per scale: its checks and float64 fallback cost ~0.1 ms, against a
                # training step of ~100 ms for the demo preset.
                idx = nearest_codeword(rows.detach(), codes, metric=metric, precision=self.vqfast_precision,
                                       backend=self.vqfast_backend)[0]
            else:
                rows, idx = z, search(z_NC)
            if self._collected is not None:
                self._collected.append((rows, idx, z))
            return idx

        return lookup_search

    def _scale_rows(self, f: torch.Tensor) -> torch.Tensor:
        """f [B, Cvae, H, W] area-downsampled to every scale, in the lookup space: [B * sum(p^2), d],
        image-major (see _image_major)."""
        C, SN = f.shape[1], len(self.v_patch_nums)
        rows = [(F.interpolate(f, size=(p, p), mode="area") if si != SN - 1 else f).permute(0, 2, 3, 1).reshape(-1, C)
                for si, p in enumerate(self.v_patch_nums)]
        return self._lookup_rows(_image_major(rows, f.shape[0]))

    def _run_collecting(self, run):
        """Call ``run()`` while every scale's (rows, indices) are recorded; returns (result, records)."""
        self._collected = []
        try:
            return run(), self._collected
        finally:
            self._collected = None

    # ---- training -------------------------------------------------------------------------------
    @torch.no_grad()
    def _multiscale_kmeans_init(self, f: torch.Tensor) -> None:
        """k-means on the rows of all scales, then Lloyd steps on the residuals the scale loop makes."""
        self._kmeans_init(self._scale_rows(f))
        if self._kmeans_pending:  # no rows on any rank: try again at the next batch
            return
        for _ in range(self.kmeans_iters):
            _, records = self._run_collecting(lambda: self.f_to_idxBl_or_fhat(f, to_fhat=False))
            rows, idx = _records_image_major(records, f.shape[0])
            counts, sums = self._assignment_stats(rows, idx)
            used = counts > 0
            centroids = sums / counts.clamp_min(1.0)[:, None]
            if self.metric == "cosine":
                centroids = F.normalize(centroids, dim=-1)
            self._set_codes(used, centroids, counts)

    def forward(self, f_BChw: torch.Tensor, ret_usages: bool = False):
        learn = self.training
        if learn and self._kmeans_pending:
            self._multiscale_kmeans_init(f_BChw.detach().float())
        (f_hat, usages, loss), records = self._run_collecting(lambda: super(MultiScaleQuantizer, self).forward(
            f_BChw, ret_usages=ret_usages))
        with torch.no_grad():
            for si, (_, idx, _) in enumerate(records):
                self.code_hits_SV[si].index_add_(0, idx, torch.ones_like(idx))
        if learn and self.codebook_dim is not None:
            with torch.no_grad():
                codes = self.embedding.codes()
            project_out = self.embedding.project_out
            loss = loss + sum(F.mse_loss(project_out(rows), z) + self.beta * F.mse_loss(rows, codes[idx])
                              for rows, idx, z in records) / len(records)
        if learn and (self.ema or self.dead_code_threshold > 0):
            rows, idx = _records_image_major(records, f_BChw.shape[0])
            self._update_ema(rows, idx)
            if self.dead_code_threshold > 0:
                self._restart_dead_codes(rows)
        return f_hat, usages, loss
