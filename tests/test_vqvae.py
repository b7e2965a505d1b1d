"""vqfast.models.VQVAE against VAR's VQVAE: state_dict layouts (a fixture listing the keys and shapes of
VAR's own model), loading, the configuration read from a bare state_dict, tokens and images."""
import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vqfast.models import VQVAE, MultiScaleQuantizer, vqvae_config_from_state_dict
from vqfast.models.autoencoder import AttnBlock, Downsample2x, ResnetBlock, Upsample2x
from vqfast.multiscale import VARQuantizer

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "var_vqvae_layouts.json").read_text())["layouts"]
# A small model of the same architecture: 2 levels (2x downsampling, 10 x 10 images), width 8, 4 norm groups.
SMALL = dict(vocab_size=37, z_channels=6, ch=8, v_patch_nums=(1, 2, 3, 5), ch_mult=(1, 2), num_res_blocks=1,
             norm_groups=4, share_quant_resi=3)


def layout(model_or_sd, under=None):
    sd = model_or_sd.state_dict() if isinstance(model_or_sd, torch.nn.Module) else model_or_sd
    return [[k, list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in sd.items()
            if under is None or k.startswith(under)]


def var_config(name):
    cfg = dict(FIXTURE[name]["config"])
    if "v_patch_nums" in cfg:
        cfg["v_patch_nums"] = tuple(cfg["v_patch_nums"])
    return cfg


def meta_model(**kw):
    with torch.device("meta"):
        return VQVAE(**kw)


def small_model(**kw):
    torch.manual_seed(0)
    m = VQVAE(**{**SMALL, **kw})
    m.quantize.embedding.weight.data.mul_(0.3)  # codes on the features' scale, so many are chosen
    return m


# ---- layouts ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(FIXTURE))
def test_state_dict_layout_equals_vars(name):
    """Keys, order, shapes and dtypes of VAR's own VQVAE (ch 128 default, ch 160 = vae_ch160v4096z32.pth)."""
    entries = FIXTURE[name]["entries"]
    model = meta_model(**var_config(name))
    assert layout(model, FIXTURE[name]["only_keys_under"]) == entries
    assert isinstance(model.quantize, VARQuantizer) and type(model.quantize) is MultiScaleQuantizer


@pytest.mark.parametrize("name", ["ch160", "ch128_share1", "ch128_quant_resi0"])
def test_var_state_dict_loads_strict(name):
    cfg = var_config(name)
    full = FIXTURE["ch160" if name == "ch160" else "ch128"]["entries"]
    quantize = FIXTURE[name]["entries"] if FIXTURE[name]["only_keys_under"] else []
    entries = [e for e in full if not e[0].startswith("quantize.") or not quantize] + quantize
    with torch.device("meta"):
        sd = {k: torch.empty(shape) for k, shape, _ in entries}
    model = meta_model(**cfg)
    result = model.load_state_dict(sd, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_load_replaces_ema_vocab_hit_of_another_scale_count():
    saved = VQVAE(**{**SMALL, "v_patch_nums": (1, 5)}).state_dict()  # saved with 2 scales, VAR's behaviour:
    saved["quantize.ema_vocab_hit_SV"] += 2.0
    model = small_model()  # 4 scales
    mine = model.quantize.ema_vocab_hit_SV.clone()
    model.load_state_dict(saved, strict=True)  # ... the model keeps its own usage statistic
    assert torch.equal(model.quantize.ema_vocab_hit_SV, mine)
    assert saved["quantize.ema_vocab_hit_SV"].shape == (2, 37)  # the caller's dict is untouched
    assert torch.equal(model.quant_conv.weight, saved["quant_conv.weight"])
    same = small_model().state_dict()
    same["quantize.ema_vocab_hit_SV"] = torch.full((4, 37), 3.0)  # the same scale count: loaded
    model.load_state_dict(same, strict=True)
    assert bool((model.quantize.ema_vocab_hit_SV == 3).all())


def test_test_mode():
    m = VQVAE(**SMALL)
    assert not m.training and not any(p.requires_grad for p in m.parameters())
    m = VQVAE(**SMALL, test_mode=False)
    assert m.training and all(p.requires_grad for p in m.parameters())


# ---- configuration from a bare state_dict ----------------------------------------------------------

@pytest.mark.parametrize("name", ["ch128", "ch160", "ch96_v1024_z16"])
def test_config_from_state_dict_rebuilds_the_layout(name):
    with torch.device("meta"):
        sd = {k: torch.empty(shape) for k, shape, _ in FIXTURE[name]["entries"]}
    cfg = vqvae_config_from_state_dict(sd)
    want = {"vocab_size": 4096, "z_channels": 32, "ch": 128, "share_quant_resi": 4, **var_config(name)}
    for key, value in want.items():
        assert cfg[key] == (list(value) if isinstance(value, tuple) else value), key
    assert cfg["ch_mult"] == [1, 1, 2, 2, 4] and cfg["num_res_blocks"] == 2 and cfg["using_sa"] and cfg["using_mid_sa"]
    assert cfg["v_patch_nums"] == [1, 2, 3, 4, 5, 6, 8, 10, 13, 16]
    assert layout(meta_model(**cfg)) == FIXTURE[name]["entries"]


@pytest.mark.parametrize("kw", [
    dict(share_quant_resi=0), dict(share_quant_resi=1), dict(share_quant_resi=0, default_qresi_counts=6),
    dict(quant_resi=0.0), dict(using_sa=False, using_mid_sa=False), dict(num_res_blocks=2, ch_mult=(1, 3, 2)),
    dict(quant_conv_ks=1), dict(share_quant_resi=2),
])
def test_config_from_state_dict_reads_every_inferable_option(kw):
    model = meta_model(**{**SMALL, **kw})
    cfg = vqvae_config_from_state_dict(model.state_dict(), v_patch_nums=SMALL["v_patch_nums"], norm_groups=4)
    rebuilt = meta_model(**cfg)
    assert layout(rebuilt) == layout(model)
    keys = ["vocab_size", "z_channels", "ch", "ch_mult", "num_res_blocks", "using_sa", "using_mid_sa",
            "quant_conv_ks", "quant_resi"]
    if model.config["quant_resi"]:  # with Phi the identity, its sharing leaves no trace (nor matters)
        keys += ["share_quant_resi", "default_qresi_counts"]
    for key in keys:
        assert rebuilt.config[key] == model.config[key], key


def test_config_from_state_dict_rejects_foreign_dicts():
    sd = meta_model(**SMALL).state_dict()
    with pytest.raises(ValueError, match="missing quantize.embedding.weight"):
        vqvae_config_from_state_dict({k: v for k, v in sd.items() if not k.startswith("quantize.embedding")})
    with pytest.raises(ValueError, match="module."):
        vqvae_config_from_state_dict({"module." + k: v for k, v in sd.items()})
    with pytest.raises(ValueError, match=r"wrapping a state_dict \(entries \['model'\]"):
        vqvae_config_from_state_dict({"model": sd, "step": 3})
    with pytest.raises(ValueError, match="missing encoder.conv_in.weight"):
        vqvae_config_from_state_dict({"weight": torch.zeros(3)})
    with pytest.raises(ValueError, match="state_dict must be a dict"):
        vqvae_config_from_state_dict([1, 2])
    with pytest.raises(ValueError, match="unknown override"):
        vqvae_config_from_state_dict(sd, patch_nums=(1, 2))
    with pytest.raises(ValueError, match=r"codebook-option state \(quantize.cluster_size"):
        vqvae_config_from_state_dict(meta_model(**SMALL, dead_code_threshold=1.0).state_dict())
    with pytest.raises(ValueError, match="quantize.embedding.weight has 4 columns but the encoder outputs 6"):
        vqvae_config_from_state_dict({**sd, "quantize.embedding.weight": torch.zeros(37, 4)})


# ---- the building blocks against plain formulas ----------------------------------------------------

def test_blocks_match_their_formulas():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 5, 6)
    attn = AttnBlock(8, groups=4)
    q, k, v = attn.qkv(attn.norm(x)).flatten(2).chunk(3, dim=1)  # [B, C, HW] each
    h = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    torch.testing.assert_close(attn(x), x + attn.proj_out(h.transpose(1, 2).reshape(2, 8, 5, 6)))
    res = ResnetBlock(8, 12, dropout=0.0, groups=4)
    h = res.conv2(F.silu(res.norm2(res.conv1(F.silu(res.norm1(x))))))
    torch.testing.assert_close(res(x), res.nin_shortcut(x) + h)
    assert res.norm1.eps == 1e-6 and res.norm1.num_groups == 4
    down = Downsample2x(8)
    torch.testing.assert_close(down(x), F.conv2d(F.pad(x, (0, 1, 0, 1)), down.conv.weight, down.conv.bias, stride=2))
    assert down(torch.randn(1, 8, 16, 16)).shape == (1, 8, 8, 8)
    up = Upsample2x(8)
    torch.testing.assert_close(up(x), up.conv(x.repeat_interleave(2, 2).repeat_interleave(2, 3)))


# ---- tokens and images -----------------------------------------------------------------------------

def test_tokens_shapes_and_determinism():
    m = small_model()
    img = torch.rand(3, 3, 10, 10) * 2 - 1
    idx = m.img_to_idxBl(img)
    assert [tuple(i.shape) for i in idx] == [(3, p * p) for p in SMALL["v_patch_nums"]]
    assert all(i.dtype == torch.int64 and int(i.min()) >= 0 and int(i.max()) < 37 for i in idx)
    assert len(torch.unique(torch.cat(idx, 1))) > 5
    again = small_model().img_to_idxBl(img.clone())  # a fresh model from the same seed, a copy of the input
    assert all(torch.equal(a, b) for a, b in zip(idx, again))
    rec = m.idxBl_to_img(idx, same_shape=True, last_one=True)
    assert torch.equal(rec, small_model().idxBl_to_img(again, same_shape=True, last_one=True))
    assert m.num_tokens == 1 + 4 + 9 + 25 and m.image_size == 10


def _fhat_float64(m, idx, scales):
    """f_hat after the first ``scales`` scales of tokens idx, from the definition, in float64:
    the sum over those scales of Phi(bicubic_up(codes))."""
    pns, side = SMALL["v_patch_nums"], SMALL["v_patch_nums"][-1]
    f_hat = 0
    for si, (i, p) in enumerate(zip(idx[:scales], pns)):
        h = m.quantize.embedding.weight.double()[i].transpose(1, 2).reshape(i.shape[0], -1, p, p)
        if p != side:
            h = F.interpolate(h, size=(side, side), mode="bicubic")
        conv = m.quantize.quant_resi[si / (len(pns) - 1)]
        r = conv.resi_ratio
        f_hat = f_hat + (1 - r) * h + r * F.conv2d(h, conv.weight.double(), conv.bias.double(), padding=1)
    return f_hat


def test_decoding_the_tokens_reproduces_f_hat():
    """Decoding the encoder's tokens gives the encoder's f_hat and image, to fp32 rounding: the
    decode's error against a float64 evaluation is at most 2x the encoder's own (the two paths
    upsample in different memory formats, as in VAR, so their rounding differs)."""
    m = small_model()
    img = torch.rand(2, 3, 10, 10) * 2 - 1
    f = m.quant_conv(m.encoder(img))
    f_hats = m.quantize.f_to_idxBl_or_fhat(f, to_fhat=True)
    idx = m.img_to_idxBl(img)
    B, C = 2, SMALL["z_channels"]
    ms_h = [m.quantize.embedding(i).transpose(1, 2).reshape(B, C, p, p) for i, p in zip(idx, SMALL["v_patch_nums"])]
    decoded = m.quantize.embed_to_fhat(ms_h, all_to_max_scale=True, last_one=False)
    for s in range(4):  # after every scale
        ref = _fhat_float64(m, idx, s + 1)
        err_encoder = (f_hats[s].double() - ref).abs().max()
        assert (decoded[s].double() - ref).abs().max() <= 2 * err_encoder + 1e-7, s
    # The images: the decoder's image of f_hat, clamped to [-1, 1].
    want = m.fhat_to_img(f_hats[-1])
    torch.testing.assert_close(want, m.decoder(m.post_quant_conv(f_hats[-1])).clamp(-1, 1), rtol=0, atol=0)
    torch.testing.assert_close(m.img_to_reconstructed_img(img, last_one=True), want, rtol=0, atol=0)
    m64 = copy.deepcopy(m).double()
    ref_img = m64.decoder(m64.post_quant_conv(ref)).clamp(-1, 1)
    err_img = (want.double() - ref_img).abs().max()
    got = m.idxBl_to_img(idx, same_shape=True, last_one=True)
    assert (got.double() - ref_img).abs().max() <= 2 * err_img + 1e-7
    per_scale = m.idxBl_to_img(idx, same_shape=True, last_one=False)
    assert len(per_scale) == 4 and torch.equal(per_scale[-1], got)
    assert len(m.img_to_reconstructed_img(img)) == 4


def test_forward_is_vars_training_pass():
    m = small_model(test_mode=False)
    img = torch.rand(2, 3, 10, 10) * 2 - 1
    rec, usages, loss = m(img, ret_usages=True)
    assert rec.shape == img.shape and loss.ndim == 0 and len(usages) == 4
    f_hat, _, vq_loss = m.quantize(m.quant_conv(m.encoder(img)))
    torch.testing.assert_close(rec, m.decoder(m.post_quant_conv(f_hat)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, vq_loss)


def test_small_variant_trains():
    m = small_model(test_mode=False)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    img = (torch.rand(4, 3, 10, 10, generator=gen) * 2 - 1).clamp(-0.5, 0.5)
    losses = []
    for step in range(12):
        rec, _, vq_loss = m(img)
        loss = F.mse_loss(rec, img) + vq_loss
        opt.zero_grad()
        loss.backward()
        if step == 0:
            for name, p in m.named_parameters():
                assert p.grad is not None and p.grad.abs().sum() > 0, name
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_other_patch_nums_at_encode_time():
    m = small_model()
    img = torch.rand(1, 3, 14, 14) * 2 - 1  # latent 7 x 7, as VAR encodes 512 px with other scales
    idx = m.img_to_idxBl(img, v_patch_nums=(1, 3, 7))
    assert [tuple(i.shape) for i in idx] == [(1, 1), (1, 9), (1, 49)]
    assert len(m.img_to_reconstructed_img(img, v_patch_nums=(1, 3, 7))) == 3


# ---- bad input -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,exc,match", [
    (dict(norm_groups=3), ValueError, "norm_groups=3 must divide"),
    (dict(image_size=32), ValueError, "image_size=32 does not match"),
    (dict(num_res_blocks=0), ValueError, "num_res_blocks"),
    (dict(ch_mult=()), ValueError, "ch_mult"),
    (dict(v_patch_nums=(2, 1, 5)), ValueError, "v_patch_nums"),
    (dict(quant_conv_ks=2), ValueError, "quant_conv_ks"),
    (dict(vocab_size=0), ValueError, "vocab_size"),
    (dict(test_mode=1), TypeError, "test_mode"),
    (dict(dropout=1.0), ValueError, "dropout"),
    (dict(colours=3), TypeError, "colours"),
])
def test_bad_config(kw, exc, match):
    with pytest.raises(exc, match=match):
        VQVAE(**{**SMALL, **kw})


def test_bad_inputs():
    m = small_model()
    with pytest.raises(ValueError, match=r"inp must be 10 x 10 pixels"):
        m(torch.zeros(1, 3, 16, 16))
    with pytest.raises(TypeError, match="floating-point"):
        m.img_to_idxBl(torch.zeros(1, 3, 10, 10, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        m.img_to_reconstructed_img(torch.zeros(3, 10, 10))
    with pytest.raises(TypeError, match="torch.Tensor"):
        m.img_to_idxBl([[0.0]])
    idx = m.img_to_idxBl(torch.zeros(2, 3, 10, 10))
    with pytest.raises(ValueError, match="list of 4 index tensors"):
        m.idxBl_to_img(idx[:3], same_shape=True)
    with pytest.raises(ValueError, match=r"ms_idx_Bl\[2\] must be \[B=2, 9\]"):
        m.idxBl_to_img(idx[:2] + [idx[2][:, :4]] + idx[3:], same_shape=True)
    with pytest.raises(ValueError, match=r"ms_idx_Bl\[1\] holds indices outside \[0, 37\)"):
        m.idxBl_to_img([idx[0], idx[1] + 40] + idx[2:], same_shape=True)
    with pytest.raises(TypeError, match=r"ms_idx_Bl\[0\] must be an int64 tensor"):
        m.idxBl_to_img([idx[0].float()] + idx[1:], same_shape=True)
