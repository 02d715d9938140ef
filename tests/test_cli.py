"""The `alignkit` command: recipes, overrides, outputs, W&B offline, and one clear error per bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from alignkit._util import AlignkitWarning
import yaml

from alignkit.cli import main

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "recipes" / "quickstart.yaml")


def _recipe(tmp_path, text, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _error(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and err.splitlines()[-1].startswith("alignkit: error:"), err  # one line, the last
    return errors[0]


BASE = "method: fdpo\nmodel: builtin:tiny-llama\ndataset: builtin:sentiment\nbf16: false\n"


def test_malformed_yaml(tmp_path, capsys):
    err = _error(capsys, ["validate", _recipe(tmp_path, "method: fdpo\nmodel: {name_or_path: x\n beta: [1,\n")])
    assert "malformed YAML at line" in err


def test_unknown_key_names_the_closest(tmp_path, capsys):
    err = _error(capsys, ["validate", _recipe(tmp_path, BASE + "learning_rte: 1e-3\n")])
    assert "unknown key 'learning_rte'" in err and "Did you mean 'learning_rate'?" in err
    err = _error(capsys, ["validate", _recipe(tmp_path, BASE.replace("dataset: builtin:sentiment",
                                                                    "dataset: {name: builtin:sentiment, eval_splt: test}"))])
    assert "dataset.eval_splt" in err and "'eval_split'" in err


def test_missing_dataset_columns(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps({"question": "q", "good": "a", "bad": "b"}) for _ in range(4)))
    recipe = BASE.replace("dataset: builtin:sentiment", f"dataset: {{name: {data}}}")
    err = _error(capsys, ["validate", _recipe(tmp_path, recipe)])
    assert "missing column(s) ['chosen', 'rejected']" in err and "columns:" in err
    # and the fix the message suggests works
    fixed = recipe.replace(f"{{name: {data}}}", f"{{name: {data}, columns: {{prompt: question, chosen: good, rejected: bad}}}}")
    assert main(["validate", _recipe(tmp_path, fixed, "fixed.yaml")]) == 0


@pytest.mark.parametrize("alpha", ["0", "1", "1.5", "-0.1"])
def test_alpha_outside_open_interval(tmp_path, capsys, alpha):
    err = _error(capsys, ["validate", _recipe(tmp_path, BASE + f"divergence: alpha\nalpha: {alpha}\n")])
    assert "strictly between 0 and 1" in err


def test_total_variation_is_refused_with_the_reason(tmp_path, capsys):
    err = _error(capsys, ["validate", _recipe(tmp_path, BASE + "divergence: total_variation\n")])
    assert "Theorem 1" in err and "0 is in the domain of f'" in err


def test_more_bad_inputs(tmp_path, capsys):
    assert "does not exist" in _error(capsys, ["train", str(tmp_path / "nope.yaml")])
    assert "unknown method 'fdp'" in _error(capsys, ["validate", _recipe(tmp_path, BASE.replace("fdpo", "fdp"))])
    assert "beta must be a number" in _error(capsys, ["validate", _recipe(tmp_path, BASE + "beta: lots\n")])
    assert "disagree" in _error(capsys, ["validate", _recipe(tmp_path, BASE + "divergence: jsd\nf_divergence_type: forward_kl\n")])
    assert "expected key=value" in _error(capsys, ["validate", QUICKSTART, "--set", "beta"])
    assert "unknown key 'peft.rank'" in _error(capsys, ["validate", _recipe(tmp_path, BASE + "peft: {rank: 4}\n")])


def test_trl_divergence_fields_and_a_leftover_alpha_are_warnings(tmp_path, capsys):
    recipe = _recipe(tmp_path, BASE + "f_divergence_type: alpha_divergence\nf_alpha_divergence_coef: 0.7\n")
    with pytest.warns(AlignkitWarning, match="read as divergence='alpha', alpha=0.3"):
        assert main(["validate", recipe]) == 0
    recipe = _recipe(tmp_path, BASE + "divergence: alpha\nalpha: 0.3\n")  # a sweep sets divergence=jsd
    with pytest.warns(AlignkitWarning, match="alpha=0.3 is ignored"):
        assert main(["validate", recipe, "--set", "divergence=jsd"]) == 0


def test_validate_and_set_overrides(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the recipe's output_dir is relative: not the checkout's outputs/ (make demo's)
    assert main(["validate", QUICKSTART, "--set", "divergence=forward_kl", "--set", "dataset.max_train_samples=10"]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "train_examples=10" in out


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    from alignkit.run.recipe import load_recipe

    recipe = load_recipe(_recipe(tmp_path, BASE + "learning_rate: 5e-4\n"))  # YAML 1.1 reads this as a string
    assert recipe.build_config().learning_rate == 5e-4


def test_train_quickstart_writes_model_recipe_metrics_and_learns(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", QUICKSTART, "--set", f"output_dir={out}", "--set", "max_steps=24", "--set", "eval_steps=24",
                 "--set", "dataset.builtin_kwargs={num_samples: 384}"])
    assert code == 0
    for name in ("config.json", "model.safetensors", "tokenizer.json", "alignkit_recipe.yaml", "metrics.json", "README.md"):
        assert (out / name).exists(), name
    recipe = yaml.safe_load((out / "alignkit_recipe.yaml").read_text())
    assert recipe["max_steps"] == 24 and recipe["divergence"] == "jsd"
    metrics = json.loads((out / "metrics.json").read_text())
    evals = [e for e in metrics["log_history"] if "eval_rewards/accuracies" in e]
    # it learned. At the start the policy is the reference: every implicit reward is 0, accuracy exactly 0 (no
    # chosen reward above its rejected one); after 24 steps measured 1.0 for seeds 0-7 (--set seed=N, 1 thread)
    # and 0-2 with ATEN_CPU_CAPABILITY=default (another float rounding)
    assert evals[0]["eval_rewards/accuracies"] < 0.5 < evals[-1]["eval_rewards/accuracies"]
    card = (out / "README.md").read_text()
    assert "f-DPO" in card and "divergence: `jsd`" in card and "method: fdpo" in card
    # throughput in every training log (issue 18): tokens/s and peak memory; no MFU on a CPU without peak_tflops
    train_logs = [e for e in metrics["log_history"] if "loss" in e]
    assert train_logs and all(e["perf/tokens_per_second"] > 0 and e["perf/peak_memory_gb"] > 0 for e in train_logs)
    # alignkit plot: one PNG per metric family, from this run's metrics.json
    capsys.readouterr()
    assert main(["plot", str(out)]) == 0
    written = capsys.readouterr().out.split()
    names = {Path(f).name for f in written}
    assert {"train.png", "rewards.png", "perf.png", "link.png"} <= names, names
    assert all(Path(f).stat().st_size > 5000 and Path(f).read_bytes()[:4] == b"\x89PNG" for f in written)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)


def test_wandb_without_api_key_goes_offline(tmp_path, capsys, offline_wandb):
    out = tmp_path / "run"
    code = main(["train", QUICKSTART, "--set", f"output_dir={out}", "--set", "max_steps=2", "--set", "report_to=wandb",
                 "--set", "eval_strategy=no", "--set", "eval_on_start=false", "--set", "wandb={project: alignkit-test}"])
    assert code == 0
    err = capsys.readouterr().err
    assert "logged offline" in err and "wandb sync" in err
    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert runs, list(out.rglob("*"))
    assert os.environ["WANDB_MODE"] == "offline"


def test_console_script_exit_code_and_no_traceback(tmp_path):
    bad = _recipe(tmp_path, BASE + "divergence: alpha\nalpha: 2\n")
    proc = subprocess.run([sys.executable, "-m", "alignkit.cli", "train", bad], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "strictly between 0 and 1" in proc.stderr
    help_ = subprocess.run([sys.executable, "-m", "alignkit.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert help_.returncode == 0 and "alignkit train" in help_.stdout


def test_unquoted_no_is_the_string_no(tmp_path):
    from alignkit.run.recipe import load_recipe

    config = load_recipe(_recipe(tmp_path, BASE + "save_strategy: no\neval_strategy: no\n")).build_config()
    assert config.save_strategy == "no" and config.eval_strategy == "no"


def test_lora_recipe_trains_and_saves_an_adapter(tmp_path):
    out = tmp_path / "lora"
    recipe = str(ROOT / "recipes" / "fdpo-alpha-lora.yaml")
    code = main(["train", recipe, "--set", f"output_dir={out}", "--set", "max_steps=2", "--set", "save_strategy=no",
                 "--set", "eval_strategy=no", "--set", "dataset.builtin_kwargs={conversational: true, num_samples: 32}"])
    assert code == 0
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    assert "alpha=0.3" in (out / "README.md").read_text()


def test_mipo_recipe_trains(tmp_path):
    out = tmp_path / "mipo"
    code = main(["train", str(ROOT / "recipes" / "mipo-rng.yaml"), "--set", f"output_dir={out}", "--set", "max_steps=2",
                 "--set", "eval_strategy=no", "--set", "dataset.builtin_kwargs={num_samples: 32}"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert any("mipo/variance_correction" in e for e in metrics["log_history"])


def test_crm_recipe_trains_a_reward_model_and_saves_its_bins(tmp_path):
    out = tmp_path / "crm"
    code = main(["train", str(ROOT / "recipes" / "crm-length.yaml"), "--set", f"output_dir={out}", "--set", "max_steps=2",
                 "--set", "eval_strategy=no", "--set", "eval_on_start=false",
                 "--set", "dataset.builtin_kwargs={num_samples: 64}"])
    assert code == 0
    assert (out / "alignkit_attribute_bins.json").exists()
    from transformers import AutoModelForSequenceClassification

    assert AutoModelForSequenceClassification.from_pretrained(out).config.num_labels == 1


def test_causal_dpo_recipe_trains_and_saves_its_bins(tmp_path):
    out = tmp_path / "cdpo"
    code = main(["train", str(ROOT / "recipes" / "causal-dpo-length.yaml"), "--set", f"output_dir={out}",
                 "--set", "max_steps=2", "--set", "eval_steps=2", "--set", "dataset.builtin_kwargs={num_samples: 64}"])
    assert code == 0
    assert (out / "alignkit_attribute_bins.json").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert any("eval_mmd/penalty" in e for e in metrics["log_history"])


def test_ppo_recipes_train_on_a_function_and_on_a_causal_reward_model(tmp_path, capsys):
    out = tmp_path / "ppo-fdiv"
    assert main(["train", str(ROOT / "recipes" / "ppo-fdiv.yaml"), "--set", f"output_dir={out}", "--set", "max_steps=3",
                 "--set", "logging_steps=1"]) == 0
    assert "mean score" in capsys.readouterr().err
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)  # the policy is a normal Hugging Face model

    rm = _small_causal_reward_model(tmp_path)
    out = tmp_path / "ppo-crm"
    assert main(["train", str(ROOT / "recipes" / "ppo-crm-sycophancy.yaml"), "--set", f"output_dir={out}",
                 "--set", f"reward.model={rm}", "--set", "max_steps=2", "--set", "logging_steps=1",
                 "--set", "dataset.builtin_kwargs={num_samples: 32}"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert any("objective/scores" in e for e in metrics["log_history"])


def _small_causal_reward_model(tmp_path):
    """recipes/crm-sycophancy.yaml for 2 steps on 64 pairs: a reward model for the PPO and online recipes."""
    rm = tmp_path / "crm"
    assert main(["train", str(ROOT / "recipes" / "crm-sycophancy.yaml"), "--set", f"output_dir={rm}",
                 "--set", "max_steps=2", "--set", "eval_strategy=no", "--set", "eval_on_start=false",
                 "--set", "dataset.builtin_kwargs={num_samples: 64}"]) == 0
    return rm


def test_online_mdpo_recipe_trains_on_a_causal_reward_model(tmp_path, capsys):
    rm = _small_causal_reward_model(tmp_path)
    out = tmp_path / "online"
    assert main(["train", str(ROOT / "recipes" / "online-mipo-crm.yaml"), "--set", f"output_dir={out}",
                 "--set", f"reward.model={rm}", "--set", "max_steps=2", "--set", "logging_steps=1",
                 "--set", "dataset.builtin_kwargs={num_samples: 16}"]) == 0
    assert "mean score" in capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert any("group/skipped_prompts" in e and "divergence/reverse_kl" in e for e in metrics["log_history"])
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: online_mdpo\nmodel: builtin:tiny-llama\ndataset: builtin:sentiment\n"
                      "reward: {function: builtin:sentiment, value_model: builtin:tiny-llama}\n")
    assert main(["validate", str(recipe)]) == 2
    assert "reward.value_model is PPO's" in capsys.readouterr().err


def test_ppo_recipe_errors(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: ppo\nmodel: builtin:tiny-llama\ndataset: builtin:sentiment\n")
    assert main(["validate", str(recipe)]) == 2
    assert "needs a 'reward' section" in capsys.readouterr().err
    recipe.write_text("method: ppo\nmodel: builtin:tiny-llama\ndataset: builtin:sentiment\n"
                      "reward: {function: builtin:nope}\nmax_steps: 1\nreport_to: none\n")
    assert main(["train", str(recipe), "--set", f"output_dir={tmp_path / 'o'}"]) == 2
    assert "unknown built-in reward" in capsys.readouterr().err


def test_distributed_dry_run_prints_the_launch_command(capsys):
    code = main(["train", str(ROOT / "recipes" / "quickstart.yaml"), "--set", "distributed.num_processes=2",
                 "--set", "distributed.deepspeed=zero2", "--dry-run"])
    assert code == 0
    out = capsys.readouterr().out
    assert "torch.distributed.run" in out and "--nproc_per_node=2" in out and "ACCELERATE_USE_DEEPSPEED=true" in out
    assert "--set distributed.deepspeed=zero2" in out


def test_bad_distributed_sections_fail_with_exit_2(tmp_path, capsys):
    base = ["train", str(ROOT / "recipes" / "quickstart.yaml"), "--set", "distributed.num_processes=2"]
    assert main(base + ["--set", "distributed.deepspeed=zero9", "--dry-run"]) == 2
    assert "neither one of zero2, zero3, zero3_offload nor a JSON file" in capsys.readouterr().err
    assert main(base + ["--set", "distributed.deepspeed=zero2", "--set", "distributed.offload_params=true",
                        "--dry-run"]) == 2
    assert "needs ZeRO stage 3" in capsys.readouterr().err
    assert main(base + ["--set", "distributed.num_processes=0", "--dry-run"]) == 2


def test_shipped_deepspeed_files_are_the_named_configs():
    from alignkit.run.plan import ZERO_CONFIGS

    for name, cfg in ZERO_CONFIGS.items():
        assert json.loads((ROOT / "recipes" / "deepspeed" / f"{name}.json").read_text()) == cfg, name


def test_distributed_combinations_that_are_not_supported_fail_before_launching(capsys):
    assert main(["train", str(ROOT / "recipes" / "quickstart.yaml"), "--set", "distributed.num_processes=2",
                 "--set", "distributed.deepspeed=zero3", "--set", "precompute_ref_log_probs=true", "--dry-run"]) == 2
    assert "precompute_ref_log_probs is not supported under DeepSpeed" in capsys.readouterr().err


def test_trainer_checks_reach_the_cli_as_one_line(tmp_path, capsys):
    # 4 prompts cannot fill one PPO batch of 16: PPOTrainer's own check, reported without a traceback
    assert main(["train", str(ROOT / "recipes" / "ppo-fdiv.yaml"), "--set", f"output_dir={tmp_path}",
                 "--set", "dataset.builtin_kwargs={num_samples: 4}"]) == 2
    assert "fewer than one PPO batch" in capsys.readouterr().err


def test_a_yaml_merge_key_is_read_as_yaml_defines_it(tmp_path):
    """`<<: *anchor` merges a mapping and an explicit key beside it wins, as YAML defines; a key given twice in the
    same mapping is still refused."""
    from alignkit.run.recipe import RecipeError, load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("method: fdpo\nmodel:\n  <<: {name_or_path: builtin:tiny-llama, dtype: bfloat16}\n"
                    "  dtype: float32\ndataset: &data {name: builtin:sentiment}\noutput_dir: out\n")
    recipe = load_recipe(path)
    assert recipe.model.name_or_path == "builtin:tiny-llama" and recipe.model.dtype == "float32"
    path.write_text("method: fdpo\nmodel:\n  name_or_path: builtin:tiny-llama\n  name_or_path: x\n"
                    "dataset: builtin:sentiment\n")
    with pytest.raises(RecipeError, match="appears twice"):
        load_recipe(path)


@pytest.mark.parametrize("command", [["train", "RECIPE"], ["validate", "RECIPE"], ["plan", "RECIPE"],
                                     ["plot", "DIR"], ["eval", "builtin:tiny-llama"]])
def test_an_unexpected_failure_is_one_line_and_a_log_and_debug_shows_it(command, tmp_path, monkeypatch, capsys):
    """Anything that is not a user error (a bug, a library failing) ends every command with one line that names the
    error and the log holding the traceback, exit 1; `--debug` (or ALIGNKIT_DEBUG=1) lets the traceback through."""
    import alignkit.run.recipe
    import alignkit.plot
    import alignkit.metrics.evaluate

    def broken(*args, **kwargs):
        raise ZeroDivisionError("something deep inside broke")

    monkeypatch.setattr(alignkit.run.recipe, "load_recipe", broken)
    monkeypatch.setattr(alignkit.plot, "plot_run", broken)
    monkeypatch.setattr(alignkit.metrics.evaluate, "load_prompts", broken)
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))
    argv = [a.replace("RECIPE", str(QUICKSTART)).replace("DIR", str(tmp_path)) for a in command]
    assert main(argv) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("alignkit: error: unexpected ZeroDivisionError: something deep inside broke"), err
    log = Path(lines[0].rsplit(" in ", 1)[1].split(" ")[0].rstrip(";."))
    assert "Traceback" in log.read_text() and "something deep inside broke" in log.read_text()
    with pytest.raises(ZeroDivisionError):
        main(["--debug", *argv])
    monkeypatch.setenv("ALIGNKIT_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        main(argv)
