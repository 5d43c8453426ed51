"""Process-group helpers: no-ops alone, real sharding and DDP under a two-process torchrun (gloo)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from dpcompress.training import distributed

REPO = Path(__file__).resolve().parents[2]

WORKER = r'''
import hashlib, json, sys
import torch
from dpcompress import zoo
from dpcompress.training import distributed
from dpcompress.training.train import train
from tests.digits_helpers import digits16

distributed.init()
shard = distributed.shard(list(range(7)))
gathered = distributed.all_gather(shard)
torch.manual_seed(distributed.rank())  # different starting weights: DDP must make them equal
model = zoo.tiny_mobilenet_v2()
subset = torch.utils.data.TensorDataset(*(t[:128] for t in digits16().train.tensors))
train(model, subset, epochs=1, lr=0.1, batch_size=16)
flat = torch.cat([p.detach().flatten() for p in model.parameters()])
digests = distributed.all_gather(hashlib.sha256(flat.numpy().tobytes()).hexdigest())
if distributed.is_main():
    print(json.dumps({"world": distributed.world_size(), "gathered": gathered, "digests": digests}))
'''


def test_single_process_helpers_are_no_ops():
    assert not distributed.active()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.shard([1, 2, 3]) == [1, 2, 3]
    assert distributed.all_gather("x") == ["x"] and distributed.broadcast(5) == 5
    distributed.init()  # no torchrun environment: stays single-process
    assert not distributed.active()


def test_two_process_torchrun_shards_gathers_and_trains_data_parallel(tmp_path):
    import json

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    torchrun = Path(sys.executable).with_name("torchrun")
    # TMPDIR: torchrun leaves its torchelastic_* log folders in the temp folder.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TMPDIR": str(tmp_path)}
    run = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", str(script)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["world"] == 2
    assert report["gathered"] == [[0, 2, 4, 6], [1, 3, 5]]
    assert report["digests"][0] == report["digests"][1]
