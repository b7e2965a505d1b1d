"""Result records: one dict per (question, case, provider), stamped with where and when it ran.

Every record carries device, torch / triton versions, date and git commit, and the CPU it ran on:
model (with family / model numbers on x86), the instruction level of vqfast's cpu backend
(``cpu_isa``), the levels the CPU runs, threads, and faiss's own SIMD level, so runs appended to the
same file under benchmarks/results/ stay comparable. Ratios are speedups (or memory savings):
``ratio_vs_seeds = seeds / this`` and ``ratio_vs_best_peer = best peer / this``, so > 1 means this
provider is faster (smaller) than the other. Peers are every provider outside vqfast, the seeds'
code included.
"""
from __future__ import annotations

import datetime
import functools
import importlib.util
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Iterable

import torch

GROUPS = ("seeds", "peer", "vqfast")


@functools.cache
def cpu_model() -> str:
    """The CPU's model name, with its family / model numbers where /proc/cpuinfo has them.

    Virtual machines often report a bare "AMD EPYC": the numbers tell a Zen 3 (family 25, model 1)
    from a Zen 4 (family 25, model 17).
    """
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block is enough
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']} model {fields['model']})"
    return name


def faiss_simd_level() -> str | None:
    """The SIMD level faiss-cpu runs (chosen at its import), or None when faiss is not installed."""
    if importlib.util.find_spec("faiss") is None:
        return None
    import faiss

    config = getattr(faiss, "SIMDConfig", None)  # faiss >= 1.12 dispatches inside one library
    if config is not None:
        return str(config.get_level_name())
    return os.environ.get("FAISS_OPT_LEVEL", "auto")


def cpu_fields() -> dict:
    """What the CPU numbers depend on: model, vqfast's instruction level, threads, faiss's level."""
    import vqfast
    from vqfast import _ext

    return {
        "cpu_model": cpu_model(),
        "cpu_isa": vqfast.cpu_isa(),
        "cpu_isa_levels": list(_ext.cpu_isa_levels()),
        "threads": torch.get_num_threads(),
        "faiss_simd": faiss_simd_level(),
    }


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({torch.get_num_threads()} threads)"


def git_commit(repo: str | Path | None = None) -> str:
    """The checkout's commit (with a "-dirty" suffix for uncommitted changes), or "unknown"."""
    repo = Path(repo) if repo is not None else Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=repo, capture_output=True,
                             text=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def environment(device: torch.device | str) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device_name(device),
        "device_type": torch.device(device).type,
        "torch": torch.__version__,
        "triton": triton_version,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        **cpu_fields(),
    }


def case_key(record: dict) -> tuple:
    return (record["question"], tuple(sorted(record["case"].items())), record.get("metric_name", "ms"))


def add_ratios(records: list[dict], value_key: str = "value") -> list[dict]:
    """Fill ratio_vs_seeds and ratio_vs_best_peer on every "ok" record, per case (in place)."""
    by_case: dict[tuple, list[dict]] = {}
    for r in records:
        by_case.setdefault(case_key(r), []).append(r)
    for rows in by_case.values():
        ok = [r for r in rows if r["status"] == "ok"]
        seeds = [r[value_key] for r in ok if r["group"] == "seeds"]
        for r in rows:
            r["ratio_vs_seeds"] = None
            r["ratio_vs_best_peer"] = r["best_peer"] = None
            if r["status"] != "ok" or r[value_key] <= 0:
                continue
            if seeds:
                r["ratio_vs_seeds"] = min(seeds) / r[value_key]
            peers = [p for p in ok if p["group"] != "vqfast" and p is not r]
            if peers:
                best = min(peers, key=lambda p: p[value_key])
                r["ratio_vs_best_peer"] = best[value_key] / r[value_key]
                r["best_peer"] = best["provider"]
    return records


def append_jsonl(records: Iterable[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for r in records:
            f.write(json.dumps(r, sort_keys=True) + "\n")
    return path


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def is_clean(record: dict) -> bool:
    """Whether a record comes from a committed tree: a known commit without the "-dirty" suffix."""
    commit = str(record.get("commit") or "unknown")
    return commit != "unknown" and not commit.endswith("-dirty")


def clean_latest(records: list[dict]) -> tuple[str | None, list[dict]]:
    """The records a published table may show: only records from clean commits, only from one machine
    (the ``device`` of the most recent clean record), and of those the most recent record of each
    (question, case, provider). Returns (device, records), or (None, []) when no record is clean."""
    clean = [r for r in records if is_clean(r)]
    if not clean:
        return None, []
    device = max(clean, key=lambda r: r["date"])["device"]
    best: dict[tuple, dict] = {}
    for r in clean:
        if r["device"] != device:
            continue
        key = (r["question"], tuple(sorted(r["case"].items())), r["provider"])
        if key not in best or r["date"] >= best[key]["date"]:
            best[key] = r
    return device, list(best.values())


def provenance(records: list[dict]) -> str:
    """Where and when records ran, for a table's caption: the machine, vqfast's CPU level, torch,
    the commit(s) and the date(s)."""
    def values(key: str) -> str:
        return ", ".join(sorted({str(r.get(key)) for r in records if r.get(key) is not None}))

    dates = ", ".join(sorted({r["date"][:10] for r in records}))
    parts = [values("device")]
    if any(r.get("cpu_isa") for r in records) and all(r.get("device_type", "cpu") == "cpu" for r in records):
        parts.append(f"vqfast cpu level {values('cpu_isa')}")
    parts += [f"torch {values('torch')}", f"commit {values('commit')}", dates]
    return "; ".join(parts)


def results_path(results_dir: str | Path, question: str, device_type: str) -> Path:
    return Path(results_dir) / f"{question}_{device_type}.jsonl"


def available_memory_bytes(device: torch.device | str) -> int:
    """Free memory that one provider may use: free GPU memory, or MemAvailable on the host."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
