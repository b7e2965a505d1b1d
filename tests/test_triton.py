"""The Triton backend: interpreter correctness (in a subprocess), real GPU compilation, GPU tests."""
import os
import re
import shutil
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


def _run_interpreter_suite(*selection: str):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    reason = _interpreter_broken_reason(env)
    if reason is not None:
        pytest.skip(reason)
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *selection,
         os.path.join(REPO, "tests", "test_triton_interpreter.py")],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=900,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "skipped" not in out.stdout.splitlines()[-1]


def test_interpreter_suite():
    _run_interpreter_suite("-m", "not slow")


@pytest.mark.slow
def test_interpreter_suite_slow_cases():
    """The interpreter's slow cases: the codebook split at K = 70,001 (about 2 minutes here)."""
    _run_interpreter_suite("--slow", "-m", "slow")


# The tensor-core operand type each fast variant must multiply in (PTX spelling).
OPERAND_TYPE = {"*fp32": "tf32", "*fp16": "f16", "*bf16": "bf16"}


def ptx_opcodes(ptx: str) -> set[str]:
    """The opcodes (with their suffixes) of the instructions in a PTX text. Comments, directives and
    labels are left out, so a name or a comment that merely contains "wgmma" is not an instruction."""
    ops = set()
    for line in ptx.splitlines():
        for statement in line.split("//", 1)[0].split(";"):
            code = statement.strip().lstrip("{}").strip()
            if not code or code.startswith(".") or code.endswith(":"):
                continue
            m = re.match(r"(?:@!?%\w+\s+)?([a-z][\w.]*)", code)
            if m:
                ops.add(m.group(1))
    return ops


def sass_opcodes(sass: str) -> set[str]:
    """The opcodes of nvdisasm's listing ("/*0120*/  HGMMA.64x128x8.F32.TF32 ..." gives HGMMA)."""
    return set(re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass))


def wgmma_expected(arch: int, block_n: int, num_warps: int) -> bool:
    """Triton multiplies on sm_90 with warpgroup MMA (wgmma.mma_async, 64 rows per warpgroup of 4
    warps) when a program's tile has 64 rows or more; smaller tiles take mma.sync."""
    return arch >= 90 and block_n >= 64 and num_warps % 4 == 0


def check_tensor_cores(ptx: str, family: str, operand: str, sass: str | None = None) -> None:
    """Assert that the kernel multiplies with `family` ("wgmma", "mma" or "fma") on `operand`
    (tf32 / f16 / bf16) operands: the PTX instruction itself, and its SASS (HGMMA / HMMA) when a
    disassembly is given. The other tensor-core family must be absent, so an sm_80 build (mma.sync
    only) fails the wgmma check (test_tensor_core_check_fails_without_the_instruction)."""
    ops = ptx_opcodes(ptx)
    wgmma = {op for op in ops if op.startswith("wgmma.mma_async.")}
    mma = {op for op in ops if op.startswith("mma.sync.")}
    sass_ops = sass_opcodes(sass) if sass is not None else None
    if family == "fma":
        assert not wgmma and not mma, f"exact mode must not use tensor cores: {sorted(wgmma | mma)}"
        assert "fma.rn.f32" in ops, "exact mode: no fma.rn.f32 instruction"
        if sass_ops is not None:
            assert not sass_ops & {"HGMMA", "HMMA"}, sorted(sass_ops & {"HGMMA", "HMMA"})
            assert "FFMA" in sass_ops, "exact mode: no FFMA in the SASS"
        return
    want, other, sass_want = (wgmma, mma, "HGMMA") if family == "wgmma" else (mma, wgmma, "HMMA")
    assert want, f"no {family} instruction in the PTX (tensor-core instructions: {sorted(wgmma | mma)})"
    assert not other, f"expected {family} only, also found {sorted(other)}"
    assert all(f".{operand}." in op + "." for op in want), f"{family} on other operands than {operand}: {sorted(want)}"
    if sass_ops is not None:
        assert sass_want in sass_ops, f"no {sass_want} in the SASS"


def _nvdisasm() -> str | None:
    from triton.backends.nvidia import compiler

    path = os.path.join(os.path.dirname(compiler.__file__), "bin", "nvdisasm")
    return path if os.path.exists(path) else shutil.which("nvdisasm")


def _sass(cubin: bytes, tmp_path) -> str | None:
    tool = _nvdisasm()
    if tool is None:
        return None
    path = tmp_path / "kernel.cubin"
    path.write_bytes(cubin)
    return subprocess.run([tool, str(path)], capture_output=True, text=True, check=True, timeout=120).stdout


def _compile_search(arch, bn, bk, bd, warps, stages, ptr, prec, widen):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from vqfast.triton import codebook_widened, kernels, search_signature

    src = ASTSource(
        fn=kernels._search_kernel,
        signature=search_signature(ptr, "*fp32" if codebook_widened(prec == "ieee", widen, bd) else None),
        constexprs={"BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_D": bd, "INPUT_PRECISION": prec, "CAST_FP32": widen},
    )
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages})


def _compile_builds(arch):
    """(name, label, constexprs, CompiledKernel) of every build vqfast.triton.kernel_builds lists."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from vqfast.triton import kernel_builds

    target = GPUTarget("cuda", arch, 32)
    for name, label, fn, signature, constexprs, options in kernel_builds():
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        yield name, label, signature, constexprs, options, triton.compile(src, target=target, options=options)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="needs compiled, not interpreted, kernels")
@pytest.mark.parametrize("arch", [80, 90])
def test_every_config_compiles_for_gpu(arch):
    from vqfast.triton import search_configs

    names = set()
    searches = 0
    for name, label, signature, constexprs, options, compiled in _compile_builds(arch):
        names.add(name)
        ptx = compiled.asm["ptx"]
        assert "ld.global" in ptx, (name, label)
        if name != "_search_kernel":
            continue
        searches += 1
        fast = constexprs["INPUT_PRECISION"] == "tf32"
        ptr = signature["z_ptr"]
        wgmma = wgmma_expected(arch, constexprs["BLOCK_N"], options["num_warps"])
        family = ("wgmma" if wgmma else "mma") if fast else "fma"
        try:
            check_tensor_cores(ptx, family, OPERAND_TYPE[ptr])
        except AssertionError as e:
            raise AssertionError(f"sm_{arch} {label}: {e}") from None
    assert names == {"_search_kernel", "_merge_splits_kernel", "_gather_kernel", "_rows_kernel", "_rerank_f64_kernel",
                     "_rerank_f32x2_kernel"}
    # each mode's configurations in its three variants (fp32, fp16, bf16)
    assert searches == 3 * sum(len(search_configs(exact, small)) for exact in (False, True) for small in (False, True))


def _ptxas_report(compiled, arch, tmp_path) -> str:
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    ptx = tmp_path / "k.ptx"
    ptx.write_text(compiled.asm["ptx"], encoding="utf-8")
    cmd = [get_ptxas(arch).path, "-v", "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(arch)}",
           str(ptx), "-o", str(tmp_path / "k.cubin")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout + run.stderr


def spills(report: str) -> tuple[int, int]:
    """(spill store bytes, spill load bytes) from `ptxas -v` output."""
    found = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    assert found, report[-2000:]
    return sum(int(a) for a, _ in found), sum(int(b) for _, b in found)


def test_spill_parser_reads_ptxas():
    line = ("ptxas info    : Function properties for k\n"
            "    8 bytes stack frame, 20 bytes spill stores, 12 bytes spill loads")
    assert spills(line) == (20, 12)
    with pytest.raises(AssertionError):
        spills("ptxas info    : Used 40 registers")


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="needs compiled, not interpreted, kernels")
@pytest.mark.parametrize("arch", [80, 90])
def test_no_build_spills(arch, tmp_path):
    """ptxas -v on every build (about 2 minutes an architecture here): no spill stores or loads."""
    bad = []
    for name, label, _, _, _, compiled in _compile_builds(arch):
        stores, loads = spills(_ptxas_report(compiled, arch, tmp_path))
        if stores or loads:
            bad.append(f"{name} [{label}] sm_{arch}: {stores} B spill stores, {loads} B spill loads")
    assert not bad, "\n".join(bad)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="needs compiled, not interpreted, kernels")
@pytest.mark.parametrize("arch", [80, 90])
def test_sass_of_every_fast_config_has_its_tensor_core_instruction(arch, tmp_path):
    """The machine code behind the PTX check above: HGMMA (wgmma) or HMMA (mma.sync) in nvdisasm's
    listing of every fast configuration's cubin (about 0.3 s a listing, hence the slow tier)."""
    if _nvdisasm() is None:
        pytest.skip("nvdisasm not found (Triton's NVIDIA backend ships one)")
    from vqfast.triton import LARGE_N_CONFIGS, SEARCH_VARIANTS, SMALL_N_CONFIGS

    for bn, bk, bd, warps, stages in LARGE_N_CONFIGS + SMALL_N_CONFIGS:
        for ptr, prec, widen in SEARCH_VARIANTS:
            if prec != "tf32":  # exact mode: no tensor cores
                continue
            compiled = _compile_search(arch, bn, bk, bd, warps, stages, ptr, prec, widen)
            family = "wgmma" if wgmma_expected(arch, bn, warps) else "mma"
            try:
                sass = _sass(compiled.asm["cubin"], tmp_path)
                check_tensor_cores(compiled.asm["ptx"], family, OPERAND_TYPE[ptr], sass)
            except AssertionError as e:
                raise AssertionError(f"sm_{arch} config {(bn, bk, bd, warps, stages)} {ptr} {prec}: {e}") from None


def test_large_configs_are_meant_for_wgmma_on_sm90():
    # Every large-N configuration up to BLOCK_D 64 takes the wgmma path on sm_90, so the check above
    # demands it there; the 128- and 256-wide ones hold fewer than 64 rows (mma.sync), to stay in registers.
    from vqfast.triton import LARGE_N_CONFIGS, SMALL_N_CONFIGS

    assert all(wgmma_expected(90, bn, w) for bn, _, bd, w, _ in LARGE_N_CONFIGS if bd <= 64)
    assert not any(wgmma_expected(90, bn, w) for bn, _, bd, w, _ in LARGE_N_CONFIGS if bd > 64)
    assert not any(wgmma_expected(90, bn, w) for bn, _, _, w, _ in SMALL_N_CONFIGS)
    assert not any(wgmma_expected(80, bn, w) for bn, _, _, w, _ in LARGE_N_CONFIGS)


@pytest.mark.parametrize("d,expected", [(1, 16), (4, 16), (16, 16), (17, 32), (32, 32), (33, 64), (64, 64), (100, 128),
                                        (128, 128), (129, 256), (256, 256), (257, 32), (1024, 32)])
def test_block_d_is_the_resident_width(d, expected):
    """BLOCK_D: the least power of two >= D (at least 16) up to MAX_RESIDENT_D, where the z tile is
    loaded once per program; the chunked width beyond. Every BLOCK_D has configurations of each kind."""
    from vqfast.triton import CHUNK_BLOCK_D, MAX_RESIDENT_D, _SEARCH, block_d, search_configs

    assert block_d(d) == expected
    assert (expected >= d) == (d <= MAX_RESIDENT_D)
    assert d <= MAX_RESIDENT_D or expected == CHUNK_BLOCK_D
    for exact in (False, True):
        for small in (False, True):
            assert any(c[2] == expected for c in search_configs(exact, small))
            assert (exact, small, expected) in _SEARCH


def test_search_configs_are_distinct():
    """No configuration is listed twice (the resource table has one row per build)."""
    from vqfast.triton import kernel_builds

    builds = [(name, label) for name, label, *_ in kernel_builds()]
    assert len(builds) == len(set(builds))


# A PTX text in which "wgmma" appears only in a comment and a label, beside an mma.sync: the former
# substring test ("wgmma" in ptx or "mma.sync" in ptx) passed it.
_PTX_WITHOUT_WGMMA = """
// wgmma would go here on sm_90
$L__wgmma_skip:
\t@%p1 mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%f1, %f2, %f3, %f4}, {%r1, %r2, %r3, %r4}, {%r5, %r6}, {%f1, %f2, %f3, %f4};
\tfma.rn.f32 %f5, %f6, %f7, %f8;
"""


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="needs compiled, not interpreted, kernels")
def test_tensor_core_check_fails_without_the_instruction():
    """The wgmma check fails where the instruction is absent: on a PTX text that only names it, and on
    the sm_80 build of the first large configuration (mma.sync, no wgmma.mma_async, no HGMMA), while
    the sm_90 build of the same configuration passes it."""
    from vqfast.triton import LARGE_N_CONFIGS

    assert "wgmma" in _PTX_WITHOUT_WGMMA  # the old test's condition held
    with pytest.raises(AssertionError, match="no wgmma instruction"):
        check_tensor_cores(_PTX_WITHOUT_WGMMA, "wgmma", "tf32")
    check_tensor_cores(_PTX_WITHOUT_WGMMA, "mma", "tf32")
    with pytest.raises(AssertionError, match="must not use tensor cores"):
        check_tensor_cores(_PTX_WITHOUT_WGMMA, "fma", "tf32")
    bn, bk, bd, warps, stages = LARGE_N_CONFIGS[0]
    sm80 = _compile_search(80, bn, bk, bd, warps, stages, "*fp32", "tf32", False)
    with pytest.raises(AssertionError, match="no wgmma instruction"):
        check_tensor_cores(sm80.asm["ptx"], "wgmma", "tf32")
    sm90 = _compile_search(90, bn, bk, bd, warps, stages, "*fp32", "tf32", False)
    check_tensor_cores(sm90.asm["ptx"], "wgmma", "tf32")
    # The SASS half of the check: an HMMA-only listing fails it.
    with pytest.raises(AssertionError, match="no HGMMA in the SASS"):
        check_tensor_cores(sm90.asm["ptx"], "wgmma", "tf32", "        /*0a50*/  HMMA.1688.F32.TF32 R4, R8, R12, R4 ;")
    with pytest.raises(AssertionError, match="on other operands than bf16"):
        check_tensor_cores(sm90.asm["ptx"], "wgmma", "bf16")


@pytest.mark.parametrize("n,k,sms,expected", [
    (1, 70_001, 132, (137, 512)),  # one row program: as many splits as 512-code shares allow
    (200, 70_001, 132, (21, 3456)),  # 13 row programs of 16: 21 splits fill 2 programs per SM
    (16, 2000, 132, (4, 512)),
    (5000, 70_001, 132, (1, 70_001)),  # 313 row programs already fill 132 SMs twice
    (1, 511, 132, (1, 511)),  # too few codes to split
    (1, 1025, 4, (3, 384)),  # 8 programs wanted, ceil(1025 / 512) = 3 allowed, 384 codes (a multiple of 128) each
])
def test_split_codes(n, k, sms, expected):
    from vqfast.triton import SPLIT_ALIGN, search_configs, split_codes

    splits, codes = split_codes(n, k, 16, sms)
    assert (splits, codes) == expected
    assert (splits - 1) * codes < k <= splits * codes  # no empty split, every code in one
    assert splits == 1 or codes % SPLIT_ALIGN == 0
    configs = [c for exact in (False, True) for small in (False, True) for c in search_configs(exact, small)]
    assert all(SPLIT_ALIGN % bk == 0 for _, bk, _, _, _ in configs)


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


@gpu
@pytest.mark.parametrize("variant", ["float64", "float32x2"])
@pytest.mark.parametrize("kind,n,k", [("duplicates", 300, 3000), ("offset", 64, 70_001), ("lattice", 2000, 500)])
def test_gpu_rerank_variants_and_extremes(variant, kind, n, k, monkeypatch):
    """Both device re-rank kernels on rows the search cannot prove (one split and many), and the flagged
    op's extremes, on the GPU."""
    import vqfast
    from tests.helpers import assert_exact, make_hard_case

    monkeypatch.setenv("VQFAST_TRITON_RERANK", variant)
    z, cb = make_hard_case(kind, n, k, 32, seed=3)
    z, cb = z.float().cuda(), cb.float().cuda()
    assert_exact(z, cb, vqfast.nearest_codeword(z, cb, backend="triton"))
    extremes = torch.ops.vqfast.nearest_codeword_triton_flagged(z, cb, "l2", "exact")[3]
    assert extremes.tolist() == [float(z.abs().max()), float(cb.abs().max())]
