"""Packaging: what setup.py says and decides, the licence in the metadata, and a built wheel that works.

setup.py is run with setuptools.setup replaced by a recorder, so its decisions (the CUDA status line,
the nvcc flags, the metadata) are checked in a second, without compiling. The wheel tests compile
the extension from scratch (about 3.5 CPU-minutes, 2 minutes of a 2-core machine), more than the
test suite can spend on every run: they run with VQFAST_TEST_WHEEL=1,

    VQFAST_TEST_WHEEL=1 python -m pytest tests/test_packaging.py -q -k wheel
"""
from __future__ import annotations

import os
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETUP = os.path.join(ROOT, "setup.py")
TEST_WHEEL = os.environ.get("VQFAST_TEST_WHEEL", "0") == "1"
needs_wheel = pytest.mark.skipif(not TEST_WHEEL, reason="compiles the extension from scratch: set VQFAST_TEST_WHEEL=1")
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
@needs_wheel
def test_wheel_holds_the_extension_and_no_build_junk(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "vqfast/_C.so" in names and "vqfast/_cuda_archs.py" in names
    dist_info = [n for n in names if ".dist-info/" in n]
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in dist_info), dist_info
    metadata = zipfile.ZipFile(wheel).read(next(n for n in dist_info if n.endswith("/METADATA"))).decode()
    assert "\nLicense: MIT\n" in metadata and "\nLicense-File: LICENSE\n" in metadata
    outside = [n for n in names if not n.startswith(("vqfast/", "vqfast-"))]
    junk = [n for n in names if n.endswith((".o", ".pyc", ".ninja", ".log")) or "__pycache__" in n or "/build/" in n]
    assert not outside and not junk, (outside, junk)
    assert not any(n.startswith(("vqfast/tests", "tests/", "benchmarks/", "csrc/")) for n in names)
    assert "vqfast/testing/oracle.py" in names and "vqfast/testing/mutations.py" not in names


@pytest.mark.slow
@needs_wheel
def test_wheel_installs_and_runs_outside_the_checkout(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = str(env_dir / "bin" / "python")
    # torch from this environment, as --system-site-packages would give it from a system Python (a venv
    # made from a venv would see the base interpreter's packages instead); vqfast only from the wheel,
    # whose site-packages comes first on the path.
    site_dir = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True).stdout.strip()
    torch_dir = os.path.dirname(os.path.dirname(torch.__file__))
    with open(os.path.join(site_dir, "outer_torch.pth"), "w") as f:
        f.write(torch_dir + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps",
                           "--disable-pip-version-check", str(wheel)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = subprocess.run([python, "-c", SMOKE], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "smoke ok " + os.path.join(site_dir, "vqfast") in run.stdout
    cli = subprocess.run([str(env_dir / "bin" / "vqfast"), "--help"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert cli.returncode == 0 and "bench" in cli.stdout, cli.stdout + cli.stderr
