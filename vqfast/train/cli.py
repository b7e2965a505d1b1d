"""``vqfast train``'s command line: the arguments, their checks (every user mistake is one line and
exit status 2, before any data loads), Ctrl-C, and the lines a user reads.

Ctrl-C during training finishes the current step, writes the checkpoint (atomically, as at every
interval) and prints one line with the step and the ``--resume`` command that continues; exit status
130. A second Ctrl-C, or one outside the training steps (start-up, the held-out evaluation), stops at
once with one line saying what the output folder holds.

Importing this module imports no torch: ``vqfast train --help`` stays fast.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

from vqfast.errors import InputError
from vqfast.train.config import PRESETS, config_geometry, make_config, with_image_size

INTERRUPTED_EXIT = 130  # 128 + SIGINT, as shells report a command stopped by Ctrl-C


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="demo", choices=sorted(PRESETS),
                        help="model and schedule (default: demo); var is VAR's full tokenizer (256 x 256 crops), "
                             "which needs --data")
    parser.add_argument("--data", default=None, metavar="DIR",
                        help="a folder of PNG / JPEG / WebP / BMP images, searched recursively "
                             "(default: the images bundled with scikit-image and scikit-learn)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="side of the square training crops (default: the preset's; the scales are "
                             "stretched to it)")
    parser.add_argument("--steps", type=int, default=None, help="total optimisation steps (default: the preset's)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="global batch, split over torchrun's processes (default: the preset's)")
    parser.add_argument("--out", default=None, help="output directory (default: runs/<preset>/)")
    parser.add_argument("--overwrite", action="store_true", help="replace the outputs of a previous run in --out")
    parser.add_argument("--resume", action="store_true",
                        help="continue from <out>/checkpoint.pt (a finished run is left as it is)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-every", type=int, default=250,
                        help="steps between checkpoints (default 250; Ctrl-C also writes one)")
    parser.add_argument("--device", default=None, choices=("cpu", "cuda"),
                        help="default: cuda when available (under torchrun: cuda:LOCAL_RANK)")
    parser.add_argument("--dtype", default=None, choices=("fp32", "bf16"),
                        help="autocast dtype of the encoder and decoder (the quantizer's search stays fp32); "
                             "default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--workers", type=int, default=None,
                        help="data-loading processes per training process (default: 0 for the bundled images, "
                             "else up to 8 of the CPU cores)")
    parser.add_argument("--backend", default="auto",
                        help="nearest-codeword backend: auto, torch, cpu, cuda or triton (default: auto)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 is often faster on a shared machine)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (its recent_use is the share of codes hit in recent training "
                             "batches; the final summary reports the held-out codebook usage)")


# ---- checks --------------------------------------------------------------------------------------

def env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        raise InputError(f"environment variable {name}={os.environ[name]!r} is not an int") from None


def check_bundled_size(preset: str, size: int, image_size_given: bool) -> None:
    """InputError when crops of ``size`` do not fit the bundled photographs: the run needs --data."""
    from vqfast.data import RealImageCrops

    for split in ("train", "heldout"):
        try:
            RealImageCrops(split, size, 1)
        except ValueError:
            chosen = f"--image-size {size}" if image_size_given else f"--preset {preset}"
            raise InputError(f"{chosen} trains on {size} x {size} crops, larger than every bundled photograph's "
                             f"{'held-out' if split == 'heldout' else 'training'} region: it needs --data DIR, a "
                             f"folder of your own images at least {size} pixels on each side"
                             + ("" if image_size_given else " (or a smaller --image-size)")) from None


def check_args(args: argparse.Namespace):
    """Every user error, before any data loads or work starts: -> (out, device, dtype, workers)."""
    import torch

    for name in ("steps", "batch_size", "image_size", "checkpoint_every", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise InputError(f"--{name.replace('_', '-')} must be a positive int, got {value}")
    if args.workers is not None and args.workers < 0:
        raise InputError(f"--workers must be 0 or more, got {args.workers}")
    if args.seed < 0:
        raise InputError(f"--seed must be 0 or more, got {args.seed}")
    if args.data is not None and not Path(args.data).is_dir():
        raise InputError(f"--data {args.data}: " + ("is a file, not a folder of images" if Path(args.data).exists()
                                                     else "no such folder"))
    model = PRESETS[args.preset]["model"]
    if args.image_size is not None:
        try:
            model = with_image_size(model, args.image_size)
        except ValueError as e:
            raise InputError(f"--image-size {e} (preset {args.preset})") from None
    world, local_rank = env_int("WORLD_SIZE", 1), env_int("LOCAL_RANK", 0)
    batch = args.batch_size or PRESETS[args.preset]["batch_size"]
    if batch % world:
        raise InputError(f"--batch-size {batch} (the global batch) must be a multiple of the {world} processes")
    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise InputError("--device cuda: no CUDA device is available to this torch "
                             f"({torch.__version__}); use --device cpu")
        if local_rank >= torch.cuda.device_count():
            raise InputError(f"--device cuda: LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs")
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    from vqfast.tokenizer import check_backend

    check_backend(args.backend, device.type)
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    out = Path(args.out) if args.out else Path("runs") / args.preset
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file, not a folder")
    if args.resume and args.overwrite:
        raise InputError("--resume and --overwrite contradict each other: pick one")
    if args.resume and not (out / "checkpoint.pt").is_file():
        raise InputError(f"--resume: {out / 'checkpoint.pt'} does not exist")
    if not args.resume and not args.overwrite and out.is_dir() and any(out.iterdir()):
        held = ", ".join(sorted(p.name for p in out.iterdir())[:4])
        raise InputError(f"--out {out} is not empty (it holds {held}): pass --resume to continue that run "
                         f"or --overwrite to replace it, or choose another --out")
    parent = out if out.exists() else next(p for p in out.absolute().parents if p.exists())
    if not os.access(parent, os.W_OK):
        raise InputError(f"--out {out}: {parent} is not writable")
    if args.data is None:
        check_bundled_size(args.preset, config_geometry({"model": model})["image_size"], args.image_size is not None)
    if args.workers is not None:
        workers = args.workers
    elif args.data is None:
        workers = 0  # crops of in-memory arrays take ~0.1 ms: a worker process would only add start-up time
    else:
        workers = min(8, max(1, (os.cpu_count() or 2) // env_int("LOCAL_WORLD_SIZE", world) - 1))
    return out, device, dtype, workers


def scan_folder(path: str | None, rank: int, world: int):
    """Rank 0 scans the folder and sends the result (or its error) to every process."""
    from vqfast.data import ImageFolder
    from vqfast.train.distributed import gather

    if path is None:
        return None
    result = None
    if rank == 0:
        try:
            result = ImageFolder.scan(path)
        except ValueError as e:
            result = f"--data {e}"
    result = gather(result, world)[0]
    if isinstance(result, str):
        raise InputError(result)
    return result


# ---- what the user reads -------------------------------------------------------------------------

def resume_command(args: argparse.Namespace, out: Path, world: int = 1) -> str:
    """The command that continues this run: its options that shape the run, then --out and --resume."""
    launcher = ["torchrun", "--nproc-per-node", str(world), "-m", "vqfast"] if world > 1 else ["vqfast"]
    words = launcher + ["train", "--preset", args.preset]
    for name in ("data", "image_size", "steps", "batch_size", "seed", "checkpoint_every", "device", "dtype",
                 "backend", "workers", "threads"):
        value = getattr(args, name)
        default = {"seed": 0, "checkpoint_every": 250, "backend": "auto"}.get(name)
        if value is not None and value != default:
            words += [f"--{name.replace('_', '-')}", str(value)]
    return shlex.join(words + ["--out", str(out), "--resume"])


def decode_failures_line(failures: list[str]) -> str:
    """One warning line: how many files failed to decode, and every one of them by name."""
    n = len(failures)
    what = ("1 file failed to decode and was replaced by the next file of its epoch" if n == 1 else
            f"{n} files failed to decode and were replaced by the next file of their epoch")
    return f"{what}: " + "; ".join(failures)


class GracefulStop:
    """SIGINT (Ctrl-C) handling for the training loop (vqfast.train.train's ``stop``): inside
    ``deferring()`` the first Ctrl-C only sets ``requested``, and the loop stops at the end of its
    step with a checkpoint; outside it, or at the second Ctrl-C, KeyboardInterrupt is raised as usual.
    Outside the main thread (where signals cannot be handled) it does nothing."""

    def __init__(self):
        self.requested = False
        self._deferring = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False

    def _on_sigint(self, signum, frame):
        if self._deferring and not self.requested:
            self.requested = True
            return
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def deferring(self):
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False


# ---- the command ---------------------------------------------------------------------------------

def run_lines(args: argparse.Namespace, cfg: dict, folder, device, dtype: str, world: int) -> list[str]:
    """What the run will do, said before it starts: the data, the crops, the model, the device."""
    geo = config_geometry(cfg)
    size = geo["image_size"]
    data = (f"{len(folder.train)} training and {len(folder.heldout)} held-out images under {folder.root}"
            if folder is not None else "the images bundled with scikit-image and scikit-learn")
    lines = [f"data: {data}; random square crops resized to {size} x {size} ("
             + ("--image-size" if args.image_size else f"the {args.preset} preset's size") + ")",
             f"model: {len(geo['patch_nums'])} scales {tuple(geo['patch_nums'])} = {geo['num_tokens']} tokens per "
             f"image, vocabulary {geo['vocab_size']}; {device} {dtype}, global batch {cfg['batch_size']}"
             + (f" over {world} processes" if world > 1 else "")]
    if args.preset == "var" and device.type == "cpu":
        lines.append("note: the var preset is VAR's full tokenizer, sized for GPUs: on a CPU a step takes seconds "
                     "to minutes (try --preset demo)")
    return lines


def main(args: argparse.Namespace) -> int:
    out, device, dtype, workers = check_args(args)
    import torch
    import torch.distributed as dist

    from vqfast.data import format_skipped
    from vqfast.train.distributed import rank_and_world
    from vqfast.train.evaluation import summary_line
    from vqfast.train.loop import OUTPUT_FILES, is_finished, load_checkpoint, train

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    world = env_int("WORLD_SIZE", 1)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # every batch has the same shape: pick the fastest convolutions once
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = rank_and_world()[0]
    say = print if rank == 0 else (lambda *a, **k: None)

    def tell(line: str) -> None:  # warnings and the interrupt line: stderr, rank 0 only
        if rank == 0:
            print(line, file=sys.stderr)

    ckpt = out / "checkpoint.pt"
    try:
        with GracefulStop() as stop:
            try:
                folder = scan_folder(args.data, rank, world)
                if folder is not None and folder.skipped:
                    tell(f"warning: --data {args.data}: {format_skipped(folder.skipped)}")
                cfg = make_config(args.preset, args.steps, args.seed, args.backend, image_size=args.image_size,
                                  batch_size=args.batch_size, data=folder.describe() if folder is not None else None)
                if args.resume and (out / "metrics.json").is_file():
                    step = load_checkpoint(ckpt, cfg)["step"]
                    if is_finished(out, step, cfg):
                        say(f"--resume: the run in {out} finished at step {step} of {cfg['steps']} (its "
                            f"metrics.json is written): nothing to do; a larger --steps trains further")
                        return 0
                if args.overwrite and rank == 0:
                    for name in OUTPUT_FILES:
                        (out / name).unlink(missing_ok=True)
                for line in run_lines(args, cfg, folder, device, dtype, world):
                    say(line)
                t0 = time.perf_counter()
                result = train(cfg, out, resume=args.resume, checkpoint_every=args.checkpoint_every,
                               progress=not args.no_progress, folder=folder, device=device, dtype=dtype,
                               workers=workers, stop=stop)
            except KeyboardInterrupt:  # a second Ctrl-C, or one outside the training steps
                tell("vqfast train: interrupted; " + (
                    f"{ckpt} holds the last checkpoint; continue with: {resume_command(args, out, world)}"
                    if ckpt.is_file() else "nothing was written"))
                return INTERRUPTED_EXIT
        if result["decode_failures"]:
            tell(f"warning: {decode_failures_line(result['decode_failures'])}")
        if result["status"] == "interrupted":
            tell(f"vqfast train: interrupted at step {result['step']} of {cfg['steps']}: checkpoint written to {ckpt}; "
                 f"continue with: {resume_command(args, out, world)}")
            return INTERRUPTED_EXIT
        if result["metrics"] is not None:
            say(f"{summary_line(result['metrics'])}, wall {time.perf_counter() - t0:.0f} s")
            say(f"wrote {out / 'reconstructions.png'}, {out / 'metrics.json'}, {out / 'loss_curve.png'}, {ckpt}")
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    return 0
