"""Helpers shared by the alignkit config classes."""

from __future__ import annotations

import math
import os
from typing import Callable

import torch


def accelerator_available() -> bool:
    acc = getattr(torch, "accelerator", None)
    if acc is not None and hasattr(acc, "is_available"):
        return bool(acc.is_available())
    return torch.cuda.is_available()


def default_precision_for_this_machine(config) -> None:
    """TRL turns bf16 on when it is left unset; on a machine without an accelerator that makes
    `TrainingArguments` raise ("Your setup doesn't support bf16/gpu"). Keep TRL's default wherever an
    accelerator exists. On a CPU an unset `bf16` is decided when the trainer sees the model
    (`bf16_on_cpu_if_it_pays`): off here, remembered as unset. An explicit `bf16` is never changed."""
    if config.bf16 is None and not config.fp16 and (config.use_cpu or not accelerator_available()):
        config.bf16 = False
        config._bf16_unset_on_cpu = True


#: Below this many parameters bf16 autocast on a CPU costs more than it saves, even with native bf16: measured on
#: this project's 2-core Xeon (AVX512-BF16), a 130k-parameter tiny-llama f-DPO step took 36 ms in float32 and 94 ms in
#: bf16, while a SmolLM2-135M LoRA step took 17 s in float32 and 8 s in bf16.
BF16_MIN_PARAMETERS_ON_CPU = 50_000_000


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (x86: AVX512-BF16 or AMX-BF16; Arm: the BF16 extension), read
    from the kernel's CPU flags. Elsewhere torch emulates bf16, several times slower than float32."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    except OSError:
        pass
    return False


def count_parameters(model) -> int | None:
    """Parameters of a module, or of the model a name/folder describes (built on the meta device: no weights
    are read or allocated). None when it cannot be told."""
    if isinstance(model, torch.nn.Module):
        return sum(p.numel() for p in model.parameters())
    if not isinstance(model, (str, os.PathLike)):
        return None
    try:
        from transformers import AutoConfig, AutoModel

        from ..models import resolve_model_path

        cfg = AutoConfig.from_pretrained(resolve_model_path(str(model)))
        with torch.device("meta"):
            return sum(p.numel() for p in AutoModel.from_config(cfg).parameters())
    except Exception:  # an unreadable model fails later, in the trainer, with its own message
        return None


def bf16_on_cpu_if_it_pays(args, model) -> None:
    """Turn bf16 autocast on for a CPU run whose config left `bf16` unset, when it is faster: the CPU has native
    bf16 and the model is large enough (BF16_MIN_PARAMETERS_ON_CPU). Replaces TRL's "bf16 unless told otherwise",
    which fails on a CPU, and the older rule "never on a CPU", which made real models 2x slower here."""
    if not getattr(args, "_bf16_unset_on_cpu", False) or getattr(args, "deepspeed", None):
        return
    args._bf16_unset_on_cpu = False
    n = count_parameters(model)
    if n is None or n < BF16_MIN_PARAMETERS_ON_CPU or not cpu_has_native_bf16():
        return
    args.bf16 = True
    args.mixed_precision = "bf16"  # what Trainer hands to accelerate; TrainingArguments set it from bf16 already
    args._bf16_note = (f"bf16 autocast on: this CPU computes bf16 natively and the model has {n / 1e6:.0f}M "
                       "parameters (bf16: false keeps float32)")
    from transformers.utils import logging as hf_logging

    hf_logging.get_logger("alignkit").info(args._bf16_note)


class ConfigResolverMixin:
    """`_resolve_args` for alignkit trainers: the given config, or a default one named after the model
    (as TRL does); a config of the wrong class (e.g. TRL's own) is refused with the fix."""

    config_class: type
    _config_with_article: str
    _default_run_suffix: str

    @classmethod
    def _resolve_args(cls, model, args):
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "name_or_path", None) or "model"
            args = cls.config_class(f"{str(name).rstrip('/').split('/')[-1]}-{cls._default_run_suffix}")
        elif not isinstance(args, cls.config_class):
            base = cls.config_class.__mro__[1].__name__
            raise TypeError(
                f"{cls.__name__} needs {cls._config_with_article}, got {type(args).__name__}. Build "
                f"{cls._config_with_article} with the arguments you gave {type(args).__name__} (it is a {base} "
                "subclass)."
            )
        bf16_on_cpu_if_it_pays(args, model)
        return args


# ---- ranges of numeric fields ------------------------------------------------------------------------
# Trainer and TRL accept many impossible values and fail mid-way (a batch size of 0), or train silently
# wrong (a negative beta moves the policy towards the rejected answers while `rewards/accuracies` reads 1).
# Each rule: field -> (test, what it must be, why / the fix). `None` always passes (unset optional fields).

def _ge(bound):
    return lambda v: v >= bound


def _gt(bound):
    return lambda v: v > bound


def _in_unit(v):
    return 0 <= v <= 1


Rule = tuple[Callable[[float], bool], str, str]

TRAINING_RULES: dict[str, Rule] = {
    "learning_rate": (_ge(0), ">= 0", "e.g. 1e-5"),
    "per_device_train_batch_size": (_ge(1), "an integer >= 1", "it counts examples per step and process"),
    "per_device_eval_batch_size": (_ge(1), "an integer >= 1", "it counts examples per eval step and process"),
    "gradient_accumulation_steps": (_ge(1), "an integer >= 1", "1 means no accumulation"),
    "max_steps": (lambda v: v == -1 or v >= 1, "-1 (train for num_train_epochs) or an integer >= 1", ""),
    "num_train_epochs": (_ge(0), ">= 0", "e.g. 1"),
    "warmup_steps": (_ge(0), ">= 0", "a step count, or a fraction of the run below 1"),
    "weight_decay": (_ge(0), ">= 0", "0 turns it off"),
    "max_grad_norm": (_ge(0), ">= 0", "0 turns clipping off"),
    "adam_beta1": (lambda v: 0 <= v < 1, "in [0, 1)", "e.g. 0.9"),
    "adam_beta2": (lambda v: 0 <= v < 1, "in [0, 1)", "e.g. 0.999"),
    "adam_epsilon": (_gt(0), "> 0", "e.g. 1e-8"),
    "logging_steps": (_gt(0), "> 0", "steps between logs, or a fraction of the run below 1"),
    "eval_steps": (_gt(0), "> 0", "steps between evaluations, or a fraction of the run below 1"),
    "save_steps": (_gt(0), "> 0", "steps between checkpoints, or a fraction of the run below 1"),
    "save_total_limit": (_ge(1), "an integer >= 1", "leave it unset to keep every checkpoint"),
    "seed": (lambda v: 0 <= v < 2**32, "an integer in [0, 2**32)", "e.g. 42"),
    "data_seed": (lambda v: 0 <= v < 2**32, "an integer in [0, 2**32)", "e.g. 42"),
    "dataloader_num_workers": (_ge(0), "an integer >= 0", "0 loads data in the main process"),
    "peak_tflops": (_gt(0), "> 0", "the dense bf16 peak of one device in TFLOP/s, e.g. 989 for an H100 SXM"),
}
PREFERENCE_RULES: dict[str, Rule] = {
    "beta": (_gt(0), "> 0", "a beta <= 0 turns the divergence constraint into a reward for moving away from "
                             "the reference: the policy then moves towards the rejected answers; e.g. beta: 0.1"),
    "max_length": (_ge(1), "an integer >= 1", "leave it unset (null) to keep whole sequences"),
    "max_prompt_length": (_ge(1), "an integer >= 1", "leave it unset (null) to keep whole prompts"),
    "max_completion_length": (_ge(1), "an integer >= 1", "leave it unset (null) to keep whole completions"),
    "label_smoothing": (lambda v: 0 <= v < 0.5, "in [0, 0.5)", "the assumed fraction of flipped labels"),
    "rpo_alpha": (_ge(0), ">= 0", "the weight of the NLL term"),
    "ref_model_mixup_alpha": (_in_unit, "in [0, 1]", ""),
    "ref_model_sync_steps": (_ge(1), "an integer >= 1", ""),
    "nll_weight": (_ge(0), ">= 0", "0 turns the NLL term off"),
    "completion_sub_batch_size": (_ge(1), "an integer >= 1", "leave it unset to run every completion at once"),
}
CAUSAL_RULES: dict[str, Rule] = {
    "mmd_coef": (_ge(0), ">= 0", "0 turns the MMD penalty off"),
    "num_bins": (_ge(2), "an integer >= 2", "the penalty compares bins, so it needs at least two"),
    "mmd_start_step": (_ge(0), "an integer >= 0", "0 adds the penalty from the first step"),
}
REWARD_RULES: dict[str, Rule] = {
    "max_length": (_ge(1), "an integer >= 1", "leave it unset (null) to keep whole sequences"),
    "center_rewards_coefficient": (_ge(0), ">= 0", "leave it unset to turn it off"),
    "eval_sample_pairs": (_ge(0), "an integer >= 0", "0 writes no sample pairs"),
}
PPO_RULES: dict[str, Rule] = {
    "temperature": (_gt(0), "> 0", "sampling divides the logits by it; e.g. 0.7 or 1.0"),
    "kl_coef": (_ge(0), ">= 0", "0 turns the divergence penalty off"),
    "cliprange": (_gt(0), "> 0", "e.g. 0.2"),
    "cliprange_value": (_gt(0), "> 0", "e.g. 0.2"),
    "vf_coef": (_ge(0), ">= 0", "e.g. 0.1"),
    "gamma": (_in_unit, "in [0, 1]", "e.g. 1.0"),
    "lam": (_in_unit, "in [0, 1]", "e.g. 0.95"),
    "num_mini_batches": (_ge(1), "an integer >= 1", ""),
    "num_ppo_epochs": (_ge(1), "an integer >= 1", ""),
    "response_length": (_ge(1), "an integer >= 1", "the most tokens a response may have"),
    "local_rollout_forward_batch_size": (_ge(1), "an integer >= 1", ""),
    "total_episodes": (_ge(1), "an integer >= 1", "leave it unset to train for num_train_epochs or max_steps"),
    "max_prompt_length": (_ge(1), "an integer >= 1", "leave it unset (null) to keep whole prompts"),
}


def check_ranges(config, *tables: dict[str, Rule]) -> None:
    """Raise ValueError naming the first field whose value is out of its range (or not a number)."""
    for table in tables:
        for name, (ok, must, fix) in table.items():
            value = getattr(config, name, None)
            if value is None or isinstance(value, bool):
                continue
            if not isinstance(value, (int, float)) or (isinstance(value, float) and math.isnan(value)):
                raise ValueError(f"{name} must be a number, got {value!r}.")
            if not ok(value):
                raise ValueError(f"{name} must be {must}, got {value!r}" + (f"; {fix}." if fix else "."))
    if getattr(config, "max_steps", -1) == -1 and getattr(config, "num_train_epochs", 1) == 0:
        raise ValueError("num_train_epochs is 0 and max_steps is unset: there is nothing to train; set "
                         "num_train_epochs >= 1 or max_steps >= 1.")


# ---- model cards -----------------------------------------------------------------------------------------

def base_model_name(trainer) -> str | None:
    """What the model was trained from: the recipe's model (set by `alignkit train`), else the config's
    `_name_or_path`."""
    name = getattr(trainer, "alignkit_base_model", None)
    if name:
        return name
    model = getattr(trainer, "model", None)
    config = getattr(getattr(model, "policy", model), "config", None)
    return getattr(config, "name_or_path", None) or None


def describe_base_model(name: str | None) -> str:
    """Markdown for the base model: a hub link for a hub id, the path or built-in name otherwise."""
    if not name:
        return "an unnamed model"
    if name.startswith("builtin:"):
        return f"`{name}` (a model alignkit builds locally)"
    if os.path.exists(name) or name.startswith((".", "/", "~")):
        return f"the local model `{name}`"
    return f"[{name}](https://huggingface.co/{name})"
