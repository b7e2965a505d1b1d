"""Question 2: one training step (forward + backward + SGD step) of VQ and residual VQ.

z [B, D, side, side] stands for an encoder's output (it takes gradients and an optimizer step);
the loss is a stand-in reconstruction term plus each quantizer's own VQ loss. On CUDA the record
also holds the step's peak allocated memory; on CPU peak memory comes from question 4 (memory.py).
"""
from __future__ import annotations

import torch

from vqfast.bench import providers as P
from vqfast.bench.presets import Preset
from vqfast.bench.results import available_memory_bytes
from vqfast.bench.timing import measure

MEMORY_SHARE = 0.5


def cases(preset: Preset) -> list[dict]:
    n = preset.train_batch * preset.train_side**2
    return [{"n": n, "d": preset.train_dim, "k": k, "stages": preset.train_stages, "batch": preset.train_batch,
             "side": preset.train_side, "residual": residual}
            for k in preset.train_ks for residual in (False, True)]


def make_input(case: dict, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(case["k"] + case["d"])
    z = torch.randn(case["batch"], case["d"], case["side"], case["side"], generator=gen)
    return z.to(device).requires_grad_(True)


def run_case(case: dict, preset: Preset, device: torch.device, env: dict, log=print) -> list[dict]:
    records = []
    for prov, make, residual in P.train_providers(device):
        if residual != case["residual"]:
            continue
        rec = {**env, "question": "train_step", "case": dict(case), "provider": prov.name, "group": prov.group,
               "precision": "exact", "metric_name": "ms", "stat": preset.stat, "preset": preset.name,
               "status": "ok", "reason": None}
        reason = prov.reason(device, torch.float32)
        need = prov.working_bytes(case["n"], case["k"], case["d"], torch.float32)
        if reason is None and need > MEMORY_SHARE * available_memory_bytes(device):
            reason = f"needs ~{need / 2**30:.1f} GiB of working memory, more than {MEMORY_SHARE:.0%} of what is free"
        if reason is not None:
            rec.update(status="skipped", reason=reason, value=None)
            log(f"  {prov.name:<22} skipped: {reason}")
            records.append(rec)
            continue
        torch.manual_seed(0)
        module = make(case["stages"], case["k"], case["d"]).to(device)
        step = P.train_step_fn(module, make_input(case, device))
        step()  # first step outside the peak-memory window: lazy state (optimizer, EMA buffers)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            step()
            torch.cuda.synchronize(device)
            rec["peak_bytes"] = torch.cuda.max_memory_allocated(device) - base
        t = measure(step, device=device, warmup=max(0, preset.warmup - 1), repeats=preset.repeats)
        value = t.stat(preset.stat)
        rec.update(value=value, median_ms=t.median_ms, best_ms=t.best_ms, repeats=len(t.runs_ms))
        log(f"  {prov.name:<22} {value:10.3f} ms")
        records.append(rec)
    return records


def run(preset: Preset, device: torch.device, env: dict, log=print, case_list: list[dict] | None = None) -> list[dict]:
    records = []
    for case in case_list if case_list is not None else cases(preset):
        kind = "residual x%d" % case["stages"] if case["residual"] else "single"
        log(f"train_step N={case['n']} D={case['d']} K={case['k']} {kind}")
        records += run_case(case, preset, device, env, log)
    return records
