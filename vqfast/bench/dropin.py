"""Question 5: the quantizers of real models, before and after ``vqfast.accelerate``.

Each case is one real quantizer at a realistic shape, timed (and its peak memory measured) in two
modes: ``forward`` (eval mode, no gradients: tokenising) and ``train_step`` (train mode: the module's
own loss plus a stand-in reconstruction term, backward, SGD step). Two providers per case, built
from the same seed: ``original`` (the library's own code) and ``accelerated`` (the same module after
``vqfast.accelerate(module, backend=...)``, run on the fastest backend for the device). The records
also hold the fraction of indices on which the two disagree in forward mode (0 unless the
original's expanded-formula argmin misses the nearest codeword).

    VAR            models/quant.py VectorQuantizer2, 256 px: f [16, 32, 16, 16], K 4096, ten scales
                   (forward: f_to_idxBl_or_fhat, VQVAE.img_to_idxBl's path; train: forward + loss)
    taming         taming/modules/vqvae/quantize.py VectorQuantizer2, a VQGAN f16: z [16, 256, 16, 16],
                   K 1024 and 16384
    diffusers      VQModel's quantizer, Kandinsky-style K 16384, D 4: latents [2, 4, 96, 96] (768 px)
    vqpytorch      VectorQuantize(dim=256, codebook_size=8192) on [16, 1024, 256] (16384 vectors), and
                   ResidualVQ(dim=256, num_quantizers=8, codebook_size=1024) on the same

diffusers and vector-quantize-pytorch are imported as installed. VAR and taming-transformers'
VectorQuantizer2 are not installable from the package registry: give their checkouts with
``--var-repo`` / ``--taming-repo`` (or VQFAST_BENCH_VAR_REPO / VQFAST_BENCH_TAMING_REPO) and their
quantizer files are loaded from there (nothing else of theirs is imported); without them those cases
are skipped with that reason. VAR's quantizer reads torch.distributed's world size, so its process
joins a one-process gloo group.

Every (case, mode, provider) runs in its own subprocess (``python -m vqfast.bench.dropin SPEC``): the
peak memory of a call after the first is the rise of the resident-set high-water mark on CPU (freed
heap memory handed back to the system first; see memory.py) or of max_memory_allocated on CUDA, and no provider's imports or caches leak into another's timing.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

import torch

from vqfast.bench.memory import _reset_peak_rss, _status_kib, release_freed_memory
from vqfast.bench.presets import Preset
from vqfast.bench.timing import measure, synchronize

CHILD_TIMEOUT_S = 900
REPO_ENV = {"var": "VQFAST_BENCH_VAR_REPO", "taming": "VQFAST_BENCH_TAMING_REPO"}
# Where the quantizer file lives inside each checkout, and the module name it is loaded under (the
# path vqfast.accelerate recognises; the package around it is not imported).
REPO_FILES = {
    "var": ("models/quant.py", "models.quant"),
    "taming": ("taming/modules/vqvae/quantize.py", "taming.modules.vqvae.quantize"),
}
MODES = ("forward", "train_step")


# ----------------------------------------------------------------------------- cases


def _realistic() -> list[dict]:
    return [
        {"model": "var", "batch": 16, "side": 16, "dim": 32, "k": 4096,
         "patch_nums": "1,2,3,4,5,6,8,10,13,16"},
        {"model": "taming", "batch": 16, "side": 16, "dim": 256, "k": 1024},
        {"model": "taming", "batch": 16, "side": 16, "dim": 256, "k": 16384},
        {"model": "diffusers", "batch": 2, "side": 96, "dim": 4, "k": 16384},
        {"model": "vqpytorch-vq", "batch": 16, "side": 1024, "dim": 256, "k": 8192},
        {"model": "vqpytorch-rvq", "batch": 16, "side": 1024, "dim": 256, "k": 1024, "stages": 8},
    ]


def _tiny() -> list[dict]:
    return [
        {"model": "var", "batch": 2, "side": 4, "dim": 8, "k": 33, "patch_nums": "1,2,4"},
        {"model": "taming", "batch": 2, "side": 3, "dim": 5, "k": 17},
        {"model": "diffusers", "batch": 2, "side": 3, "dim": 4, "k": 17},
        {"model": "vqpytorch-vq", "batch": 2, "side": 9, "dim": 5, "k": 17},
        {"model": "vqpytorch-rvq", "batch": 2, "side": 9, "dim": 5, "k": 17, "stages": 2},
    ]


def cases(preset: Preset) -> list[dict]:
    shapes = _tiny() if preset.name == "tiny" else _realistic()
    return [{**shape, "mode": mode} for shape in shapes for mode in MODES]


def _patch_nums(case: dict) -> tuple[int, ...]:
    # A string in the case (cases are hashed by their items): "1,2,4" -> (1, 2, 4).
    return tuple(int(p) for p in case["patch_nums"].split(","))


def case_label(case: dict) -> str:
    model = case["model"]
    if model == "var":
        shape = f"f [{case['batch']}, {case['dim']}, {case['side']}, {case['side']}], {len(_patch_nums(case))} scales"
    elif model.startswith("vqpytorch"):
        shape = f"x [{case['batch']}, {case['side']}, {case['dim']}]" + (f", {case['stages']} stages" if "stages" in case else "")
    else:
        shape = f"z [{case['batch']}, {case['dim']}, {case['side']}, {case['side']}]"
    return f"{model} {shape}, K {case['k']}, {case['mode']}"


# ----------------------------------------------------------------------------- the real modules


def repo_path(model: str) -> str | None:
    return os.environ.get(REPO_ENV[model]) or None


def unavailable_reason(case: dict) -> str | None:
    model = case["model"]
    if model in REPO_FILES:
        root = repo_path(model)
        if root is None:
            flag = "--var-repo" if model == "var" else "--taming-repo"
            return (f"{model}'s quantizer is not installable from the registry: give its checkout with {flag} "
                    f"or {REPO_ENV[model]}")
        if not (Path(root) / REPO_FILES[model][0]).is_file():
            return f"{REPO_FILES[model][0]} not found under {root}"
    if model == "diffusers" and importlib.util.find_spec("diffusers") is None:
        return "diffusers is not installed (pip install diffusers)"
    if model.startswith("vqpytorch") and importlib.util.find_spec("vector_quantize_pytorch") is None:
        return "vector-quantize-pytorch is not installed (pip install vector-quantize-pytorch)"
    return None


def _load_repo_module(model: str, root: str):
    rel, name = REPO_FILES[model]
    if model == "var":
        # VAR's quant.py imports its repository's top-level dist.py.
        sys.path.insert(0, str(root))
    spec = importlib.util.spec_from_file_location(name, str(Path(root) / rel))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _join_single_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and not dist.is_initialized():
        store = dist.FileStore(tempfile.mkstemp(prefix="vqfast-bench-")[1], 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)


def build(case: dict, root: str | None):
    """(module, input, run(module, x) -> (output tensor, loss or None, indices)) for one case."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model, b, s, d, k = case["model"], case["batch"], case["side"], case["dim"], case["k"]
    if model == "var":
        _join_single_process_group()
        quant = _load_repo_module("var", root)
        module = quant.VectorQuantizer2(vocab_size=k, Cvae=d, using_znorm=False, beta=0.25, default_qresi_counts=0,
                                        v_patch_nums=_patch_nums(case), quant_resi=0.5, share_quant_resi=4)
        x = torch.randn(b, d, s, s, generator=gen)

        def run(m, f):
            if not m.training:
                idx = m.f_to_idxBl_or_fhat(f, to_fhat=False)
                return None, None, torch.cat([i.reshape(-1) for i in idx])
            f_hat, _, loss = m(f)
            return f_hat, loss, None

        return module, x, run
    if model == "taming":
        module = _load_repo_module("taming", root).VectorQuantizer2(k, d, beta=0.25, legacy=True)
        x = torch.randn(b, d, s, s, generator=gen)

        def run(m, z):
            z_q, loss, (_, _, idx) = m(z)
            return z_q, loss, idx

        return module, x, run
    if model == "diffusers":
        from diffusers import VQModel

        vq_model = VQModel(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                           up_block_types=("UpDecoderBlock2D",), block_out_channels=(32,), layers_per_block=1,
                           latent_channels=d, num_vq_embeddings=k, vq_embed_dim=d, norm_num_groups=32)
        x = torch.randn(b, d, s, s, generator=gen)

        def run(m, h):
            z_q, loss, (_, _, idx) = m.quantize(h)
            return z_q, loss, idx

        return vq_model, x, run
    import vector_quantize_pytorch as vqp

    if model == "vqpytorch-vq":
        module = vqp.VectorQuantize(dim=d, codebook_size=k)
    else:
        module = vqp.ResidualVQ(dim=d, num_quantizers=case["stages"], codebook_size=k)
    x = torch.randn(b, s, d, generator=gen)

    def run(m, v):
        quantized, idx, loss = m(v)
        return quantized, loss.sum(), idx

    return module, x, run


# ----------------------------------------------------------------------------- one measurement


def _step_fn(module, x, run, mode: str) -> Callable[[], torch.Tensor]:
    if mode == "forward":
        module.eval()

        def forward():
            with torch.no_grad():
                return run(module, x)[2]

        return forward
    module.train()
    x = x.clone().requires_grad_(True)
    params = [x] + [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        out, loss, idx = run(module, x)
        (out.square().mean() + loss).backward()
        opt.step()
        return idx

    return step


def measure_one(case: dict, provider: str, device: torch.device, warmup: int, repeats: int, stat: str,
                root: str | None) -> dict:
    """Time and peak memory of one (case, provider) in this process."""
    import vqfast

    module, x, run = build(case, root)
    module, x = module.to(device), x.to(device)
    if provider == "accelerated":
        vqfast.accelerate(module)
    fn = _step_fn(module, x, run, case["mode"])
    first = fn()  # one-time work (thread pools, lazy caches, gradient buffers) stays out of the peak
    # Peak memory of one call in steady state. The allocator keeps the blocks a call freed resident
    # and reuses them, which would hide a later call's peak: on CPU they are first handed back to the
    # system (malloc_trim), so every block the call needs is faulted in again and counted.
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        release_freed_memory()
        reset = _reset_peak_rss()
        base = _status_kib("VmRSS") if reset else 0
        fn()
        peak = max(0, _status_kib("VmHWM") - base) * 1024 if reset else None
    t = measure(fn, device=device, warmup=max(0, warmup - 1), repeats=repeats)
    out = {"value": t.stat(stat), "median_ms": t.median_ms, "best_ms": t.best_ms, "repeats": len(t.runs_ms),
           "peak_bytes": peak}
    if first is not None:
        out["indices"] = first.reshape(-1).cpu().tolist() if first.numel() <= 1 << 16 else None
    return out


def _measure_subprocess(case: dict, provider: str, device: torch.device, preset: Preset) -> dict:
    root_dir = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = root_dir + os.pathsep + env.get("PYTHONPATH", "")
    spec = {"case": case, "provider": provider, "device": str(device), "warmup": preset.warmup,
            "repeats": preset.repeats, "stat": preset.stat, "root": repo_path(case["model"]) if case["model"] in REPO_FILES else None}
    with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
        cmd = [sys.executable, "-m", "vqfast.bench.dropin", json.dumps(spec), out.name]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
        if proc.returncode != 0:
            lines = proc.stderr.strip().splitlines()
            raise RuntimeError(lines[-1] if lines else f"exit status {proc.returncode}")
        return json.load(out)


def run(preset: Preset, device: torch.device, env: dict, log=print, case_list: list[dict] | None = None) -> list[dict]:
    records = []
    for case in case_list if case_list is not None else cases(preset):
        log(f"dropin {case_label(case)}")
        reason = unavailable_reason(case)
        indices = {}
        rows = []
        for provider in ("original", "accelerated"):
            rec = {**env, "question": "dropin", "case": dict(case), "provider": provider,
                   "group": "vqfast" if provider == "accelerated" else "peer", "precision": "exact",
                   "metric_name": "ms", "stat": preset.stat, "preset": preset.name, "status": "ok", "reason": None}
            if reason is not None:
                rec.update(status="skipped", reason=reason, value=None)
                log(f"  {provider:<12} skipped: {reason}")
                rows.append(rec)
                continue
            try:
                result = _measure_subprocess(case, provider, device, preset)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                rec.update(status="error", reason=str(exc), value=None)
                log(f"  {provider:<12} ERROR: {exc}")
                rows.append(rec)
                continue
            indices[provider] = result.pop("indices", None)
            rec.update(result)
            peak = "" if rec["peak_bytes"] is None else f"  peak {rec['peak_bytes'] / 2**20:8.1f} MiB"
            log(f"  {provider:<12} {rec['value']:10.3f} ms{peak}")
            rows.append(rec)
        if indices.get("original") is not None and indices.get("accelerated") is not None:
            a, b = torch.tensor(indices["original"]), torch.tensor(indices["accelerated"])
            mismatch = float((a != b).double().mean()) if a.shape == b.shape else 1.0
            for rec in rows:
                rec["index_mismatch"] = mismatch
        records += rows
    return records


def format_table(records: list[dict], question: str = "dropin") -> str:
    """One row per case: both providers' time and peak memory, the speed-up and the index mismatch."""
    rows = [r for r in records if r["question"] == "dropin"]
    by_case: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_case.setdefault(case_label(r["case"]), {})[r["provider"]] = r
    lines = ["| case | original | accelerated | speed-up | original peak | accelerated peak | memory saved | index mismatch |",
             "|---|---|---|---|---|---|---|---|"]
    notes = []

    def ms(r):
        return f"{r['value']:.2f} ms" if r and r["status"] == "ok" else (r["status"] if r else "")

    def mib(r):
        ok = r and r["status"] == "ok" and r.get("peak_bytes") is not None
        return f"{r['peak_bytes'] / 2**20:.1f} MiB" if ok else ""

    for label, pair in by_case.items():
        orig, acc = pair.get("original"), pair.get("accelerated")
        both = orig and acc and orig["status"] == acc["status"] == "ok"
        speed = f"{orig['value'] / acc['value']:.2f}x" if both and acc["value"] > 0 else ""
        saved = ""
        if both and orig.get("peak_bytes") is not None and acc.get("peak_bytes"):
            saved = f"{orig['peak_bytes'] / acc['peak_bytes']:.1f}x"
        mismatch = next((f"{r['index_mismatch']:.1e}" for r in (orig, acc) if r and "index_mismatch" in r), "")
        lines.append(f"| {label} | {ms(orig)} | {ms(acc)} | {speed} | {mib(orig)} | {mib(acc)} | {saved} | {mismatch} |")
        notes += [f"- {r['provider']} {r['status']} at {label}: {r['reason']}" for r in (orig, acc)
                  if r and r["status"] != "ok"]
    return "\n".join(lines + ([""] + notes if notes else []))


def _child(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="measure one drop-in case (used by vqfast bench)")
    parser.add_argument("spec", help="JSON: case, provider, device, warmup, repeats, stat, root")
    parser.add_argument("out", help="file the JSON result is written to")
    args = parser.parse_args(argv)
    spec = json.loads(args.spec)
    result = measure_one(spec["case"], spec["provider"], torch.device(spec["device"]), spec["warmup"],
                         spec["repeats"], spec["stat"], spec["root"])
    with open(args.out, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
