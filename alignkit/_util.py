"""Small helpers shared by the modules that turn exceptions into one-line user errors."""

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
