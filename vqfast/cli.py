"""The ``vqfast`` command: one subcommand per module, imported only when used.

Each subcommand module defines ``add_arguments(parser)`` and ``main(args) -> int``; only the chosen
subcommand's module is imported, so ``vqfast --help`` (and ``vqfast train --help``) import no torch.
Warnings print as one plain line each (``warning: ...``). A user error
(a bad argument, a missing or unreadable input, an output folder that does not exist) is an
``InputError``: the command prints one line naming the argument or file and exits with status 2,
as argparse does for its own errors. Subcommands check their inputs before any work starts.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from vqfast.errors import InputError  # re-exported: `from vqfast.cli import InputError` keeps working

__all__ = ["InputError", "SUBCOMMANDS", "USAGE_EXIT", "main"]

SUBCOMMANDS = {
    "demo": ("vqfast.demo", "quantise patches of real photographs and print a backend timing table"),
    "train": ("vqfast.train.cli", "train a multi-scale VQ-VAE tokenizer on a folder of images or the bundled ones"),
    "tokenize": ("vqfast.tokenize", "turn images into multi-scale index maps and back with a trained checkpoint"),
    "bench": ("vqfast.bench.cli", "benchmark nearest-codeword search, training steps and memory against peers"),
}
USAGE_EXIT = 2


class _Parser(argparse.ArgumentParser):
    # argparse prints its usage block before the error; one line keeps every user error alike.
    def error(self, message: str):
        self.exit(USAGE_EXIT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _version() -> str:
    import torch

    import vqfast

    backends = ", ".join(vqfast.available_backends())
    return f"vqfast {vqfast.__version__} (torch {torch.__version__}, backends: {backends})"


class _VersionAction(argparse.Action):
    # The version string imports torch: built only when asked for, so `vqfast --help` stays fast.
    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(_version())
        parser.exit()


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    # A user reads what happened, not where in vqfast's source the warning was raised.
    print(f"warning: {message}", file=sys.stderr if file is None else file)


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="vqfast", description="Fast vector quantization for PyTorch.")
    parser.add_argument("--version", action=_VersionAction, help="print the vqfast and torch versions and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")
    argv = sys.argv[1:] if argv is None else list(argv)
    # The subcommand is the first word that is not an option (the dispatcher's options take no value).
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module_name)
        if name == chosen:
            importlib.import_module(module_name).add_arguments(p)
    args = parser.parse_args(argv)
    shown, warnings.showwarning = warnings.showwarning, _show_warning
    try:
        return int(importlib.import_module(args._module).main(args) or 0)
    except InputError as e:
        print(f"vqfast {args.command}: error: {e}", file=sys.stderr)
        return USAGE_EXIT
    finally:
        warnings.showwarning = shown


if __name__ == "__main__":
    sys.exit(main())
