"""The public op: every (device, backend) pair against the independent oracle, registry behaviour, opcheck,
torch.compile, fallback."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import vqfast
from tests.helpers import assert_exact, backend_params, check_cosine_zero_vectors, run

CPU_BACKENDS = vqfast.available_backends("cpu")
BACKENDS = backend_params()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,d,k", [(1, 1, 1), (7, 3, 1), (100, 17, 513), (1000, 100, 3), (333, 1, 1000), (5, 513, 17)])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_backends_match_oracle(backend, n, d, k, metric):
    z = torch.randn(n, d)
    cb = torch.randn(k, d)
    assert_exact(z, cb, run(z, cb, backend, metric=metric), metric)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes(backend, dtype):
    z = torch.randn(211, 19).to(dtype)
    cb = torch.randn(67, 19).to(dtype)
    assert_exact(z, cb, run(z, cb, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_return_z_dtype(backend):
    z = torch.randn(50, 8).half()
    cb = torch.randn(20, 8)
    out = run(z, cb, backend)
    assert out[1].dtype == torch.float16
    assert_exact(z, cb, out)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    z = torch.randn(40, 30)[:, ::3]  # [40, 10], stride 3
    cb = torch.randn(10, 26).T[:, :]  # [26, 10] transposed view
    cb = cb[::2]  # [13, 10]
    assert not z.is_contiguous() and not cb.is_contiguous()
    device, name = backend
    z, cb = z.to(device), cb.to(device)
    if device == "cuda":  # .to() copies into contiguous memory: make the views again on the device
        z, cb = torch.randn(40, 30, device=device)[:, ::3], torch.randn(10, 26, device=device).T[::2]
    out = vqfast.nearest_codeword(z, cb, backend=name)
    assert_exact(z, cb, out)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_z(backend):
    idx, cw, dist = vqfast.nearest_codeword(torch.empty(0, 5), torch.randn(3, 5), backend=backend)
    assert idx.shape == (0,) and cw.shape == (0, 5) and dist.shape == (0,)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradients_flow_through_op(backend):
    z = torch.randn(30, 5, requires_grad=True)
    cb = torch.randn(11, 5, requires_grad=True)
    idx, cw, dist = vqfast.nearest_codeword(z, cb, backend=backend)
    (cw.sum() * 2 + dist.sum()).backward()
    z2 = z.detach().clone().requires_grad_()
    cb2 = cb.detach().clone().requires_grad_()
    cw2 = cb2[idx]
    (cw2.sum() * 2 + ((z2 - cw2) ** 2).sum()).backward()
    torch.testing.assert_close(z.grad, z2.grad)
    torch.testing.assert_close(cb.grad, cb2.grad)


def test_available_backends_and_auto_choice():
    names = vqfast.available_backends()
    assert "torch" in names
    assert set(names) <= {"torch", "cpu", "cuda", "triton"}
    from vqfast.backends import resolve_backend

    expected = "cpu" if vqfast.has_ext() else "torch"
    assert resolve_backend("auto", "cpu") == expected


def test_unknown_and_unavailable_backend_errors(monkeypatch):
    z, cb = torch.randn(4, 3), torch.randn(5, 3)
    with pytest.raises(ValueError, match="backend='nope'"):
        vqfast.nearest_codeword(z, cb, backend="nope")
    with pytest.raises(ValueError, match="backend='cuda'.*cannot run"):
        vqfast.nearest_codeword(z, cb, backend="cuda")
    monkeypatch.setenv("VQFAST_BACKEND", "cuda")
    with pytest.raises(ValueError, match="VQFAST_BACKEND"):
        vqfast.nearest_codeword(z, cb)
    monkeypatch.setenv("VQFAST_BACKEND", "torch")
    # The override applies to "auto" only; an explicit backend argument wins.
    assert torch.equal(vqfast.nearest_codeword(z, cb)[0], vqfast.nearest_codeword(z, cb, backend="torch")[0])


def test_env_override_selects_backend(monkeypatch):
    import vqfast.ops as ops

    calls = []
    real = ops._op_for
    monkeypatch.setattr(ops, "_op_for", lambda name: calls.append(name) or real(name))
    monkeypatch.setenv("VQFAST_BACKEND", "torch")
    vqfast.nearest_codeword(torch.randn(4, 3), torch.randn(5, 3))
    assert calls == ["torch"]


# opcheck's test_aot_dispatch_dynamic sums all outputs into one accumulator, which fails when the
# first output is int64 (the indices) and a later one is float; AOT tracing with gradients is covered
# by test_torch_compile_fullgraph below instead.
OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor")


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_opcheck_torch_op(metric):
    z = torch.randn(37, 5, requires_grad=True)
    cb = torch.randn(13, 5, requires_grad=True)
    torch.library.opcheck(torch.ops.vqfast.nearest_codeword_torch.default, (z, cb, metric, "exact"), test_utils=OPCHECK_UTILS)


@pytest.mark.skipif(not vqfast.has_ext(), reason="vqfast._C not built")
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_opcheck_compiled_op(metric):
    z = torch.randn(37, 5, requires_grad=True)
    cb = torch.randn(13, 5, requires_grad=True)
    torch.library.opcheck(torch.ops.vqfast.nearest_codeword.default, (z, cb, metric, "exact"), test_utils=OPCHECK_UTILS)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_torch_compile_fullgraph(backend):
    z = torch.randn(64, 8, requires_grad=True)
    cb = torch.randn(32, 8, requires_grad=True)

    def f(z, cb):
        idx, cw, dist = vqfast.nearest_codeword(z, cb, backend=backend)
        return idx, (cw * 2).sum() + dist.mean()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    idx_c, loss_c = compiled(z, cb)
    idx_e, loss_e = f(z, cb)
    assert torch.equal(idx_c, idx_e)
    torch.testing.assert_close(loss_c, loss_e)
    g_c = torch.autograd.grad(loss_c, (z, cb))
    g_e = torch.autograd.grad(loss_e, (z, cb))
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b)


@pytest.mark.slow
def test_extension_missing_fallback():
    # Simulate a checkout whose extension is not built: vqfast must import, warn once with the
    # rebuild command, offer only the torch backend, and give a clear error for backend="cpu".
    code = textwrap.dedent(
        """
        import sys, warnings
        sys.modules["vqfast._C"] = None  # makes "from vqfast import _C" raise ImportError
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import vqfast
            import vqfast.ops
        msgs = [str(w.message) for w in caught if "vqfast._C" in str(w.message)]
        assert len(msgs) == 1, msgs
        assert "pip install --no-build-isolation -e ." in msgs[0]
        assert vqfast.available_backends("cpu") == ["torch"], vqfast.available_backends("cpu")
        import torch
        z, cb = torch.randn(20, 4), torch.randn(6, 4)
        idx, cw, dist = vqfast.nearest_codeword(z, cb)
        assert torch.equal(idx, vqfast.nearest_codeword(z, cb, backend="torch")[0])
        try:
            vqfast.nearest_codeword(z, cb, backend="cpu")
        except ValueError as e:
            assert "pip install --no-build-isolation -e ." in str(e), e
        else:
            raise AssertionError("backend='cpu' without the extension must raise")
        q, loss, ind = vqfast.VectorQuantizer(6, 4)(torch.randn(2, 4, 3, 3))
        print("fallback ok")
        """
    )
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("VQFAST_NO_EXT_WARNING", None)
    env.pop("VQFAST_BACKEND", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "fallback ok" in out.stdout


@pytest.mark.parametrize("device_backend", BACKENDS)
def test_cosine_zero_vectors_follow_the_contract(device_backend):
    # issue 26 item 8: a zero row took whichever code's normalised length rounded lowest.
    check_cosine_zero_vectors(device_backend)
