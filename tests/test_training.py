"""Training features of the quantizer modules: drop-in gradients against the classic classes, EMA codebook
updates, k-means initialisation, dead-code restarts and usage statistics."""
import pytest
import torch
import torch.nn.functional as F

import vqfast
import vqfast.kmeans as vq_kmeans
from vqfast import ResidualVectorQuantizer, VectorQuantizer, VectorQuantizer2
from vqfast.kmeans import kmeans
from vqfast.testing import oracle
from vqfast.testing.seeds import SeedResidualVectorQuantizer, SeedVectorQuantizer, SeedVectorQuantizer2

BACKENDS = vqfast.available_backends("cpu")
# fp32 gradient tolerance: the seeds gather by a one-hot matmul, vqfast by index_select / index_add;
# both sum the same terms in fp32, so they agree to a few ulps of the gradient scale.
RTOL, ATOL = 1e-5, 1e-7


def _pair(seed_cls, vq_cls, *args, **kwargs):
    torch.manual_seed(1)
    seed = seed_cls(*args)
    torch.manual_seed(1)
    mine = vq_cls(*args, **kwargs)
    return seed, mine


def _blobs(n, centers, noise=0.01, generator=None):
    k = centers.shape[0]
    labels = torch.arange(n) % k
    return centers[labels] + noise * torch.randn(n, centers.shape[1], generator=generator), labels


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k,d,hw", [(5, 1, (3, 5)), (37, 3, (4, 3)), (17, 17, (5, 7)), (64, 100, (2, 3))])
@pytest.mark.parametrize("kind", ["vq", "vq2", "rvq"])
def test_defaults_match_seed_forward_and_gradients(backend, k, d, hw, kind):
    if kind == "vq":
        seed, mine = _pair(SeedVectorQuantizer, VectorQuantizer, k, d, 0.25, backend=backend)
    elif kind == "vq2":
        seed, mine = _pair(SeedVectorQuantizer2, VectorQuantizer2, k, d, backend=backend)
    else:
        seed, mine = _pair(SeedResidualVectorQuantizer, ResidualVectorQuantizer, 3, k, d, 0.25, backend=backend)
    mine.load_state_dict(seed.state_dict(), strict=True)
    # Scale the inputs to the codebook's [-1/K, 1/K] so the search is not trivially one code.
    z = (torch.randn(2, d, *hw) / k).requires_grad_(True)
    z2 = z.detach().clone().requires_grad_(True)
    q_s, loss_s, idx_s = seed(z)
    q_m, loss_m, idx_m = mine(z2)
    if kind == "rvq":
        for a, b in zip(idx_s, idx_m):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    else:
        torch.testing.assert_close(idx_s, idx_m, rtol=0, atol=0)
    torch.testing.assert_close(q_m, q_s, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(loss_m, loss_s, rtol=RTOL, atol=ATOL)
    ((q_s**2).sum() + loss_s).backward()
    ((q_m**2).sum() + loss_m).backward()
    torch.testing.assert_close(z2.grad, z.grad, rtol=RTOL, atol=ATOL)
    for (name, p_s), p_m in zip(seed.named_parameters(), mine.parameters()):
        assert p_m.grad is not None, name
        torch.testing.assert_close(p_m.grad, p_s.grad, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_sgd_training_tracks_seed(backend):
    seed, mine = _pair(SeedVectorQuantizer, VectorQuantizer, 24, 6, 0.25, backend=backend)
    opt_s = torch.optim.SGD(seed.parameters(), lr=0.5)
    opt_m = torch.optim.SGD(mine.parameters(), lr=0.5)
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        z = torch.randn(3, 6, 4, 5, generator=gen) / 24
        for model, opt in ((seed, opt_s), (mine, opt_m)):
            opt.zero_grad()
            model(z)[1].backward()
            opt.step()
    torch.testing.assert_close(mine.embedding.weight, seed.embedding.weight, rtol=1e-5, atol=1e-7)


def test_learning_options_off_are_bit_identical_and_keep_state_dict():
    torch.manual_seed(0)
    a = VectorQuantizer(32, 8)
    torch.manual_seed(0)
    b = VectorQuantizer(32, 8, ema=False, kmeans_init=False, dead_code_threshold=0)
    assert set(a.state_dict()) == {"embedding.weight"} == set(b.state_dict())
    assert torch.equal(a.embedding.weight, b.embedding.weight)
    z = torch.randn(2, 8, 3, 3) / 32
    for x, y in zip(a(z), b(z)):
        assert torch.equal(x, y)
    for seed_cls, cls, args in (
        (SeedVectorQuantizer2, VectorQuantizer2, (16, 4)),
        (SeedResidualVectorQuantizer, ResidualVectorQuantizer, (2, 16, 4)),
    ):
        cls(*args).load_state_dict(seed_cls(*args).state_dict(), strict=True)


def test_state_buffers_only_when_options_on():
    m = VectorQuantizer(16, 4, ema=True, kmeans_init=True)
    assert set(m.state_dict()) == {"embedding.weight", "cluster_size", "embed_avg", "initted"}
    m = VectorQuantizer(16, 4, dead_code_threshold=1.0)
    assert set(m.state_dict()) == {"embedding.weight", "cluster_size"}
    # A checkpoint with EMA state round-trips strictly.
    m = VectorQuantizer(16, 4, ema=True)
    m(torch.randn(2, 4, 3, 3))
    m2 = VectorQuantizer(16, 4, ema=True)
    m2.load_state_dict(m.state_dict(), strict=True)
    assert torch.equal(m2.embed_avg, m.embed_avg) and torch.equal(m2.get_codebook(), m.get_codebook())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_ema_step_matches_formula(backend, metric):
    k, d, decay, eps = 13, 5, 0.9, 1e-3
    m = VectorQuantizer(k, d, 0.3, ema=True, decay=decay, eps=eps, backend=backend, metric=metric)
    z = torch.randn(2, d, 4, 3).requires_grad_(True)
    w0 = m.get_codebook().clone().double()
    cs0, avg0 = m.cluster_size.clone().double(), m.embed_avg.clone().double()
    flat = z.detach().movedim(1, -1).reshape(-1, d).double()
    idx = oracle.nearest(flat, w0, metric).indices
    q, loss, indices = m(z)
    assert torch.equal(indices, idx)
    data = F.normalize(flat, dim=-1) if metric == "cosine" else flat
    counts = torch.bincount(idx, minlength=k).double()
    sums = torch.zeros(k, d, dtype=torch.float64).index_add_(0, idx, data)
    cs = decay * cs0 + (1 - decay) * counts
    avg = decay * avg0 + (1 - decay) * sums
    n = cs.sum()
    w = avg / ((cs + eps) / (n + k * eps) * n)[:, None]
    if metric == "cosine":
        w = F.normalize(w, dim=-1)
    torch.testing.assert_close(m.cluster_size.double(), cs, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(m.embed_avg.double(), avg, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(m.get_codebook().double(), w, rtol=1e-5, atol=1e-6)
    # Loss is the commitment term only, against the codewords used in this step (before the update).
    q_old = w0[idx].float().view(2, 4, 3, d)
    expect = 0.3 * F.mse_loss(q_old, z.detach().movedim(1, -1))
    torch.testing.assert_close(loss, expect)
    loss.backward()
    assert m.embedding.weight.grad is None and not m.embedding.weight.requires_grad
    torch.testing.assert_close(z.grad, 0.3 * 2 * (z.detach() - q_old.movedim(-1, 1)) / z.numel())
    # Eval mode leaves the codebook alone.
    m.eval()
    before = m.get_codebook().clone()
    m(z)
    assert torch.equal(before, m.get_codebook())


def test_ema_learns_cluster_centers():
    gen = torch.Generator().manual_seed(5)
    centers = torch.randn(6, 4, generator=gen) * 3
    m = VectorQuantizer(6, 4, ema=True, kmeans_init=True, decay=0.8)
    for _ in range(20):
        x, _ = _blobs(240, centers, noise=0.05, generator=gen)
        m(x.T.reshape(1, 4, 240))
    cb = m.get_codebook()
    match = torch.cdist(centers, cb).min(1).values
    assert match.max() < 0.05, match
    assert m.perplexity() > 5.9


def test_kmeans_recovers_blobs_and_uses_fused_search(monkeypatch):
    calls = []
    real = vq_kmeans.nearest_codeword

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(vq_kmeans, "nearest_codeword", spy)
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(9, 17, generator=gen) * 4
    x, _ = _blobs(900, centers, noise=0.1, generator=gen)
    cent, counts = kmeans(x, 9, iters=5)
    assert len(calls) == 5
    assert torch.cdist(centers, cent).min(1).values.max() < 0.05
    assert counts.sum() == 900 and torch.equal(counts, torch.full((9,), 100.0))


def test_kmeans_fewer_rows_than_clusters_and_cosine():
    x = torch.randn(3, 5)
    cent, counts = kmeans(x, 8, iters=2)
    assert cent.shape == (8, 5) and counts.sum() == 3
    # Every centroid is one of the three rows (duplicates allowed when N < K).
    assert torch.cdist(cent, x).min(1).values.max() < 1e-5
    cent, _ = kmeans(torch.randn(50, 6), 4, iters=3, metric="cosine")
    torch.testing.assert_close(cent.norm(dim=1), torch.ones(4))


def test_kmeans_bad_input():
    with pytest.raises(ValueError, match="num_clusters"):
        kmeans(torch.randn(4, 2), 0)
    with pytest.raises(ValueError, match="x must be"):
        kmeans(torch.randn(4), 2)
    with pytest.raises(ValueError, match="iters"):
        kmeans(torch.randn(4, 2), 2, iters=-1)


@pytest.mark.parametrize("ema", [False, True])
def test_kmeans_init_first_training_batch_only(ema):
    gen = torch.Generator().manual_seed(2)
    centers = torch.randn(4, 3, generator=gen) * 5
    x, _ = _blobs(80, centers, noise=0.01, generator=gen)
    z = x.T.reshape(1, 3, 80)
    m = VectorQuantizer(4, 3, kmeans_init=True, ema=ema)
    m.eval()
    m(z)
    assert not bool(m.initted)
    m.train()
    m(z)
    assert bool(m.initted)
    assert torch.cdist(centers, m.get_codebook()).min(1).values.max() < 0.05
    if ema:
        torch.testing.assert_close(m.cluster_size, torch.full((4,), 0.99 * 20 + 0.01 * 20))
    cb = m.get_codebook().clone()
    m(z + 100)  # a second batch does not re-run k-means
    if not ema:
        assert torch.equal(cb, m.get_codebook())


@pytest.mark.parametrize("ema", [False, True])
def test_dead_codes_are_reseeded_from_batch(ema):
    k, d = 10, 3
    m = VectorQuantizer(k, d, ema=ema, dead_code_threshold=0.5)
    with torch.no_grad():
        m.cluster_size.copy_(torch.tensor([1.0, 0.1, 1.0, 0.2, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0]))
    w0 = m.get_codebook().clone()
    z = torch.randn(1, d, 40) + 10.0  # far from every initial codeword
    rows = z[0].T
    _, _, idx = m(z)
    dead = torch.tensor([1, 3, 7])
    alive = torch.tensor([i for i in range(k) if i not in (1, 3, 7)])
    # Each re-seeded code is one of the batch's rows, and the batch (far from the old codes) now uses only them.
    if ema:  # undo this step's EMA update: embed_avg = 0.99 * (seed * 0.5) + 0.01 * sums
        sums = torch.zeros(k, d).index_add_(0, idx, rows)
        seeds = (m.embed_avg - 0.01 * sums) / (0.99 * 0.5)
    else:
        seeds = m.get_codebook()
    d2 = (seeds[dead][:, None] - rows[None]).norm(dim=-1)
    assert d2.min(1).values.max() < 1e-5
    assert set(idx.tolist()) <= set(dead.tolist())
    if not ema:
        assert torch.equal(m.get_codebook()[alive], w0[alive])
    counts = torch.bincount(idx, minlength=k).float()
    torch.testing.assert_close(m.cluster_size[dead], 0.99 * 0.5 + 0.01 * counts[dead])
    torch.testing.assert_close(m.cluster_size[alive], 0.99 * 1.0 + 0.01 * counts[alive])


def test_usage_statistics():
    m = VectorQuantizer(8, 2)
    with torch.no_grad():
        m.embedding.weight.copy_(torch.arange(16.0).view(8, 2))
    z = torch.tensor([[0.0, 1.0], [0.1, 1.0], [2.0, 3.0], [14.0, 15.0]]).T.reshape(1, 2, 4)
    m(z)
    m.eval()
    m(z)
    assert m.code_counts.tolist() == [4, 2, 0, 0, 0, 0, 0, 2]
    p = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    assert m.perplexity() == pytest.approx(float(torch.exp(-(p * p.log()).sum())))
    assert m.dead_code_fraction() == pytest.approx(5 / 8)
    m.reset_usage()
    assert m.perplexity() == 0.0 and m.dead_code_fraction() == 1.0
    assert "code_counts" not in m.state_dict()
    r = ResidualVectorQuantizer(2, 8, 2)
    r(z)
    assert len(r.perplexity()) == 2 and all(1.0 <= p <= 8.0 for p in r.perplexity())
    assert sum(r.quantizers[0].code_counts.tolist()) == 4
    r.reset_usage()
    assert r.dead_code_fraction() == [1.0, 1.0]


def test_options_reach_vq2_and_every_rvq_stage():
    v2 = VectorQuantizer2(8, 3, ema=True, decay=0.5, kmeans_init=True, dead_code_threshold=0.25, metric="cosine")
    assert v2.ema and v2.decay == 0.5 and v2.kmeans_init and v2.dead_code_threshold == 0.25 and v2.beta == 1.0
    assert "ema=True" in repr(v2)
    r = ResidualVectorQuantizer(3, 8, 3, 0.5, ema=True, eps=1e-3, kmeans_init=True, dead_code_threshold=0.1)
    for q in r.quantizers:
        assert q.ema and q.eps == 1e-3 and q.kmeans_init and q.dead_code_threshold == 0.1 and q.beta == 0.5
    q, loss, idx = r(torch.randn(2, 3, 4, 4))
    assert all(bool(s.initted) for s in r.quantizers) and len(idx) == 3
    # EMA VectorQuantizer2: commitment term only, weight 1.
    z = torch.randn(2, 3, 2, 2)
    v2 = VectorQuantizer2(8, 3, ema=True)
    q, loss, _ = v2(z)
    torch.testing.assert_close(loss, F.mse_loss(q, z))


@pytest.mark.parametrize(
    "kwargs,exc,name",
    [
        ({"ema": 1}, TypeError, "ema"),
        ({"kmeans_init": "yes"}, TypeError, "kmeans_init"),
        ({"decay": 1.0}, ValueError, "decay"),
        ({"decay": 0}, ValueError, "decay"),
        ({"eps": 0.0}, ValueError, "eps"),
        ({"dead_code_threshold": -1}, ValueError, "dead_code_threshold"),
        ({"dead_code_threshold": float("nan")}, ValueError, "dead_code_threshold"),
        ({"kmeans_iters": -2}, ValueError, "kmeans_iters"),
        ({"metric": "dot"}, ValueError, "metric"),
    ],
)
def test_bad_learning_options(kwargs, exc, name):
    for build in (
        lambda: VectorQuantizer(8, 2, **kwargs),
        lambda: VectorQuantizer2(8, 2, **kwargs),
        lambda: ResidualVectorQuantizer(2, 8, 2, **kwargs),
    ):
        with pytest.raises(exc, match=name):
            build()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", [{}, {"ema": True, "dead_code_threshold": 0.5}, {"metric": "cosine"}])
def test_no_n_by_k_tensor_saved_for_backward(backend, options):
    # N = 300 rows, K = 257 codes: anything of N * K = 77,100 elements would be a distance or one-hot matrix.
    n_rows, k, d = 300, 257, 3
    m = VectorQuantizer(k, d, backend=backend, **options)
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    z = torch.randn(3, d, 100).requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        q, loss, _ = m(z)
    (q.sum() + loss).backward()
    assert sizes and max(sizes) < n_rows * k, max(sizes)
    assert max(sizes) <= max(n_rows * d, k * d)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ema_with_half_inputs(dtype):
    m = VectorQuantizer(16, 4, ema=True, dead_code_threshold=0.2, kmeans_init=True)
    z = torch.randn(2, 4, 6, 6, dtype=dtype).requires_grad_(True)
    for _ in range(3):
        q, loss, idx = m(z)
        loss.backward()
    assert q.dtype == dtype and m.get_codebook().dtype == torch.float32
    assert torch.isfinite(m.get_codebook()).all() and torch.isfinite(z.grad).all()
    # The codebook is learnt from the data: every code sits within the data's range.
    assert m.get_codebook().abs().max() <= z.detach().float().abs().max() + 1e-3


def test_empty_batch_trains_nothing():
    m = VectorQuantizer(8, 3, ema=True, kmeans_init=True, dead_code_threshold=2.0)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    q, loss, idx = m(torch.randn(0, 3, 4))
    assert q.shape == (0, 3, 4) and idx.shape == (0,)
    assert m._kmeans_pending and not bool(m.initted)
    # The EMA still decays (as on a rank whose batch is empty), which leaves every codeword in place.
    torch.testing.assert_close(m.get_codebook(), state["embedding.weight"])


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 3, 0)])
@pytest.mark.parametrize("kind,options", [("vq", {}), ("vq", {"ema": True, "dead_code_threshold": 1.0}),
                                          ("vq2", {}), ("rvq", {})])
def test_empty_batch_loss_is_zero_not_nan(shape, kind, options):
    # The decision (modules.py docstring): no vectors, no quantisation error; loss 0 attached to the
    # graph, so backward gives zero gradients instead of NaN ones.
    build = {"vq": lambda: VectorQuantizer(8, 3, **options), "vq2": lambda: VectorQuantizer2(8, 3, **options),
             "rvq": lambda: ResidualVectorQuantizer(2, 8, 3, **options)}[kind]
    m = build()
    z = torch.randn(shape).requires_grad_(True)
    q, loss, _ = m(z)
    assert q.shape == z.shape and loss.shape == () and loss.item() == 0.0
    (q.sum() + loss).backward()
    assert torch.equal(z.grad, torch.zeros(shape))
    for p in m.parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p))


@pytest.mark.parametrize("ema", [False, True])
def test_dead_code_threshold_is_strict(ema):
    # "Falls below the threshold": a code whose EMA usage equals it exactly stays; the next float
    # below it is restarted from the batch (far from every initial codeword, so the two are told apart).
    k, d, t = 6, 3, 0.5
    m = VectorQuantizer(k, d, ema=ema, dead_code_threshold=t)
    below = float(torch.nextafter(torch.tensor(t), torch.tensor(0.0)))
    with torch.no_grad():
        m.cluster_size.copy_(torch.tensor([1.0, t, below, 1.0, t, 1.0]))
    z = torch.randn(1, d, 30) + 10.0
    _, _, idx = m(z)
    far = m.get_codebook().norm(dim=1) > 5.0  # re-seeded from the batch
    assert far.tolist() == [False, False, True, False, False, False]
    assert set(idx.tolist()) == {2}
