"""GPU resources checked with no GPU: registers, spills, shared memory and occupancy of every CUDA
kernel instantiation and Triton configuration (scripts/resources.py), against the committed table
benchmarks/results/gpu_resources.md. Compiling them all takes about 20 s here: slow tier."""
from __future__ import annotations

import os
import re

import pytest

from tests.helpers import load_script

resources = load_script("scripts/resources.py", "vqfast_resources_script")


@pytest.mark.parametrize("arch,threads,registers,smem,expected", [
    (90, 128, 168, 21248, (3, "registers")),  # 168 x 32 = 5376 a warp: 12 warps of 65536 registers
    (90, 128, 255, 0, (2, "registers")),  # 255 x 32 = 8160 -> 8192 a warp: 8 warps
    (80, 256, 32, 0, (8, "threads")),  # 64 warps, the maximum
    (80, 32, 16, 0, (32, "blocks")),  # 32 one-warp blocks, the block limit
    (90, 128, 64, 76800, (3, "shared memory")),  # 76800 + 1024 reserved: 3 x 77824 = 228 KiB
    (90, 128, 64, 76801, (2, "shared memory")),
    (80, 128, 64, 54954, (3, "shared memory")),  # 164 KiB / 3 = 55978 = 54954 + 1024
    (80, 128, 64, 54955, (2, "shared memory")),
])
def test_occupancy_rules(arch, threads, registers, smem, expected):
    assert resources.occupancy(arch, threads, registers, smem) == expected


def test_parse_ptxas_report():
    text = (
        "ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_80'\n"
        "ptxas info    : Function properties for _Z3fooPf\n"
        "    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n"
        "ptxas info    : Used 96 registers, used 1 barriers, 1024 bytes smem, 368 bytes cmem[0]\n"
        "ptxas info    : Compiling entry function 'bar' for 'sm_90a'\n"
        "ptxas info    : Used 40 registers, used 0 barriers, 384 bytes cmem[0]\n"
    )
    assert resources.parse_ptxas_report(text) == {
        "_Z3fooPf": {"stack": 8, "spill_stores": 4, "spill_loads": 12, "registers": 96, "static_smem": 1024},
        "bar": {"registers": 40, "static_smem": 0},
    }


def _row(**changes):
    base = dict(kernel="k<fp32>", config="-", arch=90, threads=128, registers=96, spill_stores=0, spill_loads=0,
                stack=0, static_smem=1024, dynamic_smem=0)
    return resources.Row(**{**base, **changes})


def test_problems_name_spills_and_oversized_shared_memory():
    assert resources.problems([_row(), _row(arch=80, dynamic_smem=166912 - 1024)]) == []
    found = resources.problems([_row(spill_stores=8, spill_loads=4), _row(arch=80, dynamic_smem=166912 - 1023)])
    assert len(found) == 2 and "spills (8 B stored / 4 B loaded)" in found[0]
    assert "166913 B of shared memory, above sm_80's 166912 B" in found[1]


def test_differences_name_a_changed_added_and_removed_row():
    committed = resources.render([_row(), _row(kernel="gone")], "nvcc 0, triton 0 (ptxas 0)")
    assert resources.differences(committed, [_row(), _row(kernel="gone")]) == []
    found = resources.differences(committed, [_row(registers=100), _row(kernel="new")])
    assert any("registers 96 -> 100" in f for f in found)
    assert any(f.startswith("new row new") for f in found) and any(f.startswith("row gone gone") for f in found)


def test_cuda_threads_match_the_sources():
    header = open(os.path.join(resources.CUDA_DIR, "nearest_codeword.h"), encoding="utf-8").read()
    source = open(os.path.join(resources.CUDA_DIR, "nearest_codeword.cu"), encoding="utf-8").read()

    def constant(text, name):
        return int(re.search(rf"constexpr int {name} = (\d+);", text).group(1))

    assert resources.CUDA_THREADS["nearest_codeword_kernel"] == constant(header, "kThreads")
    assert resources.CUDA_RESIDENT_BLOCKS == constant(header, "kResidentBlocks")
    assert resources.CUDA_THREADS["row_sqnorms_kernel"] == 32 * constant(source, "kRowWarps")
    assert resources.CUDA_THREADS["gather_distance_kernel"] == 32 * constant(source, "kRowWarps")
    assert resources.CUDA_THREADS["merge_splits_kernel"] == constant(source, "kMergeThreads")
    assert "__launch_bounds__(256) merge_splits_kernel" in source
    assert resources.CUDA_THREADS["rerank_kernel"] == 32 * constant(source, "kRowWarps")
    assert resources.CUDA_THREADS["max_abs_kernel"] == constant(source, "kMaxAbsThreads")
    assert resources.CUDA_THREADS["mark_ambiguous_kernel"] == constant(source, "kMarkThreads")
    for name in ("rerank_kernel", "row_sqnorms_kernel", "gather_distance_kernel"):
        assert re.search(rf"__launch_bounds__\(kRowWarps \* 32(?:, \d+)?\)\s+{name}\b", source), name
    for name, threads in (("max_abs_kernel", "kMaxAbsThreads"), ("mark_ambiguous_kernel", "kMarkThreads")):
        assert re.search(rf"__launch_bounds__\({threads}\)\s+{name}\b", source), name


# ------------------------------------------------------------------------------- compiled (slow)

@pytest.fixture(scope="module")
def compiled_rows():
    if resources._nvcc() is None:
        pytest.skip("nvcc not found (set CUDA_HOME)")
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("needs compiled, not interpreted, Triton kernels")
    return resources.all_rows()


@pytest.mark.slow
def test_no_spills_and_shared_memory_within_limits(compiled_rows):
    assert len(compiled_rows) > 100
    found = resources.problems(compiled_rows)
    assert not found, "\n".join(found)


@pytest.mark.slow
def test_resident_z_keeps_its_blocks(compiled_rows):
    """The CUDA launcher keeps z resident only where kResidentBlocks blocks fit an SM, from its own
    static shared-memory estimate: ptxas's static bytes must match that estimate, and the largest
    resident allotment must leave the blocks the registers allow."""
    resident = [r for r in compiled_rows if r.config.endswith("z resident")]
    # 12 with 16-feature stages; 12 with 4 or 8 (small D: exact mode 4 and 8 for each dtype, the 16-bit
    # 4-feature ones with element loads only; fast fp32 8)
    assert len(resident) == 2 * (12 + 12)
    for row in resident:
        elem = 2 if "fast" in row.config and ("fp16" in row.kernel or "bf16" in row.kernel) else 4
        # Padded row strides: kStride16 / kStride for 16 features, 4 and 12 words for 4 and 8.
        stride = {"4-feature": 4, "8-feature": 12}.get(row.config.split(", ")[1].split(" ")[0], 16 + (8 if elem == 2 else 4))
        assert row.static_smem == 2 * 64 * stride * elem + 64 * 12, row  # the launcher's max_resident_bytes
        assert row.occupancy()[0] >= resources.CUDA_RESIDENT_BLOCKS, row


@pytest.mark.slow
def test_rows_match_the_committed_table(compiled_rows):
    committed = open(resources.TABLE, encoding="utf-8").read()
    versions, _ = resources.parse_table(committed)
    here = resources.tool_versions()
    if versions != here:
        pytest.skip(f"the table was made with {versions}, this machine has {here}: registers differ between "
                    "compiler releases (the spill and shared-memory checks above still ran)")
    found = resources.differences(committed, compiled_rows)
    assert not found, "the kernels' resources changed; run python scripts/resources.py:\n" + "\n".join(found)
