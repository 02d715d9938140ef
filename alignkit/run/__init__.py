"""A run, top to bottom: one module per step, each calling only the steps before it.

    recipe -> plan -> checks -> launch -> build -> execute

* `recipe`: the YAML schema (pure): sections, TRL config fields as TRL names them, `--set` overrides.
* `plan`: the recipe resolved for this process (pure): config arguments, PEFT, output folder, checkpoint to resume.
* `checks`: everything checked without weights (`alignkit validate` is plan + checks); loads data and tokenizer.
* `launch`: the only step that changes process state: starts the workers, or sets this process up.
* `build`: loads the models and makes the trainer.
* `execute`: trains, saves, writes metrics, card and status.

`alignkit plan` prints `estimate.plan_recipe` (memory and time, no weights); `outputs` knows a run folder's files.
docs/architecture.md draws the layers; import-linter enforces them (tests/test_architecture.py).
"""

from __future__ import annotations

__all__ = ["train"]


def train(recipe, plan=None) -> dict:
    """Steps 2 to 6 in this process: plan (unless given), checks, set-up, build, execute. For one process, or inside
    a worker that a launcher started (the `alignkit train` command launches the workers itself). Returns the run's
    metrics."""
    from .._util import info
    from .checks import check, finished_line
    from .launch import join, output_dir_lock, set_up_process
    from .plan import Role, make_plan

    plan = make_plan(recipe) if plan is None else plan
    if plan.finished is not None:
        info(finished_line(plan))
        return {}
    if plan.role is Role.LAUNCHER:
        raise RuntimeError("this recipe runs several processes; start it with `alignkit train RECIPE`, which "
                           "launches them")
    if plan.role is Role.WORKER:
        join(plan.section, plan.config_kwargs)  # before the checks: they build the config
    checked = check(plan)
    import os

    if os.environ.get("RANK", "0") == "0":  # once, not once per process
        for w in checked.warnings:
            info(f"warning: {w}")
    wandb_dir = set_up_process(plan, checked.config)
    from .build import build_trainer
    from .execute import execute

    import contextlib

    # a worker's launcher holds output_dir's lock for the whole job
    with contextlib.nullcontext() if plan.role is Role.WORKER else output_dir_lock(plan):
        return execute(plan, checked, build_trainer(plan, checked, wandb_dir), wandb_dir)
