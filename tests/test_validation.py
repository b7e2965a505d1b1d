"""Bad input at every public entry: a ValueError/TypeError naming the argument, never a crash or a
silent wrong answer. Also the defined behaviours at the edges: N = 0, mixed dtypes, huge values."""
import dataclasses
import importlib.util
import math

import pytest
import torch

import vqfast
from vqfast import _validation, backends
from vqfast.modules import ResidualVectorQuantizer, VectorQuantizer, VectorQuantizer2
from tests.helpers import assert_exact
from vqfast.testing import oracle

BACKENDS = vqfast.available_backends("cpu")
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _data(n=37, k=11, d=17, dtype=torch.float32):
    return torch.randn(n, d).to(dtype), torch.randn(k, d).to(dtype)


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


# ---------------------------------------------------------------- shapes, types, devices, options


@pytest.mark.parametrize(
    "z_shape, cb_shape, match",
    [
        ((17,), (11, 17), r"z must be 2-D"),
        ((2, 3, 17), (11, 17), r"z must be 2-D.*reshape"),
        ((), (11, 17), r"z must be 2-D"),
        ((5, 17), (17,), r"codebook must be 2-D"),
        ((5, 17), (1, 11, 17), r"codebook must be 2-D"),
        ((5, 17), (0, 17), r"codebook is empty"),
        ((5, 17), (11, 16), r"z has D=17 features but codebook has D=16"),
        ((5, 0), (11, 0), r"D = 0"),
    ],
)
def test_bad_shapes_raise_value_error(backend, z_shape, cb_shape, match):
    with pytest.raises(ValueError, match=match):
        vqfast.nearest_codeword(torch.zeros(z_shape), torch.zeros(cb_shape), backend=backend)


@pytest.mark.parametrize("bad_dtype", [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64, torch.float8_e4m3fn])
@pytest.mark.parametrize("which", ["z", "codebook"])
def test_non_floating_dtypes_raise_type_error(backend, bad_dtype, which):
    z, cb = _data()
    args = {"z": z, "codebook": cb}
    args[which] = args[which].to(bad_dtype)
    with pytest.raises(TypeError, match=rf"{which} must be a floating-point tensor.*{which}\.float\(\)"):
        vqfast.nearest_codeword(args["z"], args["codebook"], backend=backend)


@pytest.mark.parametrize("which", ["z", "codebook"])
def test_non_tensors_and_sparse_raise_type_error(which):
    z, cb = _data()
    for bad, match in (([[0.0] * 17], "must be a torch.Tensor, got list"), (None, "must be a torch.Tensor, got NoneType")):
        args = {"z": z, "codebook": cb, which: bad}
        with pytest.raises(TypeError, match=rf"{which} {match}"):
            vqfast.nearest_codeword(args["z"], args["codebook"])
    args = {"z": z, "codebook": cb, which: (z if which == "z" else cb).to_sparse()}
    with pytest.raises(TypeError, match=rf"{which} must be a dense.*to_dense"):
        vqfast.nearest_codeword(args["z"], args["codebook"])


def test_device_mismatch_raises():
    z, cb = _data()
    with pytest.raises(ValueError, match=r"z is on cpu but codebook is on meta.*one device"):
        vqfast.nearest_codeword(z, cb.to("meta"))


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"metric": "l1"}, ValueError, r"metric must be one of"),
        ({"metric": None}, ValueError, r"metric must be one of"),
        ({"precision": "tf32"}, ValueError, r"precision must be one of"),
        ({"backend": "gpu"}, ValueError, r"backend='gpu' is not a vqfast backend"),
        ({"backend": 3}, TypeError, r"backend must be a string"),
        ({"check_finite": 1}, TypeError, r"check_finite must be a bool"),
        ({"check_finite": "yes"}, TypeError, r"check_finite must be a bool"),
    ],
)
def test_bad_options_raise(kwargs, exc, match):
    z, cb = _data()
    with pytest.raises(exc, match=match):
        vqfast.nearest_codeword(z, cb, **kwargs)


def test_bad_backend_from_environment_names_the_variable(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "nonsense")
    z, cb = _data()
    with pytest.raises(ValueError, match=rf"the environment variable {backends.ENV_VAR}='nonsense'"):
        vqfast.nearest_codeword(z, cb)


def test_unavailable_backend_requested_by_name_raises():
    z, cb = _data()
    missing = [b for b in backends.BACKEND_NAMES if b not in BACKENDS]
    assert "cuda" in missing  # CPU tensors: the CUDA kernel can never take them
    for name in missing:
        with pytest.raises(ValueError, match=rf"backend='{name}' was requested but cannot run here"):
            vqfast.nearest_codeword(z, cb, backend=name)


# ---------------------------------------------------------------- N = 0, mixed dtypes


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_empty_z_gives_empty_outputs(backend, metric):
    cb = torch.randn(5, 3, requires_grad=True)
    z = torch.empty(0, 3, dtype=torch.float16, requires_grad=True)
    indices, codewords, distances = vqfast.nearest_codeword(z, cb, metric=metric, backend=backend)
    assert indices.shape == (0,) and indices.dtype == torch.int64
    assert codewords.shape == (0, 3) and codewords.dtype == torch.float16
    assert distances.shape == (0,) and distances.dtype == torch.float32
    (codewords.float().sum() + distances.sum()).backward()  # still part of the graph
    assert torch.equal(cb.grad, torch.zeros(5, 3)) and z.grad.shape == (0, 3)


@pytest.mark.parametrize("z_dtype", DTYPES)
@pytest.mark.parametrize("cb_dtype", DTYPES)
def test_mixed_dtypes_follow_the_documented_rule(backend, z_dtype, cb_dtype):
    # Rule: search in float64 if either input is float64, else float32; codewords in z's dtype.
    z, cb = torch.randn(41, 9).to(z_dtype), torch.randn(13, 9).to(cb_dtype)
    out = vqfast.nearest_codeword(z, cb, backend=backend)
    assert out[1].dtype == z_dtype and out[2].dtype == torch.float32
    assert_exact(z, cb, out)


# ---------------------------------------------------------------- NaN / Inf


@pytest.mark.parametrize("which", ["z", "codebook"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_non_finite_inputs_raise_by_default(backend, which, value, dtype):
    z, cb = _data(dtype=dtype)
    t = z if which == "z" else cb
    t[4, 2] = value
    kind = "NaN" if math.isnan(value) else "Inf"
    with pytest.raises(ValueError, match=rf"{which} contains 1 non-finite value\(s\) \({kind}\), the first in row 4.*check_finite=False"):
        vqfast.nearest_codeword(z, cb, backend=backend)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_check_finite_false_never_crashes_and_keeps_finite_rows_right(backend, metric):
    z, cb = _data(n=64, k=16, d=7)
    z[3, 1] = float("nan")
    z[5, :] = float("inf")
    z[6, 0] = -float("inf")
    cb[9, 2] = float("nan")  # a poisoned codeword: any row may or may not pick it, but no crash
    indices, codewords, distances = vqfast.nearest_codeword(z, cb, metric=metric, backend=backend, check_finite=False)
    assert indices.shape == (64,) and bool(((indices >= 0) & (indices < 16)).all())
    torch.testing.assert_close(codewords, cb[indices], rtol=0, atol=0, equal_nan=True)
    # Rows and codewords without NaN/Inf: the same answer as a clean search without codeword 9.
    clean_rows = torch.isfinite(z).all(1)
    keep = torch.tensor([k for k in range(16) if k != 9])
    ref_indices = oracle.nearest(z[clean_rows], cb[keep], metric).indices
    got = indices[clean_rows]
    ok = got != 9
    assert bool(ok.any())
    assert torch.equal(got[ok], keep[ref_indices][ok])


# ---------------------------------------------------------------- huge magnitudes


@pytest.mark.parametrize("scale", [1e18, 1e25, 1e37])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_huge_float32_values_are_searched_in_float64(backend, scale, metric):
    # At 1e18 and beyond, float32 squared distances over D = 17 overflow (limit 6.5e18 / sqrt(17)):
    # the scan promotes the search to float64, so every backend still finds the true argmin.
    z = torch.randn(50, 17) * scale
    cb = torch.randn(23, 17) * scale
    assert _validation.magnitude_limit(17, torch.float32) < scale * 3
    out = vqfast.nearest_codeword(z, cb, metric=metric, backend=backend)
    assert out[1].dtype == torch.float32
    # The oracle's pick, and distances beyond float32's 3.4e38 saturated to +inf, the rest matching.
    answer = assert_exact(z, cb, out, metric)
    if metric == "l2" and scale > 1e19:
        assert bool(torch.isinf(out[2]).any()) and bool((answer.chosen(out[0]) > 3.4e38).any())


def test_float64_promotion_keeps_gradients_in_the_input_dtypes(backend):
    z = (torch.randn(30, 6) * 1e20).requires_grad_()
    cb = (torch.randn(8, 6) * 1e20).requires_grad_()
    indices, codewords, _ = vqfast.nearest_codeword(z, cb, backend=backend)
    codewords.sum().backward()
    assert cb.grad.dtype == torch.float32
    counts = torch.bincount(indices, minlength=8).float()
    assert torch.equal(cb.grad, counts[:, None].expand(8, 6))


def test_huge_bfloat16_values_are_searched_in_float64(backend):
    z = (torch.randn(20, 5) * 1e30).bfloat16()
    cb = (torch.randn(9, 5) * 1e30).bfloat16()
    out = vqfast.nearest_codeword(z, cb, backend=backend)
    assert_exact(z, cb, out)
    assert out[1].dtype == torch.bfloat16


@pytest.mark.parametrize("which", ["z", "codebook"])
def test_float64_values_that_overflow_float64_distances_raise(backend, which):
    z, cb = _data(dtype=torch.float64)
    (z if which == "z" else cb)[2, 3] = 1e160
    with pytest.raises(ValueError, match=rf"{which} holds values up to 1e\+160.*overflow float64.*Rescale"):
        vqfast.nearest_codeword(z, cb, backend=backend)
    # Just under the limit, float64 is searched as given and agrees with the oracle.
    limit = _validation.magnitude_limit(17, torch.float64)
    z, cb = z / 1e160 * limit * 0.5, cb / 1e160 * limit * 0.5
    # The row holding the huge value is nearest to several codewords at float64 resolution of the
    # direct distance (|z|^2 swamps their differences): the oracle accepts any of those there.
    answer = assert_exact(z, cb, vqfast.nearest_codeword(z, cb, backend=backend))
    assert int(answer.ambiguous.sum()) == (1 if which == "z" else 0)


def test_magnitude_limit_matches_its_documented_numbers():
    assert math.isclose(_validation.magnitude_limit(1, torch.float32), 6.52e18, rel_tol=1e-2)
    assert math.isclose(_validation.magnitude_limit(1024, torch.float32), 2.04e17, rel_tol=1e-2)
    assert math.isclose(_validation.magnitude_limit(1, torch.float64), 4.74e153, rel_tol=1e-2)
    # 4 D m^2, doubled, still below the dtype's max at the limit.
    for dtype in (torch.float32, torch.float64):
        m = _validation.magnitude_limit(100, dtype)
        assert 8 * 100 * m * m <= torch.finfo(dtype).max * (1 + 1e-12)


# ---------------------------------------------------------------- torch.compile


def test_finite_scan_is_skipped_under_torch_compile():
    torch._dynamo.reset()

    def fn(z, cb):
        return vqfast.nearest_codeword(z, cb, backend="torch")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    z, cb = _data()
    for got, want in zip(compiled(z, cb), fn(z, cb)):
        assert torch.equal(got, want)
    # As documented: no scan while tracing, so NaN passes through (eager mode raises).
    z[0, 0] = float("nan")
    compiled(z, cb)
    with pytest.raises(ValueError, match="z contains"):
        fn(z, cb)


# ---------------------------------------------------------------- index overflow, backend input ranges


def test_int32_offsets_reason_on_shapes_only():
    cb = torch.empty(16, 2048, device="meta")
    fits = torch.empty(2**31 // 2048, 2048, device="meta")  # exactly 2^31 elements: one too many
    assert _validation.int32_offsets_reason(fits[:-1], cb) is None
    reason = _validation.int32_offsets_reason(fits, cb)
    assert reason is not None and "z has N * D = 1048576 * 2048 = 2147483648 elements" in reason
    assert "chunks of at most 1048575 rows" in reason
    # An expand()ed view: 2^31 rows of one float, no memory behind it.
    z = torch.zeros(1, 1).expand(2**31, 1)
    assert "z has N * D" in _validation.int32_offsets_reason(z, torch.zeros(3, 1))
    big_cb = torch.zeros(1, 3).expand(2**30, 3)
    assert "codebook has K * D" in _validation.int32_offsets_reason(torch.zeros(2, 3), big_cb)
    with pytest.raises(ValueError, match=r"backend='triton' cannot run these inputs: codebook has K \* D"):
        _validation.check_int32_offsets(torch.zeros(2, 3), big_cb, "triton")
    _validation.check_int32_offsets(torch.zeros(2, 3), torch.zeros(5, 3), "triton")


def test_backend_input_limits_fall_back_under_auto_and_raise_by_name(monkeypatch):
    # A CPU kernel limited to D <= 8 (the shape of the limits GPU kernels declare): auto must skip it
    # for D = 9, and naming it must raise with its reason. Dispatch only; no kernel runs.
    def small_d_only(z, codebook):
        return None if z.shape[1] <= 8 else f"D={z.shape[1]} is outside its kernel's range 1..8"

    patched = dataclasses.replace(backends.REGISTRY["cpu"], unavailable_reason=lambda: None, inputs_reason=small_d_only)
    monkeypatch.setitem(backends.REGISTRY, "cpu", patched)
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    small = (torch.empty(4, 8, device="meta"), torch.empty(3, 8, device="meta"))
    large = (torch.empty(4, 9, device="meta"), torch.empty(3, 9, device="meta"))
    assert backends.resolve_backend("auto", "cpu", small) == "cpu"
    assert backends.resolve_backend("auto", "cpu", large) == "torch"
    assert backends.resolve_backend("cpu", "cpu", small) == "cpu"
    with pytest.raises(ValueError, match=r"backend='cpu' was requested but cannot run here: D=9 is outside"):
        backends.resolve_backend("cpu", "cpu", large)


def test_public_op_reports_32_bit_offset_overflow_without_allocating(monkeypatch):
    # A backend with 32-bit offsets, asked by name for N * D = 2^31 (meta tensors: no memory, no values).
    patched = dataclasses.replace(backends.REGISTRY["cpu"], unavailable_reason=lambda: None,
                                  device_reason=lambda device_type: None,
                                  inputs_reason=_validation.int32_offsets_reason)
    monkeypatch.setitem(backends.REGISTRY, "cpu", patched)
    z = torch.empty(2**27, 16, device="meta")
    cb = torch.empty(10, 16, device="meta")
    with pytest.raises(ValueError, match=r"backend='cpu' was requested but cannot run here: z has N \* D = 134217728 \* 16"):
        vqfast.nearest_codeword(z, cb, backend="cpu")
    # "auto" takes a backend that can: shapes come back without any kernel touching memory.
    indices, codewords, distances = vqfast.nearest_codeword(z, cb)
    assert indices.shape == (2**27,) and codewords.shape == (2**27, 16) and distances.dtype == torch.float32


def test_gpu_backends_take_64_bit_offsets_and_int32_indices():
    # Both GPU kernels address z and the codebook with 64-bit offsets: N * D >= 2^31 is fine; their
    # indices are int32, so K >= 2^31 is not. Shapes only (meta tensors, expand()ed views).
    huge_z = torch.empty(2**27, 32, device="meta")
    cb = torch.empty(10, 32, device="meta")
    too_many_codes = torch.zeros(1, 1).expand(2**31, 1)
    names = ["cuda"] + (["triton"] if importlib.util.find_spec("triton") else [])
    for name in names:
        reason = backends.REGISTRY[name].inputs_reason
        assert reason(huge_z, cb) is None, name
        assert "K = 2147483648" in reason(torch.zeros(2, 1), too_many_codes), name
    if "triton" in names:
        assert "float64" in backends.REGISTRY["triton"].inputs_reason(torch.zeros(2, 3).double(), torch.zeros(4, 3).double())


# ---------------------------------------------------------------- the modules


@pytest.mark.parametrize("cls", [VectorQuantizer, VectorQuantizer2])
def test_modules_reject_wrong_inputs(cls):
    vq = cls(16, 4)
    with pytest.raises(TypeError, match=r"z must be a torch.Tensor, got list"):
        vq([[1.0, 2.0]])
    with pytest.raises(ValueError, match=r"z must be \[B, C, T\].*got shape \(2, 4\)"):
        vq(torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"z must be \[B, C, T\].*got shape \(1, 2, 4, 3, 3, 3\)"):
        vq(torch.randn(1, 2, 4, 3, 3, 3))
    with pytest.raises(ValueError, match=r"z has 3 channels \(dim 1\) but embedding_dim = 4"):
        vq(torch.randn(2, 3, 5, 5))
    with pytest.raises(TypeError, match=r"z must be a floating-point tensor"):
        vq(torch.ones(2, 4, 5, 5, dtype=torch.int64))
    z = torch.randn(2, 4, 5, 5)
    z[1, 2, 3, 4] = float("nan")
    with pytest.raises(ValueError, match=r"z contains 1 non-finite value\(s\) \(NaN\)"):
        vq(z)
    # A poisoned codebook is reported as the codebook.
    vq.embedding.weight.data[3, 0] = float("inf")
    with pytest.raises(ValueError, match=r"codebook contains 1 non-finite value\(s\) \(Inf\), the first in row 3"):
        vq(torch.randn(2, 4, 5, 5))


def test_modules_reject_wrong_constructor_arguments():
    for args, match in (((0, 4), "num_embeddings must be a positive int"), ((16, 0), "embedding_dim must be a positive int"),
                        ((16.0, 4), "num_embeddings must be a positive int"), ((True, 4), "num_embeddings")):
        with pytest.raises(ValueError, match=match):
            VectorQuantizer(*args)
    for kwargs, match in (({"metric": "dot"}, "metric"), ({"precision": "half"}, "precision"), ({"backend": "gpu"}, "backend")):
        with pytest.raises(ValueError, match=match):
            VectorQuantizer2(16, 4, **kwargs)
    with pytest.raises(ValueError, match="num_quantizers must be a positive int"):
        ResidualVectorQuantizer(0, 16, 4)
    rvq = ResidualVectorQuantizer(2, 16, 4)
    with pytest.raises(ValueError, match=r"z has 3 channels"):
        rvq(torch.randn(2, 3, 5, 5))


def test_module_with_empty_batch_returns_empty_outputs():
    vq = VectorQuantizer(16, 4)
    quantized, loss, indices = vq(torch.randn(0, 4, 5, 5))
    assert quantized.shape == (0, 4, 5, 5) and indices.shape == (0,)


# ---------------------------------------------------------------- the models


def test_models_reject_wrong_images():
    from vqfast.models import VQVAE, ImprovedVQVAE, SimpleVQVAE

    ms = VQVAE(vocab_size=37, z_channels=5, ch=8, ch_mult=(1, 2), num_res_blocks=1, norm_groups=4,
               v_patch_nums=(1, 3, 4, 7), share_quant_resi=3)
    # Each message names the argument as the model's forward calls it (VAR's VQVAE: inp).
    for model, size, name in ((SimpleVQVAE(), 32, "img"), (ImprovedVQVAE(), 32, "img"), (ms, 14, "inp")):
        with pytest.raises(TypeError, match=f"{name} must be a floating-point tensor"):
            model(torch.zeros(1, 3, size, size, dtype=torch.uint8))
        with pytest.raises(ValueError, match=rf"{name} must be \[B, 3"):
            model(torch.zeros(3, size, size))
        with pytest.raises(TypeError, match=f"{name} must be a torch.Tensor"):
            model([[0.0]])
