"""What a run keeps in its output_dir: the status file, the artifacts that mark a folder as holding a run, and the
checkpoints. Read by the plan (may this run write here? which checkpoint does it resume?) and written by the run
step. No step of the pipeline lives here: plain file-system facts about a run folder."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

__all__ = ["STATUS_FILE", "RUN_ARTIFACTS", "run_status", "write_status", "mark_failed", "complete_checkpoints",
           "run_artifacts", "clear_previous_run"]

#: the run's status file: {"status": "running" | "complete" | "interrupted" | "failed", ...}; a run is
#: finished only when it says "complete" (written last, after the model, the card and metrics.json)
STATUS_FILE = "alignkit_run.json"


#: files and folders a run writes into output_dir; any of them there means the folder holds a run
RUN_ARTIFACTS = ("alignkit_recipe.yaml", STATUS_FILE, "metrics.json", "config.json", "model.safetensors",
                 "pytorch_model.bin", "adapter_config.json", "adapter_model.safetensors", "training_args.bin",
                 "trainer_state.json", "value_model", "alignkit_attribute_bins.json")


def run_artifacts(out: Path) -> list[str]:
    if not out.is_dir():
        return []
    found = [name for name in RUN_ARTIFACTS if (out / name).exists()]
    found += sorted(p.name for p in out.glob("checkpoint-*") if p.is_dir())
    return found


def write_status(out: Path, status: str, **extra) -> None:
    from .. import __version__

    record = {"status": status, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "alignkit": __version__, **extra}
    tmp = out / f".{STATUS_FILE}.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, out / STATUS_FILE)


def run_status(output_dir: str | os.PathLike) -> dict | None:
    """The status record of the run in ``output_dir`` (``None`` if none): a run is finished only when its
    ``status`` is ``"complete"``."""
    try:
        return json.loads((Path(output_dir) / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None


def mark_failed(output_dir: str | os.PathLike, error: str) -> None:
    """A run whose workers failed (the launcher saw them die) is marked failed, not left "running"; the latest
    complete checkpoint is named for a resume."""
    out = Path(output_dir)
    record = run_status(out)
    if record is None or record.get("status") != "running":
        return
    done = complete_checkpoints(out)
    write_status(out, "failed", error=error[:500], latest_checkpoint=done[-1].name if done else None,
                  resumed_from=record.get("resumed_from"))


def complete_checkpoints(out: Path) -> list[Path]:
    """Checkpoints of ``out`` that were written to the end (Trainer writes trainer_state.json last), oldest first."""
    found = []
    for p in out.glob("checkpoint-*") if out.is_dir() else []:
        step = p.name.split("-", 1)[1]
        if p.is_dir() and step.isdigit() and (p / "trainer_state.json").is_file():
            found.append((int(step), p))
    return [p for _, p in sorted(found)]


def clear_previous_run(out: Path) -> None:
    """overwrite_output_dir: true: remove the earlier run's artifacts (checkpoints included, so that a later
    `resume_from_checkpoint: true` can never pick one of them up). Files that are not a run's are kept."""
    import shutil

    for name in run_artifacts(out):
        p = out / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    for name in ("README.md", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "generation_config.json", "chat_template.jinja"):
        (out / name).unlink(missing_ok=True)
