"""Runs of `alignkit train`: determined by `seed`, never overwrite another run, resume exactly."""

import json
from pathlib import Path

import torch

from alignkit.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _metrics(out: Path) -> list[dict]:
    """The logged metrics of a run, without the wall-clock ones."""
    history = json.loads((out / "metrics.json").read_text())["log_history"]
    return [{k: v for k, v in e.items() if not k.startswith("time/") and "runtime" not in k and "per_second" not in k}
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
