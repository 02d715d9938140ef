"""CausalRewardTrainer with mmd_coef 0 against TRL's RewardTrainer, one case per RewardConfig option.

Each case builds both trainers on copies of one model, tokenizer and dataset, with the option set the same
way in `CausalRewardConfig(mmd_coef=0.0, ...)` and in TRL's `RewardConfig(...)`, then checks that
  - the prepared datasets hold the same rows (TRL's columns; ours may add the attribute-bin columns),
  - the first training batch is the same tensors (ours may add `z_bins`),
  - one `training_step` gives the same loss and every gradient (float32, tolerance 1e-6),
  - every metric TRL records (`_metrics["train"]`) has the same value.
Evaluation (`evaluate()`) and whole training runs (log history, trained weights) are compared in their own
tests below. TRL 1.16's RewardConfig has no padding-free or precompute option.
"""

import copy
import dataclasses
import warnings

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForSequenceClassification
from trl import RewardConfig, RewardTrainer

from alignkit.trainers.causal_reward import CausalRewardConfig, CausalRewardTrainer
from tests.conftest import base_args

ATOL = 1e-6
TIMING_KEYS = ("runtime", "per_second", "preparation_time")  # wall-clock figures, never equal twice


@pytest.fixture
def model_factory(tiny_model_path):
    """The tiny Llama with a reward head, the same weights on every call."""

    def _make(**config_kw):
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_pretrained(tiny_model_path, num_labels=1,
                                                                  dtype=torch.float32, **config_kw)

    return _make


def _trainers(model, tokenizer, ds, tmp_path, eval_dataset=None, peft_config=None, ours_only=None, **option):
    """(ours, TRL's) on deep copies of everything a trainer may change in place."""
    out = []
    for cls, config_cls, extra in ((CausalRewardTrainer, CausalRewardConfig, dict(mmd_coef=0.0, **(ours_only or {}))),
                                   (RewardTrainer, RewardConfig, {})):
        args = config_cls(**base_args(tmp_path / cls.__name__, **extra, **copy.deepcopy(option)))
        out.append(cls(model=copy.deepcopy(model) if not isinstance(model, str) else model, args=args,
                       train_dataset=ds, eval_dataset=eval_dataset, processing_class=copy.deepcopy(tokenizer),
                       peft_config=copy.deepcopy(peft_config)))
    return out


def _first_batch(trainer):
    torch.manual_seed(0)  # the random sampler draws from torch's generator
    return next(iter(trainer.get_train_dataloader()))


def _step(trainer):
    batch = _first_batch(trainer)
    inputs = dict(batch)
    trainer.current_gradient_accumulation_steps = 1  # set by train(); training_step divides by it
    torch.manual_seed(1)  # dropout, where the option keeps it
    loss = trainer.training_step(trainer.model, inputs)
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    metrics = {k: list(v) for k, v in trainer._metrics["train"].items()}
    return batch, loss.detach(), grads, metrics


def _same_rows(ours, theirs):
    assert set(theirs.column_names) <= set(ours.column_names), (ours.column_names, theirs.column_names)
    assert set(ours.column_names) - set(theirs.column_names) <= {"chosen_z_bin", "rejected_z_bin"}
    assert len(ours) == len(theirs) > 0
    for col in theirs.column_names:
        assert ours[col] == theirs[col], col


def _assert_equivalent(ours, theirs):
    if isinstance(theirs.train_dataset, Dataset):
        _same_rows(ours.train_dataset, theirs.train_dataset)
    (b1, l1, g1, m1), (b2, l2, g2, m2) = _step(ours), _step(theirs)
    assert set(b1) - set(b2) <= {"z_bins"}
    for key in b2:
        torch.testing.assert_close(b1[key], b2[key], rtol=0, atol=0, msg=key)
    torch.testing.assert_close(l1, l2, rtol=0, atol=ATOL)
    assert g1.keys() == g2.keys() and g1
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=0, atol=ATOL, msg=name)
    assert set(m2) <= set(m1) and {"accuracy", "margin", "mean_reward", "num_tokens"} <= set(m2)
    for key in m2:
        assert m1[key] == pytest.approx(m2[key], abs=ATOL), key
    return b2, l2, g2


def _with_margin(ds):
    return ds.add_column("margin", [0.25 * (i % 4) for i in range(len(ds))])


def _implicit_prompt(ds):
    return ds.map(lambda r: {"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]},
                  remove_columns=["prompt"])


# name -> (RewardConfig options, dataset transform, conversational data)
CASES = {
    "defaults": ({}, None, False),
    "center_rewards_coefficient": (dict(center_rewards_coefficient=0.5), None, False),
    "margin_column": ({}, _with_margin, False),
    "max_length_none": (dict(max_length=None), None, False),
    "disable_dropout_true": (dict(disable_dropout=True), None, False),
    "conversational": ({}, None, True),
    "implicit_prompt": ({}, _implicit_prompt, False),
    "implicit_prompt_conversational": ({}, _implicit_prompt, True),
    "pad_to_multiple_of": (dict(pad_to_multiple_of=16), None, False),
    "pad_to_multiple_of_cli_string": (dict(pad_to_multiple_of="16"), None, False),
    "pad_to_multiple_of_none": (dict(pad_to_multiple_of=None), None, False),
    "eos_token": (dict(eos_token="<|system|>"), None, False),
    "dataset_num_proc": (dict(dataset_num_proc=2), None, False),
    "remove_unused_columns_false": (dict(remove_unused_columns=False), _with_margin, False),
    "per_device_train_batch_size_odd": (dict(per_device_train_batch_size=3), None, False),
}


@pytest.mark.parametrize("name", list(CASES))
def test_option_matches_trl(name, model_factory, tokenizer, pair_dataset, tmp_path):
    option, transform, conversational = CASES[name]
    ds = pair_dataset(8, conversational=conversational)
    if transform is not None:
        ds = transform(ds)
    batch, loss, _ = _assert_equivalent(*_trainers(model_factory(), tokenizer, ds, tmp_path, **option))
    if "pad_to_multiple_of" in option and option["pad_to_multiple_of"] is not None:
        assert batch["input_ids"].shape[1] % 16 == 0
    if name == "margin_column":
        assert "margin" in batch
    if name == "eos_token":
        last = batch["attention_mask"][0].sum() - 1
        assert batch["input_ids"][0, last] == tokenizer.convert_tokens_to_ids("<|system|>")


def test_the_loss_options_change_the_loss(model_factory, tokenizer, pair_dataset, tmp_path):
    """Guard for the cases above: centring and margins really move the loss on this batch."""
    losses = []
    for option, ds in (({}, pair_dataset(8)), (dict(center_rewards_coefficient=0.5), pair_dataset(8)),
                       ({}, _with_margin(pair_dataset(8)))):
        args = RewardConfig(**base_args(tmp_path, **option))
        trainer = RewardTrainer(model=model_factory(), args=args, train_dataset=ds,
                                processing_class=copy.deepcopy(tokenizer))
        losses.append(_step(trainer)[1].item())
    assert abs(losses[1] - losses[0]) > 1e-4 and abs(losses[2] - losses[0]) > 1e-4, losses


def test_max_length_filters_the_same_rows(model_factory, tokenizer, pair_dataset, tmp_path):
    ds = pair_dataset(16)
    ours, theirs = _trainers(model_factory(), tokenizer, ds, tmp_path, max_length=16)
    assert 0 < len(theirs.train_dataset) < len(ds)  # the option really drops rows here
    _assert_equivalent(ours, theirs)


def test_dropout_kept_with_disable_dropout_false(model_factory, tokenizer, pair_dataset, tmp_path):
    # Llama's attention dropout is functional (no nn.Dropout module), so it is active in training whatever
    # disable_dropout says; both trainers draw the same mask from the same seed.
    model = model_factory(attention_dropout=0.3)
    ours, theirs = _trainers(model, tokenizer, pair_dataset(8), tmp_path, disable_dropout=False)
    _assert_equivalent(ours, theirs)


def test_pad_token_deprecated_option(model_factory, tokenizer, pair_dataset, tmp_path):
    with pytest.warns(FutureWarning, match="pad_token"):
        ours, theirs = _trainers(model_factory(), tokenizer, pair_dataset(8), tmp_path, pad_token="<|system|>")
    batch, _, _ = _assert_equivalent(ours, theirs)
    pad_id = theirs.processing_class.convert_tokens_to_ids("<|system|>")
    assert ours.processing_class.pad_token_id == pad_id and (batch["input_ids"] == pad_id).any()


def test_chat_template_path_jinja_file(model_factory, tokenizer, pair_dataset, tmp_path):
    template = tmp_path / "template.jinja"
    template.write_text("{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }}<|end|>"
                        "{% endfor %}")
    ours, theirs = _trainers(model_factory(), tokenizer, pair_dataset(8, conversational=True), tmp_path,
                             chat_template_path=str(template))
    assert ours.processing_class.chat_template == theirs.processing_class.chat_template == template.read_text()
    _assert_equivalent(ours, theirs)


def test_chat_template_path_cloned_from_a_tokenizer(model_factory, tokenizer, pair_dataset, tiny_model_path,
                                                    tmp_path):
    # clone_chat_template also resizes the embeddings (to a multiple of 64) and adds filler tokens
    ours, theirs = _trainers(model_factory(), tokenizer, pair_dataset(8, conversational=True), tmp_path,
                             chat_template_path=tiny_model_path)
    assert len(ours.processing_class) == len(theirs.processing_class) > len(tokenizer)
    _assert_equivalent(ours, theirs)


def test_model_path_with_model_init_kwargs_and_seed(tokenizer, pair_dataset, tiny_model_path, tmp_path):
    # TRL loads the model itself (set_seed(args.seed) first, so the new reward head is the same)
    ours, theirs = _trainers(tiny_model_path, tokenizer, pair_dataset(8), tmp_path,
                             model_init_kwargs={"dtype": "float32"}, seed=3, trust_remote_code=False)
    assert ours.model.config.num_labels == 1
    _assert_equivalent(ours, theirs)


def test_peft_lora(model_factory, tokenizer, pair_dataset, tmp_path):
    from peft import LoraConfig

    lora = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                      init_lora_weights=False)
    ours, theirs = _trainers(model_factory(), tokenizer, pair_dataset(8), tmp_path, peft_config=lora)
    _, _, grads = _assert_equivalent(ours, theirs)
    assert all("lora" in n or "score" in n for n in grads) and any("score" in n for n in grads)


def _tokenized(ds, tokenizer, prefix):
    eos = tokenizer.eos_token
    return Dataset.from_list([{f"chosen{prefix}": tokenizer(r["prompt"] + r["chosen"] + eos)["input_ids"],
                               f"rejected{prefix}": tokenizer(r["prompt"] + r["rejected"] + eos)["input_ids"]}
                              for r in ds])


@pytest.mark.parametrize("suffix", ["_ids", "_input_ids"], ids=["tokenized", "tokenized_legacy_columns"])
def test_pretokenized_dataset(suffix, model_factory, tokenizer, pair_dataset, tmp_path):
    ds = _tokenized(pair_dataset(8), tokenizer, suffix)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TRL's deprecation of the legacy column names
        ours, theirs = _trainers(model_factory(), tokenizer, ds, tmp_path)
    _assert_equivalent(ours, theirs)


@pytest.mark.parametrize("features", [True, False], ids=["known_features", "unknown_features"])
def test_iterable_dataset(features, model_factory, tokenizer, pair_dataset, tmp_path):
    from datasets import IterableDataset

    rows = pair_dataset(8).to_list()
    if features:
        ds = Dataset.from_list(rows).to_iterable_dataset()
    else:  # a generator (like many streamed files) gives no column names until read
        ds = IterableDataset.from_generator(lambda: iter(rows))
        assert ds.column_names is None
    _assert_equivalent(*_trainers(model_factory(), tokenizer, ds, tmp_path))


def test_activation_offloading(model_factory, tokenizer, pair_dataset, tmp_path):
    if not torch.cuda.is_available():
        # TRL's offloading needs an accelerator (it reads torch.accelerator.current_accelerator().type): on CPU
        # both trainers fail the same way when built
        errors = []
        for cls, config_cls, extra in ((CausalRewardTrainer, CausalRewardConfig, dict(mmd_coef=0.0)),
                                       (RewardTrainer, RewardConfig, {})):
            with pytest.raises(Exception) as info:
                cls(model=model_factory(), args=config_cls(**base_args(tmp_path, activation_offloading=True, **extra)),
                    train_dataset=pair_dataset(8), processing_class=copy.deepcopy(tokenizer))
            errors.append((type(info.value), str(info.value)))
        assert errors[0] == errors[1]
        return
    _assert_equivalent(*_trainers(model_factory(), tokenizer, pair_dataset(8), tmp_path, activation_offloading=True))


def test_bf16(model_factory, tokenizer, pair_dataset, tmp_path):
    # explicit bf16 is never changed (alignkit only turns an *unset* bf16 off where there is no accelerator)
    kw = dict(bf16=True) if torch.cuda.is_available() else dict(bf16=True, use_cpu=True)
    ours, theirs = _trainers(model_factory(), tokenizer, pair_dataset(8), tmp_path, **kw)
    assert ours.args.bf16 and theirs.args.bf16
    _assert_equivalent(ours, theirs)


def test_no_attributes_at_mmd_coef_zero_is_trl_exactly(model_factory, tokenizer, pair_dataset, tmp_path):
    """A drop-in user who names no spurious attribute: no bin columns, no extra metrics, TRL's log keys."""
    for attributes in ([], None):
        args = CausalRewardConfig(**base_args(tmp_path, mmd_coef=0.0, attributes=attributes))
        assert args.attributes == []
    ours, theirs = _trainers(model_factory(), tokenizer, pair_dataset(8), tmp_path, ours_only=dict(attributes=[]))
    assert ours.train_dataset.column_names == theirs.train_dataset.column_names
    _assert_equivalent(ours, theirs)
    ours.train(), theirs.train()
    # alignkit's throughput metrics (perf/*, in every trainer's training logs) are the only addition
    assert [{k for k in e if not k.startswith("perf/")} for e in ours.state.log_history] == \
        [set(e) for e in theirs.state.log_history]
    assert all("perf/tokens_per_second" in e for e in ours.state.log_history if "loss" in e)
    with pytest.raises(ValueError, match="at least one spurious attribute"):
        CausalRewardConfig(**base_args(tmp_path, mmd_coef=1.0, attributes=[]))


# ---- evaluation ----------------------------------------------------------------------------------------------

def _assert_same_metrics(ours: dict, theirs: dict):
    keys = [k for k in theirs if not any(t in k for t in TIMING_KEYS)]
    assert {"eval_loss", "eval_accuracy", "eval_margin", "eval_mean_reward"} <= set(keys) or \
        {"loss", "accuracy"} <= set(keys) or "train_loss" in keys, keys
    for key in keys:
        assert key in ours, key
        assert ours[key] == pytest.approx(theirs[key], abs=ATOL), key


@pytest.mark.parametrize("option", [{}, dict(center_rewards_coefficient=0.5)], ids=["defaults", "center_rewards"])
def test_evaluate_matches_trl(option, model_factory, tokenizer, pair_dataset, tmp_path):
    # 7 eval pairs in batches of 3: the last batch is short (gather_for_metrics trims it)
    ours, theirs = _trainers(model_factory(), tokenizer, pair_dataset(8), tmp_path,
                             eval_dataset=pair_dataset(7, split="test"), per_device_eval_batch_size=3, **option)
    _assert_same_metrics(ours.evaluate(), theirs.evaluate())
    # a raw dataset passed to evaluate() is prepared like the one given at init
    extra = _with_margin(pair_dataset(5, split="test", seed=1))
    _assert_same_metrics(ours.evaluate(extra, metric_key_prefix="eval"),
                         theirs.evaluate(extra, metric_key_prefix="eval"))


def test_several_eval_sets_keep_their_names(model_factory, tokenizer, pair_dataset, tmp_path):
    """The one documented difference: with several eval sets TRL names every set's metrics `eval_<metric>` (the
    last set overwrites the others); ours are `eval_<set>_<metric>`, each equal to TRL's for that set alone."""
    evals = {"a": pair_dataset(6, split="test"), "b": pair_dataset(5, split="test", seed=1)}
    ours, theirs = _trainers(model_factory(), tokenizer, pair_dataset(8), tmp_path, eval_dataset=evals)
    got = ours.evaluate()
    for name in evals:
        alone = theirs.evaluate(name, metric_key_prefix=f"eval_{name}")
        for key, value in alone.items():
            if any(t in key for t in TIMING_KEYS):
                continue
            renamed = key.startswith("eval_") and not key.startswith(f"eval_{name}_")  # TRL's "eval_accuracy"
            ours_key = f"eval_{name}_" + key.removeprefix("eval_") if renamed else key
            assert got[ours_key] == pytest.approx(value, abs=ATOL), key


# ---- whole training runs -------------------------------------------------------------------------------------

RUNS = {
    # gradient checkpointing is switched on by train() (TRL's default: on), so it is compared here, on and off;
    # RewardTrainer.loss_is_scaled_for_ga = False: Trainer divides the loss by the accumulation steps
    "gradient_accumulation": dict(per_device_train_batch_size=4, gradient_accumulation_steps=2),
    "no_checkpointing_eval_steps_margin": dict(gradient_checkpointing=False, eval_strategy="steps", eval_steps=1,
                                               center_rewards_coefficient=0.1),
}


@pytest.mark.parametrize("name", list(RUNS))
def test_training_run_matches_trl(name, model_factory, tokenizer, pair_dataset, tmp_path):
    train = _with_margin(pair_dataset(16)) if "margin" in name else pair_dataset(16)
    evals = pair_dataset(4, split="test") if RUNS[name].get("eval_strategy") else None
    ours, theirs = _trainers(model_factory(), tokenizer, train, tmp_path, eval_dataset=evals, **RUNS[name])
    results = [t.train() for t in (ours, theirs)]
    assert ours.state.global_step == theirs.state.global_step == 2
    for p1, p2 in zip(ours.model.parameters(), theirs.model.parameters(), strict=True):
        torch.testing.assert_close(p1, p2, rtol=0, atol=ATOL)
    start = model_factory()
    assert max((p - q).abs().max() for p, q in zip(theirs.model.parameters(), start.parameters())) > 1e-4
    assert len(ours.state.log_history) == len(theirs.state.log_history)
    for e1, e2 in zip(ours.state.log_history, theirs.state.log_history):
        _assert_same_metrics(e1, e2)
    _assert_same_metrics(results[0].metrics, results[1].metrics)


# ---- options alignkit refuses --------------------------------------------------------------------------------

@pytest.mark.parametrize("option,message", [
    # TRL would add a reward for large rewards (the penalty turns into a bonus)
    (dict(center_rewards_coefficient=-0.01), "center_rewards_coefficient must be >= 0"),
    # TRL would filter out every row and fail later with an empty dataset
    (dict(max_length=0), "max_length must be an integer >= 1"),
])
def test_refused_options(option, message, tmp_path):
    RewardConfig(**base_args(tmp_path, **option))  # TRL takes them
    with pytest.raises(ValueError, match=message):
        CausalRewardConfig(**base_args(tmp_path, mmd_coef=0.0, **option))


def test_trl_reward_config_is_refused_with_the_fix(model_factory, tokenizer, pair_dataset, tmp_path):
    with pytest.raises(TypeError, match="needs a CausalRewardConfig, got RewardConfig"):
        CausalRewardTrainer(model=model_factory(), args=RewardConfig(**base_args(tmp_path)),
                            train_dataset=pair_dataset(8), processing_class=tokenizer)


# ---- the config ----------------------------------------------------------------------------------------------

def test_config_takes_every_reward_config_field(tmp_path):
    """Every RewardConfig field, under TRL's name and with TRL's default, and the same value after __post_init__."""
    ours = {f.name: f for f in dataclasses.fields(CausalRewardConfig)}
    for f in dataclasses.fields(RewardConfig):
        assert f.name in ours, f.name
        assert ours[f.name].init == f.init and ours[f.name].default == f.default, f.name
        if f.default_factory is not dataclasses.MISSING:
            assert ours[f.name].default_factory() == f.default_factory(), f.name
    options = dict(model_init_kwargs='{"dtype": "float32"}', trust_remote_code=True, chat_template_path="t.jinja",
                   disable_dropout=False, dataset_num_proc=2, eos_token="<|end|>", max_length=64,
                   pad_to_multiple_of="8", center_rewards_coefficient=0.01, activation_offloading=True,
                   pad_token="<|pad|>", learning_rate=5e-5, logging_steps=3, gradient_checkpointing=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # pad_token is deprecated in TRL
        mine = CausalRewardConfig(**base_args(tmp_path, mmd_coef=0.0, **options))
        trl = RewardConfig(**base_args(tmp_path, **options))
    assert mine.model_init_kwargs == {"dtype": "float32"} and mine.pad_to_multiple_of == 8
    for f in dataclasses.fields(RewardConfig):
        assert getattr(mine, f.name) == getattr(trl, f.name), f.name
