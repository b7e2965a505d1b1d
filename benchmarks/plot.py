"""Render PNG charts from a results folder's *.jsonl (the latest record of each case and provider).

    python benchmarks/plot.py [--results-dir bench-results] [--out <results-dir>]
    python benchmarks/plot.py --results-dir benchmarks/results    # the committed charts and tables

The default folder is the one `vqfast bench` writes to by default (./bench-results).

    forward_time_vs_k_<device>.png   nearest-codeword time vs K, one panel per D (the sweep cases)
    forward_speedup_<device>.png     headline shapes: speedup over the seeds' code per provider
    latest_<device>.md               the latest table of every question (for the README)
    forward_roofline_cuda.png        GPU only: achieved TFLOP/s vs arithmetic intensity under the
                                     device's compute and bandwidth roofs
    dropin_<device>.png              real quantizers: speed-up and peak-memory ratio of vqfast.accelerate
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

from vqfast.bench.cli import DEFAULT_RESULTS_DIR, QUESTIONS  # noqa: E402
from vqfast.bench.dropin import case_label  # noqa: E402
from vqfast.bench.results import read_jsonl  # noqa: E402
from vqfast.bench.table import format_table  # noqa: E402

# Dense peaks from the vendors' datasheets (SXM parts): fp32 non-tensor / tf32 tensor TFLOP/s,
# HBM TB/s. Used only to draw the roofs; a device not listed gets no roof lines.
GPU_PEAKS = {
    "H100": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "tbps": 3.35},
    "H200": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "tbps": 4.8},
    "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "tbps": 2.04},
}


def latest(records: list[dict]) -> list[dict]:
    """Keep the most recent "ok" record of each (question, case, provider)."""
    best: dict[tuple, dict] = {}
    for r in records:
        if r.get("status") != "ok":
            continue
        key = (r["question"], tuple(sorted(r["case"].items())), r["provider"])
        if key not in best or r["date"] >= best[key]["date"]:
            best[key] = r
    return list(best.values())


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _title(rows: list[dict], what: str) -> str:
    r = max(rows, key=lambda x: x["date"])
    return (f"{what} (preset {r.get('preset')}, {r.get('stat', 'median')} of {r.get('repeats')})\n"
            f"{r['device']}, torch {r['torch']}, commit {r['commit']}, {r['date'][:10]}")


def plot_time_vs_k(rows: list[dict], out: Path) -> Path | None:
    rows = [r for r in rows if r["case"].get("set") == "sweep"]
    if not rows:
        return None
    ds = sorted({r["case"]["d"] for r in rows})
    fig, axes = plt.subplots(1, len(ds), figsize=(5 * len(ds), 4), squeeze=False)
    for ax, d in zip(axes[0], ds):
        sub = [r for r in rows if r["case"]["d"] == d]
        for prov in sorted({r["provider"] for r in sub}):
            pts = sorted((r["case"]["k"], r["value"]) for r in sub if r["provider"] == prov)
            ax.plot([k for k, _ in pts], [v for _, v in pts], marker="o", label=prov)
        ax.set(xscale="log", yscale="log", xlabel="K (codebook size)", ylabel=f"ms ({sub[0].get('stat', 'median')})",
               title=f"D={d}, N={sub[0]['case']['n']}")
        ks = sorted({r["case"]["k"] for r in sub})
        ax.set_xticks(ks, [str(k) for k in ks], minor=False)
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(_title(rows, "nearest-codeword forward: time vs K"), fontsize=9)
    return _save(fig, out / f"forward_time_vs_k_{rows[0]['device_type']}.png")


def plot_speedup(rows: list[dict], out: Path) -> Path | None:
    rows = [r for r in rows if r["case"].get("set") == "headline" and r.get("ratio_vs_seeds") is not None]
    if not rows:
        return None
    shapes = sorted({(r["case"]["n"], r["case"]["d"], r["case"]["k"]) for r in rows})
    provs = sorted({r["provider"] for r in rows if r["group"] != "seeds"})
    fig, ax = plt.subplots(figsize=(max(8, 2.2 * len(shapes)), 4.2))
    width = 0.8 / max(1, len(provs))
    for i, prov in enumerate(provs):
        vals = []
        for n, d, k in shapes:
            hit = [r["ratio_vs_seeds"] for r in rows if r["provider"] == prov
                   and (r["case"]["n"], r["case"]["d"], r["case"]["k"]) == (n, d, k)]
            vals.append(hit[0] if hit else 0.0)
        ax.bar([j + i * width for j in range(len(shapes))], vals, width, label=prov)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))])
    ax.set_xticklabels([f"N={n}\nD={d} K={k}" for n, d, k in shapes], fontsize=8)
    ax.set_ylabel("speedup over the seeds' code (x)")
    ax.legend(fontsize=8)
    ax.set_title(_title(rows, "nearest-codeword forward, float32"), fontsize=9)
    return _save(fig, out / f"forward_speedup_{rows[0]['device_type']}.png")


def plot_roofline(rows: list[dict], out: Path) -> Path | None:
    rows = [r for r in rows if r["device_type"] == "cuda" and r.get("tflops") is not None]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for prov in sorted({r["provider"] for r in rows}):
        sub = [r for r in rows if r["provider"] == prov]
        # arithmetic intensity = flops / bytes = (TFLOP/s) / (TB/s) from the same timing.
        ax.scatter([r["tflops"] / (r["gbps"] / 1e3) for r in sub], [r["tflops"] for r in sub], label=prov, s=14)
    peaks = next((v for k, v in GPU_PEAKS.items() if k in rows[0]["device"]), None)
    if peaks is not None:
        xs = [10 ** (i / 10) for i in range(-10, 51)]
        for name in ("fp32", "tf32"):
            ax.plot(xs, [min(peaks[name], peaks["tbps"] * x) for x in xs], "--", lw=1, label=f"roof {name}")
    ax.set(xscale="log", yscale="log", xlabel="arithmetic intensity (flop / byte)", ylabel="TFLOP/s (2NKD flops)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(_title(rows, "nearest-codeword forward vs the roofline"), fontsize=9)
    return _save(fig, out / "forward_roofline_cuda.png")


def plot_dropin(rows: list[dict], out: Path, device_type: str) -> Path | None:
    """Per case and mode: original time / accelerated time, and original peak / accelerated peak."""
    pairs: dict[str, dict[str, dict]] = {}
    for r in rows:
        pairs.setdefault(case_label(r["case"]), {})[r["provider"]] = r
    pairs = {k: v for k, v in pairs.items() if "original" in v and "accelerated" in v}
    if not pairs:
        return None
    labels = list(pairs)
    speed = [v["original"]["value"] / v["accelerated"]["value"] for v in pairs.values()]
    memory = [v["original"]["peak_bytes"] / v["accelerated"]["peak_bytes"]
              if v["original"].get("peak_bytes") and v["accelerated"].get("peak_bytes") else float("nan")
              for v in pairs.values()]
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.45 * len(labels) + 1.8), sharey=True)
    for ax, values, what in ((axes[0], speed, "speed-up (original time / accelerated time)"),
                             (axes[1], memory, "peak memory, original / accelerated")):
        ax.barh(range(len(labels)), values, color="tab:blue")
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel(what)
        for i, v in enumerate(values):
            if v == v:
                ax.text(v, i, f" {v:.2f}x", va="center", fontsize=8)
    axes[0].set_yticks(range(len(labels)), labels, fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle(_title(rows, "vqfast.accelerate on real quantizers"), fontsize=9)
    return _save(fig, out / f"dropin_{device_type}.png")


def write_latest_tables(results_dir: Path, device_type: str, out: Path) -> Path | None:
    """Markdown: the latest record of each case and provider, per question, with where it ran."""
    parts = []
    for question in ("forward", "train_step", "multiscale", "memory", "dropin", "faiss"):
        path = results_dir / f"{question}_{device_type}.jsonl"
        if not path.exists():
            continue
        records = read_jsonl(path)
        keep = {(tuple(sorted(r["case"].items())), r["provider"]): r for r in sorted(records, key=lambda r: r["date"])}
        rows = list(keep.values())
        runs = sorted({(r["commit"], r["date"][:16], r["device"]) for r in rows})
        where = "; ".join(f"commit {c} at {d} on {dev}" for c, d, dev in runs)
        table = getattr(QUESTIONS[question], "format_table", format_table)(rows, question)
        parts.append(f"### {question}\n\n{where}\n\n{table}\n")
    if not parts:
        return None
    path = out / f"latest_{device_type}.md"
    path.write_text("\n".join(parts))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results-dir", default=DEFAULT_RESULTS_DIR,
                        help=f"the folder `vqfast bench --results-dir` wrote to (default: ./{DEFAULT_RESULTS_DIR})")
    parser.add_argument("--out", default=None, help="where PNGs go (default: the results directory)")
    args = parser.parse_args(argv)
    results_dir = Path(args.results_dir)
    out = Path(args.out or results_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in sorted(results_dir.glob("forward_*.jsonl")):
        rows = latest(read_jsonl(path))
        written += [plot_time_vs_k(rows, out), plot_speedup(rows, out), plot_roofline(rows, out)]
    for path in sorted(results_dir.glob("dropin_*.jsonl")):
        written.append(plot_dropin(latest(read_jsonl(path)), out, path.stem.split("_", 1)[1]))
    for device_type in sorted({p.stem.rsplit("_", 1)[-1] for p in results_dir.glob("*_*.jsonl")}):
        written.append(write_latest_tables(results_dir, device_type, out))
    written = [p for p in written if p is not None]
    for p in written:
        print(f"wrote {p}")
    if not written:
        print(f"no forward results under {results_dir}; run `vqfast bench` first", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
