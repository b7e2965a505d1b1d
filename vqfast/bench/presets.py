"""Presets: what each question measures and how many times.

    tiny   seconds; the machinery check used by tests/test_bench.py
    quick  a CPU machine, about 5 minutes on 2 cores
    gpu    a GPU, one short command: the headline shapes, three VAR scales, one K sweep, bf16
    full   a GPU: large shapes, every dtype, fast precision, medians of 50 runs
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    # Nearest-codeword forward: headline shapes (N, D, K) in float32, then a K sweep per D for plots.
    forward_shapes: tuple[tuple[int, int, int], ...]
    sweep_n: int
    sweep_ds: tuple[int, ...]
    sweep_ks: tuple[int, ...]
    dtypes: tuple[str, ...]  # extra dtypes, run on the first headline shape
    precisions: tuple[str, ...]
    # Training step: (batch, channels = D, side) of z, codebook sizes, residual stages.
    train_batch: int
    train_dim: int
    train_side: int
    train_ks: tuple[int, ...]
    train_stages: int
    # Multi-scale tokenisation: images per batch.
    multiscale_batch: int
    # Peak memory: forward shapes and training-step codebook sizes measured.
    memory_forward_shapes: tuple[tuple[int, int, int], ...]
    memory_train_ks: tuple[int, ...]
    warmup: int
    repeats: int
    stat: str  # which summary the ratios use: "median" or "best"
    # Forward providers to run (None: all available). quick keeps the four the CPU comparison names.
    forward_providers: tuple[str, ...] | None = None


PRESETS = {
    "tiny": Preset(
        name="tiny",
        forward_shapes=((257, 3, 17), (100, 17, 33)),
        sweep_n=129, sweep_ds=(5,), sweep_ks=(7, 33),
        dtypes=("bfloat16",), precisions=("exact", "fast"),
        train_batch=2, train_dim=5, train_side=3, train_ks=(17,), train_stages=2,
        multiscale_batch=1,
        memory_forward_shapes=((257, 3, 17),), memory_train_ks=(17,),
        warmup=1, repeats=2, stat="median",
    ),
    # The four CPU shapes compared best-of-3, then a K sweep small enough for 2 shared cores.
    "quick": Preset(
        name="quick",
        forward_shapes=((65536, 64, 1024), (65536, 32, 4096), (262144, 8, 512), (16384, 256, 16384)),
        sweep_n=16384, sweep_ds=(16, 64), sweep_ks=(256, 1024, 4096),
        dtypes=("bfloat16",), precisions=("exact", "fast"),
        train_batch=4, train_dim=64, train_side=32, train_ks=(1024, 16384), train_stages=2,
        multiscale_batch=2,
        memory_forward_shapes=((65536, 64, 1024), (16384, 256, 16384)), memory_train_ks=(1024, 16384),
        warmup=1, repeats=3, stat="best",
        forward_providers=("seeds", "torch-chunked", "faiss-cpu", "vqfast-cpu", "vqfast-cpu-fast"),
    ),
    # A first GPU look inside one short command: the headline shapes of the comparison (Triton vs
    # CUDA vs mm + argmin vs the classic code), three VAR scales, one K sweep, bf16, medians of 20.
    "gpu": Preset(
        name="gpu",
        forward_shapes=((1 << 20, 32, 1024), (1 << 20, 64, 16384), (1 << 20, 256, 16384), (1 << 20, 64, 65536))
        + tuple((32 * p * p, 32, 4096) for p in (1, 4, 16)),
        sweep_n=262144, sweep_ds=(64,), sweep_ks=(256, 4096, 65536),
        dtypes=("bfloat16",), precisions=("exact", "fast"),
        train_batch=32, train_dim=64, train_side=32, train_ks=(16384,), train_stages=4,
        multiscale_batch=32,
        memory_forward_shapes=((262144, 64, 65536),), memory_train_ks=(16384,),
        warmup=3, repeats=20, stat="median",
    ),
    "full": Preset(
        name="full",
        # N = 2^20 at D in {32, 64, 256}, K in {1024, 16384, 65536}; then VAR's scales for 32 images
        # (N = 32 p^2, p in patch_nums, D = Cvae = 32, K = 4096) and the CPU comparison shapes.
        forward_shapes=tuple((1 << 20, d, k) for d in (32, 64, 256) for k in (1024, 16384, 65536))
        + tuple((32 * p * p, 32, 4096) for p in (1, 2, 3, 4, 5, 6, 8, 10, 13, 16))
        + ((65536, 64, 1024), (65536, 32, 4096), (262144, 8, 512), (16384, 256, 16384)),
        sweep_n=262144, sweep_ds=(8, 32, 64, 256), sweep_ks=(16, 64, 256, 1024, 4096, 16384, 65536),
        dtypes=("float16", "bfloat16"), precisions=("exact", "fast"),
        train_batch=32, train_dim=64, train_side=32, train_ks=(1024, 16384), train_stages=4,
        multiscale_batch=32,
        memory_forward_shapes=((65536, 64, 1024), (16384, 256, 16384), (262144, 64, 65536)),
        memory_train_ks=(1024, 16384),
        warmup=5, repeats=50, stat="median",
    ),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {name!r}")
    return PRESETS[name]
