"""torch.compile(fullgraph=True) traces the quantizers' forward + backward with no graph break, training
options included, and gives the eager results."""
import pytest
import torch

import vqfast
from vqfast import ResidualVectorQuantizer, VectorQuantizer, VectorQuantizer2

BACKENDS = [b for b in ("torch", "cpu") if b in vqfast.available_backends("cpu")]


def _run(model, z):
    z = z.clone().requires_grad_(True)
    q, loss, idx = model(z)
    ((q**2).sum() + loss).backward()
    return q.detach(), loss.detach(), idx, z.grad


def _compare(eager, compiled, steps=2, shape=(2, 17, 3, 5), scale=1 / 37):
    gen = torch.Generator().manual_seed(4)
    for _ in range(steps):
        z = torch.randn(*shape, generator=gen) * scale
        torch.manual_seed(7)  # the same random stream for dead-code candidates in both runs
        a = _run(eager, z)
        torch.manual_seed(7)
        b = _run(compiled, z)
        idx_a, idx_b = a[2], b[2]
        for x, y in zip(idx_a if isinstance(idx_a, list) else [idx_a], idx_b if isinstance(idx_b, list) else [idx_b]):
            assert torch.equal(x, y)
        for x, y in ((a[0], b[0]), (a[1], b[1]), (a[3], b[3])):
            torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-7)
    for (name, p), p2 in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(p2, p, rtol=1e-5, atol=1e-7)
        if p.grad is not None:
            torch.testing.assert_close(p2.grad, p.grad, rtol=1e-5, atol=1e-7)
    for (name, buf), buf2 in zip(eager.named_buffers(), compiled.buffers()):
        torch.testing.assert_close(buf2, buf, rtol=1e-5, atol=1e-7, msg=name)


def _twins(build):
    torch.manual_seed(0)
    eager = build()
    torch.manual_seed(0)
    twin = build()
    return eager, twin


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", [{}, {"ema": True, "dead_code_threshold": 0.5}], ids=["default", "ema-dead"])
def test_vector_quantizer_fullgraph(backend, options):
    torch._dynamo.reset()
    eager, twin = _twins(lambda: VectorQuantizer(37, 17, backend=backend, **options))
    _compare(eager, torch.compile(twin, fullgraph=True))


def test_vq2_and_rvq_fullgraph_aot_eager():
    # aot_eager: the same Dynamo graph capture and AOTAutograd backward as inductor, without its C++
    # compile time (seconds per graph on 2 cores); inductor itself is covered by the test above.
    backend = BACKENDS[-1]
    torch._dynamo.reset()
    eager, twin = _twins(lambda: VectorQuantizer2(24, 3, backend=backend, dead_code_threshold=0.3))
    _compare(eager, torch.compile(twin, fullgraph=True, backend="aot_eager"), shape=(2, 3, 8), scale=1 / 24)
    torch._dynamo.reset()
    eager, twin = _twins(lambda: ResidualVectorQuantizer(2, 24, 3, backend=backend, ema=True, metric="cosine"))
    _compare(eager, torch.compile(twin, fullgraph=True, backend="aot_eager"), shape=(2, 3, 4, 4), scale=1.0)


def test_kmeans_init_then_fullgraph():
    # k-means runs once, eagerly, on the first training batch; afterwards forward has no k-means branch.
    torch._dynamo.reset()
    eager, twin = _twins(lambda: VectorQuantizer(8, 3, ema=True, kmeans_init=True))
    z = torch.randn(2, 3, 5, 5)
    torch.manual_seed(3)  # k-means++ draws from the global generator: the same seeds for both
    eager(z)
    torch.manual_seed(3)
    twin(z)
    assert not twin._kmeans_pending
    _compare(eager, torch.compile(twin, fullgraph=True, backend="aot_eager"), shape=(2, 3, 5, 5), scale=1.0)
    # A checkpoint taken after initialisation does not re-run k-means when loaded.
    fresh = VectorQuantizer(8, 3, ema=True, kmeans_init=True)
    assert fresh._kmeans_pending
    fresh.load_state_dict(twin.state_dict())
    assert not fresh._kmeans_pending


def _gpu_backends() -> list[str]:
    return [b for b in ("cuda", "triton") if torch.cuda.is_available() and b in vqfast.available_backends("cuda")]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("options", [{}, {"ema": True, "dead_code_threshold": 0.5}], ids=["default", "ema-dead"])
def test_vector_quantizer_fullgraph_on_gpu(backend, options):
    """The GPU backends under torch.compile (inductor), forward + backward, against eager on the GPU."""
    if backend not in _gpu_backends():
        pytest.skip(f"backend {backend!r} needs a CUDA device and its kernels")
    torch._dynamo.reset()
    eager, twin = _twins(lambda: VectorQuantizer(37, 17, backend=backend, **options).cuda())
    gen = torch.Generator().manual_seed(4)
    compiled = torch.compile(twin, fullgraph=True)
    for _ in range(2):
        z = (torch.randn(2, 17, 3, 5, generator=gen) / 37).cuda()
        torch.manual_seed(7)
        a = _run(eager, z)
        torch.manual_seed(7)
        b = _run(compiled, z)
        assert torch.equal(a[2], b[2])
        for x, y in ((a[0], b[0]), (a[1], b[1]), (a[3], b[3])):
            torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-7)
