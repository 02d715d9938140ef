"""Small helpers shared across the package: one-line errors, torch threads, W&B's environment."""

from __future__ import annotations

import os


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type name when the message is empty (an
    error handler must never fail on an exception without a message)."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__


class AlignkitWarning(UserWarning):
    """Warnings alignkit raises about a user's configuration (printed as one line by the CLI)."""


def threads_for_idle_cores(cores: int, load: float) -> int:
    """One torch thread per idle core, at least one: ``cores`` minus the 1-minute load average, rounded down. Torch
    otherwise takes every core, and when another process holds one, its threads wait on each other: on this project's
    2-core machines a training step with 2 threads beside a CPU-bound process ran up to 7x slower than with 1."""
    return max(1, min(cores, int(cores - load)))


def set_torch_threads_for_this_machine() -> str | None:
    """Apply threads_for_idle_cores unless the user chose (OMP_NUM_THREADS set); returns the line that says so."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    threads = threads_for_idle_cores(cores, load)
    import torch

    torch.set_num_threads(threads)
    return (f"torch threads: {threads} ({cores} cores, 1-minute load {load:.1f}; set OMP_NUM_THREADS to choose)")


# ---- W&B's environment: one place for the offline switch (training runs and `alignkit eval`) ------------------

def wants_wandb(config) -> bool:
    """Whether a TrainingArguments reports to W&B."""
    report_to = config.report_to or []
    return "wandb" in (report_to if isinstance(report_to, list) else [report_to]) or report_to == "all"


def has_wandb_key() -> bool:
    """An API key in WANDB_API_KEY or ~/.netrc (what `wandb login` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    from pathlib import Path

    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def configure_wandb(default_dir, mode: str = "auto", project: str | None = None, entity: str | None = None,
                    group: str | None = None, tags: list[str] | None = None, say=None) -> str | None:
    """Set W&B's environment for this process: project, entity, group and tags when given (project defaults to
    "alignkit"), and the mode: "online", "offline", or "auto" (offline when no API key is found and WANDB_MODE does
    not say online; `say` is told so). Offline runs go under WANDB_DIR, default `default_dir`. Returns the W&B
    directory when offline (to tell the user how to sync it), else None."""
    from pathlib import Path

    for env, value in (("WANDB_PROJECT", project), ("WANDB_ENTITY", entity), ("WANDB_RUN_GROUP", group)):
        if value:
            os.environ[env] = value
    if tags:
        os.environ["WANDB_TAGS"] = ",".join(tags)
    os.environ.setdefault("WANDB_PROJECT", "alignkit")
    if mode == "offline" or (mode == "auto" and os.environ.get("WANDB_MODE") != "online" and not has_wandb_key()):
        if mode == "auto" and os.environ.get("WANDB_MODE") not in ("offline", "dryrun") and say is not None:
            say("W&B: no API key found (WANDB_API_KEY or ~/.netrc), so this run is logged offline.")
        os.environ["WANDB_MODE"] = "offline"
    elif mode == "online":
        os.environ["WANDB_MODE"] = "online"
    if os.environ.get("WANDB_MODE") == "offline":
        wandb_dir = os.environ.setdefault("WANDB_DIR", str(Path(default_dir).resolve()))
        Path(wandb_dir).mkdir(parents=True, exist_ok=True)
        return wandb_dir
    return None


def info(msg: str) -> None:
    """One `[alignkit] ...` line on stderr."""
    import sys

    print(f"[alignkit] {msg}", file=sys.stderr, flush=True)
