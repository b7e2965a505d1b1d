"""``vqfast bench``: run the benchmark questions of a preset, print tables, append results.

    vqfast bench --preset quick                       # CPU machine, ~5 minutes on 2 cores
    vqfast bench --preset full --device cuda          # GPU
    vqfast bench --preset quick --questions forward memory --results-dir /tmp/r
    vqfast bench --questions dropin --var-repo ~/VAR --taming-repo ~/taming-transformers
    vqfast bench --preset quick --questions faiss --isa all   # vqfast vs faiss-cpu at each CPU level
    vqfast bench --preset quick --questions faiss --isa avx2 --threads 1 2   # at 1 and at 2 threads
    vqfast bench --preset quick --device cpu --results-dir benchmarks/results   # the committed tables

Results go to ./bench-results (in the current directory) unless --results-dir says otherwise: never
into the installed package.

Exits 1 when a provider raised or a vqfast provider returned rows that break its precision's
contract against the float64 oracle (table.failures); the tables show those rows as ERROR / wrong.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

import torch

from vqfast.bench import dropin, faiss_cpu, forward, memory, multiscale, train_step
from vqfast.bench.presets import PRESETS, get_preset
from vqfast.bench.results import add_ratios, append_jsonl, environment, results_path
from vqfast.bench.table import failures, format_table, header_line
from vqfast.errors import InputError

# Each question module has cases(preset) and run(preset, device, env, log, case_list).
QUESTIONS = {"forward": forward, "train_step": train_step, "multiscale": multiscale, "memory": memory,
             "dropin": dropin, "faiss": faiss_cpu}
# The kernel questions run by default; "dropin" (real models' quantizers before and after
# vqfast.accelerate) and "faiss" (vqfast vs faiss-cpu, interleaved, at one instruction level) when named.
DEFAULT_QUESTIONS = ["forward", "train_step", "multiscale", "memory"]
# --isa: vqfast's level -> faiss's (FAISS_OPT_LEVEL picks a library in faiss < 1.12, FAISS_SIMD_LEVEL
# the dispatch level inside one library since), so that both search at the same level.
FAISS_LEVELS = {"generic": ("generic", "NONE"), "avx2": ("avx2", "AVX2"), "avx512": ("avx512", "AVX512"),
                "neon": (None, "ARM_NEON")}
DEFAULT_RESULTS_DIR = "bench-results"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="quick", choices=tuple(PRESETS),
                        help="quick: a CPU machine (~5 min on 2 cores); full: a GPU; tiny: seconds (a smoke run)")
    parser.add_argument("--device", default=None, choices=("cpu", "cuda"),
                        help="default: cuda when available, else cpu")
    parser.add_argument("--questions", nargs="+", default=list(DEFAULT_QUESTIONS), choices=tuple(QUESTIONS),
                        help=f"which questions to run (default: {' '.join(DEFAULT_QUESTIONS)})")
    parser.add_argument("--var-repo", default=None,
                        help=f"a checkout of VAR, for the dropin question (default: ${dropin.REPO_ENV['var']})")
    parser.add_argument("--taming-repo", default=None,
                        help=f"a checkout of taming-transformers, for dropin (default: ${dropin.REPO_ENV['taming']})")
    parser.add_argument("--results-dir", default=DEFAULT_RESULTS_DIR,
                        help="where <question>_<device>.jsonl files are appended to (default: ./bench-results; "
                             "the docs' tables come from benchmarks/results)")
    parser.add_argument("--no-save", action="store_true", help="print the tables only, append nothing")
    parser.add_argument("--quiet", action="store_true", help="print the tables only, not per-provider progress")
    parser.add_argument("--isa", default="auto", choices=("auto", "all") + tuple(FAISS_LEVELS),
                        help="CPU instruction level of vqfast's cpu backend and of faiss-cpu: one level, every level "
                             "this CPU runs ('all'), each in its own process, or 'auto' (as imported)")
    parser.add_argument("--threads", type=int, nargs="+", default=None,
                        help="CPU threads (torch and faiss); several counts run one after the other, each in its "
                             "own process (default: torch's)")


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


def level_environment(level: str) -> dict[str, str]:
    """The environment of a run at one CPU instruction level: vqfast's and faiss's variables set alike."""
    env = {**os.environ, "VQFAST_CPU_ISA": level}
    opt, simd = FAISS_LEVELS[level]
    env.pop("FAISS_OPT_LEVEL", None)
    if opt is not None:
        env["FAISS_OPT_LEVEL"] = opt
    env["FAISS_SIMD_LEVEL"] = simd
    return env


def run_levels(args: argparse.Namespace) -> int:
    """Re-run this command once per level and thread count, each in a fresh process (both libraries
    pick their level at import)."""
    from vqfast import _ext

    levels = [None] if args.isa == "auto" else list(_ext.cpu_isa_levels()) if args.isa == "all" else [args.isa]
    if not levels:
        raise InputError("--isa needs the compiled extension vqfast._C (no CPU levels without it)")
    status = 0
    for level in levels:
        for threads in args.threads or [None]:
            argv = ["--preset", args.preset, "--questions", *args.questions, "--results-dir", str(args.results_dir),
                    "--isa", level or "auto"] + (["--threads", str(threads)] if threads else []) + \
                   (["--device", args.device] if args.device else []) + \
                   (["--no-save"] if args.no_save else []) + (["--quiet"] if args.quiet else [])
            if level is not None:
                print(f"== CPU instruction level {level}" + (f", {threads} threads" if threads else ""), flush=True)
            else:
                print(f"== {threads} threads", flush=True)
            env = level_environment(level) if level is not None else dict(os.environ)
            status = max(status, subprocess.run([sys.executable, "-m", "vqfast", "bench", *argv], env=env).returncode)
    return status


def main(args: argparse.Namespace) -> int:
    # Before any re-run per level: the child processes inherit these.
    for model, path in (("var", getattr(args, "var_repo", None)), ("taming", getattr(args, "taming_repo", None))):
        if path is not None:
            if not os.path.isdir(path):
                raise InputError(f"--{model}-repo {path}: no such folder")
            os.environ[dropin.REPO_ENV[model]] = os.path.abspath(path)
    threads = getattr(args, "threads", None)
    if threads is not None and any(t < 1 for t in threads):
        raise InputError(f"--threads must be positive ints, got {' '.join(map(str, threads))}")
    if (args.isa != "auto" and os.environ.get("VQFAST_CPU_ISA") != args.isa) or (threads and len(threads) > 1):
        return run_levels(args)
    if threads:
        torch.set_num_threads(threads[0])
    if args.device == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device cuda: no CUDA device is available to this torch ({torch.__version__}); "
                         f"use --device cpu")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
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
        table = getattr(QUESTIONS[q], "format_table", format_table)(records, q)
        print(f"\n## {q}\n\n{table}")
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
