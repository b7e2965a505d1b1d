"""vqfast.compat.diffusers and vqfast.accelerate against the real diffusers VectorQuantizer and VQModel."""
import copy

import numpy as np
import pytest
import torch

import vqfast
from vqfast.testing.oracle import distances as brute_force_fp64
from tests.helpers import MaxNumel
from vqfast.compat.diffusers import VectorQuantizer

diffusers = pytest.importorskip("diffusers")
from diffusers import VQModel  # noqa: E402
from diffusers.models.autoencoders.vae import VectorQuantizer as RealVectorQuantizer  # noqa: E402

BACKENDS = vqfast.available_backends("cpu")


def _vq_model(**config):
    """A small VQModel: 2 levels (16 x 16 -> 8 x 8 latents), latent_channels 4, codebook 37 x 5."""
    torch.manual_seed(0)
    model = VQModel(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=4, num_vq_embeddings=37, norm_num_groups=4, vq_embed_dim=5, **config,
    )
    with torch.no_grad():  # a spread codebook, as after training, so that assignments vary
        model.quantize.embedding.weight.normal_(0.0, 0.5)
    return model


def _grads(model, x, g):
    """Forward + backward of the model: (sample, commit_loss, x.grad, every parameter's grad by name)."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    out = model(x)
    ((out.sample * g).sum() + 2.0 * out.commit_loss).backward()
    return out.sample.detach(), out.commit_loss.detach(), x.grad, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("backend", BACKENDS)
def test_vq_model_same_outputs_losses_indices_and_gradients(backend, capsys):
    model = _vq_model()
    accelerated = copy.deepcopy(model)
    params = dict(accelerated.named_parameters())
    assert vqfast.accelerate(accelerated, backend=backend, verbose=True) is accelerated
    assert "quantize: diffusers VectorQuantizer replaced" in capsys.readouterr().out
    assert isinstance(accelerated.quantize, VectorQuantizer) and isinstance(accelerated.quantize, RealVectorQuantizer)
    assert all(p is params[n] for n, p in accelerated.named_parameters())
    x = torch.randn(2, 3, 16, 16)
    g = torch.randn(2, 3, 16, 16)
    want, got = _grads(model, x, g), _grads(accelerated, x, g)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    assert want[3].keys() == got[3].keys()
    for name, grad in want[3].items():
        assert grad is not None and torch.equal(got[3][name], grad), name
    # The indices and the encode / decode paths.
    with torch.no_grad():
        h = model.encode(x).latents
        assert torch.equal(accelerated.encode(x).latents, h)
        _, _, (_, _, idx) = model.quantize(h)
        _, _, (_, _, idx_acc) = accelerated.quantize(h)
        assert torch.equal(idx_acc, idx) and idx.shape == (2 * 8 * 8,) and idx.unique().numel() > 5
        dec, dec_acc = model.decode(h), accelerated.decode(h)
        assert torch.equal(dec_acc.sample, dec.sample) and torch.equal(dec_acc.commit_loss, dec.commit_loss)
        unquantized = model.decode(h, force_not_quantize=True).sample
        assert torch.equal(accelerated.decode(h, force_not_quantize=True).sample, unquantized)


def test_vq_model_lookup_from_codebook_decodes_indices():
    model = _vq_model(lookup_from_codebook=True)
    accelerated = vqfast.accelerate(copy.deepcopy(model))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        h = accelerated.encode(x).latents
        quant, _, (_, _, idx) = accelerated.quantize(h)
        shape = (2, 8, 8, 5)
        got = accelerated.decode(idx, force_not_quantize=True, shape=shape)
        want = model.decode(idx, force_not_quantize=True, shape=shape)
        assert torch.equal(got.sample, want.sample) and torch.equal(got.commit_loss, want.commit_loss)
        codes = accelerated.quantize.embedding.weight[idx].reshape(shape).permute(0, 3, 1, 2)
        assert torch.equal(accelerated.quantize.get_codebook_entry(idx, shape), codes)
        torch.testing.assert_close(quant, codes)  # z + (codes - z), rounded


def test_vq_model_checkpoints_both_ways(tmp_path):
    model = _vq_model()
    accelerated = vqfast.accelerate(copy.deepcopy(model))
    fresh = _vq_model()
    with torch.no_grad():
        fresh.quantize.embedding.weight.zero_()
    fresh.load_state_dict(accelerated.state_dict(), strict=True)
    accelerated.load_state_dict(model.state_dict(), strict=True)
    # diffusers' own format: an accelerated model saves, and a plain VQModel loads it.
    accelerated.save_pretrained(tmp_path / "vq")
    loaded = VQModel.from_pretrained(tmp_path / "vq")
    assert type(loaded.quantize) is RealVectorQuantizer
    for (name, a), b in zip(loaded.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(vqfast.accelerate(loaded)(x).sample, model(x).sample)


@pytest.fixture
def used_file(tmp_path):
    path = tmp_path / "used.npy"
    np.save(path, np.array([3, 8, 1, 30, 8, 17, 2, 36, 0, 5], dtype=np.int32))  # one duplicate (8)
    return str(path)


OPTIONS = [
    {},
    {"legacy": False},
    {"sane_index_shape": True},
    {"remap": "random"},
    {"remap": "extra", "sane_index_shape": True},
    {"remap": 2, "legacy": False},
]


@pytest.mark.parametrize("via", ["compat", "accelerate"])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_quantizer_matches_the_real_one(used_file, via, options):
    options = dict(options)
    if "remap" in options:
        options["unknown_index"] = options.pop("remap")
        options["remap"] = used_file
    torch.manual_seed(0)
    real = RealVectorQuantizer(37, 5, 0.3, **options)
    if via == "accelerate":
        ours = vqfast.accelerate(copy.deepcopy(real))
    else:
        torch.manual_seed(0)
        ours = VectorQuantizer(37, 5, 0.3, **options)
        assert torch.equal(ours.embedding.weight, real.embedding.weight)  # same init from the same RNG state
    assert list(ours.state_dict()) == list(real.state_dict())
    for name in ("n_e", "vq_embed_dim", "beta", "legacy", "remap", "re_embed", "sane_index_shape"):
        assert getattr(ours, name) == getattr(real, name), name
    assert not hasattr(ours, "e_dim")
    with torch.no_grad():
        real.embedding.weight.normal_()
    ours.load_state_dict(real.state_dict(), strict=True)
    real.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(3, 5, 7, 6)
    g = torch.randn_like(x)
    results = []
    for m in (real, ours):
        xi = x.clone().requires_grad_()
        torch.manual_seed(4)
        z_q, loss, info = m(xi)
        rng = torch.get_rng_state()
        ((z_q * g).sum() + 3.0 * loss).backward()
        results.append((z_q, loss, info, xi.grad, m.embedding.weight.grad, rng))
    (zq_r, l_r, info_r, gx_r, gw_r, rng_r), (zq_o, l_o, info_o, gx_o, gw_o, rng_o) = results
    for a, b in ((zq_o, zq_r), (l_o, l_r), (gx_o, gx_r), (gw_o, gw_r), (rng_o, rng_r)):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert info_o[:2] == (None, None) and info_o[2].shape == info_r[2].shape and torch.equal(info_o[2], info_r[2])
    shape = (3, 7, 6, 5)
    assert torch.equal(ours.get_codebook_entry(info_o[2], shape), real.get_codebook_entry(info_r[2].clone(), shape))


def test_cdist_argmin_picks_a_non_nearest_codeword_vqfast_the_nearest():
    """diffusers searches by argmin(torch.cdist(z, E)), which for more than 25 rows expands
    ||z||^2 + ||e||^2 - 2 z.e in fp32: around a centre of norm ~1450 its spacing (0.25) swamps codewords
    0.01 apart, and it picks codewords that are not the nearest. vqfast picks the truly nearest."""
    gen = torch.Generator().manual_seed(1)
    centre = torch.full((8,), 512.0)
    codebook = centre + 0.01 * torch.randn(16, 8, generator=gen)
    flat = centre + 0.01 * torch.randn(64, 8, generator=gen)
    z = flat.reshape(1, 8, 8, 8).permute(0, 3, 1, 2)
    real = RealVectorQuantizer(16, 8, 0.25)
    with torch.no_grad():
        real.embedding.weight.copy_(codebook)
    theirs = real(z)[2][2]
    ours = vqfast.accelerate(copy.deepcopy(real))(z)[2][2]
    exact = brute_force_fp64(flat, codebook)
    truth = exact.argmin(1)
    assert torch.equal(ours, truth)
    worse = exact.gather(1, theirs[:, None])[:, 0] > exact.gather(1, truth[:, None])[:, 0]
    assert worse.any() and not torch.equal(theirs, ours)


def test_bf16_autocast_and_half_precision_behave_as_the_original():
    # Under CPU autocast the model's activations are bf16 and cdist runs in fp32: the same outputs, dtypes
    # and gradients after accelerate.
    model = _vq_model()
    accelerated = vqfast.accelerate(copy.deepcopy(model))
    x = torch.randn(2, 3, 16, 16)
    g = torch.randn(2, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = _grads(model, x, g), _grads(accelerated, x, g)
    assert got[0].dtype == want[0].dtype == torch.bfloat16 and got[1].dtype == want[1].dtype == torch.float32
    for a, b in zip(got[:3], want[:3]):
        assert torch.equal(a, b)
    for name, grad in want[3].items():
        assert torch.equal(got[3][name], grad), name
    # A half-precision quantizer on well-separated codewords (so that the original's fp16 search is
    # unambiguous): the same fp16 outputs and gradients.
    torch.manual_seed(0)
    real = RealVectorQuantizer(37, 5, 0.25).half()
    with torch.no_grad():
        real.embedding.weight.copy_(4.0 * torch.randn(37, 5))
    ours = vqfast.accelerate(copy.deepcopy(real))
    idx = torch.randint(0, 37, (2 * 6 * 5,))
    z = (real.embedding.weight[idx].detach() + 0.05 * torch.randn(60, 5).half()).reshape(2, 6, 5, 5).permute(0, 3, 1, 2)
    runs = []
    for m in (real, ours):
        zi = z.detach().clone().requires_grad_()
        z_q, loss, (_, _, ind) = m(zi)
        (z_q.float().sum() + loss.float()).backward()
        runs.append((z_q, loss, ind, zi.grad, m.embedding.weight.grad))
    for a, b in zip(*runs):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert runs[0][0].dtype == runs[0][1].dtype == torch.float16 and torch.equal(runs[1][2], idx)
    # At most 25 rows and 25 codewords torch.cdist takes its direct kernel, which has no fp16 on the CPU:
    # the original raises there; the accelerated quantizer searches the fp16 values exactly.
    small = RealVectorQuantizer(20, 5, 0.25).half()
    acc_small = vqfast.accelerate(copy.deepcopy(small))
    zs = torch.randn(1, 5, 4, 4).half()
    with pytest.raises(RuntimeError, match="Half"):
        small(zs)
    ind = acc_small(zs)[2][2]
    assert torch.equal(ind, brute_force_fp64(zs.permute(0, 2, 3, 1).reshape(-1, 5), small.embedding.weight).argmin(1))


@pytest.mark.parametrize("options", [{}, {"sane_index_shape": True, "legacy": False}], ids=["default", "sane-fixed"])
def test_torch_compile_fullgraph(options):
    torch._dynamo.reset()
    torch.manual_seed(0)
    real = RealVectorQuantizer(29, 5, 0.25, **options)
    with torch.no_grad():
        real.embedding.weight.normal_()
    eager = vqfast.accelerate(real)
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 5, 3, 7)
    runs = []
    for m, params in ((eager, eager), (compiled, twin)):
        xi = x.clone().requires_grad_()
        z_q, loss, (_, _, idx) = m(xi)
        ((z_q**2).sum() + loss).backward()
        runs.append((z_q.detach(), loss.detach(), idx, xi.grad, params.embedding.weight.grad))
    for a, b in zip(*runs):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_no_n_by_k_tensor():
    n, k = 4096, 2048  # N x K = 8.4M elements; cdist's distance matrix would be that size
    vq = VectorQuantizer(k, 4, 0.25)
    x = torch.randn(4, 4, 32, 32, requires_grad=True)
    with MaxNumel() as mode:
        z_q, loss, _ = vq(x)
        (z_q.sum() + loss).backward()
    assert mode.max_numel < n * k


def test_bad_input():
    vq = VectorQuantizer(8, 4, 0.25)
    with pytest.raises(ValueError, match=r"z must be \[B, C, H, W\] with C = vq_embed_dim = 4"):
        vq(torch.randn(2, 3, 3, 3))
    with pytest.raises(ValueError, match="vq_embed_dim"):
        VectorQuantizer(8, 0, 0.25)
    with pytest.raises(TypeError):
        vq(torch.randn(1, 4, 2, 2), temp=1.0)  # diffusers' forward takes z only
