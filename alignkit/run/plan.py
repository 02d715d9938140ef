"""Step 2 of a run: the plan. What this process will do with a recipe, decided before anything is loaded.

    recipe -> **plan** -> checks -> launch -> build -> execute

`make_plan(recipe)` resolves the recipe for this process (one process, the launcher of N workers, or one of the
workers) into the config's keyword arguments (DeepSpeed, precision and accelerate's settings filled in for a
worker), the PEFT config, the output folder, and the checkpoint to resume (after checking that it belongs to this
recipe, and that a folder holding another run is not overwritten without `overwrite_output_dir: true`).

The plan is pure: it reads the recipe, the environment and the output folder, and changes nothing. Process state
(environment variables, accelerate's state, threads) is the launch step's; building TRL's config object, which
sets up accelerate's state as a side effect, is `Plan.build_config`, called by the checks and the build step.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import json
import os
from pathlib import Path
from typing import Any

from .outputs import complete_checkpoints, run_artifacts, run_status
from .recipe import DistributedSection, Recipe, RecipeError, config_class, load_recipe

__all__ = ["Plan", "Role", "make_plan", "ZERO_CONFIGS", "deepspeed_config", "check_distributed", "needs_launch",
           "is_launched_worker", "launched_by_another_launcher", "worker_kwargs", "has_gpu", "check_output_dir"]

_BASE = {
    "bf16": {"enabled": "auto"},
    "fp16": {"enabled": "auto"},
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
}


_ZERO2 = {"stage": 2, "overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": "auto"}


_ZERO3 = {"stage": 3, "overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": "auto",
          "stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto",
          "stage3_gather_16bit_weights_on_model_save": True}


_OFFLOAD = {"device": "cpu", "pin_memory": True}


#: the named DeepSpeed configurations; recipes/deepspeed/<name>.json holds the same (tested)
ZERO_CONFIGS: dict[str, dict[str, Any]] = {
    "zero2": {"zero_optimization": _ZERO2, **_BASE},
    "zero3": {"zero_optimization": _ZERO3, **_BASE},
    "zero3_offload": {"zero_optimization": {**_ZERO3, "offload_optimizer": _OFFLOAD, "offload_param": _OFFLOAD},
                      **_BASE},
}


def has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def deepspeed_config(spec: str, offload_optimizer: bool = False, offload_params: bool = False) -> dict:
    """The DeepSpeed config for a name (`zero2`, `zero3`, `zero3_offload`) or a JSON file, with the
    requested CPU offloads added."""
    if spec in ZERO_CONFIGS:
        cfg = copy.deepcopy(ZERO_CONFIGS[spec])
    else:
        path = Path(spec)
        if not path.is_file():
            raise ValueError(f"distributed.deepspeed: {spec!r} is neither one of {', '.join(ZERO_CONFIGS)} nor a "
                             "JSON file.")
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"distributed.deepspeed: {spec} is not valid JSON ({exc}).") from None
    zero = cfg.setdefault("zero_optimization", {})
    if offload_optimizer:
        zero["offload_optimizer"] = dict(_OFFLOAD)
    if offload_params:
        if zero.get("stage") != 3:
            raise ValueError("distributed.offload_params needs ZeRO stage 3 (deepspeed: zero3).")
        zero["offload_param"] = dict(_OFFLOAD)
    if not has_gpu():
        for section in ("offload_optimizer", "offload_param"):
            if section in zero:
                zero[section]["pin_memory"] = False  # no pinned memory without a GPU
    return cfg


def check_distributed(recipe) -> None:
    """Refuse what cannot run, before anything is launched (ValueError with the fix): a DeepSpeed name or file
    that does not resolve (with one process too: ZeRO on one process is applied, for its memory savings),
    reference precomputation under DeepSpeed with several processes."""
    dist = recipe.distributed
    ds = (dist.deepspeed if dist is not None else None) or recipe.training.get("deepspeed")
    if dist is not None and dist.deepspeed:
        deepspeed_config(dist.deepspeed, dist.offload_optimizer, dist.offload_params)
    elif dist is not None and (dist.offload_optimizer or dist.offload_params):
        raise ValueError("distributed.offload_optimizer / offload_params need distributed.deepspeed (e.g. zero3).")
    world = dist.num_processes * dist.num_machines if dist is not None else 1
    if ds and world > 1 and recipe.training.get("precompute_ref_log_probs"):
        raise ValueError("precompute_ref_log_probs is not supported under DeepSpeed with several processes; set "
                         "precompute_ref_log_probs: false (the reference then runs each step, sharded under ZeRO-3).")


def needs_launch(section) -> bool:
    """Whether `alignkit train` relaunches itself: several processes, or DeepSpeed (which needs a launched
    process group even for one process)."""
    return section is not None and (section.num_processes * section.num_machines > 1 or bool(section.deepspeed))


def is_launched_worker() -> bool:
    """True inside a process started by torchrun / accelerate / deepspeed."""
    return "LOCAL_RANK" in os.environ


def launched_by_another_launcher() -> bool:
    """A worker of a job that `accelerate launch`, `deepspeed` or the user's own torchrun started with several
    processes or DeepSpeed, whatever the recipe's `distributed` section says."""
    return is_launched_worker() and (int(os.environ.get("WORLD_SIZE", "1")) > 1 or
                                     os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true")


def worker_kwargs(section, training: dict[str, Any]) -> dict[str, Any]:
    """The config's keyword arguments for a launched worker: the `distributed` section's timeout, precision and
    DeepSpeed config filled in, and, without a GPU, accelerate told to use the state the launch step creates
    (`accelerator_config.use_configured_state`; see `alignkit.run.launch.join`). Pure."""
    training = dict(training)
    if getattr(section, "timeout", None) is not None:
        training.setdefault("ddp_timeout", section.timeout)
    if section.mixed_precision != "no":
        training[section.mixed_precision] = True
    gpu = has_gpu()
    if section.deepspeed:
        training["deepspeed"] = deepspeed_config(section.deepspeed, section.offload_optimizer, section.offload_params)
    elif not gpu and not deepspeed_from_launcher(section, training):
        training["use_cpu"] = True
    if not gpu:
        accel = dict(training.get("accelerator_config") or {})
        accel["use_configured_state"] = True
        training["accelerator_config"] = accel
    return training


def deepspeed_from_launcher(section, training: dict[str, Any]) -> bool:
    """`accelerate launch` with a DeepSpeed config: accelerate's environment describes it, and the training config
    builds its DeepSpeed plugin from there (TrainingArguments does, when `deepspeed` is unset)."""
    return not section.deepspeed and "deepspeed" not in training and \
        os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"


class Role(enum.Enum):
    """What this process does with the recipe."""

    SINGLE = "single"      # trains alone
    LAUNCHER = "launcher"  # starts the `distributed` section's workers and waits for them
    WORKER = "worker"      # one of the workers (started by alignkit, accelerate, deepspeed, torchrun or srun)


@dataclasses.dataclass
class Plan:
    """A recipe resolved for this process. Pure data: building it changed nothing."""

    recipe: Recipe
    role: Role
    #: the effective `distributed` section (a default one for a worker of another launcher), or None
    section: DistributedSection | None
    #: the keyword arguments of the method's config class, resolved for this process
    config_kwargs: dict[str, Any]
    peft_config: Any
    output_dir: Path
    #: the checkpoint to resume from, or None for a new run
    resume_from: str | None
    #: asked to resume a run that already finished (its status says complete): there is nothing to train
    finished: dict | None = None

    @property
    def method(self) -> str:
        return self.recipe.method

    def build_config(self):
        """The method's config object (e.g. FDPOConfig). TrainingArguments sets up accelerate's state while it is
        built, so a worker calls this after the launch step joined its job."""
        return self.recipe.build_config(self.config_kwargs)


def make_plan(recipe: Recipe) -> Plan:
    """Resolve `recipe` for this process. Raises RecipeError (one line) on a DeepSpeed setting that does not resolve,
    a bad PEFT section, an output_dir that is a file or holds another run, or a checkpoint that cannot be resumed."""
    try:
        check_distributed(recipe)
    except ValueError as exc:
        raise RecipeError(str(exc)) from None
    section = recipe.distributed
    if section is None and launched_by_another_launcher():
        section = DistributedSection()  # accelerate launch / deepspeed / torchrun: they set the processes up
    if is_launched_worker() and section is not None:
        role = Role.WORKER
    elif needs_launch(section):
        role = Role.LAUNCHER
    else:
        role = Role.SINGLE
    kwargs = dict(recipe.training)
    if "output_dir" in kwargs and not kwargs["output_dir"]:
        raise RecipeError(f"{recipe.source or 'recipe'}: output_dir is empty; name the folder the run writes to, e.g. "
                          "output_dir: outputs/my-run.")
    if role is Role.WORKER:
        try:
            kwargs = worker_kwargs(section, kwargs)
        except ValueError as exc:
            raise RecipeError(f"{recipe.source or 'recipe'}: {exc}") from None
    peft_config = recipe.build_peft_config()
    # TrainingArguments' own default when output_dir is not given
    out = Path(str(kwargs.get("output_dir") or "trainer_output"))
    resume_from = _output_policy(recipe, role, out)
    status = run_status(out) if resume_from is not None else None
    finished = status if status is not None and status.get("status") == "complete" else None
    return Plan(recipe, role, section, kwargs, peft_config, out, resume_from, finished)


# ---- output_dir and resuming ----------------------------------------------------------------------------------

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


def _fingerprint(recipe: Recipe) -> dict[str, Any]:
    """The recipe's settings as flat ``key -> value`` (sections as ``section.key``), config fields filled with
    their defaults, so that two recipes compare equal exactly when they train the same way."""
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


#: files a run writes that a user may keep in a folder of their own: found there without a run beside them, they are
#: the user's, and the run is refused unless overwrite_output_dir says otherwise
USER_FILES_A_RUN_WRITES = ("README.md",)


def check_output_dir(plan: Plan) -> None:
    """The output_dir checks again (the launch step calls this once it holds output_dir's lock: another run may have
    written there since the plan was made)."""
    _output_policy(plan.recipe, plan.role, plan.output_dir)


def _output_policy(recipe: Recipe, role: Role, out: Path) -> str | None:
    """Check output_dir before anything is trained: a file is refused; a folder holding another run is refused
    unless the recipe resumes it or says overwrite_output_dir: true. Returns the checkpoint to resume from.

    A worker skips the refusal (its launcher checked, and rank 0 may already have written this run's recipe), and
    so do machines other than 0: only machine 0 writes into output_dir, and on a shared file system the others may
    find its files."""
    if out.exists() and not out.is_dir():
        raise RecipeError(f"output_dir: {str(out)!r} is a file, not a folder; choose another output_dir.")
    ancestor = next((p for p in (out, *out.absolute().parents) if p.exists()), None)
    if ancestor is not None and not ancestor.is_dir():
        raise RecipeError(f"output_dir: {str(out)!r} lies under {str(ancestor)!r}, which is a file; choose another "
                          "output_dir.")
    if ancestor is not None and not os.access(ancestor, os.W_OK | os.X_OK):
        raise RecipeError(f"output_dir: {str(out)!r} cannot be written ({str(ancestor)!r} is not writable); choose "
                          "another output_dir.")
    checkpoint = _resolve_resume(recipe, out)
    other_machine = recipe.distributed is not None and recipe.distributed.machine_rank > 0
    if checkpoint is None and role is not Role.WORKER and not other_machine:
        found = run_artifacts(out)
        theirs = [name for name in USER_FILES_A_RUN_WRITES if (out / name).is_file()]
        if theirs and not found and not recipe.overwrite_output_dir:
            raise RecipeError(f"output_dir: {str(out)!r} holds {', '.join(theirs)}, not written by alignkit; the run "
                              "would replace it (the model card is README.md). Choose another output_dir, or say "
                              "overwrite_output_dir: true to replace it.")
        if found and not recipe.overwrite_output_dir:
            shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
            raise RecipeError(f"output_dir: {str(out)!r} holds another run ({shown}); training would overwrite it. "
                              "Choose another output_dir, resume it with resume_from_checkpoint: true, or replace it "
                              "with overwrite_output_dir: true.")
    return checkpoint
