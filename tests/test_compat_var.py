"""vqfast.compat.var.VectorQuantizer2 (VAR's multi-scale quantizer) and vqfast.accelerate on a VAR-shaped
class, against an independent oracle written here from VAR's documented semantics (../shared REFERENCE
sections 2 and 6): plain torch, nearest codewords by argmin over explicit float64 distances (argmax of the
float64 cosine with using_znorm), its own Phi and tick rule, its own scale loop and hit bookkeeping.

VAR itself is not installable: ``StandIn`` below has VAR's constructor, attribute names and state_dict
layout and the oracle's forward, and is registered as ``vqfast_test_var.models.quant.VectorQuantizer2``,
a module path that vqfast.accelerate recognises as VAR's (a vendored ``models/quant.py``).

Tolerances follow the house rule: vqfast's fp32 result may be at most twice as far from the float64
oracle as the oracle's own fp32 run (plus two fp32 ulps of the magnitude, for exactly representable
results); indices must agree exactly.
"""
from __future__ import annotations

import copy
import datetime
import os
import sys
import types

import numpy as np
import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import vqfast
from tests.helpers import end_gloo_worker
from vqfast.compat.var import VectorQuantizer2
from vqfast.multiscale import VARQuantizer

VAR_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
EPS32 = torch.finfo(torch.float32).eps


# ---- the oracle -------------------------------------------------------------------------------------
def oracle_ticks(count: int) -> list[float]:
    lo = 1 / (3 * count) if count == 4 else 1 / (2 * count)
    return np.linspace(lo, 1 - lo, count).tolist()


def oracle_phi_index(si: int, num_scales: int, count: int) -> int:
    t = si / (num_scales - 1)
    gaps = [abs(x - t) for x in oracle_ticks(count)]
    return gaps.index(min(gaps))  # the first on exact ties, as numpy's argmin


def oracle_nearest(rows: torch.Tensor, weight: torch.Tensor, znorm: bool) -> torch.Tensor:
    """[N, C], [V, C] -> [N]: argmin of the explicit float64 squared distance, or argmax of the float64
    cosine (the first index on ties, as torch's argmin / argmax)."""
    a, e = rows.detach().double(), weight.detach().double()
    if znorm:
        a = a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)
        e = e / e.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return (a @ e.T).argmax(1)
    return ((a[:, None, :] - e[None, :, :]) ** 2).sum(-1).argmin(1)


def oracle_pass(f, weight, phi_of_scale, patch_hws, beta, znorm):
    """f [B, C, H, W] -> (indices per scale [B*ph*pw], f_hat after each scale, loss).

    phi_of_scale(si, SN) -> callable h -> Phi(h). f keeps its autograd link (the loss's beta term)."""
    B, C, H, W = f.shape
    rest = f.detach().clone()
    f_hat = torch.zeros_like(rest)
    SN = len(patch_hws)
    loss, indices, f_hats = 0.0, [], []
    for si, (ph, pw) in enumerate(patch_hws):
        last = si == SN - 1
        z = rest if last else F.interpolate(rest, size=(ph, pw), mode="area")
        idx = oracle_nearest(z.permute(0, 2, 3, 1).reshape(-1, C), weight, znorm)
        h = weight[idx].reshape(B, ph, pw, C).permute(0, 3, 1, 2)
        if not last:
            h = F.interpolate(h, size=(H, W), mode="bicubic")
        h = phi_of_scale(si, SN)(h)
        f_hat = f_hat + h
        rest = rest - h.detach()
        loss = loss + beta * F.mse_loss(f_hat.detach(), f) + F.mse_loss(f_hat, f.detach())
        indices.append(idx)
        f_hats.append(f_hat)
    return indices, f_hats, loss / SN


def oracle_phi(h, weight, bias, r):
    return (1 - r) * h + r * F.conv2d(h, weight, bias, padding=1)


def oracle_phis_from_state(params: dict, share: int, r: float, count: int):
    """Phi of each sharing mode from state_dict-named tensors -> phi_of_scale(si, SN)."""
    if abs(r) <= 1e-6:
        return lambda si, SN: (lambda h: h)
    prefix = {0: "quant_resi.{}.", 1: "quant_resi.qresi."}.get(share, "quant_resi.qresi_ls.{}.")

    def phi_of_scale(si, SN):
        p = prefix.format(oracle_phi_index(si, SN, count))
        return lambda h: oracle_phi(h, params[p + "weight"], params[p + "bias"], abs(r))

    return phi_of_scale


def oracle_record_hits(ema: torch.Tensor, record_hit: int, indices, vocab_size: int) -> tuple[torch.Tensor, int]:
    """VAR's bookkeeping, one scale at a time: copy, then 0.9 / 0.1 below 100 counted scales, then 0.99 / 0.01."""
    ema = ema.clone()
    for si, idx in enumerate(indices):
        hits = torch.bincount(idx, minlength=vocab_size).float()
        if record_hit == 0:
            ema[si] = hits
        elif record_hit < 100:
            ema[si] = ema[si] * 0.9 + hits * 0.1
        else:
            ema[si] = ema[si] * 0.99 + hits * 0.01
        record_hit += 1
    return ema, record_hit


def oracle_usages(ema: torch.Tensor, rows_per_scale_input: int, vocab_size: int, world: int = 1) -> list[float]:
    margin = world * rows_per_scale_input / vocab_size * 0.08
    return [100.0 * float((row >= margin).float().mean()) for row in ema]


# ---- a VAR-shaped stand-in with the oracle's forward ------------------------------------------------
class _Phi(nn.Conv2d):
    def __init__(self, c: int, r: float):
        super().__init__(c, c, kernel_size=3, padding=1)
        self.r = abs(r)

    def forward(self, h):
        return oracle_phi(h, self.weight, self.bias, self.r)


class _OneShared(nn.Module):
    def __init__(self, phi):
        super().__init__()
        self.qresi = phi

    def __getitem__(self, t):
        return self.qresi


class _ByTick(nn.Module):
    def __init__(self, phis):
        super().__init__()
        self.qresi_ls = nn.ModuleList(phis)

    def __getitem__(self, t):
        gaps = [abs(x - t) for x in oracle_ticks(len(self.qresi_ls))]
        return self.qresi_ls[gaps.index(min(gaps))]


class _PerScale(nn.ModuleList):
    def __getitem__(self, t):
        gaps = [abs(x - t) for x in oracle_ticks(len(self))]
        return list(self.children())[gaps.index(min(gaps))]


class _VarDistFlag:
    """Stands in for VAR's dist.py, whose initialized() gates the hit bookkeeping."""

    def __init__(self):
        self.on = False

    def initialized(self):
        return self.on


class StandIn(nn.Module):
    """VAR's VectorQuantizer2 layout (constructor, attributes, state_dict, draw order) with the oracle's forward."""

    def __init__(self, vocab_size, Cvae, using_znorm, beta=0.25, default_qresi_counts=0, v_patch_nums=None,
                 quant_resi=0.5, share_quant_resi=4):
        super().__init__()
        self.vocab_size, self.Cvae, self.using_znorm, self.v_patch_nums = vocab_size, Cvae, using_znorm, v_patch_nums
        self.quant_resi_ratio = quant_resi

        def make():
            return _Phi(Cvae, quant_resi) if abs(quant_resi) > 1e-6 else nn.Identity()

        if share_quant_resi == 0:
            self.quant_resi = _PerScale([make() for _ in range(default_qresi_counts or len(v_patch_nums))])
        elif share_quant_resi == 1:
            self.quant_resi = _OneShared(make())
        else:
            self.quant_resi = _ByTick([make() for _ in range(share_quant_resi)])
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(v_patch_nums), vocab_size))
        self.record_hit = 0
        self.beta = beta
        self.embedding = nn.Embedding(vocab_size, Cvae)
        self.prog_si = -1

    def forward(self, f_BChw, ret_usages=False):
        f = f_BChw.float()
        indices, f_hats, loss = oracle_pass(f, self.embedding.weight, lambda si, SN: self.quant_resi[si / (SN - 1)],
                                            [(p, p) for p in self.v_patch_nums], self.beta, self.using_znorm)
        if self.training and FAKE_VAR.dist.initialized():
            ema, self.record_hit = oracle_record_hits(self.ema_vocab_hit_SV, self.record_hit, indices, self.vocab_size)
            self.ema_vocab_hit_SV.copy_(ema)
        usages = oracle_usages(self.ema_vocab_hit_SV, f.numel() // f.shape[1], self.vocab_size) if ret_usages else None
        return f_hats[-1].detach() - f.detach() + f, usages, loss


def _register(module_name: str, cls: type) -> types.ModuleType:
    parts = module_name.split(".")
    for i in range(1, len(parts) + 1):
        sys.modules.setdefault(".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    module = sys.modules[module_name]
    cls.__module__, cls.__name__, cls.__qualname__ = module_name, "VectorQuantizer2", "VectorQuantizer2"
    module.VectorQuantizer2 = cls
    return module


FAKE_VAR = _register("vqfast_test_var.models.quant", StandIn)
FAKE_VAR.dist = _VarDistFlag()
# The stand-in runs the oracle, not VAR's source: vqfast cannot recognise it by content, so the tests
# convert it at their word, as a user would a modified copy.
TRUST = {StandIn: "var"}


class LookAlike(StandIn):
    """The same class name and layout in a module that is not VAR's models/quant.py."""


_register("someproject.quantizers", LookAlike)


@pytest.fixture(autouse=True)
def _var_dist_off():
    FAKE_VAR.dist.on = False
    yield
    FAKE_VAR.dist.on = False


# ---- helpers ------------------------------------------------------------------------------------------
def make_pair(vocab_size=48, Cvae=6, using_znorm=False, v_patch_nums=(1, 2, 3, 5), seed=0, **kw):
    """(compat, stand-in) built from one seed: VAR's draw order gives both the same parameters."""
    torch.manual_seed(seed)
    compat = VectorQuantizer2(vocab_size, Cvae, using_znorm, v_patch_nums=v_patch_nums, **kw)
    torch.manual_seed(seed)
    stand_in = StandIn(vocab_size, Cvae, using_znorm, v_patch_nums=v_patch_nums, **kw)
    return compat, stand_in


def phi_count(share: int, default_qresi_counts: int, num_scales: int) -> int:
    return {0: default_qresi_counts or num_scales, 1: 1}.get(share, share)


def reference_run(module, f, dtype, share, r, count):
    """The oracle on ``module``'s parameters in ``dtype``: (out, loss, indices, f_hats, grad of f, grads by name)."""
    params = {k: v.detach().to(dtype).requires_grad_(True) for k, v in module.named_parameters()}
    x = f.detach().to(dtype).requires_grad_(True)
    hws = [(p, p) for p in module.v_patch_nums]
    indices, f_hats, loss = oracle_pass(x, params["embedding.weight"], oracle_phis_from_state(params, share, r, count),
                                        hws, module.beta, module.using_znorm)
    out = f_hats[-1].detach() - x.detach() + x
    (out.square().mean() + loss).backward()
    return out, loss, indices, f_hats, x.grad, {k: p.grad for k, p in params.items()}


def module_run(module, f, ret_usages=False):
    module.zero_grad(set_to_none=True)
    x = f.detach().clone().requires_grad_(True)
    out, usages, loss = module(x, ret_usages=ret_usages)
    (out.square().mean() + loss).backward()
    named = getattr(module, "_orig_mod", module).named_parameters()  # a compiled module's own names
    return out, usages, loss, x.grad, {k: p.grad for k, p in named}


def assert_near_reference(got, base, ref, what=""):
    """|got - ref| <= 2 |base - ref| + 2 ulp(fp32) of |ref|: got no worse than a plain fp32 run of the oracle."""
    ref = ref.detach().double()
    err = (got.detach().double() - ref).abs().max().item() if ref.numel() else 0.0
    base_err = (base.detach().double() - ref).abs().max().item() if ref.numel() else 0.0
    bound = 2 * base_err + 2 * EPS32 * (ref.abs().max().item() if ref.numel() else 0.0)
    assert err <= bound, f"{what}: error {err:.3g} vs the fp32 oracle's {base_err:.3g} (bound {bound:.3g})"


def check_against_oracle(module, f, share, r, count):
    """module's forward (indices through f_to_idxBl_or_fhat) against the fp64 oracle and its fp32 run."""
    ref = reference_run(module, f, torch.float64, share, r, count)
    base = reference_run(module, f, torch.float32, share, r, count)
    out, _, loss, grad_f, grads = module_run(module, f)
    assert out.dtype == torch.float32 and out.shape == f.shape and loss.shape == ()
    assert_near_reference(out, base[0], ref[0], "f_hat")
    assert_near_reference(loss, base[1], ref[1], "loss")
    assert_near_reference(grad_f, base[4], ref[4], "grad of f")
    assert set(grads) == set(ref[5])
    for name in grads:
        if ref[5][name] is None:  # a Phi that no scale picks
            assert grads[name] is None, name
            continue
        assert_near_reference(grads[name], base[5][name], ref[5][name], f"grad of {name}")
    with torch.no_grad():
        idx = module.f_to_idxBl_or_fhat(f, to_fhat=False)
        f_hats = module.f_to_idxBl_or_fhat(f, to_fhat=True)
    B = f.shape[0]
    for si, p in enumerate(module.v_patch_nums):
        assert idx[si].shape == (B, p * p) and idx[si].dtype == torch.int64
        assert torch.equal(idx[si].reshape(-1), base[2][si]), f"scale {si}: indices differ from the oracle"
        assert torch.equal(base[2][si], ref[2][si]), "the test's data has a near-tie: pick another seed"
        assert_near_reference(f_hats[si], base[3][si], ref[3][si], f"f_hat after scale {si}")
    return idx


# ---- construction, state_dict, Phi selection ---------------------------------------------------------
def test_phi_tick_rule():
    # The documented table: ten scales, four shared Phis.
    assert [oracle_phi_index(si, 10, 4) for si in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    for share, counts in ((0, (0, 3, 7)), (1, (0,)), (2, (0,)), (3, (0,)), (4, (0,)), (6, (0,))):
        for default_qresi_counts in counts:
            for pns in ((1, 2), (1, 2, 3), (1, 2, 3, 4, 5), VAR_PATCH_NUMS, tuple(range(1, 14))):
                m = VectorQuantizer2(8, 2, False, default_qresi_counts=default_qresi_counts, v_patch_nums=pns,
                                     share_quant_resi=share)
                count = phi_count(share, default_qresi_counts, len(pns))
                convs = [c for c in m.quant_resi.modules() if isinstance(c, nn.Conv2d)]
                assert len(convs) == count
                SN = len(pns)
                for si in range(SN):
                    assert m.quant_resi[si / (SN - 1)] is convs[oracle_phi_index(si, SN, count)], (share, pns, si)
    # An exact tie (two Phis, three scales: t = 0.5 between ticks 0.25 and 0.75) goes to the first.
    m = VectorQuantizer2(8, 2, False, v_patch_nums=(1, 2, 3), share_quant_resi=2)
    assert m.quant_resi[0.5] is m.quant_resi.qresi_ls[0]


@pytest.mark.parametrize("share,default_qresi_counts,quant_resi,keys", [
    (0, 0, 0.5, [f"quant_resi.{i}.{w}" for i in range(4) for w in ("weight", "bias")]),
    (0, 2, 0.5, [f"quant_resi.{i}.{w}" for i in range(2) for w in ("weight", "bias")]),
    (1, 0, 0.5, ["quant_resi.qresi.weight", "quant_resi.qresi.bias"]),
    (4, 0, 0.5, [f"quant_resi.qresi_ls.{i}.{w}" for i in range(4) for w in ("weight", "bias")]),
    (3, 0, -0.25, [f"quant_resi.qresi_ls.{i}.{w}" for i in range(3) for w in ("weight", "bias")]),
    (4, 0, 0.0, []),
])
def test_state_dict_layout_and_strict_round_trip(share, default_qresi_counts, quant_resi, keys):
    compat, stand_in = make_pair(v_patch_nums=(1, 2, 3, 5), share_quant_resi=share,
                                 default_qresi_counts=default_qresi_counts, quant_resi=quant_resi)
    expected = ["ema_vocab_hit_SV"] + keys + ["embedding.weight"]
    assert list(compat.state_dict()) == expected == list(stand_in.state_dict())
    assert compat.ema_vocab_hit_SV.shape == (4, 48) and not compat.ema_vocab_hit_SV.any()
    # One seed, VAR's order of draws: the same parameters as the stand-in.
    for (k, a), b in zip(compat.state_dict().items(), stand_in.state_dict().values()):
        assert torch.equal(a, b), k
    # Strict loads both ways.
    torch.manual_seed(5)
    other = StandIn(48, 6, False, v_patch_nums=(1, 2, 3, 5), share_quant_resi=share,
                    default_qresi_counts=default_qresi_counts, quant_resi=quant_resi)
    other.ema_vocab_hit_SV.uniform_()
    compat.load_state_dict(other.state_dict(), strict=True)
    stand_in.load_state_dict(compat.state_dict(), strict=True)
    for (k, a), b in zip(other.state_dict().items(), stand_in.state_dict().values()):
        assert torch.equal(a, b), k
    attrs = ("vocab_size", "Cvae", "using_znorm", "v_patch_nums", "quant_resi_ratio", "beta", "record_hit", "prog_si")
    assert {a: getattr(compat, a) for a in attrs} == {a: getattr(stand_in, a) for a in attrs}


def test_codebook_init_is_standard_normal():
    m = VectorQuantizer2(4096, 32, False, v_patch_nums=VAR_PATCH_NUMS)
    w = m.embedding.weight
    # 131072 draws: the sample mean and std of N(0, 1) are within 0.01 (3.6 sigma) of 0 and 1.
    assert abs(w.mean().item()) < 0.01 and abs(w.std().item() - 1) < 0.01
    m.eini(-1.0)
    assert w.abs().max().item() <= 1 / 4096
    m.eini(0.02)
    assert w.abs().max().item() <= 2.0 and abs(w.std().item() - 0.02) < 0.001


@pytest.mark.parametrize("kwargs,match", [
    (dict(vocab_size=0), "vocab_size"),
    (dict(Cvae=2.0), "Cvae"),
    (dict(using_znorm="yes"), "using_znorm"),
    (dict(v_patch_nums=None), "v_patch_nums"),
    (dict(v_patch_nums=(16,)), "at least two"),
    (dict(v_patch_nums=(1, 0, 2)), "positive"),
    (dict(beta=float("nan")), "beta"),
    (dict(share_quant_resi=-1), "share_quant_resi"),
    (dict(backend="gpu"), "backend"),
    (dict(precision="approx"), "precision"),
])
def test_constructor_rejects_bad_arguments(kwargs, match):
    args = dict(vocab_size=16, Cvae=4, using_znorm=False, v_patch_nums=(1, 2))
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        VectorQuantizer2(**args)


# ---- forward and f_to_idxBl_or_fhat against the oracle ----------------------------------------------------
@pytest.mark.parametrize("share", [0, 1, 3, 4])
@pytest.mark.parametrize("using_znorm", [False, True], ids=["l2", "znorm"])
def test_forward_matches_oracle(share, using_znorm):
    pns = (1, 2, 3, 5, 7)
    compat, _ = make_pair(vocab_size=53, Cvae=6, using_znorm=using_znorm, v_patch_nums=pns, share_quant_resi=share,
                          quant_resi=0.5 if share != 3 else -0.4, seed=share)
    f = torch.randn(3, 6, 7, 7)
    check_against_oracle(compat, f, share, compat.quant_resi_ratio, phi_count(share, 0, len(pns)))


@pytest.mark.parametrize("pns,quant_resi,default_qresi_counts", [
    (VAR_PATCH_NUMS, 0.5, 0),      # VAR's ten scales, latents 16 x 16
    ((2, 4), 0.0, 0),              # two scales, Phi the identity
    ((1, 1, 3), 0.7, 5),           # a repeated side; more per-scale Phis than scales
    ((3, 2, 6), 0.5, 2),           # a coarser scale after a finer one
])
def test_odd_patch_nums_match_oracle(pns, quant_resi, default_qresi_counts):
    share = 0
    compat, _ = make_pair(vocab_size=97, Cvae=4, v_patch_nums=pns, share_quant_resi=share, quant_resi=quant_resi,
                          default_qresi_counts=default_qresi_counts)
    f = torch.randn(2, 4, pns[-1], pns[-1])
    idx = check_against_oracle(compat, f, share, quant_resi, phi_count(share, default_qresi_counts, len(pns)))
    assert sum(i.shape[1] for i in idx) == sum(p * p for p in pns)


def test_f_to_idxBl_or_fhat_rectangular_scales_override_and_prog_si():
    compat, _ = make_pair(vocab_size=40, Cvae=5, v_patch_nums=(1, 2, 4))
    f = torch.randn(2, 5, 4, 6)
    hws = [(1, 1), (2, 3), (4, 6)]  # (h, w) pairs, as VAR's callers may pass for non-square latents
    runs = {}
    for dtype in (torch.float64, torch.float32):
        params = {k: v.detach().to(dtype) for k, v in compat.named_parameters()}
        runs[dtype] = oracle_pass(f.to(dtype), params["embedding.weight"], oracle_phis_from_state(params, 4, 0.5, 4),
                                  hws, 0.25, False)
    with torch.no_grad():
        idx = compat.f_to_idxBl_or_fhat(f, False, v_patch_nums=hws)
        fh = compat.f_to_idxBl_or_fhat(f, True, v_patch_nums=hws)
    assert [i.shape for i in idx] == [(2, 1), (2, 6), (2, 24)]
    for si in range(3):
        assert torch.equal(idx[si].reshape(-1), runs[torch.float32][0][si])
        assert torch.equal(runs[torch.float64][0][si], runs[torch.float32][0][si])
        assert_near_reference(fh[si], runs[torch.float32][1][si], runs[torch.float64][1][si], f"f_hat {si}")
    # Progressive training: prog_si = s stops after scale s.
    compat.prog_si = 1
    assert len(compat.f_to_idxBl_or_fhat(f, False, v_patch_nums=hws)) == 2
    compat.prog_si = -1
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        compat.f_to_idxBl_or_fhat(f, False)  # the last scale (4, 4) does not cover 4 x 6
    with pytest.raises(ValueError, match="v_patch_nums"):
        compat.f_to_idxBl_or_fhat(f, False, v_patch_nums=[(1, 1), (4, 6, 1)])


def oracle_decode(weight, phi_of_scale, idx, pns, side):
    """Indices per scale -> (teacher-forcing input [B, L - pns[0]^2, C], f_hat after each scale,
    VAR's experimental scale-by-scale f_hat) in weight's dtype."""
    B, C, SN = idx[0].shape[0], weight.shape[1], len(pns)
    ms_h = [weight[i].reshape(B, p, p, C).permute(0, 3, 1, 2) for i, p in zip(idx, pns)]
    f_hat, f_hats, var_input = torch.zeros(B, C, side, side, dtype=weight.dtype), [], []
    for si, h in enumerate(ms_h):
        up = h if si == SN - 1 else F.interpolate(h, size=(side, side), mode="bicubic")
        f_hat = f_hat + phi_of_scale(si, SN)(up)
        f_hats.append(f_hat)
        if si < SN - 1:
            nxt = pns[si + 1]
            var_input.append(F.interpolate(f_hat, size=(nxt, nxt), mode="area").reshape(B, C, -1).transpose(1, 2))
    grown = torch.zeros(B, C, pns[0], pns[0], dtype=weight.dtype)
    for si, p in enumerate(pns):
        grown = F.interpolate(grown, size=(p, p), mode="bicubic") + phi_of_scale(si, SN)(ms_h[si])
    return torch.cat(var_input, 1), f_hats, grown


def test_decoding_paths_match_oracle():
    pns = (1, 2, 3, 5)
    compat, _ = make_pair(vocab_size=31, Cvae=4, v_patch_nums=pns, share_quant_resi=2)
    f = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        idx = compat.f_to_idxBl_or_fhat(f, False)
        enc_fhats = compat.f_to_idxBl_or_fhat(f, True)
        ref, base = [oracle_decode(compat.embedding.weight.to(dt),
                                   oracle_phis_from_state({k: v.to(dt) for k, v in compat.named_parameters()},
                                                          2, 0.5, 2),
                                   idx, pns, 5) for dt in (torch.float64, torch.float32)]
        # Teacher-forcing input: after each scale but the last, f_hat area-downsampled to the next side.
        var_input = compat.idxBl_to_var_input(idx)
        assert var_input.shape == (2, sum(p * p for p in pns[1:]), 4) and var_input.dtype == torch.float32
        assert_near_reference(var_input, base[0], ref[0], "idxBl_to_var_input")
        # Decoding the full index list gives the encoder's f_hat after every scale.
        ms_h = [compat.embedding(i).transpose(1, 2).reshape(2, 4, p, p) for i, p in zip(idx, pns)]
        decoded = compat.embed_to_fhat(ms_h)
        for si in range(len(pns)):
            assert_near_reference(decoded[si], base[1][si], ref[1][si], f"embed_to_fhat scale {si}")
            assert_near_reference(enc_fhats[si], base[1][si], ref[1][si], f"encoder f_hat scale {si}")
        assert torch.equal(compat.embed_to_fhat(ms_h, last_one=True), decoded[-1])
        # The sampler's step does the same, one scale at a time, in place.
        f_hat = torch.zeros(2, 4, 5, 5)
        for si, h in enumerate(ms_h):
            out, nxt = compat.get_next_autoregressive_input(si, len(pns), f_hat, h)
            assert out is f_hat
            assert_near_reference(f_hat, base[1][si], ref[1][si], f"sampler f_hat scale {si}")
            side = pns[min(si + 1, len(pns) - 1)]
            assert nxt.shape == (2, 4, side, side)
        # VAR's experimental path: f_hat grows scale by scale, bicubic_up(f_hat) + Phi(h).
        grown = compat.embed_to_fhat(ms_h, all_to_max_scale=False, last_one=True)
        assert_near_reference(grown, base[2], ref[2], "embed_to_fhat(all_to_max_scale=False)")
    compat.prog_si = 2  # reads only the first prog_si scales' indices
    assert compat.idxBl_to_var_input(idx[:2]).shape == (2, 4 + 9, 4)
    compat.prog_si = -1
    with pytest.raises(ValueError, match=r"gt_ms_idx_Bl\[1\]"):
        compat.idxBl_to_var_input([idx[0], idx[2], idx[2]])


# ---- the hit bookkeeping and usages ------------------------------------------------------------------------
def test_vocab_hits_follow_var_schedule_and_usages():
    pns = (1, 2, 4)
    compat, _ = make_pair(vocab_size=24, Cvae=3, v_patch_nums=pns)
    compat.train()
    ema, record_hit = compat.ema_vocab_hit_SV.clone(), 0
    gen = torch.Generator().manual_seed(3)
    for step in range(6):
        if step == 3:  # past the schedule's boundary without 97 calls: the counter is a plain attribute
            compat.record_hit = record_hit = 98
        f = torch.randn(4, 3, 4, 4, generator=gen)
        _, usages, _ = compat(f, ret_usages=True)
        with torch.no_grad():
            idx = [i.reshape(-1) for i in compat.f_to_idxBl_or_fhat(f, False)]
        ema, record_hit = oracle_record_hits(ema, record_hit, idx, 24)
        assert compat.record_hit == record_hit
        assert torch.equal(compat.ema_vocab_hit_SV, ema)
        assert usages == oracle_usages(ema, 4 * 16, 24)
    # record_hit counts scales, not calls (VAR's quirk): three scales per call.
    assert record_hit == 98 + 3 * 3
    # Evaluation leaves the statistics alone.
    compat.eval()
    before = compat.ema_vocab_hit_SV.clone()
    compat(torch.randn(2, 3, 4, 4))
    assert torch.equal(compat.ema_vocab_hit_SV, before) and compat.record_hit == record_hit
    assert compat(torch.randn(2, 3, 4, 4))[1] is None


def test_first_call_copies_scale_zero_only():
    # VAR's quirk: the copy happens for record_hit == 0, i.e. the first scale of the first call; the
    # other scales of that call already blend 0.1 of their hits into the zero-initialised buffer.
    compat, _ = make_pair(vocab_size=12, Cvae=3, v_patch_nums=(1, 2, 3))
    compat.train()
    f = torch.randn(2, 3, 3, 3)
    compat(f)
    with torch.no_grad():
        idx = [i.reshape(-1) for i in compat.f_to_idxBl_or_fhat(f, False)]
    hits = [torch.bincount(i, minlength=12).float() for i in idx]
    assert torch.equal(compat.ema_vocab_hit_SV[0], hits[0])
    assert torch.equal(compat.ema_vocab_hit_SV[1], hits[1] * 0.1)
    assert torch.equal(compat.ema_vocab_hit_SV[2], hits[2] * 0.1)


def test_no_process_group_counts_as_world_size_one():
    # VAR's forward calls torch.distributed.get_world_size() and so needs a process group; vqfast
    # reads the world size only for the usages and takes 1 without a group.
    assert not (tdist.is_available() and tdist.is_initialized())
    compat, _ = make_pair(vocab_size=10, Cvae=2, v_patch_nums=(1, 2))
    compat.eval()
    compat.ema_vocab_hit_SV.fill_(2 * 4 / 10 * 0.08)  # exactly the margin at world size 1, B = 2
    compat.ema_vocab_hit_SV[1, :5] = 0
    _, usages, _ = compat(torch.randn(2, 2, 2, 2), ret_usages=True)
    assert usages == [100.0, 50.0]


# ---- precision, dtypes, compile ---------------------------------------------------------------------------------
def test_expanded_formula_misses_the_nearest_codeword_vqfast_does_not():
    # Codewords within 0.01 of a feature vector of magnitude ~300: ||z||^2 ~ 1.5e5 in fp32 has an ulp of
    # 0.016, more than the spread of the true distances (<= 1e-3), so VAR's expanded formula
    # ||z||^2 + ||e||^2 - 2 z.e ranks by rounding noise.
    gen = torch.Generator().manual_seed(1)
    z0 = torch.tensor([300.3, 100.1, -200.7, 50.2])
    compat = VectorQuantizer2(64, 4, False, v_patch_nums=(1, 1))
    with torch.no_grad():
        compat.embedding.weight.copy_(z0 + 0.01 * torch.rand(64, 4, generator=gen))
    weight = compat.embedding.weight.detach()
    expanded = (z0 * z0).sum() + (weight * weight).sum(1) - 2 * (weight @ z0)
    true = ((z0.double() - weight.double()) ** 2).sum(1)
    assert expanded.argmin() != true.argmin(), "construction failed: the expanded formula found the nearest"
    with torch.no_grad():
        idx = compat.f_to_idxBl_or_fhat(z0.reshape(1, 4, 1, 1), False)
    assert idx[0].item() == true.argmin().item()


def test_znorm_reconstructs_with_raw_codewords_and_zero_rows_take_code_zero():
    compat, _ = make_pair(vocab_size=20, Cvae=4, using_znorm=True, v_patch_nums=(1, 2), quant_resi=0.0)
    with torch.no_grad():
        compat.embedding.weight.mul_(torch.linspace(0.1, 5, 20)[:, None])  # norms differ: cosine != L2
        f = torch.randn(2, 4, 2, 2)
        fh = compat.f_to_idxBl_or_fhat(f, True)
        idx = compat.f_to_idxBl_or_fhat(f, False)
        W = compat.embedding.weight
        first = F.interpolate(W[idx[0]].reshape(2, 1, 1, 4).permute(0, 3, 1, 2), size=(2, 2), mode="bicubic")
        torch.testing.assert_close(fh[0], first, rtol=0, atol=0)
        rows = F.interpolate(f, size=(1, 1), mode="area").reshape(2, 4)
        assert torch.equal(idx[0].reshape(-1), oracle_nearest(rows, W, True))
        assert not torch.equal(oracle_nearest(rows, W, True), oracle_nearest(rows, W, False)), "L2 would agree: no test"
        # An all-zero feature row has cosine 0 with every codeword: VAR's argmax gives code 0.
        assert compat.f_to_idxBl_or_fhat(torch.zeros(1, 4, 2, 2), False)[0].item() == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_compute_in_fp32(dtype):
    compat, _ = make_pair(vocab_size=30, Cvae=4, v_patch_nums=(1, 2, 4))
    f = torch.randn(2, 4, 4, 4).to(dtype)
    x = f.clone().requires_grad_(True)
    out, _, loss = compat(x)
    (out.square().mean() + loss).backward()
    x32 = f.float().requires_grad_(True)
    out32, _, loss32 = compat(x32)
    (out32.square().mean() + loss32).backward()
    assert out.dtype == torch.float32 and loss.dtype == torch.float32 and x.grad.dtype == dtype
    assert torch.equal(out, out32) and torch.equal(loss, loss32) and torch.equal(x.grad, x32.grad.to(dtype))
    idx = compat.f_to_idxBl_or_fhat(f, False)
    assert all(torch.equal(a, b) for a, b in zip(idx, compat.f_to_idxBl_or_fhat(f.float(), False)))


def test_torch_compile_forward_matches_eager_without_recompiling():
    torch._dynamo.reset()
    eager, _ = make_pair(vocab_size=33, Cvae=4, v_patch_nums=(1, 3))
    twin = copy.deepcopy(eager)
    # aot_eager: Dynamo's capture and AOTAutograd's backward without inductor's C++ compile time.
    compiled = torch.compile(twin, backend="aot_eager")
    eager.train(), twin.train()
    gen = torch.Generator().manual_seed(2)
    # Tolerances of tests/test_compile.py: the traced graph may order fp32 operations differently
    # (an ulp or two); the indices, hence the codewords, are the same.
    tol = dict(rtol=1e-5, atol=1e-7)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):  # record_hit counts up: the compiled graph must not depend on it
            f = torch.randn(2, 4, 3, 3, generator=gen)
            a, b = module_run(eager, f), module_run(compiled, f)
            for x, y in ((a[0], b[0]), (a[2], b[2]), (a[3], b[3])):
                torch.testing.assert_close(y, x, **tol)
            for name in a[4]:
                torch.testing.assert_close(b[4][name], a[4][name], **tol)
    assert torch.equal(eager.ema_vocab_hit_SV, twin.ema_vocab_hit_SV) and eager.record_hit == twin.record_hit == 6
    # In eval the whole forward is one graph.
    torch._dynamo.reset()
    twin.eval(), eager.eval()
    full = torch.compile(twin, backend="aot_eager", fullgraph=True)
    f = torch.randn(2, 4, 3, 3, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(full(f)[0], eager(f)[0], **tol)


# ---- bad input -------------------------------------------------------------------------------------------------------
def test_non_finite_values_raise_naming_where():
    compat, _ = make_pair(vocab_size=16, Cvae=3, v_patch_nums=(1, 2, 3))
    f = torch.randn(2, 3, 3, 3)
    bad = f.clone()
    bad[1, 0, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="scale 0"):
        compat(bad)
    with pytest.raises(ValueError, match="scale 0"):
        compat.f_to_idxBl_or_fhat(bad, False)
    broken = copy.deepcopy(compat)
    with torch.no_grad():
        broken.quant_resi.qresi_ls[0].weight[0, 0, 1, 1] = float("inf")  # Phi of scale 0 poisons scale 1
    with pytest.raises(ValueError, match="scale 1"):
        broken.f_to_idxBl_or_fhat(f, False)
    with torch.no_grad():
        compat.embedding.weight[3, 1] = float("nan")
    with pytest.raises(ValueError, match="embedding.weight"):
        compat(f)
    ok, _ = make_pair(vocab_size=16, Cvae=3, v_patch_nums=(1, 2, 3))
    for args, match in (((torch.randn(2, 4, 3, 3),), "Cvae=3"), ((torch.randn(2, 3, 4, 4),), r"\(H, W\)"),
                        ((torch.ones(2, 3, 3, 3, dtype=torch.int64),), "floating"), (([1.0],), "torch.Tensor")):
        with pytest.raises((ValueError, TypeError), match=match):
            ok(*args)


def test_values_beyond_fp32_range_search_in_float64(monkeypatch):
    # |x| ~ 1e20: squared distances overflow fp32 (3.4e38); the pass is searched again in float64
    # through the public, fully checked vqfast.nearest_codeword (as it would itself switch to float64).
    import vqfast.multiscale as var_module

    searched = []

    def spy(z, codebook, **kw):
        searched.append((z.dtype, codebook.dtype))
        return vqfast.nearest_codeword(z, codebook, **kw)

    monkeypatch.setattr(var_module, "nearest_codeword", spy)
    compat, _ = make_pair(vocab_size=16, Cvae=3, v_patch_nums=(1, 2), quant_resi=0.0)
    with torch.no_grad():
        f = torch.randn(2, 3, 2, 2)
        compat.f_to_idxBl_or_fhat(f, False)
        assert searched == []  # ordinary values: one pass, no float64 search
        compat.embedding.weight.mul_(1e20)
        idx = compat.f_to_idxBl_or_fhat(f * 1e20, False)
        ref, _, _ = oracle_pass(f * 1e20, compat.embedding.weight, lambda si, SN: (lambda h: h), [(1, 1), (2, 2)],
                                0.25, False)
    assert searched == [(torch.float64, torch.float64)] * 2
    for a, b in zip(idx, ref):
        assert torch.equal(a.reshape(-1), b)


def test_no_vocab_sized_matrix():
    # N = 2 * 8 * 8 = 128 rows at the last scale against V = 4096 codes: no tensor of N x V / 8 elements or more.
    compat, _ = make_pair(vocab_size=4096, Cvae=4, v_patch_nums=(1, 2, 4, 8))
    compat.train()
    f = torch.randn(2, 4, 8, 8, requires_grad=True)
    sizes = []

    class Watch(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    sizes.append(t.numel())
            return out

    with Watch():
        out, _, loss = compat(f, ret_usages=True)
        (out.square().mean() + loss).backward()
    assert max(sizes) < 128 * 4096 // 8, max(sizes)


# ---- vqfast.accelerate on a VAR-shaped model ---------------------------------------------------------------------
class Tokenizer(nn.Module):
    """A model holding VAR's quantizer under VAR's attribute name, as VAR's VQVAE does."""

    def __init__(self, quantize: nn.Module):
        super().__init__()
        self.quant_conv = nn.Conv2d(4, 4, 1)
        self.quantize = quantize

    def forward(self, x):
        return self.quantize(self.quant_conv(x))


def test_accelerate_replaces_var_in_place_and_matches_oracle(capsys):
    pns = (1, 2, 3, 5)
    torch.manual_seed(0)
    model = Tokenizer(StandIn(37, 4, False, v_patch_nums=pns, share_quant_resi=3))
    reference = copy.deepcopy(model)
    q = model.quantize
    params_before = {k: id(v) for k, v in model.named_parameters()}
    ema_before = q.ema_vocab_hit_SV
    out_model = vqfast.accelerate(model, verbose=True, trust=TRUST)
    assert out_model is model and model.quantize is q
    assert isinstance(q, VectorQuantizer2) and isinstance(q, StandIn)
    assert {k: id(v) for k, v in model.named_parameters()} == params_before and q.ema_vocab_hit_SV is ema_before
    assert (q.vqfast_backend, q.vqfast_precision) == ("auto", "exact")
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == ["vqfast.accelerate: quantize: VAR VectorQuantizer2 replaced (backend='auto', precision='exact'): "
                     "trusted, trust= names vqfast_test_var.models.quant.VectorQuantizer2 as 'var'"]
    # The same outputs and gradients as the stand-in (the oracle's forward), and as the fp64 oracle.
    f = torch.randn(2, 4, 5, 5)
    a, b = module_run(model.quantize, f, True), module_run(reference.quantize, f, True)
    check_against_oracle(q, f, 3, 0.5, 3)
    for x, y in ((a[0], b[0]), (a[2], b[2]), (a[3], b[3])):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    assert a[1] == b[1]
    # Calling accelerate again is harmless and takes the new options.
    vqfast.accelerate(model, backend="torch", precision="exact", verbose=True)
    assert "already accelerated (backend='torch'" in capsys.readouterr().out
    assert type(q).__mro__[1:4] == (VectorQuantizer2, VARQuantizer, StandIn)  # not wrapped twice
    check_against_oracle(q, f, 3, 0.5, 3)


def test_accelerated_hit_bookkeeping_follows_var_dist_flag():
    torch.manual_seed(0)
    stand_in = StandIn(21, 3, False, v_patch_nums=(1, 2, 4))
    reference = copy.deepcopy(stand_in)
    q = vqfast.accelerate(stand_in, trust=TRUST)
    assert isinstance(q, VectorQuantizer2)
    q.train(), reference.train()
    gen = torch.Generator().manual_seed(9)
    for step in range(4):
        FAKE_VAR.dist.on = step >= 2  # VAR updates only once its dist module is initialised
        f = torch.randn(3, 3, 4, 4, generator=gen)
        _, usages, _ = q(f, ret_usages=True)
        _, ref_usages, _ = reference(f, ret_usages=True)
        assert torch.equal(q.ema_vocab_hit_SV, reference.ema_vocab_hit_SV) and q.record_hit == reference.record_hit
        assert usages == ref_usages
    assert q.record_hit == 6


def test_accelerate_leaves_look_alikes_and_unsupported_instances(capsys):
    look = LookAlike(16, 4, False, v_patch_nums=(1, 2))
    odd = StandIn(16, 4, False, v_patch_nums=(1, 2))
    del odd.prog_si
    single = StandIn(16, 4, False, v_patch_nums=(1, 2))
    single.v_patch_nums = (2,)
    model = nn.ModuleDict({"look": look, "odd": odd, "single": single})
    vqfast.accelerate(model, verbose=True, trust=TRUST)
    out = capsys.readouterr().out
    assert type(look) is LookAlike and type(odd) is StandIn and type(single) is StandIn
    assert "look: someproject.quantizers.VectorQuantizer2 left: not a class vqfast recognises" in out
    assert "odd: VAR VectorQuantizer2 left on its original code: it has no attribute 'prog_si'" in out
    assert "single: VAR VectorQuantizer2 left on its original code: v_patch_nums must hold at least two" in out


def test_accelerated_model_trains_copies_and_pickles(tmp_path):
    torch.manual_seed(0)
    model = Tokenizer(StandIn(29, 4, False, v_patch_nums=(1, 2, 4), share_quant_resi=0))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # built before accelerate: it keeps the same tensors
    reference = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    vqfast.accelerate(model, trust=TRUST)
    assert isinstance(model.quantize, VectorQuantizer2)
    model.train(), reference.train()
    gen = torch.Generator().manual_seed(4)
    for _ in range(3):
        x = torch.randn(2, 4, 4, 4, generator=gen)
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad()
            out, _, loss = m(x)
            (out.square().mean() + loss).backward()
            o.step()
    for (k, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)
    x = torch.randn(2, 4, 4, 4, generator=gen)
    model.eval()
    expected = model(x)[0]
    twin = copy.deepcopy(model)
    assert type(twin.quantize) is type(model.quantize) and twin.quantize.vqfast_backend == "auto"
    assert torch.equal(twin(x)[0], expected)
    path = tmp_path / "model.pt"
    torch.save(model, path)
    loaded = torch.load(path, weights_only=False)  # the test's own file
    assert type(loaded.quantize) is type(model.quantize)
    assert torch.equal(loaded(x)[0], expected)
    # A checkpoint of the original class loads strictly into the direct compat class.
    compat = VectorQuantizer2(29, 4, False, v_patch_nums=(1, 2, 4), share_quant_resi=0)
    compat.load_state_dict(reference.quantize.state_dict(), strict=True)


# ---- torch.distributed ----------------------------------------------------------------------------------------------
def _rank_worker(rank, init_file, out_dir, batch):
    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                             timeout=datetime.timedelta(seconds=60))
    try:
        torch.manual_seed(0)
        q = VectorQuantizer2(19, 3, False, v_patch_nums=(1, 2, 4))
        q.train()
        usages = []
        for step in range(3):
            x = batch[step][rank * 2:(rank + 1) * 2]
            usages.append(q(x, ret_usages=True)[1])
        torch.save({"ema": q.ema_vocab_hit_SV, "record_hit": q.record_hit, "usages": usages},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        tdist.destroy_process_group()
    end_gloo_worker()


@pytest.mark.slow
def test_two_gloo_ranks_share_hit_counts(tmp_path):
    gen = torch.Generator().manual_seed(6)
    batch = [torch.randn(4, 3, 4, 4, generator=gen) for _ in range(3)]
    mp.spawn(_rank_worker, args=(str(tmp_path / "init"), str(tmp_path), batch), nprocs=2, join=True)
    torch.manual_seed(0)
    single = VectorQuantizer2(19, 3, False, v_patch_nums=(1, 2, 4))
    single.train()
    usages = [single(x, ret_usages=True)[1] for x in batch]
    for r in range(2):
        state = torch.load(tmp_path / f"rank{r}.pt")
        # All-reduced hits: every rank holds the statistics of the whole batch (sums of integers: exact).
        assert torch.equal(state["ema"], single.ema_vocab_hit_SV) and state["record_hit"] == single.record_hit
        # The usages margin counts the world size: 2 ranks x 2 images = 1 process x 4 images.
        assert state["usages"] == usages
