"""`alignkit eval`: the report on a trained quickstart model, reward-model figures, W&B, bad input."""

import json
from pathlib import Path

import pytest

from alignkit.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quickstart_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("qs") / "model"
    assert main(["train", str(ROOT / "recipes" / "quickstart.yaml"), "--set", f"output_dir={out}", "--set", "max_steps=8",
                 "--set", "eval_strategy=no", "--set", "eval_on_start=false"]) == 0
    return out


def test_eval_writes_the_report_and_plots(quickstart_model, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["eval", str(quickstart_model), "--ref", "builtin:tiny-llama", "--pairs", "builtin:sentiment",
                 "-k", "3", "--num-prompts", "8", "--max-new-tokens", "16", "--output", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    for key in ("entropy", "distinct_1", "distinct_2", "self_bleu", "completion_length"):
        assert isinstance(report[key], float), key
    assert set(report["divergence"]) == {"reverse_kl", "forward_kl", "jsd", "alpha_0.5"}
    # trained away from the reference, and learned the pairs: over training seeds 0-7 (1 thread, the eval --seed
    # varied with it) and 0-2 with ATEN_CPU_CAPABILITY=default, measured reverse KL 0.18-0.34, pair accuracy 1.0,
    # ECE 0.43-0.45
    assert report["divergence"]["reverse_kl"] > 0
    assert 0 <= report["pairs"]["ece"] <= 1 and report["pairs"]["accuracy"] > 0.5
    assert len((out / "samples.jsonl").read_text().splitlines()) == 8 * 3
    assert (out / "diversity.png").stat().st_size > 0 and (out / "divergences.png").exists()
    assert "divergence:" in capsys.readouterr().out


def test_eval_with_a_reward_model_random_numbers_and_wandb(tmp_path, monkeypatch):
    rm = tmp_path / "rm"
    assert main(["train", str(ROOT / "recipes" / "crm-sycophancy.yaml"), "--set", f"output_dir={rm}", "--set", "max_steps=2",
                 "--set", "eval_strategy=no", "--set", "eval_on_start=false",
                 "--set", "dataset.builtin_kwargs={num_samples: 32}"]) == 0
    out = tmp_path / "eval"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    assert main(["eval", "builtin:tiny-llama", "--prompts", "builtin:sycophancy", "--num-prompts", "6", "-k", "2",
                 "--max-new-tokens", "8", "--reward-model", str(rm), "--compare-model", "builtin:tiny-llama",
                 "--pairs", "builtin:sycophancy", "--pairs-split", "test_anti", "--attribute", "sycophantic",
                 "--output", str(out), "--report-to", "wandb"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert -50 <= report["reward"]["win_rate_score"] <= 150
    bias = report["reward_model_bias"]
    assert 0 <= bias["accuracy"] <= 1 and "spearman_reward_attribute" in bias
    assert bias["accuracy_attribute_on_rejected"] == bias["accuracy"]  # test_anti: the prefix is always on rejected
    assert (out / "rewards.png").exists()
    assert list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))

    rn = tmp_path / "rn"
    assert main(["eval", "builtin:tiny-llama", "--prompts", "builtin:random_numbers", "--num-prompts", "4", "-k", "4",
                 "--max-new-tokens", "4", "--output", str(rn)]) == 0
    numbers = json.loads((rn / "report.json").read_text())["random_numbers"]
    assert set(numbers) == {"entropy", "kl_to_uniform", "invalid_fraction"}


def test_eval_with_a_reward_function(tmp_path, capsys):
    """--reward-function scores the samples (here the built-in sentiment rule) and, with --compare-model, gives the
    win-rate score; each sample's reward is the function's value on its completion."""
    from alignkit.rewards import sentiment

    assert main(["eval", "builtin:tiny-llama", "--prompts", "builtin:sentiment", "--num-prompts", "3", "-k", "2",
                 "--max-new-tokens", "6", "--reward-function", "builtin:sentiment", "--compare-model",
                 "builtin:tiny-llama", "--output", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    samples = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [s["reward"] for s in samples] == sentiment([], [s["completion"] for s in samples])
    assert report["reward"]["mean"] == pytest.approx(sum(s["reward"] for s in samples) / len(samples))
    assert 0.0 <= report["reward"]["win_rate_score"] <= 100.0  # a percentage
    assert main(["eval", "builtin:tiny-llama", "--reward-function", "builtin:nope", "--output", str(tmp_path)]) == 2
    assert "builtin:nope" in capsys.readouterr().err
    # the Python API refuses both scorers at once too (it used to score with the reward model, silently)
    from alignkit.metrics.evaluate import EvalError, evaluate

    with pytest.raises(EvalError, match="give one of them"):
        evaluate("builtin:tiny-llama", ["Hi"], k=2, reward_model="builtin:tiny-llama", reward_function=sentiment)


def test_evaluate_takes_a_model_object_with_its_tokenizer():
    """A training callback evaluates the model it holds: the same samples and figures as from the saved path."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignkit.metrics.evaluate import EvalError, evaluate
    from alignkit.models import resolve_model_path

    path = resolve_model_path("builtin:tiny-llama")
    model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    by_path = evaluate(path, ["Hi", "Yo"], ref=path, k=2, max_new_tokens=4, seed=3)
    by_object = evaluate(model, ["Hi", "Yo"], ref=model, k=2, max_new_tokens=4, seed=3, tokenizer=tok)
    assert by_object["samples"] == by_path["samples"] and by_object["entropy"] == by_path["entropy"]
    assert by_object["divergence"]["reverse_kl"] == 0.0
    with pytest.raises(EvalError, match="tokenizer"):
        evaluate(model, ["Hi"], k=2)


def test_eval_bad_input(tmp_path, capsys):
    assert main(["eval", "builtin:tiny-llama", "-k", "1", "--output", str(tmp_path)]) == 2
    assert "use k >= 2" in capsys.readouterr().err
    data = tmp_path / "p.jsonl"
    data.write_text('{"question": "hi"}\n')
    assert main(["eval", "builtin:tiny-llama", "--prompts", str(data), "--output", str(tmp_path)]) == 2
    assert "no 'prompt' column" in capsys.readouterr().err
    assert main(["eval", "builtin:tiny-llama", "--prompts", "builtin:nope", "--output", str(tmp_path)]) == 2
    assert main(["eval", "builtin:tiny-llama", "--prompts", str(tmp_path / "missing.jsonl"), "--output",
                 str(tmp_path)]) == 2
    for flag in ("--num-prompts", "--num-pairs"):
        assert main(["eval", "builtin:tiny-llama", "--pairs", "builtin:sentiment", flag, "0", "--output",
                     str(tmp_path)]) == 2
        assert f"{flag} 0" in capsys.readouterr().err


def test_eval_reports_concept_bias_of_a_reward_model(tmp_path):
    """Bias@C, Acc@C and Acc@NoC (thesis 4.6.3) of a reward model on pairs with a `label` and a concept
    column, against the same figures computed from one unbatched forward pass per completion."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from alignkit.data.synthetic import concept_sentiment
    from alignkit.metrics import bias_at_c
    from alignkit.metrics.evaluate import evaluate
    from alignkit.models import resolve_model_path

    torch.manual_seed(0)
    path = resolve_model_path("builtin:tiny-llama")
    rm = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    rm.save_pretrained(tmp_path / "rm")
    tok = AutoTokenizer.from_pretrained(path)
    tok.save_pretrained(tmp_path / "rm")
    pairs = concept_sentiment("test_uncorrelated", num_samples=48)
    report = evaluate("builtin:tiny-llama", ["Hi"], k=2, max_new_tokens=2, reward_model=str(tmp_path / "rm"),
                      pairs=pairs, attribute="concept")
    bias = report["reward_model_bias"]

    rm.eval()
    with torch.no_grad():
        def reward(prompt, completion):
            ids = tok(prompt + completion + tok.eos_token, return_tensors="pt", add_special_tokens=False)
            return rm(**ids).logits.item()

        right = [reward(r["prompt"], r["chosen"]) > reward(r["prompt"], r["rejected"]) for r in pairs]
    concept, labels = pairs["concept"], pairs["label"]
    with_c = [ok for ok, c in zip(right, concept) if c]
    without_c = [ok for ok, c in zip(right, concept) if not c]
    assert bias["accuracy"] == pytest.approx(sum(right) / len(right))
    assert bias["accuracy_with_concept"] == pytest.approx(sum(with_c) / len(with_c))
    assert bias["accuracy_without_concept"] == pytest.approx(sum(without_c) / len(without_c))
    assert bias["bias_at_c"] == pytest.approx(bias_at_c(right, concept, labels))


DEVICES = ["cpu"] + (["cuda"] if __import__("torch").cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_evaluate_feeds_each_model_on_its_own_device(device, tmp_path):
    """A policy object on `device` (as a training callback passes it, e.g. on a GPU) with the reference, reward model
    and pairs given by path: `evaluate` loads those onto the policy's device and sends every input to the model it
    feeds. On a CPU-only machine only the "cpu" case exists; it runs the same code path."""
    import math

    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from alignkit.data.synthetic import concept_sentiment
    from alignkit.metrics.evaluate import evaluate
    from alignkit.models import resolve_model_path

    path = resolve_model_path("builtin:tiny-llama")
    AutoModelForSequenceClassification.from_pretrained(path, num_labels=1).save_pretrained(tmp_path / "rm")
    AutoTokenizer.from_pretrained(path).save_pretrained(tmp_path / "rm")
    policy = AutoModelForCausalLM.from_pretrained(path).to(device)
    report = evaluate(policy, ["Hi", "Hello there"], ref="builtin:tiny-llama", k=2, max_new_tokens=4,
                      reward_model=str(tmp_path / "rm"), pairs=concept_sentiment("test_uncorrelated", num_samples=8),
                      tokenizer=AutoTokenizer.from_pretrained(path))
    # the policy is its own reference: every divergence estimate is 0 up to float error
    assert all(abs(v) < 1e-4 for v in report["divergence"].values()), report["divergence"]
    assert math.isfinite(report["entropy"]) and math.isfinite(report["reward"]["mean"])
    assert 0 <= report["pairs"]["accuracy"] <= 1 and 0 <= report["reward_model_bias"]["accuracy"] <= 1
