"""Question 3: VAR multi-scale tokenisation (vqfast.models.VQVAE.img_to_idxBl) of an image batch.

    pytest benchmarks/bench_multiscale.py --vq-preset quick
    python benchmarks/bench_multiscale.py --preset quick     # table + results/multiscale_<device>.jsonl
"""
import sys

import pytest
import torch

from vqfast.bench import multiscale


def test_img_to_idxBl(timed, benchmark, preset, device):
    cls = multiscale._model_class()
    if cls is None:
        pytest.skip("vqfast.models not available")
    torch.manual_seed(0)
    model = cls().to(device).eval()
    img = torch.rand(preset.multiscale_batch, 3, multiscale.IMAGE_SIDE, multiscale.IMAGE_SIDE, device=device) * 2 - 1
    with torch.no_grad():
        assert sum(t.shape[1] for t in model.img_to_idxBl(img)) == 680
        benchmark.extra_info.update(batch=preset.multiscale_batch)
        timed(lambda: model.img_to_idxBl(img))


if __name__ == "__main__":
    from vqfast.bench import cli

    sys.exit(cli.standalone("multiscale", sys.argv[1:]))
