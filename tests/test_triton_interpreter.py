"""The Triton kernels on CPU tensors under TRITON_INTERPRET=1, against the independent oracle
(vqfast/testing/oracle.py; Triton's own exact re-rank calls reference.search, so the reference
cannot be the judge of its hardest rows).

TRITON_INTERPRET must be set before the kernels are defined, so tests/test_triton.py runs this file
in a subprocess with it set; in the main test process the module is skipped.
"""
import os

import pytest
import torch

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="run by tests/test_triton.py")

if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.importorskip("triton")
    import vqfast
    from tests.helpers import assert_exact, assert_fast, check_cosine_zero_vectors, make_hard_case
    from vqfast.triton import INTERPRET_CONFIG, INTERPRET_SMS, split_codes

SHAPES = [(1, 1, 1), (1, 3, 7), (37, 17, 53), (50, 100, 33), (19, 1, 40), (3, 40, 1)]


@pytest.mark.parametrize("n,d,k", SHAPES)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_exact_matches_oracle(n, d, k, metric, dtype):
    z = torch.randn(n, d).to(dtype)
    cb = torch.randn(k, d).to(dtype)
    assert_exact(z, cb, vqfast.nearest_codeword(z, cb, metric=metric, backend="triton"), metric)


@pytest.mark.parametrize("kind", ["offset", "lattice", "duplicates", "tiny_codebook"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hard_rows_match_the_oracle(kind, dtype):
    # Near ties at a common offset, exact lattice ties, many duplicates, a tiny codebook: the rows
    # Triton's exact mode sends to its re-rank, judged by code that shares nothing with it.
    z, cb = make_hard_case(kind, 37, 70, 9, seed=5)
    z, cb = z.to(dtype), cb.to(dtype)
    assert_exact(z, cb, vqfast.nearest_codeword(z, cb, backend="triton"))


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_fast_mode_within_its_bound(metric):
    z = torch.randn(40, 24)
    cb = torch.randn(70, 24)
    out = vqfast.nearest_codeword(z, cb, metric=metric, precision="fast", backend="triton")
    assert_fast(z, cb, out, ("cuda", "triton"), metric)  # the interpreter emulates the GPU's tf32 at worst


def test_ties_and_duplicates_lowest_index():
    cb = torch.randn(45, 6)
    cb[20] = cb[2]  # same tile as 2 under the interpreter's 32-wide tiles
    cb[40] = cb[2]  # a later tile
    z = cb[[2, 2, 2]].clone()
    z[1] += 1e-3
    for precision in ("exact", "fast"):
        idx = vqfast.nearest_codeword(z, cb, precision=precision, backend="triton")[0]
        assert idx.tolist() == [2, 2, 2]


def test_exact_mode_survives_cancellation():
    g = torch.Generator().manual_seed(2)
    cb = 2000.0 + 0.05 * torch.randn(60, 8, generator=g)
    z = 2000.0 + 0.05 * torch.randn(40, 8, generator=g)
    assert_exact(z, cb, vqfast.nearest_codeword(z, cb, backend="triton"))


def test_non_contiguous_and_mixed_dtypes():
    z = torch.randn(30, 40)[:, ::4]
    cb = torch.randn(10, 33).T[::3]  # [11, 10], transposed strides
    assert_exact(z, cb, vqfast.nearest_codeword(z, cb, backend="triton"))
    out16 = vqfast.nearest_codeword(z.half(), cb, backend="triton")
    assert out16[1].dtype == torch.float16
    assert_exact(z.half(), cb, out16)


def test_gradients_and_float64_rejected():
    z = torch.randn(12, 5, requires_grad=True)
    cb = torch.randn(7, 5, requires_grad=True)
    idx, cw, dist = vqfast.nearest_codeword(z, cb, backend="triton")
    (cw.sum() + dist.sum()).backward()
    z2, cb2 = z.detach().clone().requires_grad_(), cb.detach().clone().requires_grad_()
    (cb2[idx].sum() + ((z2 - cb2[idx]) ** 2).sum()).backward()
    torch.testing.assert_close(z.grad, z2.grad)
    torch.testing.assert_close(cb.grad, cb2.grad)
    with pytest.raises(ValueError, match="float64"):
        vqfast.nearest_codeword(z.double(), cb.double(), backend="triton")
    assert vqfast.nearest_codeword(z.double(), cb.double())[0].shape == (12,)  # auto falls back


def test_cosine_zero_vectors_follow_the_contract():
    check_cosine_zero_vectors(("cpu", "triton"), dtypes=(torch.float32, torch.float16))


# The codebook split (small N): the interpreter splits as an H100's 132 SMs would (INTERPRET_SMS), so
# K = 2000 runs as 4 splits of 512 codes at every N below, merged by _merge_splits_kernel.
def _splits(n, k):
    return split_codes(n, k, INTERPRET_CONFIG[0], INTERPRET_SMS)[0]


@pytest.mark.parametrize("n", [1, 16, 64, 200])
def test_split_codebook_matches_oracle(n):
    assert _splits(n, 2000) == 4
    z = torch.randn(n, 8)
    cb = torch.randn(2000, 8)
    assert_exact(z, cb, vqfast.nearest_codeword(z, cb, backend="triton"))


def test_split_codebook_fast_mode_and_cosine():
    z = torch.randn(16, 24)
    cb = torch.randn(1500, 24)
    assert _splits(16, 1500) == 3
    assert_fast(z, cb, vqfast.nearest_codeword(z, cb, precision="fast", backend="triton"), ("cuda", "triton"))
    assert_exact(z, cb, vqfast.nearest_codeword(z, cb, metric="cosine", backend="triton"), "cosine")


@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_split_ties_take_the_lowest_index(precision):
    # Duplicates in other splits (512 codes each): the merge keeps the lowest index.
    cb = torch.randn(2000, 6)
    cb[600] = cb[5]
    cb[1999] = cb[5]
    cb[1100] = cb[700]
    z = cb[[5, 600, 1999, 700, 1100]].clone()
    idx = vqfast.nearest_codeword(z, cb, precision=precision, backend="triton")[0]
    assert idx.tolist() == [5, 5, 5, 700, 700]


@pytest.mark.parametrize("kind,dtype", [("offset", torch.float32), ("duplicates", torch.bfloat16)])
def test_split_hard_rows_match_the_oracle(kind, dtype):
    z, cb = make_hard_case(kind, 40, 1200, 9, seed=7)
    z, cb = z.to(dtype), cb.to(dtype)
    assert _splits(40, 1200) > 1
    assert_exact(z, cb, vqfast.nearest_codeword(z, cb, backend="triton"))


@pytest.mark.slow
@pytest.mark.parametrize("n", [1, 16, 200])
def test_split_large_codebook_matches_oracle(n):
    """K = 70,001: 137 splits of 512 codes at N = 1 and 16, 21 of 3,456 at N = 200 (about 8, 8 and 100 s
    here)."""
    z = torch.randn(n, 8)
    cb = torch.randn(70_001, 8)
    assert _splits(n, 70_001) == {1: 137, 16: 137, 200: 21}[n]
    assert_exact(z, cb, vqfast.nearest_codeword(z, cb, backend="triton"))
