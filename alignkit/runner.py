"""Run a recipe: load the model and data it names, build the trainer, train, save."""

from __future__ import annotations

import glob
import json
import os
import sys
from pathlib import Path

from .data.synthetic import load_builtin_dataset
from .data.validation import apply_column_mapping
from .models import BUILTIN_PREFIX, resolve_model_path
from .recipes import REWARD_MODEL_METHODS, Recipe, RecipeError, dataset_validator, trainer_class

__all__ = ["load_datasets", "load_model_and_tokenizer", "validate", "train"]

_DATA_EXTENSIONS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def _info(msg: str) -> None:
    print(f"[alignkit] {msg}", file=sys.stderr, flush=True)


def _load_split(recipe: Recipe, split: str):
    ds = recipe.dataset
    name = ds.name
    if name.startswith(BUILTIN_PREFIX):
        try:
            return load_builtin_dataset(name[len(BUILTIN_PREFIX):], split, **ds.builtin_kwargs)
        except TypeError as exc:
            raise RecipeError(f"dataset.builtin_kwargs: {exc}") from None
    import datasets

    path = Path(name)
    try:
        if path.is_file():
            fmt = _DATA_EXTENSIONS.get(path.suffix.lower())
            if fmt is None:
                raise RecipeError(f"dataset.name: {name!r} has an unknown extension; use one of {sorted(_DATA_EXTENSIONS)}.")
            return datasets.load_dataset(fmt, data_files=str(path), split="train")
        if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise RecipeError(f"dataset {name!r} has splits {list(loaded)}, not {split!r}.")
                return loaded[split]
            return loaded
        return datasets.load_dataset(name, ds.config, split=split)
    except RecipeError:
        raise
    except ValueError as exc:  # unknown split and the like
        raise RecipeError(f"dataset {name!r}, split {split!r}: {exc}") from None
    except Exception as exc:  # hub errors: offline, missing repo
        raise RecipeError(
            f"could not load dataset {name!r} (split {split!r}): {type(exc).__name__}: {str(exc).splitlines()[0]}. "
            "Use a built-in dataset (builtin:sentiment), a local .json/.jsonl/.parquet file, or a hub id that is "
            "cached when running offline."
        ) from None


def load_datasets(recipe: Recipe):
    """Return ``(train_dataset, eval_dataset_or_None)``, mapped and validated."""
    ds = recipe.dataset
    train = _load_split(recipe, ds.train_split)
    eval_ = None
    if ds.eval_split:
        if Path(ds.name).is_file():
            raise RecipeError("dataset.eval_split: a single data file has one split; use dataset.test_size instead.")
        eval_ = _load_split(recipe, ds.eval_split)
    train = apply_column_mapping(train, ds.columns, "train dataset")
    if eval_ is not None:
        eval_ = apply_column_mapping(eval_, ds.columns, "eval dataset")
    if ds.test_size:
        if eval_ is not None:
            raise RecipeError("dataset: set either eval_split or test_size, not both.")
        parts = train.train_test_split(test_size=ds.test_size, seed=recipe.training.get("seed", 42))
        train, eval_ = parts["train"], parts["test"]
    if ds.max_train_samples:
        train = train.select(range(min(ds.max_train_samples, len(train))))
    if eval_ is not None and ds.max_eval_samples:
        eval_ = eval_.select(range(min(ds.max_eval_samples, len(eval_))))
    check = dataset_validator(recipe.method)
    check(train, "train dataset")
    if eval_ is not None:
        check(eval_, "eval dataset")
    return train, eval_


def load_model_and_tokenizer(recipe: Recipe, weights: bool = True):
    """Policy, reference (or None) and tokenizer. With ``weights=False`` only configs are loaded."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    m = recipe.model
    path = resolve_model_path(m.name_or_path)
    common = dict(trust_remote_code=m.trust_remote_code, revision=m.revision)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **common)
        if not weights:
            AutoConfig.from_pretrained(path, **common)
            if m.ref_name_or_path:
                AutoConfig.from_pretrained(resolve_model_path(m.ref_name_or_path), **common)
            return None, None, tokenizer
        dtype = m.dtype if m.dtype == "auto" else getattr(torch, m.dtype)
        kwargs = dict(common, dtype=dtype)
        if m.attn_implementation:
            kwargs["attn_implementation"] = m.attn_implementation
        if recipe.method in REWARD_MODEL_METHODS:
            if m.ref_name_or_path:
                raise RecipeError(f"model.ref_name_or_path: method {recipe.method!r} trains a reward model and uses no "
                                  "reference model; remove it.")
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        ref = None
        if m.ref_name_or_path:
            ref = AutoModelForCausalLM.from_pretrained(resolve_model_path(m.ref_name_or_path), **kwargs)
    except OSError as exc:
        raise RecipeError(
            f"could not load model {m.name_or_path!r}: {str(exc).splitlines()[0]} Use a local folder, a hub id "
            "that is cached when running offline, or builtin:tiny-llama."
        ) from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, ref, tokenizer


def _ppo_models(recipe: Recipe, policy, ref, peft_config) -> dict:
    """PPO's reward source, value model and reference (a copy of the policy unless PEFT or given)."""
    import copy

    from transformers import AutoModelForSequenceClassification

    from .rewards import load_reward_function

    r = recipe.reward
    dtype = policy.dtype

    def seq_cls(name):
        try:
            return AutoModelForSequenceClassification.from_pretrained(resolve_model_path(name), num_labels=1,
                                                                      dtype=dtype)
        except OSError as exc:
            raise RecipeError(f"could not load reward/value model {name!r}: {str(exc).splitlines()[0]} Train one "
                              "first (e.g. alignkit train recipes/crm-sycophancy.yaml) or fix the path.") from None

    try:
        reward = load_reward_function(r.function) if r.function else seq_cls(r.model)
    except ValueError as exc:
        raise RecipeError(f"reward.function: {exc}") from None
    value = seq_cls(r.value_model or r.model or recipe.model.name_or_path)
    if ref is None and peft_config is None:
        ref = copy.deepcopy(policy)
    return {"reward_model": reward, "value_model": value, "ref_model": ref}


def _wants_wandb(config) -> bool:
    report_to = config.report_to or []
    return "wandb" in (report_to if isinstance(report_to, list) else [report_to]) or report_to == "all"


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def setup_wandb(recipe: Recipe, config) -> str | None:
    """Configure W&B from the recipe; switch to offline mode when no API key is available.

    Returns the W&B directory when the run is offline (to tell the user how to sync it).
    """
    if not _wants_wandb(config):
        return None
    section = recipe.wandb
    if section is not None:
        for env, value in (("WANDB_PROJECT", section.project), ("WANDB_ENTITY", section.entity),
                           ("WANDB_RUN_GROUP", section.group)):
            if value:
                os.environ[env] = value
        if section.tags:
            os.environ["WANDB_TAGS"] = ",".join(section.tags)
    os.environ.setdefault("WANDB_PROJECT", "alignkit")
    mode = section.mode if section is not None else "auto"
    if mode == "offline" or (mode == "auto" and os.environ.get("WANDB_MODE") != "online" and not _has_wandb_key()):
        if mode == "auto" and os.environ.get("WANDB_MODE") not in ("offline", "dryrun"):
            _info("W&B: no API key found (WANDB_API_KEY or ~/.netrc), so this run is logged offline.")
        os.environ["WANDB_MODE"] = "offline"
    elif mode == "online":
        os.environ["WANDB_MODE"] = "online"
    if os.environ.get("WANDB_MODE") == "offline":
        wandb_dir = os.environ.setdefault("WANDB_DIR", str(Path(config.output_dir).resolve()))
        Path(wandb_dir).mkdir(parents=True, exist_ok=True)
        return wandb_dir
    return None


def validate(recipe: Recipe) -> dict:
    """Check everything a run needs without training: config, PEFT, datasets, tokenizer and model config."""
    config = recipe.build_config()
    recipe.build_peft_config()
    train_ds, eval_ds = load_datasets(recipe)
    load_model_and_tokenizer(recipe, weights=False)
    return {
        "method": recipe.method,
        "config": type(config).__name__,
        "train_examples": len(train_ds),
        "eval_examples": len(eval_ds) if eval_ds is not None else 0,
        "output_dir": config.output_dir,
    }


def train(recipe: Recipe) -> dict:
    """Train as the recipe says; save model, tokenizer, recipe and metrics to ``output_dir``."""
    config = recipe.build_config()
    peft_config = recipe.build_peft_config()
    train_ds, eval_ds = load_datasets(recipe)
    if eval_ds is None and config.eval_strategy != "no":
        raise RecipeError(f"eval_strategy is {config.eval_strategy!r} but the dataset section names no eval split; "
                          "set dataset.eval_split or dataset.test_size, or eval_strategy: 'no'.")
    wandb_dir = setup_wandb(recipe, config)
    # Seed before any model is built: a newly initialised head (PPO's value and reward heads, a reward
    # model's score) draws from the global RNG. Trainer seeds again in its __init__, too late for those.
    from transformers import enable_full_determinism, set_seed

    enable_full_determinism(config.seed) if config.full_determinism else set_seed(config.seed)
    model, ref, tokenizer = load_model_and_tokenizer(recipe)
    trainer_cls = trainer_class(recipe.method)
    kwargs = dict(model=model, args=config, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer,
                  peft_config=peft_config)
    if recipe.method == "ppo":
        kwargs.update(_ppo_models(recipe, model, ref, peft_config))
    elif recipe.method not in REWARD_MODEL_METHODS:
        kwargs["ref_model"] = ref
    try:
        trainer = trainer_cls(**kwargs)
    except ValueError as exc:  # the trainers' own checks of data and arguments: one line, not a traceback
        raise RecipeError(f"{recipe.source or 'recipe'}: {exc}") from None
    trainer.alignkit_recipe = recipe.to_yaml()
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if trainer.is_world_process_zero():
        (out / "alignkit_recipe.yaml").write_text(recipe.to_yaml())

    resume = config.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "latest"):
        resume = True
    result = trainer.train(resume_from_checkpoint=resume)
    metrics = {"train": result.metrics}
    if eval_ds is not None:
        metrics["eval"] = trainer.evaluate()
    trainer.save_model(str(out))
    trainer.create_model_card(model_name=out.name)  # Trainer only writes one at checkpoints or on push
    metrics["log_history"] = trainer.state.log_history
    if trainer.is_world_process_zero():
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
        scores = [e for e in trainer.state.log_history if "objective/scores" in e]
        if len(scores) >= 2:
            div = f"divergence/{config.divergence}"
            _info(f"mean score {scores[0]['objective/scores']:.3f} (iteration {scores[0]['step']}) -> "
                  f"{scores[-1]['objective/scores']:.3f} (iteration {scores[-1]['step']}); {config.divergence} "
                  f"estimate {scores[0][div]:.3f} -> {scores[-1][div]:.3f}")
        key = "eval_accuracy" if recipe.method in REWARD_MODEL_METHODS else "eval_rewards/accuracies"
        evals = [e for e in trainer.state.log_history if key in e]
        if len(evals) >= 2:
            first, last = evals[0], evals[-1]
            _info(f"eval (preference) accuracy {first[key]:.2f} (step {first['step']}) -> {last[key]:.2f} "
                  f"(step {last['step']}); eval loss {first['eval_loss']:.4f} -> {last['eval_loss']:.4f}")
        _info(f"saved model, tokenizer, recipe and metrics.json to {out}")
        if wandb_dir:
            runs = sorted(glob.glob(os.path.join(wandb_dir, "wandb", "offline-run-*")), key=os.path.getmtime)
            if runs:
                _info(f"W&B run saved offline in {runs[-1]}; upload it with: wandb sync {runs[-1]}")
    return metrics
