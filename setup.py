"""Build vqfast and its extension ``vqfast._C``.

The C++ CPU kernels are always built. The CUDA kernels are built when the installed torch is a
CUDA build and nvcc is found (a visible GPU is not required), unless VQFAST_SKIP_CUDA_BUILD=1.
Their architectures come from VQFAST_CUDA_ARCHS, else TORCH_CUDA_ARCH_LIST, else "8.0;9.0+PTX"
(vqfast/_cuda_archs.py); MAX_JOBS bounds parallel compiles. The build prints one line,
"vqfast: CUDA kernels: ...", saying what it built or why it built none (pip shows it with -v).

    pip install --no-build-isolation -e .                 # a checkout, editable
    pip install --no-build-isolation -e ".[train]"        # ... with the trainer's dependencies
    pip wheel --no-build-isolation --no-deps -w dist .    # a wheel for this torch

Install torch first: no requirement names it (INSTALL_REQUIRES below says why).
"""
import glob
import importlib.util
import os
import platform
import re
import shutil
import subprocess
from functools import cache

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))

# vqfast's dependencies, declared once: pip reads them from setup() below, scripts/install.py reads them
# from this file's text (so they stay plain literals, read with ast.literal_eval). An extra may name
# others as "vqfast[...]". No requirement names torch: a plain `torch` requirement makes pip fetch the
# default CUDA build (several GB) or replace the CPU or CUDA build already installed; torch is installed
# first, on its own (scripts/install.py installs the CPU build when none is present).
INSTALL_REQUIRES = ["numpy"]
EXTRAS_REQUIRE = {
    # `vqfast train`, `vqfast tokenize` and `vqfast demo`: images (Pillow), the bundled sample
    # photographs (scikit-image, scikit-learn), the report's charts (matplotlib), progress bars (tqdm).
    "train": ["pillow", "scikit-image", "scikit-learn", "matplotlib", "tqdm"],
    # benchmarks/ and `vqfast bench`: pytest-benchmark and the peers, the libraries pinned to the releases
    # that the committed results and vqfast.compat's tests were run against.
    "bench": ["pytest-benchmark", "faiss-cpu", "vector-quantize-pytorch==1.32.0", "diffusers==0.42.1", "matplotlib"],
    # tests/: they train and benchmark too. scripts/install.py --test adds two that no requirement here
    # can say: taming-transformers without its dependencies, and triton where none is installed.
    "test": ["vqfast[train,bench]", "pytest", "hypothesis"],
}


def _missing_torch(exc: ImportError) -> SystemExit:
    return SystemExit(
        f"vqfast: cannot import torch ({exc}). vqfast compiles its extension against the torch already "
        "installed in your environment, so pip must not build it in an isolated environment of its own.\n"
        "  1. Install torch first if you have none (https://pytorch.org, or `python scripts/install.py` "
        "from a checkout).\n"
        "  2. Then build without isolation: use `pip install --no-build-isolation .` (`pip install "
        "--no-build-isolation -e .` for a checkout, `pip wheel --no-build-isolation --no-deps .` for a wheel)."
    )


try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as _exc:
    raise _missing_torch(_exc) from None


def _load_cuda_archs():
    # By path: importing the vqfast package would need the extension this file is about to build.
    spec = importlib.util.spec_from_file_location("_vqfast_cuda_archs", os.path.join(HERE, "vqfast", "_cuda_archs.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cuda_archs = _load_cuda_archs()
# What the build does about the CUDA kernels, printed once when the extension is compiled.
CUDA_STATUS = "vqfast: CUDA kernels: not decided"


def _rel(paths):
    return sorted(os.path.relpath(p, HERE) for p in paths)


def _nvcc():
    if CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return os.path.join(CUDA_HOME, "bin", "nvcc")
    return shutil.which("nvcc")


def _nvcc_release(nvcc: str) -> str:
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return "of unknown version"
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else "of unknown version"


@cache
def _cuda_plan():
    """(build the CUDA kernels?, sass targets, ptx targets, the status line)."""
    head = "vqfast: CUDA kernels: "
    if os.environ.get("VQFAST_SKIP_CUDA_BUILD", "0") == "1":
        return False, [], [], head + "not built (VQFAST_SKIP_CUDA_BUILD=1)"
    # Gate on the toolkit (a CUDA torch + nvcc), never on torch.cuda.is_available().
    if torch.version.cuda is None:
        return False, [], [], (head + f"not built (torch {torch.__version__} is not a CUDA build; install a CUDA "
                               "build of torch and the matching nvcc, then rebuild, to get the cuda backend)")
    nvcc = _nvcc()
    if nvcc is None:
        return False, [], [], (
            head + f"not built (torch {torch.__version__} is a CUDA {torch.version.cuda} build, but no nvcc was found: "
            f"CUDA_HOME={CUDA_HOME!r}, none on PATH; install the CUDA {torch.version.cuda} toolkit and set CUDA_HOME "
            "to its root, or set VQFAST_SKIP_CUDA_BUILD=1 to build without them)")
    # torch derives CUDA_HOME from nvcc's path; a wrapper script (say /usr/local/bin/nvcc) makes it
    # a folder with no CUDA headers, and the compile would fail deep inside torch's headers.
    if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "include", "cuda_runtime_api.h")):
        raise SystemExit(
            f"vqfast: found a CUDA torch ({torch.version.cuda}) and nvcc, but CUDA_HOME={CUDA_HOME!r} has no "
            "include/cuda_runtime_api.h. Set CUDA_HOME to the CUDA toolkit root (the folder with bin/nvcc and "
            "include/), or set VQFAST_SKIP_CUDA_BUILD=1 to build without the CUDA kernels."
        )
    try:
        sass, ptx, source, too_old = cuda_archs.choose_archs(os.environ)
    except ValueError as exc:
        raise SystemExit(f"vqfast: {exc}") from None
    left_out = f"; left out {', '.join(too_old)} (the kernels need sm_80 or newer)" if too_old else ""
    if not sass:
        return False, [], [], head + f"not built ({source} names no architecture the kernels support{left_out})"
    return True, sass, ptx, (
        head + f"building {cuda_archs.describe(sass, ptx)} (from {source}{left_out}) with nvcc "
        f"{_nvcc_release(nvcc)} from {CUDA_HOME} for torch {torch.__version__}")


def build_cuda() -> bool:
    global CUDA_STATUS
    build, _, _, CUDA_STATUS = _cuda_plan()
    return build


def cuda_arch_flags():
    """nvcc flags: the -gencode list and the VQFAST_CUDA_ARCHS macro that bakes it into the library."""
    _, sass, ptx, _ = _cuda_plan()
    return cuda_archs.nvcc_flags(sass, ptx)


class BuildExtensionReporting(BuildExtension):
    """torch's BuildExtension that first prints the CUDA status line (hooks that only read metadata stay quiet)."""

    def run(self):
        print(CUDA_STATUS, flush=True)
        super().run()


def cpu_kernel_levels():
    """(source, flags) of the CPU search kernel per instruction level, lowest first.

    Each level is its own translation unit with its own flags; csrc/cpu/dispatch.cpp picks one at
    run time from cpuid / getauxval. Everything else is compiled for the architecture's baseline
    (no -march), so the extension runs on any CPU of the architecture. -ffp-contract=fast lets the
    kernels fuse multiply-adds (the rounding bound in csrc/cpu/kernels/search.h allows it).
    """
    common = ["-O3", "-ffp-contract=fast"]
    src = lambda name: os.path.join("csrc", "cpu", "kernels", name + ".cpp")  # noqa: E731
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        return [
            (src("generic"), common),
            (src("avx2"), common + ["-mavx2", "-mfma"]),
            (src("avx512"), common + ["-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma"]),
        ]
    if machine in ("aarch64", "arm64"):
        return [(src("generic"), common), (src("neon"), common)]
    return [(src("generic"), common)]


class BuildExt(BuildExtensionReporting):
    """torch's BuildExtension with the CUDA status line, plus the CPU kernel levels compiled each with its own flags."""

    def build_extension(self, ext):
        if ext.name == "vqfast._C":
            depends = glob.glob(os.path.join(HERE, "csrc", "cpu", "kernels", "*.h"))
            for source, flags in cpu_kernel_levels():
                ext.extra_objects += self.compiler.compile(
                    [source], output_dir=self.build_temp, extra_postargs={"cxx": flags, "nvcc": []}, depends=depends)
        super().build_extension(ext)


def extensions():
    # Baseline flags only: the instruction-level kernels are built by BuildExt (cpu_kernel_levels).
    cxx_flags = ["-O3", "-fopenmp", "-ffp-contract=off"]
    sources = _rel([os.path.join(HERE, "csrc", "vqfast.cpp")] + glob.glob(os.path.join(HERE, "csrc", "cpu", "*.cpp")))
    define_macros = []
    if build_cuda():
        sources += _rel(glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu")) + glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cpp")))
        define_macros.append(("VQFAST_WITH_CUDA", None))
        return [
            CUDAExtension(
                "vqfast._C",
                sources,
                define_macros=define_macros,
                extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"] + cuda_arch_flags()},
                extra_link_args=["-fopenmp"],
                py_limited_api=True,
            )
        ]
    return [
        CppExtension(
            "vqfast._C",
            sources,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
            py_limited_api=True,
        )
    ]


setup(
    name="vqfast",
    version="0.1.0",
    description="Fast fused nearest-codeword search and drop-in vector quantizers for PyTorch",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read() if os.path.exists(os.path.join(HERE, "README.md")) else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["vqfast", "vqfast.*"]),
    # The GPU validation record: without it an installed vqfast would treat every GPU as unvalidated.
    package_data={"vqfast": ["gpu_validated.json"]},
    python_requires=">=3.10",
    license="MIT",
    license_files=["LICENSE"],
    install_requires=INSTALL_REQUIRES,  # torch deliberately not: see INSTALL_REQUIRES above
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["vqfast=vqfast.cli:main"]},
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExt.with_options(no_python_abi_suffix=True)},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
    zip_safe=False,
)
