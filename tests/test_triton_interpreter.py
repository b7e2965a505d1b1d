"""The Triton kernels on CPU tensors under TRITON_INTERPRET=1, against the independent oracle
(vqfast/testing/oracle.py, a float64 brute force that shares no code with the kernels; the exact
mode's device-side marking and re-rank kernels are judged on the hardest rows by it).

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
    import vqfast.triton as vt
    from vqfast.triton import INTERPRET_CONFIG, INTERPRET_SMS, split_codes

SHAPES = [(1, 1, 1), (1, 3, 7), (37, 17, 53), (50, 100, 33), (19, 1, 40), (3, 40, 1)]


@pytest.mark.parametrize("n,d,k", SHAPES)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_exact_matches_oracle(n, d, k, metric, dtype):
    z = torch.randn(n, d).to(dtype)
    cb = torch.randn(k, d).to(dtype)
    assert_exact(z, cb, vqfast.nearest_codeword(z, cb, metric=metric, backend="triton"), metric)


# The wide BLOCK_D (vqfast.triton.block_d): D = 33 - 256 in one resident z tile of 64, 128 or 256
# features (half-precision exact mode reading an fp32 copy of the codebook there), D = 300 in the
# chunked loop; odd N and K, so that the tiles' masks cut rows, codes and features.
WIDE_D_SHAPES = [(37, 33, 53), (21, 64, 45), (23, 100, 33), (19, 128, 71), (13, 256, 37), (9, 300, 29)]


@pytest.mark.parametrize("n,d,k", WIDE_D_SHAPES)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_wide_d_matches_oracle(n, d, k, metric, dtype):
    assert vt.block_d(d) == (32 if d > 256 else max(64, 1 << (d - 1).bit_length()))
    z = torch.randn(n, d).to(dtype)
    cb = torch.randn(k, d).to(dtype)
    assert_exact(z, cb, vqfast.nearest_codeword(z, cb, metric=metric, backend="triton"), metric)


@pytest.mark.parametrize("n,d,k", WIDE_D_SHAPES)
def test_wide_d_fast_mode_within_its_bound(n, d, k):
    z = torch.randn(n, d)
    cb = torch.randn(k, d)
    assert_fast(z, cb, vqfast.nearest_codeword(z, cb, precision="fast", backend="triton"), ("cuda", "triton"))


@pytest.mark.parametrize("d", [33, 64, 100, 128, 256, 300])
@pytest.mark.parametrize("kind,dtype", [("offset", torch.float32), ("duplicates", torch.bfloat16),
                                        ("lattice", torch.float16)])
def test_wide_d_hard_rows_and_split(d, kind, dtype):
    """The rows the search cannot prove (marked on the device, re-ranked) at wide D, with one split
    (K = 61) and with three (K = 1201, 16 rows: as an H100 would split them)."""
    for n, k in ((21, 61), (15, 1201)):
        z, cb = make_hard_case(kind, n, k, d, seed=d)
        z, cb = z.to(dtype), cb.to(dtype)
        assert (_splits(n, k) > 1) == (k > 512)
        assert_exact(z, cb, vqfast.nearest_codeword(z, cb, backend="triton"))


@pytest.mark.parametrize("d", [64, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_wide_d_ties_take_the_lowest_index(d, dtype):
    # Exact mode only: the interpreter multiplies with NumPy's matmul, whose BLAS rounds equal columns
    # of one product differently at these widths (at D = 64 codeword 20 came out below its copy 2),
    # so fast mode's lowest-index tie (equal columns, equal sums on a GPU) is not observable here.
    cb = torch.randn(75, d).to(dtype)
    cb[20] = cb[2]  # the same code tile
    cb[70] = cb[2]  # a later one
    z = cb[[2, 2, 70]].clone()
    z[1, 0] += 1e-2
    idx = vqfast.nearest_codeword(z, cb, backend="triton")[0]
    assert idx.tolist() == [2, 2, 2]


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
@pytest.mark.parametrize("n", [1, 16, 64, 200])
def test_split_large_codebook_matches_oracle(n):
    """K = 70,001: 137 splits of 512 codes at N = 1 and 16, 61 of 1,152 at N = 64, 21 of 3,456 at N = 200."""
    z = torch.randn(n, 8)
    cb = torch.randn(70_001, 8)
    assert _splits(n, 70_001) == {1: 137, 16: 137, 64: 61, 200: 21}[n]
    assert_exact(z, cb, vqfast.nearest_codeword(z, cb, backend="triton"))


# ---------------------------------------------------------------- the device-side re-rank
# The search marks the rows it cannot prove and appends them to a device list (atomic counter); the
# re-rank kernel walks the list. unproven_rows runs the launcher's steps and reads the counter back.

def unproven_rows(z, cb, exact=True):
    """How many rows the search (and the merge, with splits) put on the re-rank list."""
    zmax, cbmax, cmax_sq, count = (vt._int32_slot(z.device) for _ in range(4))
    cbs, cbn = vt._row_pass(cb, False, cbmax, cmax_sq)
    indices = torch.zeros(z.shape[0], dtype=torch.int64)
    vt._search_rows(z, cbs, cbn, cmax_sq, zmax, count, indices, exact)
    return int(count[0])


@pytest.mark.parametrize("k", [300, 1200])  # one split, three splits
def test_only_unproven_rows_are_listed(k):
    z = torch.randn(20, 8)
    assert unproven_rows(z, torch.randn(k, 8)) < 3  # random data: (almost) every row proven
    assert unproven_rows(z, torch.randn(k, 8), exact=False) == 0  # fast mode lists nothing
    cb = torch.randn(k, 8)
    cb[1::2] = cb[0::2]  # every codeword twice: no row can be proven
    assert unproven_rows(z, cb) == 20


@pytest.mark.parametrize("variant", ["float64", "float32x2"])
@pytest.mark.parametrize("kind,k", [("offset", 70), ("lattice", 70), ("duplicates", 70), ("offset", 1200),
                                    ("duplicates", 1200)])
def test_rerank_variants_match_the_oracle(variant, kind, k, monkeypatch):
    """Both re-rank kernels (float64; compensated float32 for GPUs with a slow float64 unit) on the
    rows the search cannot prove, with one split (K = 70) and with three (K = 1200)."""
    monkeypatch.setenv("VQFAST_TRITON_RERANK", variant)
    z, cb = make_hard_case(kind, 40 if k < 512 else 8, k, 9, seed=11)
    z, cb = z.float(), cb.float()
    assert unproven_rows(z, cb) > 0
    assert_exact(z, cb, vqfast.nearest_codeword(z, cb, backend="triton"))


@pytest.mark.parametrize("variant", ["float64", "float32x2"])
def test_every_row_ambiguous_stays_exact(variant, monkeypatch):
    """A codebook of a few codewords repeated: every row goes to the re-rank, which must find the
    lowest index of the nearest one on every row."""
    monkeypatch.setenv("VQFAST_TRITON_RERANK", variant)
    distinct = torch.randn(3, 5)
    which = torch.randint(0, 3, (300,))
    cb = distinct[which]
    z = torch.randn(20, 5)
    assert unproven_rows(z, cb) == 20
    idx = vqfast.nearest_codeword(z, cb, backend="triton")[0]
    nearest = ((z[:, None, :].double() - distinct[None].double()) ** 2).sum(-1).argmin(1)
    first = torch.stack([(which == j).nonzero()[0, 0] for j in range(3)])
    assert torch.equal(idx, first[nearest])


@pytest.mark.parametrize("variant", ["float64", "float32x2"])
def test_nan_rows_take_codeword_zero(variant, monkeypatch):
    """check_finite=False: a NaN row of z takes codeword 0 (as reference.search does), a NaN codeword
    ranks last for the other rows."""
    monkeypatch.setenv("VQFAST_TRITON_RERANK", variant)
    z = torch.randn(6, 4)
    cb = torch.randn(40, 4)
    z[2, 1] = float("nan")
    cb[0, 3] = float("nan")
    cb[7] = z[4]
    idx = vqfast.nearest_codeword(z, cb, backend="triton", check_finite=False)[0]
    assert idx[2] == 0 and idx[4] == 7
    assert 0 <= int(idx.min()) and int(idx.max()) < 40


def test_rerank_variant_choice(monkeypatch):
    monkeypatch.delenv("VQFAST_TRITON_RERANK", raising=False)
    assert vt.rerank_variant(torch.device("cpu")) == "float64"
    monkeypatch.setenv("VQFAST_TRITON_RERANK", "float32x2")
    assert vt.rerank_variant(torch.device("cpu")) == "float32x2"
    monkeypatch.setenv("VQFAST_TRITON_RERANK", "fp16")
    with pytest.raises(ValueError, match="VQFAST_TRITON_RERANK"):
        vt.rerank_variant(torch.device("cpu"))


# ---------------------------------------------------------------- the flagged op's extremes

def _flagged(z, cb, metric="l2", precision="exact"):
    return torch.ops.vqfast.nearest_codeword_triton_flagged(z, cb, metric, precision)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("k", [70, 1200])  # one split, three splits
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [20, 200])  # BLOCK_D 32 and 256 (bf16 exact: an fp32 codebook copy)
def test_flagged_extremes_are_the_largest_magnitudes(metric, k, dtype, d):
    z = (3.0 * torch.randn(16, d)).to(dtype)
    cb = torch.randn(k, d).to(dtype)
    z[5, 7] = -41.5  # the largest magnitude negative
    for precision in ("exact", "fast"):
        *out, extremes = _flagged(z, cb, metric, precision)
        assert extremes.dtype == torch.float64 and extremes.shape == (2,)
        assert extremes.tolist() == [41.5, float(cb.abs().max())]
        plain = torch.ops.vqfast.nearest_codeword_triton(z, cb, metric, precision)
        for a, b in zip(out, plain):
            assert torch.equal(a, b)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("d", [24, 130, 300])  # the z tile resident at 32 and 256 features, chunked at 300
def test_flagged_extremes_propagate_nan_and_inf(metric, d):
    z = torch.randn(20, d)
    cb = torch.randn(50, d)
    z[3, 20] = float("inf")
    cb[9, 0] = float("-inf")
    ext = _flagged(z, cb, metric)[3]
    assert ext.tolist() == [float("inf"), float("inf")]
    z[17, 2] = float("nan")  # NaN wins over Inf
    idx, _, _, ext = _flagged(z, cb, metric)
    assert ext[0].isnan() and ext[1] == float("inf")
    assert 0 <= int(idx.min()) and int(idx.max()) < 50  # unspecified but in range


def test_flagged_op_fake_and_gradients():
    z = torch.randn(8, 5, requires_grad=True)
    cb = torch.randn(9, 5, requires_grad=True)
    idx, cw, dist, ext = _flagged(z, cb)
    (cw.sum() + dist.sum()).backward()
    z2, cb2 = z.detach().clone().requires_grad_(), cb.detach().clone().requires_grad_()
    (cb2[idx].sum() + ((z2 - cb2[idx]) ** 2).sum()).backward()
    torch.testing.assert_close(z.grad, z2.grad)
    torch.testing.assert_close(cb.grad, cb2.grad)
    with torch._subclasses.fake_tensor.FakeTensorMode():
        fz, fcb = torch.empty(4, 3), torch.empty(6, 3)
        shapes = [t.shape for t in _flagged(fz, fcb)]
    assert shapes == [(4,), (4, 3), (4,), (2,)]


# opcheck's test_aot_dispatch_dynamic sums all outputs into one accumulator, which fails on the int64
# indices beside float outputs (tests/test_op.py says the same of the other ops).
OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor")


@pytest.mark.parametrize("op", ["nearest_codeword_triton", "nearest_codeword_triton_flagged"])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_opcheck(op, metric):
    z = torch.randn(21, 5, requires_grad=True)
    cb = torch.randn(13, 5, requires_grad=True)
    torch.library.opcheck(getattr(torch.ops.vqfast, op).default, (z, cb, metric, "exact"), test_utils=OPCHECK_UTILS)
