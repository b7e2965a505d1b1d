"""Question 1: nearest-codeword forward time over (N, D, K) and dtypes, with the quality of "fast".

Per case and provider the record holds ms (median and best), TFLOP/s counting 2 N K D flops, GB/s
counting one read of z and the codebook and one write of indices + codewords (the useful measure
when K is small and the search is memory bound), and, against vqfast's exact search of the same
inputs, the fraction of rows whose index differs and the relative increase in quantisation error
sum |z - c|^2. On CUDA it also times a GEMM-only run (z @ codebook.T, same shape and precision)
in the same process, so gemm_fraction = gemm ms / provider ms says how close the fused search
comes to the matrix multiply it cannot avoid.
"""
from __future__ import annotations

import torch

import vqfast
from vqfast.bench import providers as P
from vqfast.bench.presets import Preset
from vqfast.bench.results import available_memory_bytes
from vqfast.bench.timing import measure

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


def _quant_error(z: torch.Tensor, codebook: torch.Tensor, idx: torch.Tensor) -> float:
    return float(((z.double() - codebook.double().index_select(0, idx.to(codebook.device))) ** 2).sum())


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
    exact_idx, _, _ = vqfast.nearest_codeword(z, codebook, precision="exact")
    exact_err = _quant_error(z, codebook, exact_idx)
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
        with torch.no_grad():
            idx, _ = fn(z, codebook)
            t = measure(lambda: fn(z, codebook), device=device, warmup=max(0, preset.warmup - 1), repeats=preset.repeats)
        value = t.stat(preset.stat)
        err = _quant_error(z, codebook, idx)
        rec.update(
            value=value, median_ms=t.median_ms, best_ms=t.best_ms, repeats=len(t.runs_ms),
            tflops=2.0 * n * k * d / (value * 1e-3) / 1e12, gbps=traffic / (value * 1e-3) / 1e9,
            index_mismatch=float((idx.to(exact_idx.device) != exact_idx).double().mean()),
            qerr_increase=(err - exact_err) / exact_err if exact_err > 0 else 0.0,
        )
        if device.type == "cuda":
            if prov.precision not in gemm:
                gemm[prov.precision] = _gemm_ms(z, codebook, prov.precision, preset)
            rec.update(gemm_ms=gemm[prov.precision], gemm_fraction=gemm[prov.precision] / value)
        log(f"  {prov.name:<22} {value:10.3f} ms  mismatch {rec['index_mismatch']:.2e}")
        records.append(rec)
    return records


def run(preset: Preset, device: torch.device, env: dict, log=print, case_list: list[dict] | None = None) -> list[dict]:
    records = []
    for case in case_list if case_list is not None else cases(preset):
        log(f"forward N={case['n']} D={case['d']} K={case['k']} {case['dtype']} ({case['set']})")
        records += run_case(case, preset, device, env, log)
    return records
