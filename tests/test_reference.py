"""The pure-PyTorch reference and torch backend against the independent oracle and faiss-cpu."""
import re
from pathlib import Path

import pytest
import torch

import vqfast
from tests.helpers import assert_exact
from vqfast import reference
from vqfast.testing import oracle

SHAPES = [(1, 1, 1), (3, 1, 5), (17, 3, 1), (100, 17, 513), (513, 100, 3), (1000, 3, 1000), (257, 1, 100), (64, 513, 17)]


@pytest.mark.parametrize("n,d,k", SHAPES)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_reference_float64_against_oracle(n, d, k, metric):
    z = torch.randn(n, d, dtype=torch.float64)
    cb = torch.randn(k, d, dtype=torch.float64)
    assert_exact(z, cb, reference.nearest_codeword_reference(z, cb, metric), metric)


@pytest.mark.parametrize("n,d,k", SHAPES)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_torch_backend_fp32_exact(n, d, k, metric):
    z = torch.randn(n, d)
    cb = torch.randn(k, d)
    assert_exact(z, cb, reference.nearest_codeword_torch(z, cb, metric, "exact"), metric)


def test_exact_mode_survives_cancellation():
    # A large common offset makes ||z||^2 + ||c||^2 - 2 z.c lose every significant digit in fp32:
    # the plain fp32 argmin picks wrong codewords, the exact mode must not.
    g = torch.Generator().manual_seed(1)
    offset = 3000.0
    cb = offset + torch.randn(300, 8, generator=g) * 0.05
    z = offset + torch.randn(400, 8, generator=g) * 0.05
    plain = (z.pow(2).sum(1, keepdim=True) + cb.pow(2).sum(1) - 2 * z @ cb.T).argmin(1)
    answer = assert_exact(z, cb, reference.nearest_codeword_torch(z, cb))
    assert (plain != answer.indices).any(), "the test data no longer provokes cancellation"


def test_duplicate_codewords_lowest_index():
    cb = torch.randn(50, 7)
    cb[31] = cb[4]
    cb[49] = cb[4]
    z = cb[[4, 31, 49, 4]] + 1e-3 * torch.randn(4, 7)
    z[3] = cb[4]  # exactly on the duplicated codeword: distance 0 three times
    idx, _, dist = reference.nearest_codeword_torch(z, cb)
    assert idx.tolist() == [4, 4, 4, 4]
    assert dist[3].item() == 0.0


def test_chunking_matches_single_chunk():
    z = torch.randn(1031, 9)
    cb = torch.randn(257, 9)
    whole = reference.search(z, cb, chunk_elements=1 << 30)
    chunked = reference.search(z, cb, chunk_elements=257 * 7 + 3)  # 7 rows per chunk, ragged last chunk
    assert torch.equal(whole, chunked)


def test_chunk_memory_is_bounded():
    # One chunk holds at most CHUNK_ELEMENTS distances, whatever N is.
    assert reference.chunk_rows(16384) * 16384 <= reference.CHUNK_ELEMENTS
    assert reference.chunk_rows(1 << 30) == 1


@pytest.mark.parametrize("n,d,k", [(1000, 17, 513), (513, 100, 1000), (200, 1, 33), (1, 3, 7)])
def test_against_faiss_index_flat_l2(n, d, k):
    faiss = pytest.importorskip("faiss")
    z = torch.randn(n, d)
    cb = torch.randn(k, d)
    index = faiss.IndexFlatL2(d)
    index.add(cb.numpy())
    fd, fi = index.search(z.numpy(), 1)
    idx, _, dist = reference.nearest_codeword_torch(z, cb)
    same = idx.numpy() == fi[:, 0]
    # faiss computes fp32 expansions without re-ranking: rows may differ only where it is a near-tie.
    answer = oracle.nearest(z, cb)
    gap = (answer.chosen(torch.from_numpy(fi[:, 0])) - answer.chosen(idx)).abs()
    assert (same | (gap.numpy() <= 1e-4 * (1 + answer.best.numpy()))).all()
    assert same.mean() > 0.99
    torch.testing.assert_close(dist, torch.from_numpy(fd[:, 0]), rtol=1e-4, atol=1e-4)


def test_backward_matches_autograd_of_direct_formula():
    z = torch.randn(40, 6, dtype=torch.float64, requires_grad=True)
    cb = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    for metric in ("l2", "cosine"):
        idx = reference.search(z.detach(), cb.detach(), metric)
        cw = cb[idx]
        dist = reference.codeword_distances(z, cw, metric)
        gc, gd = torch.randn_like(cw), torch.randn_like(dist)
        want = torch.autograd.grad((cw * gc).sum() + (dist * gd).sum(), (z, cb))
        got = reference.nearest_codeword_backward(gc, gd, z.detach(), cb.detach(), idx, metric)
        torch.testing.assert_close(got[0], want[0])
        torch.testing.assert_close(got[1], want[1])


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_exact_search_ignores_a_callers_autocast(backend):
    # Under CPU autocast a plain matmul runs in bf16 (8 bits of mantissa): the exact search must not.
    if backend not in vqfast.available_backends("cpu"):
        pytest.skip(f"backend {backend} is not available")
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2048, 16, generator=g)
    cb = torch.randn(512, 16, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (z @ cb.T).dtype == torch.bfloat16
        out = vqfast.nearest_codeword(z, cb, backend=backend)
    assert_exact(z, cb, out)


# ---------------------------------------------------------------- one tolerance, checked copies

ROOT = Path(__file__).resolve().parents[1]
DIMS = [1, 2, 3, 4, 7, 16, 33, 64, 255, 256, 1024, 4099, 65536]


@pytest.mark.skipif(not vqfast.has_ext(), reason="needs the compiled extension vqfast._C")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpp_tolerance_terms_equal_the_python_definition(dtype):
    name = str(dtype).removeprefix("torch.")
    for dim in DIMS:
        cpp = torch.ops.vqfast._ranking_tolerance_terms(dim, name)
        assert cpp == list(reference.ranking_tolerance_terms(dim, dtype)), (dim, name)  # bit for bit


def _code(path: Path) -> str:
    """The source without its comments (so that a formula quoted in a comment is not mistaken for code)."""
    text = re.sub(r"/\*.*?\*/", "", path.read_text(encoding="utf-8"), flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def test_the_kernels_take_their_tolerance_from_the_shared_header():
    # The C++ copy of ranking_tolerance_terms is csrc/tolerance.h (compared above through the
    # extension); the CPU driver, the CUDA launch code that marks the exact mode's rows (not built
    # here: compared at the source; float64 inputs re-rank every row, with no tolerance) and the
    # torch-free kernel check use it and restate no part of it.
    header = _code(ROOT / "csrc" / "tolerance.h")
    assert "2.0 * expansion_error_bound(dim, unit_roundoff<T>())" in header
    users = {"csrc/cpu/nearest_codeword.cpp": ["ranking_tolerance_coef<T>(D)", "ranking_tolerance_floor<T>(D)"],
             "csrc/cuda/nearest_codeword.cu": ["ranking_tolerance_coef<float>(d)", "ranking_tolerance_floor<float>(d)"],
             "tests/cpu/kernel_check.cpp": ["ranking_tolerance_coef<float>(D)"]}
    restated = re.compile(r"(?:\(\s*[dD]\s*\+\s*3\s*\))|(?:\b[dD]\s*\+\s*3\b)|0x1p-24|0x1p-53|ldexp\(1\.0,\s*-(?:24|53)\)"
                          r"|numeric_limits<(?:float|double)>::(?:min|epsilon)\(\)")
    for rel, calls in users.items():
        code = _code(ROOT / rel)
        assert '#include "../tolerance.h"' in code or '#include "../../csrc/tolerance.h"' in code, rel
        for call in calls:
            assert call in code, f"{rel} no longer calls {call}"
        found = restated.findall(code)
        assert not found, f"{rel} restates part of the tolerance: {found}"
    found = restated.findall(_code(ROOT / "csrc" / "cuda" / "binding.cpp"))
    assert not found, f"csrc/cuda/binding.cpp restates part of the tolerance: {found}"
    # Triton's marking kernel takes the terms from the reference's function, and no file restates them.
    triton_code = (ROOT / "vqfast" / "triton" / "__init__.py").read_text(encoding="utf-8")
    assert "reference.ranking_tolerance_terms(d, torch.float32)" in triton_code
    for rel in ("vqfast/triton/__init__.py", "vqfast/triton/kernels.py"):
        code = (ROOT / rel).read_text(encoding="utf-8")
        found = re.findall(r"finfo|2\.0\s*\*\*\s*-(?:24|53)|\b[dD]\s*\+\s*3\b", code)
        assert not found, f"{rel} restates part of the tolerance: {found}"


def test_ranking_tolerance_is_built_from_its_terms():
    z_norm, cmax = torch.tensor([0.0, 1.0, 3.0]), torch.tensor(2.0)
    coef, floor = reference.ranking_tolerance_terms(16, torch.float32)
    assert coef == 2 * 19 * 2.0**-24 / (1 - 19 * 2.0**-24)
    assert floor == 8 * 19 * torch.finfo(torch.float32).tiny * torch.finfo(torch.float32).eps
    assert torch.equal(reference.ranking_tolerance(z_norm, cmax, 16, torch.float32),
                       coef * cmax * (2 * z_norm + cmax) + floor)


# ---------------------------------------------------------------- cosine and zero vectors

def test_cosine_zero_rows_rule():
    cb = torch.randn(6, 4)
    rows, index, distance = reference.cosine_zero_rows(torch.tensor([[0.0, 0, 0, 0], [1, 0, 0, 0]]), cb)
    assert rows.tolist() == [True, False] and int(index) == 0 and float(distance) == 1.0
    cb[[2, 4]] = 0
    _, index, distance = reference.cosine_zero_rows(torch.zeros(1, 4), cb)
    assert int(index) == 2 and float(distance) == 0.0


def test_no_gradient_through_a_zero_vector_under_cosine():
    z = torch.randn(5, 8)
    z[2] = 0
    cb = torch.randn(7, 8)
    cb[0] = 0  # row 2 takes it; so may others (a zero codeword is 1 from every row)
    z.requires_grad_()
    cb.requires_grad_()
    _, _, dist = vqfast.nearest_codeword(z, cb, metric="cosine", backend="torch")
    dist.sum().backward()
    assert torch.isfinite(z.grad).all() and torch.isfinite(cb.grad).all()
    assert z.grad[2].abs().max() == 0 and cb.grad[0].abs().max() == 0


def _rerank_unproven(z, codebook, indices, best, second):
    """The GPU kernels' device rule, in PyTorch (with a host sync): a row is proven when its second-best
    computed float32 value of ||c||^2 - 2 z.c exceeds the best by more than ranking_tolerance, compared
    in float64 (adding the tolerance rounds nothing away); the others (near ties, duplicates, NaN / inf)
    are searched again in float64."""
    tol = reference.ranking_tolerance(z.norm(dim=1), codebook.norm(dim=1).max(), z.shape[1], torch.float32)
    unproven = ~(second.double() > best.double() + tol.double())
    out = indices.clone()
    rows = unproven.nonzero().squeeze(1)
    if rows.numel():
        out[rows] = reference.search(z[rows], codebook, "l2", "exact", compute_dtype=torch.float64)
    return out


@pytest.mark.parametrize("kind", ["offset", "lattice", "duplicates", "tiny_codebook"])
def test_the_device_rule_leaves_only_provable_rows_alone(kind):
    # The rule the GPU kernels apply on the device, from a float32 top-2 as a kernel reports it: the
    # rows it leaves alone are provably right, the rows it re-ranks come out exact.
    from tests.helpers import make_hard_case

    z, cb = (t.float() for t in make_hard_case(kind, 37, 70, 9, seed=5))
    values = (cb * cb).sum(1) - 2.0 * z @ cb.T
    top2 = values.topk(2, dim=1, largest=False)
    indices = _rerank_unproven(z, cb, top2.indices[:, 0], top2.values[:, 0], top2.values[:, 1])
    picked = cb.index_select(0, indices)
    assert_exact(z, cb, (indices, picked, reference.codeword_distances(z, picked).float()))
