"""The CPU kernel's instruction levels (csrc/cpu/dispatch.cpp, csrc/cpu/kernels/).

Every level this CPU runs gives the reference's indices and the same codewords and distances, bit
for bit, as every other level; VQFAST_CPU_ISA forces a level; a level the build or the CPU lacks
makes the import fail with a ValueError; and in the built library only a level's own code uses
that level's instructions.
"""
import os
import platform
import re
import shutil
import subprocess
import sys

import pytest
import torch

import vqfast
from vqfast import _ext
from vqfast.reference import nearest_codeword_reference

pytestmark = pytest.mark.skipif(not _ext.has_ext(), reason="vqfast._C is not built")

LEVELS = _ext.cpu_isa_levels()
X86 = platform.machine().lower() in ("x86_64", "amd64")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def at_every_level(z, codebook, **kwargs):
    out = {}
    for level in LEVELS:
        with _ext.forced_cpu_isa(level):
            out[level] = vqfast.nearest_codeword(z, codebook, backend="cpu", **kwargs)
    return out


def assert_levels_agree(out):
    first = next(iter(out.values()))
    for level, res in out.items():
        for a, b, name in zip(res, first, ("indices", "codewords", "distances")):
            assert torch.equal(a, b), f"{level}: {name} differ from {LEVELS[0]}'s"


# Shapes that miss every blocking: 128-row tiles, row groups of 2 vectors (8 to 32 rows), codewords
# padded to 24, 4 to 12 codewords per step, codebook blocks of 32768 / D codewords (D = 1: K = 33001
# spans two blocks), the compile-time D <= 32 kernels and the runtime-D kernel above.
SHAPES = [(1, 1, 1), (131, 33001, 1), (259, 25, 3), (517, 1031, 17), (130, 200, 31), (129, 777, 32),
          (300, 150, 33), (77, 49, 100), (45, 300, 257)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("n,k,d", SHAPES)
def test_every_level_matches_reference_and_each_other(n, k, d, dtype):
    z = torch.randn(n, d).to(dtype)
    codebook = torch.randn(k, d).to(dtype)
    out = at_every_level(z, codebook)
    ridx, rcw, rdist = nearest_codeword_reference(z, codebook, "l2")
    for level, (idx, cw, dist) in out.items():
        assert torch.equal(idx, ridx), f"{level}: {(idx != ridx).sum()} indices differ from the reference"
        assert torch.equal(cw, rcw)
        rtol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(dist, rdist, rtol=rtol, atol=1e-6)
    assert_levels_agree(out)


# From 16 tiles (N >= 1921) and D >= 128 the runtime-D kernels read a step-by-step copy of the
# codebook (TileArgs::cb_steps); near-ties and duplicates straddling a codebook block (256
# codewords at D = 128) go through the re-rank, which reads the codebook as given.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,k,d", [(1921, 131, 128), (2049, 25, 257)])
def test_codebook_by_steps_at_every_level(n, k, d, dtype):
    z = torch.randn(n, d).to(dtype)
    codebook = torch.randn(k, d).to(dtype)
    out = at_every_level(z, codebook)
    ridx, rcw, _ = nearest_codeword_reference(z, codebook, "l2")
    for level, (idx, cw, _) in out.items():
        assert torch.equal(idx, ridx), f"{level}: {(idx != ridx).sum()} indices differ from the reference"
        assert torch.equal(cw, rcw)
    assert_levels_agree(out)
    codebook = 1000.0 + 1e-2 * torch.randn(600, 128).to(dtype)
    codebook[[100, 255, 256, 599]] = codebook[100].clone()
    z = 1000.0 + 1e-2 * torch.randn(2000, 128).to(dtype)
    z[:100] = codebook[100] + 1e-4 * torch.randn(100, 128).to(dtype)
    out = at_every_level(z, codebook)
    ridx = nearest_codeword_reference(z, codebook, "l2")[0]
    assert bool((ridx[:100] == 100).all())
    for idx, _, _ in out.values():
        assert torch.equal(idx, ridx)
    assert_levels_agree(out)


def test_cosine_and_non_contiguous():
    z = torch.randn(2 * 19, 301)[:, ::2].T[:, ::2]  # [151, 19], strides (2, 602)
    codebook = torch.randn(19, 260).T[::2]  # [130, 19], strides (2, 260)
    assert not z.is_contiguous() and not codebook.is_contiguous()
    for metric in ("l2", "cosine"):
        out = at_every_level(z, codebook, metric=metric)
        assert_levels_agree(out)
        ridx = nearest_codeword_reference(z, codebook, metric)[0]
        assert torch.equal(out[LEVELS[0]][0], ridx) or metric == "cosine"  # cosine: fp32 vs fp64 norms
        assert torch.equal(out[LEVELS[0]][0], vqfast.nearest_codeword(z.contiguous(), codebook.contiguous(),
                                                                     metric=metric, backend="cpu")[0])


@pytest.mark.parametrize("d", [2, 40])
def test_exact_ties_lowest_index(d):
    # z = 0 is equidistant from +e and -e: 50 alternating copies (several steps and the padding).
    e = torch.zeros(d)
    e[0] = 1.0
    codebook = torch.stack([e if i % 2 else -e for i in range(50)])
    out = at_every_level(torch.zeros(37, d), codebook)
    for idx, _, dist in out.values():
        assert torch.all(idx == 0) and torch.all(dist == 1.0)


@pytest.mark.parametrize("positions", [[100, 8191, 8192, 8999], [8191, 8192], list(range(3000, 9000, 300))])
def test_duplicates_across_blocks_lowest_index(positions):
    # D = 4: codebook blocks of 8192 codewords, so the copies straddle a block boundary; the last
    # case has 20 copies, more than the 8 candidates a row keeps (the full re-rank path).
    d = 4
    codebook = torch.randn(9000, d)
    dup = torch.randn(d)
    codebook[positions] = dup
    z = dup + 1e-3 * torch.randn(60, d)
    out = at_every_level(z, codebook)
    for idx, _, _ in out.values():
        assert torch.all(idx == positions[0])
    assert_levels_agree(out)


@pytest.mark.parametrize("d", [16, 96])
def test_near_ties_under_large_offset(d):
    # ||z||^2 ~ 1e6 d: an fp32 argmin of the expansion goes wrong on many rows (see test_cpu_backend).
    codebook = 1000.0 + 1e-2 * torch.randn(256, d)
    z = 1000.0 + 1e-2 * torch.randn(200, d)
    out = at_every_level(z, codebook)
    ridx = nearest_codeword_reference(z, codebook, "l2")[0]
    for idx, _, _ in out.values():
        assert torch.equal(idx, ridx)
    assert_levels_agree(out)


def test_fast_precision_at_every_level_picks_a_true_minimum():
    z, codebook = torch.randn(300, 24), torch.randn(700, 24)
    true = ((z.double()[:, None] - codebook.double()[None]) ** 2).sum(-1)
    best = true.min(1).values
    for idx, _, _ in at_every_level(z, codebook, precision="fast").values():
        mine = true.gather(1, idx[:, None]).squeeze(1)
        assert torch.all(mine <= best + 1e-5 * (1 + best))


def test_cpu_isa_names_a_level_of_this_build():
    compiled = tuple(torch.ops.vqfast.cpu_isa_compiled())
    if X86:
        assert compiled == ("generic", "avx2", "avx512")
    elif platform.machine().lower() in ("aarch64", "arm64"):
        assert compiled == ("generic", "neon")
    assert LEVELS[0] == "generic" and set(LEVELS) <= set(compiled)
    assert vqfast.cpu_isa() in LEVELS
    if os.environ.get("VQFAST_CPU_ISA", "auto") in ("", "auto"):
        assert vqfast.cpu_isa() == LEVELS[-1]  # the best level the CPU has


def test_forced_cpu_isa_restores_and_rejects():
    before = vqfast.cpu_isa()
    with _ext.forced_cpu_isa("generic"):
        assert vqfast.cpu_isa() == "generic"
    assert vqfast.cpu_isa() == before
    with pytest.raises(ValueError, match="level="):
        with _ext.forced_cpu_isa("sse9"):
            pass


def _import_with(level: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "VQFAST_CPU_ISA": level, "PYTHONPATH": REPO}
    return subprocess.run([sys.executable, "-c", "import vqfast; print(vqfast.cpu_isa())"], env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("level", LEVELS)
def test_environment_variable_forces_a_level(level):
    out = _import_with(level)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [level]


def test_unknown_level_is_an_import_error():
    out = _import_with("sse9")
    assert out.returncode != 0
    assert "ValueError: VQFAST_CPU_ISA='sse9' is not an instruction level" in out.stderr
    assert "generic" in out.stderr.splitlines()[-1]


def test_level_the_cpu_lacks_is_an_import_error():
    lacking = [lvl for lvl in torch.ops.vqfast.cpu_isa_compiled() if lvl not in LEVELS]
    if not lacking:
        pytest.skip("this CPU runs every level of the build")
    out = _import_with(lacking[-1])
    assert out.returncode != 0
    assert f"VQFAST_CPU_ISA='{lacking[-1]}' forces a level this CPU cannot run" in out.stderr


@pytest.mark.skipif(not X86 or shutil.which("objdump") is None, reason="x86-64 with binutils' objdump")
def test_only_level_code_uses_level_instructions():
    # Every VEX/EVEX-encoded instruction (mnemonics v..., which no x86-64 baseline code has) of the
    # library sits in a function of the avx2 or avx512 namespace, and zmm registers only in avx512:
    # no inline function or template shared with the baseline code was emitted from a level's file.
    so = _ext._C.__file__
    dump = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", so], capture_output=True, text=True,
                          check=True, timeout=300).stdout
    func = None
    offenders = {}
    avx_functions = {"avx2": 0, "avx512": 0}
    head = re.compile(r"^[0-9a-f]+ <(.*)>:$")
    insn = re.compile(r"^\s*[0-9a-f]+:\s+(v[a-z0-9]+)\s+(.*)$")
    seen = set()
    for line in dump.splitlines():
        m = head.match(line)
        if m:
            func = m.group(1)
            continue
        m = insn.match(line)
        if m is None or func is None:
            continue
        level = "avx512" if "::avx512::" in func else "avx2" if "::avx2::" in func else None
        if level is None or (level == "avx2" and "%zmm" in m.group(2)):
            offenders.setdefault(func, line.strip())
        elif func not in seen:
            seen.add(func)
            avx_functions[level] += 1
    assert not offenders, "AVX instructions outside their level's code:\n" + "\n".join(
        f"{f}: {i}" for f, i in list(offenders.items())[:10])
    assert avx_functions["avx2"] > 0 and avx_functions["avx512"] > 0
