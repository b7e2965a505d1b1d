"""Generate vqfast/compat/fingerprints.py: the fingerprints of the methods vqfast.compat replaces, in the
upstream releases it supports.

For every entry of vqfast.compat.RECOGNISED and every release given, the script reads the release's
source file, finds the entry's class and each part it replaces (``Recognised.replaces``: a method,
resolved through base classes of the same file; a method of another class of the file; a module
function) and records ``vqfast.compat.node_fingerprint`` of it: the sha256 of its AST without
docstrings, comments, formatting or annotations, the same function ``vqfast.accelerate`` applies to
a live class's source. Only hashes and where they came from are written; no upstream code.

Releases come from:

    --git LIBRARY=GIT_DIR    a clone (bare or not) of a repository without registry releases (VAR,
                             LlamaGen, taming-transformers): every commit that changed the entry's file
                             is a release, labelled "commit <sha12> (<date>)"
    --dist FILE              a wheel or sdist of a registry release (pip download --no-deps), labelled
                             by its version
    --installed              the installed distributions of the registry libraries, labelled by version

A release in which the class, or one of the parts its compat class replaces, is missing is left out
(and named). Every run rewrites the whole table from what it is given, so give it every supported
release; ``--check`` compares instead of writing and exits 1 on a difference. How the committed table
was made (the releases given) is in docs/dropin.md's "How `accelerate` recognises a class".

    python scripts/fingerprints.py --git VAR=path/to/VAR --git LlamaGen=path/to/LlamaGen \\
        --git taming-transformers=path/to/taming-transformers --dist downloads/*.whl --installed
"""
from __future__ import annotations

import argparse
import ast
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import Iterable, Iterator

from vqfast.compat import RECOGNISED, RECOGNISED_BY_KEY, Recognised, node_fingerprint

ROOT = Path(__file__).resolve().parent.parent
TABLE = ROOT / "vqfast" / "compat" / "fingerprints.py"

# Where each entry's class lives in a release, relative to the repository or package root (the first
# that exists; diffusers moved its VAE file in 0.25).
FILES: dict[str, tuple[str, ...]] = {
    "var": ("models/quant.py",),
    "taming": ("taming/modules/vqvae/quantize.py",),
    "taming-v1": ("taming/modules/vqvae/quantize.py",),
    "diffusers": ("diffusers/models/autoencoders/vae.py", "diffusers/models/vae.py"),
    "vector-quantize": ("vector_quantize_pytorch/vector_quantize_pytorch.py",),
    "residual-vq": ("vector_quantize_pytorch/residual_vq.py",),
    "llamagen": ("tokenizer/tokenizer_image/vq_model.py",),
}
# The first release of each library that vqfast.compat follows; older ones given are left out (named).
# VAR: its first two commits (2024-04-05) ran idxBl_to_var_input under autocast(enabled=False) and
# needed v_patch_nums in f_to_idxBl_or_fhat; the compat class follows the training-code release on.
FIRST_COMMIT = {"VAR": "eb9956d97524"}
# vector-quantize-pytorch: vqfast.compat.vector_quantize follows 1.31.6 and 1.32 (1.31.0 - 1.31.2 differ in
# forward and the codebook's methods, 1.31.4 in Codebook.init_embed_; 1.30 and older have no
# Codebook.update_indices). diffusers: every release from 0.20 has the same VectorQuantizer once
# annotations are dropped.
FIRST_VERSION = {"vector-quantize-pytorch": "1.31.6", "diffusers": "0.20.0"}
# The registry distribution of each library that has one.
DISTRIBUTIONS = {"diffusers": "diffusers", "vector-quantize-pytorch": "vector_quantize_pytorch",
                 "taming-transformers": "taming_transformers"}


# ---- reading one file ------------------------------------------------------------------------------------
def _last(nodes: Iterable[ast.stmt], kinds: tuple[type, ...], name: str) -> ast.stmt | None:
    found = None
    for node in nodes:
        if isinstance(node, kinds) and node.name == name:
            found = node  # a later definition replaces an earlier one, as at run time
    return found


_DEFS = (ast.FunctionDef, ast.AsyncFunctionDef)


def _method(tree: ast.Module, cls: ast.ClassDef, name: str, seen: frozenset = frozenset()) -> ast.stmt | None:
    """``name`` in ``cls``'s body, else in its bases that are classes of the same file (in order)."""
    node = _last(cls.body, _DEFS, name)
    if node is not None or cls.name in seen:
        return node
    for base in cls.bases:
        other = _last(tree.body, (ast.ClassDef,), base.id) if isinstance(base, ast.Name) else None
        if other is not None:
            node = _method(tree, other, name, seen | {cls.name})
            if node is not None:
                return node
    return None


def file_fingerprints(source: str, entry: Recognised) -> dict[str, str] | str:
    """{part: fingerprint} of ``entry``'s class in ``source``, or a sentence saying what is missing."""
    tree = ast.parse(source)
    cls = _last(tree.body, (ast.ClassDef,), entry.class_name)
    if cls is None:
        return f"no class {entry.class_name}"
    out = {}
    for part in entry.replaces:
        if part.endswith("()"):
            node = _last(tree.body, _DEFS, part[:-2])
        elif "." in part:
            owner_name, name = part.split(".", 1)
            owner = _last(tree.body, (ast.ClassDef,), owner_name)
            node = _method(tree, owner, name) if owner is not None else None
        else:
            node = _method(tree, cls, part)
        if node is None:
            return f"no {part}"
        out[part] = node_fingerprint(node)
    return out


# ---- releases ------------------------------------------------------------------------------------------
Release = tuple[str, str, str, str]  # (key, release label, file, source)


def _entries(library: str) -> list[Recognised]:
    entries = [e for e in RECOGNISED if e.library == library]
    if not entries:
        known = ", ".join(sorted({e.library for e in RECOGNISED}))
        raise SystemExit(f"error: --git/--dist library must be one of {known}; got {library!r}")
    return entries


def git_releases(library: str, git_dir: Path) -> Iterator[Release]:
    git = ["git", "--git-dir", str(git_dir if (git_dir / "HEAD").exists() else git_dir / ".git")]
    for entry in _entries(library):
        for file in FILES[entry.key]:
            log = subprocess.run(git + ["log", "--format=%H %cs", "--", file], capture_output=True, text=True,
                                 check=True).stdout.split("\n")
            first, past_first = FIRST_COMMIT.get(library), False
            for line in filter(None, log):
                commit, date = line.split()
                if past_first:  # git lists newest first
                    print(f"left out: {library} commit {commit[:12]} ({date}): older than the first supported")
                    continue
                past_first = first is not None and commit.startswith(first)
                shown = subprocess.run(git + ["show", f"{commit}:{file}"], capture_output=True, text=True)
                if shown.returncode == 0:  # the commit that deleted the file has none
                    yield entry.key, f"commit {commit[:12]} ({date})", file, shown.stdout


def _archive_files(path: Path) -> dict[str, bytes]:
    """Member name (the package-relative path: an sdist's top folder and src/ stripped) -> content."""
    out = {}
    if path.suffix == ".whl":
        with zipfile.ZipFile(path) as z:
            for name in z.namelist():
                if name.endswith(".py"):
                    out[name] = z.read(name)
    else:
        with tarfile.open(path) as t:
            for member in t.getmembers():
                if member.isfile() and member.name.endswith(".py"):
                    name = member.name.split("/", 1)[-1]
                    name = name[4:] if name.startswith("src/") else name
                    out[name] = t.extractfile(member).read()
    return out


def dist_releases(path: Path) -> Iterator[Release]:
    match = re.match(r"([A-Za-z0-9_.-]+?)-(\d[^-]*?)(?:-py\d|\.tar\.gz$|\.zip$|-cp\d)", path.name)
    if match is None:
        raise SystemExit(f"error: --dist {path}: not a wheel or sdist name (NAME-VERSION...)")
    dist = match.group(1).replace("-", "_").lower()
    library = next((lib for lib, d in DISTRIBUTIONS.items() if d == dist), None)
    if library is None:
        raise SystemExit(f"error: --dist {path}: {match.group(1)} is not a registry library vqfast recognises")
    first = FIRST_VERSION.get(library)
    if first is not None and _version_key(match.group(2)) < _version_key(first):
        print(f"left out: {library} {match.group(2)}: older than the first supported ({first})")
        return
    files = _archive_files(path)
    for entry in _entries(library):
        file = next((f for f in FILES[entry.key] if f in files), None)
        if file is not None:
            yield entry.key, match.group(2), file, files[file].decode()


def installed_releases() -> Iterator[Release]:
    from importlib import metadata

    for library, dist_name in DISTRIBUTIONS.items():
        try:
            dist = metadata.distribution(dist_name)
        except metadata.PackageNotFoundError:
            continue
        for entry in _entries(library):
            for file in FILES[entry.key]:
                path = Path(dist.locate_file(file))
                if path.is_file():
                    yield entry.key, dist.version, file, path.read_text()
                    break


# ---- the table ----------------------------------------------------------------------------------------------
def collect(releases: Iterable[Release], log=print) -> dict[str, dict[str, tuple[str, str, dict[str, str]]]]:
    """key -> release -> (file, class, {part: fingerprint}); releases missing a part are named in the log."""
    out: dict = {}
    for key, release, file, source in releases:
        entry = RECOGNISED_BY_KEY[key]
        got = file_fingerprints(source, entry)
        if isinstance(got, str):
            log(f"left out: {entry.library} {release} {file}: {got}")
            continue
        out.setdefault(key, {})[release] = (file, entry.class_name, got)
    return out


def render(collected: dict) -> str:
    lines = [
        '"""Fingerprints of what vqfast.compat replaces, in the upstream releases vqfast supports.',
        "",
        "Generated by scripts/fingerprints.py from the released sources (see its docstring): do not edit.",
        "RELEASES: entry key -> release -> (library, file, class), where each fingerprint came from.",
        "FINGERPRINTS: entry key -> replaced part -> sha256 of its normalised source -> the releases that have it.",
        '"""',
        "",
        "RELEASES = {",
    ]
    for entry in RECOGNISED:
        if entry.key not in collected:
            continue
        lines.append(f"    {entry.key!r}: {{")
        for release, (file, cls, _) in collected[entry.key].items():
            lines.append(f"        {release!r}: ({entry.library!r}, {file!r}, {cls!r}),")
        lines.append("    },")
    lines += ["}", "", "FINGERPRINTS = {"]
    for entry in RECOGNISED:
        if entry.key not in collected:
            continue
        lines.append(f"    {entry.key!r}: {{")
        for part in entry.replaces:
            lines.append(f"        {part!r}: {{")
            by_hash: dict[str, list[str]] = {}
            for release, (_, _, parts) in collected[entry.key].items():
                by_hash.setdefault(parts[part], []).append(release)
            for fp, releases in by_hash.items():
                lines.append(f"            {fp!r}: (")
                lines += [f"                {r!r}," for r in releases]
                lines.append("            ),")
            lines.append("        },")
        lines.append("    },")
    lines += ["}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--git", action="append", default=[], metavar="LIBRARY=GIT_DIR")
    parser.add_argument("--dist", action="extend", nargs="+", default=[], type=Path, metavar="FILE")
    parser.add_argument("--installed", action="store_true")
    parser.add_argument("--out", type=Path, default=TABLE)
    parser.add_argument("--check", action="store_true", help="compare with --out instead of writing it")
    args = parser.parse_args(argv)
    releases: list[Release] = []
    for spec in args.git:
        library, sep, path = spec.partition("=")
        if not sep or not Path(path).is_dir():
            raise SystemExit(f"error: --git must be LIBRARY=GIT_DIR with an existing folder; got {spec!r}")
        releases += git_releases(library, Path(path))
    for path in args.dist:
        if not path.is_file():
            raise SystemExit(f"error: --dist {path}: no such file")
        releases += dist_releases(path)
    if args.installed:
        releases += installed_releases()
    # Newest first within a key, as git lists commits; registry versions by version number.
    text = render(collect(_ordered(releases)))
    if args.check:
        same = args.out.is_file() and args.out.read_text() == text
        print(f"{args.out}: {'up to date' if same else 'differs from the given releases'}")
        return 0 if same else 1
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


def _version_key(label: str) -> tuple:
    return tuple(int(p) if p.isdigit() else -1 for p in re.split(r"[.+-]", label))


def _ordered(releases: list[Release]) -> list[Release]:
    """Registry versions newest first (duplicates, as --installed and --dist of one version, once);
    git commits in git's order (newest first)."""
    seen, out = set(), []
    for r in releases:
        if (r[0], r[1]) not in seen:
            seen.add((r[0], r[1]))
            out.append(r)
    git = [r for r in out if r[1].startswith("commit ")]
    registry = sorted((r for r in out if not r[1].startswith("commit ")), key=lambda r: _version_key(r[1]),
                      reverse=True)
    return git + registry


if __name__ == "__main__":
    sys.exit(main())
