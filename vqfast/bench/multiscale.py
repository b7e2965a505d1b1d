"""Question 3: VAR multi-scale tokenisation (vqfast.models.VQVAE.img_to_idxBl) of an image batch.

Default model: VAR's VQVAE() (ch 128), 256 x 256 input, patch_nums (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
vocabulary 4096, Cvae 32; one call quantises 680 token positions per image over ten scales. The seeds' own
img_to_idxBl is not a baseline here: it returned placeholder tokens, not VAR's residual scheme.
"""
from __future__ import annotations

import inspect

import torch

import vqfast
from vqfast.bench.presets import Preset
from vqfast.bench.timing import measure

IMAGE_SIDE = 256


def _model_class():
    try:
        from vqfast.models import VQVAE
    except ImportError:
        return None
    return VQVAE


def cases(preset: Preset) -> list[dict]:
    return [{"batch": preset.multiscale_batch, "side": IMAGE_SIDE}]


def run(preset: Preset, device: torch.device, env: dict, log=print, case_list: list[dict] | None = None) -> list[dict]:
    case = (case_list or cases(preset))[0]
    base = {**env, "question": "multiscale", "case": case, "group": "vqfast", "precision": "exact",
            "metric_name": "ms", "stat": preset.stat, "preset": preset.name}
    log(f"multiscale img_to_idxBl B={case['batch']} {IMAGE_SIDE}x{IMAGE_SIDE}")
    cls = _model_class()
    if cls is None:
        log("  skipped: vqfast.models not available")
        return [{**base, "provider": "vqfast", "status": "skipped", "reason": "vqfast.models not available", "value": None}]
    takes_backend = "backend" in inspect.signature(cls).parameters
    backends = vqfast.available_backends(device) if takes_backend else ["auto"]
    gen = torch.Generator().manual_seed(0)
    img = (torch.rand(case["batch"], 3, IMAGE_SIDE, IMAGE_SIDE, generator=gen) * 2 - 1).to(device)
    records = []
    for backend in backends:
        torch.manual_seed(0)
        model = (cls(backend=backend) if takes_backend else cls()).to(device).eval()
        with torch.no_grad():
            tokens = sum(t.shape[1] for t in model.img_to_idxBl(img))
            t = measure(lambda: model.img_to_idxBl(img), device=device, warmup=max(0, preset.warmup - 1),
                        repeats=preset.repeats)
        value = t.stat(preset.stat)
        records.append({**base, "provider": f"vqfast-{backend}", "status": "ok", "reason": None, "value": value,
                        "median_ms": t.median_ms, "best_ms": t.best_ms, "repeats": len(t.runs_ms),
                        "tokens_per_image": tokens})
        log(f"  vqfast-{backend:<15} {value:10.3f} ms  ({tokens} tokens per image)")
    return records
