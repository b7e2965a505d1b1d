"""Packaging: what setup.py says and decides, the dependencies declared once, the licence in the
metadata, and a built wheel that works in a fresh virtual environment.

setup.py is run with setuptools.setup replaced by a recorder, so its decisions (the CUDA status line,
the nvcc flags, the metadata, the extras) are checked in a second, without compiling; so is what
scripts/install.py would install. The wheel tests are slow tier (`--slow`): they compile the
extension from scratch (about 3.5 CPU-minutes, 2 minutes of a 2-core machine), make a fresh virtual
environment, install torch into it from the wheel on disk (pip's find-links; never downloaded), then
the wheel with its "train" extra from the registry, and run `vqfast train`, `vqfast tokenize` and
`vqfast demo` there (about 3 more minutes here):

    python -m pytest tests/test_packaging.py -q --slow -k wheel
"""
from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import runpy
import shutil
import subprocess
import sys
import textwrap
import venv
import zipfile

import pytest
import setuptools
import torch
import torch.utils.cpp_extension

from tests.helpers import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETUP = os.path.join(ROOT, "setup.py")
INSTALL_SCRIPT = os.path.join(ROOT, "scripts", "install.py")
CUDA_HOME = next((h for h in (os.environ.get("CUDA_HOME"), "/usr/local/cuda")
                  if h and os.path.exists(os.path.join(h, "bin", "nvcc"))
                  and os.path.exists(os.path.join(h, "include", "cuda_runtime_api.h"))), None)


@pytest.fixture
def run_setup(monkeypatch):
    """Run setup.py as a module would be, in this process; returns (its globals, the setup() keywords)."""

    def run(cuda: str | None = None, cuda_home: str | None = None, env: dict | None = None, path: str | None = None):
        for var in ("VQFAST_SKIP_CUDA_BUILD", "VQFAST_CUDA_ARCHS", "TORCH_CUDA_ARCH_LIST"):
            monkeypatch.delenv(var, raising=False)
        recorded = {}
        monkeypatch.setattr(setuptools, "setup", lambda **kwargs: recorded.update(kwargs))
        monkeypatch.setattr(torch.version, "cuda", cuda)
        monkeypatch.setattr(torch.utils.cpp_extension, "CUDA_HOME", cuda_home)
        for key, value in (env or {}).items():
            monkeypatch.setenv(key, value)
        if path is not None:
            monkeypatch.setenv("PATH", path)
        return runpy.run_path(SETUP, run_name="setup"), recorded

    return run


def test_licence_file_and_metadata(run_setup):
    text = open(os.path.join(ROOT, "LICENSE"), encoding="utf-8").read()
    assert text.startswith("MIT License") and "WITHOUT WARRANTY OF ANY KIND" in text
    _, kwargs = run_setup()
    assert kwargs["license"] == "MIT" and kwargs["license_files"] == ["LICENSE"]
    assert "torch" not in " ".join(kwargs["install_requires"])  # an installed CPU or CUDA torch is kept


def packaged_python_files(packages) -> list[str]:
    """The .py files setup.py puts in the wheel (its packages' folders, relative to the checkout)."""
    files = []
    for package in packages:
        folder = os.path.join(ROOT, *package.split("."))
        files += [os.path.join(package.replace(".", "/"), name) for name in sorted(os.listdir(folder))
                  if name.endswith(".py")]
    return files


def test_the_package_ships_no_planted_bugs(run_setup):
    """The planted bugs of tests/test_mutations.py are test code: tests/mutations.py, outside the package."""
    _, kwargs = run_setup()
    assert "vqfast.testing" in kwargs["packages"] and not any(p.startswith("tests") for p in kwargs["packages"])
    files = packaged_python_files(kwargs["packages"])
    assert "vqfast/testing/oracle.py" in files and "vqfast/testing/mutations.py" not in files
    planted = [f for f in files if "VQFAST_MUTATION" in open(os.path.join(ROOT, f), encoding="utf-8").read()]
    assert not planted, planted
    assert os.path.exists(os.path.join(ROOT, "tests", "mutations.py"))


# ---------------------------------------------------------------------------------------------
# Dependencies: declared once, in setup.py


def load_install_script():
    return load_script(os.path.relpath(INSTALL_SCRIPT, ROOT), "vqfast_install_script")


def requirement_name(req: str) -> str:
    """The normalised distribution name of a requirement string ("Foo_bar[x]==1" -> "foo-bar")."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", req).group(0)).lower()


def test_extras_are_declared_once_and_install_script_reads_them(run_setup):
    _, kwargs = run_setup()
    install = load_install_script()
    assert install.declared() == (kwargs["install_requires"], kwargs["extras_require"])
    extras = kwargs["extras_require"]
    assert set(extras) == {"train", "test", "bench"}
    assert {requirement_name(r) for r in extras["train"]} == {
        "pillow", "scikit-image", "scikit-learn", "matplotlib", "tqdm"}
    # The test extra brings the trainer's and the benchmarks' requirements along.
    assert set(install.requirements(["train", "bench"])) <= set(install.requirements(["test"]))
    # scripts/install.py keeps no list of its own: none of the declared names appears in its code.
    declared = {requirement_name(r) for reqs in [kwargs["install_requires"], *extras.values()] for r in reqs}
    with open(INSTALL_SCRIPT, encoding="utf-8") as f:
        strings = {node.value for node in ast.walk(ast.parse(f.read())) if isinstance(node, ast.Constant)
                   and isinstance(node.value, str)}
    assert not {requirement_name(s) for s in strings if re.match(r"[A-Za-z0-9]", s)} & (declared - {"vqfast"})


def test_no_requirement_names_torch(run_setup):
    """A plain `torch` requirement makes pip fetch the default CUDA build (several GB) or replace the
    torch the extension was built against; torch is installed on its own, first."""
    _, kwargs = run_setup()
    install = load_install_script()
    every = kwargs["install_requires"] + [r for reqs in kwargs["extras_require"].values() for r in reqs]
    every += install.requirements(sorted(kwargs["extras_require"])) + install.TEST_NO_DEPS + [install.TRITON]
    assert "torch" not in {requirement_name(r) for r in every}
    assert all(requirement_name(r) == "vqfast" for r in every if r.startswith("vqfast"))


def third_party_imports(folder: str) -> dict[str, set[str]]:
    """{top-level module: files} of the absolute imports in the .py files under vqfast/<folder>
    that are neither the standard library nor vqfast."""
    found: dict[str, set[str]] = {}
    for dirpath, _, names in os.walk(os.path.join(ROOT, "vqfast", folder)):
        for name in names:
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read(), path)
            for node in ast.walk(tree):
                modules = ([a.name for a in node.names] if isinstance(node, ast.Import)
                           else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
                for module in modules:
                    top = module.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in ("vqfast", "__future__"):
                        found.setdefault(top, set()).add(os.path.relpath(path, ROOT))
    return found


def test_every_import_of_the_package_is_a_declared_requirement(run_setup):
    """What the package imports is declared: the trainer, tokenize, the demo and the library in
    install_requires or the "train" extra (so `pip install "vqfast[train]"` gives a working
    `vqfast train`), the benchmark code in the "bench" extra. torch is installed on its own, and triton
    comes with CUDA builds of torch (vqfast.backends checks for it)."""
    _, kwargs = run_setup()
    extras = kwargs["extras_require"]
    distributions = importlib.metadata.packages_distributions()
    allowed = {"library": kwargs["install_requires"] + extras["train"],
               "bench": kwargs["install_requires"] + extras["train"] + extras["bench"]}
    undeclared = []
    imports = third_party_imports("")
    bench = third_party_imports("bench")
    for module, files in sorted(imports.items()):
        if module in ("torch", "triton"):
            continue
        where = "library" if files - bench.get(module, set()) else "bench"
        names = {requirement_name(d) for d in distributions.get(module, [module])}
        if not names & {requirement_name(r) for r in allowed[where]}:
            undeclared.append(f"{module} ({', '.join(sorted(names))}) imported by {sorted(files)}")
    assert not undeclared, undeclared
    assert {"PIL", "sklearn", "skimage", "tqdm", "matplotlib"} <= imports.keys()  # the walk sees the trainer


def test_install_script_installs_the_extras_and_never_torch(monkeypatch):
    """scripts/install.py --test with torch and triton present: one pip call with the build requirements,
    install_requires and the extras train and test; taming-transformers without dependencies; then
    vqfast itself, built without isolation."""
    install = load_install_script()
    calls = []
    monkeypatch.setattr(install, "pip", lambda *args: calls.append(list(args)))
    monkeypatch.setattr(install, "has", lambda module: True)
    monkeypatch.setattr(install.subprocess, "check_call", lambda *a, **k: 0)
    monkeypatch.setattr(sys, "argv", ["install.py", "--test"])
    assert install.main() == 0
    assert calls[0] == list(dict.fromkeys(install.build_requires() + install.requirements(["train", "test"])))
    assert calls[1:] == [["--no-deps", "taming-transformers==0.0.1"], ["--no-build-isolation", "-e", "."]]
    assert "torch" not in {requirement_name(r) for r in calls[0]}
    assert {"setuptools", "ninja", "numpy", "pillow", "pytest", "hypothesis", "faiss-cpu"} <= {
        requirement_name(r) for r in calls[0]}


def test_install_script_installs_torch_only_when_there_is_none(monkeypatch):
    install = load_install_script()
    calls = []
    monkeypatch.setattr(install, "pip", lambda *args: calls.append(list(args)))
    monkeypatch.setattr(install, "has", lambda module: module != "torch" and module != "triton")
    monkeypatch.setattr(install.subprocess, "check_call", lambda *a, **k: 0)
    monkeypatch.setattr(sys, "argv", ["install.py", "--bench"])
    assert install.main() == 0
    assert calls[0] == ["torch==2.13.0"]
    assert calls[1] == list(dict.fromkeys(install.build_requires() + install.requirements(["train", "bench"])
                                          + ["triton==3.7.0"]))
    assert calls[2:] == [["--no-build-isolation", "-e", "."]]


# ---------------------------------------------------------------------------------------------
# The build's decisions


def test_cpu_torch_says_why_there_are_no_cuda_kernels(run_setup):
    ns, kwargs = run_setup(cuda=None)
    assert ns["CUDA_STATUS"] == (
        f"vqfast: CUDA kernels: not built (torch {torch.__version__} is not a CUDA build; "
        "install a CUDA build of torch and the matching nvcc, then rebuild, to get the cuda backend)")
    assert not any(s.endswith(".cu") for s in kwargs["ext_modules"][0].sources)


def test_skip_variable_is_reported(run_setup):
    ns, _ = run_setup(cuda="13.0", cuda_home=CUDA_HOME, env={"VQFAST_SKIP_CUDA_BUILD": "1"})
    assert ns["CUDA_STATUS"] == "vqfast: CUDA kernels: not built (VQFAST_SKIP_CUDA_BUILD=1)"


def test_cuda_torch_without_nvcc_says_the_kernels_are_skipped(run_setup, tmp_path):
    ns, kwargs = run_setup(cuda="13.0", cuda_home=None, path=str(tmp_path))
    status = ns["CUDA_STATUS"]
    assert status.startswith(f"vqfast: CUDA kernels: not built (torch {torch.__version__} is a CUDA 13.0 build, "
                             "but no nvcc was found")
    assert "install the CUDA 13.0 toolkit and set CUDA_HOME" in status and "VQFAST_SKIP_CUDA_BUILD=1" in status
    assert not any(s.endswith(".cu") for s in kwargs["ext_modules"][0].sources)


def test_the_status_line_is_printed_once_by_build_ext(run_setup, capsys, monkeypatch):
    ns, kwargs = run_setup(cuda=None)
    base = ns["BuildExtension"]
    monkeypatch.setattr(base, "run", lambda self: print("compiling"))
    command = kwargs["cmdclass"]["build_ext"].__new__(kwargs["cmdclass"]["build_ext"])
    command.run()
    assert capsys.readouterr().out == ns["CUDA_STATUS"] + "\ncompiling\n"


@pytest.mark.skipif(CUDA_HOME is None, reason="needs a CUDA toolkit (nvcc and headers) to plan a CUDA build")
@pytest.mark.parametrize("env, targets, source", [
    ({}, ["sm_80", "sm_90", "compute_90"], "the default"),
    ({"TORCH_CUDA_ARCH_LIST": "7.5;8.6;9.0a+PTX"}, ["sm_86", "sm_90a", "compute_90a"],
     "TORCH_CUDA_ARCH_LIST='7.5;8.6;9.0a+PTX'; left out sm_75 (the kernels need sm_80 or newer)"),
    ({"TORCH_CUDA_ARCH_LIST": "8.0", "VQFAST_CUDA_ARCHS": "100"}, ["sm_100"], "VQFAST_CUDA_ARCHS='100'"),
])
def test_cuda_build_plan(run_setup, env, targets, source):
    ns, kwargs = run_setup(cuda="13.0", cuda_home=CUDA_HOME, env=env)
    status = ns["CUDA_STATUS"]
    assert status.startswith("vqfast: CUDA kernels: building machine code for " + ", ".join(
        t for t in targets if t.startswith("sm_"))), status
    assert f"(from {source}) with nvcc " in status and f"for torch {torch.__version__}" in status
    ext = kwargs["ext_modules"][0]
    assert any(s.endswith("nearest_codeword.cu") for s in ext.sources)
    nvcc = ext.extra_compile_args["nvcc"]
    assert f"-DVQFAST_CUDA_ARCHS={':'.join(targets)}" in nvcc
    assert len([f for f in nvcc if f.startswith("-gencode=")]) == len(targets)


@pytest.mark.skipif(CUDA_HOME is None, reason="needs a CUDA toolkit (nvcc and headers) to plan a CUDA build")
def test_unreadable_or_unbuildable_arch_lists_stop_the_build(run_setup):
    with pytest.raises(SystemExit, match="VQFAST_CUDA_ARCHS='70' asks for sm_70, below"):
        run_setup(cuda="13.0", cuda_home=CUDA_HOME, env={"VQFAST_CUDA_ARCHS": "70"})
    with pytest.raises(SystemExit, match="TORCH_CUDA_ARCH_LIST='Hopper': cannot read the architecture 'Hopper'"):
        run_setup(cuda="13.0", cuda_home=CUDA_HOME, env={"TORCH_CUDA_ARCH_LIST": "Hopper"})
    ns, _ = run_setup(cuda="13.0", cuda_home=CUDA_HOME, env={"TORCH_CUDA_ARCH_LIST": "7.0;7.5+PTX"})
    assert ns["CUDA_STATUS"].startswith("vqfast: CUDA kernels: not built (TORCH_CUDA_ARCH_LIST='7.0;7.5+PTX' names "
                                        "no architecture the kernels support")


HIDE_TORCH = textwrap.dedent("""
    import importlib.abc, sys

    class HideTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ModuleNotFoundError("No module named 'torch'", name="torch")
            return None

    sys.meta_path.insert(0, HideTorch())
""")


def test_missing_torch_says_to_build_without_isolation(tmp_path):
    """What `pip install .` shows (pip's isolated build environment has no torch)."""
    (tmp_path / "sitecustomize.py").write_text(HIDE_TORCH)
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    proc = subprocess.run([sys.executable, SETUP, "--version"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1
    assert "vqfast: cannot import torch (No module named 'torch')" in proc.stderr
    assert "use `pip install --no-build-isolation .`" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------
# The wheel

SMOKE = textwrap.dedent("""
    import os, sys
    import torch, vqfast
    from vqfast.reference import nearest_codeword_reference
    assert vqfast.__file__.startswith(sys.prefix), (vqfast.__file__, sys.prefix)
    assert vqfast.has_ext() and "cpu" in vqfast.available_backends("cpu"), vqfast.available_backends("cpu")
    g = torch.Generator().manual_seed(0)
    z, cb = torch.randn(1000, 37, generator=g), torch.randn(301, 37, generator=g)
    idx = vqfast.nearest_codeword(z, cb, backend="cpu")[0]
    ref = nearest_codeword_reference(z, cb)[0]
    assert torch.equal(idx, ref), (idx != ref).sum()
    print("smoke ok", vqfast.__file__)
""")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """Build the wheel from a copy of the tracked sources (the checkout itself is left as it is)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        if os.path.isfile(os.path.join(ROOT, rel)):
            os.makedirs(os.path.dirname(src / rel), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, rel), src / rel)
    env = dict(os.environ, VQFAST_SKIP_CUDA_BUILD="1", MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps",
                           "--disable-pip-version-check", "-v", "-w", str(tmp / "dist"), str(src)],
                          env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # pip -v passes the build's output on (to stderr): the status line, once.
    assert (proc.stdout + proc.stderr).count("vqfast: CUDA kernels: not built (VQFAST_SKIP_CUDA_BUILD=1)") == 1
    wheels = list((tmp / "dist").glob("vqfast-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.mark.slow
def test_wheel_holds_the_extension_and_no_build_junk(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "vqfast/_C.so" in names and "vqfast/_cuda_archs.py" in names
    assert "vqfast/gpu_validated.json" in names  # the record backend="auto" reads on GPUs
    dist_info = [n for n in names if ".dist-info/" in n]
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in dist_info), dist_info
    metadata = zipfile.ZipFile(wheel).read(next(n for n in dist_info if n.endswith("/METADATA"))).decode()
    assert "\nLicense: MIT\n" in metadata and "\nLicense-File: LICENSE\n" in metadata
    outside = [n for n in names if not n.startswith(("vqfast/", "vqfast-"))]
    junk = [n for n in names if n.endswith((".o", ".pyc", ".ninja", ".log")) or "__pycache__" in n or "/build/" in n]
    assert not outside and not junk, (outside, junk)
    assert not any(n.startswith(("vqfast/tests", "tests/", "benchmarks/", "csrc/")) for n in names)
    assert "vqfast/testing/oracle.py" in names and "vqfast/testing/mutations.py" not in names


def clean_env() -> dict:
    """This process's environment without what would point a child at this checkout or this venv."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


def run(cmd, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kwargs)


@pytest.fixture(scope="module")
def fresh_venv(wheel, tmp_path_factory):
    """A fresh virtual environment (its own pip, no system site-packages) with torch installed by pip from
    the wheel on disk, then `pip install --no-build-isolation "<the wheel>[train]"`, as a user would:
    (python, its bin folder, the environment to run it in)."""
    env_dir = tmp_path_factory.mktemp("fresh") / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = str(env_dir / "bin" / "python")
    env = clean_env()
    pip = [python, "-m", "pip", "install", "--disable-pip-version-check"]
    # Exactly the torch vqfast._C was compiled against, from a file on disk (pip's find-links): with
    # --no-index the registry, whose default torch is the CUDA build (several GB), is never asked.
    pinned = f"torch=={torch.__version__}"
    proc = run(pip + ["--no-index", "--no-deps", pinned], env=env)
    if proc.returncode != 0 and "No matching distribution found" in proc.stdout + proc.stderr:
        pytest.skip(f"no {pinned} wheel on disk for pip (find-links): it is not downloaded here")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for args in ([pinned],  # torch's own dependencies (sympy, networkx, ...), from the registry
                 ["--no-build-isolation", f"{wheel}[train]"]):
        proc = run(pip + args, env=env)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # No requirement of vqfast or its extras replaced the torch installed first.
    proc = run([python, "-c", "import torch; print(torch.__version__)"], env=env)
    assert proc.stdout.strip() == torch.__version__, proc.stdout + proc.stderr
    return python, env_dir / "bin", env


@pytest.mark.slow
def test_wheel_installs_and_runs_outside_the_checkout(fresh_venv, tmp_path):
    python, bin_dir, env = fresh_venv
    site_dir = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], env=env).stdout.strip()
    proc = run([python, "-c", SMOKE], cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "smoke ok " + os.path.join(site_dir, "vqfast") in proc.stdout
    cli = run([bin_dir / "vqfast", "--help"], cwd=tmp_path, env=env)
    assert cli.returncode == 0 and "bench" in cli.stdout, cli.stdout + cli.stderr


def _ran(proc: subprocess.CompletedProcess) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Traceback" not in out and "ModuleNotFoundError" not in out, out[-4000:]
    return out


@pytest.mark.slow
def test_wheel_train_extra_gives_a_working_trainer_tokenize_and_demo(fresh_venv, tmp_path):
    """`pip install "vqfast[train]"` is all `vqfast train`, `vqfast tokenize` and `vqfast demo` need
    (Pillow, scikit-image, scikit-learn, matplotlib and tqdm each imported on the way)."""
    from PIL import Image

    _, bin_dir, env = fresh_venv
    vqfast_cli = bin_dir / "vqfast"
    out = tmp_path / "run"
    _ran(run([vqfast_cli, "train", "--preset", "demo", "--steps", "3", "--out", out], cwd=tmp_path, env=env))
    for name in ("checkpoint.pt", "metrics.json", "reconstructions.png", "loss_curve.png"):
        assert (out / name).is_file(), sorted(os.listdir(out))
    rng = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (40, 50, 3), dtype=torch.uint8, generator=rng).numpy()
    Image.fromarray(pixels).save(tmp_path / "photo.png")
    ckpt = ["--checkpoint", out / "checkpoint.pt"]
    _ran(run([vqfast_cli, "tokenize", *ckpt, "encode", tmp_path / "photo.png", tmp_path / "tokens.pt"],
             cwd=tmp_path, env=env))
    _ran(run([vqfast_cli, "tokenize", *ckpt, "decode", tmp_path / "tokens.pt", tmp_path / "back.png"],
             cwd=tmp_path, env=env))
    with Image.open(tmp_path / "back.png") as back:
        assert back.size == (32, 32) and back.mode == "RGB"  # the demo preset's image size
    demo = _ran(run([vqfast_cli, "demo", "--codes", "64", "--repeats", "1"], cwd=tmp_path, env=env))
    assert "vqfast backend=cpu" in demo and "PSNR" in demo, demo
