"""The CUDA backend: nvcc builds of csrc/cuda/*.cu with a register/spill report, and GPU tests.

The build tests need only nvcc (no GPU, no CUDA torch); they skip where nvcc is absent. The GPU
tests compare backend="cuda" with the float64 oracle and skip without a CUDA device.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import vqfast
from tests.helpers import assert_exact, assert_fast, make_hard_case
from tests.test_resources import resources
from vqfast import _ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")
CU_FILES = sorted(glob.glob(os.path.join(CUDA_DIR, "*.cu")))
# Kernels whose register use decides occupancy; they must not spill (a spill goes to local memory).
MAIN_KERNELS = ("nearest_codeword_kernel",)


# The ptxas report parser, nvcc lookup and torch's nvcc flags of scripts/resources.py (the resource table).
TORCH_NVCC_FLAGS = resources.TORCH_NVCC_FLAGS
parse_ptxas_report = resources.parse_ptxas_report
_nvcc = resources._nvcc


def test_kernel_sources_include_no_torch_headers():
    assert CU_FILES, f"no .cu files under {CUDA_DIR}"
    for path in CU_FILES + glob.glob(os.path.join(CUDA_DIR, "*.h")):
        text = open(path, encoding="utf-8").read()
        bad = re.findall(r"#\s*include\s*[<\"]((?:torch|ATen|c10)/[^>\"]*)[>\"]", text)
        assert not bad, f"{os.path.basename(path)} includes torch headers {bad}; only binding.cpp may"


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found (set CUDA_HOME)")
@pytest.mark.parametrize("arch", ["80", "90"])
@pytest.mark.parametrize("source", CU_FILES, ids=os.path.basename)
def test_nvcc_builds_without_spills(source, arch, tmp_path):
    cmd = [
        _nvcc(), "-std=c++17", "-O3", *TORCH_NVCC_FLAGS, "-c", source, "-o", str(tmp_path / "kernel.o"),
        f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"nvcc failed for sm_{arch}:\n{proc.stderr[-4000:]}"
    report = parse_ptxas_report(proc.stdout + proc.stderr)
    main = {name: r for name, r in report.items() if any(k in name for k in MAIN_KERNELS)}
    # One instantiation per element type (fp32 / fp16 / bf16), precision mode (fp32 FMA / TF32 mma)
    # and load width (element / 16 bytes).
    assert len(main) >= 12, f"expected the main kernels in the ptxas report, got {sorted(report)}"
    print(f"\nptxas sm_{arch} {os.path.basename(source)}:")
    for name, r in sorted(report.items()):
        print(f"  {name}: {r}")
    for name, r in main.items():
        assert r.get("spill_stores", 0) == 0 and r.get("spill_loads", 0) == 0, f"{name} spills on sm_{arch}: {r}"
        assert r.get("registers", 0) <= 255, f"{name} reports {r.get('registers')} registers on sm_{arch}"


@pytest.fixture(scope="module")
def standalone_check(tmp_path_factory):
    """tests/cuda/check_nearest_codeword.cu built with nvcc: it drives the kernels without torch (also
    under compute-sanitizer)."""
    if _nvcc() is None:
        pytest.skip("nvcc not found (set CUDA_HOME)")
    exe = tmp_path_factory.mktemp("standalone") / "check_nearest_codeword"
    cmd = [
        _nvcc(), "-std=c++17", "-O2", *TORCH_NVCC_FLAGS, "-I", CUDA_DIR, "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90,code=sm_90", os.path.join(ROOT, "tests", "cuda", "check_nearest_codeword.cu"),
        os.path.join(CUDA_DIR, "nearest_codeword.cu"), "-o", str(exe),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"nvcc failed:\n{proc.stderr[-4000:]}"
    return exe


def test_standalone_check_builds(standalone_check):
    assert standalone_check.exists()


@pytest.mark.gpu
def test_standalone_check_runs_on_a_gpu(standalone_check):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device to run the built check")
    run = subprocess.run([str(standalone_check)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "all checks passed" in run.stdout


# ---------------------------------------------------------------------------------------------
# csrc/cuda/binding.cpp (the torch side: checks, launches on the current stream, the float64 re-rank
# and the exact-mode proof) compiled syntax-only with g++ against the installed torch's own ATen /
# c10 / c10/cuda headers and the CUDA toolkit's runtime headers, plus one stand-in for the header a
# CUDA build of torch generates (tests/cuda/binding_standins). A CUDA torch is a multi-GiB download;
# these are the same declarations it compiles against.

BINDING = os.path.join(CUDA_DIR, "binding.cpp")
BINDING_STANDINS = os.path.join(ROOT, "tests", "cuda", "binding_standins")
# A type error planted in a scratch copy: the compile must fail on it (a Tensor is not a double).
BINDING_TYPE_ERROR = ("const at::Tensor list = at::empty(", "const double list = at::empty(")


def _cuda_include_dir() -> str | None:
    nvcc = _nvcc()
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    if nvcc:
        homes.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in homes:
        if home and os.path.exists(os.path.join(home, "include", "cuda_runtime_api.h")):
            return os.path.join(home, "include")
    return None


def _binding_compile(source: str) -> subprocess.Popen:
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    includes = [BINDING_STANDINS, *include_paths(), _cuda_include_dir(), sysconfig.get_paths()["include"], CUDA_DIR]
    cmd = [shutil.which("g++") or "g++", "-std=c++20", "-fsyntax-only", "-w", "-x", "c++", "-DVQFAST_WITH_CUDA"]
    cmd += [f"-I{d}" for d in includes] + [source]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def binding_compiles(tmp_path_factory):
    """(clean, planted) CompletedProcess-like results of the two compiles, run side by side."""
    if shutil.which("g++") is None:
        pytest.skip("g++ not found")
    if _cuda_include_dir() is None:
        pytest.skip("the CUDA toolkit's runtime headers (cuda_runtime_api.h) were not found (set CUDA_HOME)")
    text = open(BINDING, encoding="utf-8").read()
    old, new = BINDING_TYPE_ERROR
    assert text.count(old) == 1, f"binding.cpp no longer contains {old!r}: update BINDING_TYPE_ERROR"
    planted = tmp_path_factory.mktemp("binding") / "binding.cpp"
    planted.write_text(text.replace(old, new), encoding="utf-8")
    procs = [_binding_compile(BINDING), _binding_compile(str(planted))]
    outputs = [p.communicate(timeout=600) for p in procs]  # both run meanwhile, one per core
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]


def test_binding_compiles_against_torch_headers(binding_compiles):
    rc, _, err = binding_compiles[0]
    assert rc == 0, f"csrc/cuda/binding.cpp does not compile:\n{err[-4000:]}"


def test_binding_compile_catches_a_planted_type_error(binding_compiles):
    rc, _, err = binding_compiles[1]
    assert rc != 0 and "cannot convert" in err and "double" in err, err[-2000:]


# ---------------------------------------------------------------------------------------------
# No host sync: the binding and the kernels' launch code must not wait for the device or read a
# device value back (the search stays capturable in a CUDA graph; vqfast/ops.py then reads the flagged
# op's extremes once per call). The C++ text, comments and string literals removed, is scanned for
# every primitive that synchronises with the host.

HOST_SYNC_PRIMITIVES = {
    "nonzero (its output size is read back)": r"\bnonzero\s*\(",
    "is_nonzero": r"\bis_nonzero\b",
    "masked_select / unique (output sizes read back)": r"\b(?:masked_select|unique\w*|unique_consecutive)\s*\(",
    ".item()": r"\.\s*item\s*(?:<[^>]*>)?\s*\(",
    "_local_scalar_dense": r"\b_local_scalar_dense\b",
    "a Scalar read from a tensor": r"\b(?:c10|at)::Scalar\b|\.\s*to\s*<\s*(?:double|float|int|int64_t|long|bool)\s*>\s*\(",
    ".cpu()": r"\.\s*cpu\s*\(",
    "a copy to the CPU": r"\bkCPU\b|DeviceType::CPU\b|Device\s*\(\s*\"cpu",
    ".tolist": r"\btolist\b",
    "equal()": r"(?:\bat::|\.\s*)equal\s*\(",
    "cudaDeviceSynchronize / cudaStreamSynchronize / cudaEventSynchronize": r"\bcuda\w*Synchronize\b",
    "a synchronize() call": r"\bsynchronize\s*\(|\bdevice_synchronize\b|memcpy_and_sync",
    "cudaMemcpy (synchronous, or to host memory)": r"\bcudaMemcpy\w*\b",
    "cudaMemset (synchronous)": r"\bcudaMemset\b",
}
HOST_SYNC_SOURCES = [BINDING, *CU_FILES]


def _code_only(text: str) -> str:
    """C++ text with comments and string / character literals blanked (line breaks kept)."""
    pattern = re.compile(r'//[^\n]*|/\*.*?\*/|"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\'', re.S)
    return pattern.sub(lambda m: "\n" * m.group(0).count("\n") + ('""' if m.group(0)[0] == '"' else " "), text)


def host_syncs(text: str) -> list[str]:
    """'line: what' for every host-sync primitive in C++ source text."""
    code = _code_only(text)
    found = []
    for what, pattern in HOST_SYNC_PRIMITIVES.items():
        for m in re.finditer(pattern, code):
            found.append(f"{code.count(chr(10), 0, m.start()) + 1}: {what}")
    return found


@pytest.mark.parametrize("source", HOST_SYNC_SOURCES, ids=os.path.basename)
def test_no_host_sync_in_the_binding_or_the_launchers(source):
    found = host_syncs(open(source, encoding="utf-8").read())
    assert not found, f"{os.path.relpath(source, ROOT)} synchronises with the host:\n" + "\n".join(found)


# Lines planted into a copy of binding.cpp (after the marking launch): each one syncs with the host.
PLANTED_SYNCS = [
    "const at::Tensor rows = best_dist.le(second_dist).logical_not().nonzero().squeeze(1);",
    "const double worst = second_dist.max().item<double>();",
    "const int64_t many = (best_dist > 0).sum().item().toLong();",
    "cudaStreamSynchronize(stream);",
    "const at::Tensor host = indices.cpu();",
    "const at::Tensor host = indices.to(at::kCPU);",
    "TORCH_CHECK(at::equal(indices, indices));",
    "cudaMemcpy(&n_host, count, 8, cudaMemcpyDeviceToHost);",
]
PLANT_AFTER = '"marking");\n'


@pytest.mark.parametrize("line", PLANTED_SYNCS)
def test_host_sync_scan_catches_a_planted_sync(line):
    text = open(BINDING, encoding="utf-8").read()
    assert text.count(PLANT_AFTER) == 1, f"binding.cpp no longer contains {PLANT_AFTER!r}: update PLANT_AFTER"
    assert host_syncs(text) == []
    found = host_syncs(text.replace(PLANT_AFTER, PLANT_AFTER + "    " + line + "\n"))
    assert found, f"the scan missed {line!r}"


def test_host_sync_scan_ignores_comments_and_strings():
    text = '// a nonzero() here is prose\nTORCH_CHECK(ok, "call .item() and .cpu() elsewhere");\n/* cudaDeviceSynchronize() */\n'
    assert host_syncs(text) == []
    assert host_syncs(text + "auto n = t.nonzero();\n") == ["4: nonzero (its output size is read back)"]


# ---------------------------------------------------------------------------------------------
# GPU tests: backend="cuda" against the independent float64 oracle (vqfast/testing/oracle.py), which
# runs on the GPU too. Without a GPU (or a CUDA build) each of them is collected and skipped.

ODD_SHAPES = [(1, 1, 1), (1, 5, 3), (7, 130, 17), (100, 65, 100), (257, 1000, 64), (65, 64, 16), (300, 4099, 33)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CUDA = ("cuda", "cuda")


def _skip_without_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if not _ext.has_cuda_ext():
        pytest.skip(f"vqfast._C was built without CUDA kernels (rebuild: {_ext.REBUILD_COMMAND})")


def _random_inputs(n, k, d, dtype, device="cuda"):
    z = torch.randn(n, d, device=device).to(dtype)
    codebook = torch.randn(k, d, device=device).to(dtype)
    return z, codebook


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ODD_SHAPES, ids=str)
@pytest.mark.gpu
def test_exact_matches_oracle(shape, dtype, metric):
    _skip_without_cuda()
    n, k, d = shape
    z, codebook = _random_inputs(n, k, d, dtype)
    assert_exact(z, codebook, vqfast.nearest_codeword(z, codebook, metric=metric, backend="cuda"), metric)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ODD_SHAPES, ids=str)
@pytest.mark.gpu
def test_fast_within_its_rounding_bound(shape, dtype, metric):
    # TF32 (fp32, mixed dtypes, cosine) or native 16-bit products, fp32 accumulation: every row within
    # the bound of oracle.fast_rounding / fast_bound; the mismatch rate is printed at the end of the run.
    _skip_without_cuda()
    n, k, d = shape
    z, codebook = _random_inputs(n, k, d, dtype)
    out = vqfast.nearest_codeword(z, codebook, metric=metric, precision="fast", backend="cuda")
    assert_fast(z, codebook, out, CUDA, metric)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_ties_take_the_lowest_index(precision):
    _skip_without_cuda()
    d = 17
    codebook = torch.randn(200, d, device="cuda")
    codebook[131] = codebook[7]  # duplicate codewords: equal distances to every z
    codebook[199] = codebook[7]
    codebook[70] = codebook[64]  # a duplicate across two 64-code tiles
    z = torch.cat([codebook[[7, 131, 199, 64, 70]], codebook[[7, 64]] + 1e-3 * torch.randn(2, d, device="cuda")])
    idx = vqfast.nearest_codeword(z, codebook, precision=precision, backend="cuda")[0]
    assert idx.tolist() == [7, 7, 7, 64, 64, 7, 64]


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["offset", "lattice", "duplicates", "tiny_codebook", "magnitude"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_hard_cases_match_the_oracle(kind, dtype):
    """Common offsets (near ties the re-rank must resolve), exact lattice ties, many duplicates across
    tiles, a tiny codebook, 1e-30 magnitudes: the rows the binding's float64 re-rank decides."""
    _skip_without_cuda()
    z, codebook = make_hard_case(kind, 777, 1025, 33, seed=11, scale=1e-30)
    z, codebook = z.to("cuda", dtype), codebook.to("cuda", dtype)
    assert_exact(z, codebook, vqfast.nearest_codeword(z, codebook, backend="cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("rerank", ["float64", "compensated"])
@pytest.mark.parametrize("kind", ["offset", "lattice", "duplicates", "tiny_codebook", "magnitude"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_both_reranks_match_the_oracle(dtype, kind, rerank, monkeypatch):
    """The exact re-rank in float64 and in compensated float32 (chosen from the device's float64 rate;
    VQFAST_CUDA_RERANK forces one): the oracle's answer on the rows the float32 bound cannot prove."""
    _skip_without_cuda()
    monkeypatch.setenv("VQFAST_CUDA_RERANK", rerank)
    z, codebook = make_hard_case(kind, 777, 1025, 33, seed=12, scale=1e-30)
    z, codebook = z.to("cuda", dtype), codebook.to("cuda", dtype)
    assert_exact(z, codebook, vqfast.nearest_codeword(z, codebook, backend="cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_no_host_sync_on_a_gpu(precision):
    """torch's sync debug mode raises on any synchronising torch call (nonzero, item, copies to the
    host), and a CUDA graph cannot capture one: the op passes both."""
    _skip_without_cuda()
    z, codebook = _random_inputs(300, 513, 24, torch.float32)
    z[:50] = codebook[:50]  # rows on codewords next to copies: the exact re-rank has work
    codebook[100:150] = codebook[:50]
    op = torch.ops.vqfast.nearest_codeword
    op(z, codebook, "l2", precision)  # first call: device queries and opt-ins, before capture
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        op(z, codebook, "l2", precision)
        torch.ops.vqfast.nearest_codeword_flagged(z, codebook, "l2", precision)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = op(z, codebook, "l2", precision)
    z.copy_(torch.randn_like(z))
    z[:50] = codebook[100:150]
    graph.replay()
    torch.cuda.synchronize()
    if precision == "exact":
        assert_exact(z, codebook, out)
    else:
        assert_fast(z, codebook, out, CUDA)


@pytest.mark.gpu
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64], ids=str)
def test_flagged_op_reports_the_extremes(dtype, metric):
    _skip_without_cuda()
    z, codebook = _random_inputs(130, 70, 9, dtype)
    flagged = torch.ops.vqfast.nearest_codeword_flagged
    out = flagged(z, codebook, metric, "exact")
    plain = torch.ops.vqfast.nearest_codeword(z, codebook, metric, "exact")
    for a, b in zip(out[:3], plain):
        assert torch.equal(a, b)
    expected = torch.stack([z.double().abs().max(), codebook.double().abs().max()])
    assert out[3].dtype == torch.float64 and out[3].device == z.device
    assert torch.equal(out[3], expected)
    z[7, 3] = float("inf")
    assert flagged(z, codebook, metric, "fast")[3].tolist() == [float("inf"), expected[1].item()]
    codebook[5, 1] = float("nan")
    ext = flagged(z, codebook, metric, "exact")[3].tolist()
    assert ext[0] == float("inf") and ext[1] != ext[1]
    z[2, 2] = float("nan")
    assert all(v != v for v in flagged(z, codebook, metric, "exact")[3].tolist())


@pytest.mark.gpu
def test_exact_resolves_near_ties():
    _skip_without_cuda()
    # Codewords 1 and 3 are at true distances 2^-8 and (2^-4 - 2^-10)^2 from z, while the fp32
    # expansion at ||z||^2 = 6.4e7 is only good to ~1e3: the kernel cannot separate them, the re-rank must.
    d = 64
    z = torch.full((3, d), 1000.0, device="cuda", dtype=torch.float64)
    codebook = torch.full((5, d), 1000.0, device="cuda", dtype=torch.float64)
    codebook[1, 0] += 0.0625  # true distance 2^-8
    codebook[3, 1] -= 0.0625 - 2.0**-10  # slightly closer
    codebook[[0, 2, 4]] += 10.0
    z32, cb32 = z.float(), codebook.float()
    out = vqfast.nearest_codeword(z32, cb32, precision="exact", backend="cuda")
    assert_exact(z32, cb32, out)
    assert out[0].tolist() == [3, 3, 3]


@pytest.mark.gpu
def test_non_contiguous_and_mixed_dtypes():
    _skip_without_cuda()
    big = torch.randn(300, 2 * 19, device="cuda")
    z = big[:, ::2]  # strided rows
    codebook = torch.randn(19, 77, device="cuda").t()  # transposed view [77, 19]
    assert not z.is_contiguous() and not codebook.is_contiguous()
    for zz, cb in ((z, codebook), (z.half(), codebook), (z, codebook.bfloat16())):
        assert_exact(zz, cb, vqfast.nearest_codeword(zz, cb, backend="cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_single_row_large_codebook(precision):
    _skip_without_cuda()
    z, codebook = _random_inputs(1, 100_003, 8, torch.float32)
    out = vqfast.nearest_codeword(z, codebook, precision=precision, backend="cuda")
    if precision == "exact":
        assert_exact(z, codebook, out)
    else:
        assert_fast(z, codebook, out, CUDA)


@pytest.mark.gpu
def test_large_codebook_many_rows():
    _skip_without_cuda()
    z, codebook = _random_inputs(4099, 16_385, 32, torch.float32)
    assert_exact(z, codebook, vqfast.nearest_codeword(z, codebook, backend="cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_float64_inputs(metric):
    _skip_without_cuda()
    z, codebook = _random_inputs(130, 70, 5, torch.float64)
    assert_exact(z, codebook, vqfast.nearest_codeword(z, codebook, metric=metric, backend="cuda"), metric)


@pytest.mark.gpu
def test_runs_on_the_current_stream():
    _skip_without_cuda()
    z, codebook = _random_inputs(513, 300, 40, torch.float32)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = vqfast.nearest_codeword(z, codebook, backend="cuda")
    torch.cuda.current_stream().wait_stream(stream)
    assert_exact(z, codebook, out)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_16bit_exact_equals_fp32_holding_the_same_values(dtype):
    """fp16 / bf16 operands reach the kernels as they are (converted exactly in the loader): exact mode
    gives the indices of fp32 operands holding the same values, distances included."""
    _skip_without_cuda()
    z, codebook = _random_inputs(1000, 777, 64, dtype)
    a = vqfast.nearest_codeword(z, codebook, backend="cuda")
    b = vqfast.nearest_codeword(z.float(), codebook.float(), backend="cuda")
    assert torch.equal(a[0], b[0])
    torch.testing.assert_close(a[2], b[2], rtol=0, atol=0)
    assert_exact(z, codebook, a)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_tiny_codebook_initialisation(precision):
    """Codewords uniform in [-1/K, 1/K] next to unit-scale z (the classic initialisation): the exact
    ranking bound has no ||z||^2 term, and the answers match the oracle."""
    _skip_without_cuda()
    k = 16384
    z = torch.randn(4096, 64, device="cuda")
    codebook = (torch.rand(k, 64, device="cuda") * 2 - 1) / k
    out = vqfast.nearest_codeword(z, codebook, precision=precision, backend="cuda")
    if precision == "exact":
        assert_exact(z, codebook, out)
    else:
        assert_fast(z, codebook, out, CUDA)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("precision", ["exact", "fast"])
@pytest.mark.parametrize("d", [200, 520, 600], ids=lambda d: f"D{d}")
def test_resident_and_streamed_z(d, precision, dtype):
    """D on both sides of the resident-z limit (fp32 ~208, 16-bit fast ~544; 520 in 16-bit fast mode
    also needs the opt-in above 48 KiB of dynamic shared memory)."""
    _skip_without_cuda()
    z, codebook = _random_inputs(130, 300, d, dtype)
    out = vqfast.nearest_codeword(z, codebook, precision=precision, backend="cuda")
    if precision == "exact":
        assert_exact(z, codebook, out)  # codewords and direct distances too
    else:
        assert_fast(z, codebook, out, CUDA)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 5, 200])
def test_split_codebook_matches_oracle(n):
    """Few rows against a large codebook: the search splits the codebook over more blocks."""
    _skip_without_cuda()
    z, codebook = _random_inputs(n, 50_001, 32, torch.float32)
    assert_exact(z, codebook, vqfast.nearest_codeword(z, codebook, backend="cuda"))


@pytest.mark.gpu
def test_cuda_matches_triton():
    _skip_without_cuda()
    if "triton" not in vqfast.available_backends("cuda"):
        pytest.skip("the triton backend is not available")
    z, codebook = _random_inputs(777, 513, 48, torch.bfloat16)
    a = vqfast.nearest_codeword(z, codebook, backend="cuda")[0]
    b = vqfast.nearest_codeword(z, codebook, backend="triton")[0]
    assert torch.equal(a, b)


@pytest.mark.gpu
def test_opcheck_and_gradients():
    _skip_without_cuda()
    z = torch.randn(37, 9, device="cuda")
    codebook = torch.randn(21, 9, device="cuda")
    # Schema, fake tensor and AOT dispatch of the CUDA registration; gradients are compared below.
    torch.library.opcheck(torch.ops.vqfast.nearest_codeword.default, (z, codebook, "l2", "exact"))
    torch.library.opcheck(torch.ops.vqfast.nearest_codeword_flagged.default, (z, codebook, "l2", "exact"))
    z.requires_grad_()
    codebook.requires_grad_()
    idx, cw, dist = vqfast.nearest_codeword(z, codebook, backend="cuda")
    (cw.sum() + dist.sum()).backward()
    z2, cb2 = z.detach().clone().requires_grad_(), codebook.detach().clone().requires_grad_()
    _, cw2, dist2 = vqfast.nearest_codeword(z2, cb2, backend="torch")
    (cw2.sum() + dist2.sum()).backward()
    torch.testing.assert_close(z.grad, z2.grad)
    torch.testing.assert_close(codebook.grad, cb2.grad)


@pytest.mark.gpu
def test_bad_inputs_raise():
    _skip_without_cuda()
    z = torch.randn(4, 3, device="cuda")
    with pytest.raises(ValueError, match="codebook"):
        vqfast.nearest_codeword(z, torch.randn(5, 4, device="cuda"), backend="cuda")
    with pytest.raises(ValueError, match="device"):
        vqfast.nearest_codeword(z, torch.randn(5, 3), backend="cuda")
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        torch.ops.vqfast.nearest_codeword(z.cpu(), torch.randn(5, 3, device="cuda"))


def test_gpu_check_script_parses_and_names_existing_files():
    """scripts/gpu_check.sh only runs on a GPU machine: check here that it parses and that the
    sources it compiles and the command it benchmarks with still exist."""
    script = os.path.join(ROOT, "scripts", "gpu_check.sh")
    proc = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = open(script, encoding="utf-8").read()
    for path in re.findall(r"\b(?:csrc|tests)/[\w/]+\.\w+", text):
        assert os.path.exists(os.path.join(ROOT, path)), f"gpu_check.sh names a missing file: {path}"
    from vqfast.bench import presets

    default = re.search(r'--preset "\$\{PRESET:-(\w+)\}" --device cuda', text)
    assert default is not None and default.group(1) in presets.PRESETS and "full" in presets.PRESETS


def _fake_gpu_tools(tmp_path, fail_on: str | None) -> dict[str, str]:
    """A PATH and PYTHON under which scripts/gpu_check.sh runs every stage with stand-in tools that log
    what they were given (the Python programs read from stdin included); the Python call whose
    arguments contain ``fail_on`` fails."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(
        "#!/bin/sh\n"
        f'echo "python $*" >> {log}\n'
        f'if [ "$1" = "-" ]; then cat >> {log}; fi\n'
        + (f'case "$*" in *{fail_on}*) exit 1;; esac\n' if fail_on else "")
        + "exit 0\n")
    (bin_dir / "nvcc").write_text(  # writes the check executable it is asked for: it prints one " ok " line
        "#!/bin/sh\nwhile [ $# -gt 0 ]; do if [ \"$1\" = -o ]; then out=$2; fi; shift; done\n"
        'printf \'#!/bin/sh\\necho " ok "\\n\' > "$out"; chmod +x "$out"\n')
    (bin_dir / "compute-sanitizer").write_text("#!/bin/sh\necho ' ok '\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=str(bin_dir / "python"),
               LOGS=str(tmp_path / "logs"), RESULTS=str(tmp_path / "results"))
    return env


@pytest.mark.parametrize("fail_on", [None, "pytest", "bench"])
def test_gpu_check_records_the_gpu_only_when_every_stage_passed(tmp_path, fail_on):
    env = _fake_gpu_tools(tmp_path, fail_on)
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), "all"], env=env,
                          capture_output=True, text=True, timeout=120)
    calls = (tmp_path / "calls.log").read_text()
    assert "-m pytest" in calls  # the stages ran with the stand-ins
    if fail_on is None:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert calls.count("backends.record_validation(") == 1
        assert "torch.cuda.get_device_name()" in calls and "backends.gpu_arch()" in calls
    else:
        assert proc.returncode != 0
        assert "record_validation" not in calls, f"recorded after {fail_on} failed"


# ---------------------------------------------------------------------------------------------
# The kernels under the host emulator (tests/cuda/emulation): their logic runs here, with no GPU.

EMULATOR_DIR = os.path.join(ROOT, "tests", "cuda", "emulation")
CHECK_SOURCE = os.path.join(ROOT, "tests", "cuda", "check_nearest_codeword.cu")


def _build_emulated_check(kernel_dir: str, out: str) -> subprocess.CompletedProcess:
    cmd = [
        shutil.which("g++") or "g++", "-std=c++17", "-O1", "-U_FORTIFY_SOURCE", "-x", "c++", "-DVQFAST_CUDA_EMULATION",
        "-I", EMULATOR_DIR, "-I", kernel_dir, "-I", CUDA_DIR,  # the last for "../tolerance.h" of a copied kernel
        CHECK_SOURCE, os.path.join(kernel_dir, "nearest_codeword.cu"), "-o", out,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


needs_emulator = pytest.mark.skipif(
    shutil.which("g++") is None or not sys.platform.startswith("linux"),
    reason="the host emulator needs g++ on Linux",
)


@pytest.fixture(scope="module")
def emulated_check(tmp_path_factory):
    exe = str(tmp_path_factory.mktemp("emulated") / "check_nearest_codeword")
    proc = _build_emulated_check(CUDA_DIR, exe)
    assert proc.returncode == 0, f"g++ failed on the emulated kernels:\n{proc.stderr[-4000:]}"
    return exe


@needs_emulator
@pytest.mark.parametrize("copies", ["deferred", "eager"])
def test_kernels_pass_the_check_under_the_host_emulator(emulated_check, copies):
    """Every kernel of csrc/cuda (norms, search in both modes for fp32/fp16/bf16, split search and
    merge, gather + distance) runs its real code under the emulator and passes the same checks as on
    a GPU. cp.async copies land as late as the hardware may land them (deferred) or at issue."""
    env = dict(os.environ, VQFAST_EMU_CP_ASYNC=copies)
    run = subprocess.run([emulated_check], capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "all checks passed" in run.stdout
    assert run.stdout.count(" ok ") == 13 * 2 * 3  # shapes x modes x element types
    # The exact pipeline (maxima, marking, re-rank) on near ties, copies, NaN / Inf, overflow, every row
    # ambiguous: inputs x re-rank variants (float64, compensated float32) x element types.
    assert run.stdout.count(" pass (") == (7 * 3 + 2) * 2  # fp16 cannot hold the float64-level tie


# Planted bugs the emulated check must catch: (what, original text, replacement).
MUTATIONS = [
    ("mma A fragment rows/columns swapped", "a[mi][1] = to_tf32(z8[kk + t]);", "a[mi][1] = to_tf32(z0[kk + t + 4]);"),
    ("native 16-bit mma A fragment rows/columns swapped", "a[mi][1] = load_pair(z8 + 2 * t);",
     "a[mi][1] = load_pair(z0 + 2 * t + 8);"),
    ("waiting for one cp.async stage too few", "    cp_async_wait<1>();", "    cp_async_wait<2>();"),
    ("split search ignores its code offset", "const int64_t code0 = (tile0 + s / feat_tiles) * kBlockCodes;",
     "const int64_t code0 = (s / feat_tiles) * kBlockCodes;"),
    ("fp16/bf16 chunk converted from the wrong words",
     "*reinterpret_cast<float4*>(dst + r * stride + f) = unpack4<T>(v.x, v.y);",
     "*reinterpret_cast<float4*>(dst + r * stride + f) = unpack4<T>(v.z, v.w);"),
    ("fused epilogue reads another row of z", "return stored_to_float<T>(zres[lr * z_stride + j]);",
     "return stored_to_float<T>(zres[(lr ^ 1) * z_stride + j]);"),
    ("resident z read without its feature-tile offset", "return zres + r * z_stride + ft * kFeat;",
     "return zres + r * z_stride;"),
    ("re-rank warps stop after one pass over the grid", "for (int64_t e = first; e < entries; e += stride) {",
     "for (int64_t e = first; e < entries && e < stride; e += stride) {"),
    ("marking ignores the tolerance", "__dadd_rn(static_cast<double>(best_dist[row]), tol)",
     "static_cast<double>(best_dist[row])"),
    ("float64 re-rank ties go to the higher index", "if (ob < best || (ob == best && oi < index))",
     "if (ob < best || (ob == best && oi > index))"),
    ("compensated re-rank keeps its own lane's index", "      best = ob;\n      at = oat;\n", "      best = ob;\n"),
    ("block maximum reads only its first warp", "for (int w = 1; w < kWarps; ++w)", "for (int w = 1; w < 1; ++w)"),
    ("small D runs 8-feature stages over a 4-feature z stride", "return feat == 4 ? four[vec] : eight[tf32][vec];",
     "return feat == 4 ? eight[0][vec] : eight[tf32][vec];"),
    ("D = 5 takes 4-feature stages", "if (d <= 4 && !tf32) return 4;", "if (d <= 5 && !tf32) return 4;"),
    ("large dynamic shared memory opted in at every launch",
     "if (done != nullptr && done->load(std::memory_order_acquire)) return cudaSuccess;", ""),
]


@needs_emulator
@pytest.mark.slow  # one emulator build and run per planted bug: 4-14 s each, over 3 minutes in all
@pytest.mark.parametrize("what,original,replacement", MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_emulated_check_catches_planted_bugs(tmp_path, what, original, replacement):
    source = open(os.path.join(CUDA_DIR, "nearest_codeword.cu"), encoding="utf-8").read()
    assert source.count(original) == 1, f"the kernel no longer contains {original!r}: update MUTATIONS"
    (tmp_path / "nearest_codeword.cu").write_text(source.replace(original, replacement), encoding="utf-8")
    shutil.copy(os.path.join(CUDA_DIR, "nearest_codeword.h"), tmp_path / "nearest_codeword.h")
    exe = str(tmp_path / "check")
    proc = _build_emulated_check(str(tmp_path), exe)
    assert proc.returncode == 0, proc.stderr[-4000:]
    env = dict(os.environ, VQFAST_CHECK_FAIL_FAST="1")
    run = subprocess.run([exe], capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode != 0 and "FAIL" in run.stdout, f"the check missed: {what}"
