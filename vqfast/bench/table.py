"""Markdown tables of result records: one table per question, one row per (case, provider), and the
failures a run must not hide.

Ratio columns are speedups (memory savings for question 4): "x seeds" = seeds / this and
"x best peer" = best other non-vqfast provider / this; > 1 means this provider wins. The forward
table's "idx mismatch" is the fraction of the checked rows whose index differs from the float64
oracle's, "wrong rows" the rows where a vqfast provider breaks its own precision's contract.
"""
from __future__ import annotations


def _case_label(question: str, case: dict) -> str:
    if question == "forward":
        return f"N={case['n']} D={case['d']} K={case['k']} {case['dtype']}"
    if question == "train_step":
        return f"N={case['n']} D={case['d']} K={case['k']} " + (f"RVQ x{case['stages']}" if case["residual"] else "VQ")
    if question == "memory":
        return f"{case['kind']} N={case['n']} D={case['d']} K={case['k']}"
    return " ".join(f"{k}={v}" for k, v in case.items())


def _ratio(x) -> str:
    return "" if x is None else f"{x:.2f}x"


def _value(r: dict) -> str:
    if r["status"] == "error":
        return "ERROR"
    if r["status"] != "ok":
        return "skipped"
    if r["metric_name"] == "peak_bytes":
        return f"{r['value'] / 2**20:.1f} MiB"
    return f"{r['value']:.2f} ms"


def format_table(records: list[dict], question: str, sets: tuple[str, ...] | None = None) -> str:
    """The records of one question as a markdown table (forward: only the given case sets)."""
    rows = [r for r in records if r["question"] == question]
    if sets is not None:
        rows = [r for r in rows if r["case"].get("set") in sets]
    if not rows:
        return ""
    gpu = any(r.get("gemm_fraction") is not None for r in rows)
    forward = question == "forward"
    header = ["case", "provider", "peak" if question == "memory" else rows[0].get("stat", "median") + " time",
              "x seeds", "x best peer"]
    if forward:
        header += ["idx mismatch", "qerr +%", "wrong rows"]
    if gpu:
        header += ["TFLOP/s", "GB/s", "of GEMM"]
    if question == "train_step" and any(r.get("peak_bytes") is not None for r in rows):
        header += ["peak"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        ok = r["status"] == "ok"
        cells = [_case_label(question, r["case"]), r["provider"], _value(r),
                 _ratio(r.get("ratio_vs_seeds")), _ratio(r.get("ratio_vs_best_peer"))]
        if forward:
            wrong = r.get("wrong_rows")
            cells += [f"{r['index_mismatch']:.1e}" if ok else "", f"{100 * r['qerr_increase']:.3f}" if ok else "",
                      f"{wrong} of {r['checked_rows']}" if ok and wrong is not None else ""]
        if gpu:
            cells += [f"{r['tflops']:.1f}" if ok else "", f"{r['gbps']:.0f}" if ok else "",
                      f"{r['gemm_fraction']:.2f}" if ok and r.get("gemm_fraction") is not None else ""]
        if "peak" in header and question == "train_step":
            cells += [f"{r['peak_bytes'] / 2**20:.1f} MiB" if r.get("peak_bytes") is not None else ""]
        lines.append("| " + " | ".join(cells) + " |")
    for r in rows:
        if r["status"] != "ok":
            word = "FAILED" if r["status"] == "error" else "skipped"
            lines.append(f"\n- {r['provider']} {word} at {_case_label(question, r['case'])}: {r['reason']}")
    return "\n".join(lines)


def failures(records: list[dict]) -> list[str]:
    """What makes a benchmark run fail: a provider that raised, or a vqfast provider that returned
    rows breaking its precision's contract (checked against the float64 oracle)."""
    out = []
    for r in records:
        where = f"{r['question']} {r['provider']} at {_case_label(r['question'], r['case'])}"
        if r["status"] == "error":
            out.append(f"{where} raised: {r['reason']}")
        elif r.get("wrong_rows"):
            out.append(f"{where}: {r['wrong_rows']} of {r['checked_rows']} checked rows break its "
                       f"{r['precision']} contract (index mismatch {r['index_mismatch']:.2e})")
    return out


def header_line(env: dict, preset: str) -> str:
    return (f"vqfast bench --preset {preset}: {env['device']}, torch {env['torch']}, triton {env['triton']}, "
            f"commit {env['commit']}, {env['date']}")
