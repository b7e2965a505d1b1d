"""`vqfast tokenize ... encode DIR OUT_DIR` under torchrun on gloo: one process, two processes and two
launchers standing in for two machines (--nnodes 2, c10d rendezvous on 127.0.0.1) write the same token
set; a rank killed mid-run under --max-restarts 1 is restarted and the set is complete, every readable
image exactly once."""
import json
import os
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tests.test_token_shards import make_folder
from vqfast import tokenize as vtok
from vqfast import tokenset
from vqfast import train as vtrain
from vqfast.data import TokenDataset

pytestmark = pytest.mark.slow  # torchrun: processes that each import torch

ROOT = Path(__file__).resolve().parents[1]
SHARD_SIZE, BATCH = 4, 3

# Rank 1 kills itself with SIGKILL right after writing its first shard, on the first attempt only:
# torchrun (--max-restarts 1) stops rank 0 and starts both again, which skip the shards already written.
KILL = """
import os, signal, sys
from vqfast import shards
write = shards.write_shard
def dying(*args, **kwargs):
    meta = write(*args, **kwargs)
    if os.environ.get("RANK") == "1" and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
        open("killed-after-" + args[1].__str__(), "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return meta
shards.write_shard = dying
from vqfast.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1"}


def _run(cmd, cwd):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", *cmd], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=600)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tokrun")
    out = tmp / "ck"
    vtrain.train(vtrain.make_config("tiny", steps=2), out, progress=False, finish=False)
    ckpt = out / "checkpoint.pt"
    src = tmp / "in"
    make_folder(src, per_class=7)  # 22 files, 21 readable: 6 shards of 4, 3 for each of two ranks
    (tmp / "kill.py").write_text(KILL)

    def args(name):
        return ["tokenize", "--checkpoint", str(ckpt), "encode", str(src), str(tmp / name), "--shard-size",
                str(SHARD_SIZE), "--batch-size", str(BATCH), "--no-progress", "--augment", "flip"]

    tokenset.encode_folder(vtok.load_model(ckpt), src, tmp / "one", checkpoint=str(ckpt), augment="flip",
                           shard_size=SHARD_SIZE, batch_size=1, progress=False)
    two = _run(["--standalone", "--nproc-per-node", "2", "-m", "vqfast", *args("two")], tmp)
    port = _free_port()
    node = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
            f"127.0.0.1:{port}", "--rdzv-id", "tokens", "-m", "vqfast", *args("nodes")]
    with ThreadPoolExecutor(2) as pool:
        nodes = [f.result() for f in [pool.submit(_run, node, tmp) for _ in range(2)]]
    killed = _run(["--standalone", "--nproc-per-node", "2", "--max-restarts", "1", str(tmp / "kill.py"),
                   *args("killed")], tmp)
    return {"tmp": tmp, "two": two, "nodes": nodes, "killed": killed}


def _content(path):
    ds = TokenDataset(path)
    rows = [(torch.cat(tokens).tolist(), label) for tokens, label in (ds[i] for i in range(len(ds)))]
    return ds.manifest, ds.names, rows


def test_two_processes_and_two_nodes_write_the_one_process_token_set(runs):
    tmp = runs["tmp"]
    assert runs["two"].returncode == 0, runs["two"].stderr
    for launcher in runs["nodes"]:
        assert launcher.returncode == 0, launcher.stderr
    assert "on 2 processes" in runs["two"].stdout and runs["two"].stdout.count("images ->") == 1  # rank 0 reports
    one = _content(tmp / "one")
    manifest, names, rows = one
    assert manifest["images"] == 21 and manifest["rows"] == 42 and len(manifest["shards"]) == 6
    assert len(set(names)) == 21 and [s[0] for s in manifest["skipped"]] == ["dog/broken.jpg"]
    for name in ("two", "nodes"):
        assert _content(tmp / name) == one, name
        # each rank wrote its own shards: no temporaries left, one folder per shard
        assert sorted(p.name for p in (tmp / name).iterdir()) == sorted(
            ["job.json", "manifest.json"] + [s["name"] for s in manifest["shards"]])


def test_a_killed_rank_is_restarted_and_the_set_is_complete(runs):
    tmp, killed = runs["tmp"], runs["killed"]
    assert killed.returncode == 0, killed.stderr
    assert (tmp / "killed-after-1").is_file()  # rank 1 died (SIGKILL) right after writing shard 1
    assert "failed (exitcode: -9) local_rank: 1" in killed.stderr
    assert "shards already done" in killed.stdout  # the restarted ranks skipped what was written
    manifest, names, rows = _content(tmp / "killed")
    assert (manifest, names, rows) == _content(tmp / "one")
    assert sorted(set(names)) == sorted(names[::2]) and len(names) == 42  # 21 images x 2 views, none twice
    assert json.loads((tmp / "killed" / "manifest.json").read_text())["rows"] == 42
