"""Run a recipe: check everything, load the model and data it names, build the trainer, train, save."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from ._util import first_line
from .data.synthetic import load_builtin_dataset
from .data.validation import (DatasetError, apply_column_mapping, check_data_file, iter_arrow, iter_rows,
                              locate_json_error, text_columns)
from .models import BUILTIN_PREFIX, ModelError, check_model_source, check_score_head, resolve_model_path
from .recipes import ON_POLICY_METHODS, REWARD_MODEL_METHODS, Recipe, RecipeError, config_class, dataset_validator, trainer_class

__all__ = ["load_datasets", "load_tokenizer", "load_models", "preflight", "validate", "train", "run_status",
           "mark_failed", "STATUS_FILE"]

_DATA_EXTENSIONS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def _info(msg: str) -> None:
    print(f"[alignkit] {msg}", file=sys.stderr, flush=True)


def _load_split(recipe: Recipe, split: str):
    ds = recipe.dataset
    name = ds.name
    if name.startswith(BUILTIN_PREFIX):
        try:
            return load_builtin_dataset(name[len(BUILTIN_PREFIX):], split, **ds.builtin_kwargs)
        except TypeError:
            import inspect

            from .data.synthetic import BUILTIN_DATASETS

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


def load_models(recipe: Recipe):
    """The policy (or, for reward-model methods, the reward model being trained) and the reference (or None)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    m = recipe.model
    dtype = m.dtype if m.dtype == "auto" else getattr(torch, m.dtype)
    kwargs = dict(trust_remote_code=m.trust_remote_code, revision=m.revision, dtype=dtype)
    if m.attn_implementation:
        kwargs["attn_implementation"] = m.attn_implementation
    path = resolve_model_path(m.name_or_path)
    try:
        if recipe.method in REWARD_MODEL_METHODS:
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        ref = None
        if m.ref_name_or_path:
            ref = AutoModelForCausalLM.from_pretrained(resolve_model_path(m.ref_name_or_path), **kwargs)
    except (OSError, ValueError) as exc:
        raise RecipeError(f"model.name_or_path: could not load {m.name_or_path!r}: {first_line(exc)}") from None
    return model, ref


def _ppo_models(recipe: Recipe, policy, ref, peft_config) -> dict:
    """PPO's reward source, value model and reference (a copy of the policy unless PEFT or given); online mDPO's
    reward source and reference (it has no value model)."""
    import copy

    from transformers import AutoModelForSequenceClassification

    from .rewards import load_reward_function

    r = recipe.reward
    dtype = policy.dtype

    def seq_cls(key, name):
        try:
            return AutoModelForSequenceClassification.from_pretrained(resolve_model_path(name), num_labels=1,
                                                                      dtype=dtype)
        except (OSError, ValueError) as exc:
            raise RecipeError(f"{key}: could not load {name!r}: {first_line(exc)}") from None

    try:
        reward = load_reward_function(r.function) if r.function else seq_cls("reward.model", r.model)
    except ValueError as exc:
        raise RecipeError(f"reward.function: {exc}") from None
    models = {"reward_model": reward}
    if recipe.method == "ppo":
        value_key = "reward.value_model" if r.value_model else "reward.model" if r.model else "model.name_or_path"
        models["value_model"] = seq_cls(value_key, r.value_model or r.model or recipe.model.name_or_path)
    if ref is None and peft_config is None:
        from transformers.integrations import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled():
            # the policy was loaded sharded (zero.Init) and a copy of its shards is no model: the reference is
            # loaded again from the same checkpoint
            ref, _ = load_models(recipe)
        else:
            ref = copy.deepcopy(policy)
    return {**models, "ref_model": ref}


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


# ---- what a run writes, and how a new run treats what is already there ---------------------------------

#: the run's status file: {"status": "running" | "complete" | "interrupted" | "failed", ...}; a run is
#: finished only when it says "complete" (written last, after the model, the card and metrics.json)
STATUS_FILE = "alignkit_run.json"
#: files and folders a run writes into output_dir; any of them there means the folder holds a run
RUN_ARTIFACTS = ("alignkit_recipe.yaml", STATUS_FILE, "metrics.json", "config.json", "model.safetensors",
                 "pytorch_model.bin", "adapter_config.json", "adapter_model.safetensors", "training_args.bin",
                 "trainer_state.json", "value_model", "alignkit_attribute_bins.json")
#: recipe keys that do not change what is trained: a checkpoint may be resumed with other values for them
NOT_TRAINING_KEYS = {
    "output_dir", "resume_from_checkpoint", "overwrite_output_dir", "report_to", "run_name", "project",
    "trackio_space_id", "disable_tqdm", "log_level", "log_level_replica", "log_on_each_node", "logging_dir",
    "logging_strategy", "logging_first_step", "logging_steps", "logging_nan_inf_filter", "save_strategy",
    "save_steps", "save_total_limit", "save_only_model", "save_safetensors", "save_on_each_node", "eval_strategy",
    "eval_steps", "eval_on_start", "eval_delay", "per_device_eval_batch_size", "eval_accumulation_steps",
    "prediction_loss_only", "load_best_model_at_end", "metric_for_best_model", "greater_is_better",
    "dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers", "dataloader_prefetch_factor",
    "push_to_hub", "hub_model_id", "hub_strategy", "hub_token", "hub_private_repo", "hub_always_push",
    "hub_revision", "include_num_input_tokens_seen", "generate_during_eval", "num_sample_generations",
    "wandb", "dataset.eval_split", "dataset.max_eval_samples", "dataset_num_proc",
    "distributed.main_process_ip", "distributed.main_process_port",
}


def _run_artifacts(out: Path) -> list[str]:
    if not out.is_dir():
        return []
    found = [name for name in RUN_ARTIFACTS if (out / name).exists()]
    found += sorted(p.name for p in out.glob("checkpoint-*") if p.is_dir())
    return found


def _write_status(out: Path, status: str, **extra) -> None:
    from . import __version__

    record = {"status": status, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "alignkit": __version__, **extra}
    tmp = out / f".{STATUS_FILE}.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, out / STATUS_FILE)


def run_status(output_dir: str | os.PathLike) -> dict | None:
    """The status record of the run in ``output_dir`` (``None`` if none): a run is finished only when its
    ``status`` is ``"complete"``."""
    try:
        return json.loads((Path(output_dir) / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None


def mark_failed(output_dir: str | os.PathLike, error: str) -> None:
    """A run whose workers failed (the launcher saw them die) is marked failed, not left "running"; the latest
    complete checkpoint is named for a resume."""
    out = Path(output_dir)
    record = run_status(out)
    if record is None or record.get("status") != "running":
        return
    done = complete_checkpoints(out)
    _write_status(out, "failed", error=error[:500], latest_checkpoint=done[-1].name if done else None,
                  resumed_from=record.get("resumed_from"))


def complete_checkpoints(out: Path) -> list[Path]:
    """Checkpoints of ``out`` that were written to the end (Trainer writes trainer_state.json last), oldest first."""
    found = []
    for p in out.glob("checkpoint-*") if out.is_dir() else []:
        step = p.name.split("-", 1)[1]
        if p.is_dir() and step.isdigit() and (p / "trainer_state.json").is_file():
            found.append((int(step), p))
    return [p for _, p in sorted(found)]


def _fingerprint(recipe: Recipe) -> dict[str, Any]:
    """The recipe's settings as flat ``key -> value`` (sections as ``section.key``), config fields filled with
    their defaults, so that two recipes compare equal exactly when they train the same way."""
    import dataclasses

    cls = config_class(recipe.method)
    flat: dict[str, Any] = {"method": recipe.method}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.name in recipe.training:
            flat[f.name] = recipe.training[f.name]
        elif f.default is not dataclasses.MISSING:
            flat[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            flat[f.name] = f.default_factory()
    from .recipes import DistributedSection

    for name in ("model", "dataset", "reward", "distributed"):
        section = getattr(recipe, name)
        if section is None and name == "distributed":
            section = DistributedSection()  # one process: the same as the section's defaults
        for k, v in (section.model_dump() if section is not None else {}).items():
            flat[f"{name}.{k}"] = v
    for k, v in (recipe.peft or {}).items():
        flat[f"peft.{k}"] = v
    return flat


def _training_differences(old: Recipe, new: Recipe) -> list[str]:
    a, b = _fingerprint(old), _fingerprint(new)
    keys = sorted(set(a) | set(b), key=list({**a, **b}).index)
    return [k for k in keys if k not in NOT_TRAINING_KEYS and k.split(".")[0] not in NOT_TRAINING_KEYS
            and a.get(k) != b.get(k)]


def _resolve_resume(recipe: Recipe, out: Path) -> str | None:
    """The checkpoint to resume from (None: a new run), after checking it belongs to this recipe."""
    from .recipes import load_recipe

    resume = recipe.training.get("resume_from_checkpoint")
    if resume is None or str(resume).lower() in ("false", "no", "none", ""):
        return None
    if str(resume).lower() in ("true", "yes", "latest"):
        found = complete_checkpoints(out)
        if not found:
            raise RecipeError(f"resume_from_checkpoint: {resume}: {out} holds no complete checkpoint to resume from "
                              "(checkpoints are written every save_steps with save_strategy: steps). Remove "
                              "resume_from_checkpoint to start a new run.")
        checkpoint = found[-1]
    else:
        checkpoint = Path(str(resume))
        if not checkpoint.is_dir():
            raise RecipeError(f"resume_from_checkpoint: no such checkpoint folder {str(resume)!r}; give a "
                              "checkpoint-N folder, or true for the latest one in output_dir.")
        if not (checkpoint / "trainer_state.json").is_file():
            raise RecipeError(f"resume_from_checkpoint: {str(resume)!r} is not a complete checkpoint (no "
                              "trainer_state.json: it was interrupted while being written, or is not a checkpoint); "
                              "give an earlier checkpoint-N folder.")
    saved = next((p for p in (checkpoint / "alignkit_recipe.yaml", checkpoint.parent / "alignkit_recipe.yaml")
                  if p.is_file()), None)
    if saved is not None:
        try:
            old = load_recipe(saved)
        except RecipeError as exc:
            raise RecipeError(f"resume_from_checkpoint: the recipe saved with {checkpoint} cannot be read ({exc}); "
                              "start a new run in another output_dir.") from None
        differs = _training_differences(old, recipe)
        if differs:
            shown = ", ".join(f"{k} ({_fingerprint(old).get(k)!r} -> {_fingerprint(recipe).get(k)!r})"
                              for k in differs[:4]) + (", ..." if len(differs) > 4 else "")
            raise RecipeError(f"resume_from_checkpoint: {checkpoint} was trained with other settings: {shown}. "
                              "Resuming would mix two runs; restore those values, or start a new run in another "
                              "output_dir.")
    return str(checkpoint)


def _plan_output(recipe: Recipe, config) -> str | None:
    """Check output_dir before anything is trained: a file is refused; a folder holding another run is refused
    unless the recipe resumes it or says overwrite_output_dir: true. Returns the checkpoint to resume from.

    In a process launched by `alignkit train` for the distributed section, the launching process has made
    this check already; the workers skip the refusal (rank 0 may already have written this run's recipe)."""
    from .distributed import is_launched_worker

    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise RecipeError(f"output_dir: {str(out)!r} is a file, not a folder; choose another output_dir.")
    checkpoint = _resolve_resume(recipe, out)
    # only machine 0 writes into output_dir (and checks it): on a shared file system the others may find its files
    other_machine = recipe.distributed is not None and recipe.distributed.machine_rank > 0
    if checkpoint is None and not is_launched_worker() and not other_machine:
        found = _run_artifacts(out)
        if found and not recipe.overwrite_output_dir:
            shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
            raise RecipeError(f"output_dir: {str(out)!r} holds another run ({shown}); training would overwrite it. "
                              "Choose another output_dir, resume it with resume_from_checkpoint: true, or replace it "
                              "with overwrite_output_dir: true.")
    return checkpoint


def _clear_previous_run(out: Path) -> None:
    """overwrite_output_dir: true: remove the earlier run's artifacts (checkpoints included, so that a later
    `resume_from_checkpoint: true` can never pick one of them up). Files that are not a run's are kept."""
    import shutil

    for name in _run_artifacts(out):
        p = out / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    for name in ("README.md", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "generation_config.json", "chat_template.jinja"):
        (out / name).unlink(missing_ok=True)


# ---- checks before training ----------------------------------------------------------------------------

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
            check_model_source(m.ref_name_or_path, "model.ref_name_or_path", need_tokenizer=False)
        r = recipe.reward
        heads = []
        if r is not None and r.function:
            from .rewards import load_reward_function

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
    except ModelError as exc:
        raise RecipeError(str(exc)) from None
    except (OSError, ValueError) as exc:
        raise RecipeError(f"could not read the model config: {first_line(exc)}") from None


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
        return tokenizer((prompt or "") + (completion or ""))["input_ids"]

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
class Preflight:
    """What the checks before training produced (so that `train` does not load anything twice)."""

    config: Any
    peft_config: Any
    train_dataset: Any
    eval_dataset: Any
    tokenizer: Any
    resume_from: str | None
    warnings: list[str]


def preflight(recipe: Recipe) -> Preflight:
    """Every check that can run without model weights, in the order a user fixes things: the config's values,
    PEFT, the distributed section, output_dir (and the checkpoint to resume), the models, then every row of
    the data (formats, nulls, lengths against max_length). Raises RecipeError (one line, exit 2 in the CLI)."""
    from .distributed import check_distributed

    config = recipe.build_config()
    peft_config = recipe.build_peft_config()
    try:
        check_distributed(recipe)
    except ValueError as exc:
        raise RecipeError(str(exc)) from None
    resume_from = _plan_output(recipe, config)
    check_models(recipe)
    tokenizer = load_tokenizer(recipe)
    train_ds, eval_ds, warnings = load_datasets(recipe)
    if eval_ds is None and config.eval_strategy != "no":
        raise RecipeError(f"eval_strategy is {getattr(config.eval_strategy, 'value', config.eval_strategy)!r} but the "
                          "dataset section names no eval split; "
                          "set dataset.eval_split or dataset.test_size, or eval_strategy: 'no'.")
    warnings += _check_lengths(recipe, config, tokenizer, train_ds, "train dataset")
    if eval_ds is not None:
        warnings += _check_lengths(recipe, config, tokenizer, eval_ds, "eval dataset")
    return Preflight(config, peft_config, train_ds, eval_ds, tokenizer, resume_from, warnings)


def validate(recipe: Recipe) -> dict:
    """Check everything a run needs without training: config, PEFT, distributed section, output_dir, models,
    tokenizer and every row of the data. Warnings are printed; errors raise RecipeError."""
    pre = preflight(recipe)
    for w in pre.warnings:
        _info(f"warning: {w}")
    return {
        "method": recipe.method,
        "config": type(pre.config).__name__,
        "train_examples": len(pre.train_dataset),
        "eval_examples": len(pre.eval_dataset) if pre.eval_dataset is not None else 0,
        "output_dir": pre.config.output_dir,
        **({"resume_from": pre.resume_from} if pre.resume_from else {}),
    }


# ---- training ------------------------------------------------------------------------------------------

def _save_final_model(trainer, out: Path) -> None:
    """Write the final model into a temporary folder inside ``out``, then move each file into place: an
    interruption while saving leaves the earlier files whole (and the status not complete). Every rank calls
    this (ZeRO-3 gathers the weights collectively); rank 0 moves the files."""
    import shutil

    tmp = out / ".alignkit-saving"
    if trainer.is_world_process_zero() and tmp.exists():
        shutil.rmtree(tmp)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(tmp))
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        for item in sorted(tmp.iterdir()):
            target = out / item.name
            if item.is_dir() and target.exists():
                shutil.rmtree(target)
            os.replace(item, target)
        tmp.rmdir()
    trainer.accelerator.wait_for_everyone()


def _distributed_summary(trainer) -> dict:
    """How the run was spread (processes, DeepSpeed's ZeRO stage or None) and each rank's peak memory in GB (torch's
    peak allocation on a GPU, the resident set on a CPU): what `alignkit plan` estimates before a run. Collective:
    every rank calls it."""
    import torch

    from .metrics.perf import peak_memory_gb

    acc = trainer.accelerator
    peak = torch.tensor([peak_memory_gb(acc.device)], dtype=torch.float64, device=acc.device)
    peaks = acc.gather(peak).tolist() if acc.num_processes > 1 else peak.tolist()
    plugin = getattr(acc.state, "deepspeed_plugin", None) if trainer.is_deepspeed_enabled else None
    return {"world_size": acc.num_processes, "deepspeed_zero_stage": plugin.zero_stage if plugin else None,
            "peak_memory_gb_per_rank": [round(p, 3) for p in peaks]}


def _report_datasets(pre: Preflight, trainer) -> None:
    """One line per split: rows, format, and what TRL's preparation kept."""
    for name, raw, prepared in (("train", pre.train_dataset, trainer.train_dataset),
                                ("eval", pre.eval_dataset, getattr(trainer, "eval_dataset", None))):
        if raw is None:
            continue
        if isinstance(prepared, dict):  # several named eval sets
            prepared = None
        kept = len(prepared) if prepared is not None and hasattr(prepared, "__len__") else len(raw)
        dropped = f", {len(raw) - kept} dropped for their length" if kept < len(raw) else ""
        _info(f"{name} dataset: {len(raw)} rows prepared{dropped}")


def train(recipe: Recipe) -> dict:
    """Train as the recipe says; save model, tokenizer, recipe, metrics and a model card to ``output_dir``,
    with ``alignkit_run.json`` saying ``"complete"`` last."""
    pre = preflight(recipe)
    config = pre.config
    if os.environ.get("RANK", "0") == "0":  # once, not once per process
        for w in pre.warnings:
            _info(f"warning: {w}")
    wandb_dir = setup_wandb(recipe, config)
    # Seed before any model is built: a newly initialised head (PPO's value and reward heads, a reward
    # model's score) draws from the global RNG. Trainer seeds again in its __init__, too late for those.
    from transformers import enable_full_determinism, set_seed

    enable_full_determinism(config.seed) if config.full_determinism else set_seed(config.seed)
    model, ref = load_models(recipe)
    tokenizer = pre.tokenizer
    trainer_cls = trainer_class(recipe.method)
    kwargs = dict(model=model, args=config, train_dataset=pre.train_dataset, eval_dataset=pre.eval_dataset,
                  processing_class=tokenizer, peft_config=pre.peft_config)
    if recipe.method in ON_POLICY_METHODS:
        kwargs.update(_ppo_models(recipe, model, ref, pre.peft_config))
    elif recipe.method not in REWARD_MODEL_METHODS:
        kwargs["ref_model"] = ref
    try:
        trainer = trainer_cls(**kwargs)
    except ValueError as exc:  # the trainers' own checks of data and arguments: one line, not a traceback
        raise RecipeError(f"{recipe.source or 'recipe'}: {exc}") from None
    trainer.alignkit_recipe = recipe.to_yaml()
    trainer.alignkit_base_model = recipe.model.name_or_path
    if wandb_dir is not None or _wants_wandb(config):
        trainer.add_callback(_wandb_run_setup(recipe))
    from .console import new_heads, use_console

    use_console(trainer)
    if trainer.is_world_process_zero():
        for head in new_heads():
            _info(f"new score head ({head}), initialised with seed {config.seed}")
        if getattr(trainer.args, "_bf16_note", None):
            _info(trainer.args._bf16_note)
        _report_datasets(pre, trainer)
    out = Path(config.output_dir)
    main = trainer.is_world_process_zero()
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if pre.resume_from is None and recipe.overwrite_output_dir:
            _clear_previous_run(out)
        (out / "alignkit_recipe.yaml").write_text(recipe.to_yaml())
        _write_status(out, "running", resumed_from=pre.resume_from)
    trainer.accelerator.wait_for_everyone()

    try:
        result = trainer.train(resume_from_checkpoint=pre.resume_from)
    except KeyboardInterrupt:
        if main:
            done = complete_checkpoints(out)
            _write_status(out, "interrupted", step=trainer.state.global_step,
                          latest_checkpoint=done[-1].name if done else None)
            hint = (f"; resume from {done[-1].name} with resume_from_checkpoint: true (--set "
                    "resume_from_checkpoint=true)" if done else "; no checkpoint was written (save_strategy: steps "
                    "and save_steps make resumable runs)")
            _info(f"interrupted at step {trainer.state.global_step}: the model was not saved{hint}")
        raise
    # The model is saved before anything else can fail (evaluation, metrics, the card): it survives them.
    _save_final_model(trainer, out)
    metrics = {"train": result.metrics, "distributed": _distributed_summary(trainer)}
    try:
        trainer.create_model_card(model_name=out.name)  # Trainer only writes one at checkpoints or on push
        if pre.eval_dataset is not None:
            metrics["eval"] = trainer.evaluate()
    except Exception as exc:
        if main:
            metrics["log_history"] = trainer.state.log_history
            (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
            _write_status(out, "failed", step=trainer.state.global_step,
                          error=f"{type(exc).__name__}: {exc}"[:500], model_saved=True)
            _info(f"the trained model is saved in {out}; what failed after training: {type(exc).__name__}")
        raise
    metrics["log_history"] = trainer.state.log_history
    if main:
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
        _write_status(out, "complete", step=trainer.state.global_step, resumed_from=pre.resume_from)
        _finish_wandb_run()
        _summarise(recipe, config, trainer, out, wandb_dir)
    return metrics


#: W&B summaries that say how a run ended: the best evaluation accuracy, the last divergence estimates, throughput
WANDB_SUMMARIES = (("eval/rewards/accuracies", "max"), ("eval/accuracy", "max"), ("train/divergence/*", "last"),
                   ("train/objective/scores", "last"), ("train/perf/tokens_per_second", "mean"),
                   ("train/perf/mfu", "mean"), ("train/perf/peak_memory_gb", "max"))


def _wandb_run_setup(recipe: Recipe):
    """A callback that, once transformers' W&B callback has opened the run (its on_train_begin runs first), logs
    the resolved recipe as the run's config (`alignkit_recipe`, beside the TrainingArguments the W&B callback
    logs) and defines the summaries of WANDB_SUMMARIES."""
    from transformers import TrainerCallback

    class WandbRunSetup(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            wandb = sys.modules.get("wandb")
            if not state.is_world_process_zero or wandb is None or wandb.run is None:
                return
            import yaml

            wandb.run.config.update({"alignkit_recipe": yaml.safe_load(recipe.to_yaml()),
                                     "alignkit_method": recipe.method}, allow_val_change=True)
            for name, summary in WANDB_SUMMARIES:
                wandb.run.define_metric(name, summary=summary)

    return WandbRunSetup()


def _finish_wandb_run() -> None:
    """Close the W&B run the Trainer opened (its callback leaves it open until the interpreter exits), so that the
    run's files are complete, and `wandb sync` can upload them, when `train` returns."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()
        # W&B keeps its settings (WANDB_DIR, the mode) in a process-wide singleton read at the first run: a second
        # run in this process (a notebook, the tests) would be written into the first run's folder
        wandb.teardown()


def _summarise(recipe: Recipe, config, trainer, out: Path, wandb_dir: str | None) -> None:
    history = trainer.state.log_history
    scores = [e for e in history if "objective/scores" in e]
    if len(scores) >= 2:
        div = f"divergence/{config.divergence}"
        _info(f"mean score {scores[0]['objective/scores']:.3f} (iteration {scores[0]['step']}) -> "
              f"{scores[-1]['objective/scores']:.3f} (iteration {scores[-1]['step']}); {config.divergence} "
              f"estimate {scores[0][div]:.3f} -> {scores[-1][div]:.3f}")
    key = "eval_accuracy" if recipe.method in REWARD_MODEL_METHODS else "eval_rewards/accuracies"
    evals = [e for e in history if key in e]
    if len(evals) >= 2:
        first, last = evals[0], evals[-1]
        _info(f"eval (preference) accuracy {first[key]:.2f} (step {first['step']}) -> {last[key]:.2f} "
              f"(step {last['step']}); eval loss {first['eval_loss']:.4f} -> {last['eval_loss']:.4f}")
    _info(f"saved model, tokenizer, recipe and metrics.json to {out}")
    if wandb_dir:
        runs = sorted(glob.glob(os.path.join(wandb_dir, "wandb", "offline-run-*")), key=os.path.getmtime)
        if runs:
            _info(f"W&B run saved offline in {runs[-1]}; upload it with: wandb sync {runs[-1]}")
