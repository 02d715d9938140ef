"""FDPOTrainer behaviour: training, metrics, numerical safety, resume, model card, refusals."""

import math
import os

import pytest
import torch
from trl import DPOConfig

from alignkit import FDPOConfig, FDPOTrainer
from alignkit.divergences import UnsupportedDivergenceError
from tests.conftest import base_args


def _trainer(make_model, tokenizer, train, tmp_path, eval_dataset=None, ref=True, **kw):
    args = FDPOConfig(**base_args(tmp_path, **kw))
    return FDPOTrainer(model=make_model(), ref_model=make_model() if ref else None, args=args, train_dataset=train,
                       eval_dataset=eval_dataset, processing_class=tokenizer)


def test_trains_evaluates_and_logs_fdpo_metrics(make_model, tokenizer, pair_dataset, tmp_path):
    trainer = _trainer(make_model, tokenizer, pair_dataset(32), tmp_path, eval_dataset=pair_dataset(16, split="test"),
                       divergence="alpha", alpha=0.4, max_steps=8, eval_strategy="steps", eval_steps=8)
    trainer.train()
    logs = trainer.state.log_history
    train_log = next(entry for entry in logs if "loss" in entry)
    for key in ("rewards/accuracies", "rewards/margins", "link/chosen", "link/rejected", "link/clamped_fraction",
                "calibration/ece", "entropy", "logps/chosen", "mean_token_accuracy"):
        assert key in train_log, key
    eval_log = next(entry for entry in logs if "eval_loss" in entry)
    assert 0.0 <= eval_log["eval_calibration/ece"] <= 1.0
    # it learned the rule on held-out items: measured 0.9375 (15 of 16) for seeds 0-9 (1 thread), 0-4 (2 threads)
    # and 0-4 with ATEN_CPU_CAPABILITY=default (another float rounding); 0.5 is chance
    assert eval_log["eval_rewards/accuracies"] > 0.5
    # the logged reward is beta * link, the implicit reward of Theorem 1
    assert train_log["rewards/chosen"] == pytest.approx(trainer.beta * train_log["link/chosen"], rel=1e-5, abs=1e-7)


def test_extreme_log_ratios_inside_the_trainer(make_model, tokenizer, pair_dataset, tmp_path):
    """Reference log-probs of +-1e4 (|logr| ~ 1e4): forward KL trains on with finite loss and weights."""
    trainer = _trainer(make_model, tokenizer, pair_dataset(8), tmp_path, divergence="forward_kl",
                       precompute_ref_log_probs=True, max_steps=1)
    ds = trainer.train_dataset.remove_columns(["ref_chosen_logps", "ref_rejected_logps"])
    trainer.train_dataset = ds.add_column("ref_chosen_logps", [1e4] * len(ds)).add_column(
        "ref_rejected_logps", [-1e4] * len(ds))
    trainer.train()
    log = next(entry for entry in trainer.state.log_history if "loss" in entry)
    assert math.isfinite(log["loss"]) and math.isfinite(log["grad_norm"])
    assert log["link/clamped_fraction"] == pytest.approx(0.5)  # every chosen link was continued linearly
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_non_finite_loss_warns_and_trains_on_as_trl_or_stops_when_asked(make_model, tokenizer, pair_dataset,
                                                                        tmp_path):
    # TRL's DPOTrainer carries on after a non-finite loss (its own test_train_model_dtype, fp16 at lr 0.1, does
    # so); ours does too, with one warning naming the step and the likely causes (Trainer's logging_nan_inf_filter
    # would otherwise hide it from the logs), and the logging after it must not fail (ECE skips NaN pairs).
    trainer = _trainer(make_model, tokenizer, pair_dataset(8), tmp_path / "a", max_steps=2, logging_steps=1)
    with torch.no_grad():
        trainer.model.model.norm.weight.fill_(float("nan"))
    with pytest.warns(UserWarning, match="f-DPO loss is nan at step 0") as record:
        trainer.train()
    assert len([w for w in record if "f-DPO loss is" in str(w.message)]) == 1  # once per run, not per step
    assert trainer.state.global_step == 2
    trainer = _trainer(make_model, tokenizer, pair_dataset(8), tmp_path / "b", max_steps=1,
                       stop_on_nonfinite_loss=True)
    with torch.no_grad():
        trainer.model.model.norm.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="f-DPO loss is nan"):
        trainer.train()


def test_resume_from_checkpoint_continues_identically(make_model, tokenizer, pair_dataset, tmp_path):
    ds = pair_dataset(32)
    kw = dict(max_steps=4, per_device_train_batch_size=4, save_strategy="steps", save_steps=2, divergence="jsd")
    full = _trainer(make_model, tokenizer, ds, tmp_path / "full", **kw)
    full.train()
    # a fresh process would start from here: new model objects, the checkpoint written at step 2
    resumed = _trainer(make_model, tokenizer, ds, tmp_path / "resumed", **kw)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    losses = lambda t: [e["loss"] for e in t.state.log_history if "loss" in e]  # noqa: E731
    assert losses(resumed)[-2:] == pytest.approx(losses(full)[-2:], abs=1e-5)
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_model_card_names_method_divergence_and_recipe(make_model, tokenizer, pair_dataset, tmp_path):
    trainer = _trainer(make_model, tokenizer, pair_dataset(8), tmp_path, divergence="alpha", alpha=0.25, max_steps=1)
    trainer.alignkit_recipe = "method: fdpo\ndivergence: alpha\n"
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    trainer.create_model_card()
    card = open(os.path.join(tmp_path, "README.md"), encoding="utf-8").read()
    assert "f-DPO" in card and "divergence: `alpha`, alpha=0.25" in card and "method: fdpo" in card
    assert "divergence:alpha" in card  # tag


def test_lora_and_gradient_accumulation_train(make_model, tokenizer, pair_dataset, tmp_path):
    from peft import LoraConfig

    args = FDPOConfig(**base_args(tmp_path, divergence="forward_kl", gradient_accumulation_steps=2,
                                  per_device_train_batch_size=4, max_steps=2))
    trainer = FDPOTrainer(model=make_model(), args=args, train_dataset=pair_dataset(16), processing_class=tokenizer,
                          peft_config=LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    assert trainer.ref_model is None  # the reference is the base model with the adapter disabled
    trainer.train()
    assert trainer.state.global_step == 2


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(divergence="forward_kl", f_divergence_type="js_divergence"), "disagree"),
        (dict(divergence="alpha", alpha=0.5, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3),
         "disagree"),
        (dict(divergence="total_variation"), "Theorem 1"),
        (dict(divergence="alpha", alpha=1.2), "strictly between 0 and 1"),
        (dict(divergence="jsd", loss_type="bco_pair"), "no f-divergence form"),
        (dict(divergence="alpha", loss_type=["sigmoid", "apo_zero"]), "no f-divergence form"),
        (dict(loss_type="kto"), "not a DPO loss type"),
        (dict(loss_type="exo_pair"), "label_smoothing in \\(0, 1\\)"),
        (dict(loss_type="aot", use_weighting=True), "use_weighting"),
    ],
)
def test_config_refuses_invalid_combinations(kwargs, match, tmp_path):
    with pytest.raises((ValueError, UnsupportedDivergenceError), match=match):
        FDPOConfig(output_dir=str(tmp_path), **kwargs)


@pytest.mark.parametrize(
    "trl_fields,ours",
    [
        (dict(f_divergence_type="forward_kl"), dict(divergence="forward_kl", alpha=None)),
        (dict(f_divergence_type="js_divergence"), dict(divergence="jsd", alpha=None)),
        (dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.7), dict(divergence="alpha", alpha=0.3)),
        (dict(f_divergence_type="alpha_divergence"), dict(divergence="alpha", alpha=0.5)),
    ],
)
def test_trl_divergence_fields_are_translated_with_one_warning(trl_fields, ours, tmp_path):
    with pytest.warns(UserWarning, match="read as divergence") as record:
        args = FDPOConfig(output_dir=str(tmp_path), **trl_fields)
    ours_warnings = [str(w.message) for w in record if "read as divergence" in str(w.message)]
    assert len(ours_warnings) == 1
    if ours["divergence"] == "alpha":
        assert "alpha = 1 - f_alpha_divergence_coef" in ours_warnings[0]
    assert args.divergence == ours["divergence"]
    assert args.alpha == pytest.approx(ours["alpha"]) if ours["alpha"] is not None else args.alpha is None
    # TRL's fields mirror ours afterwards (and agreeing fields are not an error)
    FDPOConfig(output_dir=str(tmp_path), divergence=args.divergence, alpha=args.alpha,
               f_divergence_type=args.f_divergence_type, f_alpha_divergence_coef=args.f_alpha_divergence_coef)


def test_alpha_defaults_to_one_half_and_is_ignored_with_a_warning_elsewhere(tmp_path):
    assert FDPOConfig(output_dir=str(tmp_path), divergence="alpha").alpha == 0.5
    with pytest.warns(UserWarning, match="alpha=0.3 is ignored"):
        args = FDPOConfig(output_dir=str(tmp_path), divergence="jsd", alpha=0.3)
    assert args.divergence == "jsd" and args.alpha is None


def test_trainer_wants_an_fdpo_config(make_model, tokenizer, pair_dataset, tmp_path):
    with pytest.raises(TypeError, match="needs an FDPOConfig"):
        FDPOTrainer(model=make_model(), args=DPOConfig(output_dir=str(tmp_path), bf16=False), train_dataset=pair_dataset(4),
                    processing_class=tokenizer)


def test_empty_conversation_is_rejected(make_model, tokenizer, tmp_path):
    from datasets import Dataset

    from alignkit.data.validation import DatasetError, validate_preference_dataset

    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": "hi"}], "chosen": [],
                             "rejected": [{"role": "assistant", "content": "no"}]}])
    with pytest.raises(DatasetError, match="'chosen'"):
        validate_preference_dataset(ds)
