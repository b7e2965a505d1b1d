import pytest
import torch
import torch.nn.functional as F

from vqfast.models import ImprovedVQVAE, MultiScaleVQVAE, SimpleVQVAE
from vqfast.models.multiscale import phi_index_per_scale
from vqfast.modules import VectorQuantizer, VectorQuantizer2
from vqfast.testing import oracle

SMALL = dict(vocab_size=37, Cvae=5, ch=8, ch_mult=(1, 2), patch_nums=(1, 3, 4, 7), image_size=14, num_phi=3)


def small_model(**kw):
    torch.manual_seed(0)
    m = MultiScaleVQVAE(**{**SMALL, **kw})
    # Spread the codebook so that many codes are chosen (the VAR init is uniform in +-1/K).
    m.embedding.weight.data.normal_()
    return m


def test_default_config_shapes():
    m = MultiScaleVQVAE()
    assert m.num_tokens == 680 and m.vocab_size == 4096 and m.Cvae == 32 and m.image_size == 256
    assert m.phi_of_scale == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    # The full-size encoder on CPU is slow; check the token machinery on a latent of the right shape.
    f = torch.randn(2, 32, 16, 16)
    _, loss, idx = m.quantize(f)
    assert [tuple(i.shape) for i in idx] == [(2, p * p) for p in (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)]
    assert m.idxBl_to_var_input(idx).shape == (2, 679, 32)
    assert loss.ndim == 0


def test_small_config_shapes_and_grads():
    m = small_model()
    img = torch.rand(3, 3, 14, 14) * 2 - 1
    recon, loss, idx = m(img)
    assert recon.shape == img.shape
    assert [tuple(i.shape) for i in idx] == [(3, 1), (3, 9), (3, 16), (3, 49)]
    assert all(i.dtype == torch.int64 and int(i.min()) >= 0 and int(i.max()) < 37 for i in idx)
    (recon.pow(2).mean() + loss).backward()
    for name in ("encoder.net.0.weight", "decoder.net.0.weight", "embedding.weight", "phis.0.weight"):
        g = dict(m.named_parameters())[name].grad
        assert g is not None and g.abs().sum() > 0, name


def test_encode_decode_reproduces_f_hat():
    m = small_model()
    img = torch.rand(2, 3, 14, 14) * 2 - 1
    f = m.encoder(img)
    f_hat_st, _, idx = m.quantize(f)
    f_hat = m.idxBl_to_fhat(idx)
    torch.testing.assert_close(f_hat, f_hat_st, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.idxBl_to_img(idx), m.decoder(f_hat).clamp(-1, 1))
    torch.testing.assert_close(m.img_to_reconstruction(img), m.idxBl_to_img(m.img_to_idxBl(img)))
    # Re-encoding the same image gives the same tokens.
    assert all(torch.equal(a, b) for a, b in zip(idx, m.img_to_idxBl(img)))


def test_scale_search_is_nearest_codeword_of_residual():
    m = small_model()
    f = torch.randn(2, 5, 7, 7)
    _, _, idx = m.quantize(f)
    rest = f.clone()
    cb = m.embedding.weight.detach()
    for s, p in enumerate(m.patch_nums):
        z = F.interpolate(rest, size=(p, p), mode="area").permute(0, 2, 3, 1).reshape(-1, 5)
        expect = oracle.nearest(z, cb).indices
        assert torch.equal(idx[s].flatten(), expect)
        rest = rest - m.phis[m.phi_of_scale[s]](F.interpolate(
            cb[idx[s]].transpose(1, 2).reshape(2, 5, p, p), size=(7, 7), mode="bicubic")).detach()


def test_idxBl_to_var_input_step_by_step():
    m = small_model()
    B, C, side = 2, 5, 7
    idx = [torch.randint(0, 37, (B, p * p)) for p in m.patch_nums]
    out = m.idxBl_to_var_input(idx)
    assert out.shape == (B, m.num_tokens - 1, C)
    f_hat = torch.zeros(B, C, side, side)
    pieces = []
    for s in range(len(m.patch_nums) - 1):
        p, q = m.patch_nums[s], m.patch_nums[s + 1]
        h = m.embedding.weight[idx[s]].reshape(B, p, p, C).permute(0, 3, 1, 2)
        h = F.interpolate(h, size=(side, side), mode="bicubic")
        conv = m.phis[m.phi_of_scale[s]]
        f_hat = f_hat + 0.5 * h + 0.5 * F.conv2d(h, conv.weight, conv.bias, padding=1)
        pieces.append(F.interpolate(f_hat, size=(q, q), mode="area").reshape(B, C, q * q).transpose(1, 2))
    torch.testing.assert_close(out, torch.cat(pieces, 1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_scales,num_phi,expect", [(10, 4, [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]), (4, 1, [0] * 4),
                                                       (4, 4, [0, 1, 2, 3])])
def test_phi_sharing(num_scales, num_phi, expect):
    assert phi_index_per_scale(num_scales, num_phi) == expect


def test_quant_resi_zero_is_identity_phi():
    m = small_model(quant_resi=0.0)
    x = torch.randn(1, 5, 7, 7)
    assert torch.equal(m.phis[0](x), x)


@pytest.mark.parametrize("kw,match", [
    (dict(patch_nums=(1, 2, 5)), "patch_nums"),
    (dict(patch_nums=(2, 1, 7)), "patch_nums"),
    (dict(image_size=15), "image_size"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(quant_resi=1.5), "quant_resi"),
])
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        MultiScaleVQVAE(**{**SMALL, **kw})


def test_bad_inputs():
    m = small_model()
    with pytest.raises(ValueError, match="img"):
        m(torch.randn(1, 3, 16, 16))
    with pytest.raises(TypeError, match="img"):
        m.img_to_idxBl([1, 2])
    with pytest.raises(ValueError, match=r"idx_list\[1\]"):
        m.idxBl_to_fhat([torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)] * 2)


@pytest.mark.parametrize("hidden_dim,quantizer", [(None, VectorQuantizer2), (32, VectorQuantizer)])
def test_simple_vqvae(hidden_dim, quantizer):
    torch.manual_seed(0)
    m = SimpleVQVAE(16, 12) if hidden_dim is None else SimpleVQVAE(16, 12, hidden_dim)
    assert type(m.quantize) is quantizer
    assert m.hidden_dim == (12 if hidden_dim is None else hidden_dim)
    img = torch.randn(2, 3, 20, 12)
    decoded, loss, indices = m(img)
    assert decoded.shape == img.shape and indices.shape == (2 * 5 * 3,)
    idx = m.img_to_idxBl(img)
    assert len(idx) == 1 and torch.equal(idx[0], indices.view(2, 15))
    emb = m.idxBl_to_var_input(idx)
    torch.testing.assert_close(emb, m.quantize.embedding.weight[idx[0]])
    torch.testing.assert_close(m.idxBl_to_img(idx, 5, 3), decoded, rtol=1e-5, atol=1e-6)


def test_improved_vqvae():
    torch.manual_seed(0)
    m = ImprovedVQVAE(num_quantizers=3, vocab_size=16, embedding_dim=12, hidden_dim=20)
    img = torch.randn(2, 3, 8, 16)
    decoded, loss, indices = m(img)
    assert decoded.shape == img.shape and len(indices) == 3
    idx = m.img_to_idxBl(img)
    assert [tuple(i.shape) for i in idx] == [(2, 8)] * 3
    assert all(torch.equal(a.flatten(), b) for a, b in zip(idx, indices))
    emb = m.idxBl_to_var_input(idx)
    expect = sum(q.embedding.weight[i] for q, i in zip(m.quantize.quantizers, idx))
    torch.testing.assert_close(emb, expect)
    torch.testing.assert_close(m.idxBl_to_img(idx, 2, 4), decoded, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="idx_list"):
        m.idxBl_to_var_input(idx[:2])


def test_simple_vqvae_bad_input():
    m = SimpleVQVAE()
    with pytest.raises(ValueError, match="img"):
        m(torch.randn(1, 3, 10, 10))
    with pytest.raises(ValueError, match="hidden_dim"):
        SimpleVQVAE(16, 64, 0)
