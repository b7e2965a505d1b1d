"""The Triton kernels on CPU tensors under TRITON_INTERPRET=1, against the reference.

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
    from tests.helpers import assert_indices_optimal
    from vqfast import reference

SHAPES = [(1, 1, 1), (1, 3, 7), (37, 17, 53), (50, 100, 33), (19, 1, 40), (3, 40, 1)]


@pytest.mark.parametrize("n,d,k", SHAPES)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_exact_matches_reference(n, d, k, metric, dtype):
    z = torch.randn(n, d).to(dtype)
    cb = torch.randn(k, d).to(dtype)
    idx, cw, dist = vqfast.nearest_codeword(z, cb, metric=metric, backend="triton")
    ridx, _, rdist = reference.nearest_codeword_reference(z, cb, metric)
    assert torch.equal(idx, ridx)
    assert cw.dtype == dtype and torch.equal(cw, cb[idx])
    torch.testing.assert_close(dist, rdist, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_fast_mode_near_optimal(metric):
    z = torch.randn(40, 24)
    cb = torch.randn(70, 24)
    idx, _, dist = vqfast.nearest_codeword(z, cb, metric=metric, precision="fast", backend="triton")
    _, _, rdist = reference.nearest_codeword_reference(z, cb, metric)
    assert (dist - rdist).abs().max() <= 1e-3 * (1 + rdist.max())


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
    idx = vqfast.nearest_codeword(z, cb, backend="triton")[0]
    assert_indices_optimal(idx, z, cb)


def test_non_contiguous_and_mixed_dtypes():
    z = torch.randn(30, 40)[:, ::4]
    cb = torch.randn(10, 33).T[::3]  # [11, 10], transposed strides
    idx, cw, _ = vqfast.nearest_codeword(z, cb, backend="triton")
    assert torch.equal(idx, reference.nearest_codeword_reference(z, cb)[0])
    assert torch.equal(cw, cb[idx])
    idx16, cw16, _ = vqfast.nearest_codeword(z.half(), cb, backend="triton")
    assert cw16.dtype == torch.float16
    assert torch.equal(idx16, reference.nearest_codeword_reference(z.half().float(), cb)[0])


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
