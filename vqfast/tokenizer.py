"""The tokenizer behind ``vqfast train`` and ``vqfast tokenize``: its checkpoint format, how a model is
built from a configuration, and the few calls both commands make on it.

    CHECKPOINT_FORMAT               the "format" entry of a ``vqfast train`` checkpoint
    build_model(cfg)                vqfast.models.VQVAE from a configuration (vqfast.train.make_config)
    model_geometry(model)           {"image_size", "patch_nums", "vocab_size", "num_tokens"}
    encode_images(model, images)    images [B, 3, S, S] in [-1, 1] -> index maps, one [B, p * p] per scale
    decode_tokens(model, idx_list)  index maps -> images [B, 3, S, S] in [-1, 1]
    amp_context(device, dtype)      bf16 autocast of the encoder and decoder, or none ("fp32")
    check_backend(backend, device)  the commands' --backend check (InputError naming the option)

A checkpoint is a dict of plain values and tensors, read with ``weights_only=True``
(vqfast.checkpoint.load_safely):

    {"format": CHECKPOINT_FORMAT, "config": {"model": VQVAE's constructor arguments, ...},
     "model": state_dict, "step": int, ...the trainer's resume state (vqfast.train)}

The model is ``vqfast.models.VQVAE`` (VAR's multi-scale tokenizer); these functions are the trainer's
and the tokenize command's only contact with its API, so another model needs only them changed.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from vqfast.errors import InputError
from vqfast.models import VQVAE

CHECKPOINT_FORMAT = "vqfast-train-2"


def build_model(cfg: dict) -> VQVAE:
    """The tokenizer of a configuration: ``cfg["model"]`` holds VQVAE's constructor arguments in plain
    types, ``cfg.get("backend", "auto")`` its nearest-codeword backend."""
    return VQVAE(**cfg["model"], test_mode=False, backend=cfg.get("backend", "auto"))


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (the model itself otherwise)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def model_geometry(model: nn.Module) -> dict:
    """{"image_size", "patch_nums", "vocab_size", "num_tokens"} of a tokenizer (DDP-wrapped or not)."""
    model = unwrap(model)
    patch_nums = tuple(model.quantize.v_patch_nums)
    return {"image_size": model.downsample * patch_nums[-1], "patch_nums": patch_nums,
            "vocab_size": model.vocab_size, "num_tokens": sum(p * p for p in patch_nums)}


@torch.no_grad()
def encode_images(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """Images [B, 3, S, S] in [-1, 1] -> index maps, one int64 [B, p * p] per scale (coarse first)."""
    return unwrap(model).img_to_idxBl(images)


@torch.no_grad()
def decode_tokens(model: nn.Module, idx_list: list[torch.Tensor]) -> torch.Tensor:
    """Index maps (one [B, p * p] per scale) -> images [B, 3, S, S] in [-1, 1]."""
    return unwrap(model).idxBl_to_img(idx_list, same_shape=True, last_one=True)


def amp_context(device: torch.device, dtype: str):
    """bf16 autocast on ``device`` when dtype is "bf16", else a no-op context (fp32). The quantizers
    run their nearest-codeword search in fp32 inside it."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=dtype == "bf16")


def check_backend(backend: str, device_type: str) -> None:
    """InputError naming ``--backend`` (or the environment variable VQFAST_BACKEND, under "auto") and the
    choices, unless that nearest-codeword backend can run on ``device_type``: both commands check it
    before any data loads."""
    from vqfast.backends import resolve_backend

    try:
        resolve_backend(backend, device_type)
    except (TypeError, ValueError) as e:
        raise InputError(f"--backend {backend}: {e}" if backend != "auto" else str(e)) from None
