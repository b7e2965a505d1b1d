"""vqfast.compat.llamagen and vqfast.entropy against LlamaGen's tokenizer quantizer.

LlamaGen is not installable from the registry, so the reference is an oracle written from its documented
semantics (tests/fixtures/llamagen_oracle.py): the same constructor, attributes, state_dict and outputs,
building the N x K distance matrix and the N x K softmax of the entropy loss as LlamaGen does. Parity
tests give the oracle a float64 search (the truly nearest codeword), so that indices must agree; one test
shows LlamaGen's own expanded fp32 search missing the nearest codeword where vqfast finds it.

Tolerances from a baseline (docs/testing.md): where sums are added in another order (the chunked entropy
loss and its gradients), vqfast's error against the oracle run in float64 is at most twice the fp32
oracle's own error, plus a floor of a few fp32 ulps of the value.
"""
import copy
import pickle

import pytest
import torch
import torch.nn as nn

import vqfast
from tests.fixtures import llamagen_oracle as oracle
from tests.helpers import MaxNumel
from vqfast.compat import accelerated_class
from vqfast.compat.llamagen import USAGE_WINDOW, VectorQuantizer
from vqfast.entropy import entropy_loss

BACKENDS = vqfast.available_backends("cpu")
EPS32 = torch.finfo(torch.float32).eps


def _close_to_baseline(ours, refs32, ref64, what):
    """|ours - ref64| <= 2 max_r |ref32_r - ref64| + 8 eps32 max|ref64| (max norms over the tensor), the
    baseline taken over fp32 runs of the materialised computation that round differently (features or
    rows in another order, one row at a time): one run alone is sometimes lucky by 50x on a scalar."""
    ours, ref64 = ours.detach().double(), ref64.detach().double()
    assert ours.shape == ref64.shape, what
    baseline = max((r.detach().double() - ref64).abs().max().item() for r in refs32)
    floor = 8 * EPS32 * ref64.abs().max().item()
    err = (ours - ref64).abs().max().item()
    assert err <= 2 * baseline + floor, f"{what}: error {err:.3g} vs fp32 baseline {baseline:.3g} (floor {floor:.3g})"


def _materialised_variants(z, e):
    """LlamaGen's entropy loss of -d(z, e), computed four ways that differ only in rounding."""
    loss = oracle.compute_entropy_loss
    dist = oracle.expanded_distances
    return [
        lambda: loss(-dist(z, e)),
        lambda: loss(-dist(z.flip(1), e.flip(1))),
        lambda: loss(-torch.cat([dist(z[i:i + 1], e) for i in range(z.shape[0])])),
        lambda: loss(-dist(z.flip(0), e).flip(0)),
    ]


def _make(*args, search="float64", **kwargs):
    """(ours, oracle) built from the same RNG state."""
    torch.manual_seed(0)
    ref = oracle.VectorQuantizer(*args, search=search, **kwargs)
    torch.manual_seed(0)
    ours = VectorQuantizer(*args, **kwargs)
    return ours, ref


def _run(module, x, g, seed=3):
    """One training-style call: outputs, the three losses, usage, indices, gradients of z and the codebook."""
    x = x.detach().clone().requires_grad_()
    module.embedding.weight.grad = None
    z_q, (vq_loss, commit_loss, ent, usage), (perp, enc, idx) = module(x)
    assert perp is None and enc is None
    total = (z_q * g).sum()
    for loss in (vq_loss, commit_loss, ent):
        if loss is not None:
            total = total + 3.0 * loss
    if total.requires_grad:
        total.backward()
    return {"z_q": z_q.detach(), "vq": vq_loss, "commit": commit_loss, "entropy": ent, "usage": usage,
            "idx": idx, "x_grad": x.grad, "w_grad": module.embedding.weight.grad}


# ---- construction and state ----------------------------------------------------------------------------
@pytest.mark.parametrize("l2_norm,show_usage", [(True, True), (False, False), (True, False)])
def test_constructor_attributes_init_and_state_dict(l2_norm, show_usage):
    ours, ref = _make(37, 5, 0.25, 0.1, l2_norm, show_usage)
    for name in ("n_e", "e_dim", "beta", "entropy_loss_ratio", "l2_norm", "show_usage"):
        assert getattr(ours, name) == getattr(ref, name), name
    assert isinstance(ours.embedding, nn.Embedding)
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert list(ours.state_dict()) == (["codebook_used"] if show_usage else []) + ["embedding.weight"]
    assert torch.equal(ours.embedding.weight, ref.embedding.weight)  # the same init from the same RNG state
    if show_usage:
        assert ours.codebook_used.shape == (USAGE_WINDOW,) == ref.codebook_used.shape
        assert not ours.codebook_used.any()
    if l2_norm:
        torch.testing.assert_close(ours.embedding.weight.norm(dim=1), torch.ones(37))
    else:
        assert ours.embedding.weight.abs().max() <= 1.0 / 37
    # A checkpoint of the original loads strictly, and back.
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(ours.state_dict(), strict=True)
    assert "entropy_loss_ratio=0.1" in repr(ours)


# ---- forward against the oracle ----------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("l2_norm,show_usage", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("shape,k", [((2, 8, 5, 3), 61), ((1, 3, 7, 1), 9)])
def test_training_at_ratio_0_matches_the_oracle(backend, l2_norm, show_usage, shape, k):
    ours, ref = _make(k, shape[1], 0.25, 0.0, l2_norm, show_usage)
    ours._vqfast_adopt(backend=backend)
    g = torch.Generator().manual_seed(1)
    for step in range(3):  # the usage buffer accumulates over calls
        x = torch.randn(*shape, generator=g)
        grad_out = torch.randn(shape[0], shape[1], shape[2], shape[3], generator=g)
        a, b = _run(ours, x, grad_out), _run(ref, x, grad_out)
        assert torch.equal(a["idx"], b["idx"])
        assert a["idx"].shape == (shape[0] * shape[2] * shape[3],) and a["idx"].dtype == torch.int64
        for key in ("z_q", "vq", "commit", "x_grad", "w_grad"):
            assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
            torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7, msg=key)
        assert a["z_q"].shape == shape
        # LlamaGen multiplies its (finite) entropy loss by 0: a zero, here computed without the N x K work.
        assert b["entropy"].item() == 0.0 and a["entropy"].item() == 0.0
        assert a["entropy"].dtype == b["entropy"].dtype
        assert a["usage"] == b["usage"] and isinstance(a["usage"], float) == isinstance(b["usage"], float)
        if show_usage:
            assert torch.equal(ours.codebook_used, ref.codebook_used)
            assert a["usage"] == len(set(ours.codebook_used.tolist())) / k


def _flipped(module, dim):
    """A copy of the oracle whose codebook has its features reversed (dim 1) or is itself (dim 3)."""
    twin = copy.deepcopy(module)
    if dim == 1:
        with torch.no_grad():
            twin.embedding.weight.copy_(twin.embedding.weight.flip(1))
    return twin


@pytest.mark.parametrize("l2_norm", [True, False])
def test_training_at_ratio_0_1_matches_the_oracle_loss_and_gradients(l2_norm):
    shape, k = (2, 6, 5, 7), 83
    ours, ref = _make(k, shape[1], 0.25, 0.1, l2_norm, True)
    if not l2_norm:  # spread the codes so that the softmax is not flat
        with torch.no_grad():
            w = torch.randn(k, shape[1]) * 0.3
            ours.embedding.weight.copy_(w)
            ref.embedding.weight.copy_(w)
    ref64 = copy.deepcopy(ref).double()
    variants = [_flipped(ref, 1), _flipped(ref, 3)]  # features reversed; rows (the width) reversed
    g = torch.Generator().manual_seed(5)
    x = torch.randn(*shape, generator=g) * 0.4
    grad_out = torch.randn(*shape, generator=g)
    a, b, c = _run(ours, x, grad_out), _run(ref, x, grad_out), _run(ref64, x.double(), grad_out.double())
    assert torch.equal(a["idx"], b["idx"]) and torch.equal(a["idx"], c["idx"])
    assert torch.equal(ours.codebook_used, ref.codebook_used) and a["usage"] == b["usage"]
    assert a["entropy"].dtype == torch.float32 and a["entropy"].shape == ()
    assert a["entropy"].item() != 0.0
    refs32 = [b]
    for dim, twin in zip((1, 3), variants):
        r = _run(twin, x.flip(dim), grad_out.flip(dim))
        refs32.append({"z_q": r["z_q"].flip(dim), "vq": r["vq"], "commit": r["commit"], "entropy": r["entropy"],
                       "x_grad": r["x_grad"].flip(dim), "w_grad": r["w_grad"].flip(1) if dim == 1 else r["w_grad"]})
    for key in ("z_q", "vq", "commit", "entropy", "x_grad", "w_grad"):
        _close_to_baseline(a[key], [r[key] for r in refs32], c[key], key)


def test_eval_returns_no_losses_and_leaves_the_usage_buffer():
    ours, ref = _make(40, 4, 0.25, 0.1, True, True)
    ours.eval(), ref.eval()
    x = torch.randn(3, 4, 2, 5)
    with MaxNumel() as mode:
        z_q, (vq_loss, commit_loss, ent, usage), (_, _, idx) = ours(x)
    assert mode.max_numel < x.numel() // 4 * 40  # no N x K tensor in eval either
    r = ref(x)
    assert (vq_loss, commit_loss, ent, usage) == (None, None, None, 0) and r[1] == (None, None, None, 0)
    assert torch.equal(idx, r[2][2]) and torch.equal(z_q, r[0])
    assert not ours.codebook_used.any()


@pytest.mark.parametrize("l2_norm", [True, False])
def test_get_codebook_entry(l2_norm):
    ours, ref = _make(29, 6, 0.25, 0.0, l2_norm, True)
    idx = torch.randint(0, 29, (2 * 3 * 4,))
    assert torch.equal(ours.get_codebook_entry(idx), ref.get_codebook_entry(idx))
    a = ours.get_codebook_entry(idx, shape=(2, 6, 3, 4))
    assert a.shape == (2, 6, 3, 4) and torch.equal(a, ref.get_codebook_entry(idx, shape=(2, 6, 3, 4)))
    b = ours.get_codebook_entry(idx, shape=(2, 3, 4, 6), channel_first=False)
    assert torch.equal(b, ref.get_codebook_entry(idx, shape=(2, 3, 4, 6), channel_first=False))
    # The forward's codes, read back from its indices.
    ours.eval()
    z_q, _, (_, _, ind) = ours(torch.randn(2, 6, 3, 4))
    torch.testing.assert_close(ours.get_codebook_entry(ind, shape=(2, 6, 3, 4)), z_q, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="shape must be"):
        ours.get_codebook_entry(idx, shape=(24, 6))


def test_more_rows_than_the_usage_window_keep_the_last_ones():
    ours = VectorQuantizer(5, 2, 0.25, 0.0, True, True)
    x = torch.randn(1, 2, 1, USAGE_WINDOW + 13)
    _, (_, _, _, usage), (_, _, idx) = ours(x)
    assert torch.equal(ours.codebook_used, idx[13:].float())
    assert usage == len(set(idx[13:].tolist())) / 5


def test_the_expanded_formula_misses_the_nearest_code_vqfast_finds_it():
    """Unit vectors 1e-3 apart: LlamaGen's fp32 sum z^2 + sum e^2 - 2 z.e (all near 1 and 2) keeps no
    digit of distances ~1e-6, so its argmin misses the nearest codeword on many rows; vqfast does not."""
    g = torch.Generator().manual_seed(7)
    centre = torch.randn(1, 8, generator=g)
    x = (centre + 1e-3 * torch.randn(64, 8, generator=g)).T.reshape(1, 8, 8, 8)
    ours, ref = _make(128, 8, 0.25, 0.0, True, False, search="expanded")
    with torch.no_grad():
        w = nn.functional.normalize(centre + 1e-3 * torch.randn(128, 8, generator=g), dim=1)
        ours.embedding.weight.copy_(w)
        ref.embedding.weight.copy_(w)
    ours.eval(), ref.eval()
    ours_idx, ref_idx = ours(x)[2][2], ref(x)[2][2]
    rows = nn.functional.normalize(x.permute(0, 2, 3, 1).reshape(-1, 8), dim=1)
    truth = oracle.float64_nearest(rows, w)
    assert torch.equal(ours_idx, truth)
    assert (ref_idx != truth).sum() >= 5


# ---- the fused entropy loss ------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,k,d,chunk", [(37, 53, 8, None), (37, 53, 8, 1), (100, 7, 3, 9), (5, 300, 2, 2)])
@pytest.mark.parametrize("normalised", [True, False])
def test_entropy_loss_value_and_gradients_against_the_materialised_one(n, k, d, chunk, normalised):
    g = torch.Generator().manual_seed(n + k)
    z64, e64 = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(k, d, generator=g, dtype=torch.float64)
    if normalised:
        z64, e64 = nn.functional.normalize(z64, dim=1), nn.functional.normalize(e64, dim=1)
    else:
        z64, e64 = 0.5 * z64, 0.5 * e64

    def run(dtype, pick):
        z, e = z64.to(dtype).clone().requires_grad_(), e64.to(dtype).clone().requires_grad_()
        loss = pick(z, e)
        loss.backward()
        return loss, z.grad, e.grad

    fused = run(torch.float32, lambda z, e: entropy_loss(z, e, chunk_rows=chunk))
    ref64 = run(torch.float64, lambda z, e: _materialised_variants(z, e)[0]())
    refs32 = [run(torch.float32, lambda z, e, i=i: _materialised_variants(z, e)[i]()) for i in range(4)]
    assert fused[0].dtype == torch.float32 and fused[0].shape == ()
    for i, what in enumerate(("value", "dL/dz", "dL/dcodebook")):
        _close_to_baseline(fused[i], [r[i] for r in refs32], ref64[i], what)


def test_entropy_loss_builds_no_n_by_k_tensor_forward_or_backward():
    n, k = 300, 2048
    z = nn.functional.normalize(torch.randn(n, 8), dim=1).requires_grad_()
    e = nn.functional.normalize(torch.randn(k, 8), dim=1).requires_grad_()
    with MaxNumel() as mode:
        entropy_loss(z, e, chunk_rows=100).backward()
    assert mode.max_numel == 100 * k


def test_entropy_loss_bad_input():
    z, e = torch.randn(4, 3), torch.randn(5, 3)
    with pytest.raises(ValueError, match="same D"):
        entropy_loss(z, torch.randn(5, 2))
    with pytest.raises(ValueError, match="temperature"):
        entropy_loss(z, e, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_rows"):
        entropy_loss(z, e, chunk_rows=0)
    with pytest.raises(ValueError, match="K >= 1"):
        entropy_loss(z, torch.randn(0, 3))
    with pytest.raises(TypeError, match="floating point"):
        entropy_loss(z.long(), e)


# ---- memory ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [0.0, 0.1])
def test_training_builds_no_n_by_k_tensor(ratio):
    n, k = 1024, 2048  # N x K = 2.1M elements
    vq = VectorQuantizer(k, 8, 0.25, ratio, True, True)
    x = torch.randn(1, 8, 32, 32, requires_grad=True)
    with MaxNumel() as mode:
        z_q, (vq_loss, commit_loss, ent, _), (_, _, idx) = vq(x)
        (z_q.square().mean() + vq_loss + commit_loss + ent).backward()
    assert idx.shape == (n,)
    if ratio == 0.0:
        # The largest tensors: the usage window (65536), the codebook and the rows (16384, 8192).
        assert mode.max_numel <= USAGE_WINDOW
    else:
        assert mode.max_numel < n * k  # one chunk of rows x K


# ---- conversion of LlamaGen's instances ------------------------------------------------------------------
def test_a_converted_instance_shares_its_tensors_and_trains_like_the_original():
    torch.manual_seed(0)
    ref = oracle.VectorQuantizer(50, 4, 0.25, 0.1, True, True, search="float64")
    converted = copy.deepcopy(ref)
    params = dict(converted.named_parameters())
    used = converted.codebook_used
    assert VectorQuantizer.unsupported_reason(converted) is None
    converted.__class__ = accelerated_class(VectorQuantizer, type(ref))
    converted._vqfast_adopt(backend="auto", precision="exact")
    assert isinstance(converted, oracle.VectorQuantizer) and isinstance(converted, VectorQuantizer)
    assert all(p is params[name] for name, p in converted.named_parameters())
    opt_a = torch.optim.SGD(converted.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(ref.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(2)
    for step in range(3):
        x = torch.randn(2, 4, 3, 3, generator=g)
        for m, opt in ((converted, opt_a), (ref, opt_b)):
            opt.zero_grad()
            z_q, (vq_loss, commit_loss, ent, usage), _ = m(x)
            (z_q.square().mean() + vq_loss + commit_loss + ent).backward()
            opt.step()
    assert converted.codebook_used is used  # LlamaGen's buffer (an nn.Parameter), updated in place
    for (name, a), b in zip(converted.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    clone = pickle.loads(pickle.dumps(converted))
    assert type(clone) is type(converted)


class _TinyVQModel(nn.Module):
    """LlamaGen's VQModel in miniature: quant_conv, quantize, post_quant_conv."""

    def __init__(self, quantize):
        super().__init__()
        self.quant_conv = nn.Conv2d(3, quantize.e_dim, 1)
        self.quantize = quantize
        self.post_quant_conv = nn.Conv2d(quantize.e_dim, 3, 1)

    def forward(self, x):
        quant, (vq_loss, commit_loss, ent, usage), _ = self.quantize(self.quant_conv(x))
        return self.post_quant_conv(quant), vq_loss + commit_loss + ent


def test_accelerate_converts_the_quantizer_inside_a_model(capsys):
    """The oracle is not LlamaGen's source, so accelerate needs the caller's word (trust=)."""
    torch.manual_seed(0)
    model = _TinyVQModel(oracle.VectorQuantizer(40, 4, 0.25, 0.1, True, True, search="float64"))
    twin = copy.deepcopy(model)
    vqfast.accelerate(model, verbose=True, trust={oracle.VectorQuantizer: "llamagen"})
    assert "quantize: LlamaGen VectorQuantizer replaced" in capsys.readouterr().out
    assert isinstance(model.quantize, VectorQuantizer) and isinstance(model.quantize, oracle.VectorQuantizer)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, twin)]
    g = torch.Generator().manual_seed(4)
    for step in range(2):
        x = torch.randn(2, 3, 4, 4, generator=g)
        for m, opt in zip((model, twin), opts):
            opt.zero_grad()
            rec, loss = m(x)
            (rec.square().mean() + loss).backward()
            opt.step()
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_unsupported_instances_say_why():
    ref = oracle.VectorQuantizer(10, 4, 0.25, 0.0, True, True)
    assert VectorQuantizer.unsupported_reason(ref) is None
    broken = copy.deepcopy(ref)
    del broken.entropy_loss_ratio
    assert "entropy_loss_ratio" in VectorQuantizer.unsupported_reason(broken)
    broken = copy.deepcopy(ref)
    broken.embedding = nn.Linear(4, 10)
    assert "nn.Embedding" in VectorQuantizer.unsupported_reason(broken)
    broken = copy.deepcopy(ref)
    broken.n_e = 11
    assert "(n_e, e_dim)" in VectorQuantizer.unsupported_reason(broken)
    broken = copy.deepcopy(ref)
    del broken.codebook_used
    assert "codebook_used" in VectorQuantizer.unsupported_reason(broken)


# ---- bad input ---------------------------------------------------------------------------------------------
def test_bad_constructor_arguments_and_input():
    with pytest.raises(ValueError, match="n_e must be a positive int"):
        VectorQuantizer(0, 8, 0.25, 0.0, True, True)
    with pytest.raises(ValueError, match="e_dim must be a positive int"):
        VectorQuantizer(16, 8.0, 0.25, 0.0, True, True)
    with pytest.raises(TypeError, match="beta must be a number"):
        VectorQuantizer(16, 8, "0.25", 0.0, True, True)
    with pytest.raises(TypeError, match="entropy_loss_ratio must be a number"):
        VectorQuantizer(16, 8, 0.25, None, True, True)
    with pytest.raises(TypeError, match="l2_norm must be a bool"):
        VectorQuantizer(16, 8, 0.25, 0.0, "yes", True)
    with pytest.raises(TypeError, match="show_usage must be a bool"):
        VectorQuantizer(16, 8, 0.25, 0.0, True, 1)
    with pytest.raises(ValueError, match="backend"):
        VectorQuantizer(16, 8, 0.25, 0.0, True, True, backend="gpu")
    with pytest.raises(ValueError, match="precision"):
        VectorQuantizer(16, 8, 0.25, 0.0, True, True, precision="approximate")
    vq = VectorQuantizer(16, 8, 0.25, 0.0, True, True)
    with pytest.raises(ValueError, match=r"z must be \[B, C, H, W\] with C = e_dim = 8"):
        vq(torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match="z must be"):
        vq(torch.randn(2, 8, 3))
    with pytest.raises(TypeError, match="z must be a torch.Tensor"):
        vq([1.0])
    with pytest.raises(ValueError, match="z"):
        vq(torch.full((1, 8, 2, 2), float("nan")))


@pytest.mark.slow
def test_torch_compile():
    """Eval (tokenising) compiles with fullgraph=True; training compiles with graph breaks (the usage
    count is a Python float from torch.unique, as in LlamaGen) and gives the eager values."""
    torch.manual_seed(0)
    vq = VectorQuantizer(64, 8, 0.25, 0.1, True, True)
    twin = copy.deepcopy(vq)
    x = torch.randn(2, 8, 4, 4)
    vq.eval()
    eager, compiled = vq(x), torch.compile(vq, fullgraph=True)(x)
    assert torch.equal(eager[2][2], compiled[2][2])
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-6, atol=1e-7)
    vq.train(), twin.train()
    g = torch.randn(2, 8, 4, 4)
    a, b = _run(torch.compile(vq), x, g), _run(twin, x, g)
    assert torch.equal(a["idx"], b["idx"]) and a["usage"] == b["usage"]
    for key in ("z_q", "vq", "commit", "entropy", "x_grad"):
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    torch.testing.assert_close(vq.embedding.weight.grad, twin.embedding.weight.grad, rtol=1e-5, atol=1e-6)
