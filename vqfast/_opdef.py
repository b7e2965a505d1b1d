"""The op definitions every backend shares: fake (meta) shapes, autograd, and the pure-PyTorch op.

    vqfast::nearest_codeword          C++ kernels in vqfast._C (CPU; CUDA when built with it)
    vqfast::nearest_codeword_checked  the CPU kernel with check_finite's value checks in its own pass
    vqfast::nearest_codeword_torch    pure PyTorch (vqfast/reference.py), every device (defined here)
    vqfast::nearest_codeword_triton   Triton kernel (vqfast/triton), which registers itself through
                                      register_nearest_codeword_op below
    vqfast::nearest_codeword_flagged, vqfast::nearest_codeword_triton_flagged
                                      the GPU kernels with check_finite's value test fused into their
                                      passes over the inputs: a fourth output, ``extremes`` float64 [2],
                                      holds max |z| and max |codebook| (NaN where a NaN was read, +inf
                                      where an Inf was), left on the device; read back once by the caller
                                      (register_nearest_codeword_flagged_op below)

All of them share one signature, one fake implementation and one backward
(reference.nearest_codeword_backward), so torch.compile(fullgraph=True) traces any of them.
This module sits below both vqfast.backends (which loads the ops) and vqfast.triton (which defines
one), so neither imports the other's importer: the import graph has no cycle.
"""
from __future__ import annotations

import torch

from vqfast import _ext, reference

Tensor = torch.Tensor


def _fake_nearest_codeword(z: Tensor, codebook: Tensor, metric: str = "l2", precision: str = "exact"):
    n = z.shape[0]
    return (
        z.new_empty((n,), dtype=torch.int64),
        z.new_empty((n, z.shape[1])),
        z.new_empty((n,), dtype=torch.float32),
    )


def _setup_context(ctx, inputs, output):
    z, codebook, metric = inputs[0], inputs[1], inputs[2] if len(inputs) > 2 else "l2"
    ctx.save_for_backward(z, codebook, output[0])
    ctx.metric = metric


def _backward(ctx, grad_indices, grad_codewords, grad_distances):
    z, codebook, indices = ctx.saved_tensors
    grad_z, grad_cb = reference.nearest_codeword_backward(grad_codewords, grad_distances, z, codebook, indices, ctx.metric)
    return (
        grad_z if ctx.needs_input_grad[0] else None,
        grad_cb if ctx.needs_input_grad[1] else None,
        None,
        None,
    )


def _fake_flagged(z: Tensor, codebook: Tensor, metric: str = "l2", precision: str = "exact"):
    return (*_fake_nearest_codeword(z, codebook, metric, precision), z.new_empty((2,), dtype=torch.float64))


def _backward_flagged(ctx, grad_indices, grad_codewords, grad_distances, grad_extremes):
    return _backward(ctx, grad_indices, grad_codewords, grad_distances)


def register_nearest_codeword_flagged_op(qualname: str) -> None:
    """Attach the fake implementation and backward of an op with the flagged schema:
    (z, codebook, metric, precision) -> (indices, codewords, distances, extremes float64 [2])."""
    torch.library.register_fake(qualname)(_fake_flagged)
    torch.library.register_autograd(qualname, _backward_flagged, setup_context=_setup_context)


def register_nearest_codeword_op(qualname: str) -> None:
    """Attach the shared fake implementation and backward to an op with the nearest_codeword schema."""
    torch.library.register_fake(qualname)(_fake_nearest_codeword)
    torch.library.register_autograd(qualname, _backward, setup_context=_setup_context)


@torch.library.custom_op("vqfast::nearest_codeword_torch", mutates_args=())
def nearest_codeword_torch(
    z: Tensor, codebook: Tensor, metric: str = "l2", precision: str = "exact"
) -> tuple[Tensor, Tensor, Tensor]:
    return reference.nearest_codeword_torch(z, codebook, metric, precision)


register_nearest_codeword_op("vqfast::nearest_codeword_torch")
if _ext.has_ext():
    register_nearest_codeword_op("vqfast::nearest_codeword")
    register_nearest_codeword_op("vqfast::nearest_codeword_checked")
    if hasattr(torch.ops.vqfast, "nearest_codeword_flagged"):  # defined by builds since the flagged op
        register_nearest_codeword_flagged_op("vqfast::nearest_codeword_flagged")
