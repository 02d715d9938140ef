"""`alignkit plot RUN_DIR`: training curves as PNGs from a run's `metrics.json`, for users without W&B.

One PNG per metric family (the part of the name before the first `/`: `rewards`, `link`, `perf`, `mmd`, ...;
names without a `/`, such as `loss` and `learning_rate`, go to `train.png`), one panel per metric, the value
against the optimizer step. An evaluation metric (`eval_<name>`) is drawn as points in the panel of `<name>`.
Works on what `alignkit train` writes (`metrics.json`) and on what Trainer writes at each checkpoint
(`trainer_state.json`): both hold the `log_history`.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

__all__ = ["PlotError", "plot_run", "curves"]

# run summaries, not curves
_SKIP = {"epoch", "step", "total_flos", "train_runtime", "train_samples_per_second", "train_steps_per_second",
         "train_loss", "train_iterations", "train_iterations_per_second", "eval_runtime", "eval_samples_per_second",
         "eval_steps_per_second", "episode", "num_tokens", "eval_num_tokens"}


class PlotError(ValueError):
    """A run folder or file that holds no training curves; the message names it and the fix."""


def _log_history(path: Path) -> list[dict]:
    if not path.exists():
        raise PlotError(f"{path}: no such file or folder; give a run's output_dir (the folder with metrics.json).")
    if path.is_dir():
        files = [path / "metrics.json", path / "trainer_state.json"]
        found = next((f for f in files if f.exists()), None)
        if found is None:
            raise PlotError(f"{path}: no metrics.json or trainer_state.json in it; give the output_dir of a finished "
                            "`alignkit train` run (or one of its checkpoint-* folders).")
        path = found
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PlotError(f"{path}: not a JSON file ({type(exc).__name__}); give a run's metrics.json.") from None
    history = data.get("log_history") if isinstance(data, dict) else None
    if not isinstance(history, list) or not history:
        raise PlotError(f"{path}: it holds no log_history (no training logs); was the run's logging_steps larger "
                        "than its number of steps?")
    return history


def curves(history: list[dict]) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """{family: {metric: [(step, value), ...]}}; evaluation entries under the metric's name with an `eval:` key."""
    out: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for i, entry in enumerate(history):
        step = entry.get("step", i)
        for key, value in entry.items():
            if key in _SKIP or isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            name, is_eval = (key[len("eval_"):], True) if key.startswith("eval_") else (key, False)
            family = name.split("/", 1)[0] if "/" in name else "train"
            out.setdefault(family, {}).setdefault(("eval:" if is_eval else "") + name, []).append((step, value))
    return out


def plot_run(run: str | Path, output: str | Path | None = None, overwrite: bool = False) -> list[Path]:
    """Write one PNG per metric family into `output` (default: `<run>/plots`); returns their paths. Earlier plots
    there are replaced only with `overwrite`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = Path(run)
    families = curves(_log_history(run))
    if not families:
        raise PlotError(f"{run}: its log_history has no numeric metrics to plot.")
    out = Path(output) if output else (run if run.is_dir() else run.parent) / "plots"
    if out.exists() and not out.is_dir():
        raise PlotError(f"--output {out}: a file; give a folder for the PNGs.")
    if not overwrite and out.is_dir() and any(out.glob("*.png")):
        raise PlotError(f"{out}: holds plots made earlier; add --overwrite to replace them, or give another --output.")
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for family, metrics in sorted(families.items()):
        names = sorted({m.removeprefix("eval:") for m in metrics})
        cols = min(3, len(names))
        rows = math.ceil(len(names) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
        for ax, name in zip(axes.flat, names):
            if name in metrics:
                xs, ys = zip(*metrics[name])
                ax.plot(xs, ys, color="#4C72B0", lw=1.2, marker="." if len(xs) < 30 else None, label="train")
            if "eval:" + name in metrics:
                xs, ys = zip(*metrics["eval:" + name])
                ax.plot(xs, ys, color="#C44E52", ls="--", marker="o", ms=4, label="eval")
            ax.set_title(name, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
            if name in metrics and "eval:" + name in metrics:
                ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(names):]:
            ax.set_visible(False)
        fig.tight_layout()
        path = out / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', family)}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        files.append(path)
    return files
