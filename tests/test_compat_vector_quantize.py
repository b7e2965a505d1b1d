"""vqfast.accelerate on vector-quantize-pytorch's VectorQuantize and ResidualVQ, against the real classes.

Each case builds an original module and an accelerated deep copy, feeds both the same inputs from the
same random state, and compares every step: indices exactly, outputs, losses, gradients to the input
and to every parameter, and every buffer (cluster_size, embed_avg, embed, initted, ...) to float
rounding; then eval mode, and the random state after the run (the same numbers were drawn).
"""
import copy
import datetime
import functools
import os
import pickle

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from vector_quantize_pytorch import ResidualVQ, VectorQuantize

import vqfast
from tests.helpers import MaxNumel, end_gloo_worker
from vqfast.compat import vector_quantize as compat
from vqfast.reference import CHUNK_ELEMENTS

BACKENDS = vqfast.available_backends("cpu")
STEPS = 3


def _inputs(shape, steps=STEPS, dtype=torch.float32, seed=0):
    """Clustered rows (so that codes are shared and some go dead) in the layout the module takes."""
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=gen) + 2.0 * torch.randn(shape[:1] + (1,) * (len(shape) - 1), generator=gen)).to(dtype)
            for _ in range(steps)]


def _mask(step, b, n):
    gen = torch.Generator().manual_seed(100 + step)
    mask = torch.rand(b, n, generator=gen) > 0.3
    mask[:, 0] = True
    return mask


def _outputs(out):
    """(quantize, indices, loss) of either return form: (quantize, indices, loss, ...) or, when given
    indices, (quantize, cross-entropy loss)."""
    return (out[0], None, out[1]) if len(out) == 2 else out[:3]


def _run(module, inputs, call=lambda step: {}, seed=1, train=True):
    """Train ``module`` on ``inputs`` (forward, backward with a fixed upstream gradient, SGD), then one eval
    forward; returns a record of everything observable and the random state at the end."""
    module.train(train)
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.05) if params else None
    grad_gen = torch.Generator().manual_seed(7)
    torch.manual_seed(seed)
    record = []
    for step, x in enumerate(inputs):
        x = x.clone().requires_grad_()
        out = module(x, **call(step))
        quantize, indices, loss = _outputs(out)
        weight = torch.randn(quantize.shape, generator=grad_gen).to(quantize.dtype)
        objective = (quantize * weight).float().sum() + 3.0 * loss.float().sum()
        if objective.requires_grad:
            objective.backward()
        record.append({
            "quantize": quantize.detach(), "indices": indices, "loss": loss.detach(), "extra": [
                t.detach() if isinstance(t, torch.Tensor) else tuple(v.detach() for v in t) for t in out[3:]
            ],
            "x.grad": x.grad,
            "grads": {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None},
            "state": {n: t.clone() for n, t in module.state_dict().items()},
        })
        if opt is not None:
            opt.step()
            opt.zero_grad()
    module.eval()
    x = inputs[-1].clone().requires_grad_()
    quantize, indices, loss = _outputs(module(x, **call(len(inputs))))
    x_grad = torch.autograd.grad(quantize.float().sum(), x, allow_unused=True)[0] if quantize.requires_grad else None
    record.append({"quantize": quantize.detach(), "indices": indices, "loss": loss.detach(), "eval x.grad": x_grad})
    return record, torch.get_rng_state()


def _assert_same(a, b, path="record"):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            _assert_same(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        if a.is_floating_point():
            torch.testing.assert_close(a, b, msg=lambda m: f"{path}: {m}")
        else:
            assert torch.equal(a, b), f"{path}: {int((a != b).sum())} of {a.numel()} differ"
    else:
        assert a == b, path


def _original_and_accelerated(cls, **kwargs):
    torch.manual_seed(0)
    original = cls(**kwargs)
    accelerated = vqfast.accelerate(copy.deepcopy(original))
    return original, accelerated


def _compare(cls, kwargs, inputs, call=lambda step: {}, eval_loss_zero=True):
    """Original vs accelerated on the same inputs and random state; returns (original, accelerated, record)."""
    original, accelerated = _original_and_accelerated(cls, **kwargs)
    assert isinstance(accelerated, cls) and isinstance(accelerated, getattr(compat, cls.__name__))
    expected, rng_expected = _run(original, inputs, call)
    got, rng_got = _run(accelerated, inputs, call)
    _assert_same(expected, got)
    assert torch.equal(rng_expected, rng_got), "a different amount of random numbers was drawn"
    # eval: loss 0 and no gradient to the input (except where masked rows pass the input through)
    if eval_loss_zero:  # (top-k and beam search return their candidates' losses in eval)
        assert not expected[-1]["loss"].any()
    if kwargs.get("return_zeros_for_masked_padding", True):
        assert expected[-1]["eval x.grad"] is None
    return original, accelerated, expected


D = 16
SEQ = (2, 48, D)
VQ_CASES = {
    "euclidean": (dict(), SEQ, {}),
    "cosine": (dict(use_cosine_sim=True), SEQ, {}),
    "projection": (dict(codebook_dim=8, layernorm_after_project_in=True), SEQ, {}),
    "heads shared": (dict(heads=4, codebook_dim=4), SEQ, {}),
    "heads separate": (dict(heads=2, separate_codebook_per_head=True, codebook_dim=8), SEQ, {}),
    "kmeans dead codes": (dict(kmeans_init=True, kmeans_iters=5, threshold_ema_dead_code=2, decay=0.7), SEQ, {}),
    "cosine kmeans dead codes heads": (
        dict(use_cosine_sim=True, kmeans_init=True, threshold_ema_dead_code=1, heads=2, separate_codebook_per_head=True,
             codebook_dim=8, decay=0.6), SEQ, {}),
    "straight through": (dict(rotation_trick=False, commitment_weight=0.3, eps=1e-3, decay=0.5), SEQ, {}),
    "image fmap": (dict(accept_image_fmap=True, threshold_ema_dead_code=1), (2, D, 6, 7), {}),
    "3d fmap": (dict(accept_3d_fmap=True), (2, D, 3, 4, 5), {}),
    "channel first": (dict(channel_last=False), (2, D, 40), {}),
    "one token": (dict(), (60, D), {}),
    # (the original cannot mask multi-head inputs: its masked commitment loss mis-broadcasts)
    "mask": (dict(kmeans_init=True, threshold_ema_dead_code=2), SEQ, {"mask": True}),
    "lens": (dict(return_zeros_for_masked_padding=False), SEQ, {"lens": torch.tensor([48, 30])}),
    "learnable codebook": (dict(learnable_codebook=True, ema_update=False), SEQ, {}),
    "orthogonal": (dict(orthogonal_reg_weight=0.5, orthogonal_reg_max_codes=16, orthogonal_reg_active_codes_only=True), SEQ, {}),
    "affine": (dict(affine_param=True), SEQ, {}),
    "in-place optimizer": (
        dict(learnable_codebook=True, ema_update=False, in_place_codebook_optimizer=functools.partial(torch.optim.SGD, lr=0.5)),
        SEQ, {}),
    "vq bridge": (dict(vq_bridge=nn.Linear(D, D), threshold_ema_dead_code=1), SEQ, {}),
    "directional reparam": (dict(directional_reparam=True, threshold_ema_dead_code=1), SEQ, {}),
    "sync update": (dict(learnable_codebook=True, ema_update=False, sync_update_v=0.2, rotation_trick=False), SEQ, {}),
    "dead codes without ema": (dict(ema_update=False, threshold_ema_dead_code=2), SEQ, {}),
    "manual ema": (dict(manual_ema_update=True), SEQ, {}),
    "frozen": (dict(freeze_codebook=True), SEQ, {}),
    "loss breakdown": (dict(orthogonal_reg_weight=0.1), SEQ, {"return_loss_breakdown": True}),
    "ema weight": (dict(), SEQ, {"ema_update_weight": torch.linspace(0.5, 1.5, 32)}),
    "ema weight function": (dict(), SEQ, {"ema_update_weight": lambda embed_sum, cluster_size: (cluster_size > 0).float()}),
    "accumulated ema": (dict(), SEQ, {"accum_ema_update": "odd steps"}),
}


def _call_for(shape, spec):
    def call(step):
        out = {}
        for key, value in spec.items():
            if key == "mask":
                out["mask"] = _mask(step, shape[0], shape[1])
            elif key == "accum_ema_update":
                out[key] = step % 2 == 1
            else:
                out[key] = value
        return out

    return call


@pytest.mark.parametrize("case", VQ_CASES)
def test_vector_quantize_matches_original(case):
    kwargs, shape, call = VQ_CASES[case]
    original, accelerated, record = _compare(
        VectorQuantize, dict(dim=D, codebook_size=32, **kwargs), _inputs(shape), _call_for(shape, call)
    )
    assert original.state_dict().keys() == accelerated.state_dict().keys()
    # indices -> codes, as forward returned them (the original's answer, or its error)
    indices = record[-1]["indices"]
    for method in ("get_codes_from_indices", "get_output_from_indices"):
        try:
            expected = getattr(original, method)(indices)
        except Exception as error:  # the original cannot take these indices: neither can the accelerated one
            with pytest.raises(Exception):
                getattr(accelerated, method)(indices)
            assert "mask" in call or "lens" in call, error  # only masked indices (-1) are refused
            continue
        _assert_same(expected, getattr(accelerated, method)(indices), method)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    # The original searches in fp32 with autocast off and returns x's dtype; so does the accelerated codebook.
    _, _, record = _compare(VectorQuantize, dict(dim=D, codebook_size=32, threshold_ema_dead_code=1), _inputs(SEQ, dtype=dtype))
    assert record[0]["quantize"].dtype == dtype


def test_kmeans_on_fewer_rows_than_codes():
    # 20 rows for 32 codes: the sampling draws with replacement (randint instead of randperm) on both.
    _compare(VectorQuantize, dict(dim=D, codebook_size=32, kmeans_init=True), _inputs((1, 20, D)))


RVQ_CASES = {
    "8 quantizers dead codes dropout": (
        dict(num_quantizers=8, threshold_ema_dead_code=2, decay=0.7, quantize_dropout=True), SEQ, {}),
    # 8 codes for 96 rows: with many more codes, k-means leaves single-row clusters, whose residuals
    # (~3e-5) lie within the original's 1e-8 distance clamp of each other in the next layer, where it
    # breaks the ties by index and vqfast takes the nearest (test_the_nearest_code_... below).
    "kmeans": (dict(num_quantizers=3, codebook_size=8, kmeans_init=True), SEQ, {}),
    "shared codebook": (dict(num_quantizers=4, shared_codebook=True, threshold_ema_dead_code=1), SEQ, {}),
    "projection cosine": (dict(num_quantizers=3, codebook_dim=8, use_cosine_sim=True), SEQ, {}),
    "mask and all codes": (dict(num_quantizers=3), SEQ, {"mask": True, "return_all_codes": True}),
    "beam search per call": (dict(num_quantizers=3, threshold_ema_dead_code=1), SEQ, {"beam_size": 2}),
}


@pytest.mark.parametrize("case", RVQ_CASES)
def test_residual_vq_matches_original(case):
    kwargs, shape, call = RVQ_CASES[case]
    original, accelerated, record = _compare(ResidualVQ, dict(dict(dim=D, codebook_size=32), **kwargs), _inputs(shape),
                                             _call_for(shape, call), eval_loss_zero="beam_size" not in call)
    assert all(isinstance(layer._codebook, compat.Codebook) for layer in accelerated.layers)
    indices = record[-1]["indices"]
    assert indices.shape[-1] == kwargs["num_quantizers"]
    for method in ("get_codes_from_indices", "get_output_from_indices"):
        _assert_same(getattr(original, method)(indices), getattr(accelerated, method)(indices), method)
    if "mask" not in call:
        # eval: the quantized output is the sum of the codes its indices name
        decoded = accelerated.get_output_from_indices(indices)
        torch.testing.assert_close(decoded, record[-1]["quantize"])


def test_calls_that_need_every_distance_run_the_original_code():
    x = _inputs(SEQ)
    # topk returns the k nearest codes per row; indices= returns the cross-entropy against given codes.
    calls = [
        lambda step: {"topk": 3},
        lambda step: {"indices": torch.randint(0, 32, SEQ[:2], generator=torch.Generator().manual_seed(step))},
    ]
    for call in calls:
        for train in (True, False):
            original, accelerated = _original_and_accelerated(VectorQuantize, dim=D, codebook_size=32, threshold_ema_dead_code=1)
            expected, rng_expected = _run(original, x, call, train=train)
            got, rng_got = _run(accelerated, x, call, train=train)
            _assert_same(expected, got)
            assert torch.equal(rng_expected, rng_got)
            assert not accelerated._codebook._vqfast_use_original  # the original path was taken for that call only


UNSUPPORTED = {
    "stochastic sampling": (VectorQuantize, dict(stochastic_sample_codes=True), "stochastic_sample_codes"),
    "diversity loss": (VectorQuantize, dict(codebook_diversity_loss_weight=0.1), "codebook_diversity_loss_weight"),
    "cross-entropy commitment": (VectorQuantize, dict(commitment_use_cross_entropy_loss=True), "commitment_use_cross_entropy_loss"),
    "gumbel straight-through": (VectorQuantize, dict(straight_through=True, rotation_trick=False), "straight_through"),
    "beam search": (ResidualVQ, dict(num_quantizers=2, beam_size=2), "beam search"),
    "implicit neural codebook": (ResidualVQ, dict(num_quantizers=2, implicit_neural_codebook=True), "implicit_neural_codebook"),
    "rvq layer": (ResidualVQ, dict(num_quantizers=2, stochastic_sample_codes=True), "layers.0: stochastic_sample_codes"),
}


@pytest.mark.parametrize("case", UNSUPPORTED)
def test_unsupported_options_stay_on_the_original_code(case, capsys):
    cls, kwargs, reason = UNSUPPORTED[case]
    torch.manual_seed(0)
    module = cls(dim=D, codebook_size=32, **kwargs)
    model = nn.Sequential(nn.Identity(), module)
    vqfast.accelerate(model, verbose=True)
    out = capsys.readouterr().out
    assert f"1: vector-quantize-pytorch {cls.__name__} left on its original code: {reason}" in out
    assert type(module) is cls
    if cls is VectorQuantize:
        assert type(module._codebook).__module__ == "vector_quantize_pytorch.vector_quantize_pytorch"
    q = module(torch.randn(SEQ))[0]  # and still runs
    assert q.shape == SEQ


def test_accelerate_twice_and_state_dict_round_trip(capsys):
    original = VectorQuantize(dim=D, codebook_size=32, kmeans_init=True, heads=2, separate_codebook_per_head=True, codebook_dim=8)
    accelerated = vqfast.accelerate(copy.deepcopy(original))
    codebook_class = type(accelerated._codebook)
    vqfast.accelerate(accelerated, precision="fast", verbose=True)
    assert "already accelerated" in capsys.readouterr().out
    assert type(accelerated._codebook) is codebook_class and accelerated._codebook._vqfast_precision == "fast"
    accelerated(torch.randn(SEQ))  # k-means init changes the buffers
    assert bool(accelerated._codebook.initted)
    original.load_state_dict(accelerated.state_dict(), strict=True)
    restored = vqfast.accelerate(copy.deepcopy(VectorQuantize(dim=D, codebook_size=32, kmeans_init=True, heads=2,
                                                              separate_codebook_per_head=True, codebook_dim=8)))
    restored.load_state_dict(original.state_dict(), strict=True)
    x = torch.randn(SEQ)
    _assert_same(original.eval()(x), restored.eval()(x))
    for clone in (copy.deepcopy(restored), pickle.loads(pickle.dumps(restored))):  # the swapped classes travel
        assert type(clone._codebook) is type(restored._codebook)
        _assert_same(restored(x), clone(x))


@pytest.mark.parametrize("train", [False, True])
def test_the_nearest_code_where_the_original_expansion_ties(train):
    # Row 0: |x|^2 = 2^20 leaves fp32 an ulp of 0.125, so the expansion |x|^2 + |e|^2 - 2 x.e is 0 for
    # codes 0 and 1, and the original's argmax takes code 0 (squared distance 4e-4), not code 1 (1e-4).
    # Row 1: every squared distance below 1e-8 is clamped to 1e-8: code 2 (1.8e-9) ties with code 3 (1e-12).
    original = VectorQuantize(dim=4, codebook_size=5, decay=0.5).train(train)
    with torch.no_grad():
        original.codebook = torch.tensor(
            [[1024.0, 0.02, 0, 0], [1024.0, 0.01, 0, 0], [0.0, 3e-5, 0, 0], [2.9e-5, 0, 0, 0], [0.0, 1, 0, 0]]
        )
        original._codebook.embed_avg.copy_(original._codebook.embed)
    accelerated = vqfast.accelerate(copy.deepcopy(original))
    x = torch.tensor([[[1024.0, 0, 0, 0], [3e-5, 0, 0, 0], [0.0, 1, 0, 0]]])
    true_distance = (x[0, :, None].double() - original.codebook.double()).square().sum(-1)
    assert original(x)[1].tolist() == [[0, 2, 4]]
    assert accelerated(x)[1].tolist() == [[1, 3, 4]] == [true_distance.argmin(1).tolist()]
    if train:  # the EMA then follows each module's choice: only codes 0..3 differ
        same = torch.isclose(original._codebook.embed, accelerated._codebook.embed).all(-1)[0]
        assert same.tolist() == [False, False, False, False, True]


def test_cosine_ranks_by_the_dot_product_of_the_stored_codes():
    # The original's cosine codebook takes the largest dot product with the codes as stored; a code set
    # through the ``codebook`` setter need not be unit-norm, and a zero row ties everywhere (code 0).
    original = VectorQuantize(dim=3, codebook_size=3, use_cosine_sim=True).eval()
    with torch.no_grad():
        original.codebook = torch.tensor([[1.0, 0, 0], [0.0, 3, 0], [0.6, 0.8, 0]])
    accelerated = vqfast.accelerate(copy.deepcopy(original))
    # row 0: dots 0.8, 1.8, 1.04 (cosine would pick code 2); row 1: dots 0.6, 0, 0.36; row 2 is zero
    x = torch.tensor([[[0.6, 0.6, 0.0], [1.0, 0.0, 0.5], [0.0, 0.0, 0.0]]])
    assert original(x)[1].tolist() == [[1, 0, 0]]
    assert accelerated(x)[1].tolist() == [[1, 0, 0]]



@pytest.mark.parametrize(
    "backend,options",
    [(b, dict()) for b in BACKENDS] + [("auto", dict(use_cosine_sim=True, heads=2, separate_codebook_per_head=True))],
)
def test_no_n_by_k_tensor_in_forward_or_backward(backend, options):
    n, k, d = 8192, 1024, 4  # N x K = 8.4M elements > the torch backend's 4.2M-element chunk
    kwargs = dict(dim=d * options.get("heads", 1), codebook_size=k, codebook_dim=d, kmeans_init=True, kmeans_iters=1,
                  threshold_ema_dead_code=2, **options)
    x = torch.randn(2, n // 2, kwargs["dim"], requires_grad=True)
    torch.manual_seed(0)
    vq = vqfast.accelerate(VectorQuantize(**kwargs), backend=backend)
    probe = MaxNumel()
    with probe:
        q, indices, loss = vq(x)  # k-means init, search, EMA update, dead-code expiry
        (q.sum() + loss).backward()
        vq.get_codes_from_indices(indices)
    assert probe.max_numel <= max(CHUNK_ELEMENTS if backend == "torch" else 0, 2 * n * (d + 1))  # (cosine: [N, d + 1])
    if options:  # the probe sees the original's [h, N, K] distances (and its batch-fold codebook copy)
        with probe:
            vq._codebook._vqfast_use_original = True
            vq(x)[1]
            VectorQuantize.get_codes_from_indices(vq, indices)
        assert probe.max_numel >= n * k


@pytest.mark.slow
def test_torch_compile():
    # aot_eager: Dynamo and AOTAutograd trace the module (fake tensors through the vqfast op) without
    # inductor's C++ build; the codebook's initted check is a graph break, as in the original.
    inputs = _inputs(SEQ, steps=2)
    original, accelerated = _original_and_accelerated(VectorQuantize, dim=D, codebook_size=32, threshold_ema_dead_code=1)
    compiled = torch.compile(accelerated, backend="aot_eager")
    expected, _ = _run(original, inputs)
    got, _ = _run(compiled, inputs)
    for step in got:  # the compiled wrapper names the module's tensors "_orig_mod.<name>"
        for key in ("grads", "state"):
            if key in step:
                step[key] = {name.removeprefix("_orig_mod."): t for name, t in step[key].items()}
    _assert_same(expected, got)


# ---- two gloo ranks: accelerated and original ranks train together ------------------------------------

WORLD = 2
SPLITS = [(40, 56), (70, 26), (48, 48)]  # unequal rows per rank per step


def _dist_model(accelerated):
    torch.manual_seed(0)
    vq = VectorQuantize(dim=D, codebook_size=32, kmeans_init=True, kmeans_iters=3, threshold_ema_dead_code=2,
                        sync_codebook=True, decay=0.7)
    return vqfast.accelerate(vq) if accelerated else vq


def _dist_worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        batches = _inputs((1, sum(SPLITS[0]), D), seed=5)
        results = {}
        # (rank 0, rank 1): both original, mixed, both accelerated; every pair runs the same collectives.
        for name, accelerated in (("original", False), ("mixed", rank == 0), ("accelerated", True)):
            vq = _dist_model(accelerated)
            torch.manual_seed(10 + rank)
            indices = []
            for x, split in zip(batches, SPLITS):
                start = sum(split[:rank])
                indices.append(vq(x[:, start:start + split[rank]])[1])
            results[name] = {"indices": indices, "state": vq.state_dict(), "rng": torch.get_rng_state()}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    end_gloo_worker()


@pytest.mark.slow
def test_two_gloo_ranks_mixing_accelerated_and_original(tmp_path):
    mp.spawn(_dist_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for name in ("original", "mixed", "accelerated"):
        # every rank ends with the same codebook (all-reduced statistics, rank 0's k-means and restarts)
        _assert_same(ranks[0][name]["state"], ranks[1][name]["state"], name)
        for rank in ranks:
            _assert_same(rank["original"], rank[name], name)
    assert bool(ranks[0]["original"]["state"]["_codebook.initted"])
