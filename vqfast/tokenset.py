"""``vqfast tokenize ... encode DIR OUT_DIR``: a folder of images -> a sharded token set (vqfast.shards),
on one process or many (torchrun, one process per GPU or gloo on CPU), resumable, bit-identical.

    torchrun --nproc-per-node 8 -m vqfast tokenize --checkpoint vae.pth encode imagenet/train tokens/

Who does what: every process lists DIR (sorted) and checks that all agree on the list; shard k
(images k * shard_size ..) belongs to process k mod world. Rank 0 checks OUT_DIR and writes job.json
before anything is encoded, and manifest.json after every process has written its shards. A shard is
written whole or not at all (vqfast.shards.write_shard); a rerun, or torchrun restarting the job after
a process died, skips the shards already there, so every readable image lands exactly once.

Bit-identical: on CPU the convolutions run on PyTorch's direct (im2col + GEMM per image) algorithm,
not oneDNN's or NNPACK's, whose arithmetic depends on the batch size (a 16-image conv differs from
16 one-image convs in the last bit, measured on every conv of the demo model). With it an image's
tokens equal ``model.img_to_idxBl(image[None])`` bit for bit whatever the batch size, shard size or
process count (PyTorch already takes that algorithm for one image); tests/test_token_shards.py checks it.
On CUDA, cuDNN runs deterministic algorithms; batch invariance there is not verified.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from vqfast import shards
from vqfast.data import IMAGE_SUFFIXES, format_skipped, list_images, load_crop
from vqfast.errors import InputError
from vqfast.tokenizer import amp_context, encode_images, model_geometry
from vqfast.train.distributed import gather, rank_and_world

AUGMENTS = {"none": 1, "flip": 2, "ten-crop": 10}
LABEL_MODES = ("auto", "folders", "none")
# Ten-crop (LlamaGen's): the centred square resized to 1.1 x the image size, then the four corner and
# the centre crops of the image size, then the same five mirrored.
TEN_CROP_RANGE = 1.1
DEFAULT_SHARD_SIZE = 10_000


# ---- what one image becomes ----------------------------------------------------------------------

def ten_crop_size(size: int) -> int:
    return int(size * TEN_CROP_RANGE)


def image_views(path: Path, size: int, augment: str) -> torch.Tensor:
    """The views of one image file, [V, 3, size, size] in [-1, 1] (V = AUGMENTS[augment]); raises
    OSError / ValueError for a file that cannot be decoded (vqfast.data.load_crop)."""
    if augment == "ten-crop":
        big = ten_crop_size(size)
        img = load_crop(path, big)[0]
        d = big - size
        corners = [(0, 0), (0, d), (d, 0), (d, d), (d // 2, d // 2)]  # (top, left)
        crops = [img[:, y: y + size, x: x + size] for y, x in corners]
        five = torch.stack(crops)
        return torch.cat([five, five.flip(-1)]).contiguous()
    img = load_crop(path, size)[0]
    if augment == "flip":
        return torch.stack([img, img.flip(-1)])
    return img[None]


def class_labels(names: list[str], mode: str, source: Path) -> tuple[str, list[str], list[int]]:
    """(mode used, class names sorted, label per image). "folders": DIR/<class>/<file> (any depth below
    the class folder), class index in sorted class-name order (torchvision's ImageFolder); "none": -1;
    "auto": folders when every image lies in a class folder, else none."""
    in_folder = all("/" in n for n in names)
    if mode == "auto":
        mode = "folders" if in_folder else "none"
    if mode == "none":
        return mode, [], [shards.NO_LABEL] * len(names)
    if not in_folder:
        loose = next(n for n in names if "/" not in n)
        raise InputError(f"--labels folders: {source / loose} is not inside a class folder (DIR/<class>/<image>); "
                         f"use --labels none")
    classes = sorted({n.split("/", 1)[0] for n in names})
    index = {c: i for i, c in enumerate(classes)}
    return mode, classes, [index[n.split("/", 1)[0]] for n in names]


@contextlib.contextmanager
def batch_invariant(device: torch.device):
    """Convolutions whose per-image arithmetic does not depend on the batch (see the module docstring)."""
    if device.type == "cpu":
        # mkldnn set directly: torch.backends.mkldnn.flags() also resets oneDNN's TF32 switch, warning
        # about Intel GPUs on every call.
        mkldnn = torch.backends.mkldnn.enabled
        torch.backends.mkldnn.enabled = False
        try:
            with torch.backends.nnpack.flags(enabled=False):
                yield
        finally:
            torch.backends.mkldnn.enabled = mkldnn
    else:
        with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):
            yield


# ---- the job record ------------------------------------------------------------------------------

def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def names_digest(names: list[str]) -> str:
    h = hashlib.sha256()
    for n in names:
        h.update(n.encode("utf-8") + b"\0")
    return h.hexdigest()


# What a rerun must match, with how a difference is named.
_COMPARED = {"checkpoint_sha256": "the tokenizer checkpoint (sha256)", "patch_nums": "the scales",
             "vocab_size": "the vocabulary", "image_size": "the image size", "augment": "--augment",
             "labels": "--labels", "shard_size": "--shard-size", "images": "the number of images",
             "names_sha256": "the image list", "dtype": "--dtype", "format": "the format",
             "version": "the format version"}


def job_record(geo: dict, checkpoint, checkpoint_sha256: str, augment: str, labels: str, label_names: list[str],
               shard_size: int, names: list[str], dtype: str, source: Path) -> dict:
    return {"format": shards.SHARDS_FORMAT, "version": shards.SHARDS_VERSION,
            "checkpoint": str(checkpoint), "checkpoint_sha256": checkpoint_sha256,
            "patch_nums": list(geo["patch_nums"]), "vocab_size": geo["vocab_size"], "image_size": geo["image_size"],
            "augment": augment, "labels": labels, "label_names": label_names, "shard_size": shard_size,
            "images": len(names), "names_sha256": names_digest(names), "dtype": dtype, "source": str(source)}


def check_output(out: Path, job: dict) -> str | None:
    """Prepare OUT_DIR for ``job`` (rank 0): None when it is new, empty, or holds this same job; else
    the one-line reason it cannot be used."""
    if out.exists() and not out.is_dir():
        return f"output {out} is a file; name a folder for the token set"
    if out.is_dir() and any(out.iterdir()):
        if not (out / shards.JOB).is_file():
            held = ", ".join(sorted(p.name for p in out.iterdir())[:4])
            return (f"output {out} holds files that are not a vqfast token set ({held}); choose an empty or "
                    f"new folder")
        try:
            old = json.loads((out / shards.JOB).read_text())
        except (OSError, ValueError) as e:
            return f"output {out}: its {shards.JOB} cannot be read ({type(e).__name__}); choose another folder"
        diffs = [f"{what}: {old.get(k)!r} then, {job[k]!r} now" for k, what in _COMPARED.items()
                 if old.get(k) != job[k]]
        if diffs:
            return (f"output {out} holds a token set made with other settings ({'; '.join(diffs)}); rerun with "
                    f"the same ones to finish it, or choose another folder")
        return None
    if not out.parent.is_dir():
        return f"output {out}: the folder {out.parent} does not exist"
    try:
        out.mkdir(exist_ok=True)
        shards.write_json_atomic(out / shards.JOB, job)
    except OSError as e:
        return f"output {out} cannot be written ({type(e).__name__}: {e})"
    return None


# ---- encoding ------------------------------------------------------------------------------------

class _Views(torch.utils.data.Dataset):
    """Global image index j -> (j, its views or None, the failure's reason or None)."""

    def __init__(self, root: Path, names: list[str], size: int, augment: str):
        self.root, self.names, self.size, self.augment = root, names, size, augment

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, j: int):
        try:
            return j, image_views(self.root / self.names[j], self.size, self.augment), None
        except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, ...: skipped and listed
            text = str(e).split("\n")[0]
            return j, None, f"{type(e).__name__}: {text}" if text else type(e).__name__


def _collate(items):
    return items


def _shard_batches(ranges: list[range], batch_size: int) -> list[list[int]]:
    """Batches of image indices that never cross a shard boundary."""
    return [list(r[i: i + batch_size]) for r in ranges for i in range(0, len(r), batch_size)]


def _listing(source: Path) -> list[str]:
    if not source.is_dir():
        raise InputError(f"input {source} is not a folder")
    names = list_images(source)
    if not names:
        raise InputError(f"input {source} holds no {'/'.join(s[1:].upper() for s in IMAGE_SUFFIXES)} images")
    return names


@torch.no_grad()
def encode_folder(model: nn.Module, source, out, *, checkpoint, augment: str = "none", labels: str = "auto",
                  shard_size: int = DEFAULT_SHARD_SIZE, batch_size: int = 32, workers: int = 0, device="cpu",
                  dtype: str = "fp32", progress: bool = True, checkpoint_sha256: str | None = None) -> dict:
    """Encode every image under ``source`` (recursive) into the token set ``out``; this process's share
    when a torch.distributed group is initialised. Returns {"manifest" (rank 0, else None), "encoded"
    (images this process encoded now), "skipped_shards" (this process's shards already there),
    "seconds"}."""
    if augment not in AUGMENTS:
        raise InputError(f"--augment must be one of {', '.join(AUGMENTS)}, got {augment!r}")
    if labels not in LABEL_MODES:
        raise InputError(f"--labels must be one of {', '.join(LABEL_MODES)}, got {labels!r}")
    for name, value in (("shard-size", shard_size), ("batch-size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"--{name} must be a positive int, got {value!r}")
    source, out, device = Path(source), Path(out), torch.device(device)
    rank, world = rank_and_world()
    geo = model_geometry(model)
    size, views = geo["image_size"], AUGMENTS[augment]

    # Every process lists the folder; all must see the same list (a shared file system).
    try:
        names, error = _listing(source), None
        mode, classes, image_labels = class_labels(names, labels, source)
    except InputError as e:
        names, error, mode, classes, image_labels = [], str(e), labels, [], []
    digests = gather(error or names_digest(names), world)
    if error is None and any(d != digests[0] for d in digests):
        error = f"input {source}: the processes list different files (a folder that changes, or not shared)"
    job = None
    if error is None and rank == 0:
        sha = checkpoint_sha256 or sha256_file(checkpoint)
        job = job_record(geo, checkpoint, sha, augment, mode, classes, shard_size, names, dtype, source)
        error = check_output(out, job)
    errors = [e for e in gather(error, world) if e]
    if errors:
        raise InputError(errors[0])

    n_shards = math.ceil(len(names) / shard_size)
    mine = list(range(rank, n_shards, world))
    if rank == 0:
        shards.remove_stale_temporaries(out)
    gather(None, world)  # nobody writes before the stale temporaries are gone
    todo = [k for k in mine if shards.read_shard_meta(out, k) is None]
    ranges = [range(k * shard_size, min(len(names), (k + 1) * shard_size)) for k in todo]
    batches = _shard_batches(ranges, batch_size)
    loader = torch.utils.data.DataLoader(_Views(source, names, size, augment), batch_sampler=batches,
                                         num_workers=workers, collate_fn=_collate,
                                         pin_memory=device.type == "cuda")
    small = shards.token_dtype(geo["vocab_size"])
    model.to(device)
    from tqdm import tqdm

    total = sum(len(r) for r in ranges)
    bar = tqdm(total=total, disable=not progress or rank != 0, unit="img", dynamic_ncols=True,
               desc=f"encode (rank 0 of {world})" if world > 1 else "encode", file=sys.stderr)
    start = time.perf_counter()
    pending = {k: {"tokens": [], "labels": [], "views": [], "paths": [], "skipped": [], "seen": 0} for k in todo}
    encoded = 0
    for items in loader:
        k = items[0][0] // shard_size
        acc = pending[k]
        good = [(j, v) for j, v, _ in items if v is not None]
        acc["skipped"] += [[names[j], reason] for j, v, reason in items if v is None]
        acc["seen"] += len(items)
        if good:
            x = torch.cat([v for _, v in good]).to(device, non_blocking=True)
            with batch_invariant(device), amp_context(device, dtype):
                idx = encode_images(model, x)
            acc["tokens"].append([t.cpu().numpy().astype(small) for t in idx])
            for j, _ in good:
                acc["labels"] += [image_labels[j]] * views
                acc["views"] += list(range(views))
                acc["paths"] += [names[j]] * views
            encoded += len(good)
        bar.update(len(items))
        if acc["seen"] == len(range(k * shard_size, min(len(names), (k + 1) * shard_size))):
            tokens = [np.concatenate([b[s] for b in acc["tokens"]]) if acc["tokens"] else
                      np.zeros((0, p * p), dtype=small) for s, p in enumerate(geo["patch_nums"])]
            shards.write_shard(out, k, tokens, np.asarray(acc["labels"], np.int64), np.asarray(acc["views"], np.uint8),
                               acc["paths"], images=len(acc["paths"]) // views, skipped=acc["skipped"])
            del pending[k]
    bar.close()
    seconds = time.perf_counter() - start
    gather(None, world)  # every process has written its shards
    manifest = write_manifest(out, n_shards) if rank == 0 else None
    return {"manifest": manifest, "encoded": encoded, "skipped_shards": len(mine) - len(todo), "seconds": seconds,
            "world": world}


def write_manifest(out: Path, n_shards: int) -> dict:
    """Rank 0, after every shard is written: the manifest from job.json and the shards' metas."""
    job = shards.read_json(out / shards.JOB, "job record")
    entries, skipped, rows, images = [], [], 0, 0
    for k in range(n_shards):
        meta = shards.read_shard_meta(out, k)
        if meta is None:
            raise RuntimeError(f"shard {shards.shard_name(k)} is missing after every process finished")
        entries.append({"name": shards.shard_name(k), "rows": meta["rows"], "images": meta["images"]})
        skipped += meta["skipped"]
        rows += meta["rows"]
        images += meta["images"]
    manifest = {"format": shards.SHARDS_FORMAT, "version": shards.SHARDS_VERSION,
                "checkpoint": {"path": job["checkpoint"], "sha256": job["checkpoint_sha256"]},
                "patch_nums": job["patch_nums"], "vocab_size": job["vocab_size"], "image_size": job["image_size"],
                "token_dtype": shards.token_dtype(job["vocab_size"]).name, "dtype": job["dtype"],
                "augment": {"name": job["augment"], "views": AUGMENTS[job["augment"]]},
                "labels": {"mode": job["labels"], "names": job["label_names"]},
                "shard_size": job["shard_size"], "source": job["source"], "images": images, "rows": rows,
                "shards": entries, "skipped": skipped}
    shards.write_json_atomic(out / shards.MANIFEST, manifest)
    return manifest


def report(done: dict, source, out) -> list[str]:
    """The lines rank 0 prints at the end (the skipped files go to stderr as a warning)."""
    m = done["manifest"]
    rate = done["encoded"] / done["seconds"] if done["seconds"] > 0 else 0.0
    lines = [f"{source}: {m['images']} images -> {m['rows']} rows ({m['augment']['views']} per image) of "
             f"{sum(p * p for p in m['patch_nums'])} tokens over scales {tuple(m['patch_nums'])} (vocabulary "
             f"{m['vocab_size']}) in {len(m['shards'])} shard{'s' if len(m['shards']) != 1 else ''} under {out}"]
    if m["labels"]["mode"] == "folders":
        lines.append(f"labels: {len(m['labels']['names'])} classes from the folder names")
    extra = f", {done['skipped_shards']} shards already done" if done["skipped_shards"] else ""
    lines.append(f"rank 0 encoded {done['encoded']} images in {done['seconds']:.1f} s ({rate:.1f} images/s) "
                 f"on {done['world']} process{'es' if done['world'] > 1 else ''}{extra}")
    return lines


def warn_skipped(m: dict) -> None:
    if m["skipped"]:
        print(f"warning: {format_skipped([tuple(s) for s in m['skipped']], limit=10)}", file=sys.stderr)
