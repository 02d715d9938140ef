"""Step 3 of a run: the checks. Everything that can be checked without model weights, in the order a user fixes
things: the config's values, the models (configs only), the tokenizer, then every row of the data (formats, nulls,
lengths against max_length). `alignkit validate` is the plan plus these checks.

    recipe -> plan -> **checks** -> launch -> build -> execute

The datasets and the tokenizer loaded here are handed on (`Checked`), so that a run loads nothing twice. Errors are
RecipeError: one line that names the key or file and the fix (exit 2 in the CLI).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from .._util import first_line, info
from ..data.synthetic import load_builtin_dataset
from ..data.validation import (DatasetError, apply_column_mapping, check_data_file, iter_arrow, iter_rows,
                               locate_json_error, text_columns)
from ..models import (BUILTIN_PREFIX, ModelError, causal_lm_config, check_model_source, check_same_vocabulary,
                      check_score_head, empty_model, model_config, resolve_model_path)
from .plan import Plan
from .recipe import ON_POLICY_METHODS, REWARD_MODEL_METHODS, Recipe, RecipeError, dataset_validator

__all__ = ["Checked", "check", "validate", "load_split", "load_datasets", "load_tokenizer", "check_models",
           "count_overlong", "finished_line"]

_DATA_EXTENSIONS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def load_split(recipe: Recipe, split: str):
    ds = recipe.dataset
    name = ds.name
    if name.startswith(BUILTIN_PREFIX):
        try:
            return load_builtin_dataset(name[len(BUILTIN_PREFIX):], split, **ds.builtin_kwargs)
        except TypeError:
            import inspect

            from ..data.synthetic import BUILTIN_DATASETS

            params = [p for p in inspect.signature(BUILTIN_DATASETS[name[len(BUILTIN_PREFIX):]]).parameters
                      if p != "split"]
            bad = sorted(set(ds.builtin_kwargs) - set(params))
            raise RecipeError(f"dataset.builtin_kwargs: {name} takes {', '.join(params)}; not {', '.join(bad) or 'these'}."
                              ) from None
        except ValueError as exc:
            raise RecipeError(f"dataset.name: {exc}") from None
    import datasets

    path = Path(name).expanduser()
    if not path.exists() and (path.suffix.lower() in _DATA_EXTENSIONS or name.startswith((".", "/", "~"))
                              or name.count("/") > 1):
        raise RecipeError(f"dataset.name: no such file or folder {name!r}; check the path (relative paths start "
                          f"from the current directory, {os.getcwd()}).")
    try:
        if path.is_file():
            fmt = _DATA_EXTENSIONS.get(path.suffix.lower())
            if fmt is None:
                raise RecipeError(f"dataset.name: {name!r} has an unknown extension; use one of "
                                  f"{sorted(_DATA_EXTENSIONS)}.")
            check_data_file(path)
            try:
                return datasets.load_dataset(fmt, data_files=str(path), split="train")
            except Exception:
                if fmt == "json":
                    locate_json_error(path)  # raises DatasetError naming the line, if it finds one
                raise
        if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise RecipeError(f"dataset {name!r} has splits {list(loaded)}, not {split!r}; set "
                                      "dataset.train_split / dataset.eval_split to one of them.")
                return loaded[split]
            return loaded
        return datasets.load_dataset(name, ds.config, split=split)
    except (RecipeError, DatasetError):
        raise
    except ValueError as exc:  # unknown split and the like
        raise RecipeError(f"dataset {name!r}, split {split!r}: {first_line(exc)}") from None
    except Exception as exc:  # hub errors: offline, missing repo; parser errors
        raise RecipeError(
            f"could not load dataset {name!r} (split {split!r}): {type(exc).__name__}: {first_line(exc)}. "
            "Use a built-in dataset (builtin:sentiment), a local .json/.jsonl/.parquet/.csv file, or a hub id that "
            "is cached when running offline."
        ) from None


def load_datasets(recipe: Recipe):
    """Return ``(train_dataset, eval_dataset_or_None, warnings)``: mapped, and checked row by row (the
    validators' warnings, e.g. rows with identical chosen and rejected, as one line each)."""
    ds = recipe.dataset
    train = load_split(recipe, ds.train_split)
    eval_ = None
    if ds.eval_split:
        if Path(ds.name).is_file():
            raise RecipeError("dataset.eval_split: a single data file has one split; use dataset.test_size instead.")
        eval_ = load_split(recipe, ds.eval_split)
    train = apply_column_mapping(train, ds.columns, "train dataset")
    if eval_ is not None:
        eval_ = apply_column_mapping(eval_, ds.columns, "eval dataset")
    if ds.test_size:
        if eval_ is not None:
            raise RecipeError("dataset: set either eval_split or test_size, not both.")
        if len(train) < 2:
            raise RecipeError(f"dataset.test_size: the train split has {len(train)} row(s), too few to split off an "
                              "eval set; add rows or remove test_size.")
        parts = train.train_test_split(test_size=ds.test_size, seed=recipe.training.get("seed", 42))
        train, eval_ = parts["train"], parts["test"]
    if ds.max_train_samples:
        train = train.select(range(min(ds.max_train_samples, len(train))))
    if eval_ is not None and ds.max_eval_samples:
        eval_ = eval_.select(range(min(ds.max_eval_samples, len(eval_))))
    check = dataset_validator(recipe.method)
    warnings = list(check(train, "train dataset").warnings)
    if eval_ is not None:
        warnings += check(eval_, "eval dataset").warnings
    return train, eval_, warnings


def load_tokenizer(recipe: Recipe):
    """The policy's tokenizer, with a pad token (the EOS token when it has none)."""
    from transformers import AutoTokenizer

    m = recipe.model  # check_models (run first by preflight) has checked the folder and its tokenizer files
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(m.name_or_path),
                                                  trust_remote_code=m.trust_remote_code, revision=m.revision)
    except (OSError, ValueError) as exc:
        raise RecipeError(f"model.name_or_path: could not load the tokenizer of {m.name_or_path!r}: "
                          f"{first_line(exc)}") from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_models(recipe: Recipe) -> None:
    """Every model the recipe names exists and is usable (configs only, no weights): the policy with its
    tokenizer, the reference, PPO's reward and value models (one output, a trained head)."""
    m = recipe.model
    try:
        check_model_source(m.name_or_path, "model.name_or_path", need_tokenizer=True, revision=m.revision)
        if m.ref_name_or_path:
            if recipe.method in REWARD_MODEL_METHODS:
                raise ModelError(f"model.ref_name_or_path: method {recipe.method!r} trains a reward model and uses no "
                                 "reference model; remove it.")
            if recipe.method == "online_mdpo":
                raise ModelError("model.ref_name_or_path: online_mdpo runs on TRL's GRPOTrainer, which loads the "
                                 "reference from the policy's own checkpoint (model.name_or_path); remove it.")
            check_model_source(m.ref_name_or_path, "model.ref_name_or_path", need_tokenizer=False)
        r = recipe.reward
        heads = []
        if r is not None and r.function:
            from ..rewards import load_reward_function

            try:
                load_reward_function(r.function)
            except ValueError as exc:
                raise ModelError(f"reward.function: {exc}") from None
        if r is not None:
            if r.model:
                check_model_source(r.model, "reward.model", need_tokenizer=False)
                heads.append(("reward.model", r.model, True))
            if r.value_model:
                check_model_source(r.value_model, "reward.value_model", need_tokenizer=False)
                heads.append(("reward.value_model", r.value_model, False))
        if recipe.method in REWARD_MODEL_METHODS:
            heads.append(("model.name_or_path", m.name_or_path, False))
        for key, name, must_be_trained in heads:
            check_score_head(name, key, must_be_trained, trust_remote_code=m.trust_remote_code)
        if recipe.method in REWARD_MODEL_METHODS:
            config = model_config(m.name_or_path, "model.name_or_path", m.trust_remote_code, m.revision)
        else:  # a policy, and its reference, are causal LMs with one vocabulary
            config = causal_lm_config(m.name_or_path, "model.name_or_path", m.trust_remote_code, m.revision)
            if m.ref_name_or_path:
                ref = causal_lm_config(m.ref_name_or_path, "model.ref_name_or_path", m.trust_remote_code)
                check_same_vocabulary(config, ref, "model.ref_name_or_path", m.ref_name_or_path)
    except ModelError as exc:
        raise RecipeError(str(exc)) from None
    except (OSError, ValueError) as exc:
        raise RecipeError(f"could not read the model config: {first_line(exc)}") from None
    if recipe.method in REWARD_MODEL_METHODS:
        _check_shared_prefix_backbone(recipe, config)
    if recipe.peft is not None:
        _check_lora_targets(recipe, config)


def _check_shared_prefix_backbone(recipe: Recipe, config) -> None:
    """`shared_prefix` needs a causal backbone: an encoder's prompt tokens see the completion (checked on the config,
    before any weights load; the trainer checks the model again)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    if recipe.training.get("shared_prefix") and config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        raise RecipeError(f"shared_prefix: {recipe.model.name_or_path} is a {config.model_type} encoder, which attends "
                          "in both directions, so a pair's two sequences cannot share their prompt; set shared_prefix: "
                          "false (--set shared_prefix=false) for this model.")


def _check_lora_targets(recipe: Recipe, config) -> None:
    """The PEFT section's target_modules match modules of the model (on the meta device: no weights)."""
    peft_config = recipe.build_peft_config()
    kind = "seqcls" if recipe.method in REWARD_MODEL_METHODS else "causal"
    try:
        empty_model(config, kind, peft_config)
    except ValueError as exc:
        if "target modules" not in str(exc).lower():  # another value PEFT refuses, e.g. r: 0
            raise RecipeError(f"peft: {first_line(exc)}") from None
        import torch

        linear = sorted({n.rsplit(".", 1)[-1] for n, mod in empty_model(config, kind).named_modules()
                         if isinstance(mod, torch.nn.Linear)})
        raise RecipeError(f"peft.target_modules: {peft_config.target_modules} match no module of "
                          f"{recipe.model.name_or_path} ({first_line(exc)[:120]}); its linear layers are "
                          f"{', '.join(linear[:12])}, or say all-linear.") from None


#: special tokens a tokenizer may add around a text (BOS/EOS, a prefix space): a text of B UTF-8 bytes has at
#: most B + this many tokens (a byte-level BPE token covers at least one byte; WordPiece and SentencePiece
#: at least one character or an unknown token)
_TOKEN_MARGIN = 16


def count_overlong(recipe: Recipe, config, tokenizer, dataset) -> tuple[int, int, int]:
    """How many rows TRL would drop for their length: ``(dropped, rows, longest)``. f-DPO/mDPO drop a row whose
    prompt alone is at least ``max_length`` tokens (with truncation_mode keep_start); the reward trainer one
    whose prompt + completion is longer than ``max_length``. Only rows whose UTF-8 size could reach the limit
    are tokenized (sizes of plain-text columns are read from Arrow), so a dataset of short rows costs one
    vectorised pass."""
    limit = getattr(config, "max_length", None)
    if limit is None or recipe.method in ON_POLICY_METHODS or getattr(config, "truncation_mode", "keep_start") != "keep_start":
        return 0, len(dataset), 0
    reward = recipe.method in REWARD_MODEL_METHODS
    names = dataset.column_names or []
    cols = [c for c in (["prompt", "chosen", "rejected"] if reward else ["prompt"]) if c in names]
    if not cols or "chosen" not in names:
        return 0, len(dataset), 0
    eos = tokenizer.eos_token or ""

    def ids(prompt, completion=None, generation_prompt=False) -> list[int]:
        if isinstance(prompt if prompt is not None else completion, list):  # conversational
            return tokenizer.apply_chat_template((prompt or []) + (completion or []), tokenize=True, return_dict=True,
                                                 add_generation_prompt=generation_prompt)["input_ids"]
        # verbose=False: counting long rows is the point here, not a warning about them
        return tokenizer((prompt or "") + (completion or ""), verbose=False)["input_ids"]

    def common_prefix(a, b) -> int:
        n = 0
        for x, y in zip(a, b):
            if x != y:
                break
            n += 1
        return n

    def row_tokens(row) -> int:
        """As TRL measures it: the reward trainer, prompt + completion (+ EOS for text); DPO, the prompt up to
        where it stops being a prefix of prompt + completion (tokens can merge across the boundary)."""
        prompt = row.get("prompt")
        text = not isinstance(prompt if prompt is not None else row["chosen"], list)
        if reward:
            return max(len(ids(prompt, row[side] + eos if text else row[side])) for side in ("chosen", "rejected"))
        prompt_ids = ids(prompt, None, generation_prompt=True)
        completions = [c for side in ("chosen", "rejected") for c in
                       (row[side] if recipe.method == "mdpo" else [row[side]])]
        return min(common_prefix(prompt_ids, ids(prompt, c)) for c in completions)

    def size(value) -> int:
        if isinstance(value, str):
            return len(value.encode())
        return len(tokenizer.apply_chat_template(value, tokenize=False).encode()) if value else 0

    candidates: list[int] = []  # rows whose size could reach the limit
    if text_columns(dataset, cols):
        import pyarrow.compute as pc

        for offset, batch in iter_arrow(dataset, cols):
            sizes = pc.binary_length(batch.column("prompt")) if "prompt" in cols else None
            if reward:
                longest_side = pc.max_element_wise(pc.binary_length(batch.column("chosen")),
                                                   pc.binary_length(batch.column("rejected")))
                sizes = longest_side if sizes is None else pc.add(sizes, longest_side)
            hits = pc.indices_nonzero(pc.greater_equal(sizes, limit - _TOKEN_MARGIN))
            candidates += [offset + i.as_py() for i in hits]
    else:
        for i, row in iter_rows(dataset, cols):
            total = size(row.get("prompt")) + (max(size(row["chosen"]), size(row["rejected"])) if reward else 0)
            if total + _TOKEN_MARGIN >= limit:
                candidates.append(i)
    lengths = [row_tokens(row) for _, row in iter_rows(dataset.select(candidates), [c for c in (
        "prompt", "chosen", "rejected") if c in names])] if candidates else []
    dropped = sum((n > limit) if reward else (n >= limit) for n in lengths)
    return dropped, len(dataset), max(lengths, default=0)


def _check_lengths(recipe: Recipe, config, tokenizer, dataset, where: str) -> list[str]:
    dropped, rows, longest = count_overlong(recipe, config, tokenizer, dataset)
    what = "prompt + completion is longer than" if recipe.method in REWARD_MODEL_METHODS else \
        "prompt alone is at least"
    if dropped and dropped == rows:
        raise RecipeError(f"{where}: every row (all {rows}) would be dropped by TRL: its {what} max_length="
                          f"{config.max_length} tokens (the longest has {longest}). Raise max_length (e.g. max_length: "
                          f"{max(2 * config.max_length, longest + 64)}) or shorten the prompts.")
    if dropped:
        return [f"{where}: {dropped} of {rows} rows will be dropped by TRL: their {what} max_length="
                f"{config.max_length} tokens; raise max_length to keep them."]
    return []


@dataclasses.dataclass
class Checked:
    """What the checks produced, handed on to the build step so that nothing is loaded twice."""

    config: Any
    train_dataset: Any
    eval_dataset: Any
    tokenizer: Any
    warnings: list[str]


def check(plan: Plan) -> Checked:
    """Every check that can run without model weights (the plan has checked the distributed section, PEFT and
    output_dir). Raises RecipeError."""
    recipe = plan.recipe
    config = plan.build_config()
    check_models(recipe)
    tokenizer = load_tokenizer(recipe)
    train_ds, eval_ds, warnings = load_datasets(recipe)
    if eval_ds is None and config.eval_strategy != "no":
        raise RecipeError(f"eval_strategy is {getattr(config.eval_strategy, 'value', config.eval_strategy)!r} but the "
                          "dataset section names no eval split; "
                          "set dataset.eval_split or dataset.test_size, or eval_strategy: 'no'.")
    for ds, where in ((train_ds, "train dataset"), (eval_ds, "eval dataset")):
        if ds is not None:
            _check_positions(recipe, config, tokenizer, ds, where)
            warnings += _check_lengths(recipe, config, tokenizer, ds, where)
    return Checked(config, train_ds, eval_ds, tokenizer, warnings)


def _check_positions(recipe: Recipe, config, tokenizer, dataset, where: str) -> None:
    """An encoder with learned absolute positions (BERT, MiniLM) cannot read a text longer than its positions: with
    max_length above them (TRL's default is 1024), such rows would crash the forward. Counted and refused here, with
    the numbers and the max_length that drops them."""
    if recipe.method not in REWARD_MODEL_METHODS:
        return
    cfg = model_config(recipe.model.name_or_path, "model.name_or_path", recipe.model.trust_remote_code)
    positions = getattr(cfg, "max_position_embeddings", None)
    if getattr(cfg, "position_embedding_type", None) != "absolute" or not positions:
        return
    if config.max_length is not None and config.max_length <= positions:
        return
    dropped, rows, longest = count_overlong(recipe, SimpleNamespace(max_length=positions), tokenizer, dataset)
    if dropped:
        raise RecipeError(f"{where}: {dropped} of {rows} rows are longer than the {positions} positions of "
                          f"{recipe.model.name_or_path} (the longest has {longest} tokens; max_length is "
                          f"{config.max_length}): they would crash its forward. Set max_length: {positions} (TRL then "
                          "drops them), or shorten them.")


def finished_line(plan: Plan) -> str:
    """What `train` says, and does instead of training, when asked to resume a run that already finished."""
    return (f"{plan.output_dir} holds a finished run (step {plan.finished.get('step')}, status complete): resuming "
            "it would train past its end, so nothing was trained. To train further, start a new run in another "
            "output_dir (or set overwrite_output_dir: true to replace this one).")


def validate(plan: Plan) -> dict:
    """`alignkit validate`: the plan and every check, without training. Warnings are printed; errors raise
    RecipeError. Returns a summary."""
    checked = check(plan)
    for w in checked.warnings:
        info(f"warning: {w}")
    return {
        "method": plan.method,
        "config": type(checked.config).__name__,
        "train_examples": len(checked.train_dataset),
        "eval_examples": len(checked.eval_dataset) if checked.eval_dataset is not None else 0,
        "output_dir": checked.config.output_dir,
        **({"resume_from": plan.resume_from} if plan.resume_from else {}),
        **({"finished": "nothing to resume"} if plan.finished is not None else {}),
    }
