"""CUDA architectures: the build's list (VQFAST_CUDA_ARCHS / TORCH_CUDA_ARCH_LIST) and the run-time rule
that makes the cuda backend unavailable on a GPU the build neither compiled for nor can JIT-compile to.

The rule is a pure function, checked here against CUDA's compatibility rules on the GPUs users own;
the backend wiring is checked with the device queries replaced, so it runs without a GPU.
"""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch

import vqfast
from vqfast import _cuda_archs, _ext, backends

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_SASS, DEFAULT_PTX = ["sm_80", "sm_90"], ["compute_90"]


@pytest.mark.parametrize("text, sass, ptx", [
    ("8.0;9.0+PTX", ["sm_80", "sm_90"], ["compute_90"]),
    ("80;90", ["sm_80", "sm_90"], []),
    ("80, 90", ["sm_80", "sm_90"], []),
    ("8.6 8.0  9.0", ["sm_80", "sm_86", "sm_90"], []),  # spaces (NGC images), sorted
    ("9.0;8.0;9.0", ["sm_80", "sm_90"], []),  # repeats dropped
    ("9.0a", ["sm_90a"], []),
    ("10.0f+PTX;12.0", ["sm_100f", "sm_120"], ["compute_100f"]),
    ("120+ptx", ["sm_120"], ["compute_120"]),
    ("8.9;10.0;12.0+PTX", ["sm_89", "sm_100", "sm_120"], ["compute_120"]),  # 10.0 sorts after 8.9
])
def test_parse_arch_list(text, sass, ptx):
    assert _cuda_archs.parse_arch_list(text, "X") == (sass, ptx)


@pytest.mark.parametrize("text", ["Ampere", "native", "8", "8.0+SASS", "sm_80", "8.0;;x", " ; "])
def test_parse_arch_list_rejects_what_it_cannot_read(text):
    with pytest.raises(ValueError, match="TORCH_CUDA_ARCH_LIST"):
        _cuda_archs.parse_arch_list(text, "TORCH_CUDA_ARCH_LIST")


def test_default_is_sm80_sm90_and_ptx_of_the_newest():
    assert _cuda_archs.choose_archs({}) == (DEFAULT_SASS, DEFAULT_PTX, "the default", [])
    assert _cuda_archs.choose_archs({"VQFAST_CUDA_ARCHS": " ", "TORCH_CUDA_ARCH_LIST": ""})[:2] == (DEFAULT_SASS,
                                                                                                   DEFAULT_PTX)


def test_vqfast_cuda_archs_wins_over_torch_cuda_arch_list():
    env = {"VQFAST_CUDA_ARCHS": "90", "TORCH_CUDA_ARCH_LIST": "8.0;8.6+PTX"}
    assert _cuda_archs.choose_archs(env) == (["sm_90"], [], "VQFAST_CUDA_ARCHS='90'", [])
    env.pop("VQFAST_CUDA_ARCHS")
    assert _cuda_archs.choose_archs(env) == (["sm_80", "sm_86"], ["compute_86"],
                                             "TORCH_CUDA_ARCH_LIST='8.0;8.6+PTX'", [])


def test_old_architectures_are_left_out_of_torch_list_and_refused_in_ours():
    # An NGC-style list: everything below 8.0 is left out, the rest is built.
    sass, ptx, _, left_out = _cuda_archs.choose_archs({"TORCH_CUDA_ARCH_LIST": "5.2 6.0 7.0 7.5 8.0 8.6 9.0+PTX"})
    assert (sass, ptx, left_out) == (["sm_80", "sm_86", "sm_90"], ["compute_90"], ["sm_52", "sm_60", "sm_70", "sm_75"])
    sass, ptx, _, left_out = _cuda_archs.choose_archs({"TORCH_CUDA_ARCH_LIST": "7.5+PTX"})
    assert (sass, ptx, left_out) == ([], [], ["sm_75", "compute_75"])
    with pytest.raises(ValueError, match=r"VQFAST_CUDA_ARCHS='75;80' asks for sm_75, below the compute capability"):
        _cuda_archs.choose_archs({"VQFAST_CUDA_ARCHS": "75;80"})


def test_nvcc_flags():
    assert _cuda_archs.nvcc_flags(["sm_80", "sm_90a"], ["compute_90a"]) == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90a,code=sm_90a",
        "-gencode=arch=compute_90a,code=compute_90a",
        "-DVQFAST_CUDA_ARCHS=sm_80:sm_90a:compute_90a",
    ]


# (GPU, compute capability, runs the default build?) -- the default's machine code covers 8.x and
# 9.0, its compute_90 PTX every newer GPU; Turing and Volta lack cp.async / bf16 mma.sync.
GPUS = [
    ("V100", (7, 0), False), ("T4", (7, 5), False), ("A100", (8, 0), True), ("A10 / RTX 3090", (8, 6), True),
    ("Jetson Orin", (8, 7), True), ("L4 / RTX 4090", (8, 9), True), ("H100 / H200", (9, 0), True),
    ("B200", (10, 0), True), ("GB300", (10, 3), True), ("Thor", (11, 0), True), ("RTX 5090", (12, 0), True),
]


@pytest.mark.parametrize("gpu, capability, runs", GPUS, ids=[g[0] for g in GPUS])
def test_default_build_on_the_gpus_users_own(gpu, capability, runs):
    reason = _cuda_archs.arch_reason(DEFAULT_SASS, DEFAULT_PTX, capability)
    assert (reason is None) == runs, reason
    if not runs:
        assert f"compute capability {capability[0]}.{capability[1]} is below the 8.0" in reason


@pytest.mark.parametrize("sass, ptx, capability, runs", [
    (["sm_80", "sm_90"], [], (10, 0), False),  # no PTX: Blackwell has nothing to run
    (["sm_80", "sm_90"], [], (9, 0), True),
    (["sm_90"], [], (8, 9), False),  # machine code never runs on a lower minor ...
    (["sm_86"], [], (8, 0), False),
    (["sm_86"], [], (8, 9), True),  # ... and runs on a higher one of the same major
    (["sm_80"], [], (9, 0), False),  # ... but never on another major
    (["sm_90a"], [], (9, 0), True),  # architecture-specific: that capability only
    (["sm_100a"], [], (10, 3), False),
    (["sm_100f"], [], (10, 3), True),  # family-specific: the family's later minors
    (["sm_100f"], [], (12, 0), False),
    ([], ["compute_80"], (12, 1), True),  # PTX: any equal or higher capability
    ([], ["compute_90"], (8, 9), False),
    ([], ["compute_90a"], (10, 0), False),
    ([], ["compute_100f"], (10, 3), True),
    ([], ["compute_100f"], (12, 0), False),
])
def test_arch_rule(sass, ptx, capability, runs):
    reason = _cuda_archs.arch_reason(sass, ptx, capability)
    assert (reason is None) == runs, reason
    if not runs and capability >= (8, 0):
        cc = f"{capability[0]}.{capability[1]}"
        assert f"none of which runs on compute capability {cc}" in reason
        assert f'VQFAST_CUDA_ARCHS="{cc}"' in reason


@pytest.mark.parametrize("bad", ["sm80", "compute_8", "sass_80", "sm_80b"])
def test_split_target_rejects_malformed_targets(bad):
    with pytest.raises(ValueError, match="not an nvcc target"):
        _cuda_archs.split_target(bad)


# ---------------------------------------------------------------------------------------------
# The backend registry with a CUDA-enabled extension on stand-in GPUs (no GPU needed)

@pytest.fixture
def fake_gpus(monkeypatch):
    """Pretend the extension holds the default targets and the given GPUs are visible."""
    def install(*gpus, targets=("sm_80", "sm_90", "compute_90")):
        monkeypatch.setattr(_ext, "has_ext", lambda: True)
        monkeypatch.setattr(_ext, "has_cuda_ext", lambda: True)
        monkeypatch.setattr(_ext, "cuda_archs", lambda: targets)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: len(gpus))
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: gpus[i][0])
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: gpus[i or 0][1])
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.delenv(backends.ENV_VAR, raising=False)
        # An empty validation record, as committed: no GPU kernel is "auto"'s choice anywhere.
        monkeypatch.setattr(backends, "validation_record", lambda: {})
        monkeypatch.setattr(backends, "_unvalidated_checked", False)

    return install


@pytest.mark.filterwarnings("ignore::vqfast.backends.UnvalidatedKernelWarning")  # triton, where installed
def test_cuda_backend_unavailable_on_a_gpu_the_build_does_not_cover(fake_gpus):
    fake_gpus(("Tesla T4", (7, 5)))
    assert "cuda" not in backends.available_backends("cuda")
    assert backends.resolve_backend("auto", "cuda") in ("triton", "torch")
    with pytest.raises(ValueError, match=r"cuda:0 \(Tesla T4\): compute capability 7\.5 is below the 8\.0"):
        backends.resolve_backend("cuda", "cuda")


def test_cuda_backend_available_where_the_build_or_its_ptx_covers_the_gpu(fake_gpus):
    for gpu in [("NVIDIA H200", (9, 0)), ("NVIDIA A10", (8, 6)), ("NVIDIA B200", (10, 0))]:
        fake_gpus(gpu)
        assert "cuda" in backends.available_backends("cuda"), gpu
        assert backends.resolve_backend("cuda", "cuda") == "cuda"


def test_cuda_backend_without_ptx_is_unavailable_on_a_newer_gpu(fake_gpus):
    fake_gpus(("NVIDIA B200", (10, 0)), ("NVIDIA B200", (10, 0)), targets=("sm_80", "sm_90"))
    with pytest.raises(ValueError) as info:
        backends.resolve_backend("cuda", "cuda")
    message = str(info.value)
    assert ("cuda:0 (NVIDIA B200), cuda:1 (NVIDIA B200): vqfast._C holds machine code for sm_80, sm_90 "
            "and no PTX") in message
    assert 'rebuild with VQFAST_CUDA_ARCHS="10.0"' in message


def test_mixed_gpus_keep_the_backend_and_check_each_gpu(fake_gpus):
    fake_gpus(("NVIDIA A100", (8, 0)), ("Tesla V100", (7, 0)))
    assert "cuda" in backends.available_backends("cuda")
    assert backends._cuda_gpu_reason(0) is None
    assert "compute capability 7.0 is below" in backends._cuda_gpu_reason(1)


def test_an_extension_that_does_not_record_its_targets_is_trusted(fake_gpus):
    fake_gpus(("Tesla T4", (7, 5)), targets=None)
    assert "cuda" in backends.available_backends("cuda")


# ---------------------------------------------------------------------------------------------
# "auto" on CUDA tensors follows the validation record (vqfast/gpu_validated.json)

def _record(*archs, backends_=("cuda",)):
    return {arch: {name: {"date": "2026-12-01", "commit": "0" * 40, "device": "NVIDIA H100 80GB HBM3",
                          "passed": "scripts/gpu_check.sh all"} for name in backends_} for arch in archs}


def test_auto_takes_torch_on_an_unvalidated_gpu_and_warns_once(fake_gpus, recwarn):
    fake_gpus(("NVIDIA H100 80GB HBM3", (9, 0)))
    assert "cuda" in backends.available_backends("cuda")  # it can run: listed, but not auto's choice
    assert backends.resolve_backend("auto", "cuda") == "torch"
    assert backends.resolve_backend("auto", "cuda") == "torch"
    warned = [w for w in recwarn.list if issubclass(w.category, backends.UnvalidatedKernelWarning)]
    assert len(warned) == 1, [str(w.message) for w in recwarn.list]
    message = str(warned[0].message)
    assert "\n" not in message
    kernels = "the cuda and triton kernels" if "triton" in backends.available_backends("cuda") else "the cuda kernel"
    assert kernels in message and "not been validated on sm_90" in message, message
    assert "backend='cuda'" in message and f"{backends.ENV_VAR}=cuda" in message, message


def test_auto_takes_the_kernel_on_a_validated_architecture(fake_gpus, monkeypatch, recwarn):
    fake_gpus(("NVIDIA H100 80GB HBM3", (9, 0)), ("NVIDIA A100", (8, 0)))
    monkeypatch.setattr(backends, "validation_record", lambda: _record("sm_90"))
    assert backends.resolve_backend("auto", "cuda") == "cuda"  # the current device, cuda:0, is an sm_90
    assert not [w for w in recwarn.list if issubclass(w.category, backends.UnvalidatedKernelWarning)]
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert backends.resolve_backend("auto", "cuda") == "torch"  # the A100 (sm_80) is not in the record


def test_a_named_backend_ignores_the_record(fake_gpus, monkeypatch, recwarn):
    fake_gpus(("NVIDIA H100 80GB HBM3", (9, 0)))
    assert backends.resolve_backend("cuda", "cuda") == "cuda"
    monkeypatch.setenv(backends.ENV_VAR, "cuda")
    assert backends.resolve_backend("auto", "cuda") == "cuda"
    assert not [w for w in recwarn.list if issubclass(w.category, backends.UnvalidatedKernelWarning)]


def test_the_committed_record_and_the_summary(fake_gpus, monkeypatch):
    import json

    data = json.loads(backends.VALIDATION_RECORD.read_text())
    assert data["about"] and isinstance(data["architectures"], dict)
    for arch, entry in data["architectures"].items():
        _cuda_archs.split_target(arch)
        for name, fields in entry.items():
            assert backends.REGISTRY[name].needs_gpu_validation, name
            assert {"date", "commit", "device", "passed"} <= set(fields), (arch, name)
    fake_gpus(("NVIDIA A100", (8, 0)))
    lines = backends.validation_summary().splitlines()
    assert [line.split(":")[0] for line in lines] == ["cpu", "cuda", "triton"]
    assert "cuda: not validated on any GPU yet" in lines[1] and "this GPU (sm_80) is not validated" in lines[1]
    monkeypatch.setattr(backends, "validation_record", lambda: _record("sm_80", "sm_90"))
    line = backends.validation_summary().splitlines()[1]
    assert line.startswith("cuda: validated on sm_80 (NVIDIA H100 80GB HBM3, 2026-12-01), sm_90") and "this GPU (sm_80) is validated" in line


def test_record_validation_writes_entries_the_registry_reads(tmp_path, monkeypatch):
    import json

    path = tmp_path / "gpu_validated.json"
    path.write_text(backends.VALIDATION_RECORD.read_text())
    monkeypatch.setattr(backends, "VALIDATION_RECORD", path)
    backends.reload_validation_record()
    try:
        assert not backends.is_validated("cuda", "sm_90")
        backends.record_validation("sm_90", ["cuda", "triton"], "NVIDIA H100 80GB HBM3", "abc", "all stages",
                                   path=path, date="2026-12-06", torch="2.9")
        assert backends.is_validated("cuda", "sm_90") and backends.is_validated("triton", "sm_90")
        assert not backends.is_validated("cuda", "sm_80")
        entry = backends.validation_record()["sm_90"]["cuda"]
        assert entry == {"date": "2026-12-06", "commit": "abc", "device": "NVIDIA H100 80GB HBM3",
                         "passed": "all stages", "torch": "2.9"}
    finally:
        monkeypatch.undo()
        backends.reload_validation_record()
        assert backends.validation_record() == json.loads(backends.VALIDATION_RECORD.read_text())["architectures"]


def test_a_cuda_torch_with_a_cpu_only_build_says_how_to_see_why(monkeypatch):
    monkeypatch.setattr(_ext, "has_ext", lambda: True)
    monkeypatch.setattr(_ext, "has_cuda_ext", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    reason = backends.REGISTRY["cuda"].unavailable_reason()
    assert reason.startswith("vqfast._C was built without CUDA kernels")
    assert "rebuild with the CUDA 13.0 nvcc installed (`pip install -v --no-build-isolation .`" in reason
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "rebuild" not in backends.REGISTRY["cuda"].unavailable_reason()


def test_cuda_archs_of_this_build():
    archs = vqfast.cuda_archs()
    if not vqfast.has_cuda_ext():
        assert archs == ()
        return
    assert archs, "a CUDA build records its nvcc targets"
    for target in archs:
        _cuda_archs.split_target(target)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_this_gpu_is_covered_by_this_build():
    if not vqfast.has_cuda_ext():
        pytest.skip("vqfast._C was built without CUDA kernels")
    assert backends._cuda_gpu_reason(torch.cuda.current_device()) is None
    assert "cuda" in vqfast.available_backends("cuda")


def _nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found (set CUDA_HOME)")
def test_the_target_list_reaches_the_library_as_a_string(tmp_path):
    """setup.py's flags, through nvcc's preprocessor, turn into the string cuda_archs() returns."""
    flags = _cuda_archs.nvcc_flags(["sm_80", "sm_90a"], ["compute_90"])
    source = os.path.join(ROOT, "csrc", "cuda", "nearest_codeword.cu")
    out = tmp_path / "pre.cu"
    proc = subprocess.run([_nvcc(), "-std=c++17", "-E", *flags, source, "-o", str(out)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert 'return "sm_80:sm_90a:compute_90";' in out.read_text()


@pytest.mark.slow
@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found (set CUDA_HOME)")
def test_nvcc_flags_give_the_objects_these_targets(tmp_path):
    """The flags setup.py passes put exactly the listed machine code and PTX into the object, as read
    back from its .nv_fatbin section (what cuobjdump lists)."""
    source = tmp_path / "k.cu"
    source.write_text("__global__ void twice(float* x) { x[threadIdx.x] *= 2.f; }\n")
    for sass, ptx in ((DEFAULT_SASS, DEFAULT_PTX), (["sm_80", "sm_86"], [])):
        obj = tmp_path / "k.o"
        proc = subprocess.run([_nvcc(), "-c", *_cuda_archs.nvcc_flags(sass, ptx), str(source), "-o", str(obj)],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert _cuda_archs.fatbin_targets(obj) == sass + ptx
    with pytest.raises(ValueError, match="not a little-endian 64-bit ELF"):
        _cuda_archs.fatbin_targets(source)


def test_the_library_holds_the_targets_it_reports():
    """vqfast._C's embedded CUDA code is what cuda_archs() says (none in a CPU-only build). The fatbin
    records no arch-specific suffix (sm_90a), so the comparison leaves it out."""
    if not vqfast.has_ext():
        pytest.skip("vqfast._C is not built")
    assert _cuda_archs.fatbin_targets(_ext._C.__file__) == [t.rstrip("af") for t in vqfast.cuda_archs()]
