#!/usr/bin/env python3
"""Install vqfast and what it needs into the current Python environment.

    python scripts/install.py           # library + the trainer's dependencies (extra "train")
    python scripts/install.py --test    # ... plus the test suite's dependencies (extra "test")
    python scripts/install.py --bench   # ... plus the benchmark peers (extra "bench")

The packages come from the one place they are declared: setup.py's INSTALL_REQUIRES and
EXTRAS_REQUIRE (the extra "train" always; "test" and "bench" with their flags), and pyproject.toml's
build requirements, which `--no-build-isolation` needs present. So this installs what
`pip install --no-build-isolation -e ".[train,test]"` would, plus the two that no requirement can say
(below).

torch: an installed torch (CPU or CUDA build) is kept as it is; when none is installed, the CPU build
torch==2.13.0 is installed. No requirement names torch, so pip never replaces it. GPU users
install the CUDA build of torch first, and the nvcc of its CUDA version (docs/gpu.md).
The extension vqfast._C is compiled against that torch (pip install --no-build-isolation -e .); the
last lines say which backends resulted and, for CUDA, which GPU architectures or why none.
"""
from __future__ import annotations

import argparse
import ast
import importlib.util
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETUP = os.path.join(ROOT, "setup.py")
TORCH = "torch==2.13.0"
# The released taming-transformers (0.0.1, its v1 VectorQuantizer only) is a test reference. Its metadata
# names torch, torchvision and pytorch-lightning, which must not replace the installed torch, and the
# module the tests import (taming/modules/vqvae/quantize.py) needs only torch: installed without deps.
TEST_NO_DEPS = ["taming-transformers==0.0.1"]
# Triton ships with CUDA builds of torch (which pin their own release); on CPU-only machines it runs
# kernels in its interpreter: installed for the tests and benchmarks only where none is installed.
TRITON = "triton==3.7.0"


def build_requires() -> list[str]:
    """pyproject.toml's [build-system] requires: what a build without isolation needs installed."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: pip's own copy of the same parser
        from pip._vendor import tomli as tomllib
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return list(tomllib.load(f)["build-system"]["requires"])


def declared() -> tuple[list[str], dict[str, list[str]]]:
    """(INSTALL_REQUIRES, EXTRAS_REQUIRE) as setup.py assigns them, read from its text (running
    setup.py would need torch and would plan the build)."""
    with open(SETUP, encoding="utf-8") as f:
        tree = ast.parse(f.read(), SETUP)
    found = {}
    for node in tree.body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                and node.targets[0].id in ("INSTALL_REQUIRES", "EXTRAS_REQUIRE")):
            found[node.targets[0].id] = ast.literal_eval(node.value)
    missing = {"INSTALL_REQUIRES", "EXTRAS_REQUIRE"} - found.keys()
    if missing:
        raise SystemExit(f"scripts/install.py: setup.py no longer assigns {' and '.join(sorted(missing))} "
                         "as a plain literal at module level")
    return found["INSTALL_REQUIRES"], found["EXTRAS_REQUIRE"]


def requirements(extras: list[str]) -> list[str]:
    """setup.py's install_requires and the named extras, an extra's "vqfast[a,b]" replaced by the
    requirements of a and b; in order, each once."""
    install_requires, table = declared()
    out, seen = list(install_requires), set()

    def add(extra: str) -> None:
        if extra not in table:
            raise SystemExit(f"scripts/install.py: setup.py declares no extra {extra!r} (it has {sorted(table)})")
        if extra in seen:
            return
        seen.add(extra)
        for req in table[extra]:
            own = re.fullmatch(r"vqfast\[([^\]]+)\]", req.replace(" ", ""))
            if own:
                for sub in own.group(1).split(","):
                    add(sub)
            else:
                out.append(req)

    for extra in extras:
        add(extra)
    return list(dict.fromkeys(out))


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
if hasattr(backends, "validation_summary"):
    print(backends.validation_summary())
"""


def has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def chosen_extras(args: argparse.Namespace) -> list[str]:
    return ["train"] + ["test"] * args.test + ["bench"] * args.bench


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
    extra = build_requires() + requirements(chosen_extras(args))
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
