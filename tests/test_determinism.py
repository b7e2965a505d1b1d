"""Exact mode is deterministic: the same indices run after run, for any thread count, memory layout,
batch split or chunk size, and across backends (every backend gives the oracle's answer)."""
import pytest
import torch

from tests.helpers import assert_exact, backend_params, run
from vqfast import reference

# Every (device, backend) pair; those that cannot run here appear skipped with the reason.
BACKENDS = backend_params()


N, K, D = 520, 160, 33  # N spans 9 of the CPU kernel's 64-row parallel grains; small enough for TRITON_INTERPRET=1


def _data(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, D, generator=g).to(dtype)
    cb = torch.randn(K, D, generator=g).to(dtype)
    cb[7] = cb[3]  # an exact duplicate: rows nearest to it must always get 3
    z[:20] = cb[7]
    return z, cb


@pytest.mark.parametrize("backend", BACKENDS)
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


@pytest.mark.parametrize("backend", BACKENDS)
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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_every_backend_gives_the_oracle_answer(backend, metric):
    # Hence the same indices on every backend: the oracle's, wherever float64 can decide (all l2
    # rows of this data); cosine normalises in float32 and may differ only within that rounding.
    z, cb = _data()
    out = run(z, cb, backend, metric=metric)
    answer = assert_exact(z, cb, out, metric)
    assert bool((out[0][:20] == 3).all())
    if metric == "l2":
        assert not bool(answer.ambiguous.any()) and torch.equal(out[0], answer.indices)


def test_torch_backend_does_not_depend_on_chunk_size():
    z, cb = _data()
    want = reference.search(z, cb)
    for chunk_elements in (1, K - 1, 7 * K + 3, 10**9):
        assert torch.equal(reference.search(z, cb, chunk_elements=chunk_elements), want)
