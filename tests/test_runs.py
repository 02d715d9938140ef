"""Runs of `alignkit train`: determined by `seed`, never overwrite another run, resume exactly."""

import json
from pathlib import Path

import torch

from alignkit.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _metrics(out: Path) -> list[dict]:
    """The logged metrics of a run, without the wall-clock ones."""
    history = json.loads((out / "metrics.json").read_text())["log_history"]
    return [{k: v for k, v in e.items() if not k.startswith(("time/", "perf/")) and "runtime" not in k and "per_second" not in k}
            for e in history]


def test_ppo_recipe_is_determined_by_its_seed(tmp_path, monkeypatch):
    # The first run builds the built-in model (a fresh cache), the second finds it cached; the global RNG is
    # moved differently before each. Both must give the same metrics: everything random is created after
    # seeding (the value head was initialised before, and building the model moved the RNG).
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))
    runs = []
    for i in range(2):
        torch.manual_seed(100 + i)
        out = tmp_path / f"run{i}"
        assert main(["train", str(ROOT / "recipes" / "ppo-fdiv.yaml"), "--set", f"output_dir={out}",
                     "--set", "max_steps=4", "--set", "logging_steps=1"]) == 0
        runs.append(_metrics(out))
    assert runs[0] == runs[1]
    assert len(runs[0]) >= 4


def test_ppo_recipe_evaluates_and_a_failing_evaluation_keeps_the_trained_model(tmp_path, monkeypatch):
    from alignkit import PPOTrainer

    ppo = [str(ROOT / "recipes" / "ppo-fdiv.yaml"), "--set", "max_steps=2", "--set", "dataset.eval_split=test",
           "--set", "dataset.max_eval_samples=8"]
    out = tmp_path / "ok"
    assert main(["train", *ppo, "--set", f"output_dir={out}"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval"]["eval_samples"] == 8 and "eval_objective/scores" in metrics["eval"]

    def broken(self, *args, **kwargs):
        raise RuntimeError("evaluation failed on purpose")

    monkeypatch.setattr(PPOTrainer, "evaluate", broken)
    out = tmp_path / "failed"
    assert main(["train", *ppo, "--set", f"output_dir={out}"]) == 1  # one line and a log (the error boundary)
    assert (out / "model.safetensors").is_file() and (out / "value_model" / "model.safetensors").is_file()
    status = json.loads((out / "alignkit_run.json").read_text())
    assert status["status"] == "failed" and status["model_saved"] is True


QUICK = ["--set", "max_steps=4", "--set", "eval_strategy=no", "--set", "eval_on_start=false",
         "--set", "dataset.builtin_kwargs={num_samples: 64}"]


def _quickstart(out, *extra):
    return main(["train", str(ROOT / "recipes" / "quickstart.yaml"), "--set", f"output_dir={out}", *QUICK, *extra])


def test_reusing_an_output_dir_is_refused_unless_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    assert _quickstart(out, "--set", "save_strategy=steps", "--set", "save_steps=2") == 0
    first = (out / "model.safetensors").read_bytes()
    capsys.readouterr()
    # a second run into the same folder would overwrite the first one's model and checkpoints: refused
    assert _quickstart(out, "--set", "seed=1") == 2
    err = capsys.readouterr().err
    assert "holds another run" in err and "overwrite_output_dir: true" in err and "Traceback" not in err
    assert (out / "model.safetensors").read_bytes() == first
    # said so: the earlier run is replaced, its checkpoints too (so `resume_from_checkpoint: true` cannot pick
    # one of them up later)
    assert _quickstart(out, "--set", "seed=1", "--set", "overwrite_output_dir=true") == 0
    assert not list(out.glob("checkpoint-*"))
    assert (out / "model.safetensors").read_bytes() != first
    assert json.loads((out / "alignkit_run.json").read_text())["status"] == "complete"


def test_a_failure_after_training_keeps_the_model_and_marks_the_run(tmp_path, monkeypatch):
    from alignkit import FDPOTrainer

    def broken_evaluate(self, *args, **kwargs):
        raise RuntimeError("evaluation broke")

    monkeypatch.setattr(FDPOTrainer, "evaluate", broken_evaluate)
    out = tmp_path / "run"
    assert main(["train", str(ROOT / "recipes" / "quickstart.yaml"), "--set", f"output_dir={out}", "--set",
                 "max_steps=2", "--set", "eval_strategy=no", "--set", "eval_on_start=false"]) == 1
    status = json.loads((out / "alignkit_run.json").read_text())
    assert status["status"] == "failed" and status["model_saved"] and "evaluation broke" in status["error"]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)  # the trained model survived


def test_deepspeed_with_one_process_is_applied_not_ignored(capsys):
    code = main(["train", str(ROOT / "recipes" / "quickstart.yaml"), "--set", "distributed.deepspeed=zero2",
                 "--dry-run"])
    assert code == 0
    out = capsys.readouterr().out
    assert "--nproc_per_node=1" in out and "ACCELERATE_USE_DEEPSPEED=true" in out


def test_resume_after_ctrl_c_gives_the_uninterrupted_model(tmp_path):
    """`alignkit train` is interrupted with SIGINT (Ctrl-C) after its first checkpoint; the same command with
    resume_from_checkpoint=true finishes the run, and the final model equals an uninterrupted run's."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    args = ["--set", "max_steps=120", "--set", "per_device_train_batch_size=4", "--set", "save_strategy=steps",
            "--set", "save_steps=10", "--set", "eval_strategy=no", "--set", "eval_on_start=false",
            "--set", "logging_steps=5"]
    recipe = str(ROOT / "recipes" / "quickstart.yaml")
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["train", recipe, "--set", f"output_dir={full}", *args]) == 0

    # SIGINT's default handler in the child, whatever the test runner inherited: a shell that starts a job in the
    # background sets SIGINT to "ignore", and Python then installs no KeyboardInterrupt handler at all.
    proc = subprocess.Popen([sys.executable, "-m", "alignkit.cli", "train", recipe, "--set", f"output_dir={part}",
                             *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while not (part / "checkpoint-10" / "trainer_state.json").exists():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() is not None else ""
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "resume_from_checkpoint: true" in err, err
    status = json.loads((part / "alignkit_run.json").read_text())
    assert status["status"] == "interrupted" and status["step"] < 120
    assert not (part / "model.safetensors").exists()  # nothing that could pass for a finished model

    assert main(["train", recipe, "--set", f"output_dir={part}", *args, "--set", "resume_from_checkpoint=true"]) == 0
    status = json.loads((part / "alignkit_run.json").read_text())
    assert status["status"] == "complete" and status["resumed_from"].startswith(str(part / "checkpoint-"))
    a, b = load_file(full / "model.safetensors"), load_file(part / "model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)
    # metrics.json of the resumed run covers the whole run, from the first logged step
    steps = [e["step"] for e in json.loads((part / "metrics.json").read_text())["log_history"] if "loss" in e]
    assert steps == list(range(5, 121, 5)), steps

    # resuming the finished run again is a no-op that says so (it trained one step past max_steps, changing the
    # weights, before issue 29)
    before = (part / "model.safetensors").read_bytes(), (part / "alignkit_run.json").read_text()
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["train", recipe, "--set", f"output_dir={part}", *args, "--set", "resume_from_checkpoint=true"]) == 0
    assert "holds a finished run" in err.getvalue() and "nothing was trained" in err.getvalue(), err.getvalue()
    assert ((part / "model.safetensors").read_bytes(), (part / "alignkit_run.json").read_text()) == before


def test_train_output_is_quiet_and_readable(tmp_path):
    """One bar for training and one for evaluation, a line per dataset split, metrics as tables on stdout, no
    third-party chatter (DeepSpeed's accelerator line on stdout, dataset-map and weight-loading bars), and a
    model card that names the real base model."""
    import os
    import re
    import subprocess
    import sys

    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "alignkit.cli", "train", str(ROOT / "recipes" / "quickstart.yaml"),
                           "--set", f"output_dir={out}", "--set", "max_steps=4", "--set", "eval_steps=4",
                           "--set", "logging_steps=2"], capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"})
    assert proc.returncode == 0, proc.stderr
    stdout, stderr = proc.stdout, proc.stderr.replace("\r", "\n")
    assert "accelerator" not in stdout.lower() and "{'loss'" not in stdout
    assert re.search(r"^\[train\] step 2/4", stdout, re.M) and re.search(r"^\[eval\] step 4/4", stdout, re.M)
    assert re.search(r"^  loss +\d", stdout, re.M)
    bars = {m.group(1) for m in re.finditer(r"^(\w[\w ]*?):\s+\d+%\|", stderr, re.M)}
    assert bars == {"train", "eval"}, bars
    for noise in ("Tokenizing", "Loading weights", "Map", "LOAD REPORT", "Writing model shards"):
        assert noise not in stderr, noise
    assert "[alignkit] train dataset: 512 rows prepared" in stderr
    card = (out / "README.md").read_text()
    assert "fine-tuned version of `builtin:tiny-llama`" in card and "None" not in card, card
    assert f'model="{out}"' in card


def test_a_second_run_into_an_output_dir_in_use_is_refused(tmp_path):
    """Two `alignkit train` into one folder at once: the second is refused with the first one's pid, even with
    overwrite_output_dir (before, both passed the reuse check, both trained, and the last writer won). The lock is
    the operating system's, so it goes with the process that held it: once the first run has ended (here, killed),
    the folder can be used again."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    recipe = str(ROOT / "recipes" / "quickstart.yaml")
    first = subprocess.Popen([sys.executable, "-m", "alignkit.cli", "train", recipe, "--set", f"output_dir={out}",
                              "--set", "max_steps=100000", "--set", "eval_strategy=no", "--set", "eval_on_start=false"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not ((out / "alignkit_run.json").is_file() and "running" in (out / "alignkit_run.json").read_text()):
            assert first.poll() is None and time.time() < deadline, first.stderr.read() if first.poll() else ""
            time.sleep(0.2)
        import contextlib
        import io

        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main(["train", recipe, "--set", f"output_dir={out}", "--set", "overwrite_output_dir=true",
                         *QUICK])
        assert code == 2 and f"pid {first.pid}" in err.getvalue() and "in use by another alignkit run" in \
            err.getvalue(), err.getvalue()
        assert first.poll() is None  # the first run was left alone
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    assert _quickstart(out, "--set", "overwrite_output_dir=true") == 0  # the dead run's lock went with it
    assert json.loads((out / "alignkit_run.json").read_text())["status"] == "complete"
    assert not (out / ".alignkit.lock.json").exists()  # the holder's record goes with the lock


def test_a_save_that_fails_marks_the_run_failed_and_leaves_no_temp_folder(tmp_path, monkeypatch, capsys):
    """A full disk (ENOSPC) in the middle of the final save: the run says failed (not "running"), names the error,
    and the half-written temporary folder is gone; the earlier files of the folder are untouched."""
    import errno

    from alignkit import FDPOTrainer

    real_save = FDPOTrainer.save_model

    def full_disk(self, output_dir=None, _internal_call=False):
        real_save(self, output_dir, _internal_call)  # the files are written, then the disk fills up
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(FDPOTrainer, "save_model", full_disk)
    out = tmp_path / "run"
    assert _quickstart(out) == 1
    status = json.loads((out / "alignkit_run.json").read_text())
    assert status["status"] == "failed" and "No space left" in status["error"], status
    assert not (out / ".alignkit-saving").exists()
    assert not (out / "model.safetensors").exists()  # nothing that could pass for the finished model
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err


def test_a_run_whose_weights_turn_non_finite_stops_there_and_is_never_complete(tmp_path, capsys):
    """learning_rate 1e30 (finite, so validate passes) makes the tiny model's weights NaN at step 2. `alignkit train`
    stops at that optimizer step with one line naming it, saves no final model and no later checkpoint, keeps the
    finite checkpoint of step 1, and marks the run failed (before, it trained on, saved NaN weights, and failed only
    later in evaluation, or said complete)."""
    out = tmp_path / "run"
    code = _quickstart(out, "--set", "learning_rate=1e30", "--set", "save_strategy=steps", "--set", "save_steps=1",
                       "--set", "max_steps=6")
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    line = [e for e in err.splitlines() if e.startswith("alignkit: error:")]
    assert len(line) == 1 and "step 2" in line[0] and "non-finite" in line[0] and "checkpoint-1" in line[0], err
    status = json.loads((out / "alignkit_run.json").read_text())
    assert status["status"] == "failed" and status["step"] == 2 and status["latest_checkpoint"] == "checkpoint-1"
    assert not (out / "model.safetensors").exists()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]


def test_online_groups_that_skip_every_prompt_train_nothing_and_say_so(tmp_path, capsys):
    """A min_reward_spread above any spread of the reward skips every prompt: nothing is trained. `alignkit train`
    says so in one line, saves no model and marks the run failed (it exited 0 with zero updates)."""
    out = tmp_path / "run"
    (tmp_path / "r.yaml").write_text(
        "method: online_mdpo\nmodel: {name_or_path: builtin:tiny-llama, dtype: float32}\n"
        "dataset: {name: builtin:sentiment, builtin_kwargs: {num_samples: 32}}\n"
        "reward: {function: builtin:sentiment}\nnum_generations: 2\nper_device_train_batch_size: 4\n"
        "max_completion_length: 4\nmax_steps: 2\nmin_reward_spread: 1000.0\nreport_to: none\nsave_strategy: 'no'\n"
        f"output_dir: {out}\n")
    assert main(["train", str(tmp_path / "r.yaml")]) == 1
    line = [e for e in capsys.readouterr().err.splitlines() if e.startswith("alignkit: error:")]
    assert len(line) == 1 and "min_reward_spread" in line[0] and "nothing was trained" in line[0], line
    assert json.loads((out / "alignkit_run.json").read_text())["status"] == "failed"
    assert not (out / "model.safetensors").exists()
