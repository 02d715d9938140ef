"""`alignkit train`'s plain-DDP workers on CPU (no DeepSpeed): gradients are synchronised across processes.

A worker set up with a gloo PartialState that is not marked as CPU came out as accelerate's single-process state
(`DistributedType.NO`) in a world of 2: every rank trained its own copy on its own batches, and nothing said so.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "scripts"))
import zero_runs  # noqa: E402


def test_two_cpu_processes_train_one_synchronised_model(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("ACCELERATE_USE_DEEPSPEED", None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                           str(ROOT / "tests" / "scripts" / "ddp_runs.py"), str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads((tmp_path / "result.json").read_text())
    assert res["distributed_type"] == "DistributedType.MULTI_CPU"
    a, b = res["checksums"]
    assert a == pytest.approx(b, rel=0, abs=1e-9)  # the same weights on both ranks
    # and the same training as one process with the same global batch (the gradient is averaged over the ranks;
    # float32 sums in another order: measured 1e-7 relative, as under ZeRO in test_zero.py)
    single = zero_runs.build("fdpo", str(tmp_path / "single"))
    single.train()
    assert res["losses"] == pytest.approx(zero_runs.losses(single), rel=5e-4, abs=1e-6)
