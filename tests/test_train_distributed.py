"""`torchrun --nproc-per-node 2 -m vqfast train` on gloo: equal to one process with the same global batch,
and a run killed mid-way (SIGKILL, no clean-up) resumes from its last checkpoint to exactly the result
of the uninterrupted run."""
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from vqfast import tokenizer
from vqfast import train as vtrain
from vqfast.data import RealImageCrops, psnr

pytestmark = pytest.mark.slow  # torchrun: processes that each import torch and train

ROOT = Path(__file__).resolve().parents[1]
STEPS, EVERY, KILL_AT = 8, 3, 7  # checkpoints at steps 3 and 6; killed while fetching the 8th batch

# Rank 0 kills itself with SIGKILL when it asks for the batch of step index KILL_AT (after KILL_AT
# steps): torchrun then stops rank 1, as it would after a crash or a pre-empted node.
KILL = f"""
import os, signal, sys
from vqfast import train
fetch = train.StepBatches.__getitem__
def dying(self, step):
    if step == {KILL_AT} and self.rank == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    return fetch(self, step)
train.StepBatches.__getitem__ = dying
from vqfast.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _torchrun(script_args, tmp):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    # --standalone: a free local port, so concurrent runs never meet.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *script_args]
    return subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)


def _train_args(out, *extra):
    return ["train", "--preset", "tiny", "--steps", str(STEPS), "--checkpoint-every", str(EVERY), "--out", str(out),
            "--no-progress", *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    (tmp / "kill.py").write_text(KILL)
    with ThreadPoolExecutor(2) as pool:
        two = pool.submit(_torchrun, ["-m", "vqfast", *_train_args(tmp / "two")], tmp)
        killed = pool.submit(_torchrun, [str(tmp / "kill.py"), *_train_args(tmp / "killed")], tmp)
        single = vtrain.train(vtrain.make_config("tiny", steps=STEPS), tmp / "one", checkpoint_every=EVERY,
                              progress=False)
        two, killed = two.result(), killed.result()
    killed_state = torch.load(tmp / "killed" / "checkpoint.pt", weights_only=True)
    killed_outputs = sorted(p.name for p in (tmp / "killed").iterdir())
    resumed = _torchrun(["-m", "vqfast", *_train_args(tmp / "killed", "--resume")], tmp)
    return {"tmp": tmp, "two": two, "killed": killed, "killed_state": killed_state, "killed_outputs": killed_outputs, "resumed": resumed,
            "single": single}


def _state(path):
    return torch.load(path / "checkpoint.pt", weights_only=True)


def test_two_processes_equal_one_process_with_the_same_global_batch(runs):
    two = runs["two"]
    assert two.returncode == 0, two.stderr
    assert "global batch 8 over 2 processes" in two.stdout
    assert two.stdout.count("held-out PSNR") == 1  # only rank 0 reports and writes
    tmp = runs["tmp"]
    a, b = _state(tmp / "two"), _state(tmp / "one")
    assert a["world_size"] == 2 and len(a["rng"]["cpu"]) == 2 and a["step"] == STEPS
    # Every step's global loss equals the single process's up to the order of the sums.
    la, lb = [h["loss"] for h in a["history"]], [h["loss"] for h in b["history"]]
    torch.testing.assert_close(torch.tensor(la), torch.tensor(lb), rtol=1e-5, atol=0)
    # The trained models compute the same function (Adam turns the last-bit noise in the gradients of
    # conv biases ahead of GroupNorm, whose true gradient is ~0, into lr-sized steps: compare outputs).
    ma, mb = tokenizer.build_model(a["config"]), tokenizer.build_model(b["config"])
    ma.load_state_dict(a["model"])
    mb.load_state_dict(b["model"])
    x = RealImageCrops("heldout", 16, 32, seed=0).batch(range(32))
    with torch.no_grad():
        fa, fb = ma.encoder(x), mb.encoder(x)
        assert ((fa - fb).norm() / fb.norm()).item() < 1e-4
        ta, tb = ma.img_to_idxBl(x), mb.img_to_idxBl(x)
        agree = torch.cat([(p == q).float().flatten() for p, q in zip(ta, tb)]).mean().item()
        assert agree > 0.99
        assert psnr(tokenizer.decode_tokens(ma, tb), tokenizer.decode_tokens(mb, tb)).min().item() > 60
    ja, jb = json.loads((tmp / "two" / "metrics.json").read_text()), runs["single"]["metrics"]
    assert abs(ja["heldout_psnr_db"] - jb["heldout_psnr_db"]) < 0.05


def test_killed_run_resumes_losing_only_the_steps_since_its_checkpoint(runs):
    killed, resumed, tmp = runs["killed"], runs["resumed"], runs["tmp"]
    assert killed.returncode != 0 and "SIGKILL" in killed.stderr
    assert runs["killed_outputs"] == ["checkpoint.pt"]  # no metrics, no half-written temp file
    saved = runs["killed_state"]
    assert saved["step"] == KILL_AT // EVERY * EVERY  # the last checkpoint before the kill survived, whole
    assert resumed.returncode == 0, resumed.stderr
    a, b = _state(tmp / "two"), _state(tmp / "killed")
    assert a["history"] == b["history"] and a["step"] == b["step"] == STEPS
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for (i, sa), sb in zip(a["optimizer"]["state"].items(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa), i
    assert all(torch.equal(p, q) for p, q in zip(a["rng"]["cpu"], b["rng"]["cpu"]))
