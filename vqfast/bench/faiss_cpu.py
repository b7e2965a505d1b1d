"""Question 5: vqfast's cpu backend (exact) against faiss-cpu at the same instruction level.

    vqfast bench --preset quick --questions faiss --isa all --results-dir benchmarks/results

Per shape (N, D, K), float32 standard normal: vqfast.nearest_codeword(backend="cpu", exact) and
faiss IndexFlatL2 (k = 1, the index built in each call, as a training loop must after every codebook
update) run interleaved -- vqfast, faiss, vqfast, faiss, ... -- so load from other processes on a
shared machine hits both alike; each keeps its best (the ratio) and median time, and its best CPU
time of the process (all threads: on a loaded machine the wall time of a short call is mostly
waiting for a core, the CPU time is not). Both run on torch.get_num_threads() threads (``--threads``
runs several counts, each in its own process). GFLOP/s count 2 N K D; the peak is a square
4096 x 4096 fp32 torch.mm on the same threads, best of several, measured first in the same run.
``--isa`` runs each level in its own process with VQFAST_CPU_ISA and faiss's FAISS_OPT_LEVEL /
FAISS_SIMD_LEVEL set alike (both libraries choose their level at import); every record names both
levels, the thread count and the CPU.

Shapes: the preset's forward shapes (headline and sweep) plus, beyond the tiny preset, the shapes
where faiss used to win on a Zen 4 (EXTRA_SHAPES).
"""
from __future__ import annotations

import statistics
import time

import torch

import vqfast
from vqfast.bench.forward import make_inputs
from vqfast.bench.presets import Preset
from vqfast.bench.providers import faiss_forward, _faiss_reason

EXTRA_SHAPES = ((4096, 32, 16384), (16384, 16, 1024), (262144, 8, 512), (65536, 32, 4096), (8192, 256, 8192))
PEAK_SIZE = 4096
# Interleaved pairs per shape (the tiny preset: a smoke run).
REPEATS = {"tiny": 2}
DEFAULT_REPEATS = 7

_peak_gflops: dict[int, float] = {}  # threads -> the run's measured mm peak (its "peak" case)


def cases(preset: Preset) -> list[dict]:
    shapes = list(preset.forward_shapes) + [(preset.sweep_n, d, k) for d in preset.sweep_ds for k in preset.sweep_ks]
    if preset.name != "tiny":
        shapes += EXTRA_SHAPES
    shapes = sorted(set(shapes), key=lambda s: (s[0] * s[1] * s[2], s))  # cheapest first
    size = 256 if preset.name == "tiny" else PEAK_SIZE
    return [{"set": "peak", "n": size, "d": size, "k": size, "dtype": "float32"}] + [
        {"set": "faiss", "n": n, "d": d, "k": k, "dtype": "float32"} for n, d, k in shapes]


def _best_of(fn, repeats: int) -> list[float]:
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - t0) * 1e3)
    return runs


def _timed(fn) -> tuple[float, float]:
    """(wall ms, CPU ms of the process) of one call."""
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    t1, c1 = time.perf_counter(), time.process_time()
    return (t1 - t0) * 1e3, (c1 - c0) * 1e3


def measure_peak(size: int = PEAK_SIZE, repeats: int = 5) -> float:
    """GFLOP/s of a square fp32 torch.mm on the current threads (best of ``repeats``); kept as this
    process's peak for the "of mm peak" column."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(size, size, generator=gen), torch.randn(size, size, generator=gen)
    torch.mm(a, b)
    value = 2.0 * size**3 / (min(_best_of(lambda: torch.mm(a, b), repeats)) * 1e-3) / 1e9
    _peak_gflops[torch.get_num_threads()] = value
    return value


def peak_gflops() -> float:
    """The peak measured in this run (its first case), measured now if it was not."""
    return _peak_gflops.get(torch.get_num_threads()) or measure_peak()


def _record(env: dict, preset: Preset, case: dict, provider: str, group: str, **fields) -> dict:
    return {**env, "question": "faiss", "case": dict(case), "provider": provider, "group": group,
            "precision": "exact", "metric_name": "ms", "stat": "best", "preset": preset.name,
            "status": "ok", "reason": None, **fields}


def run_case(case: dict, preset: Preset, device: torch.device, env: dict, log=print) -> list[dict]:
    repeats = REPEATS.get(preset.name, DEFAULT_REPEATS)
    if case["set"] == "peak":
        gflops = measure_peak(case["n"], repeats=max(3, repeats))
        ms = 2.0 * case["n"] ** 3 / gflops / 1e6
        log(f"  torch.mm {case['n']}^3: {gflops:.1f} GFLOP/s")
        return [_record(env, preset, case, "torch.mm", "peak", value=ms, best_ms=ms, gflops=gflops)]
    reason = "this question compares CPU searches" if device.type != "cpu" else _faiss_reason(device, torch.float32)
    if reason is not None:
        return [_record(env, preset, case, p, g, status="skipped", reason=reason, value=None)
                for p, g in (("vqfast-cpu", "vqfast"), ("faiss-cpu", "peer"))]
    import faiss

    faiss.omp_set_num_threads(torch.get_num_threads())
    n, d, k = case["n"], case["d"], case["k"]
    z, codebook = make_inputs(case, device)
    fns = {
        "vqfast-cpu": lambda: vqfast.nearest_codeword(z, codebook, precision="exact", backend="cpu")[0],
        "faiss-cpu": lambda: faiss_forward(z, codebook)[0],
    }
    idx = {name: fn() for name, fn in fns.items()}  # warm-up (and the indices compared below)
    runs: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            wall, cpu_ms = _timed(fn)
            runs[name].append(wall)
            cpu[name].append(cpu_ms)
    peak = peak_gflops()
    flops = 2.0 * n * k * d
    mismatch = float((idx["vqfast-cpu"] != idx["faiss-cpu"]).double().mean())
    records = []
    for name, group in (("vqfast-cpu", "vqfast"), ("faiss-cpu", "peer")):
        best = min(runs[name])
        gflops = flops / (best * 1e-3) / 1e9
        records.append(_record(env, preset, case, name, group, value=best, best_ms=best,
                               median_ms=statistics.median(runs[name]), cpu_ms=min(cpu[name]), repeats=repeats,
                               gflops=gflops, peak_gflops=peak, of_peak=gflops / peak, index_mismatch=mismatch))
    v, f = (r["value"] for r in records)
    cv, cf = (r["cpu_ms"] for r in records)
    log(f"  N={n} D={d} K={k}: vqfast {v:.2f} ms, faiss {f:.2f} ms, vqfast/faiss {v / f:.2f}x "
        f"(CPU time {cv / max(cf, 1e-9):.2f}x), {records[0]['gflops']:.1f} GFLOP/s ({100 * records[0]['of_peak']:.0f}% of mm)")
    return records


def run(preset: Preset, device: torch.device, env: dict, log=print, case_list: list[dict] | None = None) -> list[dict]:
    records = []
    for case in case_list if case_list is not None else cases(preset):
        log(f"faiss N={case['n']} D={case['d']} K={case['k']} ({case['set']})")
        records += run_case(case, preset, device, env, log)
    return records


def format_table(records: list[dict], question: str = "faiss") -> str:
    """One markdown table per (CPU, vqfast level): time ratio vqfast / faiss and GFLOP/s vs the mm peak."""
    rows = [r for r in records if r["question"] == question]
    out = []
    for key in dict.fromkeys((r.get("cpu_model"), r.get("cpu_isa"), r.get("faiss_simd"), r.get("threads")) for r in rows):
        group = [r for r in rows if (r.get("cpu_model"), r.get("cpu_isa"), r.get("faiss_simd"), r.get("threads")) == key]
        peak = next((r["gflops"] for r in group if r["provider"] == "torch.mm"), None)
        cpu, isa, faiss_level, threads = key
        out.append(f"{cpu}, {threads} threads: vqfast cpu level {isa}, faiss {faiss_level}; "
                   + (f"fp32 torch.mm peak {peak:.1f} GFLOP/s" if peak else "no peak measured"))
        out.append("")
        out.append("| N | D | K | vqfast ms | faiss ms | vqfast / faiss time | vqfast / faiss CPU time | vqfast GFLOP/s "
                   "| of mm peak | faiss GFLOP/s |")
        out.append("|---|---|---|---|---|---|---|---|---|---|")
        by_case: dict[tuple, dict[str, dict]] = {}
        for r in group:
            if r["case"].get("set") == "faiss":
                by_case.setdefault((r["case"]["n"], r["case"]["d"], r["case"]["k"]), {})[r["provider"]] = r
        for (n, d, k), provs in by_case.items():
            v, f = provs.get("vqfast-cpu"), provs.get("faiss-cpu")
            if v is None or f is None or v["status"] != "ok" or f["status"] != "ok":
                reason = (v or f or {}).get("reason", "")
                out.append(f"| {n} | {d} | {k} | skipped: {reason} | | | | | | |")
                continue
            cpu = (f"{v['cpu_ms'] / f['cpu_ms']:.2f}x" if v.get("cpu_ms") and f.get("cpu_ms") else "")
            out.append(f"| {n} | {d} | {k} | {v['value']:.2f} | {f['value']:.2f} | {v['value'] / f['value']:.2f}x | {cpu} | "
                       f"{v['gflops']:.1f} | {100 * v['of_peak']:.0f}% | {f['gflops']:.1f} |")
        out.append("")
    return "\n".join(out).rstrip()
