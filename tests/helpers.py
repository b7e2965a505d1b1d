"""Shared test utilities: the backends to parametrize over, and checks against the independent oracle
(vqfast/testing/oracle.py: plain float64 brute force, no code shared with any backend)."""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch
from hypothesis import HealthCheck, settings
from torch.utils._python_dispatch import TorchDispatchMode

import vqfast
from vqfast.backends import AUTO_ORDER, REGISTRY
from vqfast.testing import oracle

# Every (device, backend) pair the contract covers, from the registry: each device type a backend
# serves, in "auto"'s order. Pairs that cannot run here still appear, skipped with the reason the
# registry gives (no GPU, no CUDA build, no triton), never silently absent.
DEVICE_BACKENDS = tuple((device, name) for device, names in AUTO_ORDER.items() for name in names)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(relpath: str, name: str):
    """A script of this checkout that is not a package module (benchmarks/plot.py, scripts/*.py) as
    module ``name``, registered in sys.modules (dataclasses look their module up there)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, relpath))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def backend_unavailable_reason(device: str, backend: str) -> str | None:
    b = REGISTRY[backend]
    if device == "cuda" and not torch.cuda.is_available():
        return "needs a CUDA device"
    return b.unavailable_reason() or b.device_reason(device)


def backend_params(pairs=DEVICE_BACKENDS) -> list:
    """pytest.param per (device, backend), id "device-backend", skipped with a reason where it cannot run."""
    out = []
    for device, backend in pairs:
        reason = backend_unavailable_reason(device, backend)
        marks = [pytest.mark.skip(reason=f"{device}-{backend}: {reason}")] if reason else []
        if device == "cuda":
            marks.append(pytest.mark.gpu)
        out.append(pytest.param((device, backend), id=f"{device}-{backend}", marks=marks))
    return out


def run(z, cb, device_backend, **kwargs):
    """nearest_codeword on the pair's device; outputs come back on the CPU for comparison."""
    device, backend = device_backend
    out = vqfast.nearest_codeword(z.to(device), cb.to(device), backend=backend, **kwargs)
    return tuple(t.cpu() for t in out)


# Hypothesis: a fixed, derandomised set of examples in CI (the "ci" profile, loaded by conftest.py);
# `pytest --slow` loads the "slow" profile and multiplies every test's examples by SLOW_FACTOR.
SLOW_FACTOR = 10


def examples(n: int) -> settings:
    scale = SLOW_FACTOR if os.environ.get("VQFAST_SLOW_TESTS") == "1" else 1
    return settings(max_examples=n * scale, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


KINDS = ("gaussian", "offset", "lattice", "duplicates", "tiny_codebook", "magnitude", "wide")


def make_hard_case(kind: str, n: int, k: int, d: int, seed: int, scale: float = 1.0):
    """(z [n, d], codebook [k, d]) in float64, built so that ``kind`` is the hard part."""
    g = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    if kind == "offset":
        # Every value 1e3 +- 1e-2: ||z||^2 ~ 1e6 D swamps distances of ~1e-4 D, so a float32 expansion
        # keeps no correct digit; on float32's 2^-14 grid there the float64 distances are exact.
        cb = 1000.0 + 0.01 * randn(k, d)
        z = 1000.0 + 0.01 * randn(n, d)
    elif kind == "lattice":
        # Distinct-or-not points of a small integer grid in shuffled order; queries on half-integers
        # sit at exactly equal distances from 2^(#half coordinates) codewords.
        cb = torch.randint(-2, 3, (k, d), generator=g).double()
        z = torch.randint(-4, 5, (n, d), generator=g).double() / 2
    elif kind == "duplicates":
        # A few distinct codewords, each repeated many times (beyond 8 copies: the CPU kernel's
        # candidate list overflows), shuffled; queries on them, near them and between them.
        distinct = randn(max(1, min(k, 3)), d)
        cb = distinct[torch.randint(0, distinct.shape[0], (k,), generator=g)]
        pick = torch.randint(0, k, (n,), generator=g)
        z = cb[pick] + 1e-3 * randn(n, d) * (torch.rand(n, 1, generator=g) < 0.5)
    elif kind == "wide":
        # Every value at its own magnitude, 2^-100 to 2^40 (1e-30 to 1e12): products underflow,
        # one feature dominates a distance, signs mixed.
        def wide(*shape):
            exponent = torch.randint(-100, 41, shape, generator=g).double()
            mantissa = 1 + torch.rand(*shape, generator=g, dtype=torch.float64)
            return torch.sign(randn(*shape)) * mantissa * 2.0**exponent
        cb, z = wide(k, d), wide(n, d)
    elif kind == "tiny_codebook":
        # The classic initialisation: uniform in [-1/K, 1/K] next to unit-scale z.
        cb = (torch.rand(k, d, generator=g, dtype=torch.float64) * 2 - 1) / k
        z = randn(n, d)
    else:  # "gaussian", and "magnitude" with its scale (1e-30, 1e19, ...)
        cb = randn(k, d) * scale
        z = randn(n, d) * scale
    # Some queries exactly on a codeword (distance 0: the lowest copy must win).
    on = torch.rand(n, generator=g) < 0.1
    z[on] = cb[torch.randint(0, k, (int(on.sum()),), generator=g)]
    return z, cb


def _rows(mask: torch.Tensor, limit: int = 5) -> list[int]:
    return mask.nonzero()[:limit, 0].tolist()


def check_outputs(z, codebook, out) -> None:
    """Shapes, dtypes, index range and codewords = codebook[indices] in z's dtype."""
    indices, codewords, distances = out
    n, d = z.shape
    assert indices.dtype == torch.int64 and indices.shape == (n,)
    assert codewords.dtype == z.dtype and codewords.shape == (n, d)
    assert distances.dtype == torch.float32 and distances.shape == (n,)
    assert bool(((indices >= 0) & (indices < codebook.shape[0])).all()), "indices out of range"
    assert torch.equal(codewords, codebook[indices.to(codebook.device)].to(z.dtype).to(codewords.device)), \
        "codewords != codebook[indices]"


def assert_exact(z, codebook, out, metric: str = "l2") -> oracle.Answer:
    """Exact mode: the oracle's pick on every row (lowest index on exact ties), no float32 slack, and the
    reported distances; see vqfast/testing/oracle.py for the contract and the only room allowed."""
    check_outputs(z, codebook, out)
    indices, _, distances = out  # the oracle runs on z's device (float64 sums are fast on a GPU too)
    dtype = oracle.effective_search_dtype(z, codebook)
    answer = oracle.nearest(z, codebook, metric)
    indices = indices.to(answer.dist.device)
    wrong = oracle.exact_violations(answer, indices, codebook, dtype)
    if bool(wrong.any()):
        rows = _rows(wrong)
        raise AssertionError(
            f"{int(wrong.sum())} of {len(indices)} rows are not the exact nearest codeword; rows {rows}: "
            f"picked {indices[rows].tolist()} at {answer.chosen(indices)[rows].tolist()}, "
            f"oracle {answer.indices[rows].tolist()} at {answer.best[rows].tolist()}"
        )
    assert_distances(answer, indices, distances, dtype)
    return answer


# Fast mode measured against the oracle, per "device-backend": [rows whose index differs, rows whose
# distance is above the minimum (ties excluded), rows]. conftest.py prints it at the end of the run.
FAST_MISMATCH: dict[str, list[int]] = {}


def assert_fast(z, codebook, out, device_backend, metric: str = "l2") -> float:
    """Fast mode: every row within the bound derived from the backend's documented rounding
    (oracle.fast_rounding / fast_bound). Returns (and records) the fraction of rows that differ from the oracle."""
    check_outputs(z, codebook, out)
    indices, _, distances = out
    device, backend = device_backend
    dtype = oracle.effective_search_dtype(z, codebook)
    wide = torch.float64 if dtype == torch.float64 else None
    u_op, u_acc = oracle.fast_rounding(backend, device, wide or z.dtype, wide or codebook.dtype, metric)
    answer = oracle.nearest(z, codebook, metric)
    indices = indices.to(answer.dist.device)
    bound = oracle.fast_bound(z, codebook, metric, u_op, u_acc)
    wrong = oracle.fast_violations(answer, indices, bound)
    if bool(wrong.any()):
        rows = _rows(wrong)
        got = answer.chosen(indices)
        raise AssertionError(
            f"{int(wrong.sum())} of {len(indices)} fast-mode rows exceed the rounding bound; rows {rows}: "
            f"excess {(got - answer.best)[rows].tolist()} > bound {bound[rows].tolist()}"
        )
    assert_distances(answer, indices, distances, dtype)
    tally = FAST_MISMATCH.setdefault(f"{device}-{backend}", [0, 0, 0])
    tally[0] += int((indices != answer.indices).sum())
    tally[1] += int((~answer.within_rounding(answer.chosen(indices))).sum())
    tally[2] += len(indices)
    return oracle.mismatch_fraction(answer, indices)


def assert_distances(answer: oracle.Answer, indices, distances, dtype=torch.float32) -> None:
    bad = oracle.distance_violations(answer, indices, distances, dtype)
    if bool(bad.any()):
        rows = _rows(bad)
        raise AssertionError(f"reported distances off at rows {rows}: {distances[rows].tolist()} vs "
                             f"{answer.chosen(indices)[rows].tolist()}")


class MaxNumel(TorchDispatchMode):
    """Records the largest tensor any aten op produces (a check that no N x K tensor is built)."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


def check_cosine_zero_vectors(device_backend, dtypes=(torch.float32, torch.float16, torch.float64)) -> None:
    """metric="cosine"'s contract for zero vectors (vqfast/reference.py): a zero row of z takes codeword 0
    with distance exactly 1, or the first zero codeword with distance 0; other rows are searched as usual."""
    g = torch.Generator().manual_seed(26)
    z = torch.randn(70, 16, generator=g)
    zero = torch.zeros(70, dtype=torch.bool)
    zero[[0, 7, 33, 69]] = True
    z[zero] = 0.0
    z[33] = -0.0  # a negative zero is a zero
    cb = torch.randn(64, 16, generator=g) * torch.linspace(0.5, 2.0, 64)[:, None]  # lengths far from 1
    with_zeros = cb.clone()
    with_zeros[[5, 9]] = 0.0
    for dtype in dtypes:
        for codebook, index, distance in ((cb, 0, 1.0), (with_zeros, 5, 0.0)):
            zd, cd = z.to(dtype), codebook.to(dtype)
            for precision in ("exact", "fast"):
                for check_finite in (True, False):
                    out = run(zd, cd, device_backend, metric="cosine", precision=precision, check_finite=check_finite)
                    check_outputs(zd, cd, out)
                    where = f"{device_backend} {dtype} {precision} check_finite={check_finite}"
                    assert out[0][zero].tolist() == [index] * 4, where
                    assert out[2][zero].tolist() == [distance] * 4, where
                    if precision == "exact":  # the other rows as the oracle has them
                        keep = ~zero
                        assert_exact(zd[keep], cd, tuple(t[keep] for t in out), "cosine")
    # A codebook of zero codewords only: every row takes codeword 0; zero rows at distance 0.
    out = run(z, torch.zeros(3, 16), device_backend, metric="cosine")
    assert out[0].tolist() == [0] * 70 and out[2][zero].tolist() == [0.0] * 4


def end_gloo_worker() -> None:
    """Leave a gloo worker started by torch.multiprocessing.spawn once its results are saved, without the
    interpreter's teardown. There, after destroy_process_group, a worker that ran vqfast's searches aborted
    now and then in native code ("terminate called without an active exception", SIGABRT: 3 of 30 runs of
    test_two_gloo_ranks_keep_one_codebook, every collective done and every result written); a plain gloo
    worker did not (0 of 40). The tests judge the state the workers saved; an exception raised before this
    call still fails them."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

