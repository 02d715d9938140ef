"""The documented examples run (in a shortened form)."""

import importlib.util
from pathlib import Path

import pytest

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


def test_every_shipped_recipe_validates(tmp_path, monkeypatch):
    from alignkit.cli import main

    monkeypatch.chdir(tmp_path)  # their output_dir (outputs/<name>) is relative: never the checkout's own outputs/
    # recipes/ppo-crm-sycophancy.yaml scores with the output of recipes/crm-sycophancy.yaml: a stand-in config
    # (validation reads configs, not weights)
    import json

    (tmp_path / "rm").mkdir()
    (tmp_path / "rm" / "config.json").write_text(json.dumps(
        {"architectures": ["LlamaForSequenceClassification"], "model_type": "llama", "num_labels": 1,
         "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}))

    recipes = sorted((ROOT / "recipes").glob("*.yaml"))
    assert recipes
    for recipe in recipes:
        extra = ["--set", f"reward.model={tmp_path / 'rm'}"] if recipe.name in ("ppo-crm-sycophancy.yaml",
                                                                         "online-mipo-crm.yaml") else []
        assert main(["validate", str(recipe), *extra]) == 0, recipe


def test_every_real_model_recipe_validates(tmp_path, monkeypatch):
    """recipes/real/: SmolLM2 with the data files shipped in recipes/real/data (validation reads the data, the
    tokenizer and the model's config, not its weights; a full run of each takes minutes: docs/getting-started.md, "Real models")."""
    from alignkit.cli import main

    monkeypatch.chdir(tmp_path)
    recipes = sorted((ROOT / "recipes" / "real").glob("*.yaml"))
    assert len(recipes) >= 3
    for recipe in recipes:
        import yaml

        data = yaml.safe_load(recipe.read_text())["dataset"]["name"]
        assert main(["validate", str(recipe), "--set", f"dataset.name={ROOT / data}"]) == 0, recipe


@pytest.mark.parametrize("argv, named", [
    (["--max-steps", "0"], "max_steps"),
    (["--max-steps", "-3"], "max_steps"),
    (["--max-steps", "ten"], "--max-steps"),
    (["--divergence", "alpha", "--alpha", "1"], "alpha"),
    (["--divergence", "alpha", "--alpha", "nan"], "alpha"),
])
def test_fdpo_drop_in_refuses_bad_options_in_one_line(argv, named, tmp_path, capsys):
    """Before: --max-steps 0 or --alpha 1 ended in a traceback from FDPOConfig, after the model was built. Now the
    config's own check reads as one argparse line (exit 2) that names the setting, before anything is built."""
    example = _load(ROOT / "examples" / "fdpo_drop_in.py")
    with pytest.raises(SystemExit) as exit_:
        example.main([*argv, "--output-dir", str(tmp_path)])
    assert exit_.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert named in error and "Traceback" not in error
    assert not any(tmp_path.iterdir()), "nothing is built or written before the options are checked"
