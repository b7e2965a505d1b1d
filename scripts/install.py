#!/usr/bin/env python3
"""Install vqfast and what it needs into the current Python environment.

    python scripts/install.py           # library + the main job's dependencies
    python scripts/install.py --test    # ... plus the test suite's dependencies
    python scripts/install.py --bench   # ... plus the benchmark peers

torch: an installed torch (CPU or CUDA build) is kept as it is; when none is installed, the CPU build
torch==2.13.0 is installed. No requirement below names torch, so pip never replaces it. GPU users
install the CUDA build of torch first, and the nvcc of its CUDA version (the README's GPU section).
The extension vqfast._C is compiled against that torch (pip install --no-build-isolation -e .); the
last lines say which backends resulted and, for CUDA, which GPU architectures or why none.
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
DEMO = ["scikit-image", "scikit-learn", "matplotlib", "tqdm", "pillow"]
TEST = ["pytest", "hypothesis", "faiss-cpu", "pytest-benchmark", "diffusers==0.42.1"]
# The released taming-transformers (0.0.1, its v1 VectorQuantizer only) is a test reference. Its metadata
# names torch, torchvision and pytorch-lightning, which must not replace the installed torch, and the
# module the tests import (taming/modules/vqvae/quantize.py) needs only torch: installed without deps.
TEST_NO_DEPS = ["taming-transformers==0.0.1"]
BENCH = ["pytest-benchmark", "faiss-cpu", "vector-quantize-pytorch==1.32.0", "matplotlib"]
# Triton ships with CUDA builds of torch; on CPU-only machines it runs kernels in its interpreter.
TRITON = "triton==3.7.0"


def pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.check_call(cmd, cwd=ROOT)


# Run in a fresh interpreter after the install: what the build produced.
REPORT = """
import torch, vqfast
from vqfast import backends
print(f"vqfast {vqfast.__version__} on torch {torch.__version__}: "
      f"backends for CPU tensors {vqfast.available_backends('cpu')}")
reason = backends.REGISTRY["cuda"].unavailable_reason()
print("cuda backend: " + (f"available, kernels for {', '.join(vqfast.cuda_archs() or ('unrecorded targets',))}"
                          if reason is None else f"unavailable: {reason}"))
"""


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
    if args.test:
        pip("--no-deps", *TEST_NO_DEPS)
    pip("--no-build-isolation", "-e", ".")
    subprocess.check_call([sys.executable, "-c", REPORT], cwd=ROOT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
