"""The C++ CPU kernel: both code paths (register-blocked small D, sgemm + fused scan), exactness, memory."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import vqfast
from tests.helpers import assert_indices_optimal
from vqfast import reference

pytestmark = pytest.mark.skipif(not vqfast.has_ext(), reason="vqfast._C not built")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("d", [1, 3, 8, 16, 17, 31, 32, 33, 100, 257])
@pytest.mark.parametrize("k", [1, 15, 17, 1025, 2049])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_both_paths_match_reference(d, k, metric):
    n = 131
    z = torch.randn(n, d)
    cb = torch.randn(k, d)
    idx, cw, dist = vqfast.nearest_codeword(z, cb, metric=metric, backend="cpu")
    ridx, _, rdist = reference.nearest_codeword_reference(z, cb, metric)
    assert torch.equal(idx, ridx)
    assert torch.equal(cw, cb[idx])
    torch.testing.assert_close(dist, rdist, rtol=2e-6, atol=2e-6)


def test_row_tiles_and_code_blocks_boundaries():
    # N spans two 4096-row tiles with a ragged end; K spans two 1024-code blocks with a ragged end.
    z = torch.randn(4096 + 37, 40)
    cb = torch.randn(1024 + 5, 40)
    idx = vqfast.nearest_codeword(z, cb, backend="cpu")[0]
    assert torch.equal(idx, reference.nearest_codeword_reference(z, cb)[0])


@pytest.mark.parametrize("d", [4, 64])
def test_duplicates_across_and_within_lanes(d):
    cb = torch.randn(100, d)
    for dup in (19, 35, 99):  # 19: another SIMD lane; 35: the same lane (35 = 3 + 2 * 16); 99: ragged tail
        cb[dup] = cb[3]
    z = cb[3].repeat(5, 1) + 1e-4 * torch.randn(5, d)
    z[0] = cb[3]
    for precision in ("exact", "fast"):
        idx = vqfast.nearest_codeword(z, cb, backend="cpu", precision=precision)[0]
        assert idx.tolist() == [3] * 5, precision


@pytest.mark.parametrize("d", [8, 48])
def test_exact_mode_fixes_cancellation(d):
    g = torch.Generator().manual_seed(3)
    cb = 2000.0 + 0.05 * torch.randn(400, d, generator=g)
    z = 2000.0 + 0.05 * torch.randn(300, d, generator=g)
    idx = vqfast.nearest_codeword(z, cb, backend="cpu", check_finite=False)[0]
    assert_indices_optimal(idx, z, cb)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [5, 70])
def test_half_inputs_converted_per_tile(dtype, d):
    z = torch.randn(300, d).to(dtype)
    cb = torch.randn(77, d).to(dtype)
    idx, cw, _ = vqfast.nearest_codeword(z, cb, backend="cpu")
    assert cw.dtype == dtype
    assert torch.equal(idx, reference.nearest_codeword_reference(z, cb)[0])


def test_fast_mode_is_near_optimal():
    z = torch.randn(2000, 64)
    cb = torch.randn(3000, 64)
    idx, _, dist = vqfast.nearest_codeword(z, cb, backend="cpu", precision="fast")
    _, _, rdist = reference.nearest_codeword_reference(z, cb)
    # fp32 sgemm without the re-rank: any wrong pick is within the rounding bound of the best.
    assert (dist - rdist).abs().max() <= 1e-3 * rdist.max()


def test_memory_is_o_n_plus_k_at_64_gib_scale():
    # N = 2^20, K = 16384, D = 32: an N x K fp32 matrix would be 64 GiB. The process's peak resident
    # memory may grow by the inputs, the outputs and a bounded work buffer only.
    code = textwrap.dedent(
        """
        import resource, torch, vqfast
        n, k, d = 1 << 20, 16384, 32
        z = torch.randn(n, d); cb = torch.randn(k, d)
        idx = torch.empty(n, dtype=torch.int64); dist = torch.empty(n); cw = torch.empty(n, d)
        del idx, dist, cw  # touch the output sizes once so the allocator has them
        vqfast.nearest_codeword(z[:4096], cb, backend="cpu")  # warm-up: library initialisation
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        idx, cw, dist = vqfast.nearest_codeword(z, cb, backend="cpu")
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(before, after, int(idx.min()), int(idx.max()))
        """
    )
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr
    before, after, lo, hi = map(int, out.stdout.split()[-4:])
    n, k, d = 1 << 20, 16384, 32
    outputs = n * 8 + n * 4 + n * d * 4  # indices + distances + codewords: 176 MiB
    work = 256 << 20  # tiles, the transposed codebook and allocator slack
    assert after - before <= outputs + work, f"peak RSS grew by {(after - before) / 2**20:.0f} MiB"
    assert after - before < n * k * 4 / 64  # far below 1/64 of the N x K matrix
    assert 0 <= lo <= hi < k
