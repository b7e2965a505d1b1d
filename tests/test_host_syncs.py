"""Host synchronisations on the GPU code paths, counted without a GPU (issue 24, item 2).

Promised: with backend "cuda" or "triton", nearest_codeword makes no host sync with
check_finite=False (exact and fast mode) and one with check_finite=True (its value test read back);
one pass of VAR's multi-scale quantizer (vqfast.compat.var.VectorQuantizer2, vqfast.models) makes one.

How it is counted. ``SyncCounter`` is a TorchDispatchMode that sees every aten op the Python code
runs and counts those that wait for the device on a GPU: reading a value (``_local_scalar_dense``:
``.item()``, ``int()``, ``float()``, ``bool()``, ``if t``), ops whose output size depends on the values
(``nonzero``, boolean indexing, ``masked_select``, ``unique``, ``bincount``, ``repeat_interleave``
without ``output_size``), ``equal`` / ``allclose``, and copies to the CPU from another device. It also
counts the calls that leave the dispatcher before any op is seen (``Tensor.tolist`` / ``numpy`` /
``cpu``, counted on every tensor: a CPU run cannot tell them apart from device-to-host copies) and
``torch.cuda.synchronize`` / ``Stream.synchronize`` / ``Event.synchronize``. vqfast's ops defined in
Python (``torch.library.custom_op`` / ``triton_op``) are opened up, so their launchers are counted too.

The kernels. Triton's run under its interpreter (TRITON_INTERPRET=1, CPU tensors, in a subprocess:
the variable must be set before the kernels are defined). A launch there copies its tensor arguments
to host buffers and back, which stands for device memory: the counter pauses in
``GridExecutor._init_args_hst`` / ``_restore_args_dev`` and counts the rest (the grid function, the
kernel's body). The CUDA binding cannot run here: ``REGISTRY["cuda"]`` is replaced by a stand-in with
the flagged op's contract built from device-side torch ops, so everything above the kernel
(vqfast/ops.py, vqfast/multiscale.py, vqfast.compat.var, vqfast.models) is counted; that the binding
itself (csrc/cuda/binding.cpp) holds no sync is checked by its source in tests/test_cuda_kernels.py.
With a GPU the stand-in tests run on CUDA tensors, and the real kernels are checked the way a GPU
checks it: a search with check_finite=False is captured in a CUDA graph, which fails on any sync
(below), and with check_finite=True the counter sees one read-back.

The counter can fail: test_the_counter_counts_every_kind_of_sync counts each primitive once, and
on the Triton code before its device-side re-rank the triton cases counted one ``nonzero`` per exact
call (its host-driven re-rank) and five syncs per four-scale pass.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import vqfast
from vqfast import backends, reference
from vqfast.testing import oracle

aten = torch.ops.aten
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# Ops that wait for the device on a GPU, whatever their arguments.
SYNCING_OPS = {
    aten._local_scalar_dense, aten.is_nonzero, aten.equal, aten.allclose,
    aten.nonzero, aten.nonzero_numpy, aten.argwhere, aten.masked_select, aten.bincount,
    aten.unique_dim, aten.unique_consecutive, aten.unique_dim_consecutive, aten._unique, aten._unique2,
}


def _is_bool_index(indices) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


def _syncs(func, args, kwargs) -> bool:
    """Whether aten op ``func`` called with ``args`` waits for the device on a GPU."""
    packet = func.overloadpacket
    if packet in SYNCING_OPS:
        return True
    if packet in (aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_):
        return _is_bool_index(args[1])  # a boolean mask is turned into indices with nonzero
    if packet is aten.repeat_interleave:
        return func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None
    if packet in (aten._to_copy, aten.copy_):
        source = args[1] if packet is aten.copy_ else args[0]
        target = args[0].device if packet is aten.copy_ else kwargs.get("device") or source.device
        return torch.device(target).type == "cpu" and source.device.type not in ("cpu", "meta")
    return False


_HARNESS = {"_caller", "record", "call", "__torch_dispatch__", "_syncs"}


def _caller() -> str:
    """Where a sync was reached, for the failure message: the innermost frame in vqfast, else in the test."""
    frames = [f for f in traceback.extract_stack() if f.name not in _HARNESS]
    inside = [f for f in frames if f"{os.sep}vqfast{os.sep}" in f.filename] or [
        f for f in frames if f.filename.endswith("test_host_syncs.py")]
    if not inside:
        return "?"
    f = inside[-1]
    return f"{os.path.relpath(f.filename, REPO)}:{f.lineno} ({f.name}) {f.line}"


class SyncCounter(TorchDispatchMode):
    """Counts the host syncs reached while active (see the module docstring); ``events`` says where."""

    def __init__(self):
        super().__init__()
        self.events: list[str] = []
        self.paused = 0

    @property
    def count(self) -> int:
        return len(self.events)

    def record(self, what: str) -> None:
        if not self.paused:
            self.events.append(f"{what} at {_caller()}")

    @contextlib.contextmanager
    def pause(self):
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.paused:
            return func(*args, **kwargs)
        opdef = _python_opdef(func)
        if opdef is not None:  # a vqfast op written in Python: count what its launcher does
            with self:
                return opdef._init_fn(*args, **kwargs)
        if _syncs(func, args, kwargs):
            self.record(str(func))
        return func(*args, **kwargs)


def _python_opdef(func):
    from torch._library.custom_ops import OPDEFS

    name = func._schema.name
    return OPDEFS.get(name) if name.startswith("vqfast::") else None


@contextlib.contextmanager
def count_syncs():
    """A SyncCounter, active, with the Python-level sync calls patched to count into it."""
    counter = SyncCounter()
    patches: list[tuple[object, str, object]] = []

    def patch(owner, name, make):
        original = getattr(owner, name)
        patches.append((owner, name, original))
        setattr(owner, name, make(original))

    def counted(what):
        def make(original):
            def call(*args, **kwargs):
                counter.record(what)
                with counter.pause():  # one sync, not also the ops it runs
                    return original(*args, **kwargs)
            return call
        return make

    def device_sync(what):
        def make(original):
            def call(*args, **kwargs):
                counter.record(what)
                if torch.cuda.is_available():
                    return original(*args, **kwargs)
            return call
        return make

    for name in ("tolist", "numpy", "cpu"):
        patch(torch.Tensor, name, counted(f"Tensor.{name}()"))
    patch(torch.cuda, "synchronize", device_sync("torch.cuda.synchronize()"))
    patch(torch.cuda.Stream, "synchronize", device_sync("Stream.synchronize()"))
    patch(torch.cuda.Event, "synchronize", device_sync("Event.synchronize()"))
    if INTERPRETED:
        from triton.runtime import interpreter

        def paused(original):
            def call(*args, **kwargs):
                with counter.pause():
                    return original(*args, **kwargs)
            return call

        # A launch copies its tensor arguments to host buffers and back: device memory on a GPU.
        # The rest of the launch (the grid function, the kernel's body) is counted.
        patch(interpreter.GridExecutor, "_init_args_hst", paused)
        patch(interpreter.GridExecutor, "_restore_args_dev", paused)
    try:
        with counter:
            yield counter
    finally:
        for owner, name, original in reversed(patches):
            setattr(owner, name, original)


def assert_syncs(counter: SyncCounter, expected: int, what: str) -> None:
    assert counter.count == expected, (f"{what}: {counter.count} host sync(s), expected {expected}:\n  "
                                       + "\n  ".join(counter.events))


# ---------------------------------------------------------------- the CUDA kernel's stand-in


def _cuda_standin(z, codebook, metric="l2", precision="exact"):
    """vqfast::nearest_codeword's contract from device-side ops, no host sync: a float64 brute force
    (NaN ranks last, lowest index on ties), cosine's zero rows as every backend applies them."""
    zs = reference.normalize_for_metric(z.double(), metric)
    cs = reference.normalize_for_metric(codebook.double(), metric)
    d = ((zs[:, None, :] - cs[None, :, :]) ** 2).sum(-1).nan_to_num(nan=float("inf"))
    indices = d.argmin(1)
    if metric == "cosine":
        rows, index, _ = reference.cosine_zero_rows(z, codebook)
        indices = torch.where(rows, index, indices)
    picked = codebook.index_select(0, indices)
    return indices, picked.to(z.dtype), reference.codeword_distances(z, picked, metric).float()


def _cuda_flagged_standin(z, codebook, metric="l2", precision="exact"):
    """vqfast::nearest_codeword_flagged's contract: the search plus extremes = (max |z|, max |codebook|)
    float64 [2] on the device (amax propagates NaN; an Inf gives +inf)."""
    extremes = torch.stack([z.abs().amax(), codebook.abs().amax()]).double()
    return (*_cuda_standin(z, codebook, metric, precision), extremes)


def _use_cuda_standin(monkeypatch, **changes) -> None:
    """backend="cuda" on this machine's tensors, running the stand-in kernels (flagged op included)."""
    record = dataclasses.replace(
        backends.REGISTRY["cuda"], unavailable_reason=lambda: None, device_reason=lambda device_type: None,
        inputs_reason=lambda z, codebook: None, load_op=lambda: _cuda_standin,
        load_flagged_op=lambda: _cuda_flagged_standin)
    monkeypatch.setitem(backends.REGISTRY, "cuda", dataclasses.replace(record, **changes))


@pytest.fixture
def standin_cuda(monkeypatch):
    _use_cuda_standin(monkeypatch)


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _data(n=37, k=53, d=17, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g).to(dtype).to(_device()),
            torch.randn(k, d, generator=g).to(dtype).to(_device()))


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_the_standin_has_the_flagged_ops_outputs(backend):
    # The stand-in answers as the real op does: the same outputs, shapes and dtypes (the op's fake
    # implementation, under FakeTensorMode), so the code above the kernel sees the contract it will get.
    from torch._subclasses.fake_tensor import FakeTensorMode

    if backend == "triton":
        pytest.importorskip("triton")
    op = backends.REGISTRY[backend].load_flagged_op()
    if op is None:
        pytest.skip(f"this build defines no flagged op for {backend}")
    z, cb = _data(n=5, k=7, d=3, dtype=torch.float16)
    ours = _cuda_flagged_standin(z, cb, "cosine", "exact")
    with FakeTensorMode() as mode:
        fake = op(mode.from_tensor(z), mode.from_tensor(cb), "cosine", "exact")
    assert [(tuple(t.shape), t.dtype) for t in fake] == [(tuple(t.shape), t.dtype) for t in ours]


# ---------------------------------------------------------------- the counter can fail


def test_the_counter_counts_every_kind_of_sync():
    t = torch.randn(8)
    mask = t > 0
    cases = {
        "item": lambda: t[0].item(), "int": lambda: int(t[0]), "float": lambda: float(t[0]),
        "bool": lambda: bool(mask.any()), "if": lambda: 1 if mask.any() else 0, "tolist": lambda: t.tolist(),
        "numpy": lambda: t.numpy(), "cpu": lambda: t.cpu(), "nonzero": lambda: t.nonzero(),
        "nonzero(as_tuple)": lambda: t.nonzero(as_tuple=True), "argwhere": lambda: torch.argwhere(t),
        "where(cond)": lambda: torch.where(mask), "mask index": lambda: t[mask],
        "mask assign": lambda: t.clone().__setitem__(mask, 0.0), "masked_select": lambda: t.masked_select(mask),
        "unique": lambda: torch.unique(t), "bincount": lambda: mask.long().bincount(),
        "equal": lambda: torch.equal(t, t),
        "repeat_interleave": lambda: torch.arange(3).repeat_interleave(torch.ones(3, dtype=torch.long)),
        "cuda.synchronize": lambda: torch.cuda.synchronize(),
    }
    for name, fn in cases.items():
        with count_syncs() as counter:
            fn()
        assert_syncs(counter, 1, name)
    with count_syncs() as counter:  # device-side work alone: none
        (t * 2).argmin(), torch.where(mask, t, 0.0), t.index_select(0, torch.tensor([1, 2])), t.amax()
        torch.arange(3).repeat_interleave(torch.ones(3, dtype=torch.long), output_size=3)
    assert_syncs(counter, 0, "device-side ops")


def test_the_counter_sees_inside_the_op_path(monkeypatch):
    z, cb = _data()
    # A kernel stand-in that reads one value back is caught through nearest_codeword ...
    _use_cuda_standin(monkeypatch, load_op=lambda: lambda *a: (_cuda_standin(*a), a[0].sum().item())[0])
    with count_syncs() as counter:
        vqfast.nearest_codeword(z, cb, backend="cuda", check_finite=False)
    assert_syncs(counter, 1, "a stand-in kernel with .item()")
    # ... and so is a sync inside a vqfast op written in Python (opened up by the counter).
    with count_syncs() as counter:
        torch.ops.vqfast.nearest_codeword_torch(z, cb, "l2", "exact")
    assert counter.count >= 1, "the torch backend's exact re-rank (nonzero) must be seen inside its custom op"


# ---------------------------------------------------------------- nearest_codeword on the cuda path


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("precision", ["exact", "fast"])
@pytest.mark.parametrize("check_finite, expected", [(False, 0), (True, 1)])
def test_cuda_path_syncs_per_call(standin_cuda, metric, precision, check_finite, expected):
    z, cb = _data()
    with count_syncs() as counter:
        out = vqfast.nearest_codeword(z, cb, metric=metric, precision=precision, backend="cuda",
                                      check_finite=check_finite)
    assert_syncs(counter, expected, f"cuda {metric} {precision} check_finite={check_finite}")
    assert torch.equal(out[0].cpu(), oracle.nearest(z.cpu(), cb.cpu(), metric).indices)


def test_cuda_path_float64_retry_costs_no_further_sync(standin_cuda):
    # float32 values beyond magnitude_limit(D, float32): the flagged op's maxima send the search to
    # float64 on the same backend, which the one read-back already decided.
    z, cb = _data(n=20, k=9, d=5)
    z, cb = z * 1e30, cb * 1e30
    with count_syncs() as counter:
        out = vqfast.nearest_codeword(z, cb, backend="cuda")
    assert_syncs(counter, 1, "cuda float64 retry")
    assert out[1].dtype == torch.float32
    assert torch.equal(out[0].cpu(), oracle.nearest(z.cpu(), cb.cpu()).indices)


def test_cuda_build_without_a_flagged_op_scans_first(monkeypatch):
    _use_cuda_standin(monkeypatch, load_flagged_op=lambda: None)
    z, cb = _data()
    with count_syncs() as counter:
        vqfast.nearest_codeword(z, cb, backend="cuda")
    assert_syncs(counter, 1, "cuda without a flagged op (scan_values + the plain op)")


@pytest.mark.parametrize("precision, per_chunk", [("exact", 1), ("fast", 0)])
@pytest.mark.parametrize("check_finite", [False, True])
def test_torch_backend_syncs_as_documented(precision, per_chunk, check_finite):
    # Not a GPU kernel, but what backend="auto" runs on a GPU without a validated kernel: its exact
    # re-rank finds its rows with nonzero, once per chunk of rows (docs/gpu.md says so).
    z, cb = _data(n=100, k=300, d=16)
    chunks = 3
    with count_syncs() as counter:
        vqfast.nearest_codeword(z, cb, precision=precision, backend="torch", check_finite=check_finite)
    assert_syncs(counter, per_chunk + check_finite, f"torch {precision} check_finite={check_finite}")
    with count_syncs() as counter:
        reference.search(z, cb, "l2", precision, chunk_elements=300 * 40)  # chunks of 40 rows: 40, 40, 20
    assert_syncs(counter, per_chunk * chunks, f"torch {precision}, {chunks} chunks")


# ---------------------------------------------------------------- one pass of VAR's quantizer

PATCH_NUMS = (1, 2, 3, 4)


def _multiscale(kind: str, using_znorm: bool, backend: str) -> torch.nn.Module:
    from vqfast.compat.var import VectorQuantizer2
    from vqfast.models import MultiScaleQuantizer

    torch.manual_seed(0)
    cls = VectorQuantizer2 if kind == "compat.var" else MultiScaleQuantizer
    return cls(64, 8, using_znorm, v_patch_nums=PATCH_NUMS, backend=backend).to(_device())


def _check_multiscale_pass(kind: str, using_znorm: bool, backend: str, expected: int) -> None:
    """forward (eval; training with its backward) and f_to_idxBl_or_fhat: ``expected`` syncs per pass."""
    q = _multiscale(kind, using_znorm, backend)
    f = torch.randn(2, 8, PATCH_NUMS[-1], PATCH_NUMS[-1], device=_device())
    for training in (False, True):
        q.train(training)
        q(f)  # the first training forward imports torch._dynamo for the hit bookkeeping: not counted
        leaf = f.clone().requires_grad_(training)
        with count_syncs() as counter:
            f_hat, _, loss = q(leaf)
            if training:
                (f_hat.square().mean() + loss).backward()
        assert_syncs(counter, expected, f"{kind} {'training' if training else 'eval'} forward"
                     f"{' + backward' if training else ''}, {backend}")
    q.eval()
    for to_fhat in (False, True):
        with count_syncs() as counter:
            q.f_to_idxBl_or_fhat(f, to_fhat=to_fhat)
        assert_syncs(counter, expected, f"{kind} f_to_idxBl_or_fhat(to_fhat={to_fhat}), {backend}")


@pytest.mark.parametrize("kind", ["compat.var", "models"])
@pytest.mark.parametrize("using_znorm", [False, True])
def test_cuda_path_multiscale_pass_syncs_once(standin_cuda, kind, using_znorm):
    _check_multiscale_pass(kind, using_znorm, "cuda", 1)


@pytest.mark.parametrize("precision, expected", [("exact", 1 + len(PATCH_NUMS)), ("fast", 1)])
def test_torch_backend_multiscale_pass_syncs_as_documented(precision, expected):
    # backend="torch" (auto's choice on a GPU without a validated kernel): one sync per pass for the
    # value test, plus in exact mode the re-rank's nonzero at every scale (docs/gpu.md).
    q = _multiscale("compat.var", False, "torch").eval()
    q.set_search_options("torch", precision)
    f = torch.randn(2, 8, 4, 4, device=_device())
    with count_syncs() as counter:
        q(f)
    assert_syncs(counter, expected, f"compat.var eval forward, torch {precision}")


def test_cuda_path_multiscale_pass_without_a_flagged_op_syncs_once(monkeypatch):
    _use_cuda_standin(monkeypatch, load_flagged_op=lambda: None)  # one aminmax per scale, read back in finish
    _check_multiscale_pass("compat.var", False, "cuda", 1)


def test_cuda_path_multiscale_pass_reports_non_finite_values_by_scale(standin_cuda):
    q = _multiscale("compat.var", False, "cuda").eval()
    f = torch.randn(2, 8, 4, 4, device=_device())
    f[1, 3, 2, 2] = float("nan")  # reaches every scale's residual through the downsampling
    with pytest.raises(ValueError, match=r"the residual searched at scale 0 .*NaN or Inf"):
        q(f)
    with torch.no_grad():
        q.embedding.weight[5, 1] = float("inf")
    with pytest.raises(ValueError, match=r"embedding.weight \(the codebook\) holds NaN or Inf"):
        q(torch.randn(2, 8, 4, 4, device=_device()))


def test_img_to_idxBl_syncs_once(standin_cuda):
    from vqfast.models import VQVAE

    torch.manual_seed(0)
    model = VQVAE(vocab_size=64, z_channels=8, ch=16, v_patch_nums=PATCH_NUMS, ch_mult=(1, 2), num_res_blocks=1,
                  norm_groups=8, backend="cuda").to(_device())
    img = torch.rand(2, 3, 8, 8, device=_device()) * 2 - 1
    model.img_to_idxBl(img)
    with count_syncs() as counter:
        tokens = model.img_to_idxBl(img)
    assert_syncs(counter, 1, "VQVAE.img_to_idxBl, cuda")
    assert [tuple(t.shape) for t in tokens] == [(2, p * p) for p in PATCH_NUMS]


@pytest.mark.parametrize("which", ["z", "codebook"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_cuda_path_value_test_raises_as_the_scan_does(standin_cuda, which, value):
    # The flagged op's maxima go through the same rules (value_rules) as scan_values: the same message.
    z, cb = _data()
    (z if which == "z" else cb)[4, 2] = value
    kind = "NaN" if value != value else "Inf"
    with pytest.raises(ValueError, match=rf"^{which} contains 1 non-finite value\(s\) \({kind}\), the first in row 4"):
        vqfast.nearest_codeword(z, cb, backend="cuda")
    z64, cb64 = _data(dtype=torch.float64)
    (z64 if which == "z" else cb64)[2, 3] = 1e160
    with pytest.raises(ValueError, match=rf"^{which} holds values up to 1e\+160.*overflow float64"):
        vqfast.nearest_codeword(z64, cb64, backend="cuda")


# ---------------------------------------------------------------- the triton path, under the interpreter

needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="run under TRITON_INTERPRET=1 by "
                                       "test_triton_paths_under_the_interpreter")


@needs_interpreter
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("precision", ["exact", "fast"])
@pytest.mark.parametrize("check_finite, expected", [(False, 0), (True, 1)])
def test_triton_path_syncs_per_call(metric, precision, check_finite, expected):
    z, cb = _data(n=40, k=300, d=16)  # K = 300: more than one code tile and, at N = 40, a split codebook
    with count_syncs() as counter:
        out = vqfast.nearest_codeword(z, cb, metric=metric, precision=precision, backend="triton",
                                      check_finite=check_finite)
    assert_syncs(counter, expected, f"triton {metric} {precision} check_finite={check_finite}")
    if precision == "exact":
        assert torch.equal(out[0], oracle.nearest(z, cb, metric).indices)


@needs_interpreter
@pytest.mark.parametrize("kind, using_znorm", [("compat.var", False), ("models", True)])
def test_triton_path_multiscale_pass_syncs_once(kind, using_znorm):
    _check_multiscale_pass(kind, using_znorm, "triton", 1)


@pytest.mark.slow
@pytest.mark.skipif(INTERPRETED, reason="this is the runner")
def test_triton_paths_under_the_interpreter():
    """The triton cases above, in a process with TRITON_INTERPRET=1 (about 15 s here)."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                          "-k", "triton_path_syncs or triton_path_multiscale"],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout.splitlines()[-1], run.stdout[-2000:]


# ---------------------------------------------------------------- on a GPU: the real kernels

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def _gpu_backend(backend: str) -> None:
    if backend not in vqfast.available_backends("cuda"):
        pytest.skip(f"backend {backend!r} is not available here")


@needs_gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("precision", ["exact", "fast"])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_gpu_search_is_captured_in_a_cuda_graph(backend, precision, metric):
    _gpu_backend(backend)
    z, cb = _data(n=1000, k=4096, d=32)
    kwargs = dict(metric=metric, precision=precision, backend=backend, check_finite=False)
    want = vqfast.nearest_codeword(z, cb, **kwargs)  # first: autotuning and one-time kernel setup
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # torch's own syncing calls raise, C++ ones included
    try:
        vqfast.nearest_codeword(z, cb, **kwargs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # a host sync during capture fails it
        got = vqfast.nearest_codeword(z, cb, **kwargs)
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@needs_gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_check_finite_reads_back_once(backend):
    _gpu_backend(backend)
    z, cb = _data(n=1000, k=4096, d=32)
    vqfast.nearest_codeword(z, cb, backend=backend)
    with count_syncs() as counter:
        vqfast.nearest_codeword(z, cb, backend=backend)
    assert_syncs(counter, 1, f"{backend} on the GPU, check_finite=True")
