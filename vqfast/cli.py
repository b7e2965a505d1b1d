"""The ``vqfast`` command: one subcommand per module, imported only when used.

Each subcommand module defines ``add_arguments(parser)`` and ``main(args) -> int``.
"""
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "demo": ("vqfast.demo", "quantise patches of real photographs and print a backend timing table"),
    "train": ("vqfast.train", "train a multi-scale VQ-VAE tokenizer on bundled real images"),
    "tokenize": ("vqfast.tokenize", "turn images into multi-scale index maps and back with a trained checkpoint"),
    "bench": ("vqfast.bench.cli", "benchmark nearest-codeword search, training steps and memory against peers"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vqfast", description="Fast vector quantization for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module_name)
        importlib.import_module(module_name).add_arguments(p)
    args = parser.parse_args(argv)
    return int(importlib.import_module(args._module).main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
