"""The one place where alignkit depends on private internals of TRL, transformers, accelerate, PEFT and DeepSpeed.

alignkit's trainers subclass TRL's `DPOTrainer`, `RewardTrainer` and `GRPOTrainer` (and transformers' `Trainer`). Where a
public API exists they use it; what has none is listed here, and every access goes through this module:

* `OVERRIDDEN_HOOKS`: private methods the trainers override or call, with the parameters they rely on;
* `FUNCTIONS`: private (or undocumented) functions they call;
* `ATTRIBUTES`: private attributes of a constructed trainer they read or write;
* `FUSED_HEAD_FIELDS`: the output fields of TRL's fused LM head (`model(..., fused_lm_head=True)`).

`check()` compares these with the installed TRL/transformers and returns one line per difference; the trainers
call `require()` once at construction, which raises with those lines, so a TRL upgrade that renames what we
rely on fails at once with a message naming it instead of deep inside a training step. `tests/test_trl_canary.py`
runs the same check on every test run. `TESTED_TRL` is the range setup.cfg declares.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
from functools import lru_cache

import torch
import trl

TRL_VERSION = trl.__version__
#: the TRL versions the test suite ran against (setup.cfg declares the same range)
TESTED_TRL = (">=1.16.0", "<1.17")

#: (object path, method, the parameter names alignkit's override or call passes, in order)
OVERRIDDEN_HOOKS: list[tuple[str, str, tuple[str, ...]]] = [
    ("trl.DPOTrainer", "_compute_loss", ("self", "model", "inputs", "return_outputs")),
    ("trl.DPOTrainer", "_prepare_dataset", ("self", "dataset", "processing_class", "args", "dataset_name")),
    ("trl.DPOTrainer", "_precompute_ref_logps", ("self", "dataset", "name", "batch_size")),
    ("trl.DPOTrainer", "_set_signature_columns_if_needed", ("self",)),
    ("trl.DPOTrainer", "compute_ref_log_probs", ("self", "model", "inputs")),
    ("trl.GRPOTrainer", "_generate_and_score_completions", ("self", "inputs")),
    ("trl.GRPOTrainer", "_compute_loss", ("self", "model", "inputs")),
    ("trl.GRPOTrainer", "_get_per_token_logps_and_entropies", ("self", "model", "input_ids", "attention_mask",
                                                                "logits_to_keep", "batch_size", "compute_entropy")),
    ("trl.RewardTrainer", "_prepare_dataset", ("self", "dataset", "processing_class", "args", "dataset_name")),
    ("trl.RewardTrainer", "_set_signature_columns_if_needed", ("self",)),
    ("transformers.Trainer", "_get_train_sampler", ("self",)),
    ("transformers.Trainer", "_prepare_inputs", ("self", "inputs")),
    ("transformers.Trainer", "_save", ("self", "output_dir", "state_dict")),
    ("transformers.Trainer", "_save_checkpoint", ("self", "model", "trial")),
    ("transformers.Trainer", "_load_rng_state", ("self", "checkpoint")),
    ("transformers.Trainer", "_load_optimizer_and_scheduler", ("self", "checkpoint")),
]

#: (module, function, the parameter names alignkit passes)
FUNCTIONS: list[tuple[str, str, tuple[str, ...]]] = [
    ("trl.data_utils", "_tokenize", ("processing_class", "input")),
    ("trl.data_utils", "common_prefix_length", ("ids", "other_ids")),
    ("trl.models.utils", "disable_gradient_checkpointing", ("model", "gradient_checkpointing_kwargs")),
    ("trl.trainer.utils", "use_adapter", ("model", "adapter_name")),
    ("trl.trainer.utils", "pad", ("tensors", "padding_value")),
    ("trl.models.utils", "prepare_deepspeed", ("model", "accelerator")),
    ("trl.models.utils", "add_hooks", ("model",)),
    ("trl.models.utils", "remove_hooks", ("model",)),
    ("transformers.integrations.deepspeed", "deepspeed_init", ("trainer", "num_training_steps")),
    ("transformers.integrations.deepspeed", "deepspeed_load_checkpoint", ("deepspeed_engine", "checkpoint_path")),
]

#: private attributes of a constructed trainer: trainer class name -> attribute names
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "DPOTrainer": ("_name", "_paper", "_tag_names", "_metrics", "_total_train_tokens", "_tp_size", "_tokenizer", "_signature_columns",
                   "aux_loss_enabled", "router_aux_loss_coef", "precompute_ref_logps", "loss_types", "loss_weights",
                   "ld_alpha", "use_weighting", "label_smoothing", "beta"),
    "RewardTrainer": ("_name", "_tag_names", "_metrics", "_signature_columns"),
    "GRPOTrainer": ("_name", "_tag_names", "_metrics", "num_generations", "num_generations_eval", "ref_model",
                    "reward_func_names"),
}

#: what `model(..., fused_lm_head=True)` returns (TRL's fused LM head); `log_sum_sq_probs` only with WPO
FUSED_HEAD_FIELDS = ("log_probs", "entropy", "mean_logits", "is_top1")


def _resolve(path: str):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _params_problem(where: str, fn, expected: tuple[str, ...]) -> str | None:
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # builtins without a signature: nothing to compare
        return None
    if params[: len(expected)] != list(expected):
        return f"{where} now takes ({', '.join(params)}); alignkit passes ({', '.join(expected)})"
    return None


@lru_cache(maxsize=None)
def _static_problems() -> tuple[str, ...]:
    problems = []
    for owner_path, name, expected in OVERRIDDEN_HOOKS:
        owner = _resolve(owner_path)
        fn = getattr(owner, name, None)
        if fn is None:
            problems.append(f"{owner_path}.{name} no longer exists")
        elif (p := _params_problem(f"{owner_path}.{name}", fn, expected)):
            problems.append(p)
    for module, name, expected in FUNCTIONS:
        try:
            fn = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            problems.append(f"{module}.{name} no longer exists")
            continue
        if (p := _params_problem(f"{module}.{name}", fn, expected)):
            problems.append(p)
    return tuple(problems)


def check(trainer=None) -> list[str]:
    """One line per private name or signature alignkit relies on that the installed TRL/transformers lacks.

    With a constructed `trainer`, its private attributes are checked too."""
    problems = list(_static_problems())
    if trainer is not None:
        for base, names in ATTRIBUTES.items():
            if any(cls.__name__ == base for cls in type(trainer).__mro__):
                problems += [f"{base} instances no longer have `{n}`" for n in names if not hasattr(trainer, n)]
    return problems


def require(trainer=None) -> None:
    """Raise one error naming every internal that changed (called by each trainer at construction)."""
    problems = check(trainer)
    if problems:
        raise RuntimeError(
            f"alignkit was tested with TRL {' '.join(TESTED_TRL)}, and TRL {TRL_VERSION} changed internals it relies "
            "on: " + "; ".join(problems) + ". Install a TRL version in that range (pip install 'trl"
            + ",".join(TESTED_TRL) + "').")


# ---- the accessors the trainers use ---------------------------------------------------------------------

def metrics(trainer, mode: str):
    """TRL's per-mode metric store (`{"train": defaultdict(list), "eval": ...}`), averaged and cleared by `log`."""
    return trainer._metrics[mode]


def count_train_tokens(trainer, new_tokens: int) -> int:
    """Add `new_tokens` (gathered over processes) to TRL's running count of training tokens, corrected for
    tensor parallelism as TRL does, and return the total (TRL's `num_tokens` metric)."""
    trainer._total_train_tokens += new_tokens // trainer._tp_size
    return trainer._total_train_tokens


def grpo_token_logps(trainer, model, input_ids, attention_mask, logits_to_keep: int, batch_size: int | None = None,
                     compute_entropy: bool = False):
    """GRPOTrainer's per-token log-probs (and entropies) of the last `logits_to_keep` tokens, through its fused LM
    head (temperature-scaled as the samples were drawn)."""
    logps, entropies, _ = trainer._get_per_token_logps_and_entropies(
        model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size, compute_entropy=compute_entropy)
    return logps, entropies


def tokenizer_of(trainer):
    """The text tokenizer of the trainer's processing class (the tokenizer inside a processor)."""
    return trainer._tokenizer


def add_signature_columns(trainer, columns) -> None:
    """Keep extra dataset columns through Trainer's removal of unused columns."""
    trainer._signature_columns = list(dict.fromkeys([*trainer._signature_columns, *columns]))


def fused_forward(model, model_kwargs: dict, labels: torch.Tensor):
    """`model(...)` through TRL's fused LM head: per-token log-probs of `labels` (0 where -100) and the metric
    fields of `FUSED_HEAD_FIELDS`, without materialising the logits."""
    return model(**model_kwargs, labels=labels, fused_lm_head=True)


def attn_implementation(model) -> str | None:
    """The attention implementation a loaded model runs (`sdpa`, `eager`, `flash_attention_2`, ...)."""
    return getattr(model.config, "_attn_implementation", None)


def tokenize(processing_class, *args, **kwargs):
    """TRL's tokenization of a prompt or prompt+completion (plain text or conversation)."""
    from trl.data_utils import _tokenize

    return _tokenize(processing_class, *args, **kwargs)


def common_prefix_length(a, b) -> int:
    from trl.data_utils import common_prefix_length as _cpl

    return _cpl(a, b)


def prepare_dataset(trainer, dataset, dataset_name: str):
    """TRL's tokenization of a raw split, as the trainer prepares its own (`_prepare_dataset`)."""
    return trainer._prepare_dataset(dataset, trainer.processing_class, trainer.args, dataset_name)


def signature_columns(trainer) -> list[str]:
    """The dataset columns Trainer keeps for its dataloaders (the model's inputs and the trainer's own)."""
    trainer._set_signature_columns_if_needed()
    return list(trainer._signature_columns)


def prepare_inputs(trainer, inputs: dict):
    """A collated batch on the trainer's device, as Trainer moves one before its forward."""
    return trainer._prepare_inputs(inputs)


def card_name(trainer) -> str:
    """The method name TRL writes in the model card (its trainers' `_name`, which ours set)."""
    return trainer._name


def card_paper(trainer) -> dict:
    """The method's paper for the card (TRL's `_paper`: title, arXiv id, BibTeX), or {}."""
    return dict(getattr(trainer, "_paper", None) or {})


def card_tags(trainer) -> list[str]:
    """The trainer's Hub tags (TRL's `_tag_names`)."""
    return list(getattr(trainer, "_tag_names", None) or [])


def pad(tensors, padding_value, **kwargs):
    from trl.trainer.utils import pad as _pad

    return _pad(tensors, padding_value=padding_value, **kwargs)


def reference_context(trainer):
    """The context in which `trainer.model` computes reference log-probs when no separate reference exists:
    no gradient, gradient checkpointing off, the PEFT adapter disabled (or TRL's "ref" adapter active), under
    the accelerator's autocast, as TRL's `compute_ref_log_probs` does."""
    from accelerate.utils import is_peft_model
    from trl.models.utils import disable_gradient_checkpointing
    from trl.trainer.utils import use_adapter

    stack = contextlib.ExitStack()
    stack.enter_context(torch.no_grad())
    stack.enter_context(disable_gradient_checkpointing(trainer.model, trainer.args.gradient_checkpointing_kwargs))
    if trainer.ref_model is None and is_peft_model(trainer.model):
        unwrapped = trainer.accelerator.unwrap_model(trainer.model)
        stack.enter_context(use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None))
    stack.enter_context(trainer.accelerator.autocast())
    return stack


def load_rng_state(trainer, checkpoint: str) -> None:
    trainer._load_rng_state(checkpoint)


def load_optimizer_and_scheduler(trainer, checkpoint: str) -> None:
    trainer._load_optimizer_and_scheduler(checkpoint)


def save_checkpoint(trainer) -> None:
    """Trainer's checkpoint save (model, optimizer, scheduler, RNG, trainer state, rotation)."""
    trainer._save_checkpoint(trainer.model, trial=None)


# ---- DeepSpeed (PPOTrainer, which drives its own engine) ----------------------------------------------------

def prepare_deepspeed(model, accelerator):
    """A frozen model (reference, reward) as an eval-mode DeepSpeed engine, sharded like the policy (TRL's helper)."""
    from trl.models.utils import prepare_deepspeed as _prepare

    return _prepare(model, accelerator)


def remove_hooks(engine) -> None:
    """Take ZeRO-3's parameter hooks off an engine (while its gathered weights generate)."""
    from trl.models.utils import remove_hooks as _remove

    _remove(engine)


def add_hooks(engine) -> None:
    from trl.models.utils import add_hooks as _add

    _add(engine)


def deepspeed_init(trainer, num_training_steps: int):
    """Trainer's DeepSpeed set-up (optimizer and scheduler from the DeepSpeed config or the Trainer's)."""
    from transformers.integrations.deepspeed import deepspeed_init as _init

    return _init(trainer, num_training_steps=num_training_steps)


def deepspeed_load_checkpoint(engine, checkpoint: str, **kwargs):
    from transformers.integrations.deepspeed import deepspeed_load_checkpoint as _load

    return _load(engine, checkpoint, **kwargs)
