"""Who is measured. A provider builds a callable for one case, or says why it cannot run it.

Nearest-codeword forward (z [N, D], codebook [K, D] -> indices [N], codewords [N, D]):
    seeds           the seeds' search: full N x K distances, argmin, N x K one-hot @ codebook
    torch-chunked   what one writes by hand to avoid N x K: row chunks of mm + argmin, then a gather
    faiss-cpu       IndexFlatL2 with k = 1 (float32, CPU); the index is rebuilt each call, as a
                    training loop must after every codebook update (the add is a K x D copy)
    vqfast-<b>      vqfast.nearest_codeword(backend=b), for every backend available on the device

Training step (z [B, C, H, W] with requires_grad, through the quantizer, backward, SGD step):
    seeds-vq / seeds-rvq           SeedVectorQuantizer / SeedResidualVectorQuantizer
    vqpytorch-vq / vqpytorch-rvq   vector_quantize_pytorch VectorQuantize / ResidualVQ (defaults:
                                   EMA codebook updates, as its users run it)
    vqfast-vq-<b> / vqfast-rvq-<b> vqfast.VectorQuantizer / ResidualVectorQuantizer(backend=b)
"""
from __future__ import annotations

import dataclasses
import importlib.util
from typing import Callable

import torch

import vqfast
from vqfast.testing import seeds

# Rows x codewords per chunk of the hand-written chunked search: 2^22 fp32 elements = 16 MiB,
# the same budget as vqfast's torch backend, so the two differ only in what they do per chunk.
CHUNK_ELEMENTS = 1 << 22

_DTYPE_BYTES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2, torch.float64: 8}


@dataclasses.dataclass(frozen=True)
class Provider:
    name: str
    group: str  # "seeds", "peer" or "vqfast"
    # (device, dtype) -> why it cannot run there, or None.
    reason: Callable[[torch.device, torch.dtype], str | None]
    # Bytes of working memory beyond the inputs for a case (used to skip what cannot fit).
    working_bytes: Callable[..., int]
    precision: str = "exact"
    backend: str | None = None  # the vqfast backend a "vqfast" provider runs


def _always(device: torch.device, dtype: torch.dtype) -> str | None:
    return None


def _faiss_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    if importlib.util.find_spec("faiss") is None:
        return "faiss is not installed (pip install faiss-cpu)"
    if device.type != "cpu":
        return "faiss-cpu runs on CPU tensors only"
    if dtype != torch.float32:
        return "faiss IndexFlatL2 searches float32 vectors only"
    return None


def _vqpytorch_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    if importlib.util.find_spec("vector_quantize_pytorch") is None:
        return "vector-quantize-pytorch is not installed (pip install vector-quantize-pytorch)"
    return None


def _small(n: int, k: int, d: int, dtype: torch.dtype) -> int:
    return n * (d * _DTYPE_BYTES[dtype] + 16)


def _seeds_bytes(n: int, k: int, d: int, dtype: torch.dtype) -> int:
    # z @ cb.T, the scaled copy, the sum (three N x K at peak) and the N x K one-hot.
    return 3 * n * k * 4 + n * k * _DTYPE_BYTES[dtype] + _small(n, k, d, dtype)


def _faiss_bytes(n: int, k: int, d: int, dtype: torch.dtype) -> int:
    # IndexFlatL2 blocks its distances in 4096 queries x 1024 codewords of fp32.
    return 4096 * 1024 * 4 + _small(n, k, d, dtype)


def _chunk_bytes(n: int, k: int, d: int, dtype: torch.dtype) -> int:
    return 3 * CHUNK_ELEMENTS * 4 + _small(n, k, d, dtype)


# ----------------------------------------------------------------------------- forward callables


def seeds_forward(z: torch.Tensor, codebook: torch.Tensor):
    return seeds.seed_nearest_codeword(z, codebook)


def torch_chunked_forward(z: torch.Tensor, codebook: torch.Tensor):
    """Row-chunked fp32 search: argmin_k |c_k|^2 - 2 z.c_k (|z|^2 is constant per row)."""
    cb = codebook.float()
    cb_sq = (cb * cb).sum(1)
    rows = max(1, CHUNK_ELEMENTS // cb.shape[0])
    idx = torch.empty(z.shape[0], dtype=torch.int64, device=z.device)
    for s in range(0, z.shape[0], rows):
        dots = torch.addmm(cb_sq, z[s : s + rows].float(), cb.t(), alpha=-2.0)
        idx[s : s + rows] = dots.argmin(1)
    return idx, codebook.index_select(0, idx).to(z.dtype)


def faiss_forward(z: torch.Tensor, codebook: torch.Tensor):
    import faiss

    index = faiss.IndexFlatL2(codebook.shape[1])
    index.add(codebook.detach().contiguous().numpy())
    _, idx = index.search(z.detach().contiguous().numpy(), 1)
    idx = torch.from_numpy(idx[:, 0])
    return idx, codebook.index_select(0, idx)


def vqfast_forward(backend: str, precision: str) -> Callable:
    def fn(z: torch.Tensor, codebook: torch.Tensor):
        idx, q, _ = vqfast.nearest_codeword(z, codebook, precision=precision, backend=backend)
        return idx, q

    return fn


def forward_providers(device: torch.device, precisions: tuple[str, ...] = ("exact",)) -> list[tuple[Provider, Callable]]:
    out = [
        (Provider("seeds", "seeds", _always, _seeds_bytes), seeds_forward),
        (Provider("torch-chunked", "peer", _always, _chunk_bytes), torch_chunked_forward),
        (Provider("faiss-cpu", "peer", _faiss_reason, _faiss_bytes), faiss_forward),
    ]
    for backend in vqfast.available_backends(device):
        for precision in precisions:
            name = f"vqfast-{backend}" + ("" if precision == "exact" else "-fast")
            out.append((Provider(name, "vqfast", _always, _chunk_bytes, precision, backend),
                        vqfast_forward(backend, precision)))
    return out


# ----------------------------------------------------------------------------- training-step modules


class _ChannelsLast(torch.nn.Module):
    """[B, D, H, W] in and out around a vector_quantize_pytorch module that takes [B, H*W, D].

    (Its accept_image_fmap option fails inside ResidualVQ in 1.15, so the layout change is done here,
    the same flatten + transpose the vqfast and seeds quantizers do internally.)
    """

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, z: torch.Tensor):
        quantized, indices, loss = self.inner(z.flatten(2).transpose(1, 2))
        return quantized.transpose(1, 2).reshape(z.shape), indices, loss


def train_providers(device: torch.device) -> list[tuple[Provider, Callable[[int, int, int], torch.nn.Module], bool]]:
    """(provider, make(num_quantizers, K, D) -> module, residual?) for the training-step question."""

    def seeds_bytes(n, k, d, dtype):
        # forward: three N x K for distances + the one-hot; backward: the one-hot's gradient matmul.
        return 5 * n * k * 4 + _small(n, k, d, dtype)

    def vqpt_bytes(n, k, d, dtype):
        return 4 * n * k * 4 + _small(n, k, d, dtype)

    def vqfast_bytes(n, k, d, dtype):
        return _chunk_bytes(n, k, d, dtype) + 4 * n * d * 4

    out = [
        (Provider("seeds-vq", "seeds", _always, seeds_bytes), lambda r, k, d: seeds.SeedVectorQuantizer(k, d), False),
        (Provider("seeds-rvq", "seeds", _always, seeds_bytes),
         lambda r, k, d: seeds.SeedResidualVectorQuantizer(r, k, d), True),
    ]

    def vqpt(residual: bool):
        def make(r, k, d):
            import vector_quantize_pytorch as vqp

            if residual:
                return _ChannelsLast(vqp.ResidualVQ(dim=d, num_quantizers=r, codebook_size=k))
            return _ChannelsLast(vqp.VectorQuantize(dim=d, codebook_size=k))

        return make

    out.append((Provider("vqpytorch-vq", "peer", _vqpytorch_reason, vqpt_bytes), vqpt(False), False))
    out.append((Provider("vqpytorch-rvq", "peer", _vqpytorch_reason, vqpt_bytes), vqpt(True), True))
    for backend in vqfast.available_backends(device):
        out.append((Provider(f"vqfast-vq-{backend}", "vqfast", _always, vqfast_bytes),
                    lambda r, k, d, b=backend: vqfast.VectorQuantizer(k, d, backend=b), False))
        out.append((Provider(f"vqfast-rvq-{backend}", "vqfast", _always, vqfast_bytes),
                    lambda r, k, d, b=backend: vqfast.ResidualVectorQuantizer(r, k, d, backend=b), True))
    # EMA codebooks (the codebook moves in forward, as vector-quantize-pytorch's default does): the
    # like-for-like comparison with the peer. Its search runs on the fastest backend for the device.
    out.append((Provider("vqfast-vq-ema", "vqfast", _always, vqfast_bytes),
                lambda r, k, d: vqfast.VectorQuantizer(k, d, ema=True), False))
    out.append((Provider("vqfast-rvq-ema", "vqfast", _always, vqfast_bytes),
                lambda r, k, d: vqfast.ResidualVectorQuantizer(r, k, d, ema=True), True))
    return out


def quantizer_loss(module: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    """A scalar loss through any of the quantizers: a stand-in reconstruction term plus the VQ loss."""
    out = module(z)
    if isinstance(module, _ChannelsLast):
        quantized, _, vq_loss = out
    else:
        quantized, vq_loss, _ = out
    return quantized.square().mean() + torch.as_tensor(vq_loss).sum()


def train_step_fn(module: torch.nn.Module, z: torch.Tensor) -> Callable[[], None]:
    """One training step: zero grads, forward, backward, SGD step (z stands for the encoder's output)."""
    params = [z] + [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        quantizer_loss(module, z).backward()
        opt.step()

    return step
