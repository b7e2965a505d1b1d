"""Two CPU processes on the gloo backend keep one codebook: EMA statistics, k-means init and dead-code
restarts are synchronised, and the result equals one process training on the concatenated batches."""
import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.helpers import end_gloo_worker
from vqfast import ResidualVectorQuantizer, VectorQuantizer

WORLD = 2
K, D = 12, 3
# Unequal shares of each global batch (36 rows per step), one step with no rows at all on a rank:
# collectives must still line up.
SPLITS = [(7, 29), (29, 7), (0, 36), (18, 18), (36, 0), (5, 31)]
STEPS = len(SPLITS)
OPTIONS = dict(ema=True, decay=0.7, kmeans_init=True, kmeans_iters=4, dead_code_threshold=1.5)


def _batches():
    gen = torch.Generator().manual_seed(11)
    centers = torch.randn(8, D, generator=gen) * 4
    out = []
    for _ in range(STEPS):
        labels = torch.randint(8, (36,), generator=gen)
        out.append(centers[labels] + 0.05 * torch.randn(36, D, generator=gen))
    return out


def _model():
    torch.manual_seed(0)
    return ResidualVectorQuantizer(2, K, D, **OPTIONS)


def _train(model, batches, rank=None):
    for x, split in zip(batches, SPLITS):
        if rank is not None:
            start = sum(split[:rank])
            x = x[start : start + split[rank]]
        model(x.T.unsqueeze(0).contiguous())  # [1, D, N]
    return {k: v.clone() for k, v in model.state_dict().items()}


def _worker(rank, init_file, out_dir):
    # A mismatched collective fails after 60 s instead of hanging CI for gloo's default 30 minutes.
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60)
    )
    try:
        state = _train(_model(), _batches(), rank)
        torch.save(state, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    end_gloo_worker()


@pytest.mark.slow
def test_two_gloo_ranks_match_single_process(tmp_path, monkeypatch):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    restarts = []
    set_codes = VectorQuantizer._set_codes

    def spy(self, mask, values, usage):
        if bool(mask.any()) and not bool(mask.all()):  # k-means sets every code; a restart only the dead
            restarts.append(int(mask.sum()))
        return set_codes(self, mask, values, usage)

    monkeypatch.setattr(VectorQuantizer, "_set_codes", spy)
    single = _train(_model(), _batches())
    assert restarts, "the run never re-seeded a dead code: the restart path went untested"
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    # Every rank holds exactly the same codebook and EMA state.
    for key in single:
        assert torch.equal(states[0][key], states[1][key]), key
    # ... equal to one process on the concatenated batches, up to the fp32 order of the sums.
    for key, value in single.items():
        if value.is_floating_point():
            torch.testing.assert_close(states[0][key], value, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(states[0][key], value), key
    assert all(bool(single[f"quantizers.{i}.initted"]) for i in range(2))
