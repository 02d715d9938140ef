"""How jobs start and end on several processes and machines: two `alignkit train` invocations as two machines,
the other launchers users have (accelerate, deepspeed, SLURM's srun), and a job whose worker dies or whose peer never
arrives ending with one line instead of hanging."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.ports import free_port, free_ports

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "recipes" / "quickstart.yaml")
PPO = str(ROOT / "recipes" / "ppo-fdiv.yaml")


def _env(**extra):
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}


def _train(recipe, *sets, timeout=600, **popen):
    cmd = [sys.executable, "-m", "alignkit.cli", "train", recipe]
    for s in sets:
        cmd += ["--set", s]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), **popen)


def _losses(out: Path) -> list[float]:
    return [e["loss"] for e in json.loads((out / "metrics.json").read_text())["log_history"] if "loss" in e]


#: recipe settings that make the runs short: no evaluation, a few steps
SHORT = {"fdpo": ["max_steps=3", "logging_steps=1", "eval_strategy=no", "eval_on_start=false"],
         "ppo": ["max_steps=3", "logging_steps=1", "num_ppo_epochs=2", "top_k=1", "num_sample_generations=0"]}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The short f-DPO quickstart in one process with the global batch of the multi-process runs below (8 rows)."""
    out = tmp_path_factory.mktemp("one_process") / "run"
    job = _train(QUICKSTART, *SHORT["fdpo"], "per_device_train_batch_size=8", f"output_dir={out}")
    _, err = job.communicate(timeout=600)
    assert job.returncode == 0, err[-4000:]
    return out


@pytest.mark.parametrize("method,recipe", [("fdpo", QUICKSTART), ("ppo", PPO)])
def test_two_machines_on_one_host_train_as_one_process(method, recipe, tmp_path, tiny_model_path, one_process):
    """Two `alignkit train` invocations, machine_rank 0 and 1 of num_machines 2 (one process each, gloo over
    127.0.0.1), form one job: its losses and saved weights are those of one process with the same global batch (8
    rows or prompts: 4 per machine). f-DPO runs under DeepSpeed ZeRO-3 (launched by `alignkit train` itself), PPO
    under plain DDP with greedy rollouts (`top_k: 1`, so that the samples do not depend on which rank drew them).
    Measured: the f-DPO losses equal, the PPO losses within 1.0e-6 absolute (they are near 0); the weights within
    5e-6 (f-DPO, lr 1e-3) and 3.1e-5 (PPO, lr 1e-2) of one process, the norm of the difference 1.0e-5 and 9e-6 of the
    norm of the update. Training on half the batch instead (what a machine without the gradient exchange does) is off
    by 3.7e-3 (f-DPO, step 2) and 3e-2 (PPO, step 1) in the loss and by 6e-3 and 0.11 in the weights (measured: one
    process on batches of 4)."""
    batch, port = "per_device_train_batch_size", free_port()
    one = one_process if method == "fdpo" else tmp_path / "one"
    single = None if method == "fdpo" else _train(recipe, *SHORT[method], f"{batch}=8", f"output_dir={one}")
    dist = ["distributed.num_machines=2", "distributed.main_process_ip=127.0.0.1",
            f"distributed.main_process_port={port}", "distributed.timeout=120", f"{batch}=4",
            f"output_dir={tmp_path / 'two'}"] + (["distributed.deepspeed=zero3"] if method == "fdpo" else [])
    machines = [_train(recipe, *SHORT[method], *dist, f"distributed.machine_rank={m}") for m in (0, 1)]
    errs = []
    for p in ([single] if single else []) + machines:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-4000:]
        errs.append(err)
    assert "on machine 1 of 2" in errs[-1]
    two = tmp_path / "two"
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-5, abs=1e-5)
    summary = json.loads((two / "metrics.json").read_text())["distributed"]
    assert summary["world_size"] == 2 and summary["deepspeed_zero_stage"] == (3 if method == "fdpo" else None)
    assert len(summary["peak_memory_gb_per_rank"]) == 2
    assert json.loads((two / "alignkit_run.json").read_text())["status"] == "complete"
    # a tenth of the learning rate: a lost or doubled update moves weights by about the learning rate
    _assert_same_weights(two, one, tiny_model_path, max_abs=1e-4 if method == "fdpo" else 1e-3)


def _assert_same_weights(ours_dir, ref_dir, init_dir, max_abs, max_rel=1e-3):
    """The saved weights agree with the reference run's: everywhere within `max_abs`, and the norm of the difference
    within `max_rel` of the norm of what training moved (Adam scales each entry's step by its own gradient's size, so
    an entry whose gradient is rounding noise can differ by a visible amount; the norm stays small)."""
    from transformers import AutoModelForCausalLM

    ours, ref, init = (AutoModelForCausalLM.from_pretrained(d).state_dict() for d in (ours_dir, ref_dir, init_dir))
    diff = max((ours[k] - ref[k]).abs().max().item() for k in ref)
    rel = sum((ours[k] - ref[k]).square().sum().item() for k in ref) ** 0.5 / \
        sum((ref[k] - init[k]).square().sum().item() for k in ref) ** 0.5
    assert diff < max_abs and rel < max_rel, (diff, rel)


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass
    return found


def _local_rank(pid: int) -> int | None:
    try:
        env = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((int(v.split(b"=", 1)[1]) for v in env if v.startswith(b"LOCAL_RANK=")), None)


def test_a_killed_worker_ends_the_job_with_one_line(tmp_path):
    """A worker killed in the middle of training (SIGKILL, as the kernel's OOM killer does) ends the whole job: the
    launcher stops the other worker, prints one line naming the rank and the signal (no traceback), exits 1, and the
    run's status says failed. Without the launcher's watch the other rank would wait in its next all-reduce for the
    30-minute default timeout."""
    out = tmp_path / "run"
    job = _train(QUICKSTART, "distributed.num_processes=2", "max_steps=100000", "eval_strategy=no",
                 "eval_on_start=false", "distributed.timeout=60", f"output_dir={out}")
    deadline = time.time() + 300
    workers = []
    while time.time() < deadline and job.poll() is None:
        status = out / "alignkit_run.json"
        if status.is_file() and "running" in status.read_text():
            workers = {_local_rank(p): p for p in _children(job.pid)}
            if 1 in workers:
                break
        time.sleep(0.5)
    assert 1 in workers, job.communicate()[1][-3000:]
    time.sleep(2)  # in the middle of a step
    os.kill(workers[1], signal.SIGKILL)
    killed = time.time()
    _, err = job.communicate(timeout=120)
    assert job.returncode == 1 and time.time() - killed < 60, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("alignkit: error: the job stopped: rank 1 of 2 was killed by SIGKILL"), last
    assert f"tracebacks in {out / 'logs'}" in last
    assert json.loads((out / "alignkit_run.json").read_text())["status"] == "failed"


def test_a_machine_whose_peer_never_arrives_gives_up_after_the_timeout(tmp_path):
    """Machine 0 without machine 1, and machine 1 without machine 0 (two separate jobs, run side by side), each wait
    `distributed.timeout` seconds, then end with one line that says what to start or check, instead of waiting
    forever."""
    jobs = {rank: _train(QUICKSTART, "distributed.num_machines=2", f"distributed.machine_rank={rank}",
                         "distributed.main_process_ip=127.0.0.1", f"distributed.main_process_port={port}",
                         "distributed.timeout=5", f"output_dir={tmp_path / f'run{rank}'}")
            for rank, port in enumerate(free_ports(2))}
    start = time.time()
    for rank, job in jobs.items():
        _, err = job.communicate(timeout=300)
        assert job.returncode == 1, err[-3000:]
        assert "Traceback" not in err, err[-3000:]
        last = err.strip().splitlines()[-1]
        expected = "machine 0 waited 5 s at 127.0.0.1" if rank == 0 else \
            "machine 1 could not join machine 0 at 127.0.0.1"
        assert last.startswith(f"alignkit: error: {expected}"), last
    assert time.time() - start < 120


def test_the_slurm_example_starts_one_alignkit_per_node_that_meet_at_the_first(tmp_path):
    """examples/slurm/alignkit.sbatch under a stand-in for SLURM (srun runs its command once per node with that
    node's SLURM_NODEID; scontrol lists the job's hosts), with --dry-run: each node's `alignkit train` would start
    torchrun as machine <node id> of 2, 8 processes each, meeting at the first host."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/bin/bash\n[ "$1 $2" = "show hostnames" ] && printf "gpu-a01\\ngpu-a02\\n"\n')
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\n'
                                  'for node in 0 1; do SLURM_NODEID=$node "$@" || exit $?; done\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = _env(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="gpu-a[01-02]", SLURM_NNODES="2",
               GPUS_PER_NODE="8", ALIGNKIT_ARGS="--dry-run", ALIGNKIT=f"{sys.executable} -m alignkit.cli")
    proc = subprocess.run(["bash", str(ROOT / "examples" / "slurm" / "alignkit.sbatch"), QUICKSTART, "--set",
                           "distributed.deepspeed=zero3", "--set", "beta=0.2"], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2, proc.stdout
    for node, line in enumerate(lines):
        for part in ("torch.distributed.run", "--nproc_per_node=8", "--nnodes=2", f"--node_rank={node}",
                     "--master_addr=gpu-a01", "--master_port=29500", "ACCELERATE_USE_DEEPSPEED=true",
                     "--set distributed.deepspeed=zero3", "--set beta=0.2"):
            assert part in line, (part, line)


LAUNCHERS = {
    # accelerate's own config names DeepSpeed (ZeRO-2, recipes/deepspeed/zero2.json) and 2 processes; the recipe has
    # no distributed section
    "accelerate": ["accelerate", "launch", "--config_file", str(ROOT / "examples" / "launchers" /
                                                                   "accelerate_zero2.yaml"),
                   "--main_process_port", "{port}", "-m", "alignkit.cli", "train", QUICKSTART],
    # DeepSpeed's launcher starts 2 processes (--num_gpus, processes on a CPU); the recipe names the ZeRO stage
    "deepspeed": ["deepspeed", "--num_gpus", "2", "--master_port", "{port}", "--module", "alignkit.cli", "train",
                  QUICKSTART, "--set", "distributed.deepspeed=zero3"],
}


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_other_launchers_run_alignkit_train(launcher, tmp_path, tiny_model_path, one_process):
    """`accelerate launch` and the `deepspeed` launcher start `alignkit train` on 2 processes under DeepSpeed (on a
    CPU too: the worker sets up accelerate's gloo state itself), and the job trains as one process with the same
    global batch. Measured: losses equal, weights as in the two-machine test."""
    cmd = [a.format(port=free_port()) if a == "{port}" else a for a in LAUNCHERS[launcher]]
    cmd = [str(Path(sys.executable).parent / cmd[0])] + cmd[1:]
    for s in SHORT["fdpo"] + ["per_device_train_batch_size=4", f"output_dir={tmp_path / 'run'}"]:
        cmd += ["--set", s]
    # from the repository's root, as a user would: the accelerate config names the DeepSpeed JSON by a relative path
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = tmp_path / "run"
    summary = json.loads((out / "metrics.json").read_text())["distributed"]
    assert summary["world_size"] == 2 and summary["deepspeed_zero_stage"] == (2 if launcher == "accelerate" else 3)
    assert _losses(out) == pytest.approx(_losses(one_process), rel=1e-5, abs=1e-5)
    _assert_same_weights(out, one_process, tiny_model_path, max_abs=1e-4)


def test_a_worker_stopped_while_recording_its_failure_leaves_no_half_written_error_file(tmp_path, monkeypatch):
    """Seen in CI: the agent stopped rank 0 (SIGTERM) while rank 0 was writing its error file after rank 1 was killed;
    the agent then read the empty file and crashed with a JSONDecodeError traceback. The file now appears whole or not
    at all (written beside it, then renamed)."""
    from alignkit.run import launch as distributed

    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt  # the SIGTERM arriving between the write and the rename

    monkeypatch.setattr(distributed.os, "replace", stopped)
    with pytest.raises(KeyboardInterrupt):
        try:
            raise ValueError("boom")
        except ValueError as exc:
            distributed.record_worker_failure(exc)
    assert not error_file.exists()
    monkeypatch.undo()
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    try:
        raise ValueError("boom")
    except ValueError as exc:
        distributed.record_worker_failure(exc)
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    failure = ProcessFailure(local_rank=0, pid=1, exitcode=1, error_file=str(error_file))
    assert failure.message["message"] == "ValueError: boom" and "boom" in failure.message["extraInfo"]["py_callstack"]
    assert [p.name for p in tmp_path.iterdir()] == ["error.json"]


def test_an_agent_that_fails_on_its_own_ends_the_job_with_one_line(tmp_path, monkeypatch):
    """Whatever else breaks inside torchrun's agent while it watches the workers ends in one line naming the cause and
    the log that holds the traceback, not in the agent's traceback."""
    import torch.distributed.run

    from alignkit.run import launch as distributed
    from alignkit.run.recipe import DistributedSection

    def broken(args):
        raise json.JSONDecodeError("Expecting value", "", 0)

    monkeypatch.setattr(torch.distributed.run, "run", broken)
    with pytest.raises(distributed.LaunchError) as caught:
        distributed.run_workers(DistributedSection(num_processes=2), "r.yaml", [], tmp_path / "logs")
    line = str(caught.value)
    assert "\n" not in line and "JSONDecodeError" in line and str(tmp_path / "logs") in line, line
    assert "Traceback" in next((tmp_path / "logs").iterdir()).read_text()
