"""`alignkit dashboard`: a W&B workspace with the panels that tell each method's story.

Built with the `wandb-workspaces` package: one section per method (f-DPO, mDPO/mIPO, causal reward model, PPO)
and one for throughput (`perf/*`), each panel a line plot of the metrics the trainers log (docs/fdpo.md, "Logged
metrics"), training and evaluation side by side. With a W&B API key it is saved to the project and its URL
printed; without one (offline machines, CI) the workspace definition is written to a JSON file and the command
that pushes it later is printed.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["SECTIONS", "DashboardError", "build_workspace", "save_definition", "push_definition"]


class DashboardError(ValueError):
    """A dashboard that cannot be built or pushed; the message names the flag or file and the fix."""


def _both(*keys: str) -> list[str]:
    """A metric as W&B holds it from a Trainer run: `train/<key>` and `eval/<key>`."""
    return [f"{split}/{k}" for k in keys for split in ("train", "eval")]


def _train(*keys: str) -> list[str]:
    return [f"train/{k}" for k in keys]


#: section -> [(panel title, metrics of the panel, or a regex over metric names)]
SECTIONS: dict[str, list[tuple[str, list[str] | str]]] = {
    "f-DPO": [
        ("implicit rewards", _both("rewards/chosen", "rewards/rejected")),
        ("reward margin", _both("rewards/margins")),
        ("preference accuracy", _both("rewards/accuracies")),
        ("link values f'(u) - f'(1)", _both("link/chosen", "link/rejected")),
        ("clamped link fraction", _train("link/clamped_fraction")),
        ("calibration (ECE)", _both("calibration/ece")),
        ("predictive entropy", _both("entropy")),
        ("log-ratios from the reference", _both("logratios/chosen", "logratios/rejected")),
        ("loss", _both("loss")),
    ],
    "mDPO / mIPO": [
        ("group reward spread", _both("rewards/chosen_group_std", "rewards/rejected_group_std")),
        ("mIPO variance correction", _both("mipo/variance_correction")),
        ("group sizes", _train("group/chosen_size", "group/rejected_size")),
        ("group implicit rewards", _both("rewards/chosen", "rewards/rejected")),
        ("preference accuracy", _both("rewards/accuracies")),
    ],
    "Causal reward model": [
        ("reward by attribute bin", r"^(train|eval)/reward_by_bin/.*"),
        ("MMD penalty", _both("mmd/penalty")),
        ("Spearman(reward, bin)", _both("mmd/spearman_reward_bin")),
        ("reward spread (a collapse shows here)", _both("mmd/reward_std")),
        ("bins used / skipped", _train("mmd/bins_used", "mmd/bins_skipped")),
        ("accuracy", ["eval/accuracy", "train/accuracy"]),
        ("loss", _both("loss")),
    ],
    "PPO": [
        ("scores and RLHF reward", _both("objective/scores", "objective/rlhf_reward")),
        ("divergence from the reference (every f)", r"^(train|eval)/divergence/.*"),
        ("penalty in the objective", r"^(train|eval)/objective/(reverse_kl|forward_kl|jsd|alpha)$"),
        ("policy entropy", _both("objective/entropy")),
        ("clip fractions", _train("policy/clipfrac_avg", "val/clipfrac_avg")),
        ("approximate KL of the update", _train("policy/approxkl_avg")),
        ("losses", _train("loss/policy_avg", "loss/value_avg", "loss/divergence_avg")),
        ("time per iteration part", r"^train/time/.*"),
    ],
    "Online mDPO / mIPO": [
        ("reward of the samples (TRL GRPO's figures)", _both("reward", "reward_std")),
        ("reward of each source (unweighted)", r"^train/rewards/.*/mean$"),
        ("reward gap between the chosen and rejected sub-groups", _train("group/reward_gap")),
        ("divergence from the reference (every f)", r"^(train|eval)/divergence/.*"),
        ("group sizes", _train("group/chosen_size", "group/rejected_size")),
        ("prompts kept / skipped", _train("group/kept_prompts", "group/skipped_prompts")),
        ("implicit reward margin", _train("implicit_rewards/margins")),
        ("policy entropy", _both("entropy")),
        ("completion length", _both("completions/mean_length")),
        ("loss", _train("loss")),
    ],
    "Throughput": [
        ("tokens per second", _train("perf/tokens_per_second")),
        ("MFU", _train("perf/mfu")),
        ("peak memory (GB)", _train("perf/peak_memory_gb")),
    ],
}

#: recipe method -> its section
METHOD_SECTIONS = {"fdpo": "f-DPO", "mdpo": "mDPO / mIPO", "crm": "Causal reward model", "ppo": "PPO",
                   "online_mdpo": "Online mDPO / mIPO"}


def _method_of_run(run_dir: str | Path) -> str:
    path = Path(run_dir) / "alignkit_recipe.yaml"
    if not path.is_file():
        raise DashboardError(f"--run-dir {run_dir}: no alignkit_recipe.yaml in it; give the output_dir of an "
                             "`alignkit train` run, or leave --run-dir out for every method's section.")
    import yaml

    method = (yaml.safe_load(path.read_text()) or {}).get("method")
    if method not in METHOD_SECTIONS:
        raise DashboardError(f"{path}: method {method!r} has no dashboard section; one of {sorted(METHOD_SECTIONS)}.")
    return method


def build_workspace(project: str, entity: str = "", run_dir: str | Path | None = None, name: str | None = None):
    """The workspace (a `wandb_workspaces.workspaces.Workspace`): every method's section, or with `run_dir` the
    section of that run's method; Throughput always."""
    try:
        import wandb_workspaces.reports.v2 as wr
        import wandb_workspaces.workspaces as ws
    except ImportError:
        raise DashboardError("alignkit dashboard needs the wandb-workspaces package: pip install "
                             "'wandb-workspaces>=0.4'") from None
    if not project:
        raise DashboardError("--project is empty; give the W&B project your runs log to (wandb.project).")
    sections = list(SECTIONS)
    if run_dir is not None:
        sections = [METHOD_SECTIONS[_method_of_run(run_dir)], "Throughput"]
    built = []
    for section in sections:
        panels = []
        for title, metrics in SECTIONS[section]:
            if isinstance(metrics, str):
                panels.append(wr.LinePlot(title=title, metric_regex=metrics))
            else:
                panels.append(wr.LinePlot(title=title, y=list(metrics)))
        built.append(ws.Section(name=section, panels=panels, is_open=True))
    return ws.Workspace(entity=entity, project=project, name=name or f"alignkit: {', '.join(sections[:-1])}",
                        sections=built)


def save_definition(workspace, path: str | Path) -> Path:
    """The workspace's definition (W&B's view model) as JSON, for `push_definition` later."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json.loads(workspace._to_model().model_dump_json()), indent=1))
    return path


def load_definition(path: str | Path, entity: str | None = None):
    """The workspace of a saved definition (entity replaced when given)."""
    import wandb_workspaces.workspaces as ws
    from wandb_workspaces.workspaces.internal import View

    try:
        view = View.model_validate_json(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise DashboardError(f"--push {path}: not a workspace definition written by alignkit dashboard "
                             f"({type(exc).__name__}).") from None
    workspace = ws.Workspace._from_model(view)
    if entity:
        workspace.entity = entity
    return workspace


def push_definition(path: str | Path, entity: str | None = None) -> str:
    """Save a written definition to W&B (needs an API key and network); returns the workspace URL."""
    from ._util import has_wandb_key

    if not Path(path).is_file():
        raise DashboardError(f"--push {path}: no such file; write the definition first with alignkit dashboard "
                             "--project PROJECT --output FILE.")
    workspace = load_definition(path, entity)
    if not workspace.entity:
        raise DashboardError("--push needs --entity: the definition was written without one (your W&B user or "
                             "team name).")
    if not has_wandb_key():
        raise DashboardError(f"--push {path}: saving to W&B needs an API key; run `wandb login` (or set "
                             "WANDB_API_KEY), then run this again.")
    return workspace.save().url
