"""Timing: warm-up runs excluded, then many timed runs summarised by their median and best.

On CUDA each run is bracketed by events recorded on the current stream, so host overhead between
runs is not counted and no run waits on the previous one's launch queue; on CPU a run is
perf_counter around the call.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable

import torch


@dataclasses.dataclass(frozen=True)
class Timing:
    median_ms: float
    best_ms: float
    runs_ms: tuple[float, ...]

    def stat(self, name: str) -> float:
        if name == "median":
            return self.median_ms
        if name == "best":
            return self.best_ms
        raise ValueError(f"stat must be 'median' or 'best', got {name!r}")


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], *, device: torch.device | str = "cpu", warmup: int = 1, repeats: int = 5) -> Timing:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times timed; milliseconds per run."""
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    synchronize(device)
    runs: list[float] = []
    if device.type == "cuda":
        pairs = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            pairs.append((start, end))
        torch.cuda.synchronize(device)
        runs = [s.elapsed_time(e) for s, e in pairs]
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            runs.append((time.perf_counter() - t0) * 1e3)
    return Timing(statistics.median(runs), min(runs), tuple(runs))
