"""``vqfast tokenize``: images -> multi-scale index maps in one file or a sharded token set, and back.

    vqfast tokenize --checkpoint runs/demo/checkpoint.pt encode photo.png tokens.pt
    vqfast tokenize --checkpoint runs/demo/checkpoint.pt encode photos/ tokens.pt   # a folder, recursive
    torchrun --nproc-per-node 8 -m vqfast tokenize --checkpoint vae.pth encode imagenet/train tokens/
    vqfast tokenize --checkpoint vae_ch160v4096z32.pth decode tokens.pt recon/     # one PNG per image

The checkpoint is a ``vqfast train`` checkpoint or a bare state_dict of VAR's VQVAE (its configuration
read from the tensors' names and shapes by ``vqfast.models.vqvae_config_from_state_dict``).

A folder input with an output that is a folder or has no extension writes a sharded token set
(vqfast.tokenset: many processes under torchrun, resumable; format in vqfast.shards, read back by
vqfast.data.TokenDataset); the rest of this docstring is the one-file form, for small jobs.

encode takes the centred square of each image (the shorter side) and resizes it to the model's image
size, saying so; pixels are scaled by their dtype (8 bits / 255, 16 bits / 65535) and greyscale,
palette or RGBA images converted (vqfast.data.load_crop). The token file is a dict of tensors and
plain values, read back with ``weights_only=True``:

    {"format": "vqfast-tokens-1", "names": [relative path per image], "patch_nums": [...],
     "vocab_size": V, "image_size": S, "tokens": [int16 or int32 tensor [N, p * p] per scale]}

decode writes one image file when the token file holds one image and the output names an image
file, else one PNG per image under the output folder at the input's relative path with its extension
replaced by .png (photos/a/x.jpg -> recon/a/x.png); inputs that share a stem in one folder keep their
extension in the name (x.jpg, x.png -> x_jpg.png, x_png.png), so no two images share an output
(``output_paths``). Files that cannot be decoded are skipped, counted and named in one warning line.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn

from vqfast.checkpoint import load_safely, save_atomic
from vqfast.errors import InputError
from vqfast.data import IMAGE_SUFFIXES, format_skipped, list_images, load_crop, probe_image, to_uint8
from vqfast.models import VQVAE, vqvae_config_from_state_dict
from vqfast.shards import token_dtype
from vqfast.tokenizer import (CHECKPOINT_FORMAT, amp_context, build_model, check_backend, decode_tokens,
                              encode_images, model_geometry)
from vqfast.tokenset import AUGMENTS, DEFAULT_SHARD_SIZE, LABEL_MODES, batch_invariant

TOKENS_FORMAT = "vqfast-tokens-1"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint.pt written by vqfast train, or a VAR VQVAE state_dict (.pth)")
    parser.add_argument("mode", choices=("encode", "decode"))
    parser.add_argument("input", help="encode: an image file or a folder of images; decode: a token file")
    parser.add_argument("output", help="encode: the token file to write (.pt), or for a folder input a folder "
                                       "(existing, or a name without extension) to write a sharded token set; "
                                       "decode: an image file (one image) "
                                       "or a folder, where each image is written at its input's relative path "
                                       "with .png for its extension (x.jpg and x.png in one folder: x_jpg.png "
                                       "and x_png.png)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    parser.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda when available")
    parser.add_argument("--dtype", default=None, choices=("fp32", "bf16"),
                        help="autocast dtype of the encoder and decoder; default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--workers", type=int, default=0, help="image-decoding processes for encode (default 0)")
    parser.add_argument("--backend", default="auto",
                        help="nearest-codeword backend: auto, torch, cpu, cuda or triton (default: auto)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    group = parser.add_argument_group("token sets (encode DIR OUT_DIR)")
    group.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                       help=f"images per shard (default {DEFAULT_SHARD_SIZE})")
    group.add_argument("--augment", default="none", choices=tuple(AUGMENTS),
                       help="views per image: none (1), flip (2: the image and its mirror), ten-crop (10: corners "
                            "and centre of the image resized to 1.1 x, and their mirrors); default none")
    group.add_argument("--labels", default="auto", choices=LABEL_MODES,
                       help="folders: DIR/<class>/<image>, class index in sorted name order; none; auto (default): "
                            "folders when every image lies in a class folder")


# ---- the model -----------------------------------------------------------------------------------

def load_model(path, backend: str = "auto") -> nn.Module:
    """A tokenizer in eval mode from a ``vqfast train`` checkpoint or a bare VAR VQVAE state_dict,
    read with weights_only=True; InputError naming the file when it is neither or does not load."""
    obj = load_safely(path, "checkpoint")
    if isinstance(obj, dict) and "format" in obj:
        if obj.get("format") != CHECKPOINT_FORMAT:
            raise InputError(f"checkpoint {path} has format {obj.get('format')!r}, not {CHECKPOINT_FORMAT!r}")
        if not isinstance(obj.get("config"), dict) or not isinstance(obj.get("model"), dict):
            raise InputError(f"checkpoint {path} lacks its 'config' or 'model' entry")
        try:
            model = build_model({**obj["config"], "backend": backend})
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"checkpoint {path} holds a configuration this version cannot build ({e})") from None
        state = obj["model"]
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        model, state = _model_for_state_dict(path, obj), obj
    else:
        raise InputError(f"checkpoint {path} is neither a vqfast train checkpoint nor a VQVAE state_dict "
                         f"(it holds a {type(obj).__name__})")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0] if str(e) else "mismatch"
        raise InputError(f"checkpoint {path} does not fit its model: {first}") from None
    return model.eval()


def _model_for_state_dict(path, sd: dict) -> nn.Module:
    """VAR's VQVAE configured from a bare state_dict's keys and shapes (vqfast.models)."""
    try:
        return VQVAE(**vqvae_config_from_state_dict(sd))
    except ValueError as e:
        raise InputError(f"checkpoint {path} is not a VQVAE state_dict: {e}") from None


# ---- encode --------------------------------------------------------------------------------------

class _Images(torch.utils.data.Dataset):
    """File i -> (index, [3, S, S] tensor or None, ImageInfo or the failure's reason)."""

    def __init__(self, root: Path, names: list[str], size: int):
        self.root, self.names, self.size = root, names, size

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int):
        path = self.root / self.names[i] if self.names[i] else self.root
        try:
            t, info = load_crop(path, self.size)
            return i, t, info
        except Exception as e:  # a body that fails to decode (the header probe passed)
            return i, None, f"{type(e).__name__}: {e}"


def _collate(items):
    """-> (indices decoded, their images stacked (pinned by the loader on GPU) or None, infos, failures)."""
    good = [(i, t, info) for i, t, info in items if t is not None]
    images = torch.stack([t for _, t, _ in good]) if good else None
    return [i for i, _, _ in good], images, [info for _, _, info in good], [(i, r) for i, t, r in items if t is None]


def _inputs(path: Path) -> tuple[Path, list[str]]:
    """(root, names) to encode; one image: (the file, [""]). InputError when nothing is readable."""
    if path.is_file():
        reason = probe_image(path)
        if reason is not None:
            raise InputError(f"input {path} cannot be read as an image ({reason})")
        return path, [""]
    if not path.is_dir():
        raise InputError(f"input {path} does not exist")
    names = list_images(path)
    if not names:
        raise InputError(f"input {path} holds no {'/'.join(s[1:].upper() for s in IMAGE_SUFFIXES)} images")
    return path, names


def _summary(infos: list, size: int) -> str:
    """One line saying what was done to the images: crops, resizes, conversions."""
    kept = sum(1 for i in infos if i.width == i.height == size)
    if len(infos) == 1:
        i = infos[0]
        what = (f"{i.width} x {i.height}" + (f" {i.note}" if i.note else "") + ": "
                + ("used as it is" if kept else
                   (f"centre crop {i.crop} x {i.crop}, " if i.width != i.height else "")
                   + f"resized to {size} x {size} (the checkpoint's image size)"))
        return what
    cropped = sum(1 for i in infos if i.width != i.height)
    resized = len(infos) - kept
    notes = Counter(i.note for i in infos if i.note)
    parts = []
    if resized:
        parts.append(f"{resized} resized to {size} x {size} (the checkpoint's image size)"
                     + (f", {cropped} of them centre-cropped to a square first" if cropped else ""))
    if kept:
        parts.append(f"{kept} already {size} x {size}")
    if notes:
        parts.append("converted: " + ", ".join(f"{n} {k}" for k, n in sorted(notes.items())))
    return "; ".join(parts)


@torch.no_grad()
def encode(model: nn.Module, source, output, batch_size: int = 32, device="cpu", dtype: str = "fp32",
           workers: int = 0, progress: bool = True) -> dict:
    """Encode an image file or a folder (recursive) into one token file; returns what was written."""
    from tqdm import tqdm

    device = torch.device(device)
    geo = model_geometry(model)
    size = geo["image_size"]
    root, names = _inputs(Path(source))
    loader = torch.utils.data.DataLoader(_Images(root, names, size), batch_size=batch_size, num_workers=workers,
                                         collate_fn=_collate, pin_memory=device.type == "cuda")
    model.to(device)
    kept, infos, skipped = [], [], []
    per_scale: list[list[torch.Tensor]] = [[] for _ in geo["patch_nums"]]
    bar = tqdm(total=len(names), disable=not progress, desc="encode", unit="img", dynamic_ncols=True)
    for done, images, batch_infos, failed in loader:
        skipped += [(names[i] or str(root), reason) for i, reason in failed]
        if images is not None:
            with batch_invariant(device), amp_context(device, dtype):  # tokens of one image alone, whatever the batch
                idx_list = encode_images(model, images.to(device, non_blocking=True))
            for s, idx in enumerate(idx_list):
                per_scale[s].append(idx.cpu())
            kept += [names[i] or root.name for i in done]
            infos += batch_infos
        bar.update(len(done) + len(failed))
    bar.close()
    if not kept:
        raise InputError(f"input {source}: none of its {len(names)} image{'s' if len(names) != 1 else ''} could be "
                         f"decoded ({format_skipped(skipped, limit=3)})")
    small = getattr(torch, token_dtype(geo["vocab_size"]).name)  # the token set's rule: int16 up to 32,768 codes
    payload = {"format": TOKENS_FORMAT, "names": kept, "patch_nums": list(geo["patch_nums"]),
               "vocab_size": geo["vocab_size"], "image_size": size,
               "tokens": [torch.cat(t).to(small) for t in per_scale]}
    save_atomic(payload, output)
    return {"payload": payload, "summary": _summary(infos, size), "skipped": skipped}


# ---- decode --------------------------------------------------------------------------------------

def read_tokens(path, model: nn.Module | None = None) -> dict:
    """A token file, read safely and checked (against ``model`` when given); tokens as int64."""
    t = load_safely(path, "token file")
    if not isinstance(t, dict) or t.get("format") != TOKENS_FORMAT:
        found = t.get("format") if isinstance(t, dict) else type(t).__name__
        raise InputError(f"token file {path} is not a {TOKENS_FORMAT} file (format: {found!r})")
    names, tokens, patch_nums = t.get("names"), t.get("tokens"), t.get("patch_nums")
    if not isinstance(names, list) or not isinstance(tokens, list) or not isinstance(patch_nums, list):
        raise InputError(f"token file {path} lacks its names, tokens or patch_nums")
    if len(tokens) != len(patch_nums):
        raise InputError(f"token file {path} holds {len(tokens)} token maps for {len(patch_nums)} scales")
    for p, tok in zip(patch_nums, tokens):
        if not isinstance(tok, torch.Tensor) or tok.dtype.is_floating_point or tuple(tok.shape) != (len(names), p * p):
            raise InputError(f"token file {path}: the {p} x {p} scale's tokens are not an integer "
                             f"[{len(names)}, {p * p}] tensor")
    if model is not None:
        geo = model_geometry(model)
        if list(geo["patch_nums"]) != list(patch_nums) or geo["vocab_size"] != t.get("vocab_size"):
            raise InputError(f"token file {path} was written for scales {tuple(patch_nums)} and vocabulary "
                             f"{t.get('vocab_size')}, but the checkpoint has scales {geo['patch_nums']} and "
                             f"vocabulary {geo['vocab_size']}")
        for p, tok in zip(patch_nums, tokens):
            if len(names) and (int(tok.min()) < 0 or int(tok.max()) >= geo["vocab_size"]):
                raise InputError(f"token file {path}: the {p} x {p} scale has indices outside "
                                 f"[0, {geo['vocab_size']})")
    return {**t, "tokens": [tok.long() for tok in tokens]}


def output_paths(names: list[str], output: Path) -> list[Path]:
    """Where decode writes each image of a token file: ``output`` itself when it names an image file and
    the file holds one image; else ``output / <the input's relative path, extension replaced by .png>``
    (a/x.jpg -> a/x.png), except that inputs sharing a stem in one folder (x.jpg and x.png) keep their
    extension before .png, joined by an underscore (x_jpg.png, x_png.png). Any name still taken gets
    _2, _3, ... before .png. No two images ever share an output path."""
    if len(names) == 1 and output.suffix.lower() in IMAGE_SUFFIXES:
        return [output]
    if output.suffix.lower() in IMAGE_SUFFIXES:
        raise InputError(f"output {output} names one image, but the token file holds {len(names)}: "
                         f"give a folder")
    for n in names:
        if not isinstance(n, str) or not n or Path(n).is_absolute() or ".." in Path(n).parts:
            raise InputError(f"the token file's image name {n!r} is not a relative path inside the output folder")
    plain = [Path(n).with_suffix(".png") for n in names]
    shared = {p for p, k in Counter(p.as_posix().lower() for p in plain).items() if k > 1}
    taken: set[str] = set()
    paths = []
    for n, p in zip(names, plain):
        if p.as_posix().lower() in shared:
            p = p.with_name(f"{p.stem}_{Path(n).suffix[1:].lower()}.png")
        candidate, k = p, 1
        while candidate.as_posix().lower() in taken:  # case-insensitive: x.PNG and x.png on macOS / Windows
            k += 1
            candidate = p.with_name(f"{p.stem}_{k}.png")
        taken.add(candidate.as_posix().lower())
        paths.append(output / candidate)
    return paths


@torch.no_grad()
def decode(model: nn.Module, tokens: dict, output, batch_size: int = 32, device="cpu", dtype: str = "fp32",
           progress: bool = True) -> list[Path]:
    """Token dict (read_tokens) -> image files; returns their paths."""
    from PIL import Image
    from tqdm import tqdm

    device = torch.device(device)
    paths = output_paths(tokens["names"], Path(output))
    model.to(device)
    bar = tqdm(total=len(paths), disable=not progress, desc="decode", unit="img", dynamic_ncols=True)
    for i in range(0, len(paths), batch_size):
        idx_list = [t[i: i + batch_size].to(device) for t in tokens["tokens"]]
        with amp_context(device, dtype):
            images = to_uint8(decode_tokens(model, idx_list).float())
        for path, img in zip(paths[i: i + batch_size], images):
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(path)
        bar.update(len(images))
    bar.close()
    return paths


# ---- the command ---------------------------------------------------------------------------------

def writes_token_set(args: argparse.Namespace) -> bool:
    """encode DIR OUT_DIR: a folder in, and out a folder or a name without extension."""
    output = Path(args.output)
    return (args.mode == "encode" and Path(args.input).is_dir()
            and (output.is_dir() or (not output.exists() and output.suffix == "")))


def _check_args(args: argparse.Namespace) -> tuple[torch.device, str]:
    for name in ("batch_size", "shard_size"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be a positive int, got {getattr(args, name)}")
    if args.workers < 0:
        raise InputError(f"--workers must be 0 or more, got {args.workers}")
    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device cuda: no CUDA device is available to this torch ({torch.__version__}); "
                         f"use --device cpu")
    if name == "cuda" and os.environ.get("LOCAL_RANK") is not None:
        name = f"cuda:{int(os.environ['LOCAL_RANK'])}"  # torchrun: one GPU per process
    if not Path(args.checkpoint).is_file():
        raise InputError(f"--checkpoint {args.checkpoint}: no such file")
    source, output = Path(args.input), Path(args.output)
    if not source.exists():
        raise InputError(f"input {source}: no such {'file' if args.mode == 'decode' else 'file or folder'}")
    if args.mode == "decode" and not source.is_file():
        raise InputError(f"input {source} is a folder; decode reads one token file")
    token_set = writes_token_set(args)
    if not token_set and (args.augment != "none" or args.labels != "auto"):
        raise InputError(f"--augment and --labels apply to a token set (encode DIR OUT_DIR), not to "
                         f"{'decode' if args.mode == 'decode' else 'a one-file encode'}")
    if token_set:
        if not any(source.iterdir()):
            raise InputError(f"input {source} is an empty folder")
    elif args.mode == "encode":
        _inputs(source)
        if output.is_dir():
            raise InputError(f"output {output} is a folder; name the token file to write")
    if not output.parent.is_dir():
        raise InputError(f"output {output}: the folder {output.parent} does not exist")
    image_name = output.suffix.lower() in IMAGE_SUFFIXES
    if args.mode == "decode" and output.exists() and not output.is_dir() and not image_name:
        raise InputError(f"output {output} is a file; give an image file name or a folder")
    device = torch.device(name)
    check_backend(args.backend, device.type)
    return device, args.dtype or ("bf16" if device.type == "cuda" else "fp32")


def _encode_token_set(args: argparse.Namespace, device: torch.device, dtype: str) -> int:
    """encode DIR OUT_DIR, on this process or as one of torchrun's (WORLD_SIZE > 1)."""
    import torch.distributed as dist

    from vqfast import tokenset

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        # torchrun's store outlives a restart (--max-restarts): the keys of each attempt get their own
        # prefix, else the restarted processes read the dead ones' addresses and cannot connect.
        store, rank, size = next(dist.rendezvous("env://"))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=size,
                                store=dist.PrefixStore(f"vqfast-tokenize-attempt-{attempt}", store))
    try:
        model = load_model(args.checkpoint, backend=args.backend)
        done = tokenset.encode_folder(model, args.input, args.output, checkpoint=args.checkpoint, augment=args.augment,
                                      labels=args.labels, shard_size=args.shard_size, batch_size=args.batch_size,
                                      workers=args.workers, device=device, dtype=dtype, progress=not args.no_progress)
        if done["manifest"] is not None:
            for line in tokenset.report(done, args.input, args.output):
                print(line)
            tokenset.warn_skipped(done["manifest"])
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    return 0


def main(args: argparse.Namespace) -> int:
    device, dtype = _check_args(args)
    if writes_token_set(args):
        return _encode_token_set(args, device, dtype)
    model = load_model(args.checkpoint, backend=args.backend)
    geo = model_geometry(model)
    if args.mode == "encode":
        done = encode(model, args.input, args.output, args.batch_size, device, dtype, args.workers,
                      progress=not args.no_progress)
        n = len(done["payload"]["names"])
        print(f"{args.input}: {n} image{'s' if n != 1 else ''}, {done['summary']}")
        print(f"-> {n} x {geo['num_tokens']} tokens over scales {geo['patch_nums']} (vocabulary {geo['vocab_size']}) "
              f"in {args.output}")
        if done["skipped"]:
            print(f"warning: {format_skipped(done['skipped'])}", file=sys.stderr)
    else:
        tokens = read_tokens(args.input, model)
        paths = decode(model, tokens, args.output, args.batch_size, device, dtype, progress=not args.no_progress)
        where = paths[0] if len(paths) == 1 else Path(args.output)
        print(f"{args.input}: {len(paths)} image{'s' if len(paths) != 1 else ''} of {geo['image_size']} x "
              f"{geo['image_size']} -> {where}")
    return 0
