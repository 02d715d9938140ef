"""Step 5 of a run: build. The models the recipe names, loaded, and the trainer made from them.

    recipe -> plan -> checks -> launch -> **build** -> execute
"""

from __future__ import annotations

import sys

from .._util import first_line, info, wants_wandb
from ..models import resolve_model_path, unreadable_weights
from .checks import Checked
from .plan import Plan
from .recipe import ON_POLICY_METHODS, REWARD_MODEL_METHODS, Recipe, RecipeError, trainer_class

__all__ = ["build_trainer", "load_models", "reward_and_reference_models", "reward_source", "WANDB_SUMMARIES"]

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
    except Exception as exc:
        line = unreadable_weights(exc, m.name_or_path, "model.name_or_path")
        if line is not None:
            raise RecipeError(line) from None
        if isinstance(exc, (OSError, ValueError)):
            raise RecipeError(f"model.name_or_path: could not load {m.name_or_path!r}: {first_line(exc)}") from None
        raise
    return model, ref


def _sequence_classifier(key: str, name: str, dtype):
    from transformers import AutoModelForSequenceClassification

    try:
        return AutoModelForSequenceClassification.from_pretrained(resolve_model_path(name), num_labels=1, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise RecipeError(f"{key}: could not load {name!r}: {first_line(exc)}") from None


def reward_source(recipe: Recipe, dtype):
    """The recipe's reward: a function (`reward.function`) or a sequence-classification model (`reward.model`)."""
    from ..rewards import load_reward_function

    r = recipe.reward
    try:
        return load_reward_function(r.function) if r.function else _sequence_classifier("reward.model", r.model, dtype)
    except ValueError as exc:
        raise RecipeError(f"reward.function: {exc}") from None


def reward_and_reference_models(recipe: Recipe, policy, ref, peft_config) -> dict:
    """PPO's reward source, value model and reference (a copy of the policy unless PEFT or given)."""
    import copy

    r = recipe.reward
    models = {"reward_model": reward_source(recipe, policy.dtype)}
    if recipe.method == "ppo":
        value_key = "reward.value_model" if r.value_model else "reward.model" if r.model else "model.name_or_path"
        models["value_model"] = _sequence_classifier(value_key, r.value_model or r.model or recipe.model.name_or_path,
                                                     policy.dtype)
    if ref is None and peft_config is None:
        from transformers.integrations import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled():
            # the policy was loaded sharded (zero.Init) and a copy of its shards is no model: the reference is
            # loaded again from the same checkpoint
            ref, _ = load_models(recipe)
        else:
            ref = copy.deepcopy(policy)
    return {**models, "ref_model": ref}


def build_trainer(plan: Plan, checked: Checked, wandb_dir: str | None = None):
    """Seed, load the models, and make the method's trainer on the checked datasets. The trainers' own refusals of
    data and arguments become RecipeError (one line)."""
    recipe, config = plan.recipe, checked.config
    # Seed before any model is built: a newly initialised head (PPO's value and reward heads, a reward
    # model's score) draws from the global RNG. Trainer seeds again in its __init__, too late for those.
    from transformers import enable_full_determinism, set_seed

    enable_full_determinism(config.seed) if config.full_determinism else set_seed(config.seed)
    model, ref = load_models(recipe)
    kwargs = dict(model=model, args=config, train_dataset=checked.train_dataset, eval_dataset=checked.eval_dataset,
                  processing_class=checked.tokenizer, peft_config=plan.peft_config)
    if recipe.method == "online_mdpo":  # TRL's GRPO: reward_funcs, and the reference from the policy's checkpoint
        kwargs["reward_funcs"] = [reward_source(recipe, model.dtype)]
    elif recipe.method in ON_POLICY_METHODS:
        kwargs.update(reward_and_reference_models(recipe, model, ref, plan.peft_config))
    elif recipe.method not in REWARD_MODEL_METHODS:
        kwargs["ref_model"] = ref
    try:
        trainer = trainer_class(recipe.method)(**kwargs)
    except ValueError as exc:  # the trainers' own checks of data and arguments: one line, not a traceback
        raise RecipeError(f"{recipe.source or 'recipe'}: {exc}") from None
    trainer.alignkit_recipe = recipe.to_yaml()
    trainer.alignkit_base_model = recipe.model.name_or_path
    if wandb_dir is not None or wants_wandb(config):
        trainer.add_callback(_wandb_run_setup(recipe))
    trainer.add_callback(_finite_weights_guard(trainer))
    from ..console import new_heads, use_console

    use_console(trainer)
    if trainer.is_world_process_zero():
        for head in new_heads():
            info(f"new score head ({head}), initialised with seed {config.seed}")
        if getattr(trainer.args, "_bf16_note", None):
            info(trainer.args._bf16_note)
        _report_datasets(checked, trainer)
    return trainer


def _report_datasets(checked: Checked, trainer) -> None:
    """One line per split: rows, format, and what TRL's preparation kept."""
    for name, raw, prepared in (("train", checked.train_dataset, trainer.train_dataset),
                                ("eval", checked.eval_dataset, getattr(trainer, "eval_dataset", None))):
        if raw is None:
            continue
        if isinstance(prepared, dict):  # several named eval sets
            prepared = None
        kept = len(prepared) if prepared is not None and hasattr(prepared, "__len__") else len(raw)
        dropped = f", {len(raw) - kept} dropped for their length" if kept < len(raw) else ""
        info(f"{name} dataset: {len(raw)} rows prepared{dropped}")


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


def _finite_weights_guard(trainer):
    """`alignkit train` only (the Python API keeps TRL's behaviour): after every optimizer step the trained weights
    must be finite; at the first step where they are not, training stops there, before that step's checkpoint is
    written, and `trainer.alignkit_nonfinite` records the step and the last logged figures for the execute step."""
    import torch
    from transformers import TrainerCallback

    # every rank checks the same weights (DDP and ZeRO-2 keep them whole on each), so all ranks stop together; under
    # ZeRO-3 a rank's parameters are empty placeholders and the check sees nothing
    trainable = [p for p in trainer.model.parameters() if p.requires_grad and p.numel() > 0]

    class FiniteWeights(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            with torch.no_grad():
                finite = bool(torch.stack([p.detach().abs().amax().float() for p in trainable]).isfinite().all()) \
                    if trainable else True
            if not finite:
                last = next((e for e in reversed(state.log_history) if "loss" in e), {})
                trainer.alignkit_nonfinite = {"step": state.global_step, "last_log": last}
                control.should_training_stop = True
                control.should_save = control.should_evaluate = control.should_log = False
            return control

    return FiniteWeights()
