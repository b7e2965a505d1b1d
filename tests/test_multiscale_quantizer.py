"""vqfast.models.MultiScaleQuantizer: VAR's VectorQuantizer2 bit for bit by default, and each codebook option
checked against a plain-torch oracle of the scale loop (fp64 distances, its own area / bicubic resampling)."""
import pytest
import torch
import torch.nn.functional as F

from tests.helpers import end_gloo_worker
from vqfast.compat.var import VectorQuantizer2
from vqfast.models import MultiScaleQuantizer
from vqfast.multiscale import VARQuantizer

V, C = 23, 5
PATCH_NUMS = (1, 2, 4, 7)
ARGS = (V, C, False, 0.25, 0, PATCH_NUMS, 0.5, 4)


def make(cls=MultiScaleQuantizer, seed=0, **options):
    torch.manual_seed(seed)
    q = cls(*ARGS, **options)
    if isinstance(q.embedding, torch.nn.Embedding):
        q.embedding.weight.data.mul_(0.5)  # codes on the scale of the residuals below
    return q


def features(seed=1, batch=3):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, C, 7, 7, generator=gen)


def phi(conv, h):
    """(1 - r) h + r conv3x3(h) in fp64; Identity (no weight) when quant_resi is 0."""
    if not hasattr(conv, "weight"):
        return h
    r = conv.resi_ratio
    return (1 - r) * h + r * F.conv2d(h, conv.weight.double(), conv.bias.double(), padding=1)


def by_image(per_scale, batch):
    """Rows pooled over the scales in the order the learning steps see them: image 0's rows at every
    scale (coarse to fine), then image 1's, ... (the same order in one process and across ranks)."""
    out = []
    for b in range(batch):
        for rows in per_scale:
            n = rows.shape[0] // batch
            out.append(rows[b * n:(b + 1) * n])
    return torch.cat(out)


def oracle(q, f, rows_of=lambda rest: rest, codes=None, metric="l2", lookup=None):
    """The scale loop from its definition: per scale (searched rows, their indices, f_hat after it), and f_hat.

    rows_of maps residual rows [N, C] to the searched rows; codes [V, d] are the searched codes;
    lookup(idx) gives what a token adds ([..., C]); metric "l2" or "cosine" (fp64 either way).
    """
    codes = q.embedding.weight.detach() if codes is None else codes
    lookup = lookup or (lambda idx: q.embedding(idx))
    B, _, H, W = f.shape
    rest, f_hat, records = f.clone().double(), torch.zeros_like(f).double(), []
    for si, p in enumerate(PATCH_NUMS):
        z = rest if p == H else F.interpolate(rest, size=(p, p), mode="area")
        z = z.permute(0, 2, 3, 1).reshape(-1, C)
        rows = rows_of(z.float()).detach().double()
        if metric == "cosine":
            idx = (F.normalize(rows, dim=1) @ F.normalize(codes.double(), dim=1).T).argmax(1)
        else:
            idx = torch.cdist(rows, codes.double()).argmin(1)
        h = lookup(idx.view(B, p, p)).detach().double().permute(0, 3, 1, 2)
        if p != H:
            h = F.interpolate(h, size=(H, W), mode="bicubic")
        h = phi(q.quant_resi[si / (len(PATCH_NUMS) - 1)], h)
        f_hat, rest = f_hat + h, rest - h
        records.append((rows.float(), idx, f_hat.float()))
    return records, f_hat.float()


# ---- defaults: VAR's quantizer ---------------------------------------------------------------------

def test_one_engine_under_both_multiscale_quantizers():
    """vqfast.models and vqfast.compat.var build on vqfast.multiscale; models imports nothing from compat."""
    import ast
    import pathlib

    import vqfast.models

    assert issubclass(MultiScaleQuantizer, VARQuantizer) and issubclass(VectorQuantizer2, VARQuantizer)
    assert not issubclass(MultiScaleQuantizer, VectorQuantizer2)
    for path in pathlib.Path(vqfast.models.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "vqfast.compat" or n.startswith("vqfast.compat.") for n in names), path.name


def test_defaults_are_vars_quantizer_bit_for_bit():
    mine, var = make(), make(VectorQuantizer2)
    assert list(mine.state_dict()) == list(var.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(mine.state_dict().values(), var.state_dict().values()))
    assert mine.codebook_options() == {}
    mine.train(), var.train()
    for step in range(3):
        f = features(seed=step).requires_grad_()
        g = f.detach().clone().requires_grad_()
        a, b = mine(f, ret_usages=True), var(g, ret_usages=True)
        assert torch.equal(a[0], b[0]) and a[1] == b[1] and torch.equal(a[2], b[2])
        (a[0].square().sum() + a[2]).backward()
        (b[0].square().sum() + b[2]).backward()
        assert torch.equal(f.grad, g.grad)
    for (name, p), p2 in zip(mine.named_parameters(), var.parameters()):
        assert torch.equal(p.grad, p2.grad), name
    assert torch.equal(mine.ema_vocab_hit_SV, var.ema_vocab_hit_SV)
    f = features(seed=9)
    for to_fhat in (False, True):
        for x, y in zip(mine.f_to_idxBl_or_fhat(f, to_fhat), var.f_to_idxBl_or_fhat(f, to_fhat)):
            assert torch.equal(x, y)


def test_usage_per_scale_counts_every_forward():
    q = make().eval()
    records, _ = oracle(q, features())
    q(features())
    q(features())
    for si, (_, idx, _) in enumerate(records):
        assert torch.equal(q.code_hits_SV[si], 2 * torch.bincount(idx, minlength=V))
    assert q.usage_per_scale() == [float((torch.bincount(i, minlength=V) > 0).double().mean()) for _, i, _ in records]
    hits = sum(torch.bincount(i, minlength=V) for _, i, _ in records).double()
    p = hits / hits.sum()
    assert q.codebook_usage() == float((hits > 0).double().mean())
    assert q.perplexity() == pytest.approx(float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum())))
    assert "code_hits_SV" not in q.state_dict()
    q.reset_usage()
    assert q.perplexity() == 0.0 and q.codebook_usage() == 0.0


# ---- each option against the oracle ------------------------------------------------------------------

@pytest.mark.parametrize("batch", [1, 3])  # with one image the last scale's rows are a view of the residual
def test_ema_moves_codes_to_the_mean_of_their_rows_over_all_scales(batch):
    q = make(ema=True, decay=0.8)
    assert not q.embedding.weight.requires_grad and q.quant_resi.qresi_ls[0].weight.requires_grad
    avg0 = q.embed_avg.clone()
    f = features(batch=batch)
    records, _ = oracle(q, f)
    q.train()(f)
    rows = torch.cat([r for r, _, _ in records])
    idx = torch.cat([i for _, i, _ in records])
    counts = torch.bincount(idx, minlength=V).float()
    sums = torch.zeros(V, C).index_add_(0, idx, rows)
    size = 0.8 * 1.0 + 0.2 * counts
    avg = 0.8 * avg0 + 0.2 * sums
    n = size.sum()
    want = avg / ((size + 1e-5) / (n + V * 1e-5) * n)[:, None]
    torch.testing.assert_close(q.cluster_size, size)
    torch.testing.assert_close(q.embedding.weight, want, rtol=1e-5, atol=1e-6)


def test_dead_codes_restart_from_rows_of_every_scale(monkeypatch):
    q = make(dead_code_threshold=0.5)
    q.embedding.weight.data[:8] += 100.0  # codes 0..7 are never chosen
    f = features()
    records, _ = oracle(q, f)
    seen = []
    real = MultiScaleQuantizer._restart_dead_codes
    monkeypatch.setattr(MultiScaleQuantizer, "_restart_dead_codes",
                        lambda self, rows: (seen.append(rows.clone()), real(self, rows))[1])
    q.train()
    q.cluster_size[:8] = 0.1  # dead (an unused code's EMA usage decays from 1 below 0.5 after 69 steps)
    q.cluster_size[8:] = 5.0
    before = q.embedding.weight.detach().clone()
    q(f)
    rows = by_image([r for r, _, _ in records], 3)
    assert len(seen) == 1 and seen[0].shape == (3 * sum(p * p for p in PATCH_NUMS), C)
    torch.testing.assert_close(seen[0], rows)  # the pooled rows of all scales
    assert torch.equal(q.embedding.weight[8:], before[8:])
    for code in q.embedding.weight[:8]:
        assert bool((seen[0] == code).all(1).any()), "a restarted code is not a row of this batch"


def test_kmeans_init_fits_the_rows_of_every_scale():
    q = make(kmeans_init=True, kmeans_iters=6)
    q.embedding.weight.data.mul_(20.0)  # a useless random codebook
    f = features(batch=6)
    _, before = oracle(q, f)
    q.train()(f)
    assert bool(q.initted) and not q._kmeans_pending
    records, after = oracle(q, f)
    assert F.mse_loss(after, f) < 0.5 * F.mse_loss(before, f)
    used = torch.unique(torch.cat([i for _, i, _ in records]))
    assert len(used) >= 0.8 * V
    q(f)  # later steps do not re-initialise
    assert not q._kmeans_pending


def test_kmeans_init_seeds_from_f_at_every_scale(monkeypatch):
    q = make(kmeans_init=True, kmeans_iters=2)
    seen = []
    real = MultiScaleQuantizer._kmeans_init
    monkeypatch.setattr(MultiScaleQuantizer, "_kmeans_init", lambda self, rows: (seen.append(rows), real(self, rows))[1])
    f = features()
    q.train()(f)
    want = by_image([F.interpolate(f, size=(p, p), mode="area").permute(0, 2, 3, 1).reshape(-1, C)
                     for p in PATCH_NUMS], f.shape[0])
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], want)


def test_l2_codes_search_by_cosine_and_add_unit_codes():
    q = make(l2_codes=True)
    f = features()
    codes = F.normalize(q.embedding.weight.detach(), dim=1)
    records, f_hat = oracle(q, f, codes=codes, metric="cosine", lookup=lambda idx: codes[idx])
    torch.testing.assert_close(q.embedding.codes().norm(dim=1), torch.ones(V))
    idx = q.f_to_idxBl_or_fhat(f, to_fhat=False)
    assert all(torch.equal(a.flatten(), b) for a, b in zip(idx, [i for _, i, _ in records]))
    torch.testing.assert_close(q.f_to_idxBl_or_fhat(f, to_fhat=True)[-1], f_hat, rtol=1e-4, atol=1e-5)


def test_low_dimensional_lookup():
    q = make(codebook_dim=2)
    assert q.embedding.weight.shape == (V, 2) and q.project_in.weight.shape == (2, C)
    f = features()
    records, f_hat = oracle(q, f, rows_of=q.project_in, codes=q.embedding.weight.detach(),
                            lookup=lambda idx: q.embedding.project_out(q.embedding.weight[idx]))
    idx = q.f_to_idxBl_or_fhat(f, to_fhat=False)
    assert all(torch.equal(a.flatten(), b) for a, b in zip(idx, [r[1] for r in records]))
    torch.testing.assert_close(q.f_to_idxBl_or_fhat(f, to_fhat=True)[-1], f_hat, rtol=1e-4, atol=1e-5)
    q.train()
    _, _, loss = q(f)
    # VAR's loss, (1 + beta) * the mean over scales of mse(f_hat_s, f) in value, plus per scale the
    # projection's reconstruction of the residual and the commitment of the rows to their codes.
    rest = _residual_rows(q, f)
    var_loss = 1.25 * sum(F.mse_loss(fh, f) for _, _, fh in records) / len(records)
    extra = sum(F.mse_loss(q.embedding.project_out(rows), z) + 0.25 * F.mse_loss(rows, q.embedding.weight[i])
                for (rows, i, _), z in zip(records, rest)) / len(records)
    torch.testing.assert_close(loss, var_loss + extra, rtol=1e-4, atol=1e-6)
    loss.backward()
    assert q.project_in.weight.grad.abs().sum() > 0 and q.embedding.project_out.weight.grad.abs().sum() > 0


def _residual_rows(q, f):
    """Each scale's residual rows [N, C] (before the projection), from the oracle's loop."""
    out = []
    oracle(q, f, rows_of=lambda rest: (out.append(rest), q.project_in(rest))[1], codes=q.embedding.weight.detach(),
           lookup=lambda idx: q.embedding.project_out(q.embedding.weight[idx]))
    return out


def test_simvq_learns_a_map_over_a_frozen_table():
    q = make(simvq=True)
    t = q.embedding
    assert not t.weight.requires_grad and torch.equal(t.transform.weight, torch.eye(C))
    torch.testing.assert_close(t.codes(), t.weight)
    with torch.no_grad():
        t.transform.weight.copy_(torch.randn(C, C) * 0.5)
    codes = t.weight @ t.transform.weight.T
    torch.testing.assert_close(t.codes(), codes)
    f = features()
    records, f_hat = oracle(q, f, codes=codes.detach(), lookup=lambda idx: codes.detach()[idx])
    idx = q.f_to_idxBl_or_fhat(f, to_fhat=False)
    assert all(torch.equal(a.flatten(), b) for a, b in zip(idx, [i for _, i, _ in records]))
    q.train()
    f_hat_st, _, loss = q(f)
    loss.backward()
    assert t.weight.grad is None and t.transform.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("options", [
    dict(l2_codes=True, dead_code_threshold=0.5), dict(codebook_dim=3, ema=True, dead_code_threshold=0.5),
    dict(simvq=True, kmeans_init=True), dict(l2_codes=True, codebook_dim=3, kmeans_init=True, dead_code_threshold=2.0),
])
def test_combined_options_train(options):
    """Forward, backward and an optimizer step with the in-place codebook updates in between."""
    q = make(**options).train()
    opt = torch.optim.Adam([p for p in q.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        f = features(seed=step).requires_grad_()
        f_hat, _, loss = q(f)
        (F.mse_loss(f_hat, torch.zeros_like(f_hat)) + loss).backward()
        opt.step()
        opt.zero_grad()
        assert f.grad is not None and torch.isfinite(loss)
    assert set(q.codebook_options()) == set(options)


def test_option_errors():
    with pytest.raises(TypeError, match="unknown codebook option"):
        make(emma=True)
    with pytest.raises(ValueError, match="simvq .* cannot be combined with ema"):
        make(simvq=True, ema=True)
    with pytest.raises(ValueError, match="codebook_dim"):
        make(codebook_dim=0)
    with pytest.raises(TypeError, match="l2_codes must be a bool"):
        make(l2_codes="yes")
    with pytest.raises(ValueError, match="decay"):
        make(ema=True, decay=1.5)


# ---- torch.distributed -------------------------------------------------------------------------------

SPLITS = [(1, 3), (3, 1), (2, 2), (1, 3), (3, 1)]  # images per rank of each global batch of 4


def _dist_models():
    torch.manual_seed(0)
    synced = MultiScaleQuantizer(*ARGS, ema=True, decay=0.7, kmeans_init=True, kmeans_iters=2, dead_code_threshold=2.0)
    torch.manual_seed(0)
    ema_only = MultiScaleQuantizer(*ARGS, ema=True, decay=0.7)
    return synced.train(), ema_only.train()


def _dist_train(models, rank=None):
    for step, split in enumerate(SPLITS):
        f = features(seed=100 + step, batch=4)
        if rank is not None:
            f = f[sum(split[:rank]): sum(split[: rank + 1])]
        for q in models:
            q(f)
    return [{k: v.clone() for k, v in q.state_dict().items()} for q in models]


def _dist_worker(rank, init_file, out_dir):
    import datetime
    import os

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.save(_dist_train(_dist_models(), rank), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    end_gloo_worker()


@pytest.mark.slow
def test_two_gloo_ranks_keep_one_codebook(tmp_path):
    """Every option's statistics and draws are synchronised: both ranks end with the same state, and
    with EMA alone (order-free sums) it is one process's state on the concatenated batches."""
    import torch.multiprocessing as mp

    mp.spawn(_dist_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for a, b in zip(*ranks):
        assert list(a) == list(b)
        for key in a:
            assert torch.equal(a[key], b[key]), key
    synced, ema_only = ranks[0]
    assert bool(synced["initted"])
    single = _dist_train(_dist_models())[1]
    for key, value in single.items():
        torch.testing.assert_close(ema_only[key], value, rtol=1e-5, atol=1e-6)
