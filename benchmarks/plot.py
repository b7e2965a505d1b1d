"""Every benchmark table in README.md and docs/, and the charts, from the committed results.

    python benchmarks/plot.py            # rewrite the tables in README.md and docs/*.md and the charts
                                         # from benchmarks/results/
    python benchmarks/plot.py --check    # exit 1 when a committed table differs from what the results
                                         # give (nothing written, no chart drawn)
    python benchmarks/plot.py --results-dir bench-results [--out DIR]
                                         # charts and latest_<device>.md of your own `vqfast bench` run
                                         # (the docs are left alone)

A table in the docs sits between two marker comments, `<!-- table: NAME -->` and `<!-- /table -->`;
everything between them is generated (NAME is a key of TABLES below). A docs table shows only
records from clean commits (a commit without "-dirty") and from one machine, the one of the most
recent clean record, and its caption names that machine, the commit and the date. A question with
no clean record gets one line saying so instead of a table.

Charts (PNG) of benchmarks/results, from the same clean records:

    dropin_<device>.png              real quantizers: speed-up and peak-memory ratio of vqfast.accelerate
    forward_time_vs_k_<device>.png   nearest-codeword time vs K, one panel per D (the sweep cases)
    forward_speedup_<device>.png     headline shapes: speedup over the seeds' code per provider
    forward_roofline_cuda.png        GPU only: achieved TFLOP/s vs arithmetic intensity under the
                                     device's compute and bandwidth roofs
    codebook_ablation.png            benchmarks/ablation_codebook.py's chart
"""
from __future__ import annotations

import argparse
import difflib
import importlib.util
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: vqfast comes from this checkout
    sys.path.insert(0, str(ROOT))

from vqfast.bench.results import clean_latest, is_clean, provenance, read_jsonl  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
TABLE_RE = re.compile(r"(<!-- table: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)

# Dense peaks from the vendors' datasheets (SXM parts): fp32 non-tensor / tf32 tensor TFLOP/s,
# HBM TB/s. Used only to draw the roofs; a device not listed gets no roof lines.
GPU_PEAKS = {
    "H100": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "tbps": 3.35},
    "H200": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "tbps": 4.8},
    "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "tbps": 2.04},
}


def doc_files(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


# ----------------------------------------------------------------------------- records


def _records(results_dir: Path, question: str, device_type: str = "cpu") -> list[dict]:
    path = results_dir / f"{question}_{device_type}.jsonl"
    return read_jsonl(path) if path.exists() else []


def published(results_dir: Path, question: str, device_type: str = "cpu") -> list[dict]:
    """The records a docs table may show (vqfast.bench.results.clean_latest)."""
    return clean_latest(_records(results_dir, question, device_type))[1]


def _awaiting(results_dir: Path, question: str, device_type: str = "cpu") -> str:
    """The one line that stands for a question with no clean record."""
    records = _records(results_dir, question, device_type)
    name = f"{question}_{device_type}.jsonl"
    if not records:
        return f"No results yet: `benchmarks/results/{name}` holds no record."
    runs = sorted({(r["commit"], r["device"], r["date"][:10]) for r in records})
    where = "; ".join(f"commit {c} on {d}, {day}" for c, d, day in runs)
    return (f"Awaiting a clean re-run: every record in `benchmarks/results/{name}` comes from a working tree "
            f"with uncommitted changes ({where}), and the docs show no such record.")


def _caption(rows: list[dict], what: str) -> str:
    preset = ", ".join(sorted({str(r.get("preset")) for r in rows}))
    stat = ", ".join(sorted({f"{r.get('stat', 'median')} of {r.get('repeats')}" for r in rows if r.get("repeats")}))
    return f"{what} (`--preset {preset}`{', ' + stat if stat else ''}). Measured on {provenance(rows)}."


def _span(values: list[float], fmt: str = "{:.2f}x") -> str:
    lo, hi = min(values), max(values)
    return fmt.format(lo) if lo == hi else f"{fmt.format(lo)} to {fmt.format(hi)}"


# ----------------------------------------------------------------------------- tables


def _faiss_pairs(rows: list[dict]) -> list[tuple[dict, dict]]:
    by_case: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        if r["case"].get("set") == "faiss" and r["status"] == "ok":
            key = (r.get("cpu_isa"), r["case"]["n"], r["case"]["d"], r["case"]["k"])
            by_case.setdefault(key, {})[r["provider"]] = r
    return [(p["vqfast-cpu"], p["faiss-cpu"]) for p in by_case.values() if "vqfast-cpu" in p and "faiss-cpu" in p]


def _faiss_summary(rows: list[dict]) -> str:
    pairs = _faiss_pairs(rows)
    if not pairs:
        return ""
    ratios = [v["value"] / f["value"] for v, f in pairs]
    text = (f"vqfast took {_span(ratios)} faiss-cpu's time on the {len(pairs)} shapes "
            f"(median {statistics.median(ratios):.2f}x)")
    wide = [v["of_peak"] for v, _ in pairs if v["case"]["d"] >= 64 and v.get("of_peak") is not None]
    if wide:
        text += (f"; at D >= 64 it ran at {_span([100 * x for x in wide], '{:.0f} %')} of the fp32 `torch.mm` rate "
                 "measured in the same run")
    return text + "."


def table_faiss(results_dir: Path) -> str:
    from vqfast.bench.faiss_cpu import format_table

    rows = published(results_dir, "faiss")
    if not rows:
        return _awaiting(results_dir, "faiss")
    return "\n\n".join([_caption(rows, "vqfast `cpu` (exact) against faiss-cpu `IndexFlatL2`, k = 1"),
                        format_table(rows), _faiss_summary(rows)])


def table_dropin(results_dir: Path) -> str:
    from vqfast.bench.dropin import format_table

    rows = published(results_dir, "dropin")
    if not rows:
        return _awaiting(results_dir, "dropin")
    return "\n\n".join([_caption(rows, "Real quantizers before and after `vqfast.accelerate`"), format_table(rows)])


def _generic(question: str, sets: tuple[str, ...] | None = None):
    def render(results_dir: Path) -> str:
        from vqfast.bench.table import format_table

        rows = published(results_dir, question)
        if not rows:
            return _awaiting(results_dir, question)
        return "\n\n".join([_caption(rows, f"`vqfast bench --questions {question}`"), format_table(rows, question, sets)])

    return render


# The real classes behind the dropin benchmark's model names (vqfast/bench/dropin.py builds them).
DROPIN_CLASSES = {
    "var": "VAR `VectorQuantizer2`",
    "taming": "taming `VectorQuantizer2`",
    "diffusers": "diffusers `VQModel` quantizer",
    "vqpytorch-vq": "vector-quantize-pytorch `VectorQuantize`",
    "vqpytorch-rvq": "vector-quantize-pytorch `ResidualVQ`",
    "llamagen": "LlamaGen `VectorQuantizer`",
}


def _dropin_summary(rows: list[dict]) -> list[str]:
    """One table row per real quantizer: forward and training-step speed-up and peak-memory ratio."""
    from vqfast.bench.dropin import case_label

    pairs: dict[str, dict[str, dict[str, dict]]] = {}
    for r in rows:
        if r["status"] == "ok":
            shape = case_label(r["case"]).rsplit(", ", 1)[0].split(" ", 1)[1]  # without the model and the mode
            label = f"{DROPIN_CLASSES.get(r['case']['model'], r['case']['model'])}: {shape}"
            pairs.setdefault(label, {}).setdefault(r["case"]["mode"], {})[r["provider"]] = r

    def ratios(by_mode: dict[str, dict], mode: str) -> str:
        pair = by_mode.get(mode, {})
        orig, acc = pair.get("original"), pair.get("accelerated")
        if not (orig and acc):
            if mode == "forward" and by_mode.get("train_step") and any(
                    p["case"].get("entropy_loss_ratio") for p in by_mode["train_step"].values()):
                return "as at ratio 0 (an eval forward computes no entropy loss)"
            return "not measured"
        speedup = orig["value"] / acc["value"]
        text = f"{speedup:.2f}x faster" if speedup >= 1 else f"{1 / speedup:.2f}x slower"
        if orig.get("peak_bytes") and acc.get("peak_bytes"):
            text += f", {orig['peak_bytes'] / acc['peak_bytes']:.1f}x less peak memory"
        return text

    return [f"| {label} | {ratios(m, 'forward')} | {ratios(m, 'train_step')} |"
            for label, m in pairs.items()]


def table_headline(results_dir: Path) -> str:
    """The README's numbers: vqfast against faiss-cpu (and chunked PyTorch when a clean forward run
    has it), and the real libraries' quantizers before and after vqfast.accelerate."""
    parts = []
    faiss = published(results_dir, "faiss")
    if faiss:
        parts.append(f"**Against faiss-cpu** (`IndexFlatL2`, exact, k = 1, the index built per call as a "
                     f"training loop must), both at the same instruction level: {_faiss_summary(faiss)} "
                     f"Measured on {provenance(faiss)}.")
    else:
        parts.append(_awaiting(results_dir, "faiss"))
    forward = [r for r in published(results_dir, "forward") if r["case"].get("set") == "headline" and r["status"] == "ok"]
    by_case: dict[tuple, dict[str, dict]] = {}
    for r in forward:
        by_case.setdefault(tuple(sorted(r["case"].items())), {})[r["provider"]] = r
    chunked = [p["torch-chunked"]["value"] / p["vqfast-cpu"]["value"] for p in by_case.values()
               if "torch-chunked" in p and "vqfast-cpu" in p]
    if chunked:
        parts.append(f"**Against chunked PyTorch** (`torch-chunked`: the expanded distance in row chunks, then "
                     f"argmin): vqfast {_span(chunked)} faster on the {len(chunked)} headline shapes. "
                     f"Measured on {provenance(forward)}.")
    else:
        parts.append("**Against chunked PyTorch** (the strongest pure-PyTorch search): " + _awaiting(results_dir, "forward"))
    dropin = published(results_dir, "dropin")
    if dropin:
        parts.append("**The real libraries' quantizers**, before and after `vqfast.accelerate` (forward: eval mode, "
                     f"no gradients; training step: loss, backward, SGD). Measured on {provenance(dropin)}.")
        parts.append("\n".join(["| quantizer: input, codebook | forward | training step |", "|---|---|---|",
                                 *_dropin_summary(dropin)]))
    else:
        parts.append(_awaiting(results_dir, "dropin"))
    return "\n\n".join(parts)


def _benchmark_script(name: str):
    """benchmarks/<name>.py (a script beside this one, not a package module) as a module."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ablation_rows(results_dir: Path) -> list[dict]:
    import json

    path = results_dir / "codebook_ablation.json"
    records = [r for r in (json.loads(path.read_text()) if path.exists() else []) if is_clean(r)]
    if not records:
        return []
    device = max(records, key=lambda r: r["date"])["device"]
    return _benchmark_script("ablation_codebook").latest_full([r for r in records if r["device"] == device])


def table_codebook_ablation(results_dir: Path) -> str:
    rows = _ablation_rows(results_dir)
    if not rows:
        return "No clean full-schedule record yet in `benchmarks/results/codebook_ablation.json`."
    return _benchmark_script("ablation_codebook").markdown(rows).strip()


def table_tokenize(results_dir: Path) -> str:
    """benchmarks/bench_tokenize.py's latest clean record (token set vs LlamaGen's per-image scheme)."""
    import json

    path = results_dir / "tokenize_cpu.json"
    records = [r for r in (json.loads(path.read_text()) if path.exists() else []) if is_clean(r)]
    if not records:
        return "No clean record yet in `benchmarks/results/tokenize_cpu.json`."
    return _benchmark_script("bench_tokenize").markdown(max(records, key=lambda r: r["date"])).strip()


CPU_LEVELS = ("generic", "avx2", "avx512", "neon")


def table_cpu_levels(results_dir: Path) -> str:
    """Which CPU instruction level each committed (clean) benchmark record measured, and where."""
    runs: dict[tuple[str, str], dict[str, set]] = {}
    for path in sorted(results_dir.glob("*_cpu.jsonl")):
        for r in read_jsonl(path):
            if is_clean(r) and r.get("cpu_isa"):
                run = runs.setdefault((r["cpu_isa"], r["device"]), {"questions": set(), "commits": set(), "dates": set()})
                run["questions"].add(r["question"])
                run["commits"].add(r["commit"])
                run["dates"].add(r["date"][:10])
    lines = ["| level | machine | questions | commits | dates |", "|---|---|---|---|---|"]
    for (level, device), run in sorted(runs.items(), key=lambda kv: (CPU_LEVELS.index(kv[0][0]) if kv[0][0] in CPU_LEVELS else 99, kv[0][1])):
        lines.append(f"| `{level}` | {device} | {', '.join(sorted(run['questions']))} | {', '.join(sorted(run['commits']))} "
                     f"| {', '.join(sorted(run['dates']))} |")
    missing = [f"`{lv}`" for lv in CPU_LEVELS if lv not in {level for level, _ in runs}]
    text = "\n".join(lines) if runs else "No clean CPU benchmark record yet."
    if missing:
        text += f"\n\nNo clean benchmark record comes from {', '.join(missing)}."
    return text


TABLES = {
    "cpu_levels": table_cpu_levels,
    "headline": table_headline,
    "faiss_cpu": table_faiss,
    "dropin_cpu": table_dropin,
    "forward_cpu": _generic("forward", ("headline", "dtype")),
    "train_step_cpu": _generic("train_step"),
    "multiscale_cpu": _generic("multiscale"),
    "memory_cpu": _generic("memory"),
    "codebook_ablation": table_codebook_ablation,
    "tokenize_cpu": table_tokenize,
}


def render(text: str, results_dir: Path = RESULTS, where: str = "") -> str:
    """``text`` with every marked table regenerated; an unknown table name is an error."""
    def fill(m: re.Match) -> str:
        name = m.group("name")
        if name not in TABLES:
            raise ValueError(f"{where}: unknown table {name!r} (known: {', '.join(TABLES)})")
        return f"{m.group(1)}{TABLES[name](results_dir).strip()}\n{m.group(4)}"

    return TABLE_RE.sub(fill, text)


def stale_docs(root: Path = ROOT, results_dir: Path = RESULTS) -> dict[Path, str]:
    """{doc: unified diff} for every doc whose tables differ from what the results give."""
    out = {}
    for path in doc_files(root):
        text = path.read_text(encoding="utf-8")
        new = render(text, results_dir, str(path))
        if new != text:
            out[path] = "".join(difflib.unified_diff(text.splitlines(True), new.splitlines(True),
                                                     f"{path} (committed)", f"{path} (from the results)"))
    return out


def rewrite_docs(root: Path = ROOT, results_dir: Path = RESULTS) -> list[Path]:
    written = []
    for path in doc_files(root):
        text = path.read_text(encoding="utf-8")
        new = render(text, results_dir, str(path))
        if new != text:
            path.write_text(new, encoding="utf-8")
            written.append(path)
    return written


# ----------------------------------------------------------------------------- charts


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


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def _title(rows: list[dict], what: str) -> str:
    r = max(rows, key=lambda x: x["date"])
    return (f"{what} (preset {r.get('preset')}, {r.get('stat', 'median')} of {r.get('repeats')})\n"
            f"{r['device']}, torch {r['torch']}, commit {r['commit']}, {r['date'][:10]}")


def plot_time_vs_k(rows: list[dict], out: Path) -> Path | None:
    import matplotlib.ticker

    rows = [r for r in rows if r["case"].get("set") == "sweep"]
    if not rows:
        return None
    plt = _plt()
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
    plt = _plt()
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
    plt = _plt()
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
    from vqfast.bench.dropin import case_label

    rows = [r for r in rows if r["status"] == "ok"]
    pairs: dict[str, dict[str, dict]] = {}
    for r in rows:
        pairs.setdefault(case_label(r["case"]), {})[r["provider"]] = r
    pairs = {k: v for k, v in pairs.items() if "original" in v and "accelerated" in v}
    if not pairs:
        return None
    plt = _plt()
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


def charts(results_dir: Path, out: Path, select) -> list[Path]:
    """Every chart the results allow; ``select`` picks the records of one results file."""
    written = []
    for path in sorted(results_dir.glob("forward_*.jsonl")):
        rows = select(read_jsonl(path))
        written += [plot_time_vs_k(rows, out), plot_speedup(rows, out), plot_roofline(rows, out)]
    for path in sorted(results_dir.glob("dropin_*.jsonl")):
        written.append(plot_dropin(select(read_jsonl(path)), out, path.stem.split("_", 1)[1]))
    return [p for p in written if p is not None]


def write_latest_tables(results_dir: Path, device_type: str, out: Path) -> Path | None:
    """Markdown for one's own run: the latest record of each case and provider, per question."""
    from vqfast.bench.cli import QUESTIONS
    from vqfast.bench.table import format_table

    parts = []
    for question in ("forward", "train_step", "multiscale", "memory", "dropin", "faiss"):
        records = _records(results_dir, question, device_type)
        if not records:
            continue
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


# ----------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 when a table in README.md or docs/ differs from what benchmarks/results gives")
    parser.add_argument("--results-dir", default=None,
                        help="your own `vqfast bench --results-dir` folder: draw its charts and latest_<device>.md "
                             "(the docs are left alone)")
    parser.add_argument("--out", default=None, help="with --results-dir: where the PNGs go (default: that folder)")
    args = parser.parse_args(argv)
    if args.check and args.results_dir:
        parser.error("--check compares the docs with benchmarks/results; it takes no --results-dir")
    if args.out and not args.results_dir:
        parser.error("--out goes with --results-dir (the committed charts live in benchmarks/results)")

    if args.results_dir:
        results_dir = Path(args.results_dir)
        if not results_dir.is_dir():
            parser.error(f"--results-dir {results_dir} is not a folder")
        out = Path(args.out or results_dir)
        out.mkdir(parents=True, exist_ok=True)
        written = charts(results_dir, out, latest)
        for device_type in sorted({p.stem.rsplit("_", 1)[-1] for p in results_dir.glob("*_*.jsonl")}):
            written.append(write_latest_tables(results_dir, device_type, out))
        written = [p for p in written if p is not None]
        for p in written:
            print(f"wrote {p}")
        if not written:
            print(f"no results under {results_dir}; run `vqfast bench --results-dir {results_dir}` first", file=sys.stderr)
            return 1
        return 0

    if args.check:
        stale = stale_docs()
        for path, diff in stale.items():
            print(diff)
        if stale:
            print(f"{len(stale)} file(s) hold tables that differ from benchmarks/results: "
                  "run `python benchmarks/plot.py` and commit the result", file=sys.stderr)
            return 1
        print("every table in README.md and docs/ matches benchmarks/results")
        return 0

    for path in rewrite_docs():
        print(f"rewrote the tables of {path.relative_to(ROOT)}")
    for path in charts(RESULTS, RESULTS, lambda records: clean_latest(records)[1]):
        print(f"wrote {path.relative_to(ROOT)}")
    rows = _ablation_rows(RESULTS)
    if rows:
        ablation = _benchmark_script("ablation_codebook")
        ablation.plot(rows, RESULTS / "codebook_ablation.png")
        (RESULTS / "codebook_ablation.md").write_text(ablation.markdown(rows))
        print(f"wrote {(RESULTS / 'codebook_ablation.png').relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
