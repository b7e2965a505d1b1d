"""The seeds' single-scale models (VAR's multi-scale VQVAE: tests/test_vqvae.py)."""
import pytest
import torch

from vqfast.models import ImprovedVQVAE, SimpleVQVAE
from vqfast.modules import VectorQuantizer, VectorQuantizer2


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
