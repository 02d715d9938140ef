"""The documented examples run (in a shortened form)."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fdpo_drop_in_example(tmp_path):
    example = _load(ROOT / "examples" / "fdpo_drop_in.py")
    metrics = example.main(["--divergence", "alpha", "--alpha", "0.3", "--max-steps", "4", "--output-dir", str(tmp_path)])
    assert "eval_calibration/ece" in metrics and "eval_rewards/accuracies" in metrics


def test_every_shipped_recipe_validates():
    from alignkit.cli import main

    recipes = sorted((ROOT / "recipes").glob("*.yaml"))
    assert recipes
    for recipe in recipes:
        assert main(["validate", str(recipe)]) == 0, recipe
