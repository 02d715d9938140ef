"""DeepSpeed ZeRO-2/3 with 2 CPU processes (gloo): every trainer matches single-process training with the
same global batch, ZeRO-3 models save as normal Hugging Face checkpoints, and resuming is exact."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "scripts"))
import zero_runs  # noqa: E402

pytest.importorskip("deepspeed")


def _launch(args, tmp_path, port):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "ACCELERATE_USE_DEEPSPEED": "true",
           "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(port), *args], capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def single_process_losses(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    result = {}
    for method in zero_runs.METHODS:
        trainer = zero_runs.build(method, str(out / method))
        trainer.train()
        result[method] = zero_runs.losses(trainer)
    return result


@pytest.mark.parametrize("stage,port", [("zero2", 29541), ("zero3", 29542)])
def test_two_processes_under_zero_match_one_process(stage, port, single_process_losses, tmp_path):
    _launch([str(ROOT / "tests" / "scripts" / "zero_runs.py"), stage, str(tmp_path)], tmp_path, port)
    res = json.loads((tmp_path / "result.json").read_text())
    assert res["world"] == 2
    for method in zero_runs.METHODS:
        assert res[f"{method}_deepspeed"], method
        ours, ref = res[method], single_process_losses[method]
        assert len(ours) == len(ref) == zero_runs.STEPS, method
        # float32 on both sides; what differs is the order of the sums (gradients reduced across ranks, ZeRO's
        # flattened partitions) carried through 2 Adam steps. Measured (ZeRO-3): 1e-7 relative for f-DPO and
        # mIPO, 7e-5 for CRM and Causal DPO (the MMD's kernels amplify the rounding). 5e-4 leaves room for that;
        # a per-rank MMD penalty instead of the global one is off by more than 30% (measured).
        assert ours == pytest.approx(ref, rel=5e-4, abs=1e-6), (method, ours, ref)
    # the models saved under ZeRO reload as plain Hugging Face checkpoints
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_pretrained(tmp_path / "crm" / "final")
    for method in ("fdpo", "mipo", "causal_dpo"):
        AutoModelForCausalLM.from_pretrained(tmp_path / method / "final")
    # resume from a ZeRO checkpoint continues as the uninterrupted run
    assert res["resume_resumed"][2:] == pytest.approx(res["resume_full"][2:], rel=1e-6)
    assert (tmp_path / "resume" / "checkpoint-2").is_dir()
    assert "precompute_ref_log_probs is not supported with 2 processes under DeepSpeed" in res["precompute_error"]


def test_alignkit_train_launches_two_processes_under_zero3(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "alignkit.cli", "train", str(ROOT / "recipes" / "quickstart.yaml"),
           "--set", "distributed.num_processes=2", "--set", "distributed.deepspeed=zero3", "--set", "max_steps=2",
           "--set", "eval_strategy=no", "--set", "eval_on_start=false", "--set", f"output_dir={out}",
           "--set", "distributed.main_process_port=29543"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"]["train_runtime"] > 0
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)
