"""Question 1: nearest-codeword forward time over (N, D, K) and dtypes, with the quality of "fast".

Per case and provider the record holds ms (median and best), TFLOP/s counting 2 N K D flops, GB/s
counting one read of z and the codebook and one write of indices + codewords (the useful measure
when K is small and the search is memory bound), and, against the independent float64 oracle
(vqfast.testing.oracle) on a sample of rows (all rows when N x K x D is small; oracle.sample_rows),
the fraction of rows whose index differs (index_mismatch), the relative increase in quantisation
error sum |z - c|^2 (qerr_increase), and wrong_rows: sampled rows that break the provider's own
contract (exact mode: not the oracle's pick; fast mode: beyond the bound of its documented rounding,
oracle.fast_bound). Peers promise neither, so they get no wrong_rows. A vqfast provider with wrong
rows, or any provider that raises (status "error", never "skipped"), makes `vqfast bench` exit 1
(table.failures). On CUDA it also times a GEMM-only run (z @ codebook.T, same shape and precision)
in the same process, so gemm_fraction = gemm ms / provider ms says how close the fused search
comes to the matrix multiply it cannot avoid.
"""
from __future__ import annotations

import torch

from vqfast.bench import providers as P
from vqfast.bench.presets import Preset
from vqfast.bench.results import available_memory_bytes
from vqfast.bench.timing import measure
from vqfast.testing import oracle

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}

# A provider is skipped when its estimated working memory exceeds this share of what is free:
# the rest is left to the inputs, the allocator's slack and other processes on the machine.
MEMORY_SHARE = 0.5


def cases(preset: Preset) -> list[dict]:
    # Cheapest first (sweep, then the headline shapes in preset order), so an interrupted run keeps most.
    out = [{"set": "sweep", "n": preset.sweep_n, "d": d, "k": k, "dtype": "float32"}
           for d in preset.sweep_ds for k in preset.sweep_ks]
    out += [{"set": "headline", "n": n, "d": d, "k": k, "dtype": "float32"} for n, d, k in preset.forward_shapes]
    n, d, k = preset.forward_shapes[0]
    out += [{"set": "dtype", "n": n, "d": d, "k": k, "dtype": dt} for dt in preset.dtypes if dt != "float32"]
    return out


def oracle_answer(z: torch.Tensor, codebook: torch.Tensor, rows: torch.Tensor) -> oracle.Answer:
    """The oracle's answer for rows [M] of z (on z's device)."""
    return oracle.nearest(z[rows.to(z.device)], codebook)


def wrong_rows(prov: P.Provider, answer: oracle.Answer, idx: torch.Tensor, z: torch.Tensor,
               codebook: torch.Tensor) -> int | None:
    """Sampled rows where a vqfast provider breaks its precision's contract (None for peers)."""
    if prov.group != "vqfast":
        return None
    if prov.precision == "exact":
        bad = oracle.exact_violations(answer, idx, codebook, oracle.effective_search_dtype(z, codebook))
    else:
        u_op, u_acc = oracle.fast_rounding(prov.backend, z.device.type, z.dtype, codebook.dtype)
        bad = oracle.fast_violations(answer, idx, oracle.fast_bound(z, codebook, "l2", u_op, u_acc))
    return int(bad.sum())


def _gemm_ms(z: torch.Tensor, codebook: torch.Tensor, precision: str, preset: Preset) -> float:
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "fast"
    try:
        t = measure(lambda: torch.mm(z, codebook.t()), device=z.device, warmup=preset.warmup, repeats=preset.repeats)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    return t.stat(preset.stat)


def make_inputs(case: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded z [N, D] and codebook [K, D] for a case, standard normal, in the case's dtype."""
    n, d, k, dtype = case["n"], case["d"], case["k"], DTYPES[case["dtype"]]
    gen = torch.Generator().manual_seed(n * 31 + d * 7 + k)
    z = torch.randn(n, d, generator=gen).to(device=device, dtype=dtype)
    return z, torch.randn(k, d, generator=gen).to(device=device, dtype=dtype)


def run_case(case: dict, preset: Preset, device: torch.device, env: dict, log=print) -> list[dict]:
    n, d, k, dtype = case["n"], case["d"], case["k"], DTYPES[case["dtype"]]
    z, codebook = make_inputs(case, device)
    rows = oracle.sample_rows(n, k, d)
    answer = oracle_answer(z, codebook, rows)
    gemm: dict[str, float] = {}
    elem = z.element_size()
    traffic = (n * d + k * d) * elem + n * (8 + d * elem)
    records = []
    for prov, fn in P.forward_providers(device, preset.precisions):
        if preset.forward_providers is not None and prov.name not in preset.forward_providers:
            continue
        rec = {**env, "question": "forward", "case": dict(case), "provider": prov.name, "group": prov.group,
               "precision": prov.precision, "metric_name": "ms", "stat": preset.stat, "preset": preset.name,
               "status": "ok", "reason": None}
        reason = prov.reason(device, dtype)
        need = prov.working_bytes(n, k, d, dtype)
        if reason is None and need > MEMORY_SHARE * available_memory_bytes(device):
            reason = f"needs ~{need / 2**30:.1f} GiB of working memory, more than {MEMORY_SHARE:.0%} of what is free"
        if reason is not None:
            rec.update(status="skipped", reason=reason, value=None)
            log(f"  {prov.name:<22} skipped: {reason}")
            records.append(rec)
            continue
        try:
            with torch.no_grad():
                idx, _ = fn(z, codebook)
                t = measure(lambda: fn(z, codebook), device=device, warmup=max(0, preset.warmup - 1),
                            repeats=preset.repeats)
        except Exception as exc:  # a provider that crashes is a finding, shown as an error
            rec.update(status="error", reason=f"{type(exc).__name__}: {exc}", value=None)
            log(f"  {prov.name:<22} ERROR: {rec['reason']}")
            records.append(rec)
            continue
        value = t.stat(preset.stat)
        picked = idx[rows.to(idx.device)].to(answer.indices.device)
        rec.update(
            value=value, median_ms=t.median_ms, best_ms=t.best_ms, repeats=len(t.runs_ms),
            tflops=2.0 * n * k * d / (value * 1e-3) / 1e12, gbps=traffic / (value * 1e-3) / 1e9,
            checked_rows=int(rows.numel()),
            index_mismatch=oracle.mismatch_fraction(answer, picked),
            qerr_increase=oracle.quantisation_error_increase(answer, picked),
            wrong_rows=wrong_rows(prov, answer, picked, z[rows.to(z.device)], codebook),
        )
        if device.type == "cuda":
            if prov.precision not in gemm:
                gemm[prov.precision] = _gemm_ms(z, codebook, prov.precision, preset)
            rec.update(gemm_ms=gemm[prov.precision], gemm_fraction=gemm[prov.precision] / value)
        wrong = "" if not rec["wrong_rows"] else f"  WRONG on {rec['wrong_rows']} of {rec['checked_rows']} rows"
        log(f"  {prov.name:<22} {value:10.3f} ms  mismatch {rec['index_mismatch']:.2e}{wrong}")
        records.append(rec)
    return records


def run(preset: Preset, device: torch.device, env: dict, log=print, case_list: list[dict] | None = None) -> list[dict]:
    records = []
    for case in case_list if case_list is not None else cases(preset):
        log(f"forward N={case['n']} D={case['d']} K={case['k']} {case['dtype']} ({case['set']})")
        records += run_case(case, preset, device, env, log)
    return records
