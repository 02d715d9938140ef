"""What `alignkit train` shows on the terminal: one progress bar for training and one for evaluation, the
logged metrics as a compact table at each log step, and none of the third-party chatter a recipe user
cannot act on (progress bars of dataset maps and weight loading, DeepSpeed's accelerator line on stdout,
reports of a newly initialised score head, which alignkit says in one line instead).

Only the command line is changed: code that imports the trainers keeps Trainer's and TRL's own output.
"""

from __future__ import annotations

import logging
import sys

from transformers import ProgressCallback
from transformers.trainer_callback import PrinterCallback

__all__ = ["ConsoleCallback", "format_metrics", "quiet_third_party", "use_console"]

#: width of the metrics table
_WIDTH = 112
#: keys that are shown in the table's header or not at all
_HIDDEN = {"total_flos", "epoch", "step", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second"}


def _value(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def format_metrics(logs: dict, step: int, max_steps: int) -> str:
    """A compact, aligned table of one log entry: a header line (step, epoch, train/eval) and the metrics in
    as many columns as fit in about 110 characters."""
    is_eval = any(k.startswith("eval_") for k in logs)
    is_summary = "train_runtime" in logs
    kind = "eval" if is_eval else "summary" if is_summary else "train"
    items = []
    for key, value in logs.items():
        if key in _HIDDEN or not isinstance(value, (int, float, str)):
            continue
        name = key[len("eval_"):] if is_eval and key.startswith("eval_") else key
        items.append((name, _value(value)))
    epoch = logs.get("epoch")
    header = f"[{kind}] step {step}/{max_steps}" + (f"  epoch {epoch:.2f}" if isinstance(epoch, (int, float)) else "")
    if not items:
        return header
    name_w = max(len(n) for n, _ in items)
    value_w = max(len(v) for _, v in items)
    cell = name_w + 1 + value_w
    columns = max(1, (_WIDTH - 2) // (cell + 3))
    lines = [header]
    for i in range(0, len(items), columns):
        row = items[i:i + columns]
        lines.append("  " + "   ".join(f"{n:<{name_w}} {v:>{value_w}}" for n, v in row).rstrip())
    return "\n".join(lines)


class ConsoleCallback(ProgressCallback):
    """Trainer's progress callback with the logs as a table (Trainer prints each log as a Python dict) and
    labelled bars; with ``bars=False`` (``disable_tqdm``) only the tables."""

    def __init__(self, bars: bool = True):
        super().__init__()
        self.bars = bars

    def on_train_begin(self, args, state, control, **kwargs):
        self.current_step = 0
        if state.is_world_process_zero and self.bars:
            from tqdm.auto import tqdm

            self.training_bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", unit="step",
                                     dynamic_ncols=True)
            self.current_step = state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        if self.training_bar is not None:
            super().on_step_end(args, state, control, **kwargs)

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if not (state.is_world_process_zero and self.bars):
            return
        if self.prediction_bar is None and eval_dataloader is not None and hasattr(eval_dataloader, "__len__"):
            from tqdm.auto import tqdm

            self.prediction_bar = tqdm(total=len(eval_dataloader), desc="eval", unit="batch", leave=False,
                                       dynamic_ncols=True)
        if self.prediction_bar is not None:
            self.prediction_bar.update(1)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        text = format_metrics(logs, state.global_step, state.max_steps)
        if self.training_bar is not None:
            self.training_bar.write(text, file=sys.stdout)
        else:
            print(text, flush=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self.training_bar is not None:
            self.training_bar.close()
            self.training_bar = None


def use_console(trainer) -> None:
    """Replace Trainer's progress/printer callback with :class:`ConsoleCallback`."""
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(ConsoleCallback(bars=not trainer.args.disable_tqdm))


class _NewHeadReport(logging.Filter):
    """Drops transformers' LOAD REPORT when the only missing weights are a new score head (what alignkit
    asks for when it builds a reward or value model from a language model); notes it in ``heads``."""

    def __init__(self):
        super().__init__()
        self.heads: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if "LOAD REPORT" not in msg:
            return True
        rows = [line.split("|") for line in msg.splitlines() if line.count("|") >= 2]
        rows = [(r[0].strip(), r[1].strip()) for r in rows if r[0].strip() not in ("Key", "") and
                not r[0].strip().startswith("-")]
        heads = ("score.", "classifier.", "v_head.")
        new = [k for k, status in rows if "MISSING" in status and k.startswith(heads)]
        others = [k for k, status in rows if not ("MISSING" in status and k.startswith(heads)) and
                  not ("UNEXPECTED" in status and k.startswith("lm_head."))]
        if new and not others:
            self.heads.append(", ".join(new))
            return False
        return True


_REPORT_FILTER = _NewHeadReport()


def quiet_third_party() -> None:
    """Silence what says nothing to a recipe user: dataset-map and weight-loading progress bars (alignkit
    prints one line per dataset split instead), DeepSpeed's stdout logger (moved to stderr, warnings only),
    and the load report of an expected new score head."""
    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    logger = logging.getLogger("transformers.modeling_utils")
    if _REPORT_FILTER not in logger.filters:
        logger.addFilter(_REPORT_FILTER)
    if "deepspeed" in sys.modules:
        ds_logger = logging.getLogger("DeepSpeed")
        for handler in ds_logger.handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
                handler.setStream(sys.stderr)


def new_heads() -> list[str]:
    """Score heads created since the last call (see quiet_third_party)."""
    heads, _REPORT_FILTER.heads[:] = list(_REPORT_FILTER.heads), []
    return heads
