"""Reading and writing the files vqfast's commands exchange (checkpoints, token files) safely.

    save_atomic(obj, path)          temp file + os.replace: a crash mid-write leaves the old file intact
    load_safely(path, what)         torch.load(weights_only=True) with one-line errors naming the file

Every file is read with ``weights_only=True``: only tensors and plain containers / numbers / strings
are rebuilt, so a file that carries pickled code is refused before anything in it runs. The files
vqfast writes hold nothing else (configs as dicts of plain values, RNG states as uint8 tensors).
"""
from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import torch

from vqfast.errors import InputError


def save_atomic(obj, path) -> None:
    """torch.save to ``path`` through a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_safely(path, what: str = "file"):
    """torch.load(path, map_location="cpu", weights_only=True); InputError (a ValueError) naming the
    file and what is wrong: missing, empty, truncated, not a torch file, or carrying pickled code."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} {path} does not exist")
    if path.is_dir():
        raise InputError(f"{what} {path} is a folder, not a file")
    if path.stat().st_size == 0:
        raise InputError(f"{what} {path} is empty")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        code = re.search(r"GLOBAL ([\w.]+)", text)
        if code:
            raise InputError(
                f"refused to load {what} {path}: it carries pickled Python objects ({code.group(1)}), "
                f"which could run code; only tensors and plain values are accepted, and nothing in it was run"
            ) from None
        detail = re.search(r"Unsupported operand \d+", text)
        raise InputError(
            f"{what} {path} is not a file written by torch.save that loads safely"
            f"{' (' + detail.group(0) + ')' if detail else ''}: it may be an old-style pickle or another format"
        ) from None
    except RuntimeError as e:
        if "central directory" in str(e) or "zip archive" in str(e):
            raise InputError(f"{what} {path} is truncated or corrupted (its zip archive cannot be read)") from None
        raise InputError(f"{what} {path} cannot be read: {str(e).splitlines()[0]}") from None
    except (EOFError, KeyError, ValueError, OSError, IndexError, TypeError, AttributeError) as e:
        # What torch.load raises for bytes that are not a torch file at all (text, an image, ...).
        reason = f"{type(e).__name__}: {str(e).splitlines()[0]}" if str(e) else type(e).__name__
        raise InputError(f"{what} {path} is not a torch file ({reason})") from None
