"""What the cached real-model reproductions share (table31_real.py, label_noise_real.py): results cached by their
settings, one small JSON per finished run with its command, date and versions; worker processes `--jobs` at a time
with one progress bar; LoRA preference training of SmolLM2 on groups or pairs, scored along the way; bootstrap
intervals and verdicts for the reports."""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import count, setup  # noqa: E402

MODEL = "builtin:smollm2-135m-instruct"
#: loss type and samples per side of each method; groups of one are exactly TRL's DPO and IPO
METHODS = {"DPO": ("sigmoid", 1), "IPO": ("ipo", 1), "mDPO": ("sigmoid", 4), "mIPO": ("ipo", 4)}
RESAMPLES = 2000


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


def versions() -> dict:
    import torch
    import transformers
    import trl

    return {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
            "python": platform.python_version()}


def write_json(path: Path, obj) -> None:
    """Written whole or not at all (a temporary file, then a rename), so an interrupted run leaves no half result."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    if path.suffix == ".gz":
        with gzip.open(tmp, "wt") as f:
            json.dump(obj, f)
    else:
        tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def read_json(path: Path):
    if path.suffix == ".gz":
        with gzip.open(path, "rt") as f:
            return json.load(f)
    return json.loads(path.read_text())


def stamp(result: dict, command: str, started: float) -> dict:
    """A run's provenance: its command, date, wall time, torch threads and package versions."""
    import torch

    result.update(wall_seconds=time.time() - started, versions=versions(), threads=torch.get_num_threads(),
                  date=datetime.now(timezone.utc).isoformat(timespec="seconds"), command=command)
    return result


def load_base():
    """SmolLM2's folder, the model in eval mode and its tokenizer."""
    from transformers import AutoModelForCausalLM

    path, tok = tokenizer()
    return path, AutoModelForCausalLM.from_pretrained(path).eval(), tok


def tokenizer():
    from transformers import AutoTokenizer

    from alignkit.models import resolve_model_path

    path = resolve_model_path(MODEL)
    return path, AutoTokenizer.from_pretrained(path)


def _callback_base():
    from transformers import TrainerCallback

    return TrainerCallback


class ScoreAlong(_callback_base()):
    """Scores the model in training at the steps `at` (`score(model) -> dict`), into `curve`, with the training time
    so far: the process's CPU time in training steps, which excludes the scoring (and, with one torch thread, any
    other work on the machine). `completions(step)` gives the completions seen by then."""

    def __init__(self, at, score: Callable, completions: Callable[[int], int]):
        self.at, self.score, self.completions = set(at), score, completions
        self.clock, self.started, self.curve = 0.0, None, []

    def on_step_begin(self, args, state, control, **kw):
        self.started = time.process_time()

    def on_step_end(self, args, state, control, model=None, **kw):
        import torch

        self.clock += time.process_time() - self.started
        if state.global_step in self.at:
            model = getattr(model, "policy", model)  # PPO's wrapper holds the policy beside the value model
            was_training = model.training
            model.eval()
            with torch.no_grad():
                scores = self.score(model)
            model.train(was_training)
            losses = [h["loss"] for h in state.log_history if "loss" in h]
            self.curve.append({"step": state.global_step, "completions": self.completions(state.global_step),
                               "train_seconds": self.clock, "loss": losses[-1] if losses else None, **scores})


def train_and_score(s: dict, method: str, seed: int, data: list[dict], score: Callable) -> dict:
    """LoRA training of SmolLM2 with `method` (METHODS) on `data` (prompt, chosen and rejected lists of
    `s["group_size"]`; pair methods train on them cut into pairs, the i-th chosen against the i-th rejected), the
    same completions per step for every method; `score(model, tok)` at `s["eval_points"]` points of training.

    Training time is the process's CPU time in training steps, not the wall clock: with one torch thread it is the
    training's compute, and other work on the machine (or a paused process) does not add to it."""
    import tempfile

    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    from alignkit import MultiSampleDPOConfig, MultiSampleDPOTrainer

    base_path, tok = tokenizer()
    loss_type, k = METHODS[method]
    if k == 1:
        data = [{"prompt": r["prompt"], "chosen": [c], "rejected": [j]}
                for r in data for c, j in zip(r["chosen"], r["rejected"])]
    batch = s["prompts_per_step"] * s["group_size"] // k  # the same completions per step for every method
    steps = len(data) * s["epochs"] // batch
    at = sorted({round(steps * i / s["eval_points"]) for i in range(1, s["eval_points"] + 1)})
    scores = ScoreAlong(at, lambda model: score(model, tok), lambda step: step * batch * 2 * k)
    with tempfile.TemporaryDirectory() as out:
        args = MultiSampleDPOConfig(
            output_dir=out, loss_type=loss_type, beta=s["beta"], nll_weight=s["nll_weight"], learning_rate=s["lr"],
            per_device_train_batch_size=batch, num_train_epochs=s["epochs"], lr_scheduler_type="constant",
            shared_prefix=True, gradient_checkpointing=False, report_to=[], save_strategy="no",
            logging_steps=max(steps // 10, 1), disable_tqdm=True, seed=seed)
        trainer = MultiSampleDPOTrainer(
            model=AutoModelForCausalLM.from_pretrained(base_path), args=args, train_dataset=Dataset.from_list(data),
            processing_class=tok, callbacks=[scores],
            peft_config=LoraConfig(r=s["lora_r"], lora_alpha=2 * s["lora_r"], target_modules="all-linear",
                                   task_type="CAUSAL_LM"))
        trainer.train()
    return {"steps": steps, "curve": scores.curve, "log": [h for h in trainer.state.log_history if "loss" in h]}


def run_units(script: str, todo: list[tuple[str, int]], ready: Callable[[tuple[str, int]], bool], jobs: int,
              threads: int | None, extra: list[str], desc: str) -> None:
    """Run `script --unit NAME SEED` for every unit in `todo`, `jobs` at a time in worker processes, a unit only once
    `ready(unit)` (e.g. its seed's data exists); one bar with the time left. A failed unit stops the rest after the
    running ones finish: start again to resume."""
    from tqdm.auto import tqdm

    todo = list(todo)
    bar = tqdm(total=len(todo), desc=desc, unit="run")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads or 1)}
    running: list[tuple[subprocess.Popen, tuple]] = []
    while todo or running:
        while len(running) < jobs and any(ready(u) for u in todo):
            u = next(u for u in todo if ready(u))
            todo.remove(u)
            cmd = [sys.executable, script, "--unit", u[0], str(u[1]), "--threads", str(threads or 1)] + extra
            running.append((subprocess.Popen(cmd, env=env), u))
        if not running:
            raise SystemExit(f"nothing can start: {todo} wait for a unit that is not planned")
        while not any(p.poll() is not None for p, _ in running):
            time.sleep(2)
        proc, u = next((p, u) for p, u in running if p.poll() is not None)
        running.remove((proc, u))
        if proc.returncode:
            for p, _ in running:
                p.wait()
            raise SystemExit(f"run {u} failed ({proc.returncode}); start again to resume")
        bar.update(1)
        bar.set_postfix_str(f"{u[0]} seed {u[1]} done")
    bar.close()


def bootstrap(per_seed: list[list[float]], seed: int = 0) -> tuple[float, float, float]:
    """Mean and 95% percentile interval, resampling seeds and then prompts within each drawn seed."""
    rng = random.Random(seed)
    mean = statistics.mean(v for s in per_seed for v in s)
    stats = []
    for _ in range(RESAMPLES):
        vals = []
        for s in (rng.choice(per_seed) for _ in per_seed):
            vals += [s[rng.randrange(len(s))] for _ in s]
        stats.append(statistics.mean(vals))
    stats.sort()
    return mean, stats[int(0.025 * RESAMPLES)], stats[int(0.975 * RESAMPLES) - 1]


#: two-sided 95% quantiles of Student's t by degrees of freedom (scipy.stats.t.ppf(0.975, df), to 3 decimals)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def t_interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and 95% t-interval over seeds, for a figure stored once per run (no prompts to resample); with one
    value the interval is unbounded."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, float("-inf"), float("inf")
    half = T975[len(values) - 1] * statistics.stdev(values) / len(values) ** 0.5
    return mean, mean - half, mean + half


def win(x: float, y: float) -> float:
    return 1.0 if x > y else 0.5 if x == y else 0.0


def verdict(lo: float, hi: float, thesis: float, seeds: int, moving: bool, null: float = 0.5) -> str:
    """A win rate's verdict from its 95% interval: decided only with 3 seeds, and only where the interval excludes
    `null` (0.5; 0 for a difference). `thesis` above `null` claims a win, below it a loss (a claim of "no difference"
    is the caller's to judge)."""
    if seeds < 3:
        return f"too few seeds yet ({seeds} of 3)"
    if lo > null or hi < null:
        out = "reproduced" if (lo > null) == (thesis > null) else "not reproduced (the reverse holds)"
    else:
        out = f"inconclusive at this scale (the interval holds {null:g})"
    return out + ("; the runs were still moving at the end" if moving else "")


def fmt(m, lo, hi) -> str:
    return f"{m:.2f} ({lo:.2f}, {hi:.2f})"


def point(run: dict, at_seconds: float | None = None) -> dict:
    """The last scored point, or the one whose training time is nearest `at_seconds`."""
    if at_seconds is None:
        return run["curve"][-1]
    return min(run["curve"], key=lambda c: abs(c["train_seconds"] - at_seconds))


ROOT = Path(__file__).resolve().parents[2]


def unit_lock(folder: Path, name: str, seed: int) -> Path:
    """The lock a worker holds while it trains a unit, outside the results folder (nothing to commit by mistake)."""
    import tempfile

    key = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:12]
    path = Path(tempfile.gettempdir()) / "alignkit-study-locks" / key / f"{name}-{seed}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def study_main(argv, *, doc: str, name: str, script: str, settings: dict, quick: dict, unit_file: Callable,
               run_unit: Callable, plan: Callable, report: Callable, add_arguments: Callable | None = None) -> int:
    """The command line every cached study shares: `--seeds`, `--jobs`, `--threads`, `--quick`, `--output`,
    `--report` and the workers' hidden `--unit NAME SEED`; the study's own options come from `add_arguments(parser)`.

    Results go to docs/results/<name>/<settings hash>/ (the smoke run's to outputs/<name>-quick/). `plan(args,
    settings)` lists the (unit, seed) pairs of a full run, in order; a unit other than `base` or `data` waits for
    its seed's `data` unit when the plan has one; `report(folder, args, settings)` gives the tables."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--seeds", type=count, default=3)
    if add_arguments:
        add_arguments(p)
    p.add_argument("--jobs", type=count, default=1, help="runs at a time, in worker processes")
    p.add_argument("--threads", type=count, default=None, help="torch threads per run (default 1)")
    p.add_argument("--quick", action="store_true", help="a smoke run on a few examples, 1 seed")
    p.add_argument("--output", default=None, help=f"folder of the cached results (default docs/results/{name})")
    p.add_argument("--report", action="store_true", help="only the tables, from the cached results")
    p.add_argument("--rerun", nargs=2, metavar=("NAME", "SEED"),
                   help="train one committed run again, beside the others in a scratch folder, and print the tables "
                        "with it in place of the committed one (checks that a row reproduces)")
    p.add_argument("--unit", nargs=2, metavar=("NAME", "SEED"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    s = quick if a.quick else settings
    root = Path(a.output) if a.output else ROOT / (f"outputs/{name}-quick" if a.quick else f"docs/results/{name}")
    if root.exists() and not root.is_dir():
        p.error(f"--output: {root} is a file; give a folder for the cached results")
    if a.rerun:
        names = sorted({u for u, _ in plan(a, s)})
        if a.rerun[0] not in names or not a.rerun[1].isdigit():
            p.error(f"--rerun: give one of {', '.join(names)} and a seed number (got {' '.join(a.rerun)})")
    folder = root / settings_hash(s)
    setup(a.threads or 1)
    if a.unit:
        from filelock import FileLock

        unit, seed = a.unit[0], int(a.unit[1])
        # a second runner of the same study (another terminal) waits for the unit instead of training it again
        with FileLock(str(unit_lock(folder, unit, seed))):
            if not unit_file(folder, unit, seed).exists():
                run_unit(s, folder, unit, seed)
        return 0
    if a.rerun:
        return rerun(a, s, folder, unit_file, run_unit, report)
    if a.quick:
        a.seeds = 1
    if not a.report:
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / "settings.json", s)
        units = plan(a, s)
        with_data = any(u == "data" for u, _ in units)
        todo = [u for u in units if not unit_file(folder, *u).exists()]
        extra = (["--quick"] if a.quick else []) + (["--output", a.output] if a.output else [])
        run_units(script, todo, lambda u: u[0] in ("base", "data") or not with_data or
                  unit_file(folder, "data", u[1]).exists(), a.jobs, a.threads, extra, f"{name} runs")
    print(report(folder, a, s))
    return 0


def rerun(a, s: dict, folder: Path, unit_file: Callable, run_unit: Callable, report: Callable) -> int:
    """`--rerun NAME SEED`: the committed results copied to a scratch folder without that run, the run trained again
    there (on the committed data), and both reports printed, committed first, so a row's figures can be compared
    with its stated interval; the largest change of any per-prompt score is printed too, and the re-run's result is
    kept under outputs/rerun/."""
    import shutil
    import tempfile

    name, seed = a.rerun[0], int(a.rerun[1])
    committed = unit_file(folder, name, seed)
    if not committed.exists():
        raise SystemExit(f"--rerun: no committed result {committed}; run the study first")
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp) / folder.name
        shutil.copytree(folder, scratch, ignore=lambda d, names: [n for n in names if n == committed.name])
        run_unit(s, scratch, name, seed)
        old, new = read_json(committed), read_json(unit_file(scratch, name, seed))
        print(f"committed: {committed}\n{report(folder, a, s)}\nre-run of {name} seed {seed} "
              f"({new['wall_seconds']:.0f} s):\n{report(scratch, a, s)}")
        print(f"largest change of a per-prompt score at the last point: {largest_change(old, new):.3g}")
        kept = ROOT / "outputs" / "rerun" / folder.parent.name / f"{folder.name}-{committed.name}"
        write_json(kept, new)
        print(f"the re-run's result: {kept}")
    return 0


def largest_change(old: dict, new: dict) -> float:
    """The largest absolute difference between two runs' per-prompt scores at their last scored point."""
    def lists(x, prefix=""):
        if isinstance(x, dict):
            for k, v in x.items():
                yield from lists(v, f"{prefix}/{k}")
        elif isinstance(x, list) and x and isinstance(x[0], (int, float)):
            yield prefix, x

    a, b = dict(lists(old["curve"][-1])), dict(lists(new["curve"][-1]))
    return max((abs(u - v) for k in a.keys() & b.keys() for u, v in zip(a[k], b[k])), default=0.0)
