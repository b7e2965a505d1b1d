"""Property tests of nearest_codeword on every (device, backend) pair against the independent oracle
(vqfast/testing/oracle.py: float64 brute force, direct sums, no code shared with any backend).

Exact mode is held to the contract with no float32 slack: the oracle's pick on every row, the lowest
index on exact ties. Fast mode is held to the per-row bound derived from each backend's documented
rounding (oracle.fast_rounding); its measured mismatch rate is printed at the end of the run.

The inputs reach the hard cases: shapes across the CPU kernel's 128-row tiles, 512-codeword blocks,
32-codeword micro-kernel steps and its D <= 32 / D > 32 paths (N, K up to a few thousand); common
offsets (1e3 +- 1e-2, where the expansion cancels every digit); integer and half-integer lattices
with exact ties; many duplicated codewords (more than the kernel's 8 candidates per row); codebooks
tiny next to z; magnitudes of 1e-30 and 1e19, and every value at its own magnitude (1e-30 to 1e12)
at those shapes; fp16 / bf16; non-contiguous views. CI draws a fixed set of examples (conftest.py,
profile "ci"); `pytest --slow` draws ten times as many at random and runs the larger sweeps.
"""
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tests.helpers import KINDS, assert_exact, assert_fast, backend_params, examples, make_hard_case, run

BACKENDS = backend_params()
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Largest finite value each dtype can take from a float32/float64 draw without the cast overflowing.
# float64 stops at 1e150, under its overflow limit at D = 100 (magnitude_limit: 4.7e152).
DTYPE_MAX = {**{t: float(torch.finfo(t).max) for t in (torch.float16, torch.bfloat16, torch.float32)}, torch.float64: 1e150}

# Sizes on both sides of the CPU kernel's blocking: 32-codeword micro-kernel steps, 128-row tiles,
# 512-codeword blocks, the small-D path's 2048-codeword block at D = 8; the GPU kernels' 64-row and
# 64-code tiles fall on the same edges.
EDGES = (1, 2, 3, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 257, 511, 512, 513, 1023, 1025, 2047, 2049, 3001)
DIMS = (1, 2, 3, 4, 5, 7, 8, 15, 16, 17, 31, 32, 33, 48, 64, 100, 129)
# N * K * D per example at most: the oracle's float64 sums and the torch backend's candidate
# re-rank (which holds every candidate's features) both stay near a few hundred MiB.
BUDGET = 1 << 24


def _layout(x: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values in another memory layout."""
    if kind == "transposed":
        return x.t().contiguous().t()
    if kind == "strided":
        big = torch.zeros(x.shape[0], 2 * x.shape[1] + 1, dtype=x.dtype)
        view = big[:, 1::2]
        view.copy_(x)
        return view
    return x


@st.composite
def arbitrary_inputs(draw):
    """Arbitrary finite values of each dtype's full range (subnormals and near-max included)."""
    n = draw(st.integers(0, 24))
    k = draw(st.integers(1, 24))
    d = draw(st.one_of(st.integers(1, 40), st.sampled_from([64, 100])))
    z_dtype, cb_dtype = draw(st.sampled_from(DTYPES)), draw(st.sampled_from(DTYPES))
    metric = draw(st.sampled_from(["l2", "cosine"]))

    def tensor(shape, dtype):
        width = 64 if dtype == torch.float64 else 32
        bound = DTYPE_MAX[dtype]
        elements = st.floats(-bound, bound, allow_nan=False, allow_infinity=False, width=width)
        arr = draw(hnp.arrays(np.float64 if width == 64 else np.float32, shape, elements=elements))
        return torch.from_numpy(arr).to(dtype)

    return tensor((n, d), z_dtype), tensor((k, d), cb_dtype), metric


@st.composite
def hard_inputs(draw):
    kind = draw(st.sampled_from(KINDS))
    d = draw(st.sampled_from(DIMS))
    n = draw(st.one_of(st.integers(1, 40), st.sampled_from(EDGES)))
    k = draw(st.one_of(st.integers(1, 40), st.sampled_from(EDGES)))
    while n * k * d > BUDGET:  # keep the edge that was drawn for the larger side
        if n >= k:
            n = max(1, n // 2)
        else:
            k = max(1, k // 2)
    scale = draw(st.sampled_from([1e-30, 1e19])) if kind == "magnitude" else 1.0
    # fp16 cannot hold 1e19 or 2^40 (they become inf, which is rejected, not searched).
    dtypes = {"magnitude": (torch.float32, torch.float64), "wide": (torch.float32, torch.bfloat16, torch.float64)}
    dtype = draw(st.sampled_from(dtypes.get(kind, DTYPES)))
    metric = draw(st.sampled_from(["l2", "l2", "l2", "cosine"]))
    layout = draw(st.sampled_from(["contiguous", "contiguous", "transposed", "strided"]))
    z, cb = make_hard_case(kind, n, k, d, draw(st.integers(0, 2**31 - 1)), scale)
    return _layout(z.to(dtype), layout), _layout(cb.to(dtype), layout), metric


@pytest.mark.parametrize("backend", BACKENDS)
@examples(60)
@given(inputs=arbitrary_inputs())
def test_arbitrary_values_exact(backend, inputs):
    z, cb, metric = inputs
    assert_exact(z, cb, run(z, cb, backend, metric=metric), metric)


@pytest.mark.parametrize("backend", BACKENDS)
@examples(60)
@given(inputs=hard_inputs())
def test_hard_cases_exact(backend, inputs):
    z, cb, metric = inputs
    assert_exact(z, cb, run(z, cb, backend, metric=metric), metric)


@pytest.mark.parametrize("backend", BACKENDS)
@examples(30)
@given(inputs=arbitrary_inputs())
def test_arbitrary_values_fast_within_bound(backend, inputs):
    z, cb, metric = inputs
    assert_fast(z, cb, run(z, cb, backend, metric=metric, precision="fast"), backend, metric)


@pytest.mark.parametrize("backend", BACKENDS)
@examples(30)
@given(inputs=hard_inputs())
def test_hard_cases_fast_within_bound(backend, inputs):
    z, cb, metric = inputs
    assert_fast(z, cb, run(z, cb, backend, metric=metric, precision="fast"), backend, metric)


def _mixed_case(n, k, d, seed):
    """Gaussian data with the hard parts placed across block edges: copies of codeword 5 in later
    blocks, queries exactly on codewords and half-way between two codewords in different blocks."""
    z, cb = make_hard_case("gaussian", n, k, d, seed)
    for j in (k // 2, k - 1, 511, 512, 2047):
        if 5 < j < k:
            cb[j] = cb[5]
    rows = torch.arange(0, n, 7)
    a = torch.arange(rows.numel()) % k
    b = (a * 131 + 517) % k
    z[rows] = (cb[a] + cb[b]) / 2  # equidistant from a and b (up to the rounding of the midpoint)
    z[1::11] = cb[5]
    return z.float(), cb.float()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,k,d", [(3001, 2049, 8), (2049, 3001, 33), (1025, 1023, 100), (129, 513, 32)])
def test_large_shapes_across_every_block_edge(backend, n, k, d):
    z, cb = _mixed_case(n, k, d, seed=n + k + d)
    assert_exact(z, cb, run(z, cb, backend), "l2")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,k,d", [(2049, 1025, 16), (1000, 1500, 64)])
def test_large_shapes_fast_within_bound(backend, n, k, d):
    z, cb = make_hard_case("gaussian", n, k, d, seed=3)
    z, cb = z.float(), cb.float()
    assert_fast(z, cb, run(z, cb, backend, precision="fast"), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", [8, 64])
def test_common_offset_defeats_a_plain_float32_argmin(backend, d):
    z, cb = make_hard_case("offset", 600, 700, d, seed=d)
    z, cb = z.float(), cb.float()
    plain = ((z * z).sum(1, keepdim=True) + (cb * cb).sum(1) - 2 * z @ cb.T).argmin(1)
    answer = assert_exact(z, cb, run(z, cb, backend), "l2")
    assert int((plain != answer.indices).sum()) > 60, "the data no longer provokes cancellation"
    assert not bool(answer.ambiguous.any())  # float64 sums on this grid are exact: every row decided


@pytest.mark.parametrize("backend", BACKENDS)
@examples(40)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 300),
    k=st.sampled_from([1, 2, 7, 33, 100, 513]),
    d=st.sampled_from([1, 2, 5, 32, 33, 100]),
    levels=st.integers(1, 4),
    dtype=st.sampled_from(DTYPES),
)
def test_exact_ties_on_integer_grids_go_to_the_lowest_index(backend, seed, n, k, d, levels, dtype):
    # Small integers: every distance is an exact integer in any dtype (at most 100 * 8^2 = 6400),
    # so ties are exact and common, and the answer is unique: the lowest index at the minimum.
    g = torch.Generator().manual_seed(seed)
    z = torch.randint(-levels, levels + 1, (n, d), generator=g).to(dtype)
    cb = torch.randint(-levels, levels + 1, (k, d), generator=g).to(dtype)
    indices, _, distances = out = run(z, cb, backend)
    answer = assert_exact(z, cb, out)
    assert not bool(answer.ambiguous.any())
    assert torch.equal(indices, answer.indices)
    assert torch.equal(distances, answer.best.float())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("exponent", [-75, -72, -70, -66])
def test_subnormal_squares_keep_the_exact_argmin(backend, exponent):
    # From 2^-75 to 2^-63 float32 products are subnormal and lose up to half a subnormal spacing each:
    # the ranking bound's underflow term (8 (D + 3) x smallest normal x eps) sends such rows to the
    # float64 re-rank. Without it the CPU kernel got 123 of these 256 rows wrong at 2^-75; a kernel
    # that flushes subnormals to zero (-ffast-math, FTZ/DAZ) loses far more than the term covers.
    g = torch.Generator().manual_seed(exponent)
    z = (torch.randn(256, 4, generator=g, dtype=torch.float64) * 2.0**exponent).float()
    cb = (torch.randn(64, 4, generator=g, dtype=torch.float64) * 2.0**exponent).float()
    assert_exact(z, cb, run(z, cb, backend))


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,k,d", [(16385, 4097, 32), (8191, 16385, 64), (4096, 4096, 256)])
def test_large_shapes_sweep(backend, n, k, d):
    z, cb = _mixed_case(n, k, d, seed=1)
    assert_exact(z, cb, run(z, cb, backend), "l2")
