"""The C++ CPU backend (backend="cpu") against the float64 oracle in vqfast/reference.py.

Shapes are chosen to miss the kernel's blocking: 128-row tiles, row groups of 2 SIMD vectors,
codewords padded to 24 and taken 4 to 12 per step, codebook blocks of 32768 / D codewords, the
compile-time-D kernels (D <= 32) and the runtime-D kernel above. Every test runs at every
instruction level this CPU has (the autouse fixture below; tests/test_cpu_isa.py compares levels).
"""
import subprocess
import sys
import textwrap

import pytest
import torch

import vqfast
from vqfast import _ext
from vqfast.reference import nearest_codeword_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@pytest.fixture(autouse=True, params=_ext.cpu_isa_levels() or ["none"])
def cpu_isa(request):
    """The CPU kernel's instruction level for the test (every level this build and CPU run)."""
    if request.param == "none":
        yield None
        return
    with _ext.forced_cpu_isa(request.param):
        yield request.param


def true_distances(z, codebook, metric):
    """[N, K] float64 distances (small shapes only)."""
    a = z.double()
    b = codebook.double()
    if metric == "cosine":
        a = torch.nn.functional.normalize(a, dim=1, eps=1e-12)
        b = torch.nn.functional.normalize(b, dim=1, eps=1e-12)
    return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)


def check_against_reference(z, codebook, metric, precision="exact"):
    idx, cw, dist = vqfast.nearest_codeword(z, codebook, metric=metric, precision=precision, backend="cpu")
    ridx, rcw, rdist = nearest_codeword_reference(z, codebook, metric)
    assert idx.dtype == torch.int64 and idx.shape == (z.shape[0],)
    assert cw.dtype == z.dtype and cw.shape == z.shape
    assert dist.dtype == torch.float32 and dist.shape == (z.shape[0],)
    assert torch.equal(cw, codebook.index_select(0, idx).to(z.dtype))
    if metric == "l2" and precision == "exact":
        assert torch.equal(idx, ridx)
    else:
        # Cosine normalises in the compute precision (fp32 here, fp64 in the oracle), and "fast"
        # skips the re-rank: a differing index must still be a true minimum up to fp32 rounding.
        td = true_distances(z, codebook, metric)
        mine = td.gather(1, idx[:, None]).squeeze(1)
        best = td.min(1).values
        assert torch.all(mine <= best + 1e-5 * (1 + best)), (mine - best).max()
        assert (idx != ridx).float().mean() < 0.01
    rtol = 1e-12 if torch.float64 in (z.dtype, codebook.dtype) else 1e-5
    if torch.equal(idx, ridx):
        torch.testing.assert_close(dist, rdist, rtol=rtol, atol=1e-6)
    return idx, cw, dist


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("n,k,d", [(1, 1, 1), (3, 17, 3), (130, 513, 17), (517, 100, 32), (257, 1030, 33),
                                   (100, 3, 100), (5, 600, 513)])
def test_matches_reference(n, k, d, dtype, metric):
    z = torch.randn(n, d).to(dtype)
    codebook = torch.randn(k, d).to(dtype)
    check_against_reference(z, codebook, metric)


@pytest.mark.parametrize("d", [8, 64])
def test_fast_precision_picks_a_true_minimum(d):
    z = torch.randn(300, d)
    codebook = torch.randn(700, d)
    check_against_reference(z, codebook, "l2", precision="fast")


@pytest.mark.parametrize("zdt,cdt", [(torch.float16, torch.float32), (torch.float32, torch.float64),
                                     (torch.bfloat16, torch.float16)])
def test_mixed_dtypes(zdt, cdt):
    check_against_reference(torch.randn(77, 20).to(zdt), torch.randn(45, 20).to(cdt), "l2")


@pytest.mark.parametrize("d", [5, 40])
def test_non_contiguous_inputs(d):
    z = torch.randn(2 * d, 301)[:, ::2].T  # [151, 2d] transposed view, then every other column
    z = z[:, ::2]
    codebook = torch.randn(d, 130).T[::2]  # [65, d], strides (2, 130)
    assert not z.is_contiguous() and not codebook.is_contiguous()
    idx, cw, _ = check_against_reference(z, codebook, "l2")
    idx_c, _, _ = vqfast.nearest_codeword(z.contiguous(), codebook.contiguous(), backend="cpu")
    assert torch.equal(idx, idx_c)


def test_empty_and_single_rows():
    codebook = torch.randn(9, 6)
    idx, cw, dist = vqfast.nearest_codeword(torch.empty(0, 6), codebook, backend="cpu")
    assert idx.shape == (0,) and cw.shape == (0, 6) and dist.shape == (0,)
    idx, cw, dist = torch.ops.vqfast.nearest_codeword(torch.empty(0, 6), codebook)
    assert idx.shape == (0,) and cw.shape == (0, 6) and dist.shape == (0,)
    check_against_reference(torch.randn(1, 6), codebook, "l2")
    idx, cw, dist = check_against_reference(torch.randn(50, 6), torch.randn(1, 6), "l2")
    assert torch.all(idx == 0)


@pytest.mark.parametrize("d", [2, 48])
def test_exact_ties_go_to_lowest_index(d):
    # z = 0 is equidistant from +e and -e: every copy ties, index 0 must win in either order.
    e = torch.zeros(d)
    e[0] = 1.0
    z = torch.zeros(5, d)
    for codebook in (torch.stack([e, -e, e, -e]), torch.stack([-e, e])):
        idx, _, dist = vqfast.nearest_codeword(z, codebook, backend="cpu")
        assert torch.all(idx == 0)
        assert torch.all(dist == 1.0)


@pytest.mark.parametrize("d", [7, 64])
@pytest.mark.parametrize("copies", [2, 20])
def test_duplicated_codewords_lowest_index(d, copies):
    # More copies (20) than the kernel keeps as candidates per row (8): the full re-rank path.
    base = torch.randn(600, d)
    dup = torch.randn(d)
    positions = torch.randperm(600)[:copies].sort().values
    base[positions] = dup
    z = dup + 1e-3 * torch.randn(40, d)
    idx, _, _ = check_against_reference(z, base, "l2")
    assert torch.all(idx == positions[0])


@pytest.mark.parametrize("d", [16, 96])
def test_near_ties_under_large_offset(d):
    # Every vector sits near a common offset of 1000: ||z||^2 ~ 1e6 * d, so the fp32 expansion
    # ||z||^2 + ||c||^2 - 2 z.c rounds in steps of ~0.06 * d while true distances differ by ~1e-4.
    offset = 1000.0
    codebook = offset + 1e-2 * torch.randn(256, d)
    z = offset + 1e-2 * torch.randn(200, d)
    plain = ((z * z).sum(1, keepdim=True) + (codebook * codebook).sum(1) - 2 * z @ codebook.T).argmin(1)
    ridx = nearest_codeword_reference(z, codebook, "l2")[0]
    assert (plain != ridx).sum() > 10  # the case really defeats a plain fp32 argmin
    idx, _, _ = check_against_reference(z, codebook, "l2")
    assert torch.equal(idx, ridx)


def test_overflowing_magnitudes():
    # Squared norms overflow fp32 (1e20^2): the bound is infinite and every row is re-ranked in double.
    z = 1e20 * torch.randn(33, 4)
    codebook = 1e20 * torch.randn(50, 4)
    idx, _, _ = vqfast.nearest_codeword(z, codebook, backend="cpu")
    assert torch.equal(idx, nearest_codeword_reference(z, codebook, "l2")[0])


def test_auto_picks_cpu_and_opcheck():
    assert "cpu" in vqfast.available_backends("cpu"), "vqfast._C is not built"
    z, codebook = torch.randn(37, 12), torch.randn(19, 12)
    a = vqfast.nearest_codeword(z, codebook)
    b = vqfast.nearest_codeword(z, codebook, backend="cpu")
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    torch.library.opcheck(torch.ops.vqfast.nearest_codeword.default, (z, codebook, "cosine", "exact"))
    torch.library.opcheck(torch.ops.vqfast.nearest_codeword_checked.default, (z, codebook, "l2", "exact"))


# ---- check_finite inside the search (vqfast::nearest_codeword_checked) --------------------------
# N = 3000: 24 tiles of 128 rows, handed out to the threads; a value met in a late tile stops the
# search wherever it is.


def test_value_checks_run_inside_the_search(monkeypatch):
    # The cpu backend makes no separate scan: the kernel tests the values as it loads them, and
    # scan_values runs only to word an error (count, kind, first row).
    calls = []
    real = vqfast.ops.scan_values
    monkeypatch.setattr(vqfast.ops, "scan_values", lambda z, cb: calls.append(1) or real(z, cb))
    z, codebook = torch.randn(3000, 20), torch.randn(50, 20)
    check_against_reference(z, codebook, "l2")
    assert calls == []
    z[2900, 7] = float("nan")
    with pytest.raises(ValueError, match=r"z contains 1 non-finite value\(s\) \(NaN\), the first in row 2900"):
        vqfast.nearest_codeword(z, codebook, backend="cpu")
    assert calls == [1]
    z[2900, 7] = 0.0
    codebook[49, 19] = -float("inf")
    with pytest.raises(ValueError, match=r"codebook contains 1 non-finite value\(s\) \(Inf\), the first in row 49"):
        vqfast.nearest_codeword(z, codebook, backend="cpu")
    # Without the check the same inputs search (nearest_codeword's own path, no error).
    idx, _, _ = vqfast.nearest_codeword(z, codebook, backend="cpu", check_finite=False)
    assert bool(((idx >= 0) & (idx < 50)).all())
    # The op itself names the input whose value stopped it.
    with pytest.raises(ValueError, match=r"nearest_codeword_checked: codebook holds NaN, Inf or values beyond"):
        torch.ops.vqfast.nearest_codeword_checked(z, codebook)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("where", ["z", "codebook"])
def test_values_beyond_the_float32_limit_search_in_float64(metric, where):
    # 1e19 > magnitude_limit(19, float32) = 1.5e18: the float32 search stops at the tile (or at
    # the codebook) holding it and the whole search runs in float64, as the float64 op would.
    z, codebook = torch.randn(3000, 19), torch.randn(70, 19)
    if where == "z":
        z[2950, 3] = 1e19
    else:
        codebook[69, 3] = 1e19
    idx, cw, dist = vqfast.nearest_codeword(z, codebook, metric=metric, backend="cpu")
    want = torch.ops.vqfast.nearest_codeword(z.double(), codebook.double(), metric, "exact")
    assert torch.equal(idx, want[0]) and torch.equal(dist, want[2])
    assert cw.dtype == torch.float32 and torch.equal(cw, codebook[idx])


def test_fast_precision_on_huge_values_searches_in_float64():
    # At 1e20 every float32 ||c||^2 and product overflows: a float32 search of these values in
    # "fast" precision (no re-rank) returns index 0 for every row; the float64 search is right.
    codebook = torch.randn(40, 9) * 1e20
    picks = torch.randint(0, 40, (3000,))
    z = codebook[picks] + torch.randn(3000, 9) * 1e17
    idx, _, _ = vqfast.nearest_codeword(z, codebook, precision="fast", backend="cpu")
    assert torch.equal(idx, picks)
    unchecked = torch.ops.vqfast.nearest_codeword(z, codebook, "l2", "fast")[0]
    assert not torch.equal(unchecked, picks)  # what the promotion prevents


@pytest.mark.parametrize("cpu_isa", [vqfast.cpu_isa()], indirect=True)  # a subprocess: the default level
def test_memory_is_independent_of_n_times_k(cpu_isa):
    # N = 2^20, K = 16384, D = 32: an N x K fp32 matrix would be 64 GiB. The peak resident memory
    # of the process may grow by the outputs (indices 8 MiB, codewords 128 MiB, distances 4 MiB)
    # plus per-thread tiles, nothing more; 512 MiB leaves room for allocator slack.
    script = textwrap.dedent("""
        import resource, torch, vqfast
        torch.manual_seed(0)
        n, k, d = 1 << 20, 16384, 32
        z = torch.randn(n, d)
        codebook = torch.randn(k, d)
        idx, cw, dist = vqfast.nearest_codeword(z[:1000], codebook, backend="cpu")  # warm-up
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        idx, cw, dist = vqfast.nearest_codeword(z, codebook, backend="cpu")
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        sample = torch.randint(0, n, (200,))
        ref = ((z[sample, None, :].double() - codebook[None].double()) ** 2).sum(-1).argmin(1)
        assert torch.equal(idx[sample], ref), "wrong indices"
        assert torch.equal(cw[sample], codebook[ref])
        print((after - before) * 1024)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    grown = int(out.stdout.strip().splitlines()[-1])
    assert grown < 512 * 2**20, f"peak RSS grew by {grown / 2**20:.0f} MiB"
