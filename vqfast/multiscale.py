"""VAR's multi-scale residual quantization: the one scale loop of vqfast.

``VARQuantizer`` is the engine under both multi-scale quantizers of vqfast:

    vqfast.compat.var.VectorQuantizer2      VAR's class as a drop-in (what vqfast.accelerate swaps in)
    vqfast.models.MultiScaleQuantizer       VAR's class with vqfast's codebook options

    VARQuantizer(vocab_size, Cvae, using_znorm, beta=0.25, default_qresi_counts=0, v_patch_nums=None,
                 quant_resi=0.5, share_quant_resi=4, *, backend="auto", precision="exact")

It tokenises a feature map f [B, Cvae, H, W] into one index map per scale, coarse to fine, over one
codebook ``embedding`` [vocab_size, Cvae] (Tian et al. 2024, VAR's models/quant.py); scale si (side
pn = v_patch_nums[si], the last one H = W):

    z      = area_downsample(f_rest, pn) as rows [B*pn*pn, Cvae]   (f_rest itself at the last scale)
    idx    = nearest codeword of each row                          [B, pn*pn]
    h      = Phi_si(bicubic_upsample(embedding(idx), H, W))        (no upsampling at the last scale)
    f_hat += h;  f_rest -= h

with Phi(h) = (1 - r) h + r conv3x3(h), r = |quant_resi| (the identity when r <= 1e-6), taken from
``quant_resi`` by the scale's position t = si / (SN - 1): share_quant_resi == 0 gives one Phi per scale
(``default_qresi_counts`` or SN of them, keys ``quant_resi.{i}.*``), 1 one shared Phi (``quant_resi.qresi.*``),
n >= 2 n Phis (``quant_resi.qresi_ls.{k}.*``); the Phi whose tick in linspace(1/(3n), 1 - 1/(3n), n)
(n == 4) or linspace(1/(2n), 1 - 1/(2n), n) (other n) is nearest to t wins, the first on exact ties
(ten scales, four Phis: 0,0,1,1,1,2,2,3,3,3).

The class has VAR's constructor, attribute names (vocab_size, Cvae, using_znorm, v_patch_nums,
quant_resi_ratio, quant_resi, beta, embedding, record_hit, prog_si), state_dict keys in VAR's order
(``ema_vocab_hit_SV`` [SN, vocab_size], ``quant_resi.*``, ``embedding.weight``), its initialisation (the
Phi convs' defaults, then N(0, 1) codewords, in VAR's order of random draws) and its methods:

    forward(f_BChw [B, Cvae, H, W], ret_usages=False) -> (f_hat [B, Cvae, H, W] fp32, usages, mean_vq_loss [])
        f_hat is straight-through (f_hat.detach() - f.detach() + f); mean_vq_loss the mean over scales of
        beta * mse(f_hat.detach(), f) + mse(f_hat, f.detach()); usages (ret_usages) the percent of codes per
        scale whose ema_vocab_hit_SV reaches 8 % of a uniform share, else None. Computes in fp32 with CUDA
        autocast off, as VAR does (a CPU autocast region still reaches the Phi convs, as in VAR).
    f_to_idxBl_or_fhat(f_BChw, to_fhat, v_patch_nums=None) -> per scale [B, ph*pw] int64 or cumulative f_hat
        (patch sizes may be ints or (h, w) pairs; the last must be (H, W)).
    idxBl_to_var_input(gt_ms_idx_Bl) -> [B, L - v_patch_nums[0]**2, Cvae] (VAR's teacher-forcing input)
    embed_to_fhat(ms_h_BChw, all_to_max_scale=True, last_one=False),
    get_next_autoregressive_input(si, SN, f_hat, h_BChw),
    eini(eini).

The search is ``vqfast.nearest_codeword`` (squared L2; with ``using_znorm`` metric="cosine": the argmax of
the cosine against the normalised codebook, while the raw codewords reconstruct), so no [N, vocab_size]
matrix is built; everything else runs VAR's operations in VAR's order. A row that is exactly zero takes
code 0 under ``using_znorm``, as VAR's argmax of an all-zero cosine row does.

Hit bookkeeping: in training, ``ema_vocab_hit_SV`` and ``record_hit`` follow VAR's schedule (per scale:
a copy when record_hit == 0, then ema * 0.9 + hits * 0.1 while record_hit < 100, then 0.99 / 0.01;
record_hit counts scales), each scale's hit counts all-reduced under an initialised process group, one
all_reduce per scale as in VAR. The updates run after the scale loop (nothing in the loop reads them)
in one step that torch.compile leaves out of its graph, so a compiled forward is not recompiled as
record_hit counts up. No process group is needed: the usages margin reads the world size only when
ret_usages is True, and a missing group counts as world size 1.

Checks: non-finite values raise a ValueError naming the scale (one device sync per pass, after all
scales are queued). Values so large that fp32 squared distances could overflow (|x| > 6.5e18 / sqrt(Cvae))
make the pass run again with a float64 search.

Extension points (public, for subclasses):

    embedding                  any module mapping indices [...] to codewords [..., Cvae] whose ``weight``
                               is the table the default search scans (VAR's nn.Embedding by default)
    scale_search(search)       called at the start of every pass over the scales (and again when a pass
                               is run in float64): returns the function the pass uses to map one scale's
                               residual rows [N, Cvae] fp32 to indices [N] int64. ``search`` is the
                               default: the nearest codeword of each row in ``embedding.weight`` (checked
                               once per pass, see ``ScaleSearches``). The rows may be a view of the
                               residual, which the loop updates in place after the search.
    updates_vocab_hits()       whether a training forward updates ema_vocab_hit_SV (default True)
    set_search_options(backend, precision)   the nearest-codeword backend and precision
"""
from __future__ import annotations

import functools
import math
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as tdist
import torch.nn as nn
import torch.nn.functional as F

from vqfast._validation import check_nearest_codeword_inputs, needs_float64
from vqfast.backends import check_search_options, load_flagged_op, resolve_backend
from vqfast.ops import _op_for, nearest_codeword

__all__ = ["VARQuantizer", "ScaleSearches", "Phi", "PhiShared", "PhiPartiallyShared", "PhiNonShared",
           "phi_ticks", "nearest_tick", "patch_nums_problem"]

Search = Callable[[torch.Tensor], torch.Tensor]


# ---- Phi, the per-scale residual convolution, and its three sharing containers ----------------------
class Phi(nn.Conv2d):
    """phi(h) = (1 - r) h + r conv3x3(h), r = |quant_resi|: [B, C, H, W] -> [B, C, H, W]."""

    def __init__(self, embed_dim: int, quant_resi: float):
        super().__init__(embed_dim, embed_dim, kernel_size=3, stride=1, padding=1)
        self.resi_ratio = abs(quant_resi)

    def forward(self, h_BChw: torch.Tensor) -> torch.Tensor:
        return h_BChw.mul(1 - self.resi_ratio) + super().forward(h_BChw).mul_(self.resi_ratio)


def phi_ticks(count: int) -> np.ndarray:
    """The positions in [0, 1] of ``count`` shared Phis (float64, VAR's values to the last bit)."""
    third_or_half = 3 if count == 4 else 2
    return np.linspace(1 / (third_or_half * count), 1 - 1 / (third_or_half * count), count)


def nearest_tick(ticks: Sequence[float], at_from_0_to_1: float) -> int:
    """Index of the tick nearest to the scale position, the first on exact ties (numpy's argmin).
    Plain Python floats (the same IEEE operations as numpy's): torch.compile folds them to a constant."""
    return min(range(len(ticks)), key=lambda k: abs(ticks[k] - at_from_0_to_1))


class PhiShared(nn.Module):
    """One Phi for every scale (share_quant_resi == 1); indexed by the scale position, ignored."""

    def __init__(self, qresi: nn.Module):
        super().__init__()
        self.qresi = qresi

    def __getitem__(self, _: float) -> nn.Module:
        return self.qresi


class PhiPartiallyShared(nn.Module):
    """``len(qresi_ls)`` Phis shared by position (share_quant_resi >= 2): self[t] for t in [0, 1]."""

    def __init__(self, qresi_ls: nn.ModuleList):
        super().__init__()
        self.qresi_ls = qresi_ls
        self.ticks = phi_ticks(len(qresi_ls))
        self._tick_values = tuple(self.ticks.tolist())

    def __getitem__(self, at_from_0_to_1: float) -> nn.Module:
        return self.qresi_ls[nearest_tick(self._tick_values, at_from_0_to_1)]

    def extra_repr(self) -> str:
        return f"ticks={self.ticks}"


class PhiNonShared(nn.ModuleList):
    """One Phi per scale (share_quant_resi == 0): self[t] for t in [0, 1], picked by the same tick rule."""

    def __init__(self, qresi: list):
        super().__init__(qresi)
        self.ticks = phi_ticks(len(qresi))
        self._tick_values = tuple(self.ticks.tolist())

    def __getitem__(self, at_from_0_to_1: float) -> nn.Module:
        return super().__getitem__(nearest_tick(self._tick_values, at_from_0_to_1))

    def extra_repr(self) -> str:
        return f"ticks={self.ticks}"


# ---- argument checks ---------------------------------------------------------------------------------
def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def patch_nums_problem(v_patch_nums: object) -> Optional[str]:
    """Why ``v_patch_nums`` is not VAR's list of square scale sides (>= 2 positive ints), or None."""
    if not isinstance(v_patch_nums, (list, tuple)):
        return (f"v_patch_nums must be a list or tuple of scale sides, e.g. (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), "
                f"got {v_patch_nums!r}")
    if len(v_patch_nums) < 2 or not all(_is_int(p) and p >= 1 for p in v_patch_nums):
        return (f"v_patch_nums must hold at least two positive ints (VAR picks Phi by si / (SN - 1)), "
                f"got {tuple(v_patch_nums)!r}")
    return None


def _patch_hws(v_patch_nums: object) -> List[Tuple[int, int]]:
    """f_to_idxBl_or_fhat's patch sizes: ints (square) or (h, w) pairs, at least two -> [(h, w), ...]."""
    if not isinstance(v_patch_nums, (list, tuple)) or len(v_patch_nums) < 2:
        raise ValueError(f"v_patch_nums must be a list or tuple of at least two scale sizes, got {v_patch_nums!r}")
    hws = []
    for pn in v_patch_nums:
        hw = (pn, pn) if _is_int(pn) else tuple(pn) if isinstance(pn, (list, tuple)) else None
        if hw is None or len(hw) != 2 or not all(_is_int(x) and x >= 1 for x in hw):
            raise ValueError(f"v_patch_nums entries must be positive ints or (h, w) pairs of them, got {pn!r}")
        hws.append(hw)
    return hws


def _check_feature_map(f: object, cvae: int, last_hw: Tuple[int, int]) -> None:
    if not isinstance(f, torch.Tensor):
        raise TypeError(f"f_BChw must be a torch.Tensor, got {type(f).__name__}")
    if not f.is_floating_point():
        raise TypeError(f"f_BChw must be a floating-point tensor, got {f.dtype}")
    if f.dim() != 4 or f.shape[1] != cvae:
        raise ValueError(f"f_BChw must be [B, Cvae={cvae}, H, W], got shape {tuple(f.shape)}")
    if tuple(f.shape[2:]) != tuple(last_hw):
        raise ValueError(f"the last scale must cover f_BChw: its patch size {tuple(last_hw)} != (H, W) = "
                         f"{tuple(f.shape[2:])}")


# ---- the searches of one pass over the scales -----------------------------------------------------
class ScaleSearches:
    """The nearest-codeword searches of one pass over the scales, against one codebook.

    ``vqfast.nearest_codeword`` checks its arguments, scans both inputs for NaN/Inf (one device sync)
    and resolves the backend on every call: 0.36 ms above the op's 0.67 ms at N = 16, K = 4096, D = 32
    (VAR's first scale at batch 16; 1 thread of the 2-core test machine, shared), paid at each of the
    ten scales. Here the codebook is checked and the backend resolved once per pass, each scale
    launches the op alone, and the values are tested on the device and read back once, in ``finish``,
    after every scale has been queued: 0.16 ms above the op per scale, and one sync per pass instead
    of ten (benchmarks/var_scale_searches.py). The test is the flagged op's own (max |z| and
    max |codebook| from the kernel's passes over the inputs) on a GPU backend that has one, else one
    aminmax per scale.
    """

    def __init__(self, codebook: torch.Tensor, metric: str, precision: str, backend: str, max_rows: int):
        self.codebook, self.metric, self.precision, self.backend = codebook, metric, precision, backend
        # A shape-only stand-in for the largest z of the pass: the checks and the backend's
        # inputs_reason read shapes and dtypes, never values.
        z_like = codebook.new_empty((), dtype=torch.float32).expand(max_rows, codebook.shape[1])
        check_nearest_codeword_inputs(z_like, codebook, metric, precision)
        name = resolve_backend(backend, codebook.device.type, (z_like, codebook))
        self.op = _op_for(name)
        self.scan = codebook.device.type != "meta" and not torch.compiler.is_compiling()
        self.flagged = load_flagged_op(name) if self.scan else None
        # [max |codebook|, max |z| of scale 0, of scale 1, ...] as 0-d float64 device tensors.
        self.extremes: List[torch.Tensor] = []
        self.codebook_max: List[torch.Tensor] = []
        if self.scan and self.flagged is None:
            self.codebook_max.append(torch.stack(torch.aminmax(codebook)).abs().amax().double())

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        """z [N, D] fp32 -> indices [N] int64."""
        if z.shape[0] == 0:
            return torch.empty((0,), dtype=torch.int64, device=z.device)
        if self.flagged is not None:
            indices, _, _, extremes = self.flagged(z, self.codebook, self.metric, self.precision)
            self.extremes.append(extremes[0])
            if not self.codebook_max:  # every launch reads the same codebook: its first report will do
                self.codebook_max.append(extremes[1])
            return indices
        if self.scan:
            self.extremes.append(torch.stack(torch.aminmax(z)).abs().amax().double())
        return self.op(z, self.codebook, self.metric, self.precision)[0]

    def finish(self) -> bool:
        """Read the test back (one sync). Raises on NaN/Inf; True when the values are so large that
        fp32 squared distances could overflow and the pass must run again with a float64 search."""
        if not self.scan:
            return False
        if not self.codebook_max:  # a flagged op that never ran (no rows at any scale)
            self.codebook_max.append(torch.stack(torch.aminmax(self.codebook)).abs().amax().double())
        extremes = torch.stack(self.codebook_max + self.extremes).tolist()  # [codebook, scale 0, scale 1, ...]
        for i, m in enumerate(extremes):
            if not math.isfinite(m):
                what = "embedding.weight (the codebook)" if i == 0 else (
                    f"the residual searched at scale {i - 1} (the input f_BChw, or values the quant_resi "
                    f"convolutions produced from it)")
                raise ValueError(f"{what} holds NaN or Inf: the nearest codeword is undefined there. "
                                 f"Check the encoder output and the quantizer's parameters for non-finite values")
        dtype = torch.float64 if self.codebook.dtype == torch.float64 else torch.float32
        largest = max(range(len(extremes)), key=extremes.__getitem__)
        name = "embedding.weight (the codebook)" if largest == 0 else f"the residual searched at scale {largest - 1}"
        return needs_float64(extremes[largest], self.codebook.shape[1], dtype, name)


def _compiler_disabled(fn):
    """torch.compiler.disable(fn), applied at the first call: the decorator imports torch._dynamo
    (about 2 s), which a process that never trains a multi-scale quantizer should not pay at import."""
    disabled = None

    @functools.wraps(fn)
    def call(*args, **kwargs):
        nonlocal disabled
        if disabled is None:
            disabled = torch.compiler.disable(fn)
        return disabled(*args, **kwargs)

    return call


# ---- the quantizer ----------------------------------------------------------------------------------
class VARQuantizer(nn.Module):
    """VAR's multi-scale residual quantizer, codebook ``embedding`` [vocab_size, Cvae]; see the module docstring."""

    def __init__(
        self,
        vocab_size: int,
        Cvae: int,
        using_znorm: bool,
        beta: float = 0.25,
        default_qresi_counts: int = 0,
        v_patch_nums: Optional[Sequence[int]] = None,
        quant_resi: float = 0.5,
        share_quant_resi: int = 4,
        *,
        backend: str = "auto",
        precision: str = "exact",
    ):
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("Cvae", Cvae)):
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(using_znorm, (bool, int)):
            raise TypeError(f"using_znorm must be a bool, got {type(using_znorm).__name__}")
        for name, value in (("beta", beta), ("quant_resi", quant_resi)):
            if not _is_number(value) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        for name, value in (("default_qresi_counts", default_qresi_counts), ("share_quant_resi", share_quant_resi)):
            if not _is_int(value) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        problem = patch_nums_problem(v_patch_nums)
        if problem is not None:
            raise ValueError(problem)
        check_search_options(backend, precision)

        self.vocab_size: int = vocab_size
        self.Cvae: int = Cvae
        self.using_znorm = using_znorm
        self.v_patch_nums = v_patch_nums
        self.quant_resi_ratio = quant_resi

        def make_phi() -> nn.Module:
            return Phi(Cvae, quant_resi) if abs(quant_resi) > 1e-6 else nn.Identity()

        # Built before the codebook, as VAR does, so that one seed gives VAR's parameters.
        if share_quant_resi == 0:
            self.quant_resi = PhiNonShared([make_phi() for _ in range(default_qresi_counts or len(v_patch_nums))])
        elif share_quant_resi == 1:
            self.quant_resi = PhiShared(make_phi())
        else:
            self.quant_resi = PhiPartiallyShared(nn.ModuleList([make_phi() for _ in range(share_quant_resi)]))
        self.register_buffer("ema_vocab_hit_SV", torch.full((len(v_patch_nums), vocab_size), fill_value=0.0))
        self.record_hit = 0
        self.beta: float = beta
        self.embedding = nn.Embedding(vocab_size, Cvae)  # N(0, 1)
        # VAR's progressive-training hook: when >= 0, the passes stop after that scale.
        self.prog_si = -1
        self.set_search_options(backend, precision)

    def set_search_options(self, backend: str = "auto", precision: str = "exact") -> None:
        """The nearest-codeword backend ("auto", "cpu", "cuda", "triton", "torch") and precision
        ("exact" or "fast") of every scale's search."""
        check_search_options(backend, precision)
        self.vqfast_backend = backend
        self.vqfast_precision = precision

    def eini(self, eini: float) -> None:
        """Re-initialise the codebook: truncated N(0, eini^2) for eini > 0, uniform +-|eini|/vocab_size for eini < 0."""
        if eini > 0:
            nn.init.trunc_normal_(self.embedding.weight.data, std=eini)
        elif eini < 0:
            self.embedding.weight.data.uniform_(-abs(eini) / self.vocab_size, abs(eini) / self.vocab_size)

    def extra_repr(self) -> str:
        return (f"vocab_size={self.vocab_size}, Cvae={self.Cvae}, v_patch_nums={tuple(self.v_patch_nums)}, "
                f"using_znorm={self.using_znorm}, beta={self.beta}, quant_resi={self.quant_resi_ratio}, "
                f"backend={self.vqfast_backend!r}, precision={self.vqfast_precision!r}")

    # ---- extension points ---------------------------------------------------------------------------
    def scale_search(self, search: Search) -> Search:
        """The search of one pass over the scales: residual rows [N, Cvae] fp32 -> indices [N] int64.
        ``search`` is the nearest codeword of each row in ``embedding.weight``; override to wrap or
        replace it (called once at the start of every pass)."""
        return search

    def updates_vocab_hits(self) -> bool:
        """Whether a training forward updates ema_vocab_hit_SV and record_hit."""
        return True

    # ---- the scale loop shared by forward and f_to_idxBl_or_fhat -------------------------------------
    def _residual_pass(self, f: torch.Tensor, patch_hws: List[Tuple[int, int]], with_loss: bool, stop_after: int):
        """f [B, Cvae, H, W] fp32 -> (indices per scale [B*ph*pw], cumulative f_hat after each scale, loss or None).

        Scales after ``stop_after`` (when >= 0) are skipped. The loss is VAR's mean over all
        len(patch_hws) scales of beta * mse(f_hat.detach(), f) + mse(f_hat, f.detach()).
        """
        searches = ScaleSearches(self.embedding.weight.detach(), "cosine" if self.using_znorm else "l2",
                                 self.vqfast_precision, self.vqfast_backend, f.shape[0] * f.shape[2] * f.shape[3])
        out = self._scale_loop(f, patch_hws, with_loss, stop_after, self.scale_search(searches))
        if searches.finish():  # values beyond fp32's safe range: search again in float64
            cb64 = self.embedding.weight.detach().double()

            def search64(z: torch.Tensor) -> torch.Tensor:
                return nearest_codeword(z.double(), cb64, metric=searches.metric, precision=self.vqfast_precision,
                                        backend=self.vqfast_backend)[0]

            out = self._scale_loop(f, patch_hws, with_loss, stop_after, self.scale_search(search64))
        return out

    def _scale_loop(self, f: torch.Tensor, patch_hws: List[Tuple[int, int]], with_loss: bool, stop_after: int,
                    search: Search):
        """One pass of ``_residual_pass`` with ``search`` (rows [N, Cvae] fp32 -> indices [N])."""
        B, C, H, W = f.shape
        f_no_grad = f.detach()
        f_rest = f_no_grad.clone()
        f_hat = torch.zeros_like(f_rest)
        SN = len(patch_hws)
        loss = 0.0
        idx_list, f_hat_list = [], []
        for si, (ph, pw) in enumerate(patch_hws):
            if 0 <= stop_after < si:
                break
            last = si == SN - 1
            z = f_rest if last else F.interpolate(f_rest, size=(ph, pw), mode="area")
            z_NC = z.permute(0, 2, 3, 1).reshape(-1, C)
            idx_N = search(z_NC)
            if self.using_znorm:  # VAR's argmax over an all-zero cosine row is code 0
                idx_N = idx_N.masked_fill(z_NC.eq(0).all(1), 0)
            # The codewords enter channels-last ([B, ph, pw, C] permuted), as in VAR: the bicubic
            # kernel follows the memory format, and this keeps its rounding VAR's.
            h = self.embedding(idx_N.view(B, ph, pw)).permute(0, 3, 1, 2)
            if not last:
                h = F.interpolate(h, size=(H, W), mode="bicubic")
            h = self.quant_resi[si / (SN - 1)](h.contiguous())
            f_hat = f_hat + h
            f_rest.sub_(h.detach())
            if with_loss:
                loss = loss + (F.mse_loss(f_hat.detach(), f).mul_(self.beta) + F.mse_loss(f_hat, f_no_grad))
            idx_list.append(idx_N)
            f_hat_list.append(f_hat)
        if with_loss:
            loss = loss * (1.0 / SN)
        return idx_list, f_hat_list, loss if with_loss else None

    # ---- VAR's methods ------------------------------------------------------------------------------
    def forward(
        self, f_BChw: torch.Tensor, ret_usages: bool = False
    ) -> Tuple[torch.Tensor, Optional[List[float]], torch.Tensor]:
        """f_BChw [B, Cvae, H, W] (H = W = v_patch_nums[-1]) -> (f_hat [B, Cvae, H, W] fp32, usages,
        mean_vq_loss [])."""
        pn_last = self.v_patch_nums[-1]
        _check_feature_map(f_BChw, self.Cvae, (pn_last, pn_last))
        if f_BChw.dtype != torch.float32:
            f_BChw = f_BChw.float()
        with torch.autocast("cuda", enabled=False):
            idx_list, f_hats, mean_vq_loss = self._residual_pass(
                f_BChw, [(pn, pn) for pn in self.v_patch_nums], with_loss=True, stop_after=-1)
            f_hat = (f_hats[-1].detach() - f_BChw.detach()).add_(f_BChw)
        if self.training:
            self._record_hits(idx_list)
        usages = None
        if ret_usages:
            world = tdist.get_world_size() if tdist.is_available() and tdist.is_initialized() else 1
            margin = world * (f_BChw.numel() / f_BChw.shape[1]) / self.vocab_size * 0.08
            usages = [u * 100 for u in (self.ema_vocab_hit_SV >= margin).float().mean(1).tolist()]
        return f_hat, usages, mean_vq_loss

    @_compiler_disabled
    def _record_hits(self, idx_list: List[torch.Tensor]) -> None:
        """VAR's per-scale code-hit bookkeeping of a training forward (ema_vocab_hit_SV, record_hit)."""
        if not self.updates_vocab_hits():
            return
        # VAR's idx.bincount(minlength=vocab_size).float(), as a scatter: bincount sizes its output from
        # idx.max(), a host sync on a GPU; the counts are integers, exact in float32 in any order.
        hits = [self.ema_vocab_hit_SV.new_zeros(self.vocab_size, dtype=torch.float32).index_add_(
            0, idx, idx.new_ones(idx.shape, dtype=torch.float32)) for idx in idx_list]
        if tdist.is_available() and tdist.is_initialized():  # one all_reduce per scale, VAR's collectives
            for work in [tdist.all_reduce(hit_V, async_op=True) for hit_V in hits]:
                work.wait()
        for si, hit_V in enumerate(hits):
            if self.record_hit == 0:
                self.ema_vocab_hit_SV[si].copy_(hit_V)
            elif self.record_hit < 100:
                self.ema_vocab_hit_SV[si].mul_(0.9).add_(hit_V.mul(0.1))
            else:
                self.ema_vocab_hit_SV[si].mul_(0.99).add_(hit_V.mul(0.01))
            self.record_hit += 1

    def f_to_idxBl_or_fhat(
        self, f_BChw: torch.Tensor, to_fhat: bool, v_patch_nums: Optional[Sequence[Union[int, Tuple[int, int]]]] = None
    ) -> List[torch.Tensor]:
        """f_BChw [B, Cvae, H, W] -> per scale: indices [B, ph*pw] int64, or (to_fhat) the cumulative
        f_hat [B, Cvae, H, W] fp32 after that scale. Stops after scale ``prog_si`` when it is >= 0.
        A non-fp32 input is cast to fp32, as forward does."""
        patch_hws = _patch_hws(v_patch_nums or self.v_patch_nums)
        _check_feature_map(f_BChw, self.Cvae, patch_hws[-1])
        if f_BChw.dtype != torch.float32:
            f_BChw = f_BChw.float()
        idx_list, f_hats, _ = self._residual_pass(f_BChw, patch_hws, with_loss=False, stop_after=self.prog_si)
        if to_fhat:
            return f_hats
        return [idx.reshape(f_BChw.shape[0], ph * pw) for idx, (ph, pw) in zip(idx_list, patch_hws)]

    def _check_index_list(self, name: str, idx_list: object, count: int) -> int:
        """idx_list: at least max(count, 1) index tensors [B, pn*pn] (int64 or int32) for the first scales -> B."""
        if not isinstance(idx_list, (list, tuple)) or len(idx_list) < max(count, 1):
            raise ValueError(f"{name} must be a list of at least {max(count, 1)} index tensors [B, pn*pn], "
                             f"one per scale")
        batch = idx_list[0].shape[0] if isinstance(idx_list[0], torch.Tensor) and idx_list[0].dim() == 2 else None
        for si in range(max(count, 1)):
            t, pn = idx_list[si], self.v_patch_nums[si]
            if (not isinstance(t, torch.Tensor) or t.dtype not in (torch.int64, torch.int32)
                    or tuple(t.shape) != (batch, pn * pn)):
                got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name}[{si}] must be an integer tensor [B, {pn * pn}] (scale {pn}x{pn}) with the "
                                 f"batch size of {name}[0], got {got}")
        return batch

    def idxBl_to_var_input(self, gt_ms_idx_Bl: List[torch.Tensor]) -> Optional[torch.Tensor]:
        """Indices per scale [B, pn*pn] -> VAR's teacher-forcing input [B, L - v_patch_nums[0]**2, Cvae] fp32:
        after each scale but the last, the cumulative f_hat area-downsampled to the next scale's side."""
        SN = len(self.v_patch_nums)
        # Under progressive training (prog_si >= 0) only the first prog_si scales are read.
        used = SN - 1 if self.prog_si < 0 else min(SN - 1, self.prog_si)
        B = self._check_index_list("gt_ms_idx_Bl", gt_ms_idx_Bl, used)
        C, HW = self.Cvae, self.v_patch_nums[-1]
        f_hat = gt_ms_idx_Bl[0].new_zeros(B, C, HW, HW, dtype=torch.float32)
        next_scales = []
        for si in range(SN - 1):
            if self.prog_si == 0 or 0 <= self.prog_si - 1 < si:
                break
            pn = self.v_patch_nums[si]
            h = self.embedding(gt_ms_idx_Bl[si]).transpose_(1, 2).view(B, C, pn, pn)
            f_hat.add_(self.quant_resi[si / (SN - 1)](F.interpolate(h, size=(HW, HW), mode="bicubic")))
            pn_next = self.v_patch_nums[si + 1]
            nxt = F.interpolate(f_hat, size=(pn_next, pn_next), mode="area")
            next_scales.append(nxt.view(B, C, -1).transpose(1, 2))
        return torch.cat(next_scales, dim=1) if next_scales else None

    def embed_to_fhat(
        self, ms_h_BChw: List[torch.Tensor], all_to_max_scale: bool = True, last_one: bool = False
    ) -> Union[List[torch.Tensor], torch.Tensor]:
        """Codewords per scale [B, Cvae, pn, pn] -> f_hat after each scale ([B, Cvae, H, W], H = v_patch_nums[-1]),
        or only the last one (last_one). all_to_max_scale=False (VAR: experimental) grows f_hat
        scale by scale instead: bicubic_up(f_hat, pn) + Phi(h) at each side pn."""
        SN = len(self.v_patch_nums)
        if not isinstance(ms_h_BChw, (list, tuple)) or len(ms_h_BChw) < SN or not all(
                isinstance(h, torch.Tensor) and h.dim() == 4 for h in ms_h_BChw[:SN]):
            raise ValueError(f"ms_h_BChw must be a list of {SN} tensors [B, Cvae, pn, pn], one per scale")
        B, HW = ms_h_BChw[0].shape[0], self.v_patch_nums[-1]
        outs = []
        if all_to_max_scale:
            f_hat = ms_h_BChw[0].new_zeros(B, self.Cvae, HW, HW, dtype=torch.float32)
            for si in range(SN):
                h = ms_h_BChw[si]
                if si < SN - 1:
                    h = F.interpolate(h, size=(HW, HW), mode="bicubic")
                f_hat.add_(self.quant_resi[si / (SN - 1)](h))
                outs.append(f_hat if last_one else f_hat.clone())
        else:
            pn0 = self.v_patch_nums[0]
            f_hat = ms_h_BChw[0].new_zeros(B, self.Cvae, pn0, pn0, dtype=torch.float32)
            for si, pn in enumerate(self.v_patch_nums):
                f_hat = F.interpolate(f_hat, size=(pn, pn), mode="bicubic")
                f_hat.add_(self.quant_resi[si / (SN - 1)](ms_h_BChw[si]))
                outs.append(f_hat)
        return outs[-1] if last_one else outs

    def get_next_autoregressive_input(
        self, si: int, SN: int, f_hat: torch.Tensor, h_BChw: torch.Tensor
    ) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
        """VAR's sampler step: f_hat [B, Cvae, H, W] += Phi(bicubic_up(h_BChw [B, Cvae, pn, pn])) in place;
        returns (f_hat, f_hat area-downsampled to the next scale's side), or (f_hat, f_hat) at the last scale."""
        HW = self.v_patch_nums[-1]
        if si != SN - 1:
            f_hat.add_(self.quant_resi[si / (SN - 1)](F.interpolate(h_BChw, size=(HW, HW), mode="bicubic")))
            pn_next = self.v_patch_nums[si + 1]
            return f_hat, F.interpolate(f_hat, size=(pn_next, pn_next), mode="area")
        f_hat.add_(self.quant_resi[si / (SN - 1)](h_BChw))
        return f_hat, f_hat
