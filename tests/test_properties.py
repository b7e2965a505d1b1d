"""Property-based tests (hypothesis) of nearest_codeword on every available backend, against fp64
brute force: arbitrary shapes and values (subnormal to near float32's max), mixed dtypes,
duplicated codewords (lowest index wins), exact and near ties.

What "exact" promises (reference.py): the chosen codeword's true distance is the minimum up to the
rounding of the search dtype (float32, or float64 when either input is float64):
    d(chosen) <= d_min * (1 + rtol) + atol,  rtol = 4 (D + 4) u,  atol = 2 (D + 4) * smallest subnormal
with u the unit roundoff; cosine adds the rounding of the normalisation, 8 (D + 4) u absolute.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import vqfast
from vqfast._validation import search_dtype

# (device, backend) for every backend that can run here; CUDA pairs only where a GPU is visible.
BACKENDS = [("cpu", b) for b in vqfast.available_backends("cpu")] + (
    [("cuda", b) for b in vqfast.available_backends("cuda")] if torch.cuda.is_available() else []
)
BACKEND_IDS = [f"{device}-{backend}" for device, backend in BACKENDS]

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Largest finite value each dtype can take from a float32/float64 draw without the cast overflowing.
# float64 stops at 1e150, under its overflow limit at D = 100 (magnitude_limit: 4.7e152).
DTYPE_MAX = {**{t: float(torch.finfo(t).max) for t in (torch.float16, torch.bfloat16, torch.float32)}, torch.float64: 1e150}
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}
# 2^-149 (float32) / 2^-1074 (float64): an underflowing product loses at most half of this, so two
# compared sums of D products differ from the truth by at most D times it.
SUBNORMAL = {torch.float32: 2.0**-149, torch.float64: 2.0**-1074}

PROPERTY = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def run(z, cb, device_backend, **kwargs):
    """nearest_codeword on the pair's device; outputs come back on the CPU for comparison."""
    device, backend = device_backend
    out = vqfast.nearest_codeword(z.to(device), cb.to(device), backend=backend, **kwargs)
    return tuple(t.cpu() for t in out)


def _normalize(x: torch.Tensor, metric: str) -> torch.Tensor:
    return F.normalize(x, dim=-1, eps=1e-12) if metric == "cosine" else x


def true_distances(z: torch.Tensor, cb: torch.Tensor, metric: str) -> torch.Tensor:
    """[N, K] distances in float64, computed directly (no expansion, no cancellation)."""
    a, b = _normalize(z.double(), metric), _normalize(cb.double(), metric)
    return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)


def first_occurrence(cb: torch.Tensor) -> torch.Tensor:
    """[K]: the lowest index holding a bitwise-identical copy of each codeword."""
    same = (cb[:, None, :] == cb[None, :, :]).all(-1)  # [K, K]
    return same.to(torch.int64).argmax(1)


def assert_exact(z, cb, metric, out, precision="exact"):
    indices, codewords, distances = out
    n, d = z.shape
    k = cb.shape[0]
    assert indices.dtype == torch.int64 and indices.shape == (n,)
    assert codewords.dtype == z.dtype and codewords.shape == (n, d)
    assert distances.dtype == torch.float32 and distances.shape == (n,)
    assert bool(((indices >= 0) & (indices < k)).all())
    assert torch.equal(codewords, cb[indices].to(z.dtype))
    if n == 0:
        return
    dtype = search_dtype(z, cb)
    u = UNIT_ROUNDOFF[dtype] if precision == "exact" else 2.0**-8  # "fast": bf16 products at worst
    true = true_distances(z, cb, metric)
    d_min = true.min(1).values
    d_sel = true.gather(1, indices[:, None])[:, 0]
    atol = 2 * (d + 4) * SUBNORMAL[dtype]
    if metric == "cosine":
        atol += 8 * (d + 4) * UNIT_ROUNDOFF[dtype]
    if precision == "exact":
        slack = 4 * (d + 4) * u * d_min + atol
    else:  # the expansion's error bound (reference.py), twice: both compared distances carry it
        zn = _normalize(z.double(), metric).norm(dim=1)
        cmax = _normalize(cb.double(), metric).norm(dim=1).max()
        slack = 4 * (d + 4) * u * (zn + cmax) ** 2 + atol
    bad = d_sel > d_min + slack
    assert not bool(bad.any()), (
        f"rows {bad.nonzero()[:5, 0].tolist()}: chosen {d_sel[bad][:5].tolist()} vs min {d_min[bad][:5].tolist()}"
    )
    if precision == "exact":
        # Among bitwise-identical codewords the lowest index wins.
        assert torch.equal(indices, first_occurrence(cb)[indices])
    # Reported distance: the chosen codeword's distance in float32 (+inf beyond float32's max), within
    # the expansion bound of reference.py for backends that report the expanded value.
    zn = _normalize(z.double(), metric).norm(dim=1)
    cn = _normalize(cb.double(), metric).norm(dim=1)[indices]
    expected = d_sel.float().double()
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isinf(distances[~finite]), torch.ones_like(distances[~finite], dtype=torch.bool))
    err = (distances.double() - expected)[finite].abs()
    bound = (4 * (d + 4) * UNIT_ROUNDOFF[torch.float32] * (expected + 2 * (zn + cn) ** 2) + atol)[finite]
    assert bool((err <= bound).all()), f"distance errors {err[err > bound][:5].tolist()}"


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
def structured_inputs(draw):
    """Gaussian data at one magnitude from 2^-140 to 2^120, with duplicated codewords, queries sitting
    on codewords, and codewords one ulp apart (near ties)."""
    seed = draw(st.integers(0, 2**31 - 1))
    n, k = draw(st.integers(1, 40)), draw(st.integers(2, 40))
    d = draw(st.sampled_from([1, 2, 3, 5, 8, 17, 33, 100]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    # Half the draws land where float32 arithmetic breaks down: squares turning subnormal
    # (2^-75..2^-63), products flushing to zero (2^-140), squares overflowing (2^64 and up).
    exponent = draw(st.one_of(st.integers(-140, 120), st.integers(-76, -62), st.sampled_from([-140, 64, 100, 120])))
    metric = draw(st.sampled_from(["l2", "cosine"]))
    g = torch.Generator().manual_seed(seed)
    cb = (torch.randn(k, d, generator=g, dtype=torch.float64) * 2.0**exponent).to(dtype)
    z = (torch.randn(n, d, generator=g, dtype=torch.float64) * 2.0**exponent).to(dtype)
    # Duplicates in both orders (a later copy of an earlier codeword, and the reverse).
    for _ in range(draw(st.integers(0, 4))):
        src, dst = (int(i) for i in torch.randint(0, k, (2,), generator=g))
        cb[dst] = cb[src]
    # Near ties: a codeword one ulp away from another.
    for _ in range(draw(st.integers(0, 3))):
        src, dst = (int(i) for i in torch.randint(0, k, (2,), generator=g))
        cb[dst] = torch.nextafter(cb[src], torch.full_like(cb[src], float("inf")))
    # Queries sitting exactly on a codeword (distance 0: must pick its lowest duplicate).
    rows = torch.randint(0, n, (draw(st.integers(0, n)),), generator=g)
    cb_rows = torch.randint(0, k, (rows.numel(),), generator=g)
    z[rows] = cb[cb_rows]
    return z, cb, metric


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
@settings(PROPERTY, max_examples=60)
@given(inputs=arbitrary_inputs())
def test_arbitrary_values_match_fp64_brute_force(backend, inputs):
    z, cb, metric = inputs
    assert_exact(z, cb, metric, run(z, cb, backend, metric=metric))


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
@settings(PROPERTY, max_examples=60)
@given(inputs=structured_inputs())
def test_duplicates_near_ties_and_extreme_magnitudes(backend, inputs):
    z, cb, metric = inputs
    assert_exact(z, cb, metric, run(z, cb, backend, metric=metric))


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
@settings(PROPERTY, max_examples=40)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 50),
    k=st.integers(1, 50),
    d=st.integers(1, 100),
    levels=st.integers(1, 4),
    dtype=st.sampled_from(DTYPES),
)
def test_exact_ties_on_integer_grids_go_to_the_lowest_index(backend, seed, n, k, d, levels, dtype):
    # Small integers: every distance is an exact integer in any dtype (at most 100 * 8^2 = 6400),
    # so ties are exact and common, and the answer is unique: the lowest index at the minimum.
    g = torch.Generator().manual_seed(seed)
    z = torch.randint(-levels, levels + 1, (n, d), generator=g).to(dtype)
    cb = torch.randint(-levels, levels + 1, (k, d), generator=g).to(dtype)
    indices, _, distances = run(z, cb, backend)
    true = true_distances(z, cb, "l2")
    d_min = true.min(1, keepdim=True).values
    expected = (true == d_min).to(torch.int64).argmax(1)  # first index at the minimum
    assert torch.equal(indices, expected)
    assert torch.equal(distances, d_min[:, 0].float())


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
@settings(PROPERTY, max_examples=30)
@given(inputs=arbitrary_inputs())
def test_fast_precision_stays_within_its_error_bound(backend, inputs):
    z, cb, metric = inputs
    out = run(z, cb, backend, metric=metric, precision="fast")
    assert_exact(z, cb, metric, out, precision="fast")



@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("exponent", [-75, -72, -70, -66])
def test_subnormal_squares_keep_the_exact_argmin(backend, exponent):
    # From 2^-75 to 2^-63 float32 squares are subnormal: IEEE gradual underflow keeps the ranking
    # within the absolute tolerance, a kernel that flushes subnormals to zero (-ffast-math, FTZ/DAZ;
    # torch.set_flush_denormal(True) reproduces it) fails here at 2^-72..2^-66.
    g = torch.Generator().manual_seed(exponent)
    z = (torch.randn(256, 4, generator=g, dtype=torch.float64) * 2.0**exponent).float()
    cb = (torch.randn(64, 4, generator=g, dtype=torch.float64) * 2.0**exponent).float()
    assert_exact(z, cb, "l2", run(z, cb, backend))
