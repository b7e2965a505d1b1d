"""``vqfast bench``: run the benchmark questions of a preset, print tables, append results.

    vqfast bench --preset quick                       # CPU machine, ~5 minutes on 2 cores
    vqfast bench --preset full --device cuda          # GPU
    vqfast bench --preset quick --questions forward memory --results-dir /tmp/r
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from vqfast.bench import forward, memory, multiscale, train_step
from vqfast.bench.presets import PRESETS, get_preset
from vqfast.bench.results import add_ratios, append_jsonl, environment, results_path
from vqfast.bench.table import format_table, header_line

QUESTIONS = {
    "forward": forward.run,
    "train_step": train_step.run,
    "multiscale": multiscale.run,
    "memory": memory.run,
}
DEFAULT_RESULTS_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="quick", choices=tuple(PRESETS),
                        help="quick: a CPU machine (~5 min on 2 cores); full: a GPU; tiny: seconds (a smoke run)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available, else cpu)")
    parser.add_argument("--questions", nargs="+", default=list(QUESTIONS), choices=tuple(QUESTIONS),
                        help="which questions to run (default: all)")
    parser.add_argument("--results-dir", default=str(DEFAULT_RESULTS_DIR),
                        help="where <question>_<device>.jsonl files are appended to")
    parser.add_argument("--no-save", action="store_true", help="print the tables only, append nothing")
    parser.add_argument("--quiet", action="store_true", help="print the tables only, not per-provider progress")


def run_questions(preset_name: str, device: torch.device, questions: list[str], log=print) -> tuple[dict, list[dict]]:
    """Run the questions; returns (environment, records with ratios filled in)."""
    for q in questions:
        if q not in QUESTIONS:
            raise ValueError(f"questions must be among {tuple(QUESTIONS)}, got {q!r}")
    preset = get_preset(preset_name)
    env = environment(device)
    records: list[dict] = []
    for q in questions:
        records += add_ratios(QUESTIONS[q](preset, device, env, log=log))
    return env, records


def main(args: argparse.Namespace) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but no CUDA device is available; use --device cpu")
    log = (lambda *a, **k: None) if args.quiet else (lambda *a, **k: print(*a, **k, flush=True))
    # One question at a time, each saved as soon as it ends, so an interrupted run keeps what it measured.
    for q in args.questions:
        env, records = run_questions(args.preset, device, [q], log=log)
        print("\n" + header_line(env, args.preset) + f"\n\n## {q}\n\n{format_table(records, q)}\n", flush=True)
        if not args.no_save and records:
            path = append_jsonl(records, results_path(args.results_dir, q, device.type))
            print(f"appended {len(records)} records to {path}", flush=True)
    return 0


def standalone(question: str, argv: list[str]) -> int:
    """Entry point of benchmarks/bench_<question>.py run as a script: ``vqfast bench`` for one question."""
    parser = argparse.ArgumentParser(description=f"vqfast benchmark: {question}")
    add_arguments(parser)
    args = parser.parse_args(argv)
    args.questions = [question]
    return main(args)
