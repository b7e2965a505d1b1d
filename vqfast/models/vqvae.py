"""VAR's VQVAE (Tian et al. 2024, the tokenizer of "Visual Autoregressive Modeling"), searched by vqfast.

``VQVAE(...)`` takes VAR's constructor and builds VAR's modules under VAR's names, so a state_dict
saved from VAR's VQVAE -- the published ``vae_ch160v4096z32.pth`` is ``VQVAE(ch=160)`` -- loads with
strict=True and gives the same tokens and images:

    encoder          [B, 3, H, W] -> [B, z_channels, H / 16, W / 16]    (vqfast.models.autoencoder)
    quant_conv       Conv2d(z_channels, z_channels, quant_conv_ks)
    quantize         MultiScaleQuantizer: VAR's VectorQuantizer2 (vqfast.multiscale.VARQuantizer) with
                     vqfast's codebook options, all off by default
    post_quant_conv  Conv2d(z_channels, z_channels, quant_conv_ks)
    decoder          [B, z_channels, h, w] -> [B, 3, 16 h, 16 w]

Tokens: ``img_to_idxBl(img)`` gives one LongTensor [B, p * p] per scale p of ``v_patch_nums``
(VAR's default at 256 px: 1, 2, 3, 4, 5, 6, 8, 10, 13, 16: 680 tokens); the last scale's side must
equal the latent side H / 16. ``idxBl_to_img`` decodes them; decoding an encoder's tokens reproduces
its f_hat exactly. ``test_mode=True`` (VAR's default) leaves the model in eval mode with no
gradients: pass ``test_mode=False`` to train it.

The keyword-only arguments after ``*`` build a smaller network of the same architecture (fewer
levels, residual blocks or norm groups, attention off) and switch on the codebook options; with
their defaults the model is VAR's, key for key and shape for shape.
"""
from __future__ import annotations

import re

import torch
import torch.nn as nn

from vqfast.models.autoencoder import VAR_CH_MULT, Decoder, Encoder
from vqfast.models.multiscale import MultiScaleQuantizer

VAR_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


def _positive_int(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


class VQVAE(nn.Module):
    """VAR's multi-scale VQVAE tokenizer. See the module docstring for the layout and shapes.

    forward(inp [B, 3, H, W], ret_usages=False) -> (reconstruction [B, 3, H, W], usages, vq_loss)
        usages: None, or with ret_usages the percentage of codes in use at each scale.
    img_to_idxBl(inp)                                  -> [LongTensor [B, p * p] per scale]
    idxBl_to_img(ms_idx_Bl, same_shape, last_one)      -> image [B, 3, H, W] (last_one) or one per scale
    fhat_to_img(f_hat [B, z_channels, h, w])           -> image [B, 3, H, W], clamped to [-1, 1]
    img_to_reconstructed_img(x, last_one)              -> image, or one per scale
    """

    def __init__(
        self,
        vocab_size: int = 4096,
        z_channels: int = 32,
        ch: int = 128,
        dropout: float = 0.0,
        beta: float = 0.25,
        using_znorm: bool = False,
        quant_conv_ks: int = 3,
        quant_resi: float = 0.5,
        share_quant_resi: int = 4,
        default_qresi_counts: int = 0,
        v_patch_nums: tuple[int, ...] = VAR_PATCH_NUMS,
        test_mode: bool = True,
        *,
        ch_mult: tuple[int, ...] = VAR_CH_MULT,
        num_res_blocks: int = 2,
        using_sa: bool = True,
        using_mid_sa: bool = True,
        norm_groups: int = 32,
        image_size: int | None = None,
        backend: str = "auto",
        precision: str = "exact",
        **codebook_options,
    ):
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("z_channels", z_channels), ("ch", ch),
                            ("quant_conv_ks", quant_conv_ks), ("norm_groups", norm_groups)):
            _positive_int(name, value)
        # The encoder's residual blocks carry its width changes: at least one per level.
        _positive_int("num_res_blocks", num_res_blocks)
        if quant_conv_ks % 2 == 0:
            raise ValueError(f"quant_conv_ks must be odd (the convolution keeps the latent's size), got {quant_conv_ks}")
        for name, value in (("using_znorm", using_znorm), ("test_mode", test_mode), ("using_sa", using_sa),
                            ("using_mid_sa", using_mid_sa)):
            _check_bool(name, value)
        if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
        ch_mult = tuple(ch_mult) if isinstance(ch_mult, (list, tuple)) else ch_mult
        if (not isinstance(ch_mult, tuple) or not ch_mult
                or any(not isinstance(m, int) or isinstance(m, bool) or m < 1 for m in ch_mult)):
            raise ValueError(f"ch_mult must be a non-empty sequence of positive ints, got {ch_mult!r}")
        widths = sorted({ch} | {ch * m for m in ch_mult})
        if any(w % norm_groups for w in widths):
            raise ValueError(f"norm_groups={norm_groups} must divide every width of the network {widths} "
                             f"(ch={ch} times ch_mult={ch_mult})")
        v_patch_nums = tuple(v_patch_nums) if isinstance(v_patch_nums, (list, tuple)) else v_patch_nums
        if (not isinstance(v_patch_nums, tuple) or not v_patch_nums
                or any(not isinstance(p, int) or isinstance(p, bool) or p < 1 for p in v_patch_nums)
                or list(v_patch_nums) != sorted(set(v_patch_nums))):
            raise ValueError(f"v_patch_nums must be strictly increasing positive ints, got {v_patch_nums!r}")
        self.downsample = 2 ** (len(ch_mult) - 1)
        side = v_patch_nums[-1] * self.downsample
        if image_size is not None and image_size != side:
            raise ValueError(f"image_size={image_size!r} does not match v_patch_nums: its last scale "
                             f"{v_patch_nums[-1]} times the downsampling {self.downsample} is {side}")
        self.test_mode = test_mode
        self.V, self.Cvae = vocab_size, z_channels
        self.vocab_size = vocab_size
        self.image_size = side
        net = dict(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, dropout=float(dropout),
                   z_channels=z_channels, using_sa=using_sa, using_mid_sa=using_mid_sa, norm_groups=norm_groups)
        self.encoder = Encoder(in_channels=3, **net)
        self.decoder = Decoder(out_channels=3, **net)
        self.quantize = MultiScaleQuantizer(
            vocab_size=vocab_size, Cvae=z_channels, using_znorm=using_znorm, beta=beta,
            default_qresi_counts=default_qresi_counts, v_patch_nums=v_patch_nums, quant_resi=quant_resi,
            share_quant_resi=share_quant_resi, backend=backend, precision=precision, **codebook_options,
        )
        self.quant_conv = nn.Conv2d(z_channels, z_channels, quant_conv_ks, padding=quant_conv_ks // 2)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, quant_conv_ks, padding=quant_conv_ks // 2)
        # Everything needed to rebuild this model, in plain types (checkpoints store it).
        self.config = dict(
            vocab_size=vocab_size, z_channels=z_channels, ch=ch, dropout=float(dropout), beta=float(beta),
            using_znorm=using_znorm, quant_conv_ks=quant_conv_ks, quant_resi=float(quant_resi),
            share_quant_resi=share_quant_resi, default_qresi_counts=default_qresi_counts,
            v_patch_nums=list(v_patch_nums), ch_mult=list(ch_mult), num_res_blocks=num_res_blocks,
            using_sa=using_sa, using_mid_sa=using_mid_sa, norm_groups=norm_groups, **self.quantize.codebook_options(),
        )
        if test_mode:
            self.eval()
            for p in self.parameters():
                p.requires_grad_(False)

    @property
    def v_patch_nums(self) -> tuple[int, ...]:
        return tuple(self.quantize.v_patch_nums)

    @property
    def num_tokens(self) -> int:
        """Tokens per image over all scales (680 for VAR's 256-px scales)."""
        return sum(p * p for p in self.v_patch_nums)

    def extra_repr(self) -> str:
        return f"image_size={self.image_size}, downsample={self.downsample}, tokens={self.num_tokens}"

    # ---- argument checks ---------------------------------------------------------------------
    def _check_img(self, name: str, img, v_patch_nums=None) -> None:
        if not isinstance(img, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(img).__name__}")
        if not img.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor in [-1, 1], got {img.dtype}; "
                            f"convert it with {name}.float() / 127.5 - 1")
        if img.dim() != 4 or img.shape[1] != 3:
            raise ValueError(f"{name} must be [B, 3, H, W], got shape {tuple(img.shape)}")
        last = (v_patch_nums or self.v_patch_nums)[-1]
        last = (last, last) if isinstance(last, int) else tuple(last)
        want = (last[0] * self.downsample, last[1] * self.downsample)
        if tuple(img.shape[2:]) != want:
            raise ValueError(f"{name} must be {want[0]} x {want[1]} pixels (the last scale {last} times the "
                             f"downsampling {self.downsample}), got {tuple(img.shape[2:])}; "
                             "resize it, or pass v_patch_nums ending at its latent size")

    def _check_idx(self, ms_idx_Bl) -> None:
        pns = self.v_patch_nums
        if not isinstance(ms_idx_Bl, (list, tuple)) or len(ms_idx_Bl) != len(pns):
            raise ValueError(f"ms_idx_Bl must be a list of {len(pns)} index tensors, one per scale {pns}")
        batch = None
        for s, (idx, p) in enumerate(zip(ms_idx_Bl, pns)):
            if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.int64, torch.int32):
                raise TypeError(f"ms_idx_Bl[{s}] must be an int64 tensor, got "
                                f"{getattr(idx, 'dtype', type(idx).__name__)}")
            batch = idx.shape[0] if batch is None and idx.dim() else batch
            if tuple(idx.shape) != (batch, p * p):
                raise ValueError(f"ms_idx_Bl[{s}] must be [B={batch}, {p * p}] (scale {p}x{p}), got {tuple(idx.shape)}")
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.vocab_size):
                raise ValueError(f"ms_idx_Bl[{s}] holds indices outside [0, {self.vocab_size})")

    # ---- VAR's API -----------------------------------------------------------------------------
    def forward(self, inp: torch.Tensor, ret_usages: bool = False):
        """Training pass: (reconstruction [B, 3, H, W], usages or None, vq_loss)."""
        self._check_img("inp", inp)
        f_hat, usages, vq_loss = self.quantize(self.quant_conv(self.encoder(inp)), ret_usages=ret_usages)
        return self.decoder(self.post_quant_conv(f_hat)), usages, vq_loss

    def fhat_to_img(self, f_hat: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(f_hat)).clamp_(-1, 1)

    def img_to_idxBl(self, inp_img_no_grad: torch.Tensor, v_patch_nums=None) -> list[torch.Tensor]:
        """[B, 3, H, W] -> one LongTensor [B, ph * pw] per scale of ``v_patch_nums`` (default: the model's)."""
        self._check_img("inp_img_no_grad", inp_img_no_grad, v_patch_nums)
        with torch.no_grad():
            f = self.quant_conv(self.encoder(inp_img_no_grad))
            return self.quantize.f_to_idxBl_or_fhat(f, to_fhat=False, v_patch_nums=v_patch_nums)

    def idxBl_to_img(self, ms_idx_Bl: list[torch.Tensor], same_shape: bool, last_one: bool = False):
        """Tokens of every scale -> the image (last_one=True) or the image after each scale (a list).

        same_shape=True upsamples every scale's codes to the last scale (as encoding does);
        False is VAR's experimental progressive mode.
        """
        self._check_idx(ms_idx_Bl)
        B = ms_idx_Bl[0].shape[0]
        ms_h_BChw = [self.quantize.embedding(idx.long()).transpose(1, 2).reshape(B, self.Cvae, p, p)
                     for idx, p in zip(ms_idx_Bl, self.v_patch_nums)]
        return self.embed_to_img(ms_h_BChw=ms_h_BChw, all_to_max_scale=same_shape, last_one=last_one)

    def embed_to_img(self, ms_h_BChw: list[torch.Tensor], all_to_max_scale: bool, last_one: bool = False):
        f_hats = self.quantize.embed_to_fhat(ms_h_BChw, all_to_max_scale=all_to_max_scale, last_one=last_one)
        if last_one:
            return self.fhat_to_img(f_hats)
        return [self.fhat_to_img(f_hat) for f_hat in f_hats]

    def img_to_reconstructed_img(self, x: torch.Tensor, v_patch_nums=None, last_one: bool = False):
        """Encode, quantise and decode: the image after the last scale (last_one) or after each scale."""
        self._check_img("x", x, v_patch_nums)
        f = self.quant_conv(self.encoder(x))
        f_hats = self.quantize.f_to_idxBl_or_fhat(f, to_fhat=True, v_patch_nums=v_patch_nums)
        if last_one:
            return self.fhat_to_img(f_hats[-1])
        return [self.fhat_to_img(f_hat) for f_hat in f_hats]

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """VAR's behaviour: a ``quantize.ema_vocab_hit_SV`` saved with another number of scales is
        replaced by this model's (it is a usage statistic, not a weight). The caller's dict is not modified."""
        key = "quantize.ema_vocab_hit_SV"
        if key in state_dict and state_dict[key].shape[0] != self.quantize.ema_vocab_hit_SV.shape[0]:
            state_dict = type(state_dict)(state_dict) if isinstance(state_dict, dict) else dict(state_dict)
            state_dict[key] = self.quantize.ema_vocab_hit_SV
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


# ---- configuration of a bare state_dict ----------------------------------------------------------

def _count(keys, pattern: str) -> int:
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in keys for m in [rx.match(k)] if m}
    return max(found) + 1 if found else 0


def vqvae_config_from_state_dict(state_dict, **overrides) -> dict:
    """The ``VQVAE`` constructor arguments of a bare VAR VQVAE state_dict, read from its keys and shapes.

    Read from the tensors: vocab_size, z_channels, ch, ch_mult, num_res_blocks, using_sa,
    using_mid_sa, quant_conv_ks, the Phi sharing (share_quant_resi, default_qresi_counts) and
    whether Phi is the identity (quant_resi 0). Not recorded in the tensors, so VAR's values unless
    overridden: v_patch_nums (VAR's 256-px list; its 512-px list is (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)),
    quant_resi (0.5 when Phi convolutions are present), beta, using_znorm, dropout, norm_groups (32).

    ``overrides`` replace any entry (e.g. ``v_patch_nums=...``). Raises ValueError naming the missing
    keys when the dict is not a VAR VQVAE state_dict (a wrapped checkpoint or a "module." prefix is named).
    """
    if not isinstance(state_dict, dict) or not all(isinstance(k, str) for k in state_dict):
        raise ValueError(f"state_dict must be a dict of tensors keyed by name, got {type(state_dict).__name__}")
    keys = list(state_dict)
    required = ("encoder.conv_in.weight", "encoder.conv_out.weight", "decoder.conv_in.weight",
                "quant_conv.weight", "post_quant_conv.weight", "quantize.embedding.weight")
    missing = [k for k in required if k not in state_dict]
    if missing:
        hint = ""
        if keys and all(k.startswith("module.") for k in keys):
            hint = "; its keys start with 'module.' (a DistributedDataParallel model): strip that prefix first"
        elif any(not isinstance(v, torch.Tensor) for v in state_dict.values()):
            nested = [k for k, v in state_dict.items() if isinstance(v, dict)]
            hint = f"; it looks like a checkpoint wrapping a state_dict (entries {nested[:4]})" if nested else ""
        raise ValueError(f"state_dict is not a VAR VQVAE state_dict: missing {', '.join(missing)}{hint}")
    for k in keys:
        if not isinstance(state_dict[k], torch.Tensor):
            raise ValueError(f"state_dict[{k!r}] must be a tensor, got {type(state_dict[k]).__name__}")

    def shape(key: str) -> tuple[int, ...]:
        return tuple(state_dict[key].shape)

    extra = sorted(k for k in keys if k.startswith(("quantize.project_in.", "quantize.embedding.", "quantize.cluster_size",
                                                     "quantize.embed_avg", "quantize.initted"))
                   and k != "quantize.embedding.weight")
    if extra:
        raise ValueError(f"state_dict holds codebook-option state ({', '.join(extra[:4])}): it is not a bare VAR "
                         "VQVAE state_dict; rebuild such a model from the configuration saved with it")
    z_channels = shape("encoder.conv_out.weight")[0]
    vocab_size, code_dim = shape("quantize.embedding.weight")
    if code_dim != z_channels:
        raise ValueError(f"quantize.embedding.weight has {code_dim} columns but the encoder outputs "
                         f"{z_channels} channels (encoder.conv_out.weight): not a VAR VQVAE state_dict")
    ch = shape("encoder.conv_in.weight")[0]
    levels = _count(keys, r"encoder\.down\.(\d+)\.")
    if levels == 0:
        raise ValueError("state_dict is not a VAR VQVAE state_dict: it has no encoder.down.* levels")
    num_res_blocks = _count(keys, r"encoder\.down\.0\.block\.(\d+)\.")
    if num_res_blocks == 0:
        raise ValueError("state_dict has no encoder.down.0.block.* residual blocks: cannot read ch_mult")
    ch_mult = []
    for i in range(levels):
        key = f"encoder.down.{i}.block.0.conv1.weight"
        if key not in state_dict:
            raise ValueError(f"state_dict is not a VAR VQVAE state_dict: missing {key}")
        width = shape(key)[0]
        if width % ch:
            raise ValueError(f"{key} has {width} output channels, not a multiple of ch={ch}")
        ch_mult.append(width // ch)
    phi = "quantize.quant_resi."
    if f"{phi}qresi.weight" in state_dict:
        share, counts = 1, 0
    elif _count(keys, re.escape(phi) + r"qresi_ls\.(\d+)\.weight"):
        share, counts = _count(keys, re.escape(phi) + r"qresi_ls\.(\d+)\.weight"), 0
    elif _count(keys, re.escape(phi) + r"(\d+)\.weight"):
        share, counts = 0, _count(keys, re.escape(phi) + r"(\d+)\.weight")
    else:
        share, counts = 4, 0  # no Phi convolutions: quant_resi was 0 (identity), the sharing is moot
    config = dict(
        vocab_size=vocab_size, z_channels=z_channels, ch=ch, dropout=0.0, beta=0.25, using_znorm=False,
        quant_conv_ks=shape("quant_conv.weight")[-1],
        quant_resi=0.5 if any(k.startswith(phi) for k in keys) else 0.0,
        share_quant_resi=share, default_qresi_counts=counts, v_patch_nums=list(VAR_PATCH_NUMS),
        ch_mult=ch_mult, num_res_blocks=num_res_blocks,
        using_sa=f"encoder.down.{levels - 1}.attn.0.qkv.weight" in state_dict,
        using_mid_sa="encoder.mid.attn_1.qkv.weight" in state_dict, norm_groups=32,
    )
    unknown = sorted(set(overrides) - set(config))
    if unknown:
        raise ValueError(f"unknown override(s) {unknown}: choose from {sorted(config)}")
    config.update(overrides)
    if share == 0 and config["default_qresi_counts"] == len(config["v_patch_nums"]):
        config["default_qresi_counts"] = 0  # VAR's "0 = one Phi per scale"
    return config
