"""The public op ``nearest_codeword``: input checks, the value test, backend choice, and the call.

The ops themselves (schemas, fake implementations, autograd) are defined in vqfast/_opdef.py (and
vqfast._C, vqfast/triton); vqfast/backends.py knows which one each backend runs.
"""
from __future__ import annotations

import torch

from vqfast import backends, reference
from vqfast._opdef import nearest_codeword_torch, register_nearest_codeword_op  # noqa: F401  (public names kept)
from vqfast._validation import check_nearest_codeword_inputs, scan_values, value_rules
from vqfast.backends import resolve_backend

Tensor = torch.Tensor


def _op_for(backend: str, checked: bool = False):
    """The op of ``backend``; checked=True (cpu only): the kernel that also tests the values (_cpu_checked)."""
    return backends.load_op(backend, checked)


def _cpu_checked(z: Tensor, codebook: Tensor, metric: str, precision: str) -> tuple[Tensor, Tensor, Tensor]:
    """The cpu backend with check_finite: the kernel tests the values as it loads them, and searches
    float32 inputs beyond magnitude_limit(D, float32) again in float64, itself. A separate scan cost a
    parallel pass of its own: at 2 threads on a loaded machine it was slower than the search at
    N = 16384, K = 256, D = 16. The kernel's ValueError (NaN/Inf, or float64 values beyond float64's
    range) says only which input; scan_values raises the full message (count, kind, first row, fix).
    """
    try:
        return _op_for("cpu", checked=True)(z, codebook, metric, precision)
    except ValueError as exc:
        error = exc
    scan_values(z, codebook)  # raises the ValueError that names the argument and the fix
    raise error


def _flagged(op, backend: str, z: Tensor, codebook: Tensor, metric: str, precision: str
             ) -> tuple[Tensor, Tensor, Tensor]:
    """A GPU backend with check_finite: its flagged op searches and, in the same passes over the inputs,
    finds max |z| and max |codebook| (``extremes``, left on the device). Reading them back is the call's
    one host sync; value_rules then raises on NaN/Inf, or sends float32 values beyond
    magnitude_limit(D, float32) to a float64 search (the first outputs are dropped).
    """
    indices, codewords, distances, extremes = op(z, codebook, metric, precision)
    z_max, cb_max = extremes.tolist()  # the one sync
    if not value_rules(z, codebook, z_max, cb_max):
        return indices, codewords, distances
    return _float64_search(backend, z, codebook, metric, precision)


def _float64_search(backend: str, z: Tensor, codebook: Tensor, metric: str, precision: str
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """The search in float64 (values too large for float32 distances), codewords back in z's dtype."""
    run_z, run_cb = z.double(), codebook.double()
    name = resolve_backend(backend, z.device.type, (run_z, run_cb))  # float64 rules out some backends
    indices, codewords, distances = _op_for(name)(run_z, run_cb, metric, precision)
    return indices, codewords.to(z.dtype), distances


def _empty_result(z: Tensor, codebook: Tensor, metric: str) -> tuple[Tensor, Tensor, Tensor]:
    """N = 0: empty outputs built with the reference formulas, so they stay attached to autograd."""
    indices = torch.empty((0,), dtype=torch.int64, device=z.device)
    picked = codebook.index_select(0, indices)
    return indices, picked.to(z.dtype), reference.codeword_distances(z, picked, metric).float()


def nearest_codeword(
    z: Tensor,
    codebook: Tensor,
    *,
    metric: str = "l2",
    precision: str = "exact",
    backend: str = "auto",
    check_finite: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Nearest codeword of every row of z: fused distance + argmin + gather.

    Args:
        z: [N, D] vectors to quantise (float32, float16, bfloat16 or float64), N >= 0, D >= 1.
        codebook: [K, D] codewords, K >= 1, on z's device. Its dtype may differ from z's: the search runs in
            float32 (float64 if either is float64) and the codewords come back in z's dtype.
        metric: "l2" (squared Euclidean) or "cosine" (squared L2 between L2-normalised vectors, 2 - 2 cos).
            Under cosine a zero vector has no direction and normalises to the zero vector: a zero row of
            z takes codeword 0 with distance exactly 1 (the first zero codeword, at distance 0, if the
            codebook has one), and a zero codeword is at distance 1 from every nonzero row.
        precision: "exact" (the chosen codeword's true distance is the minimum) or "fast"
            (tf32/bf16 matrix units where the backend has them; rare near-ties may differ).
        backend: "auto", "torch", "cpu", "cuda" or "triton" (see vqfast.available_backends()).
            "auto" skips backends that cannot take these inputs; a backend named here raises instead.
            On CUDA tensors "auto" takes the cuda / triton kernel only on GPU architectures where it
            has been validated (vqfast/gpu_validated.json; vqfast.backends.validation_summary()),
            elsewhere torch, with a one-time warning; naming the kernel opts in.
        check_finite: test every value of z and codebook and raise a ValueError if either holds NaN
            or Inf. The same test guards against overflow: float32 inputs large enough for a float32
            squared distance to overflow (|x| > 6.5e18 / sqrt(D)) are searched in float64 instead, on
            the same backend; float64 inputs beyond 4.7e153 / sqrt(D) raise. The cpu backend tests
            the values inside the search's own pass, as its kernel loads them (no extra pass over z);
            so do the cuda and triton kernels, whose two maxima the call reads back once (one device
            sync per call; none with check_finite=False); torch scans both inputs first (one min/max
            pass, one device sync). False skips the test for speed: NaN/Inf inputs then give
            unspecified (but in-range) indices, and huge float32 inputs may pick a wrong codeword.
            The test is also skipped while torch.compile traces (torch.compiler.is_compiling()), so
            that fullgraph=True works, and on meta tensors, which hold no values.

    Returns:
        indices [N] int64 (lowest index on ties), codewords [N, D] (= codebook[indices], z's dtype),
        distances [N] float32 (+inf where the distance exceeds float32's 3.4e38). Gradients flow from
        codewords to the codebook and from distances to both inputs (straight-through users take codewords).
    """
    check_nearest_codeword_inputs(z, codebook, metric, precision)
    if not isinstance(check_finite, bool):
        raise TypeError(f"check_finite must be a bool, got {type(check_finite).__name__}")
    check = check_finite and z.device.type != "meta" and not torch.compiler.is_compiling()
    name = resolve_backend(backend, z.device.type, (z, codebook))
    if check and z.shape[0] > 0:
        if name == "cpu":
            return _cpu_checked(z, codebook, metric, precision)
        flagged = backends.load_flagged_op(name)
        if flagged is not None:
            return _flagged(flagged, backend, z, codebook, metric, precision)
    # The other backends (and GPU builds without a flagged op): one min/max pass first, one sync.
    if check and scan_values(z, codebook) and z.shape[0] > 0:
        return _float64_search(backend, z, codebook, metric, precision)
    if z.shape[0] == 0:
        return _empty_result(z, codebook, metric)
    return _op_for(name)(z, codebook, metric, precision)
