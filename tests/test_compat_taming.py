"""vqfast.compat.taming and vqfast.accelerate against taming-transformers' quantizers.

taming's VectorQuantizer2 is not on the registry (its taming-transformers 0.0.1 holds only v1), so the
reference here is an oracle written from the documented semantics (REFERENCE.md section 6): the same
constructor, attributes, state_dict and outputs, with the search done by explicit float64 distances
and argmin. Stand-ins deriving from it are registered under taming's module path,
``taming.modules.vqvae.quantize``, so that ``vqfast.accelerate`` recognises them as it recognises the
real classes. v1 is also tested against the released taming-transformers 0.0.1 where it is installed
(scripts/install.py --test installs it without its dependencies).
"""
import copy
import io
import pickle
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn as nn

import vqfast
from vqfast.testing.oracle import distances as brute_force_fp64
from tests.helpers import MaxNumel
from vqfast.compat.taming import VectorQuantizer, VectorQuantizer2

BACKENDS = vqfast.available_backends("cpu")
TAMING_PATH = "taming.modules.vqvae.quantize"


# ---- the oracle ----------------------------------------------------------------------------------
def _fp64_nearest(flat: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return brute_force_fp64(flat.detach(), weight.detach()).argmin(1)


class OracleVectorQuantizer2(nn.Module):
    """taming's VectorQuantizer2 as documented, with an exact float64 search."""

    def __init__(self, n_e, e_dim, beta, remap=None, unknown_index="random", sane_index_shape=False, legacy=True):
        super().__init__()
        self.n_e, self.e_dim, self.beta, self.legacy = n_e, e_dim, beta, legacy
        self.embedding = nn.Embedding(n_e, e_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_e, 1.0 / n_e)
        self.remap = remap
        self.re_embed = n_e
        if remap is not None:
            self.register_buffer("used", torch.from_numpy(np.load(remap)))
            self.re_embed = len(self.used)
            self.unknown_index = unknown_index
            if unknown_index == "extra":
                self.unknown_index = self.re_embed
                self.re_embed += 1
        self.sane_index_shape = sane_index_shape

    def remap_to_used(self, inds):
        first = {}
        for pos, code in enumerate(self.used.tolist()):
            first.setdefault(int(code), pos)
        flat = inds.reshape(inds.shape[0], -1)
        new = torch.tensor([[first.get(v, -1) for v in row] for row in flat.tolist()], dtype=torch.int64)
        new = new.reshape(flat.shape).to(inds.device)
        unknown = new < 0
        if self.unknown_index == "random":
            draws = torch.randint(0, self.re_embed, (int(unknown.sum()),))
            new[unknown] = draws.to(new.device)
        else:
            new[unknown] = self.unknown_index
        return new.reshape(inds.shape)

    def unmap_to_all(self, inds):
        used = self.used.tolist()
        extra = self.re_embed > len(used)  # the "extra" index reads used[0]
        out = [used[0] if extra and v >= len(used) else used[v] for v in inds.reshape(-1).tolist()]
        return torch.tensor(out, dtype=inds.dtype, device=inds.device).reshape(inds.shape)

    def forward(self, z, temp=None, rescale_logits=False, return_logits=False):
        zc = z.permute(0, 2, 3, 1)
        b, h, w, c = zc.shape
        idx = _fp64_nearest(zc.reshape(-1, c), self.embedding.weight)
        z_q = self.embedding(idx).reshape(zc.shape)
        commit = torch.mean((z_q.detach() - zc) ** 2)
        codebook = torch.mean((z_q - zc.detach()) ** 2)
        loss = commit + self.beta * codebook if self.legacy else self.beta * commit + codebook
        out = (zc + (z_q - zc).detach()).permute(0, 3, 1, 2).contiguous()
        if self.remap is not None:
            idx = self.remap_to_used(idx.reshape(b, -1)).reshape(-1, 1)
        if self.sane_index_shape:
            idx = idx.reshape(b, h, w)
        return out, loss, (None, None, idx)

    def get_codebook_entry(self, indices, shape):
        if self.remap is not None:
            indices = self.unmap_to_all(indices.reshape(shape[0], -1)).reshape(-1)
        z_q = self.embedding.weight[indices]
        return z_q if shape is None else z_q.reshape(shape).permute(0, 3, 1, 2).contiguous()


class OracleVectorQuantizer(nn.Module):
    """taming's v1 VectorQuantizer as documented, with an exact float64 search."""

    def __init__(self, n_e, e_dim, beta):
        super().__init__()
        self.n_e, self.e_dim, self.beta = n_e, e_dim, beta
        self.embedding = nn.Embedding(n_e, e_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_e, 1.0 / n_e)

    def forward(self, z):
        zc = z.permute(0, 2, 3, 1)
        idx = _fp64_nearest(zc.reshape(-1, self.e_dim), self.embedding.weight)
        one_hot = nn.functional.one_hot(idx, self.n_e).to(z.dtype)
        z_q = (one_hot @ self.embedding.weight).reshape(zc.shape)
        loss = torch.mean((z_q.detach() - zc) ** 2) + self.beta * torch.mean((z_q - zc.detach()) ** 2)
        out = (zc + (z_q - zc).detach()).permute(0, 3, 1, 2).contiguous()
        p = one_hot.mean(0)
        perplexity = torch.exp(-(p * torch.log(p + 1e-10)).sum())
        return out, loss, (perplexity, one_hot, idx[:, None])

    def get_codebook_entry(self, indices, shape):
        z_q = self.embedding.weight[indices]
        return z_q if shape is None else z_q.reshape(shape).permute(0, 3, 1, 2).contiguous()


@pytest.fixture
def taming(monkeypatch):
    """A stand-in for taming.modules.vqvae.quantize holding classes that derive from the oracles."""
    mod = types.ModuleType(TAMING_PATH)
    for name, base in (("VectorQuantizer2", OracleVectorQuantizer2), ("VectorQuantizer", OracleVectorQuantizer)):
        setattr(mod, name, type(name, (base,), {"__module__": TAMING_PATH, "__qualname__": name}))
    for parent in ("taming", "taming.modules", "taming.modules.vqvae"):
        monkeypatch.setitem(sys.modules, parent, types.ModuleType(parent))
    monkeypatch.setitem(sys.modules, TAMING_PATH, mod)
    return mod


def _trust(taming) -> dict:
    """The stand-ins run the oracles, not taming's source: vqfast cannot recognise them by content, so
    the tests convert them at their word, as a user would a modified copy."""
    return {taming.VectorQuantizer2: "taming", taming.VectorQuantizer: "taming-v1"}


@pytest.fixture
def used_file(tmp_path):
    """Used codes, one duplicated (9), all below 60, as a .npy path."""
    path = tmp_path / "used.npy"
    np.save(path, np.array([4, 9, 1, 30, 9, 17, 2, 33, 0, 5, 6, 7, 41, 57], dtype=np.int64))
    return str(path)


def _spread(*modules):
    """Give every module the same N(0, 1) codebook, so that assignments are non-trivial."""
    w = torch.randn_like(modules[0].embedding.weight)
    with torch.no_grad():
        for m in modules:
            m.embedding.weight.copy_(w)


def _run(module, x, g, seed=11):
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(seed)
    z_q, loss, info = module(x)
    rng = torch.get_rng_state()
    ((z_q * g).sum() + 3.0 * loss).backward()
    return z_q.detach(), loss.detach(), info, x.grad, module.embedding.weight.grad, rng


def _assert_same_run(ours, ref, grad_w_rtol=1e-6):
    pairs = ((ours[0], ref[0], 1e-6), (ours[1], ref[1], 1e-6), (ours[3], ref[3], 1e-6), (ours[4], ref[4], grad_w_rtol))
    for a, b, rtol in pairs:
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=rtol, atol=1e-7)
    for a, b in zip(ours[2], ref[2]):
        if b is None:
            assert a is None
        else:
            assert a.dtype == b.dtype and a.shape == b.shape
            # equal_nan: v1's perplexity is NaN in fp16 (its 1e-10 underflows, 0 * log 0), as in the original
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, equal_nan=True)
    assert torch.equal(ours[5], ref[5]), "the random number stream differs after forward"


def _make(kind, via, taming, *args, **kwargs):
    """(ours, oracle) built from the same RNG state; ours is the compat class or an accelerated stand-in."""
    torch.manual_seed(0)
    ref = getattr(taming, kind)(*args, **kwargs)
    compat = {"VectorQuantizer2": VectorQuantizer2, "VectorQuantizer": VectorQuantizer}[kind]
    if via == "accelerate":
        ours = vqfast.accelerate(copy.deepcopy(ref), trust=_trust(taming))
        assert isinstance(ours, compat) and isinstance(ours, type(ref))
    else:
        torch.manual_seed(0)
        ours = compat(*args, **kwargs)
    return ours, ref


# ---- construction and state ----------------------------------------------------------------------------
@pytest.mark.parametrize("remap", [False, True])
def test_constructor_attributes_init_and_state_dict(taming, used_file, remap):
    kwargs = {"remap": used_file, "unknown_index": "extra"} if remap else {}
    ours, ref = _make("VectorQuantizer2", "compat", taming, 60, 6, 0.3, **kwargs)
    assert torch.equal(ours.embedding.weight, ref.embedding.weight)  # same init, same RNG use
    assert ours.embedding.weight.abs().max() <= 1 / 60
    for name in ("n_e", "e_dim", "beta", "legacy", "remap", "re_embed", "sane_index_shape"):
        assert getattr(ours, name) == getattr(ref, name), name
    keys = ["used", "embedding.weight"] if remap else ["embedding.weight"]  # a module's own buffers come first
    assert list(ours.state_dict()) == list(ref.state_dict()) == keys
    if remap:
        assert ours.unknown_index == ref.unknown_index == 14 and ours.re_embed == 15
        assert torch.equal(ours.used, ref.used) and ours.used.dtype == torch.int64
    _spread(ref)
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(ours.state_dict(), strict=True)
    assert torch.equal(ours.embedding.weight, ref.embedding.weight)

    v1, v1_ref = _make("VectorQuantizer", "compat", taming, 40, 6, 0.3)
    assert torch.equal(v1.embedding.weight, v1_ref.embedding.weight)
    assert (v1.n_e, v1.e_dim, v1.beta) == (40, 6, 0.3) and list(v1.state_dict()) == ["embedding.weight"]


# ---- forward against the oracle --------------------------------------------------------------------------
VQ2_OPTIONS = [
    {},
    {"legacy": False},
    {"sane_index_shape": True},
    {"remap": "random"},
    {"remap": "extra", "sane_index_shape": True},
    {"remap": 3, "legacy": False},
]


@pytest.mark.parametrize("via", ["compat", "accelerate"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", VQ2_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_vq2_matches_oracle(taming, used_file, via, backend, options):
    options = dict(options)
    if "remap" in options:
        options["unknown_index"] = options.pop("remap")
        options["remap"] = used_file
    ours, ref = _make("VectorQuantizer2", via, taming, 60, 6, 0.3, **options)
    vqfast.accelerate(ours, backend=backend)  # the compat class takes the same hook
    _spread(ours, ref)
    x = torch.randn(3, 6, 5, 7)
    g = torch.randn_like(x)
    got, want = _run(ours, x, g), _run(ref, x, g)
    _assert_same_run(got, want)
    idx = got[2][2]
    expected_shape = (3, 5, 7) if options.get("sane_index_shape") else ((105, 1) if "remap" in options else (105,))
    assert idx.shape == expected_shape and idx.dtype == torch.int64
    if "remap" in options:
        assert int(idx.max()) < ours.re_embed
    shape = (3, 5, 7, 6)
    torch.testing.assert_close(ours.get_codebook_entry(idx, shape), ref.get_codebook_entry(idx, shape), rtol=0, atol=0)
    if "remap" not in options:
        flat = idx.reshape(-1)
        assert torch.equal(ours.get_codebook_entry(flat, None), ref.get_codebook_entry(flat, None))


@pytest.mark.parametrize("via", ["compat", "accelerate"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_v1_matches_oracle(taming, via, backend):
    ours, ref = _make("VectorQuantizer", via, taming, 37, 5, 0.4)
    vqfast.accelerate(ours, backend=backend)
    _spread(ours, ref)
    x = torch.randn(2, 5, 9, 4)
    g = torch.randn_like(x)
    got, want = _run(ours, x, g), _run(ref, x, g)
    _assert_same_run(got, want)
    perplexity, one_hot, idx = got[2]
    assert idx.shape == (72, 1) and one_hot.shape == (72, 37) and one_hot.dtype == x.dtype and perplexity.dim() == 0
    assert torch.equal(one_hot.argmax(1, keepdim=True), idx) and torch.equal(one_hot.sum(1), torch.ones(72))
    for indices in (idx[:, 0], idx):  # [N], and the [N, 1] v1's forward returns
        want_codes = ref.get_codebook_entry(idx[:, 0], (2, 9, 4, 5))
        assert torch.equal(ours.get_codebook_entry(indices, (2, 9, 4, 5)), want_codes)
    assert torch.equal(ours.get_codebook_entry(idx[:, 0], None), ours.embedding.weight[idx[:, 0]])


def test_v1_matches_released_taming_transformers():
    """v1 against the released taming-transformers 0.0.1 (whose argmin is the expanded fp32 formula:
    the codebook is spread far apart here so that both searches are unambiguous)."""
    released = pytest.importorskip(TAMING_PATH)
    if not hasattr(released, "VectorQuantizer") or "VectorQuantizer" != released.VectorQuantizer.__name__:
        pytest.skip("the installed taming package has no v1 VectorQuantizer")
    torch.manual_seed(0)
    ref = released.VectorQuantizer(33, 7, 0.25)
    torch.manual_seed(0)
    ours = VectorQuantizer(33, 7, 0.25)
    accelerated = vqfast.accelerate(copy.deepcopy(ref))
    assert isinstance(accelerated, VectorQuantizer) and isinstance(accelerated, released.VectorQuantizer)
    assert torch.equal(ours.embedding.weight, ref.embedding.weight)
    _spread(ours, ref, accelerated)
    x = torch.randn(2, 7, 6, 5)
    g = torch.randn_like(x)
    want = _run(ref, x, g)
    for module in (ours, accelerated):
        _assert_same_run(_run(module, x, g), want)
    idx = want[2][2][:, 0]
    assert torch.equal(ours.get_codebook_entry(idx, (2, 6, 5, 7)), ref.get_codebook_entry(idx, (2, 6, 5, 7)))


# ---- the two loss forms, remapping, lookups -----------------------------------------------------------
def test_legacy_forms_same_value_different_gradients():
    torch.manual_seed(3)
    legacy, fixed = VectorQuantizer2(20, 4, 0.25), VectorQuantizer2(20, 4, 0.25, legacy=False)
    _spread(legacy, fixed)
    x = torch.randn(2, 4, 3, 3)
    results = []
    for m in (legacy, fixed):
        xi = x.clone().requires_grad_()
        _, loss, (_, _, idx) = m(xi)
        loss.backward()
        results.append((loss.detach(), xi.grad, m.embedding.weight.grad, idx))
    (l1, gx1, gw1, idx), (l2, gx2, gw2, _) = results
    torch.testing.assert_close(l1, l2)
    # legacy: the encoder term is unweighted and beta is on the codebook term; legacy=False swaps them.
    zc = x.permute(0, 2, 3, 1)
    q = legacy.embedding.weight[idx].detach().reshape(zc.shape)
    d_enc = (2.0 * (zc - q) / zc.numel()).permute(0, 3, 1, 2)
    torch.testing.assert_close(gx1, d_enc)
    torch.testing.assert_close(gx2, 0.25 * d_enc)
    torch.testing.assert_close(gw2, 4.0 * gw1)


def test_remap_to_used_and_unmap(taming, used_file):
    ours, ref = _make("VectorQuantizer2", "compat", taming, 40, 3, 0.25, remap=used_file, unknown_index="random")
    inds = torch.tensor([[9, 4, 57, 3, 41], [0, 8, 9, 59, 33]])
    torch.manual_seed(5)
    got = ours.remap_to_used(inds)
    torch.manual_seed(5)
    want = ref.remap_to_used(inds)
    assert torch.equal(got, want)
    assert got[0, 0] == 1 and got[1, 2] == 1  # 9 sits at positions 1 and 4 of used: the first wins
    assert got[0, 2] == 13 and got[0, 4] == 12  # codes past n_e = 40 are matched too, as used lists them
    positions = torch.tensor([[0, 13, 12], [4, 1, 7]])
    before = positions.clone()
    assert torch.equal(ours.unmap_to_all(positions), ref.unmap_to_all(positions))
    assert torch.equal(positions, before)  # the indices passed in are left as they were
    with pytest.raises(ValueError, match="batch axis"):
        ours.remap_to_used(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="shape"):
        ours.get_codebook_entry(torch.tensor([1, 2]), None)

    extra, extra_ref = _make("VectorQuantizer2", "compat", taming, 40, 3, 0.25, remap=used_file, unknown_index="extra")
    assert torch.equal(extra.remap_to_used(inds), extra_ref.remap_to_used(inds))
    assert int(extra.remap_to_used(inds)[0, 3]) == 14  # unknown -> len(used)
    back = extra.unmap_to_all(torch.tensor([[14, 2]]))
    assert back.tolist() == [[4, 1]]  # the extra index maps to used[0]


def test_random_unknown_index_draws_like_the_original(taming, used_file):
    """Seeded runs match: one randint of the unknowns' count from the default CPU generator."""
    ours, ref = _make("VectorQuantizer2", "accelerate", taming, 60, 6, 0.3, remap=used_file)
    _spread(ours, ref)
    x = torch.randn(4, 6, 6, 6)
    for seed in (0, 1):
        torch.manual_seed(seed)
        a = ours(x)[2][2]
        after_a = torch.rand(3)
        torch.manual_seed(seed)
        b = ref(x)[2][2]
        after_b = torch.rand(3)
        assert torch.equal(a, b) and torch.equal(after_a, after_b)
    unknown_rows = ~torch.isin(_fp64_nearest(x.permute(0, 2, 3, 1).reshape(-1, 6), ours.embedding.weight), ours.used)
    assert unknown_rows.any() and (~unknown_rows).any()  # both branches ran


def test_remap_file_is_loaded_safely(tmp_path):
    pickled = tmp_path / "objects.npy"
    np.save(pickled, np.array([{"code": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="pickle"):
        VectorQuantizer2(8, 2, 0.25, remap=str(pickled))
    for name, arr in (("two_d.npy", np.zeros((2, 2), dtype=np.int64)), ("empty.npy", np.zeros(0, dtype=np.int64))):
        np.save(tmp_path / name, arr)
        with pytest.raises(ValueError, match="remap"):
            VectorQuantizer2(8, 2, 0.25, remap=str(tmp_path / name))
    np.savez(tmp_path / "many.npz", a=np.arange(3))
    with pytest.raises(ValueError, match="one array"):
        VectorQuantizer2(8, 2, 0.25, remap=str(tmp_path / "many.npz"))
    with pytest.raises(TypeError, match="remap"):
        VectorQuantizer2(8, 2, 0.25, remap=np.arange(3))


# ---- what the fused search changes: a row the expanded formula gets wrong ------------------------------------
def test_expanded_formula_picks_a_non_nearest_codeword_vqfast_the_nearest(taming):
    """Codewords 0.01 apart around a centre of norm ~1450: ||z||^2 + ||e||^2 - 2 z.e in fp32 (taming's
    search) loses the differences to rounding (its spacing there is 0.25) and picks wrong codewords;
    vqfast picks the truly nearest (the float64 oracle's choice)."""
    gen = torch.Generator().manual_seed(1)
    centre = torch.full((8,), 512.0)
    codebook = centre + 0.01 * torch.randn(16, 8, generator=gen)
    z = (centre + 0.01 * torch.randn(64, 8, generator=gen)).reshape(4, 4, 4, 8).permute(0, 3, 1, 2)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 8)
    expanded = (flat**2).sum(1, keepdim=True) + (codebook**2).sum(1) - 2 * flat @ codebook.T
    theirs = expanded.argmin(1)
    exact = brute_force_fp64(flat, codebook)
    truth = exact.argmin(1)
    worse = exact.gather(1, theirs[:, None])[:, 0] > exact.gather(1, truth[:, None])[:, 0]
    assert worse.any(), "the construction must contain a row the expanded formula gets wrong"
    ours, ref = _make("VectorQuantizer2", "accelerate", taming, 16, 8, 0.25)
    with torch.no_grad():
        ours.embedding.weight.copy_(codebook)
        ref.embedding.weight.copy_(codebook)
    got = ours(z)[2][2]
    assert torch.equal(got, truth) and torch.equal(got, ref(z)[2][2])
    assert not torch.equal(got, theirs)


# ---- accelerate in a model ------------------------------------------------------------------------------------
class _TinyVQGAN(nn.Module):
    def __init__(self, quantize):
        super().__init__()
        self.quant_conv = nn.Conv2d(3, 6, 1)
        self.quantize = quantize
        self.post_quant_conv = nn.Conv2d(6, 3, 1)

    def forward(self, x):
        quant, loss, (_, _, ind) = self.quantize(self.quant_conv(x))
        return self.post_quant_conv(quant), loss, ind


def test_accelerate_in_a_model_shares_tensors_and_trains_alike(taming, used_file, capsys):
    torch.manual_seed(0)
    model = _TinyVQGAN(taming.VectorQuantizer2(60, 6, 0.25, remap=used_file, sane_index_shape=True))
    twin = copy.deepcopy(model)
    _spread(model.quantize, twin.quantize)
    params = {name: p for name, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt_twin = torch.optim.SGD(twin.parameters(), lr=0.1)
    assert vqfast.accelerate(model, verbose=True, trust=_trust(taming)) is model
    out = capsys.readouterr().out
    assert "quantize: taming-transformers VectorQuantizer2 replaced" in out
    assert isinstance(model.quantize, taming.VectorQuantizer2) and isinstance(model.quantize, VectorQuantizer2)
    assert all(p is params[name] for name, p in model.named_parameters())  # the same Parameter objects
    x = torch.randn(2, 3, 5, 4)
    for step in range(3):
        for m, o in ((model, opt), (twin, opt_twin)):
            torch.manual_seed(step)
            o.zero_grad()
            rec, loss, ind = m(x)
            (rec.square().mean() + loss).backward()
            o.step()
        assert ind.shape == (2, 5, 4)
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
    # A second call is harmless and can change the backend.
    vqfast.accelerate(model, backend="torch", verbose=True)
    assert "already accelerated" in capsys.readouterr().out and model.quantize.vqfast_backend == "torch"
    # The checkpoint loads strictly into the compat class, and back.
    compat = VectorQuantizer2(60, 6, 0.25, remap=used_file, sane_index_shape=True)
    compat.load_state_dict(model.quantize.state_dict(), strict=True)
    model.quantize.load_state_dict(compat.state_dict(), strict=True)
    # Copies and pickles keep the accelerated class.
    z = torch.randn(2, 6, 5, 4)
    for clone in (copy.deepcopy(model.quantize), pickle.loads(pickle.dumps(model.quantize))):
        assert type(clone) is type(model.quantize)
        torch.manual_seed(9)
        a = clone(z)[2][2]
        torch.manual_seed(9)
        assert torch.equal(a, model.quantize(z)[2][2])
    buf = io.BytesIO()
    torch.save(model.quantize.state_dict(), buf)
    buf.seek(0)
    compat.load_state_dict(torch.load(buf, weights_only=True), strict=True)


def test_accelerate_leaves_unsupported_instances_on_their_code(taming, capsys):
    torch.manual_seed(0)
    odd = taming.VectorQuantizer2(10, 4, 0.25)
    odd.embedding = nn.Linear(4, 10)  # a modified copy of the class: not the layout the compat class reads
    plain = taming.VectorQuantizer(10, 4, 0.25)
    model = nn.ModuleDict({"odd": odd, "plain": plain})
    vqfast.accelerate(model, verbose=True, trust=_trust(taming))
    out = capsys.readouterr().out
    assert "odd: taming-transformers VectorQuantizer2 left on its original code: its embedding is a Linear" in out
    assert type(odd) is taming.VectorQuantizer2 and isinstance(plain, VectorQuantizer)


# ---- dtypes, compile, memory, bad input -----------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["VectorQuantizer2", "VectorQuantizer"])
def test_bf16_autocast_and_half_models_match_the_oracle(taming, kind):
    ours, ref = _make(kind, "accelerate", taming, 24, 6, 0.25)
    _spread(ours, ref)
    x = torch.randn(2, 6, 4, 5)
    g = torch.randn_like(x)
    conv = nn.Conv2d(6, 6, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        zb = conv(x)  # bf16 activations, fp32 codebook: z_q is fp32 for VectorQuantizer2, bf16 for v1's matmul
        got, want = _run(ours, zb, g), _run(ref, zb, g)
    v1 = kind == "VectorQuantizer"
    # v1's one-hot matmul runs in bf16 under autocast, so the original sums each code's gradient in bf16
    # (one bf16 rounding, 2^-8 relative, off vqfast's fp32 sum of the same bf16 row gradients).
    _assert_same_run(got, want, grad_w_rtol=2**-7 if v1 else 1e-6)
    assert got[0].dtype == (torch.bfloat16 if v1 else torch.float32)
    half, half_ref = copy.deepcopy(ours).half(), copy.deepcopy(ref).half()
    got, want = _run(half, x.half(), g.half()), _run(half_ref, x.half(), g.half())
    _assert_same_run(got, want, grad_w_rtol=2**-9 if v1 else 1e-6)  # v1: fp16 sums, rounded differently
    assert got[0].dtype == got[1].dtype == torch.float16


@pytest.mark.parametrize("options", [{}, {"sane_index_shape": True, "legacy": False}], ids=["default", "sane-fixed"])
def test_torch_compile_fullgraph(options):
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = VectorQuantizer2(29, 5, 0.25, **options)
    _spread(eager)
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 5, 3, 7)
    g = torch.randn_like(x)
    a = _run(eager, x, g)
    b = _run(compiled, x, g)
    assert torch.equal(a[2][2], b[2][2])
    for u, v in zip((a[0], a[1], a[3], a[4]), (b[0], b[1], b[3], compiled_module.embedding.weight.grad)):
        torch.testing.assert_close(v, u, rtol=1e-6, atol=1e-7)


def test_no_n_by_k_tensor_with_remap(used_file):
    n, k = 4096, 2048  # N x K = 8.4M elements; the largest legitimate tensor is N x D or the 4.2M-element chunk
    vq = VectorQuantizer2(k, 4, 0.25, remap=used_file)
    x = torch.randn(4, 4, 32, 32, requires_grad=True)
    with MaxNumel() as mode:
        z_q, loss, (_, _, idx) = vq(x)
        (z_q.sum() + loss).backward()
    assert idx.shape == (n, 1)
    assert mode.max_numel < n * k and mode.max_numel < n * len(vq.used)


def test_bad_input(tmp_path):
    vq = VectorQuantizer2(8, 4, 0.25)
    with pytest.raises(ValueError, match=r"z must be \[B, C, H, W\] with C = e_dim = 4"):
        vq(torch.randn(2, 8, 3, 3))
    with pytest.raises(ValueError, match="z must be"):
        vq(torch.randn(2, 4, 3))
    with pytest.raises(TypeError, match="z must be a torch.Tensor"):
        vq([1.0])
    with pytest.raises(ValueError, match="temp"):
        vq(torch.randn(1, 4, 2, 2), temp=0.5)
    with pytest.raises(ValueError, match="return_logits"):
        vq(torch.randn(1, 4, 2, 2), return_logits=True)
    with pytest.raises(ValueError, match="n_e"):
        VectorQuantizer2(0, 4, 0.25)
    with pytest.raises(ValueError, match="e_dim"):
        VectorQuantizer(8, 0, 0.25)
    with pytest.raises(ValueError, match="backend"):
        VectorQuantizer2(8, 4, 0.25, backend="gpu")
    np.save(tmp_path / "used.npy", np.arange(3))
    with pytest.raises(ValueError, match="unknown_index"):
        VectorQuantizer2(8, 4, 0.25, remap=str(tmp_path / "used.npy"), unknown_index="first")
    with pytest.raises(ValueError, match="precision"):
        VectorQuantizer(8, 4, 0.25, precision="approximate")
    with pytest.raises(ValueError, match="indices must be"):
        VectorQuantizer(8, 4, 0.25).get_codebook_entry(torch.zeros(2, 2, dtype=torch.long), None)
