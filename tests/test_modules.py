"""Drop-in parity of the quantizer modules with the classic implementations (vqfast.testing.seeds)."""
import pytest
import torch

import vqfast
from tests.helpers import MaxNumel
from vqfast.reference import CHUNK_ELEMENTS
from vqfast.testing.seeds import SeedResidualVectorQuantizer, SeedVectorQuantizer, SeedVectorQuantizer2

BACKENDS = vqfast.available_backends("cpu")


def _pair(kind, backend, *args):
    torch.manual_seed(123)
    seed = {"vq2": SeedVectorQuantizer2, "vq": SeedVectorQuantizer, "rvq": SeedResidualVectorQuantizer}[kind](*args)
    torch.manual_seed(123)
    ours = {"vq2": vqfast.VectorQuantizer2, "vq": vqfast.VectorQuantizer, "rvq": vqfast.ResidualVectorQuantizer}[kind](
        *args, backend=backend
    )
    return seed, ours


def _run(module, x, grad_out):
    x = x.detach().clone().requires_grad_()
    q, loss, idx = module(x)
    ((q * grad_out).sum() + 3.0 * loss).backward()
    grads = [p.grad.clone() for p in module.parameters()]
    return q.detach(), loss.detach(), idx, x.grad, grads


CASES = [
    ("vq2", (16, 64), (2, 64, 8, 8)),
    ("vq2", (37, 5), (3, 5, 7, 3)),
    ("vq", (16, 64), (1, 64, 8, 8)),
    ("vq", (100, 17), (2, 17, 5, 9)),
    ("vq", (513, 3, 0.4), (2, 3, 11, 13)),
    ("rvq", (2, 16, 64), (1, 64, 8, 8)),
    ("rvq", (3, 50, 6, 0.3), (2, 6, 5, 7)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,args,shape", CASES)
def test_parity_with_seed_modules(backend, kind, args, shape):
    seed, ours = _pair(kind, backend, *args)
    assert [n for n, _ in seed.named_parameters()] == [n for n, _ in ours.named_parameters()]
    for a, b in zip(seed.parameters(), ours.parameters()):
        assert torch.equal(a, b)  # same initialisation from the same RNG state
    # Spread the codebook so that assignments are non-trivial.
    with torch.no_grad():
        for a, b in zip(seed.parameters(), ours.parameters()):
            w = torch.randn_like(a)
            a.copy_(w)
            b.copy_(w)
    x = torch.randn(shape)
    g = torch.randn(shape)
    qs, ls, is_, gxs, gps = _run(seed, x, g)
    qo, lo, io, gxo, gpo = _run(ours, x, g)
    if kind == "rvq":
        assert len(is_) == len(io)
        for a, b in zip(is_, io):
            assert torch.equal(a, b)
    else:
        assert torch.equal(is_, io)
    torch.testing.assert_close(qo, qs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lo, ls, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gxo, gxs, rtol=1e-6, atol=1e-6)
    for a, b in zip(gpo, gps):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind,args", [("vq2", (16, 8)), ("vq", (32, 8, 0.25)), ("rvq", (3, 32, 8))])
def test_state_dict_from_seed_loads_strict(kind, args):
    seed, ours = _pair(kind, "auto", *args)
    with torch.no_grad():
        for p in seed.parameters():
            p.normal_()
    missing = ours.load_state_dict(seed.state_dict(), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    x = torch.randn(2, 8, 4, 4)
    assert torch.equal(seed(x)[0], ours(x)[0])
    # And back: a vqfast state_dict loads into the classic class.
    seed.load_state_dict(ours.state_dict(), strict=True)


def test_get_codebook_and_init():
    torch.manual_seed(0)
    vq = vqfast.VectorQuantizer(10, 4)
    cb = vq.get_codebook()
    assert cb.shape == (10, 4) and not cb.requires_grad
    assert cb.abs().max() <= 1 / 10
    rvq = vqfast.ResidualVectorQuantizer(3, 10, 4)
    assert rvq.get_codebook().shape == (3, 10, 4)
    assert "beta=0.25" in repr(vq) and "backend='auto'" in repr(vq)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(2, 6, 11), (2, 6, 3, 4, 5)])
def test_1d_and_3d_inputs_match_2d_layout(backend, shape):
    torch.manual_seed(5)
    vq = vqfast.VectorQuantizer(20, 6, backend=backend)
    with torch.no_grad():
        vq.embedding.weight.normal_()
    x = torch.randn(shape, requires_grad=True)
    q, loss, idx = vq(x)
    assert q.shape == x.shape and idx.shape == (x.numel() // 6,)
    # Same computation seen as a [B, C, S, 1] image.
    x4 = x.detach().reshape(shape[0], 6, -1, 1).requires_grad_()
    q4, loss4, idx4 = vq(x4)
    assert torch.equal(idx, idx4)
    torch.testing.assert_close(q.reshape(q4.shape), q4)
    torch.testing.assert_close(loss, loss4)
    loss.backward()
    loss4.backward()
    torch.testing.assert_close(x.grad.reshape(x4.grad.shape), x4.grad)



@pytest.mark.parametrize("backend", BACKENDS)
def test_no_n_by_k_tensor_in_forward_or_backward(backend):
    n, k, d = 8192, 2048, 4  # N x K = 16.8M elements > the 4.2M-element chunk budget
    vq = vqfast.VectorQuantizer(k, d, backend=backend)
    x = torch.randn(2, d, 64, 64, requires_grad=True)
    assert x.numel() // d == n
    with MaxNumel() as mode:
        q, loss, _ = vq(x)
        (q.sum() + loss).backward()
    assert mode.max_numel <= max(CHUNK_ELEMENTS, n * d, k * d)
    assert mode.max_numel < n * k


def test_bad_module_inputs():
    vq = vqfast.VectorQuantizer(8, 4)
    with pytest.raises(ValueError, match="channels"):
        vq(torch.randn(2, 5, 3, 3))
    with pytest.raises(ValueError, match="B, C, H, W"):
        vq(torch.randn(4, 4))
    with pytest.raises(ValueError, match="num_embeddings"):
        vqfast.VectorQuantizer(0, 4)
    with pytest.raises(ValueError, match="backend"):
        vqfast.VectorQuantizer(8, 4, backend="gpu")


# ---- index maps, indices -> codes, classic checkpoints into learning modules ---------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(2, 5, 7), (3, 5, 4, 6), (2, 5, 3, 2, 4)])
def test_index_shape_spatial(backend, shape):
    flat_vq = vqfast.VectorQuantizer(19, 5, backend=backend)
    spatial_vq = vqfast.VectorQuantizer(19, 5, backend=backend, index_shape="spatial")
    spatial_vq.load_state_dict(flat_vq.state_dict(), strict=True)
    x = torch.randn(shape) / 19
    q, loss, flat = flat_vq(x)
    q2, loss2, idx = spatial_vq(x)
    assert flat.shape == (x.numel() // 5,) and idx.shape == (shape[0],) + shape[2:]
    assert torch.equal(idx.reshape(-1), flat) and torch.equal(q, q2) and torch.equal(loss, loss2)
    # The index map points at the codeword of each position: [B, *S] -> [B, C, *S], forward's layout.
    codes = spatial_vq.indices_to_codes(idx)
    assert codes.shape == x.shape
    assert torch.equal(codes.movedim(1, -1), spatial_vq.embedding.weight[idx])
    torch.testing.assert_close(codes, q)  # q = z + (codes - z), rounded
    assert "index_shape='spatial'" in repr(spatial_vq) and "index_shape" not in repr(flat_vq)
    vq2 = vqfast.VectorQuantizer2(19, 5, backend=backend, index_shape="spatial")
    assert vq2(x)[2].shape == idx.shape
    with pytest.raises(ValueError, match="index_shape"):
        vqfast.VectorQuantizer(19, 5, index_shape="bhw")


def test_get_codebook_entry_and_indices_to_codes():
    torch.manual_seed(2)
    vq = vqfast.VectorQuantizer(23, 4)
    with torch.no_grad():
        vq.embedding.weight.normal_()
    x = torch.randn(2, 4, 3, 5)
    _, _, flat = vq(x)
    w = vq.embedding.weight.detach()
    assert torch.equal(vq.get_codebook_entry(flat), w[flat])  # [N, C]
    assert torch.equal(vq.indices_to_codes(flat), w[flat])
    image = vq.get_codebook_entry(flat, shape=(2, 3, 5, 4))  # taming's (b, h, w, c) -> [B, C, H, W]
    assert torch.equal(image, w[flat].reshape(2, 3, 5, 4).permute(0, 3, 1, 2))
    assert torch.equal(vq.indices_to_codes(flat.reshape(2, 3, 5)), image)
    assert torch.equal(vq.get_codebook_entry(flat.int()), w[flat])  # any integer dtype
    vq.get_codebook_entry(flat).sum().backward()  # differentiable w.r.t. the codebook: one count per lookup
    assert torch.equal(vq.embedding.weight.grad[:, 0], torch.bincount(flat, minlength=23).float())
    with pytest.raises(TypeError, match="integer"):
        vq.get_codebook_entry(flat.float())
    with pytest.raises(ValueError, match=r"\[0, num_embeddings = 23\)"):
        vq.get_codebook_entry(torch.tensor([0, 23]))
    with pytest.raises(ValueError, match=r"\[0, num_embeddings = 23\)"):
        vq.indices_to_codes(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="shape must be"):
        vq.get_codebook_entry(flat, shape=(2, 3, 5, 3))
    with pytest.raises(TypeError, match="torch.Tensor"):
        vq.get_codebook_entry([1, 2])


def test_residual_indices_to_codes():
    torch.manual_seed(4)
    rvq = vqfast.ResidualVectorQuantizer(3, 17, 4, index_shape="spatial")
    with torch.no_grad():
        for q in rvq.quantizers:
            q.embedding.weight.normal_()
    x = torch.randn(2, 4, 5, 3)
    quantized, _, indices = rvq(x)
    assert len(indices) == 3 and all(i.shape == (2, 5, 3) for i in indices)
    want = sum(q.embedding.weight.detach()[i] for q, i in zip(rvq.quantizers, indices)).permute(0, 3, 1, 2)
    codes = rvq.indices_to_codes(indices)
    torch.testing.assert_close(codes, want, rtol=0, atol=0)
    torch.testing.assert_close(codes, quantized, rtol=1e-6, atol=1e-6)
    flat = [i.reshape(-1) for i in indices]
    assert torch.equal(rvq.get_codebook_entry(flat, shape=(2, 5, 3, 4)), codes)
    assert torch.equal(rvq.indices_to_codes(torch.stack(flat)), want.permute(0, 2, 3, 1).reshape(-1, 4))
    with pytest.raises(ValueError, match="one tensor per stage"):
        rvq.indices_to_codes(indices[:2])
    with pytest.raises(TypeError, match="list of 3 tensors"):
        rvq.indices_to_codes(torch.tensor(1))


@pytest.mark.parametrize(
    "options", [{"ema": True}, {"ema": True, "metric": "cosine"}, {"dead_code_threshold": 0.5}, {"kmeans_init": True}],
    ids=["ema", "ema-cosine", "dead-code", "kmeans"],
)
def test_classic_state_dict_loads_strict_into_learning_modules(options):
    torch.manual_seed(6)
    seed = SeedVectorQuantizer(29, 6)
    with torch.no_grad():
        seed.embedding.weight.normal_()
    classic = seed.state_dict()
    ours = vqfast.VectorQuantizer(29, 6, **options)
    result = ours.load_state_dict(classic, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(ours.embedding.weight, seed.embedding.weight)
    # The learning state of a module freshly built around that codebook.
    torch.manual_seed(6)
    fresh = vqfast.VectorQuantizer(29, 6, **options)
    with torch.no_grad():
        fresh.embedding.weight.copy_(seed.embedding.weight)
        if options.get("ema"):
            fresh.embed_avg.copy_(seed.embedding.weight)
        if options.get("kmeans_init"):
            fresh.initted.fill_(True)
            fresh._kmeans_pending = False
    for (name, a), b in zip(ours.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    x = torch.randn(3, 6, 4, 5)
    for m in (ours, fresh):
        torch.manual_seed(1)
        m(x)
    for (name, a), b in zip(ours.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    if options.get("kmeans_init"):  # the loaded codebook is kept: k-means does not re-seed it
        assert torch.equal(ours.embedding.weight, seed.embedding.weight)
    # A learning module's own state_dict keeps its values; a partial one still fails strict loading.
    with torch.no_grad():
        for buf in ours.buffers():
            if buf.dtype.is_floating_point:
                buf.add_(0.5)
    again = vqfast.VectorQuantizer(29, 6, **options)
    again.load_state_dict(ours.state_dict(), strict=True)
    for (name, a), b in zip(again.state_dict().items(), ours.state_dict().values()):
        assert torch.equal(a, b), name
    learning_keys = [k for k in ours.state_dict() if k != "embedding.weight"]
    if len(learning_keys) > 1:
        partial = {k: v for k, v in ours.state_dict().items() if k != learning_keys[0]}
        with pytest.raises(RuntimeError, match=learning_keys[0]):
            again.load_state_dict(partial, strict=True)


def test_classic_residual_state_dict_loads_strict_into_ema_module():
    torch.manual_seed(8)
    seed = SeedResidualVectorQuantizer(3, 16, 4)
    rvq = vqfast.ResidualVectorQuantizer(3, 16, 4, ema=True)
    rvq.load_state_dict(seed.state_dict(), strict=True)
    for stage, seed_stage in zip(rvq.quantizers, seed.quantizers):
        assert torch.equal(stage.embed_avg, seed_stage.embedding.weight)
        assert torch.equal(stage.cluster_size, torch.ones(16))
