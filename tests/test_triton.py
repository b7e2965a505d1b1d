"""The Triton backend: interpreter correctness (in a subprocess), real GPU compilation, GPU tests."""
import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# A kernel that loops over a scalar argument, nothing of vqfast: some triton releases' interpreters
# fail on it with newer NumPy (triton 3.6 with NumPy >= 2.4: "only 0-dimensional arrays can be
# converted to Python scalars").
_PROBE = """
import torch, triton, triton.language as tl

@triton.jit
def probe(out_ptr, n):
    acc = 0
    for i in range(0, n, 1):
        acc += i
    tl.store(out_ptr, acc)

out = torch.zeros(1, dtype=torch.int32)
probe[(1,)](out, 4)
assert int(out[0]) == 6, out
"""


def _interpreter_broken_reason(env: dict) -> str | None:
    probe = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, timeout=300)
    if probe.returncode == 0:
        return None
    import numpy

    last = (probe.stderr.strip().splitlines() or ["?"])[-1]
    return f"triton {triton.__version__}'s interpreter fails a plain loop kernel with NumPy {numpy.__version__}: {last}"


def test_interpreter_suite():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    reason = _interpreter_broken_reason(env)
    if reason is not None:
        pytest.skip(reason)
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.join(REPO, "tests", "test_triton_interpreter.py")],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=900,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "skipped" not in out.stdout.splitlines()[-1]


def _search_signature(ptr: str):
    return {
        "z_ptr": ptr, "cb_ptr": ptr, "cbn_ptr": "*fp32", "idx_ptr": "*i64", "best_ptr": "*fp32", "second_ptr": "*fp32",
        "N": "i32", "K": "i32", "D": "i32", "stride_zn": "i32", "stride_zd": "i32", "stride_cn": "i32", "stride_cd": "i32",
        "K_BUCKET": "i32", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "BLOCK_D": "constexpr",
        "INPUT_PRECISION": "constexpr", "CAST_FP32": "constexpr",
    }


# (pointer type, input precision, widen to fp32, is the fast tensor-core path)
VARIANTS = [
    ("*fp32", "ieee", False, False),  # exact, fp32
    ("*fp16", "ieee", True, False),  # exact, fp16 widened
    ("*fp32", "tf32", False, True),  # fast, tf32
    ("*fp16", "tf32", False, True),  # fast, fp16
    ("*bf16", "tf32", False, True),  # fast, bf16
]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="needs compiled, not interpreted, kernels")
@pytest.mark.parametrize("arch", [80, 90])
def test_every_config_compiles_for_gpu(arch):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from vqfast.triton import GATHER_BLOCK_D, GATHER_BLOCK_N, LARGE_N_CONFIGS, SMALL_N_CONFIGS, kernels

    target = GPUTarget("cuda", arch, 32)
    for bn, bk, bd, warps, stages in LARGE_N_CONFIGS + SMALL_N_CONFIGS:
        for ptr, prec, widen, fast in VARIANTS:
            src = ASTSource(
                fn=kernels._search_kernel,
                signature=_search_signature(ptr),
                constexprs={"BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_D": bd, "INPUT_PRECISION": prec, "CAST_FP32": widen},
            )
            ptx = triton.compile(src, target=target, options={"num_warps": warps, "num_stages": stages}).asm["ptx"]
            if fast:
                tensor_core = "wgmma" if arch == 90 and bn >= 64 else "mma"
                assert tensor_core in ptx or "mma.sync" in ptx, (arch, bn, bk, bd, ptr, prec)
            else:
                assert "fma.rn.f32" in ptx, (arch, bn, bk, bd, ptr, prec)
    gather = ASTSource(
        fn=kernels._gather_kernel,
        signature={"z_ptr": "*fp32", "cb_ptr": "*fp32", "idx_ptr": "*i64", "cw_ptr": "*fp32", "dist_ptr": "*fp32",
                   "N": "i32", "D": "i32", "stride_zn": "i32", "stride_zd": "i32", "stride_cn": "i32", "stride_cd": "i32",
                   "BLOCK_N": "constexpr", "BLOCK_D": "constexpr"},
        constexprs={"BLOCK_N": GATHER_BLOCK_N, "BLOCK_D": GATHER_BLOCK_D},
    )
    assert triton.compile(gather, target=target).asm["ptx"]


def test_k_bucket():
    from vqfast.triton import k_bucket

    assert [k_bucket(k) for k in (1, 2, 3, 1000, 1024, 1025)] == [1, 2, 4, 1024, 1024, 2048]


gpu = pytest.mark.gpu


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,d,k", [(1, 32, 4096), (1000, 17, 1000), (65537, 64, 16385), (4097, 256, 3000), (300, 1024, 513)])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_gpu_exact_matches_oracle(dtype, n, d, k, metric):
    import vqfast
    from tests.helpers import assert_exact
    from vqfast.testing import oracle

    z = torch.randn(n, d, device="cuda").to(dtype)
    cb = torch.randn(k, d, device="cuda").to(dtype)
    out = vqfast.nearest_codeword(z, cb, metric=metric, backend="triton")
    rows = oracle.sample_rows(n, k, d, budget=1 << 30).cuda()  # all rows but the largest case's
    assert_exact(z[rows], cb, tuple(t[rows] for t in out), metric)


@gpu
def test_gpu_fast_mode_and_compile():
    import vqfast
    from tests.helpers import assert_exact, assert_fast

    z = torch.randn(20000, 64, device="cuda")
    cb = torch.randn(8192, 64, device="cuda")
    out = vqfast.nearest_codeword(z, cb, precision="fast", backend="triton")
    mismatch = assert_fast(z[:4000], cb, tuple(t[:4000] for t in out), ("cuda", "triton"))
    assert mismatch < 0.05  # tf32 near-ties only; every row is within the bound checked above
    f = torch.compile(lambda a, b: vqfast.nearest_codeword(a, b, backend="triton"), fullgraph=True)
    exact = f(z[:4000], cb)
    assert_exact(z[:4000], cb, exact)
