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
    llamagen       LlamaGen's tokenizer quantizer as VQ_16 builds it (K 16384, D 8, l2-normalised codes,
                   show_usage), batch 8 at 256 px: z [8, 8, 16, 16]; the training step with
                   entropy_loss_ratio 0 (LlamaGen's default) and 0.1 (forward does not depend on it)

diffusers and vector-quantize-pytorch are imported as installed. VAR and taming-transformers'
VectorQuantizer2 are not installable from the package registry: give their checkouts with
``--var-repo`` / ``--taming-repo`` (or VQFAST_BENCH_VAR_REPO / VQFAST_BENCH_TAMING_REPO) and their
quantizer files are loaded from there (nothing else of theirs is imported); without them those cases
are skipped with that reason. VAR's quantizer reads torch.distributed's world size, so its process
joins a one-process gloo group. LlamaGen is not installable either: with VQFAST_BENCH_LLAMAGEN_REPO
naming a checkout, its tokenizer/tokenizer_image/vq_model.py is loaded (its codebook_used buffer, an
nn.Parameter whose in-place update raises on the CPU, is set not to require grad, as .cuda() makes it
a non-leaf on a GPU); without one, the "original" is the oracle written from LlamaGen's documented
semantics, tests/fixtures/llamagen_oracle.py of a vqfast checkout (the N x K matrices as LlamaGen
builds them). Each LlamaGen record says which in ``original_code``. The oracle is not LlamaGen's
source, so accelerate converts it through ``trust={class: "llamagen"}``.

Index mismatches are classified. For each row where the two modules' indices differ, the search's
input rows and codebook are rebuilt here (same seed) and both picks are measured against the float64
oracle (vqfast.testing.oracle): ``mismatch_original_farther`` counts rows where the original's pick is
farther than vqfast's, ``mismatch_vqfast_farther`` the reverse, ``mismatch_tied`` equal float64
distances. A row where vqfast's pick is the farther one, or breaks the exact contract, goes into the
accelerated record's ``wrong_rows`` (of ``checked_rows``), which fails the run (table.failures).
Quantizers that search residuals stage after stage (VAR, ResidualVQ) search rows that depend on the
earlier stages' picks, so their mismatches are counted as ``mismatch_unclassified``.

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
import torch.nn as nn
import torch.nn.functional as F

from vqfast.bench.memory import _reset_peak_rss, _status_kib, release_freed_memory
from vqfast.bench.presets import Preset
from vqfast.bench.timing import measure, synchronize

CHILD_TIMEOUT_S = 900
REPO_ENV = {"var": "VQFAST_BENCH_VAR_REPO", "taming": "VQFAST_BENCH_TAMING_REPO"}
LLAMAGEN_ENV = "VQFAST_BENCH_LLAMAGEN_REPO"
LLAMAGEN_FILE = ("tokenizer/tokenizer_image/vq_model.py", "tokenizer.tokenizer_image.vq_model")
# The oracle standing in for LlamaGen when no checkout is given (a vqfast checkout's test fixture).
LLAMAGEN_ORACLE = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "llamagen_oracle.py"
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
        {"model": "llamagen", "batch": 8, "side": 16, "dim": 8, "k": 16384, "entropy_loss_ratio": 0.0},
        {"model": "llamagen", "batch": 8, "side": 16, "dim": 8, "k": 16384, "entropy_loss_ratio": 0.1,
         "modes": "train_step"},
    ]


def _tiny() -> list[dict]:
    return [
        {"model": "var", "batch": 2, "side": 4, "dim": 8, "k": 33, "patch_nums": "1,2,4"},
        {"model": "taming", "batch": 2, "side": 3, "dim": 5, "k": 17},
        {"model": "diffusers", "batch": 2, "side": 3, "dim": 4, "k": 17},
        {"model": "vqpytorch-vq", "batch": 2, "side": 9, "dim": 5, "k": 17},
        {"model": "vqpytorch-rvq", "batch": 2, "side": 9, "dim": 5, "k": 17, "stages": 2},
        {"model": "llamagen", "batch": 2, "side": 3, "dim": 4, "k": 17, "entropy_loss_ratio": 0.0},
        {"model": "llamagen", "batch": 2, "side": 3, "dim": 4, "k": 17, "entropy_loss_ratio": 0.1,
         "modes": "train_step"},
    ]


def cases(preset: Preset) -> list[dict]:
    """Every shape in both modes, or in the modes its "modes" key names (the key is dropped)."""
    shapes = _tiny() if preset.name == "tiny" else _realistic()
    out = []
    for shape in shapes:
        modes = shape.get("modes", ",".join(MODES)).split(",")
        case = {k: v for k, v in shape.items() if k != "modes"}
        out += [{**case, "mode": mode} for mode in MODES if mode in modes]
    return out


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
    if model == "llamagen":  # forward does not depend on the ratio: it runs at LlamaGen's default, 0
        return f"{model} {shape}, K {case['k']}, entropy ratio {case['entropy_loss_ratio']:g}, {case['mode']}"
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
    if model == "llamagen":
        root = os.environ.get(LLAMAGEN_ENV)
        if root and not (Path(root) / LLAMAGEN_FILE[0]).is_file():
            return f"{LLAMAGEN_FILE[0]} not found under {root}"
        if not root and not LLAMAGEN_ORACLE.is_file():
            return (f"LlamaGen is not installable from the registry: give its checkout with {LLAMAGEN_ENV}, or "
                    f"run from a vqfast checkout (its oracle, tests/fixtures/llamagen_oracle.py)")
    return None


def llamagen_original() -> tuple[object, str]:
    """(module holding LlamaGen's VectorQuantizer, what it is: the checkout's file or the oracle)."""
    root = os.environ.get(LLAMAGEN_ENV)
    if root:
        path, name = Path(root) / LLAMAGEN_FILE[0], LLAMAGEN_FILE[1]
        what = f"LlamaGen's {LLAMAGEN_FILE[0]} (checkout {Path(root).name})"
    else:
        path, name = LLAMAGEN_ORACLE, "llamagen_oracle"
        what = ("oracle: tests/fixtures/llamagen_oracle.py, LlamaGen's documented semantics (LlamaGen is not "
                "installable)")
    if name in sys.modules:
        return sys.modules[name], what
    spec = importlib.util.spec_from_file_location(name, str(path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # inspect reads a class's source through its module (accelerate's fingerprints)
    spec.loader.exec_module(module)
    return module, what


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
    if model == "llamagen":
        source, _ = llamagen_original()
        module = source.VectorQuantizer(k, d, 0.25, case["entropy_loss_ratio"], True, True)
        if isinstance(module.codebook_used, nn.Parameter):  # see the module docstring
            module.codebook_used.requires_grad_(False)
        x = torch.randn(b, d, s, s, generator=gen)

        def run(m, z):
            z_q, (vq_loss, commit_loss, entropy_loss, _), (_, _, idx) = m(z)
            loss = None if vq_loss is None else vq_loss + commit_loss + entropy_loss
            return z_q, loss, idx

        return module, x, run
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


# ----------------------------------------------------------------------------- mismatches classified

# Quantizers whose one search reads rows of the input directly; the others search residuals.
SINGLE_SEARCH = ("taming", "diffusers", "vqpytorch-vq", "llamagen")


def search_inputs(case: dict, root: str | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(rows [N, D], codebook [K, D]) the case's one search ranks, rebuilt from the case's seed, in the
    order of the recorded indices; None for quantizers that search residuals stage after stage."""
    model = case["model"]
    if model not in SINGLE_SEARCH:
        return None
    module, x, _ = build(case, root)
    with torch.no_grad():
        if model == "vqpytorch-vq":
            return x.reshape(-1, x.shape[-1]), module._codebook.embed[0].detach()
        rows = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
        if model == "diffusers":
            return rows, module.quantize.embedding.weight.detach()
        if model == "llamagen":  # l2_norm: both sides normalised as LlamaGen (and vqfast) search them
            return F.normalize(rows, p=2, dim=-1), F.normalize(module.embedding.weight.detach(), p=2, dim=-1)
        return rows, module.embedding.weight.detach()


def classify_mismatches(case: dict, original: torch.Tensor, accelerated: torch.Tensor, root: str | None) -> dict:
    """For every row where the two modules' indices differ: which pick is farther in float64.

    Returns index_mismatch (the fraction of rows that differ), mismatch_rows, and either
    mismatch_original_farther / mismatch_vqfast_farther / mismatch_tied plus wrong_rows (vqfast's
    pick farther, or breaking the exact contract: vqfast.testing.oracle.exact_violations) of
    checked_rows, or mismatch_unclassified for quantizers that search residuals.
    """
    from vqfast.testing import oracle

    if original.shape != accelerated.shape:
        raise RuntimeError(f"the original returned {tuple(original.shape)} indices, vqfast {tuple(accelerated.shape)}")
    differ = original != accelerated
    count = int(differ.sum())
    out = {"index_mismatch": count / max(1, original.numel()), "mismatch_rows": count}
    if count == 0:
        return {**out, "mismatch_original_farther": 0, "mismatch_vqfast_farther": 0, "mismatch_tied": 0,
                "wrong_rows": 0, "checked_rows": 0}
    inputs = search_inputs(case, root)
    if inputs is None:
        return {**out, "mismatch_unclassified": count}
    rows, codebook = inputs
    sub = rows[differ]
    answer = oracle.nearest(sub, codebook)
    d_orig, d_acc = answer.chosen(original[differ]), answer.chosen(accelerated[differ])
    vqfast_farther = d_acc > d_orig
    wrong = vqfast_farther | oracle.exact_violations(answer, accelerated[differ], codebook,
                                                     oracle.effective_search_dtype(sub, codebook))
    return {**out, "mismatch_original_farther": int((d_orig > d_acc).sum()),
            "mismatch_vqfast_farther": int(vqfast_farther.sum()), "mismatch_tied": int((d_orig == d_acc).sum()),
            "wrong_rows": int(wrong.sum()), "checked_rows": count}


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
    extra = {}
    if case["model"] == "llamagen":
        extra["original_code"] = llamagen_original()[1]
    if provider == "accelerated":
        trust = {type(module): "llamagen"} if case["model"] == "llamagen" and not os.environ.get(LLAMAGEN_ENV) else None
        vqfast.accelerate(module, trust=trust)
        if not any(hasattr(type(m), "_vqfast_original") for m in module.modules()):
            raise RuntimeError(f"vqfast.accelerate converted nothing in {type(module).__name__}")
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
           "peak_bytes": peak, **extra}
    if first is not None:
        out["indices"] = first.reshape(-1).cpu().tolist() if first.numel() <= 1 << 16 else None
    return out


def _root(case: dict) -> str | None:
    return repo_path(case["model"]) if case["model"] in REPO_FILES else None


def _measure_subprocess(case: dict, provider: str, device: torch.device, preset: Preset) -> dict:
    root_dir = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = root_dir + os.pathsep + env.get("PYTHONPATH", "")
    spec = {"case": case, "provider": provider, "device": str(device), "warmup": preset.warmup,
            "repeats": preset.repeats, "stat": preset.stat, "root": _root(case)}
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
            found = classify_mismatches(case, torch.tensor(indices["original"]), torch.tensor(indices["accelerated"]),
                                        _root(case))
            checked = {key: found.pop(key) for key in ("wrong_rows", "checked_rows") if key in found}
            for rec in rows:
                rec.update(found)
            rows[-1].update(checked)  # the accelerated record: a wrong row fails the run (table.failures)
            log(f"  mismatch     {mismatch_text(rows[-1])}")
        records += rows
    return records


def mismatch_text(r: dict) -> str:
    """The index-mismatch cell: the fraction, then what the float64 oracle says of the differing rows."""
    text = f"{r['index_mismatch']:.1e}"
    rows = r.get("mismatch_rows")
    if not rows:
        return text
    parts = []
    if r.get("mismatch_original_farther"):
        parts.append(f"original farther on {r['mismatch_original_farther']}")
    if r.get("mismatch_tied"):
        parts.append(f"tied on {r['mismatch_tied']}")
    if r.get("mismatch_vqfast_farther"):
        parts.append(f"vqfast farther on {r['mismatch_vqfast_farther']}: FAILED")
    elif r.get("wrong_rows"):
        parts.append(f"vqfast breaks the exact contract on {r['wrong_rows']}: FAILED")
    if r.get("mismatch_unclassified"):
        parts.append("not classified (residual stages)")
    return f"{text} ({rows} rows: {', '.join(parts)})" if parts else f"{text} ({rows} rows)"


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
        mismatch = next((mismatch_text(r) for r in (acc, orig) if r and "index_mismatch" in r), "")
        lines.append(f"| {label} | {ms(orig)} | {ms(acc)} | {speed} | {mib(orig)} | {mib(acc)} | {saved} | {mismatch} |")
        notes += [f"- {r['provider']} {r['status']} at {label}: {r['reason']}" for r in (orig, acc)
                  if r and r["status"] != "ok"]
        if orig and orig.get("original_code"):
            code = f"- {orig['case']['model']}'s original: {orig['original_code']}"
            notes += [code] if code not in notes else []
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
