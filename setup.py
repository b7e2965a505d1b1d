"""Build vqfast and its extension ``vqfast._C``.

The C++ CPU kernels are always built. The CUDA kernels are built when the installed torch is a
CUDA build and nvcc is found (a visible GPU is not required), unless VQFAST_SKIP_CUDA_BUILD=1.
VQFAST_CUDA_ARCHS (e.g. "80;90") picks the GPU architectures; MAX_JOBS bounds parallel compiles.

    pip install --no-build-isolation -e .
"""
import glob
import os
import platform
import shutil

from setuptools import find_packages, setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def _rel(paths):
    return sorted(os.path.relpath(p, HERE) for p in paths)


def _nvcc():
    if CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return os.path.join(CUDA_HOME, "bin", "nvcc")
    return shutil.which("nvcc")


def build_cuda() -> bool:
    if os.environ.get("VQFAST_SKIP_CUDA_BUILD", "0") == "1":
        return False
    # Gate on the toolkit (a CUDA torch + nvcc), never on torch.cuda.is_available().
    if torch.version.cuda is None or _nvcc() is None:
        return False
    # torch derives CUDA_HOME from nvcc's path; a wrapper script (say /usr/local/bin/nvcc) makes it
    # a folder with no CUDA headers, and the compile would fail deep inside torch's headers.
    if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "include", "cuda_runtime_api.h")):
        raise SystemExit(
            f"vqfast: found a CUDA torch ({torch.version.cuda}) and nvcc, but CUDA_HOME={CUDA_HOME!r} has no "
            "include/cuda_runtime_api.h. Set CUDA_HOME to the CUDA toolkit root (the folder with bin/nvcc and "
            "include/), or set VQFAST_SKIP_CUDA_BUILD=1 to build without the CUDA kernels."
        )
    return True


def cuda_arch_flags():
    archs = os.environ.get("VQFAST_CUDA_ARCHS", "80;90").replace(",", ";")
    flags = []
    for arch in filter(None, (a.strip() for a in archs.split(";"))):
        num = arch.replace(".", "")
        flags += [f"-gencode=arch=compute_{num},code=sm_{num}"]
    return flags


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


class BuildExt(BuildExtension):
    """torch's BuildExtension, plus the CPU kernel levels compiled each with its own flags."""

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
    python_requires=">=3.10",
    # torch is deliberately not listed: an unpinned requirement would let pip replace a CPU or
    # CUDA build the user already has. scripts/install.py installs torch when none is present.
    install_requires=["numpy"],
    extras_require={
        "test": ["pytest", "hypothesis", "faiss-cpu", "scipy"],
        "bench": ["pytest-benchmark", "faiss-cpu", "vector-quantize-pytorch", "matplotlib"],
    },
    entry_points={"console_scripts": ["vqfast=vqfast.cli:main"]},
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExt.with_options(no_python_abi_suffix=True)},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
    zip_safe=False,
)
