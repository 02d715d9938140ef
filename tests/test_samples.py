"""Sample tables during training: f-DPO/mDPO at evaluation (with implicit rewards), in files and in an offline W&B
run, without changing the training run."""

import json
from pathlib import Path

import pytest
from datasets import Dataset

from tests.conftest import base_args

ROOT = Path(__file__).resolve().parents[1]


def _rows(folder: Path, name: str) -> list[dict]:
    return [json.loads(x) for x in (folder / "samples" / f"{name}.jsonl").read_text().splitlines()]


def _fdpo(tiny_model_path, tokenizer, data, tmp_path, peft=False, **kw):
    from alignkit import FDPOConfig, FDPOTrainer

    args = FDPOConfig(**base_args(tmp_path, eval_strategy="steps", eval_steps=2, eval_on_start=True, max_steps=2,
                                  per_device_eval_batch_size=4, divergence="jsd", **kw))
    peft_config = None
    if peft:
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = FDPOTrainer(tiny_model_path, args=args, train_dataset=data, eval_dataset=data.select(range(6)),
                          processing_class=tokenizer, peft_config=peft_config)
    trainer.train()
    return trainer


@pytest.mark.parametrize("peft", [False, True], ids=["ref-model", "lora"])
def test_fdpo_writes_eval_samples_with_implicit_rewards_and_training_is_unchanged(peft, tiny_model_path, tokenizer,
                                                                                   pair_dataset, tmp_path):
    data = pair_dataset(16)
    trainer = _fdpo(tiny_model_path, tokenizer, data, tmp_path / "on", peft=peft, generate_during_eval=True,
                    learning_rate=5e-3)
    start, end = _rows(tmp_path / "on", "eval_step_0"), _rows(tmp_path / "on", "eval_step_2")
    assert len(start) == len(end) == 4
    assert {tuple(r) for r in start} == {("step", "prompt", "completion", "implicit_reward")}
    # at step 0 the policy is the reference: every implicit reward is exactly 0; after training it is not
    assert all(r["implicit_reward"] == 0.0 for r in start)
    assert any(abs(r["implicit_reward"]) > 1e-4 for r in end)
    assert all(r["completion"] and r["prompt"] for r in end)
    # a raw dataset given to evaluate() is prepared like the trainer's own
    trainer.evaluate(data.select(range(2)), metric_key_prefix="extra")
    assert len(_rows(tmp_path / "on", "extra_step_2")) == 2
    # sampling leaves the run's random state alone: the same training with it off logs the same losses
    off = _fdpo(tiny_model_path, tokenizer, data, tmp_path / "off", peft=peft, learning_rate=5e-3)
    losses = [[e["loss"] for e in t.state.log_history if "loss" in e] for t in (trainer, off)]
    assert losses[0] == losses[1]
    assert not (tmp_path / "off" / "samples").exists()


def test_multisample_writes_eval_samples(tiny_model_path, tokenizer, tmp_path):
    from alignkit import MultiSampleDPOConfig, MultiSampleDPOTrainer

    rows = [{"prompt": f"Prompt {i}:", "chosen": [" good one", " fine"], "rejected": [" bad", " awful here"]}
            for i in range(8)]
    args = MultiSampleDPOConfig(**base_args(tmp_path, eval_strategy="steps", eval_steps=1, max_steps=1,
                                            per_device_train_batch_size=4, per_device_eval_batch_size=2,
                                            generate_during_eval=True, shared_prefix=True))
    trainer = MultiSampleDPOTrainer(tiny_model_path, args=args, train_dataset=Dataset.from_list(rows),
                                    eval_dataset=Dataset.from_list(rows[:3]), processing_class=tokenizer)
    trainer.train()
    samples = _rows(tmp_path, "eval_step_1")
    assert len(samples) == 2 and all(isinstance(r["implicit_reward"], float) for r in samples)


def test_offline_wandb_quickstart_holds_samples_tables_and_perf_metrics(tmp_path, offline_wandb):
    from alignkit.cli import main

    out = tmp_path / "run"
    assert main(["train", str(ROOT / "recipes" / "quickstart.yaml"), "--set", f"output_dir={out}", "--set",
                 "max_steps=2", "--set", "eval_steps=2", "--set", "logging_steps=1", "--set", "report_to=wandb", "--set",
                 "wandb={project: alignkit-test}"]) == 0
    (run,) = (out / "wandb").glob("offline-run-*")
    tables = sorted(p.name for p in (run / "files" / "media" / "table" / "samples").glob("*.table.json"))
    assert any(name.startswith("eval_step_0_") for name in tables) and any(n.startswith("eval_step_2_") for n in tables)
    table = json.loads(next((run / "files" / "media" / "table" / "samples").glob("eval_step_2_*")).read_text())
    assert table["columns"] == ["step", "prompt", "completion", "implicit_reward"] and len(table["data"]) >= 1
    # offline, the metrics live only in the run's transaction log (protobuf records; wandb 0.31 ships no reader
    # for it): the logged keys appear there as bytes
    log = next(run.glob("run-*.wandb")).read_bytes()
    assert b"perf/tokens_per_second" in log and b"perf/peak_memory_gb" in log and b"rewards/accuracies" in log
    # the resolved recipe is the run's config, and the summaries say how the run ended
    assert b"alignkit_recipe" in log and b"generate_during_eval" in log
    assert b"train/divergence/*" in log  # a define_metric glob: no f-DPO metric has this name


def test_causal_reward_model_writes_eval_pairs_with_rewards_and_bins(tiny_model_path, tokenizer, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from alignkit import CausalRewardConfig, CausalRewardTrainer
    from alignkit.data.synthetic import sycophancy

    rm = AutoModelForSequenceClassification.from_pretrained(tiny_model_path, num_labels=1)
    args = CausalRewardConfig(**base_args(tmp_path, attributes=["sycophantic"], eval_strategy="steps", eval_steps=2,
                                          eval_sample_pairs=3))
    trainer = CausalRewardTrainer(model=rm, args=args, train_dataset=sycophancy("train", num_samples=16),
                                  eval_dataset=sycophancy("test", num_samples=6), processing_class=tokenizer)
    trainer.train()
    rows = _rows(tmp_path, "eval_step_2")
    assert len(rows) == 3
    assert set(rows[0]) == {"step", "chosen", "rejected", "reward_chosen", "reward_rejected", "bin_chosen",
                            "bin_rejected"}
    # the written rewards are the model's: re-score the first pair's chosen text by hand
    import torch

    enc = tokenizer(rows[0]["chosen"] + tokenizer.eos_token, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        again = trainer.model.eval()(**enc).logits[0, 0].item()
    assert again == pytest.approx(rows[0]["reward_chosen"], abs=1e-4)
    assert {r["bin_chosen"] for r in rows} <= {0, 1} and {r["bin_rejected"] for r in rows} <= {0, 1}
