"""Planted bugs for tests/test_mutations.py: test-only machinery, not part of the vqfast package.

Each mutation is applied in memory to a pytest process started with VQFAST_MUTATION=<name>
(tests/conftest.py applies it before any test module is imported), and tests/test_mutations.py
requires the tests listed for it to fail. A mutation that the suite does not catch "survives".
No file is edited, and none of them touches the C++ or CUDA sources. There are two kinds:

  - Simulated kernel bugs (the seven "simulated CPU kernel bug: ..." entries). They do not change the compiled
    kernel. They wrap the op that vqfast.ops dispatches to for backend="cpu", call the real kernel,
    and then corrupt its outputs in Python (indices, codewords or distances) the way a bug in the
    kernel would corrupt them; the codewords and distances stay consistent with the corrupted
    indices unless they are the bug. What they prove is that the tests examine every output the
    kernel returns closely enough to see such a bug, not that a particular edit of csrc/ is caught.
    "no-fp64-rerank" is the closest to a real kernel edit: it runs the kernel's own fast mode,
    which is its exact search minus the float64 re-rank.
  - Python source mutations (the reference search, the module loss, EMA, dead-code restarts, the
    benchmark): one exact piece of a function's source text is replaced and the definition is
    re-executed; a mutation whose text is gone raises, so a refactor cannot silently turn it into
    a no-op.
"""
from __future__ import annotations

import dataclasses
import inspect
import textwrap
from typing import Callable

import torch

from vqfast.testing import oracle


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str
    what: str
    apply: Callable[[], None]
    # pytest arguments (paths, node ids, -k expressions) of the tests that must catch it.
    tests: tuple[str, ...]


def patch_source(owner, name: str, old: str, new: str) -> None:
    """Redefine owner.<name> (a function or method) with ``old`` replaced by ``new`` in its source."""
    func = getattr(owner, name)
    source = textwrap.dedent(inspect.getsource(func))
    if source.count(old) != 1:
        raise RuntimeError(f"{getattr(owner, '__name__', owner)}.{name} no longer contains {old!r} exactly once: "
                           f"update tests/mutations.py")
    namespace: dict = {}
    code = compile(source.replace(old, new), inspect.getsourcefile(func), "exec")
    exec(code, inspect.unwrap(func).__globals__, namespace)
    setattr(owner, name, namespace[name])


# ------------------------------------------------------------------------ simulated CPU kernel bugs


def wrap_backend(backend: str, corrupt: Callable) -> None:
    """Every call of ``backend``'s op through vqfast.nearest_codeword (modules included) goes through
    corrupt(op, z, codebook, metric, precision) -> (indices, codewords, distances)."""
    from vqfast import ops

    real = ops._op_for

    def op_for(name: str, checked: bool = False):
        op = real(name, checked)
        if name != backend:
            return op
        return lambda z, codebook, metric="l2", precision="exact": corrupt(op, z, codebook, metric, precision)

    ops._op_for = op_for


def _with_indices(z, codebook, metric, out, rows, new):
    """out with indices[rows] = new, codewords and distances recomputed for them (consistently)."""
    indices, codewords, distances = (t.clone() for t in out)
    if rows.numel() == 0:
        return indices, codewords, distances
    indices[rows] = new.to(indices.device)
    codewords[rows] = codebook[indices[rows]].to(codewords.dtype)
    a = oracle.normalized(z[rows], metric)
    b = oracle.normalized(codebook[indices[rows]], metric)
    distances[rows] = ((a - b) ** 2).sum(1).float()
    return indices, codewords, distances


def _every(n: int, step: int, first: int, device) -> torch.Tensor:
    """Row indices first, first + step, ... below n (none when n <= first)."""
    rows = torch.arange(n, device=device)
    return rows[rows % step == first]


def _second_best(dist: torch.Tensor) -> torch.Tensor:
    """[M] the lowest index at the second-smallest distinct value of each row of dist [M, K]
    (the row minimum's index when all values are equal)."""
    if dist.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=dist.device)
    best = dist.min(1, keepdim=True).values
    rest = torch.where(dist > best, dist, torch.full_like(dist, float("inf")))
    second = rest.min(1, keepdim=True).values
    pick = torch.where(torch.isinf(second), best, second)
    return (dist == pick).to(torch.int8).argmax(1)


def _second_nearest_on_one_percent(op, z, codebook, metric, precision):
    out = op(z, codebook, metric, precision)
    rows = _every(z.shape[0], 100, 99, z.device)  # rows 99, 199, ...: 1 %
    new = _second_best(oracle.distances(z[rows], codebook, metric))
    return _with_indices(z, codebook, metric, out, rows, new)


def _without_rerank(op, z, codebook, metric, precision):
    return op(z, codebook, metric, "fast")  # the kernel's fast mode is exactly its search minus the re-rank


def _wrong_on_near_ties(op, z, codebook, metric, precision):
    """Rows whose two best distances lie within the float32 ranking bound (the rows the kernel must
    re-rank) take the second-nearest codeword instead."""
    out = op(z, codebook, metric, precision)
    dist = oracle.distances(z, codebook, metric)
    a, b = oracle.normalized(z, metric), oracle.normalized(codebook, metric)
    two = dist.topk(min(2, dist.shape[1]), dim=1, largest=False).values
    cmax = (b * b).sum(1).max().sqrt()
    bound = 2 * oracle.gamma(z.shape[1] + 3, 2.0**-24) * cmax * (2 * (a * a).sum(1).sqrt() + cmax)
    near = (two[:, -1] - two[:, 0] <= 2 * bound) & (two[:, -1] > two[:, 0])
    rows = near.nonzero()[:, 0]
    return _with_indices(z, codebook, metric, out, rows, _second_best(dist[rows]))


def _highest_index_on_ties(op, z, codebook, metric, precision):
    out = op(z, codebook, metric, precision)
    dist = oracle.distances(z, codebook, metric)
    chosen = dist.gather(1, out[0].to(dist.device)[:, None])
    tied = dist == chosen
    last = dist.shape[1] - 1 - tied.flip(1).to(torch.int8).argmax(1)
    rows = torch.arange(z.shape[0], device=z.device)
    return _with_indices(z, codebook, metric, out, rows, last)


def _codewords_off(op, z, codebook, metric, precision):
    indices, codewords, distances = op(z, codebook, metric, precision)
    return indices, codewords + 1e-3, distances


def _distances_from_the_expansion(op, z, codebook, metric, precision):
    """Distances as ||z||^2 + ||c||^2 - 2 z.c in float32 instead of the direct sum."""
    indices, codewords, _ = op(z, codebook, metric, precision)
    a = oracle.normalized(z, metric).float()
    c = oracle.normalized(codebook, metric).float()[indices]
    return indices, codewords, (a * a).sum(1) + (c * c).sum(1) - 2 * (a * c).sum(1)


def _fast_ten_percent_wrong(op, z, codebook, metric, precision):
    out = op(z, codebook, metric, precision)
    k = codebook.shape[0]
    if precision != "fast" or k == 1:
        return out
    rows = _every(z.shape[0], 10, 3, z.device)  # rows 3, 13, ...: 10 %
    shift = 1 + (rows * 7919) % (k - 1)  # another codeword, spread over the codebook
    return _with_indices(z, codebook, metric, out, rows, (out[0][rows] + shift) % k)


# ------------------------------------------------------------------------ Python functions


def _reference_without_rerank() -> None:
    from vqfast import reference

    real = reference._search_chunk
    reference._search_chunk = lambda zc, cb, sq, mx, exact, *rest: real(zc, cb, sq, mx, False, *rest)


def _beta_on_the_wrong_term() -> None:
    from vqfast.modules import VectorQuantizer

    patch_source(VectorQuantizer, "_loss", "F.mse_loss(q, z_cl.detach()) + self.beta * F.mse_loss(q.detach(), z_cl)",
                 "self.beta * F.mse_loss(q, z_cl.detach()) + F.mse_loss(q.detach(), z_cl)")


def _laplace_smoothing_off() -> None:
    from vqfast.modules import VectorQuantizer

    patch_source(VectorQuantizer, "_update_ema", "smoothed = (self.cluster_size + self.eps) / (n + k * self.eps) * n",
                 "smoothed = self.cluster_size")


def _dead_code_at_the_threshold() -> None:
    from vqfast.modules import VectorQuantizer

    patch_source(VectorQuantizer, "_restart_dead_codes", "dead = self.cluster_size < self.dead_code_threshold",
                 "dead = self.cluster_size <= self.dead_code_threshold")


def _bench_checks_against_vqfast() -> None:
    """The benchmark's mismatch column measured against vqfast's own search instead of the oracle."""
    import vqfast
    from vqfast.bench import forward

    def self_referential(z, codebook, rows):
        sub = z[rows]
        answer = oracle.nearest(sub, codebook)
        answer.indices = vqfast.nearest_codeword(sub, codebook)[0].to(answer.indices.device)
        answer.ambiguous = torch.ones_like(answer.ambiguous)
        answer.exact_sums = False
        answer.best = answer.chosen(answer.indices)
        return answer

    forward.oracle_answer = self_referential


def _bench_hides_errors() -> None:
    """A provider that crashes is reported as skipped, and the run exits 0."""
    from vqfast.bench import table

    patch_source(table, "failures", 'if r["status"] == "error"', 'if r["status"] == "no such status"')


def _cpu(corrupt):
    return lambda: wrap_backend("cpu", corrupt)


# The tests that must catch each bug, most direct first (each run stops at its first failure).
ORACLE = "tests/test_cpu_backend.py::test_matches_oracle"
NEAR_TIES = "tests/test_cpu_backend.py::test_near_ties_under_large_offset"
TIES = ("tests/test_cpu_backend.py::test_exact_ties_go_to_lowest_index",
        "tests/test_cpu_backend.py::test_duplicated_codewords_lowest_index")
FAST = ("tests/test_cpu_backend.py::test_fast_precision_picks_a_true_minimum",
        "tests/test_properties.py::test_large_shapes_fast_within_bound")
BENCH_TESTS = ("tests/test_bench.py::test_a_wrong_kernel_fails_the_benchmark",
               "tests/test_bench.py::test_a_crashing_provider_is_an_error_not_a_skip")

MUTATIONS = {m.name: m for m in (
    Mutation("second-nearest-on-1%", "simulated CPU kernel bug: rows 99, 199, ... get the second-nearest codeword",
             _cpu(_second_nearest_on_one_percent), (ORACLE,)),
    Mutation("no-fp64-rerank", "simulated CPU kernel bug: exact mode skips the float64 re-rank",
             _cpu(_without_rerank),
             (NEAR_TIES, "tests/test_properties.py::test_common_offset_defeats_a_plain_float32_argmin")),
    Mutation("near-ties-wrong",
             "simulated CPU kernel bug: rows within the float32 bound take the second-nearest codeword",
             _cpu(_wrong_on_near_ties), (NEAR_TIES, ORACLE)),
    Mutation("ties-highest-index", "simulated CPU kernel bug: exact ties go to the highest index",
             _cpu(_highest_index_on_ties), TIES),
    Mutation("codewords-off-1e-3", "simulated CPU kernel bug: codewords shifted by 1e-3", _cpu(_codewords_off),
             (ORACLE,)),
    Mutation("distances-from-expansion", "simulated CPU kernel bug: distances from the cancelling expansion",
             _cpu(_distances_from_the_expansion), (NEAR_TIES, ORACLE)),
    Mutation("fast-10%-wrong", "simulated CPU kernel bug: fast mode picks another codeword on 10 % of the rows",
             _cpu(_fast_ten_percent_wrong), FAST),
    Mutation("reference-no-rerank", "reference.py: the torch backend skips the float64 re-rank",
             _reference_without_rerank, ("tests/test_reference.py::test_exact_mode_survives_cancellation",
                                         "tests/test_reference.py::test_torch_backend_fp32_exact")),
    Mutation("beta-on-wrong-term", "modules.py: beta weighs the codebook term instead of the commitment term",
             _beta_on_the_wrong_term, ("tests/test_modules.py::test_parity_with_seed_modules",
                                       "tests/test_training.py::test_defaults_match_seed_forward_and_gradients")),
    Mutation("laplace-smoothing-off", "modules.py: EMA divides by the raw cluster sizes", _laplace_smoothing_off,
             ("tests/test_training.py::test_ema_step_matches_formula",)),
    Mutation("dead-code-threshold-<=", "modules.py: codes exactly at the threshold are restarted too",
             _dead_code_at_the_threshold, ("tests/test_training.py::test_dead_code_threshold_is_strict",)),
    Mutation("bench-self-referential", "bench/forward.py: mismatches measured against vqfast's own search",
             _bench_checks_against_vqfast, BENCH_TESTS),
    Mutation("bench-hides-errors", "bench/table.py: a crashing provider does not fail the run",
             _bench_hides_errors, BENCH_TESTS),
)}
