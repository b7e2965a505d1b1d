"""Exact mode is deterministic: the same indices run after run, for any thread count, memory layout,
batch split or chunk size, and across backends (except rows whose best and second-best distances tie
within float32 rounding, where the contract allows either)."""
import pytest
import torch

import vqfast
from vqfast import reference

# (device, backend) for every backend that can run here; CUDA pairs only where a GPU is visible.
BACKENDS = [("cpu", b) for b in vqfast.available_backends("cpu")] + (
    [("cuda", b) for b in vqfast.available_backends("cuda")] if torch.cuda.is_available() else []
)
BACKEND_IDS = [f"{device}-{backend}" for device, backend in BACKENDS]


def run(z, cb, device_backend, **kwargs):
    """nearest_codeword on the pair's device; outputs come back on the CPU for comparison."""
    device, backend = device_backend
    out = vqfast.nearest_codeword(z.to(device), cb.to(device), backend=backend, **kwargs)
    return tuple(t.cpu() for t in out)


N, K, D = 520, 160, 33  # N spans 9 of the CPU kernel's 64-row parallel grains; small enough for TRITON_INTERPRET=1


def _data(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, D, generator=g).to(dtype)
    cb = torch.randn(K, D, generator=g).to(dtype)
    cb[7] = cb[3]  # an exact duplicate: rows nearest to it must always get 3
    z[:20] = cb[7]
    return z, cb


def _separated_rows(z, cb, metric):
    """Rows whose best and second-best true distances differ by more than float32 rounding."""
    a = reference.normalize_for_metric(z.double(), metric)
    b = reference.normalize_for_metric(cb.double(), metric)
    unique = torch.unique(b, dim=0)  # duplicates tie exactly: they resolve by index, not by rounding
    true = torch.cdist(a, unique) ** 2
    two = true.topk(2, dim=1, largest=False).values
    tol = 4 * (D + 4) * 2.0**-24 * (two[:, 0] + (1.0 if metric == "cosine" else 0.0) + 1e-30)
    return (two[:, 1] - two[:, 0]) > tol


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_run_after_run_and_across_thread_counts(backend, metric, dtype):
    z, cb = _data(dtype)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n_threads in (1, 2, 3):
            torch.set_num_threads(n_threads)
            outs.append(run(z, cb, backend, metric=metric))
    finally:
        torch.set_num_threads(threads)
    for out in outs[1:]:
        for got, want in zip(out, outs[0]):
            assert torch.equal(got, want)
    assert bool((outs[0][0][:20] == 3).all())


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_answer_depends_only_on_values_not_layout_or_batch(backend):
    z, cb = _data()
    want = run(z, cb, backend)
    # Non-contiguous views holding the same values.
    z_t = z.t().contiguous().t()
    cb_strided = torch.empty(K, 2 * D)[:, ::2]
    cb_strided.copy_(cb)
    for zz, cc in ((z_t, cb), (z, cb_strided), (z_t, cb_strided)):
        assert not (zz.is_contiguous() and cc.is_contiguous())
        indices, codewords, distances = run(zz, cc, backend)
        assert torch.equal(indices, want[0]) and torch.equal(codewords, want[1])
        # torch's sum over D may vectorise differently for other strides: last-bit differences only.
        torch.testing.assert_close(distances, want[2], rtol=4 * (D + 4) * 2.0**-24, atol=0)
    # Any split of the batch: a row's answer does not depend on its neighbours.
    parts = [run(z[a:b], cb, backend)[0] for a, b in ((0, 1), (1, 130), (130, 131), (131, N))]
    assert torch.equal(torch.cat(parts), want[0])


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_backends_agree(metric):
    z, cb = _data()
    ref_indices, _, ref_distances = reference.nearest_codeword_reference(z, cb, metric)
    separated = _separated_rows(z, cb, metric)
    # The exclusion must stay rare, or the comparison below would prove little.
    assert int(separated.sum()) >= N - 5
    for backend in BACKENDS:
        indices, codewords, distances = run(z, cb, backend, metric=metric)
        assert torch.equal(indices[separated], ref_indices[separated]), backend
        assert bool((indices[:20] == 3).all()), backend
        assert torch.equal(codewords, cb[indices])
        torch.testing.assert_close(distances, ref_distances, rtol=1e-5, atol=1e-5)


def test_torch_backend_does_not_depend_on_chunk_size():
    z, cb = _data()
    want = reference.search(z, cb)
    for chunk_elements in (1, K - 1, 7 * K + 3, 10**9):
        assert torch.equal(reference.search(z, cb, chunk_elements=chunk_elements), want)
