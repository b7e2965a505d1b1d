"""Which codebook options pay on the demo preset: each option alone, and the demo's chosen combination.

    python benchmarks/ablation_codebook.py                    # the full demo schedule, every variant
    python benchmarks/ablation_codebook.py --steps 400        # a short screen (results kept apart)
    python benchmarks/ablation_codebook.py --only none,chosen
    python benchmarks/ablation_codebook.py --report-only      # redraw the plot and table from the JSON

Every variant is ``vqfast train --preset demo`` with the preset's codebook options replaced by the
variant's (``none`` is VAR's quantizer as is, ``chosen`` the preset itself; one more row pairs l2 codes
with the low-dimensional lookup, as the literature does), run by the trainer's own
``train()`` in a child process with one torch thread, ``--jobs`` (default 2) at a time. Held-out
metrics come from the trainer's metrics.json: codebook usage (codes hit at least once by the 256
held-out crops' tokens, overall and per scale), perplexity, PSNR. Times: the training loop's wall
seconds, and the child's CPU seconds for the whole run (less sensitive to a shared machine).

Appends one record per run to benchmarks/results/codebook_ablation.json (device, versions, date,
commit, load average) and rewrites codebook_ablation.png and codebook_ablation.md from the latest
full-schedule record of every variant.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
JSON_PATH = RESULTS / "codebook_ablation.json"

# The options of vqfast.models.MultiScaleQuantizer; each variant below sets some of them.
OPTION_KEYS = ("ema", "decay", "eps", "kmeans_init", "kmeans_iters", "dead_code_threshold", "l2_codes",
               "codebook_dim", "simvq")
VARIANTS: dict[str, dict | None] = {
    "none": {},
    "kmeans_init": {"kmeans_init": True},
    "dead_code_restart": {"dead_code_threshold": 1.0},
    "ema": {"ema": True},
    "l2_codes": {"l2_codes": True},
    "codebook_dim_8": {"codebook_dim": 8},
    # The literature's pairing (ViT-VQGAN, LlamaGen): a low-dimensional lookup of l2-normalised codes.
    "l2_codes+codebook_dim_8": {"l2_codes": True, "codebook_dim": 8},
    "simvq": {"simvq": True},
    "chosen": None,  # the demo preset's own options
}


def variant_config(options: dict | None, steps: int | None) -> dict:
    """The demo preset's config with its codebook options replaced by ``options`` (None: kept)."""
    from vqfast import train as vtrain

    cfg = vtrain.make_config("demo", steps=steps)
    if options is not None:
        cfg["model"] = {**{k: v for k, v in cfg["model"].items() if k not in OPTION_KEYS}, **options}
    return cfg


def run_variant(name: str, options: dict | None, steps: int | None, out: str) -> dict:
    """In a child process: train one variant, return its record."""
    import torch

    from vqfast import train as vtrain

    torch.set_num_threads(1)
    cfg = variant_config(options, steps)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    result = vtrain.train(cfg, Path(out) / name, progress=False)
    cpu_s, wall_s = time.process_time() - cpu0, time.perf_counter() - wall0
    m = result["metrics"]
    trained_tokens = cfg["steps"] * cfg["batch_size"] * m["tokens_per_image"]
    return {
        "variant": name, "options": {k: v for k, v in cfg["model"].items() if k in OPTION_KEYS},
        "steps": cfg["steps"], "full_schedule": steps is None,
        "heldout_codebook_usage": m["codebook_usage"], "heldout_codebook_used": m["codebook_used"],
        "heldout_usage_per_scale": m.get("codebook_usage_per_scale"),
        "heldout_perplexity": m["perplexity"], "heldout_psnr_db": m["heldout_psnr_db"],
        "train_wall_s": trained_tokens / m["train_tokens_per_s"], "run_wall_s": wall_s, "run_cpu_s": cpu_s,
        "vocab_size": cfg["model"]["vocab_size"],
    }


def environment() -> dict:
    import torch

    from vqfast.bench.results import device_name, git_commit

    torch.set_num_threads(1)
    return {"device": device_name("cpu"), "torch": torch.__version__, "commit": git_commit(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "load_average_1min": os.getloadavg()[0]}


def read_records() -> list[dict]:
    return json.loads(JSON_PATH.read_text()) if JSON_PATH.exists() else []


def latest_full(records: list[dict]) -> list[dict]:
    """The latest full-schedule record of every variant, in VARIANTS order."""
    best = {}
    for r in records:
        if r["full_schedule"] and (r["variant"] not in best or r["date"] >= best[r["variant"]]["date"]):
            best[r["variant"]] = r
    return [best[v] for v in VARIANTS if v in best]


def _options_text(options: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items()) or "(VAR's quantizer)"


def markdown(rows: list[dict]) -> str:
    if not rows:
        return ""
    r0 = max(rows, key=lambda r: r["date"])
    lines = [
        f"Demo preset ({rows[0]['steps']} steps, vocabulary {rows[0]['vocab_size']}), one torch thread per run, "
        f"two runs at a time on a shared machine ({r0['device']}, torch {r0['torch']}, commit {r0['commit']}, "
        f"{r0['date'][:10]}). Usage: codes hit by the 256 held-out crops' tokens.",
        "",
        "| variant | options | usage | usage per scale (1x1 .. finest) | perplexity | PSNR (dB) | train wall (s) | CPU (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        per_scale = " / ".join(f"{100 * u:.0f}" for u in r["heldout_usage_per_scale"] or [])
        lines.append(
            f"| {r['variant']} | {_options_text(r['options'])} | {100 * r['heldout_codebook_usage']:.1f} % "
            f"| {per_scale} | {r['heldout_perplexity']:.1f} | {r['heldout_psnr_db']:.2f} | {r['train_wall_s']:.0f} "
            f"| {r['run_cpu_s']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["variant"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = (("held-out codebook usage (%)", [100 * r["heldout_codebook_usage"] for r in rows], 95),
              ("held-out PSNR (dB)", [r["heldout_psnr_db"] for r in rows], 26),
              ("run CPU seconds (1 thread)", [r["run_cpu_s"] for r in rows], None))
    for ax, (title, values, target) in zip(axes, panels):
        colours = ["tab:orange" if n == "chosen" else "tab:blue" for n in names]
        ax.barh(names, values, color=colours)
        if target is not None:
            ax.axvline(target, color="k", linestyle="--", linewidth=1)
            ax.set_xlim(min(values) * 0.9 if title.endswith("(dB)") else 0, max(max(values), target) * 1.03)
        ax.set_title(title)
        ax.invert_yaxis()
    fig.suptitle(f"codebook options on the demo preset ({rows[0]['steps']} steps); dashed: the targets")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def report(records: list[dict]) -> None:
    rows = latest_full(records)
    if not rows:
        print("no full-schedule records yet: nothing to plot")
        return
    (RESULTS / "codebook_ablation.md").write_text(markdown(rows))
    plot(rows, RESULTS / "codebook_ablation.png")
    print(markdown(rows))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="a short screen instead of the demo's schedule")
    parser.add_argument("--only", default=None, help=f"comma-separated variants (default all: {','.join(VARIANTS)})")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2)")
    parser.add_argument("--out", default="runs/ablation", help="training outputs (default runs/ablation)")
    parser.add_argument("--report-only", action="store_true", help="redraw the plot and table from the JSON")
    args = parser.parse_args(argv)
    if args.report_only:
        report(read_records())
        return 0
    names = args.only.split(",") if args.only else list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"--only: unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be a positive int, got {args.steps}")
    if args.jobs < 1:
        parser.error(f"--jobs must be a positive int, got {args.jobs}")
    env = environment()
    out = str(Path(args.out) / (f"steps{args.steps}" if args.steps else "full"))
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool:
        futures = {pool.submit(run_variant, n, VARIANTS[n], args.steps, out): n for n in names}
        for fut in concurrent.futures.as_completed(futures):
            record = {**env, **fut.result(), "load_average_1min_end": os.getloadavg()[0]}
            records = read_records() + [record]
            RESULTS.mkdir(parents=True, exist_ok=True)
            JSON_PATH.write_text(json.dumps(records, indent=1) + "\n")
            print(f"{record['variant']:>18}: usage {100 * record['heldout_codebook_usage']:.1f} %, "
                  f"perplexity {record['heldout_perplexity']:.1f}, PSNR {record['heldout_psnr_db']:.2f} dB, "
                  f"train {record['train_wall_s']:.0f} s wall, {record['run_cpu_s']:.0f} s CPU", flush=True)
    report(read_records())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
