"""The sharded token set ``vqfast tokenize ... encode DIR OUT_DIR`` writes, and ``TokenDataset`` that reads it.

A token set is a folder: no pickles anywhere, every array a ``.npy`` file that ``np.load(mmap_mode="r")``
maps without reading it.

    OUT_DIR/job.json            what the job was asked to do (written first; a rerun must match it)
    OUT_DIR/manifest.json       the whole set, written last by rank 0: the set is complete when it exists
    OUT_DIR/shard-00000/        one folder per shard, renamed into place whole (atomic)
        scale0.npy ... scale{S-1}.npy   tokens, one [n, p * p] array per scale (int16 when the vocabulary
                                        fits 32,768 codes, else int32)
        labels.npy              int64 [n]: the class index, -1 without labels
        views.npy               uint8 [n]: which view of its image a row is (0: the image; flip: 1 the
                                mirrored image; ten-crop: 0..9)
        paths.npy               unicode [n]: the image's path relative to DIR
        meta.json               {"rows", "images", "skipped": [[path, reason], ...]}

Shard k holds the images k * shard_size .. (k + 1) * shard_size - 1 of DIR's sorted file list, each
image's views in consecutive rows; images that fail to decode are left out and listed. The shards are
a function of the file list and the options only, never of the process count or the batch size.

manifest.json: {"format": "vqfast-token-shards", "version": 1, "checkpoint": {"path", "sha256"},
"patch_nums", "vocab_size", "image_size", "token_dtype", "augment": {"name", "views"},
"labels": {"mode", "names"}, "shard_size", "source", "images", "rows", "shards": [{"name", "rows",
"images"}], "skipped": [[path, reason], ...]}.
"""
from __future__ import annotations

import bisect
import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch

from vqfast.errors import InputError

SHARDS_FORMAT = "vqfast-token-shards"
SHARDS_VERSION = 1
MANIFEST = "manifest.json"
JOB = "job.json"
SHARD_PREFIX = "shard-"
NO_LABEL = -1


def shard_name(k: int) -> str:
    return f"{SHARD_PREFIX}{k:05d}"


def token_dtype(vocab_size: int) -> np.dtype:
    """int16 holds indices below 32,768 (VAR's vocabulary is 4,096): a quarter of int64's bytes."""
    return np.dtype(np.int16) if vocab_size <= 2 ** 15 else np.dtype(np.int32)


def write_json_atomic(path: Path, obj) -> None:
    """JSON to ``path`` through a unique temporary file in the same folder and an atomic rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def read_json(path: Path, what: str) -> dict:
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{what} {path} cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise InputError(f"{what} {path} does not hold a JSON object")
    return obj


def write_shard(out_dir: Path, k: int, tokens: list[np.ndarray], labels: np.ndarray, views: np.ndarray,
                paths: list[str], images: int, skipped: list) -> dict:
    """Write shard k whole: into a temporary folder, then one rename. A process killed half-way leaves
    only a ``.tmp-`` folder that a rerun ignores and removes. Returns its meta."""
    out_dir = Path(out_dir)
    final = out_dir / shard_name(k)
    tmp = out_dir / f".tmp-{shard_name(k)}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    n = len(paths)
    for s, t in enumerate(tokens):
        assert t.shape[0] == n, (t.shape, n)
        np.save(tmp / f"scale{s}.npy", np.ascontiguousarray(t), allow_pickle=False)
    np.save(tmp / "labels.npy", np.asarray(labels, dtype=np.int64), allow_pickle=False)
    np.save(tmp / "views.npy", np.asarray(views, dtype=np.uint8), allow_pickle=False)
    np.save(tmp / "paths.npy", np.asarray(paths, dtype=str) if n else np.zeros(0, dtype="<U1"), allow_pickle=False)
    meta = {"rows": n, "images": images, "skipped": [list(x) for x in skipped]}
    write_json_atomic(tmp / "meta.json", meta)
    if final.exists():  # a restarted process that finished it meanwhile: same content, keep the first
        shutil.rmtree(tmp)
    else:
        os.rename(tmp, final)
    return meta


def read_shard_meta(out_dir: Path, k: int) -> dict | None:
    """Shard k's meta, or None when the shard is not (yet) written."""
    path = Path(out_dir) / shard_name(k) / "meta.json"
    return read_json(path, "shard meta") if path.is_file() else None


def remove_stale_temporaries(out_dir: Path) -> None:
    """Remove ``.tmp-`` folders that a killed process left behind."""
    for p in Path(out_dir).glob(f".tmp-{SHARD_PREFIX}*"):
        shutil.rmtree(p, ignore_errors=True)


def read_manifest(out_dir) -> dict:
    """A token set's manifest, checked: InputError naming the folder when it is missing or not one."""
    out_dir = Path(out_dir)
    path = out_dir / MANIFEST
    if not path.is_file():
        extra = " (job.json is there: the job has not finished; rerun it to complete the set)" \
            if (out_dir / JOB).is_file() else ""
        raise InputError(f"token set {out_dir} has no {MANIFEST}{extra}")
    m = read_json(path, "manifest")
    if m.get("format") != SHARDS_FORMAT:
        raise InputError(f"manifest {path} has format {m.get('format')!r}, not {SHARDS_FORMAT!r}")
    if m.get("version") != SHARDS_VERSION:
        raise InputError(f"manifest {path} has version {m.get('version')!r}; this vqfast reads version {SHARDS_VERSION}")
    for key in ("patch_nums", "vocab_size", "shards", "labels", "augment"):
        if key not in m:
            raise InputError(f"manifest {path} lacks {key!r}")
    return m


class TokenDataset(torch.utils.data.Dataset):
    """The rows of a token set (``vqfast tokenize ... encode DIR OUT_DIR``), memory-mapped.

    ``ds[i]`` -> (tokens: one int64 tensor [p * p] per scale, coarse first; label: int, -1 without labels).
    Attributes: ``patch_nums``, ``vocab_size``, ``image_size``, ``label_names`` (class names, index order),
    ``views`` (rows per image), ``manifest``; ``names`` (each row's image path relative to DIR) and
    ``view(i)`` read the small per-row arrays on demand. Items are read through ``np.load(mmap_mode="r")``
    maps, opened on first use in each process (DataLoader workers open their own), so an item costs
    O(its tokens) memory whatever the set's size. Any sampler works, DistributedSampler included.
    """

    def __init__(self, root):
        self.root = Path(root)
        self.manifest = m = read_manifest(self.root)
        self.patch_nums = tuple(int(p) for p in m["patch_nums"])
        self.vocab_size = int(m["vocab_size"])
        self.image_size = m.get("image_size")
        self.label_names = list(m["labels"].get("names") or [])
        self.views = int(m["augment"].get("views", 1))
        self._shards = [s["name"] for s in m["shards"] if s["rows"]]
        self._ends = np.cumsum([s["rows"] for s in m["shards"] if s["rows"]]).tolist()
        for name in self._shards:
            if not (self.root / name).is_dir():
                raise InputError(f"token set {self.root}: shard {name} listed in the manifest is missing")
        self._maps: dict[int, tuple] = {}

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def _locate(self, i: int) -> tuple[int, int]:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"index must be an int, got {type(i).__name__}")
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for {n} rows")
        k = bisect.bisect_right(self._ends, i)
        return k, i - (self._ends[k - 1] if k else 0)

    def _shard(self, k: int) -> tuple:
        if k not in self._maps:
            d = self.root / self._shards[k]
            scales = [np.load(d / f"scale{s}.npy", mmap_mode="r", allow_pickle=False) for s in range(len(self.patch_nums))]
            self._maps[k] = (scales, np.load(d / "labels.npy", mmap_mode="r", allow_pickle=False))
        return self._maps[k]

    def __getitem__(self, i: int):
        k, j = self._locate(i)
        scales, labels = self._shard(k)
        return [torch.from_numpy(np.asarray(t[j], dtype=np.int64)) for t in scales], int(labels[j])

    def _column(self, name: str) -> np.ndarray:
        return np.concatenate([np.load(self.root / s / f"{name}.npy", allow_pickle=False) for s in self._shards]) \
            if self._shards else np.zeros(0)

    @property
    def names(self) -> list[str]:
        """Each row's image path relative to the encoded folder (read from the shards when asked)."""
        return [str(x) for x in self._column("paths")]

    def labels(self) -> np.ndarray:
        """Every row's label (int64; -1 without labels)."""
        return self._column("labels").astype(np.int64)

    def view(self, i: int) -> int:
        """Which view of its image row i is (0: the image itself)."""
        k, j = self._locate(i)
        return int(np.load(self.root / self._shards[k] / "views.npy", mmap_mode="r", allow_pickle=False)[j])

    def __getstate__(self):  # maps are per process: a DataLoader worker opens its own
        return {**self.__dict__, "_maps": {}}
