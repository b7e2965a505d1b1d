"""Question: how fast does `vqfast tokenize ... encode DIR OUT_DIR` turn a folder of images into a token
set, against LlamaGen's scheme (extract_codes_c2i.py: batch size 1, one codes .npy and one label .npy
per image), on the same model, images and machine, in the same run?

    python benchmarks/bench_tokenize.py                 # 2,000 images of 80 x 64 px, 64 x 64 model input
    python benchmarks/bench_tokenize.py --images 200    # a quick look (not recorded unless --record)

It generates an ImageNet-style folder (10 class folders of JPEGs, smooth colour fields with noise), a
randomly initialised tokenizer with the demo preset's architecture at 64 x 64 (6 scales, 130 tokens,
vocabulary 256: encoder speed, not token quality, is measured), and runs each configuration under
torchrun (gloo) at 1 and 2 processes of one thread each (OMP_NUM_THREADS=1: on a loaded 2-core
machine, two OpenMP threads per process made one-process runs 5 to 25 times slower, measured at a
load average of 6.7; the load average at the start and the end is recorded):

    vqfast      the token set, --augment flip (2 views per image, LlamaGen's default), batch 1 and 32
    llamagen    LlamaGen's loop re-implemented from its description: a DistributedSampler over the
                files, one image per step (its two views in one batch of 2, as LlamaGen stacks the
                image and its mirror), codes [1, 2, L] and the label saved as two .npy files per image

Recorded per configuration: images/s over the encoding (the slowest process, from the first barrier
after the model loads to the last file written), the command's wall time (process start included),
the peak resident memory of each process (ru_maxrss), the files written and their bytes. The run
also counts how many images' codes are identical in the two schemes. Results: a record appended to
benchmarks/results/tokenize_cpu.json and the table of the latest record in
benchmarks/results/tokenize_cpu.md (``markdown``), with the machine, torch, commit and date.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CLASSES = 10
PREVIEW_SIZE = (80, 64)  # (width, height): every image is centre-cropped to a square first


# ---- inputs --------------------------------------------------------------------------------------

def make_images(root: Path, n: int, seed: int = 0) -> None:
    """n JPEGs in CLASSES class folders: a random smooth colour field (bilinear from 4 x 4) plus noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = PREVIEW_SIZE
    for i in range(n):
        d = root / f"class{i % CLASSES:02d}"
        d.mkdir(parents=True, exist_ok=True)
        coarse = Image.fromarray((rng.random((4, 4, 3)) * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR)
        img = np.asarray(coarse).astype(np.float32) + rng.normal(0, 12, (h, w, 3))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(d / f"{i:06d}.jpg", quality=90)


def make_checkpoint(path: Path, size: int) -> dict:
    """A randomly initialised tokenizer (demo architecture at ``size``) as a vqfast train checkpoint."""
    import torch

    from vqfast import tokenizer
    from vqfast.train import make_config

    torch.manual_seed(0)
    cfg = make_config("demo", image_size=size)
    model = tokenizer.build_model(cfg)
    torch.save({"format": tokenizer.CHECKPOINT_FORMAT, "config": cfg, "model": model.state_dict()}, path)
    return {"preset": "demo", "weights": "random (seed 0)", **tokenizer.model_geometry(model),
            "parameters": sum(p.numel() for p in model.parameters())}


# ---- the workers (one per torchrun process) --------------------------------------------------------

def _worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from vqfast import tokenize as vtok

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    model = vtok.load_model(args.checkpoint)
    if world > 1:
        dist.barrier()
    start = time.perf_counter()
    if args.scheme == "vqfast":
        from vqfast import tokenset

        tokenset.encode_folder(model, args.input, args.output, checkpoint=args.checkpoint, augment="flip",
                               labels="folders", shard_size=args.shard_size, batch_size=args.batch_size,
                               progress=False)
    else:
        _llamagen(model, Path(args.input), Path(args.output), rank, world)
    if world > 1:
        dist.barrier()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux -> MiB
    Path(args.report, f"rank{rank}.json").write_text(json.dumps({"rank": rank, "seconds": seconds, "peak_mib": peak}))
    if world > 1:
        dist.destroy_process_group()


def _llamagen(model, source: Path, out: Path, rank: int, world: int) -> None:
    """LlamaGen's extract_codes_c2i loop: DistributedSampler (no shuffle), batch size 1, the image and
    its mirror encoded together, codes [1, 2, L] and the label in one .npy file each, named by index."""
    import numpy as np
    import torch

    from vqfast.data import list_images
    from vqfast.tokenset import class_labels, image_views

    names = list_images(source)
    _, _, labels = class_labels(names, "folders", source)
    size = model.downsample * model.quantize.v_patch_nums[-1]
    sampler = torch.utils.data.DistributedSampler(range(len(names)), num_replicas=world, rank=rank, shuffle=False)
    (out / "codes").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        for j in sampler:
            x = image_views(source / names[j], size, "flip")
            codes = torch.cat(model.img_to_idxBl(x), dim=1)  # [2, L]
            np.save(out / "codes" / f"{j}.npy", codes[None].numpy())
            np.save(out / "labels" / f"{j}.npy", np.array([labels[j]]))


# ---- the driver ----------------------------------------------------------------------------------

def _run(scheme: str, processes: int, batch_size: int, ctx: dict) -> dict:
    out = ctx["tmp"] / f"{scheme}-p{processes}-b{batch_size}"
    report = ctx["tmp"] / f"report-{out.name}"
    report.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
           str(Path(__file__).resolve()), "--worker", "--scheme", scheme, "--checkpoint", str(ctx["checkpoint"]),
           "--input", str(ctx["images"]), "--output", str(out), "--batch-size", str(batch_size),
           "--shard-size", str(ctx["shard_size"]), "--report", str(report)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{scheme} x{processes} batch {batch_size} failed:\n{proc.stderr[-3000:]}")
    ranks = sorted((json.loads(p.read_text()) for p in report.glob("rank*.json")), key=lambda r: r["rank"])
    files = [p for p in out.rglob("*") if p.is_file()]
    seconds = max(r["seconds"] for r in ranks)
    return {"scheme": scheme, "processes": processes, "batch_size": batch_size,
            "threads_per_process": int(env["OMP_NUM_THREADS"]), "encode_s": round(seconds, 3),
            "images_per_s": round(ctx["n"] / seconds, 1), "wall_s": round(wall, 2),
            "peak_rss_mib": [round(r["peak_mib"], 1) for r in ranks], "files": len(files),
            "bytes": sum(p.stat().st_size for p in files), "output": out}


def _agreement(vq_dir: Path, llama_dir: Path, source: Path, checkpoint: Path) -> dict:
    """How many images have the same codes (both views, every scale) in the two outputs; for those
    that differ, which scheme equals ``img_to_idxBl`` of each view alone (one image, default settings)."""
    import numpy as np
    import torch

    from vqfast import tokenize as vtok
    from vqfast.data import TokenDataset, list_images
    from vqfast.tokenset import image_views

    ds = TokenDataset(vq_dir)
    index = {name: j for j, name in enumerate(list_images(source))}  # LlamaGen names its files by index
    names, same, differ = ds.names, 0, []
    for i in range(0, len(ds), 2):
        ours = np.stack([np.concatenate([t.numpy() for t in ds[i + v][0]]) for v in range(2)])
        theirs = np.load(llama_dir / "codes" / f"{index[names[i]]}.npy")[0]
        if np.array_equal(ours, theirs):
            same += 1
        else:
            differ.append((names[i], ours, theirs))
    model = vtok.load_model(checkpoint)
    alone_equals = {"vqfast": 0, "llamagen": 0}
    with torch.no_grad():
        for name, ours, theirs in differ:
            views = image_views(source / name, ds.image_size, "flip")
            ref = np.stack([torch.cat(model.img_to_idxBl(v[None]), dim=1)[0].numpy() for v in views])
            alone_equals["vqfast"] += bool(np.array_equal(ours, ref))
            alone_equals["llamagen"] += bool(np.array_equal(theirs, ref))
    return {"images_compared": len(ds) // 2, "identical_codes": same, "differing": len(differ),
            "differing_equal_to_one_image_call": alone_equals}


def git_commit() -> str:
    from vqfast.bench.results import git_commit as commit

    return commit(ROOT)


def _differing(agreement: dict) -> str:
    n = agreement.get("differing", 0)
    if not n:
        return ""
    eq = agreement["differing_equal_to_one_image_call"]
    return (f"; of the {n} that differ, the one-image img_to_idxBl of each view gives vqfast's codes for "
            f"{eq['vqfast']} and LlamaGen's for {eq['llamagen']}")


def markdown(record: dict) -> str:
    """The table of one record (rows in run order) with a caption naming the machine, commit and date."""
    m = record["model"]
    lines = [f"{record['images']} JPEGs ({record['source_size']}) -> {m['image_size']} x {m['image_size']}, "
             f"{m['num_tokens']} tokens over {len(m['patch_nums'])} scales, 2 views per image (flip); "
             f"{record['cpu_model']}, {record['cores']} cores (load average {record['load_average'][0]} at the "
             f"start, {record['load_average'][1]} at the end), one thread per process, torch {record['torch']}, commit {record['commit']}, "
             f"{record['date'][:10]}. Tokens identical in both schemes for "
             f"{record['agreement']['identical_codes']} of {record['agreement']['images_compared']} images"
             + _differing(record["agreement"]) + ".", "",
             "| scheme | processes | batch | images/s | encode s | wall s | peak RSS per process (MiB) | files | MiB on disk |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in record["runs"]:
        name = "vqfast token set" if r["scheme"] == "vqfast" else "LlamaGen's scheme"
        lines.append(f"| {name} | {r['processes']} | {r['batch_size']} | {r['images_per_s']:.1f} | {r['encode_s']:.1f} "
                     f"| {r['wall_s']:.1f} | {' / '.join(f'{v:.0f}' for v in r['peak_rss_mib'])} | {r['files']} "
                     f"| {r['bytes'] / 2 ** 20:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--size", type=int, default=64, help="the model's input side (default 64)")
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--record", action="store_true", help="append to benchmarks/results even for a small run")
    p.add_argument("--results-dir", default=str(RESULTS))
    # worker mode (torchrun runs this file once per process)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for name in ("--scheme", "--checkpoint", "--input", "--output", "--report"):
        p.add_argument(name, help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, default=32, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0

    import torch

    from vqfast.bench.results import cpu_model

    cores = len(os.sched_getaffinity(0))
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        make_images(tmp / "images", args.images)
        model = make_checkpoint(tmp / "tokenizer.pt", args.size)
        ctx = {"tmp": tmp, "images": tmp / "images", "checkpoint": tmp / "tokenizer.pt", "n": args.images,
               "shard_size": args.shard_size}
        runs = []
        for scheme, processes, batch in (("llamagen", 1, 1), ("vqfast", 1, 1), ("vqfast", 1, 32),
                                         ("llamagen", 2, 1), ("vqfast", 2, 1), ("vqfast", 2, 32)):
            r = _run(scheme, processes, batch, ctx)
            print(f"{scheme:8s} x{processes} batch {batch:2d}: {r['images_per_s']:7.1f} images/s, wall {r['wall_s']:.1f} s, "
                  f"peak {r['peak_rss_mib']} MiB, {r['files']} files", flush=True)
            runs.append(r)
        vq = next(r for r in runs if r["scheme"] == "vqfast" and r["processes"] == 2 and r["batch_size"] == 32)
        llama = next(r for r in runs if r["scheme"] == "llamagen" and r["processes"] == 2)
        agreement = _agreement(vq["output"], llama["output"], ctx["images"], ctx["checkpoint"])
    for r in runs:
        del r["output"]
    record = {"question": "tokenize", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "commit": git_commit(), "torch": torch.__version__, "cpu_model": cpu_model(), "cores": cores,
              "images": args.images, "source_size": f"{PREVIEW_SIZE[0]} x {PREVIEW_SIZE[1]}", "model": model,
              "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
              "shard_size": args.shard_size, "decoding_workers": 0, "runs": runs, "agreement": agreement,
              "command": "python benchmarks/bench_tokenize.py" + (f" --images {args.images}" if args.images != 2000 else "")}
    print(markdown(record))
    if args.images >= 2000 or args.record:
        out = Path(args.results_dir)
        path = out / "tokenize_cpu.json"
        records = json.loads(path.read_text()) if path.exists() else []
        path.write_text(json.dumps(records + [record], indent=1) + "\n")
        (out / "tokenize_cpu.md").write_text(markdown(record))
        print(f"appended to {path}; table in {out / 'tokenize_cpu.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
