"""``vqfast bench``: run the benchmark questions of a preset, print tables, append results.

    vqfast bench --preset quick                       # CPU machine, ~5 minutes on 2 cores
    vqfast bench --preset full --device cuda          # GPU
    vqfast bench --preset quick --questions forward memory --results-dir /tmp/r

Exits 1 when a provider raised or a vqfast provider returned rows that break its precision's
contract against the float64 oracle (table.failures); the tables show those rows as ERROR / wrong.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from vqfast.bench import forward, memory, multiscale, train_step
from vqfast.bench.presets import PRESETS, get_preset
from vqfast.bench.results import add_ratios, append_jsonl, environment, results_path
from vqfast.bench.table import failures, format_table, header_line

# Each question module has cases(preset) and run(preset, device, env, log, case_list).
QUESTIONS = {"forward": forward, "train_step": train_step, "multiscale": multiscale, "memory": memory}
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


def run_questions(preset_name: str, device: torch.device, questions: list[str], log=print,
                  on_case=None) -> tuple[dict, list[dict]]:
    """Run the questions case by case; returns (environment, records with ratios filled in).

    on_case(question, records of one case) is called as each case ends (the CLI saves there).
    """
    for q in questions:
        if q not in QUESTIONS:
            raise ValueError(f"questions must be among {tuple(QUESTIONS)}, got {q!r}")
    preset = get_preset(preset_name)
    env = environment(device)
    records: list[dict] = []
    for q in questions:
        module = QUESTIONS[q]
        for case in module.cases(preset):
            rows = add_ratios(module.run(preset, device, env, log=log, case_list=[case]))
            if on_case is not None:
                on_case(q, rows)
            records += rows
    return env, records


def main(args: argparse.Namespace) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but no CUDA device is available; use --device cpu")
    log = (lambda *a, **k: None) if args.quiet else (lambda *a, **k: print(*a, **k, flush=True))
    saved: dict[str, int] = {}

    def save(question: str, rows: list[dict]) -> None:
        # Each case is appended as soon as it ends, so an interrupted run keeps what it measured.
        if not args.no_save and rows:
            append_jsonl(rows, results_path(args.results_dir, question, device.type))
            saved[question] = saved.get(question, 0) + len(rows)

    env, records = run_questions(args.preset, device, args.questions, log=log, on_case=save)
    print("\n" + header_line(env, args.preset))
    for q in args.questions:
        print(f"\n## {q}\n\n{format_table(records, q)}")
    for q, count in saved.items():
        print(f"appended {count} records to {results_path(args.results_dir, q, device.type)}")
    failed = failures(records)
    for line in failed:
        print(f"FAILED: {line}")
    return 1 if failed else 0


def standalone(question: str, argv: list[str]) -> int:
    """Entry point of benchmarks/bench_<question>.py run as a script: ``vqfast bench`` for one question."""
    parser = argparse.ArgumentParser(description=f"vqfast benchmark: {question}")
    add_arguments(parser)
    args = parser.parse_args(argv)
    args.questions = [question]
    return main(args)
