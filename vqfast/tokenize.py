"""``vqfast tokenize``: images -> multi-scale index maps (.pt) and back, with a ``vqfast train`` checkpoint.

    vqfast tokenize --checkpoint runs/demo/checkpoint.pt encode photo.png tokens.pt
    vqfast tokenize --checkpoint runs/demo/checkpoint.pt decode tokens.pt recon.png

encode centre-crops the image to a square and resizes it to the model's image_size; tokens.pt
holds {"patch_nums", "idx_list": [LongTensor [1, p * p] per scale]}.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from vqfast.data import to_uint8
from vqfast.models import VQVAE
from vqfast.train import CHECKPOINT_FORMAT, build_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint.pt written by vqfast train")
    parser.add_argument("mode", choices=("encode", "decode"))
    parser.add_argument("input", help="image file (encode) or tokens .pt (decode)")
    parser.add_argument("output", help="tokens .pt (encode) or image file (decode)")


def load_model(path: str | Path) -> VQVAE:
    path = Path(path)
    if not path.exists():
        raise ValueError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ValueError(f"checkpoint {path} is corrupt or not a vqfast checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {path} is not a {CHECKPOINT_FORMAT} checkpoint")
    model = build_model(state["config"])
    model.load_state_dict(state["model"])
    return model.eval()


def image_to_tensor(path: str | Path, size: int) -> torch.Tensor:
    """Image file -> [1, 3, size, size] in [-1, 1] (centre square crop, antialiased resize)."""
    import skimage.io
    import skimage.transform

    a = skimage.io.imread(path)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    a = a[:, :, :3].astype(np.float64)
    if a.max() > 1.0:
        a = a / 255.0
    s = min(a.shape[:2])
    y, x = (a.shape[0] - s) // 2, (a.shape[1] - s) // 2
    a = skimage.transform.resize(a[y: y + s, x: x + s], (size, size), anti_aliasing=True)
    return torch.from_numpy(a).float().permute(2, 0, 1)[None] * 2 - 1


def main(args: argparse.Namespace) -> int:
    model = load_model(args.checkpoint)
    if args.mode == "encode":
        idx_list = model.img_to_idxBl(image_to_tensor(args.input, model.image_size))
        torch.save({"patch_nums": list(model.v_patch_nums), "idx_list": idx_list}, args.output)
        print(f"{args.input} -> {sum(i.shape[1] for i in idx_list)} tokens over scales {model.v_patch_nums} -> {args.output}")
    else:
        import matplotlib.pyplot as plt

        tokens = torch.load(args.input, map_location="cpu", weights_only=True)
        if not isinstance(tokens, dict) or list(tokens.get("patch_nums", [])) != list(model.v_patch_nums):
            raise ValueError(f"{args.input} holds no index maps for this checkpoint's scales {model.v_patch_nums}")
        plt.imsave(args.output, to_uint8(model.idxBl_to_img(tokens["idx_list"], same_shape=True, last_one=True))[0])
        print(f"{args.input} -> {args.output}")
    return 0
