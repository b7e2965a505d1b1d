"""The C++ CPU backend (backend="cpu") against the independent oracle (vqfast/testing/oracle.py).

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
from tests.helpers import assert_exact, assert_fast

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
CPU = ("cpu", "cpu")
pytestmark = pytest.mark.skipif(not vqfast.has_ext(), reason="vqfast._C is not built")



@pytest.fixture(autouse=True, params=_ext.cpu_isa_levels() or ["none"])
def cpu_isa(request):
    """The CPU kernel's instruction level for the test (every level this build and CPU run)."""
    if request.param == "none":
        yield None
        return
    with _ext.forced_cpu_isa(request.param):
        yield request.param

def check_against_oracle(z, codebook, metric, precision="exact"):
    out = vqfast.nearest_codeword(z, codebook, metric=metric, precision=precision, backend="cpu")
    if precision == "exact":
        assert_exact(z, codebook, out, metric)
    else:
        assert_fast(z, codebook, out, CPU, metric)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("n,k,d", [(1, 1, 1), (3, 17, 3), (130, 513, 17), (517, 100, 32), (257, 1030, 33),
                                   (100, 3, 100), (5, 600, 513)])
def test_matches_oracle(n, k, d, dtype, metric):
    z = torch.randn(n, d).to(dtype)
    codebook = torch.randn(k, d).to(dtype)
    check_against_oracle(z, codebook, metric)


@pytest.mark.parametrize("d", [8, 64])
def test_fast_precision_picks_a_true_minimum(d):
    z = torch.randn(300, d)
    codebook = torch.randn(700, d)
    check_against_oracle(z, codebook, "l2", precision="fast")


@pytest.mark.parametrize("zdt,cdt", [(torch.float16, torch.float32), (torch.float32, torch.float64),
                                     (torch.bfloat16, torch.float16)])
def test_mixed_dtypes(zdt, cdt):
    check_against_oracle(torch.randn(77, 20).to(zdt), torch.randn(45, 20).to(cdt), "l2")


@pytest.mark.parametrize("d", [5, 40])
def test_non_contiguous_inputs(d):
    z = torch.randn(2 * d, 301)[:, ::2].T  # [151, 2d] transposed view, then every other column
    z = z[:, ::2]
    codebook = torch.randn(d, 130).T[::2]  # [65, d], strides (2, 130)
    assert not z.is_contiguous() and not codebook.is_contiguous()
    idx, cw, _ = check_against_oracle(z, codebook, "l2")
    idx_c, _, _ = vqfast.nearest_codeword(z.contiguous(), codebook.contiguous(), backend="cpu")
    assert torch.equal(idx, idx_c)


def test_empty_and_single_rows():
    codebook = torch.randn(9, 6)
    idx, cw, dist = vqfast.nearest_codeword(torch.empty(0, 6), codebook, backend="cpu")
    assert idx.shape == (0,) and cw.shape == (0, 6) and dist.shape == (0,)
    idx, cw, dist = torch.ops.vqfast.nearest_codeword(torch.empty(0, 6), codebook)
    assert idx.shape == (0,) and cw.shape == (0, 6) and dist.shape == (0,)
    check_against_oracle(torch.randn(1, 6), codebook, "l2")
    idx, cw, dist = check_against_oracle(torch.randn(50, 6), torch.randn(1, 6), "l2")
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
    idx, _, _ = check_against_oracle(z, base, "l2")
    assert torch.all(idx == positions[0])


@pytest.mark.parametrize("d", [16, 96])
def test_near_ties_under_large_offset(d):
    # Every vector sits near a common offset of 1000: ||z||^2 ~ 1e6 * d, so the fp32 expansion
    # ||z||^2 + ||c||^2 - 2 z.c rounds in steps of ~0.06 * d while true distances differ by ~1e-4.
    offset = 1000.0
    codebook = offset + 1e-2 * torch.randn(256, d)
    z = offset + 1e-2 * torch.randn(200, d)
    plain = ((z * z).sum(1, keepdim=True) + (codebook * codebook).sum(1) - 2 * z @ codebook.T).argmin(1)
    out = check_against_oracle(z, codebook, "l2")
    assert (plain != out[0]).sum() > 10  # the case really defeats a plain fp32 argmin


def test_overflowing_magnitudes():
    # Squared norms overflow fp32 (1e20^2): the bound is infinite and every row is re-ranked in double.
    z = 1e20 * torch.randn(33, 4)
    codebook = 1e20 * torch.randn(50, 4)
    check_against_oracle(z, codebook, "l2")


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
    check_against_oracle(z, codebook, "l2")
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


@pytest.mark.slow
@pytest.mark.parametrize("cpu_isa", [vqfast.cpu_isa()], indirect=True)  # a subprocess: the default level
def test_memory_is_independent_of_n_times_k(cpu_isa):
    # N = 2^20, K = 4096: an N x K fp32 matrix would be 16 GiB. The peak resident memory of the
    # process may grow by the outputs (indices 8 MiB, codewords 16 MiB, distances 4 MiB) plus
    # per-thread tiles, nothing more; 512 MiB leaves room for allocator slack. D = 4 keeps the
    # 2^20 x 4096 search to seconds on the generic (non-AVX-512) kernel path.
    script = textwrap.dedent("""
        import resource, torch, vqfast
        from vqfast.testing import oracle
        torch.manual_seed(0)
        n, k, d = 1 << 20, 4096, 4
        z = torch.randn(n, d)
        codebook = torch.randn(k, d)
        idx, cw, dist = vqfast.nearest_codeword(z[:1000], codebook, backend="cpu")  # warm-up
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        idx, cw, dist = vqfast.nearest_codeword(z, codebook, backend="cpu")
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        sample = oracle.sample_rows(n, k, d, minimum=512)
        answer = oracle.nearest(z[sample], codebook)
        assert not oracle.exact_violations(answer, idx[sample], codebook).any(), "wrong indices"
        assert torch.equal(cw, codebook[idx])
        print((after - before) * 1024)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    grown = int(out.stdout.strip().splitlines()[-1])
    assert grown < 512 * 2**20, f"peak RSS grew by {grown / 2**20:.0f} MiB"
