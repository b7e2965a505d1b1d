"""Recognition by content: the normalised-source fingerprints, the generated table
(vqfast/compat/fingerprints.py) against the releases' sources, and accelerate on vendored, edited,
unreadable and trusted copies of each supported class.

Copies of the registry libraries' classes (diffusers, vector-quantize-pytorch, taming-transformers 0.0.1)
are made at test time from the installed package's source and written to a module file under tmp_path
(so that inspect can read them). VAR, LlamaGen and taming-transformers' VectorQuantizer2 are not on the
registry and no upstream code is kept in this repository: the tests that read their sources run where
a clone is named by VQFAST_VAR_GIT, VQFAST_LLAMAGEN_GIT or VQFAST_TAMING_GIT (a git directory; the
table was generated from those), and are skipped elsewhere (CI); the rules themselves are checked for
those entries on a class made here, against a table patched to know it.
"""
from __future__ import annotations

import ast
import importlib.util
import inspect
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import vqfast
from tests.helpers import load_script
from vqfast.compat import (
    RECOGNISED,
    RECOGNISED_BY_KEY,
    identify,
    part_fingerprint,
    recognise,
    source_fingerprint,
)
from vqfast.compat import fingerprints as table

ROOT = Path(__file__).resolve().parent.parent


def _script():
    return load_script("scripts/fingerprints.py", "vqfast_fingerprints_script")


# ---- the normaliser -----------------------------------------------------------------------------------------
def test_fingerprint_ignores_docstrings_comments_formatting_and_annotations():
    a = '''
    def forward(self, z: "torch.Tensor", beta: float = 0.25) -> tuple:
        """Quantise z."""
        d = z.pow(2).sum(1)   # squared norms
        out: "torch.Tensor" = d * beta
        return out, (d,
                     beta)
    '''
    b = '''
def forward(self, z, beta=0.25):
    d = z.pow(2).sum(1)
    out = d * beta
    return (out, (d, beta))
'''
    assert source_fingerprint(textwrap.indent(textwrap.dedent(a), "    ")) == source_fingerprint(b)
    assert source_fingerprint(a) == source_fingerprint(b)
    changed = b.replace("0.25", "0.5")
    assert source_fingerprint(changed) != source_fingerprint(b)
    assert source_fingerprint(b.replace("d * beta", "beta * d")) != source_fingerprint(b)
    # A multi-line string less indented than the def (which defeats textwrap.dedent) still parses.
    odd = '    def f(self):\n        s = """\nx"""\n        return s\n'
    assert source_fingerprint(odd) == source_fingerprint('def f(self):\n    s = """\nx"""\n    return s\n')


def test_fingerprint_is_the_same_from_a_file_and_from_a_live_class(tmp_path, monkeypatch):
    source = textwrap.dedent('''
        import functools
        import torch

        def deco(fn):
            @functools.wraps(fn)
            def wrapper(*args, **kwargs):
                return fn(*args, **kwargs)
            return wrapper

        class Base(torch.nn.Module):
            def get_codebook_entry(self, indices, shape):
                """Rows of the codebook."""
                return indices * 2

        class VectorQuantizer2(Base):
            @deco
            def forward(self, z):
                return z + 1  # one
    ''')
    module = _load(tmp_path, monkeypatch, "fp_live_and_file", source)
    script = _script()
    entry = RECOGNISED_BY_KEY["taming"]
    fake = type(entry)(entry.library, entry.class_name, entry.module_suffixes, entry.compat, "t",
                       ("forward", "get_codebook_entry"))
    from_file = script.file_fingerprints(source, fake)
    for part in ("forward", "get_codebook_entry"):  # inherited from a base of the same file, and decorated
        assert part_fingerprint(module.VectorQuantizer2, part) == from_file[part]
    assert part_fingerprint(module.VectorQuantizer2, "remap_to_used") == ""  # none


# ---- the table -------------------------------------------------------------------------------------------------
def test_the_table_lists_each_librarys_supported_releases():
    for entry in RECOGNISED:
        releases = table.RELEASES.get(entry.key)
        assert releases, f"{entry.key}: no release in the table"
        assert set(table.FINGERPRINTS[entry.key]) == set(entry.replaces), entry.key
        for part, by_hash in table.FINGERPRINTS[entry.key].items():
            listed = [r for rs in by_hash.values() for r in rs]
            assert sorted(listed) == sorted(releases), (entry.key, part)  # each release once per part
        for library, _file, cls in releases.values():
            assert (library, cls) == (entry.library, entry.class_name)
    # The releases vqfast follows (docs/dropin.md names them).
    assert {"0.20.0", "0.30.0", "0.42.1"} <= set(table.RELEASES["diffusers"])
    assert set(table.RELEASES["vector-quantize"]) == set(table.RELEASES["residual-vq"]) == {"1.31.6", "1.32.0"}
    assert "0.0.1" in table.RELEASES["taming-v1"]
    assert any(r.startswith("commit a5cf0a16624d") for r in table.RELEASES["var"])
    assert any(r.startswith("commit 0b3a62be43fd") for r in table.RELEASES["llamagen"])


def test_the_table_is_what_the_script_renders():
    """The committed file is the script's rendering of its own content (nobody edited it by hand)."""
    script = _script()
    collected = {}
    for key, releases in table.RELEASES.items():
        for release, (_library, file, cls) in releases.items():
            parts = {part: next(h for h, rs in table.FINGERPRINTS[key][part].items() if release in rs)
                     for part in RECOGNISED_BY_KEY[key].replaces}
            collected.setdefault(key, {})[release] = (file, cls, parts)
    assert script.render(collected) == (ROOT / "vqfast" / "compat" / "fingerprints.py").read_text()


_INSTALLED = [  # (entry key, module, class)
    ("diffusers", "diffusers.models.autoencoders.vae", "VectorQuantizer"),
    ("vector-quantize", "vector_quantize_pytorch.vector_quantize_pytorch", "VectorQuantize"),
    ("residual-vq", "vector_quantize_pytorch.residual_vq", "ResidualVQ"),
    ("taming-v1", "taming.modules.vqvae.quantize", "VectorQuantizer"),
]


def _installed_class(module: str, name: str) -> type:
    return getattr(pytest.importorskip(module), name)


@pytest.mark.parametrize("key,module,name", _INSTALLED, ids=[k for k, _, _ in _INSTALLED])
def test_the_installed_release_matches_the_table(key, module, name):
    cls = _installed_class(module, name)
    found = identify(cls)
    assert found is not None and (found.entry.key, found.status) == (key, "known"), (
        f"the installed {module}.{name} does not match a release in vqfast/compat/fingerprints.py: "
        f"{found}; regenerate the table with scripts/fingerprints.py if vqfast supports it")


def test_regenerating_from_the_installed_packages_gives_the_tables_entries():
    """Runs wherever a registry library is installed: its release's entries are regenerated from the
    installed source files and must equal the table's."""
    script = _script()
    collected = script.collect(script.installed_releases(), log=lambda line: None)
    if not collected:
        pytest.skip("none of diffusers, vector-quantize-pytorch, taming-transformers is installed")
    for key, releases in collected.items():
        for release, (file, cls, parts) in releases.items():
            assert table.RELEASES[key].get(release) == (RECOGNISED_BY_KEY[key].library, file, cls), (key, release)
            for part, fp in parts.items():
                assert release in table.FINGERPRINTS[key][part].get(fp, ()), (key, release, part)


_GIT_SOURCES = {"VAR": "VQFAST_VAR_GIT", "LlamaGen": "VQFAST_LLAMAGEN_GIT", "taming-transformers": "VQFAST_TAMING_GIT"}


@pytest.mark.parametrize("library", list(_GIT_SOURCES))
def test_regenerating_from_the_upstream_repositories_gives_the_table(library):
    """Runs where a clone of the repository is named by VQFAST_VAR_GIT / VQFAST_LLAMAGEN_GIT /
    VQFAST_TAMING_GIT (skipped in CI, which has no upstream sources): every supported commit's entries
    regenerate equal to the table's, and the table lists no other commit."""
    git_dir = os.environ.get(_GIT_SOURCES[library])
    if not git_dir:
        pytest.skip(f"{_GIT_SOURCES[library]} is not set")
    script = _script()
    collected = script.collect(script.git_releases(library, Path(git_dir)), log=lambda line: None)
    for entry in (e for e in RECOGNISED if e.library == library):
        got = collected[entry.key]
        in_table = {r for r in table.RELEASES[entry.key] if r.startswith("commit ")}
        assert set(got) == in_table, entry.key
        for release, (file, cls, parts) in got.items():
            assert table.RELEASES[entry.key][release] == (library, file, cls)
            for part, fp in parts.items():
                assert release in table.FINGERPRINTS[entry.key][part][fp], (entry.key, release, part)


# ---- copies: vendored, edited, unreadable, trusted -----------------------------------------------------------
def _load(tmp_path: Path, monkeypatch, name: str, source: str):
    """``source`` as the module ``name``, from a real file (inspect reads it back)."""
    path = tmp_path / f"{name.replace('.', '_')}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


def _edit_a_constant(source: str, class_name: str, method: str = "forward") -> str:
    """``source`` with one numeric constant of ``class_name.method`` changed (the fork's edit)."""
    tree = ast.parse(textwrap.dedent(source))
    cls = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name][-1]
    fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == method)
    const = next(n for n in ast.walk(fn) if isinstance(n, ast.Constant) and type(n.value) in (int, float)
                 and not isinstance(n.value, bool))
    const.value = const.value + 1
    return ast.unparse(tree)


def _copy_module(original: type, class_source: str) -> str:
    """A module holding ``class_source`` with the names of ``original``'s module (its imports and helpers),
    as a vendored copy of the file has them."""
    return (f"import sys as _sys\nglobals().update({{k: v for k, v in vars(_sys.modules[{original.__module__!r}]).items()"
            f" if not k.startswith('__')}})\n\n" + textwrap.dedent(class_source) + "\n")


def _build(key: str, cls: type) -> torch.nn.Module:
    torch.manual_seed(0)
    if key == "diffusers":
        return cls(n_e=16, vq_embed_dim=4, beta=0.25)
    if key == "taming-v1":
        return cls(16, 4, 0.25)
    if key == "vector-quantize":
        return cls(dim=4, codebook_size=16)
    return cls(dim=4, num_quantizers=2, codebook_size=16)


def _input(key: str) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 4, 3, 3) if key in ("diffusers", "taming-v1") else torch.randn(2, 6, 4)


def _lines(capsys) -> list[str]:
    return capsys.readouterr().out.strip().splitlines()


@pytest.mark.parametrize("key,module,name", _INSTALLED, ids=[k for k, _, _ in _INSTALLED])
def test_a_vendored_copy_is_converted_and_an_edited_one_left_with_the_reason(key, module, name, tmp_path,
                                                                            monkeypatch, capsys):
    original = _installed_class(module, name)
    source = inspect.getsource(original)
    copy_module = _load(tmp_path, monkeypatch, f"thirdparty_{key.replace('-', '_')}.quant", _copy_module(original, source))
    copy = getattr(copy_module, name)
    entry = RECOGNISED_BY_KEY[key]
    assert not entry.matches(copy)  # not the library's module path

    vendored = _build(key, copy)
    reference = _build(key, original)
    vqfast.accelerate(vendored, backend="torch", verbose=True)
    assert isinstance(vendored, entry.compat_class()) and isinstance(vendored, copy)
    assert _lines(capsys)[0] == (f"vqfast.accelerate: (the model): {entry.library} {name} replaced "
                                 f"(backend='torch', precision='exact')")
    vendored.eval(), reference.eval()
    with torch.no_grad():
        got, want = vendored(_input(key)), reference(_input(key))
    torch.testing.assert_close(got[0], want[0])

    # A fork keeps the library's file (its module path ends as the library's) and edits the forward.
    edited_source = _edit_a_constant(source, name)
    edited_module = _load(tmp_path, monkeypatch, f"myfork.{entry.module_suffixes[0]}",
                          _copy_module(original, edited_source))
    edited_cls = getattr(edited_module, name)
    fork = _build(key, edited_cls)
    vqfast.accelerate(torch.nn.Sequential(fork), verbose=True)
    assert type(fork) is edited_cls
    lines = _lines(capsys)
    assert lines[0] == (
        f"vqfast.accelerate: 0: {edited_module.__name__}.{name} looks like a modified {entry.library} {name}: "
        f"forward differs from every {entry.library} release vqfast knows, so it is left on its own code "
        f"(trust={{{name}: {key!r}}} converts it)")
    if key == "residual-vq":  # its layers are the library's own VectorQuantize: converted on their own
        assert lines[1:] == [f"vqfast.accelerate: 0.layers.{i}: vector-quantize-pytorch VectorQuantize replaced "
                             f"(backend='auto', precision='exact')" for i in range(2)]
    else:
        assert lines[1:] == ["vqfast.accelerate: nothing converted in Sequential (torch.nn.modules.container): "
                             "its 1 recognised quantizer(s) are left on their original code"]
    assert recognise(fork) is None

    # At the user's word: trust= converts the edited class.
    vqfast.accelerate(fork, verbose=True, trust={edited_cls: key})
    assert isinstance(fork, entry.compat_class()) and isinstance(fork, edited_cls)
    assert _lines(capsys)[0] == (
        f"vqfast.accelerate: (the model): {entry.library} {name} replaced (backend='auto', precision='exact'): "
        f"trusted, trust= names {edited_module.__name__}.{name} as {key!r}")
    # A second call needs no trust= again: it is converted already.
    vqfast.accelerate(fork, backend="torch", verbose=True)
    assert "already accelerated (backend='torch'" in _lines(capsys)[0]


def test_a_class_whose_source_cannot_be_read_is_left_like_a_modified_one(capsys):
    original = _installed_class("diffusers.models.autoencoders.vae", "VectorQuantizer")
    namespace = dict(vars(sys.modules[original.__module__]), __name__="__main__")  # as in a notebook
    exec(compile(textwrap.dedent(inspect.getsource(original)), "<notebook cell>", "exec"), namespace)
    made = namespace["VectorQuantizer"]
    vq = made(n_e=16, vq_embed_dim=4, beta=0.25)
    vqfast.accelerate(vq, verbose=True)
    assert type(vq) is made
    line = _lines(capsys)[0]
    assert line.startswith(f"vqfast.accelerate: (the model): {made.__module__}.VectorQuantizer left on its own "
                           f"code: its source cannot be read, so vqfast cannot tell it from a modified ")
    assert "diffusers VectorQuantizer" in line and "'diffusers'" in line
    vqfast.accelerate(vq, trust={made: "diffusers"})
    assert isinstance(vq, RECOGNISED_BY_KEY["diffusers"].compat_class())


def test_the_installed_version_stands_in_for_unreadable_source_of_the_installed_class(monkeypatch, capsys):
    from importlib import metadata

    original = _installed_class("diffusers.models.autoencoders.vae", "VectorQuantizer")
    version = metadata.version("diffusers")

    def unreadable(obj):
        raise OSError("could not get source code")

    monkeypatch.setattr(inspect, "getsource", unreadable)
    vq = original(n_e=16, vq_embed_dim=4, beta=0.25)
    found = identify(original)
    if version not in table.RELEASES["diffusers"]:
        assert found.status == "unreadable"
        pytest.fail(f"the installed diffusers {version} is not in the table: regenerate it")
    vqfast.accelerate(vq, verbose=True)
    assert isinstance(vq, RECOGNISED_BY_KEY["diffusers"].compat_class())
    assert _lines(capsys) == [
        "vqfast.accelerate: (the model): diffusers VectorQuantizer replaced (backend='auto', precision='exact'): "
        f"its source cannot be read; the installed diffusers {version} is a release vqfast knows"]
    # A copy elsewhere (not the distribution's own module) gets no such stand-in.
    elsewhere = type("VectorQuantizer", (original,), {"__module__": "mine.vae"})
    assert identify(elsewhere).status == "unreadable"
    # Nor does an installed release the table does not list.
    monkeypatch.setitem(table.RELEASES, "diffusers", {})
    found = identify(original)
    assert found.status == "unreadable" and RECOGNISED_BY_KEY["diffusers"] in found.candidates


def test_a_class_of_ones_own_that_shares_a_name_is_not_recognised(capsys):
    class VectorQuantizer(torch.nn.Module):
        def forward(self, z):
            return z

    vqfast.accelerate(torch.nn.Sequential(VectorQuantizer()), verbose=True)
    assert f"0: {__name__}.VectorQuantizer left: not a class vqfast recognises" in _lines(capsys)[0]


# ---- the entries whose sources are not here: the rules on a class made here -----------------------------------
_MADE_HERE = {
    "var": ("VectorQuantizer2", "x = f_BChw * 0.25"),
    "taming": ("VectorQuantizer2", "x = z * 0.25"),
    "llamagen": ("VectorQuantizer", "x = z * 0.25"),
}


def _made_here_source(key: str, scale: str = "0.25") -> str:
    name, _ = _MADE_HERE[key]
    entry = RECOGNISED_BY_KEY[key]
    lines = ["import torch", "", f"class {name}(torch.nn.Module):"]
    for part in entry.replaces:
        if part.endswith("()"):
            continue
        lines += [f"    def {part}(self, z=None):", f"        return {part!r}, {scale}", ""]
    lines += [f"def {p[:-2]}(affinity):\n    return affinity * {scale}\n" for p in entry.replaces if p.endswith("()")]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("key", list(_MADE_HERE))
def test_recognition_rules_for_entries_without_sources_here(key, tmp_path, monkeypatch):
    """A class made here stands for the upstream one: the table is patched to know its source, then a
    copy under another path is recognised, a copy with one constant changed is not (naming the
    method), and trust= accepts the latter."""
    script = _script()
    name, _ = _MADE_HERE[key]
    source = _made_here_source(key)
    entry = RECOGNISED_BY_KEY[key]
    prints = script.file_fingerprints(source, entry)
    monkeypatch.setitem(table.FINGERPRINTS, key, {p: {fp: ("made here",)} for p, fp in prints.items()})
    vendored = getattr(_load(tmp_path, monkeypatch, f"vendor_{key}.quant", source), name)
    found = identify(vendored)
    assert (found.entry.key, found.status) == (key, "known")
    forked_source = source.replace(f"return 'forward', 0.25", "return 'forward', 0.5")
    forked = getattr(_load(tmp_path, monkeypatch, f"fork_{key}", forked_source), name)
    found = identify(forked)
    assert (found.entry.key, found.status, found.differing) == (key, "modified", ("forward",))
    if any(p.endswith("()") for p in entry.replaces):  # a module function the compat class does itself
        helper = next(p for p in entry.replaces if p.endswith("()"))
        edited = source.replace("return affinity * 0.25", "return affinity * 0.5")
        other = getattr(_load(tmp_path, monkeypatch, f"fork2_{key}", edited), name)
        assert identify(other).differing == (helper,)
    assert identify(forked, {forked: key}).status == "trusted"
    # A copy without one of the methods: named as missing.
    last = next(p for p in reversed(entry.replaces) if not p.endswith("()") and p != "forward")
    cut = source.replace(f"    def {last}(self, z=None):\n        return {last!r}, 0.25\n", "")
    lacking = getattr(_load(tmp_path, monkeypatch, f"fork3_{key}", cut), name)
    found = identify(lacking)
    assert (found.status, found.differing, found.missing) == ("modified", (last,), (last,))
    line = vqfast.compat._left_line(lacking, found)
    assert f": it has no {last}, so it is left on its own code" in line


# ---- the real upstream classes, where their sources are here ---------------------------------------------------
_UPSTREAM = [  # (library, entry key, file, class)
    ("VAR", "var", "models/quant.py", "VectorQuantizer2"),
    ("taming-transformers", "taming", "taming/modules/vqvae/quantize.py", "VectorQuantizer2"),
    ("LlamaGen", "llamagen", "tokenizer/tokenizer_image/vq_model.py", "VectorQuantizer"),
]

_UPSTREAM_ARGS = {"var": (16, 4, False, 0.25, 0, (1, 2)), "taming": (16, 4, 0.25),
                  "llamagen": (16, 4, 0.25, 0.0, True, True)}


@pytest.mark.parametrize("library,key,file,name", _UPSTREAM, ids=[k for _, k, _, _ in _UPSTREAM])
def test_upstream_class_vendored_is_recognised_and_edited_is_left(library, key, file, name, tmp_path, monkeypatch):
    """Runs where VQFAST_VAR_GIT / VQFAST_TAMING_GIT / VQFAST_LLAMAGEN_GIT names a clone (skipped in CI):
    the newest commit's file, loaded under another module path, is recognised; with one constant of the
    class's forward changed it looks modified."""
    git_dir = os.environ.get(_GIT_SOURCES[library])
    if not git_dir:
        pytest.skip(f"{_GIT_SOURCES[library]} is not set")
    newest = next(r for r in table.RELEASES[key] if r.startswith("commit ")).split()[1]
    source = subprocess.run(["git", "--git-dir", git_dir, "show", f"{newest}:{file}"], capture_output=True,
                            text=True, check=True).stdout
    # Only the module's own imports that exist here are kept (VAR imports its dist.py; LlamaGen its utilities).
    tree = ast.parse(source)
    keep = []
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            try:
                exec(compile(ast.Module([node], []), "<imports>", "exec"), {})
            except ImportError:
                continue
        keep.append(node)
    vendored_source = ast.unparse(ast.Module(keep, []))  # formatting and comments differ: no matter
    vendored = getattr(_load(tmp_path, monkeypatch, f"vendored_{key}.quant", vendored_source), name)
    found = identify(vendored)
    assert (found.entry.key, found.status) == (key, "known")
    torch.manual_seed(0)
    module = vendored(*_UPSTREAM_ARGS[key])
    vqfast.accelerate(module)
    assert isinstance(module, RECOGNISED_BY_KEY[key].compat_class()) and isinstance(module, vendored)
    edited = _edit_a_constant(vendored_source, name)
    forked = getattr(_load(tmp_path, monkeypatch, f"forked_{key}", edited), name)
    found = identify(forked)
    assert (found.entry.key, found.status) == (key, "modified") and "forward" in found.differing


def test_trust_names_the_argument_when_wrong():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(TypeError, match="^trust must be a dict"):
        vqfast.accelerate(model, trust=[torch.nn.Linear])
    with pytest.raises(TypeError, match="^trust's keys must be nn.Module classes"):
        vqfast.accelerate(model, trust={"Linear": "var"})
    with pytest.raises(ValueError, match=r"^trust\[Linear\] must be one of 'var', 'taming', 'taming-v1', "
                                         r"'diffusers', 'vector-quantize', 'residual-vq', 'llamagen'; got 'VAR'$"):
        vqfast.accelerate(model, trust={torch.nn.Linear: "VAR"})
