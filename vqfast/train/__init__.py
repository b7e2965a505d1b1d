"""``vqfast train``: train a multi-scale VQ-VAE tokenizer on real images (vqfast.data).

    vqfast train --preset demo                                  # bundled images, 2 CPU cores -> runs/demo/
    vqfast train --preset demo --data ~/photos --out runs/mine  # any folder of PNG/JPEG/WebP/BMP files
    torchrun --nproc-per-node 8 -m vqfast train --preset var --data ~/photos --out runs/var

Writes to ``--out`` (default runs/<preset>/; a non-empty folder needs ``--resume`` or ``--overwrite``):
checkpoint.pt (atomic: temp file + os.replace), metrics.json (held-out PSNR against the mean-colour
baseline, held-out codebook usage overall and per scale, perplexity, tokens/s), reconstructions.png
(held-out originals beside their reconstructions, labelled) and loss_curve.png.

``--resume`` continues from checkpoint.pt exactly: model, optimizer, every process's RNG states and
the step are restored, and the data order is a function of (seed, step) (see vqfast.data). Checkpoints
hold only tensors and plain values and are read with ``weights_only=True``. Ctrl-C writes a checkpoint
and prints the ``--resume`` command; ``--resume`` of a finished run does nothing.

Under torchrun (gloo on CPU, nccl on GPU) the model is wrapped in DistributedDataParallel, the global
batch ``batch_size`` is split across the processes in rank order (each decodes only its share), the
quantizers synchronise their codebook statistics themselves, and only rank 0 writes. The result equals
one process with the same global batch, up to the order of floating-point sums.

One idea per module:

    config.py        PRESETS, make_config, the learning-rate schedule and the data order (no torch)
    distributed.py   rank and world, every process's RNG states, the replica check
    loop.py          train(): the loop, checkpoints written and read back, the data sets
    evaluation.py    held-out metrics, the reconstruction grid, the loss curve
    cli.py           the command: arguments, their checks, Ctrl-C, main() (imports no torch)

The model, its checkpoint format and the calls made on it are vqfast.tokenizer's. Names are
imported on first use, so ``vqfast train --help`` imports no torch.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "add_arguments": "cli", "main": "cli",
    "PRESETS": "config", "make_config": "config", "with_image_size": "config", "config_geometry": "config",
    "learning_rate": "config", "batch_indices": "config",
    "rank_and_world": "distributed",
    "train": "loop", "read_checkpoint": "loop", "load_checkpoint": "loop", "make_datasets": "loop",
    "StepBatches": "loop", "OUTPUT_FILES": "loop",
    "evaluate": "evaluation",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
