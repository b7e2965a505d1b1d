"""Question 4: peak memory of the nearest-codeword forward and of one training step.

CUDA: torch.cuda.max_memory_allocated above what was allocated before the call. CPU: torch has no
allocator statistics there, so each (provider, case) runs in a fresh subprocess that builds its
inputs, resets the kernel's resident-set high-water mark (writing 5 to /proc/self/clear_refs), runs
the call once and reads the mark again (VmHWM); the rise above the resident size before the call is
its peak memory beyond its inputs, counting every temporary whichever library allocated it. The
reset matters: importing torch and the peers leaves a high-water mark hundreds of MiB above the
steady resident size, which would hide any smaller peak. Where the reset is not allowed the
fallback is ru_maxrss, which can only over-report such hidden peaks as zero growth.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch

from vqfast.bench import providers as P
from vqfast.bench.presets import Preset
from vqfast.bench.results import available_memory_bytes

MEMORY_SHARE = 0.5
CHILD_TIMEOUT_S = 600


def cases(preset: Preset) -> list[dict]:
    out = [{"kind": "forward", "n": n, "d": d, "k": k} for n, d, k in preset.memory_forward_shapes]
    n = preset.train_batch * preset.train_side**2
    out += [{"kind": "train_step", "n": n, "d": preset.train_dim, "k": k, "batch": preset.train_batch,
             "side": preset.train_side} for k in preset.memory_train_ks]
    return out


def _providers(kind: str, device: torch.device):
    if kind == "forward":
        return [(prov, fn) for prov, fn in P.forward_providers(device, ("exact",))]
    return [(prov, make) for prov, make, residual in P.train_providers(device) if not residual]


def _build(case: dict, provider: str, device: torch.device):
    """The call to measure, with its inputs already allocated."""
    for prov, obj in _providers(case["kind"], device):
        if prov.name != provider:
            continue
        gen = torch.Generator().manual_seed(0)
        if case["kind"] == "forward":
            z = torch.randn(case["n"], case["d"], generator=gen).to(device)
            codebook = torch.randn(case["k"], case["d"], generator=gen).to(device)
            return lambda: obj(z, codebook)
        torch.manual_seed(0)
        module = obj(1, case["k"], case["d"]).to(device)
        z = torch.randn(case["batch"], case["d"], case["side"], case["side"], generator=gen).to(device)
        return P.train_step_fn(module, z.requires_grad_(True))
    raise ValueError(f"provider {provider!r} is not available for {case['kind']} on {device}")


def _measure_in_process(case: dict, provider: str, device: torch.device) -> int:
    call = _build(case, provider, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        with torch.set_grad_enabled(case["kind"] == "train_step"):
            call()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    reset = _reset_peak_rss()
    base = _status_kib("VmRSS") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.set_grad_enabled(case["kind"] == "train_step"):
        call()
    peak = _status_kib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max(0, peak - base) * 1024  # both in KiB on Linux


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kib("VmHWM") >= 0
    except OSError:
        return False


def release_freed_memory() -> bool:
    """Hand the C heap's free blocks back to the system (glibc's malloc_trim), so that the next call's
    allocations are faulted in and show in the resident-set high-water mark. False without glibc."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.malloc_trim(0) >= 0)
    except (OSError, AttributeError):
        return False


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def _measure_subprocess(case: dict, provider: str) -> int:
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("VQFAST_NO_EXT_WARNING", "1")
    cmd = [sys.executable, "-m", "vqfast.bench.memory", json.dumps({"case": case, "provider": provider})]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    if proc.returncode != 0:
        raise RuntimeError(f"the measuring subprocess failed: {proc.stderr.strip()[-500:]}")
    return int(json.loads(proc.stdout.strip().splitlines()[-1])["peak_bytes"])


def run(preset: Preset, device: torch.device, env: dict, log=print, case_list: list[dict] | None = None) -> list[dict]:
    records = []
    for case in case_list if case_list is not None else cases(preset):
        log(f"memory {case['kind']} N={case['n']} D={case['d']} K={case['k']}")
        for prov, _ in _providers(case["kind"], device):
            rec = {**env, "question": "memory", "case": dict(case), "provider": prov.name, "group": prov.group,
                   "precision": "exact", "metric_name": "peak_bytes", "preset": preset.name,
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
            try:
                if device.type == "cuda":
                    rec["value"] = _measure_in_process(case, prov.name, device)
                else:
                    rec["value"] = _measure_subprocess(case, prov.name)
                log(f"  {prov.name:<22} {rec['value'] / 2**20:10.1f} MiB")
            except Exception as exc:  # a provider that crashes is a finding (an error), never a skip
                rec.update(status="error", reason=f"{type(exc).__name__}: {exc}", value=None)
                log(f"  {prov.name:<22} ERROR: {rec['reason']}")
            records.append(rec)
    return records


def _child(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="measure one provider's peak memory (used by vqfast bench)")
    parser.add_argument("spec", help='JSON: {"case": {...}, "provider": name}')
    spec = json.loads(parser.parse_args(argv).spec)
    peak = _measure_in_process(spec["case"], spec["provider"], torch.device("cpu"))
    print(json.dumps({"peak_bytes": peak}))
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
