#!/usr/bin/env python3
"""Install vqfast and what it needs into the current Python environment.

    python scripts/install.py           # library + the main job's dependencies
    python scripts/install.py --test    # ... plus the test suite's dependencies
    python scripts/install.py --bench   # ... plus the benchmark peers

torch: an installed torch (CPU or CUDA build) is kept as it is; when none is installed, the CPU build
torch==2.13.0 is installed. No requirement below names torch, so pip never replaces it.
The extension vqfast._C is compiled against that torch (pip install --no-build-isolation -e .).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH = "torch==2.13.0"
BUILD = ["setuptools>=77", "wheel", "ninja", "numpy"]
DEMO = ["scikit-image", "scikit-learn", "matplotlib", "tqdm"]
TEST = ["pytest", "hypothesis", "faiss-cpu", "pytest-benchmark"]
BENCH = ["pytest-benchmark", "faiss-cpu", "vector-quantize-pytorch", "matplotlib"]
# Triton ships with CUDA builds of torch; on CPU-only machines it runs kernels in its interpreter.
TRITON = "triton==3.7.0"


def pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.check_call(cmd, cwd=ROOT)


def has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--test", action="store_true", help="also install the test dependencies")
    ap.add_argument("--bench", action="store_true", help="also install the benchmark peers")
    args = ap.parse_args()

    if not has("torch"):
        pip(TORCH)
    else:
        import torch

        print(f"keeping the installed torch {torch.__version__}", flush=True)
    extra = list(BUILD) + DEMO
    if args.test:
        extra += TEST + BENCH
    if args.bench:
        extra += BENCH
    if (args.test or args.bench) and not has("triton"):
        extra.append(TRITON)
    pip(*dict.fromkeys(extra))
    pip("--no-build-isolation", "-e", ".")
    return 0


if __name__ == "__main__":
    sys.exit(main())
