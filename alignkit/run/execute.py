"""Step 6 of a run: execute. Train, save the model before anything else can fail, write metrics, the model card and
the status file (`alignkit_run.json` says "complete" last).

    recipe -> plan -> checks -> launch -> build -> **execute**
"""

from __future__ import annotations

import glob
import json
import os
import sys
from pathlib import Path

from .._util import info
from .checks import Checked
from .outputs import clear_previous_run, complete_checkpoints, write_status
from .plan import Plan
from .recipe import REWARD_MODEL_METHODS, Recipe

__all__ = ["execute", "TrainingStopped"]

def execute(plan: Plan, checked: Checked, trainer, wandb_dir: str | None = None) -> dict:
    """Train as planned; save model, tokenizer, recipe, metrics and a model card to output_dir, with
    `alignkit_run.json` saying "complete" last. Returns the metrics."""
    recipe, config = plan.recipe, checked.config
    out = Path(config.output_dir)
    main = trainer.is_world_process_zero()
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if plan.resume_from is None and recipe.overwrite_output_dir:
            clear_previous_run(out)
        (out / "alignkit_recipe.yaml").write_text(recipe.to_yaml())
        write_status(out, "running", resumed_from=plan.resume_from)
    trainer.accelerator.wait_for_everyone()

    try:
        result = trainer.train(resume_from_checkpoint=plan.resume_from)
    except KeyboardInterrupt:
        if main:
            done = complete_checkpoints(out)
            write_status(out, "interrupted", step=trainer.state.global_step,
                          latest_checkpoint=done[-1].name if done else None)
            hint = (f"; resume from {done[-1].name} with resume_from_checkpoint: true (--set "
                    "resume_from_checkpoint=true)" if done else "; no checkpoint was written (save_strategy: steps "
                    "and save_steps make resumable runs)")
            info(f"interrupted at step {trainer.state.global_step}: the model was not saved{hint}")
        raise
    stopped = getattr(trainer, "alignkit_nonfinite", None)
    if stopped is not None:
        _stop_at_nonfinite(trainer, out, stopped, main)
    if getattr(trainer, "prompts_trained_on", None) == 0:  # online groups: every prompt's rewards too close
        _stop(out, main, trainer.state.global_step,
              f"nothing was trained: in all {trainer.state.global_step} iterations every prompt's rewards spread by no "
              f"more than min_reward_spread={config.min_reward_spread}, so every prompt was skipped. Lower "
              "min_reward_spread, or check that the reward source tells the completions apart. No model was saved.")
    # The model is saved before anything else can fail (evaluation, metrics, the card): it survives them.
    try:
        _save_final_model(trainer, out)
    except Exception as exc:  # a full disk, a lost mount: the run is failed, and no half-written folder is left
        if main:
            import shutil

            shutil.rmtree(out / _SAVING, ignore_errors=True)
            write_status(out, "failed", step=trainer.state.global_step, error=f"{type(exc).__name__}: {exc}"[:500],
                         model_saved=False)
            info(f"saving the trained model to {out} failed ({type(exc).__name__}: {exc}); the run is marked failed")
        raise
    metrics = {"train": result.metrics, "distributed": _distributed_summary(trainer)}
    try:
        trainer.create_model_card(model_name=out.name)  # Trainer only writes one at checkpoints or on push
        if checked.eval_dataset is not None:
            metrics["eval"] = trainer.evaluate()
    except Exception as exc:
        if main:
            metrics["log_history"] = trainer.state.log_history
            (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
            write_status(out, "failed", step=trainer.state.global_step,
                          error=f"{type(exc).__name__}: {exc}"[:500], model_saved=True)
            info(f"the trained model is saved in {out}; what failed after training: {type(exc).__name__}")
        raise
    metrics["log_history"] = trainer.state.log_history
    if main:
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
        write_status(out, "complete", step=trainer.state.global_step, resumed_from=plan.resume_from)
        _finish_wandb_run()
        _summarise(recipe, config, trainer, out, wandb_dir)
    return metrics


class TrainingStopped(RuntimeError):
    """`alignkit train` stopped a run on purpose (its weights turned non-finite); the message is one line."""


def _stop_at_nonfinite(trainer, out: Path, stopped: dict, main: bool) -> None:
    """The weights turned non-finite at an optimizer step: no final model, the run failed, one line that names the
    step, the last logged figures and the last finite checkpoint."""
    done = complete_checkpoints(out)
    last = stopped["last_log"]
    figures = ", ".join(f"{k} {last[k]:.4g}" for k in ("loss", "grad_norm", "logratios/chosen", "logratios/rejected")
                        if isinstance(last.get(k), (int, float)))
    keep = f"the last finite checkpoint is {done[-1].name}" if done else "no checkpoint was written before it"
    line = (f"training stopped at step {stopped['step']}: the weights became non-finite (NaN or inf)"
            f"{f'; last logged: {figures}' if figures else ''}. No final model was saved; {keep}. Lower "
            "learning_rate (or beta), or check the data for empty completions.")
    _stop(out, main, stopped["step"], line)


def _stop(out: Path, main: bool, step: int, line: str) -> None:
    """End a run that must not be called complete: status failed (with the latest complete checkpoint), one line."""
    if main:
        done = complete_checkpoints(out)
        write_status(out, "failed", step=step, error=line[:500], model_saved=False,
                     latest_checkpoint=done[-1].name if done else None)
    raise TrainingStopped(line)


#: the folder the final model is written into before its files are moved into place
_SAVING = ".alignkit-saving"


def _save_final_model(trainer, out: Path) -> None:
    """Write the final model into a temporary folder inside ``out``, then move each file into place: an
    interruption while saving leaves the earlier files whole (and the status not complete). Every rank calls
    this (ZeRO-3 gathers the weights collectively); rank 0 moves the files."""
    import shutil

    tmp = out / _SAVING
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

    from ..metrics.perf import peak_memory_gb

    acc = trainer.accelerator
    peak = torch.tensor([peak_memory_gb(acc.device)], dtype=torch.float64, device=acc.device)
    peaks = acc.gather(peak).tolist() if acc.num_processes > 1 else peak.tolist()
    plugin = getattr(acc.state, "deepspeed_plugin", None) if trainer.is_deepspeed_enabled else None
    return {"world_size": acc.num_processes, "deepspeed_zero_stage": plugin.zero_stage if plugin else None,
            "peak_memory_gb_per_rank": [round(p, 3) for p in peaks]}


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
    score = "reward" if recipe.method == "online_mdpo" else "objective/scores"  # TRL GRPO's name; PPO's
    div = f"divergence/{getattr(config, 'divergence', None)}"
    scores = [e for e in history if score in e and div in e]
    if len(scores) >= 2:
        info(f"mean score {scores[0][score]:.3f} (step {scores[0]['step']}) -> {scores[-1][score]:.3f} "
             f"(step {scores[-1]['step']}); {config.divergence} estimate {scores[0][div]:.3f} -> {scores[-1][div]:.3f}")
    key = "eval_accuracy" if recipe.method in REWARD_MODEL_METHODS else "eval_rewards/accuracies"
    evals = [e for e in history if key in e]
    if len(evals) >= 2:
        first, last = evals[0], evals[-1]
        info(f"eval (preference) accuracy {first[key]:.2f} (step {first['step']}) -> {last[key]:.2f} "
              f"(step {last['step']}); eval loss {first['eval_loss']:.4f} -> {last['eval_loss']:.4f}")
    info(f"saved model, tokenizer, recipe and metrics.json to {out}")
    if wandb_dir:
        runs = sorted(glob.glob(os.path.join(wandb_dir, "wandb", "offline-run-*")), key=os.path.getmtime)
        if runs:
            info(f"W&B run saved offline in {runs[-1]}; upload it with: wandb sync {runs[-1]}")
