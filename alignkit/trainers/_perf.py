"""`perf/*` metrics in every alignkit trainer's training logs: tokens per second, MFU and peak memory.

Transformers' Trainer reports only `train_samples_per_second` at the end of a run; TRL adds a running token count.
Neither gives throughput per logging window, model FLOPs utilisation or memory. The mixin counts the tokens of
each training batch, times the optimizer steps with a callback (on_step_begin to on_step_end: forward, backward
and optimizer step; evaluation, checkpointing and logging excluded), and adds at every training log:

* `perf/tokens_per_second`: non-padding tokens trained on per second, summed over processes;
* `perf/mfu`: model FLOPs (alignkit.metrics.perf: 6 N + 12 L d S per token) per second over the devices' dense
  bf16 peak (`peak_tflops` in the config, else the table of known GPUs; not logged when neither is known, e.g.
  on a CPU);
* `perf/peak_memory_gb`: the peak memory of this process so far (torch's on a GPU, resident set on a CPU).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers import TrainerCallback

from ..metrics.perf import device_peak_tflops, matmul_parameters, peak_memory_gb, training_flops


@dataclass
class PerfArguments:
    """The config field of the `perf/*` metrics, shared by every alignkit config.

    Parameters:
        peak_tflops (`float`, *optional*): dense bf16 peak of one device in TFLOP/s, for `perf/mfu`. Default: from
            a table of known GPUs (H100, H200, A100, L40S, L4, MI300X); on a CPU or an unknown device `perf/mfu` is
            not logged unless this is set.
    """

    peak_tflops: float | None = field(default=None, metadata={"help": "Dense bf16 peak of one device, TFLOP/s "
                                                                      "(for perf/mfu; default: known GPUs)."})


class _StepTimer(TrainerCallback):
    """Sums the wall time of the optimizer steps (on_step_begin to on_step_end) into the trainer's counters. On a
    GPU the step that ends a logging window waits for the device first (the flow callback, which runs before this
    one, has decided by then whether to log), so the window's time includes the work still queued; the other steps
    add no synchronisation."""

    def __init__(self, counters: dict):
        self.counters, self.t0 = counters, None

    def on_step_begin(self, args, state, control, **kwargs):
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.t0 is not None:
            if control.should_log and torch.cuda.is_available():
                torch.cuda.synchronize()
            self.counters["seconds"] += time.perf_counter() - self.t0
            self.t0 = None


def _lengths(inputs) -> torch.Tensor | None:
    """The non-padding length of each sequence of a training batch: `packed_lengths` of a shared-prefix batch
    (mDPO/mIPO), else the rows of a 2-D `attention_mask`, else the padded width of `input_ids`."""
    if not isinstance(inputs, dict):
        return None
    if "packed_lengths" in inputs:
        return inputs["packed_lengths"]
    mask = inputs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        return mask.sum(1)
    ids = inputs.get("input_ids")
    if isinstance(ids, torch.Tensor) and ids.dim() == 2:
        return torch.full((ids.size(0),), ids.size(1))
    return None


class PerfMetricsMixin:
    """Adds the `perf/*` metrics (module docstring) to a Trainer subclass; first in the bases so that its `log`
    runs before TRL's. Trainers with their own loop (PPO) call `_perf_count` themselves."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._perf = {"tokens": 0.0, "tokens_times_length": 0.0, "seconds": 0.0}
        self._perf_matmul_params = None
        self.add_callback(_StepTimer(self._perf))

    def _perf_count(self, lengths: torch.Tensor, repeats: int = 1) -> None:
        # summed where the batch lives, read at log time: no device synchronisation per step
        lengths = lengths.detach().double()
        self._perf["tokens"] = self._perf["tokens"] + repeats * lengths.sum()
        self._perf["tokens_times_length"] = self._perf["tokens_times_length"] + repeats * lengths.square().sum()

    # Wraps Trainer.training_step (unchanged) to count the batch's tokens before it runs.
    def training_step(self, model, inputs, num_items_in_batch=None):
        lengths = _lengths(inputs)
        if lengths is not None:
            self._perf_count(lengths)
        return super().training_step(model, inputs, num_items_in_batch)

    def _perf_metrics(self) -> dict[str, float]:
        """The window's figures (all processes), then the counters reset. Collective: every process calls it."""
        p = self._perf
        device = self.accelerator.device
        totals = torch.stack([torch.as_tensor(p[k], dtype=torch.float64).to(device)
                              for k in ("tokens", "tokens_times_length", "seconds")])
        totals = self.accelerator.reduce(totals, reduction="sum").tolist() if self.accelerator.num_processes > 1 \
            else totals.tolist()
        p.update(tokens=0.0, tokens_times_length=0.0, seconds=0.0)
        tokens, tokens_times_length, seconds = totals
        processes = self.accelerator.num_processes
        seconds /= processes  # each process timed its own steps: the mean
        if tokens <= 0 or seconds <= 0:
            return {}
        model = self.accelerator.unwrap_model(self.model)
        model = getattr(model, "policy", model)  # PPO: the policy is the model trained on the tokens counted
        if self._perf_matmul_params is None:
            self._perf_matmul_params = matmul_parameters(model)
        out = {"perf/tokens_per_second": tokens / seconds,
               "perf/peak_memory_gb": peak_memory_gb(self.accelerator.device)}
        peak = getattr(self.args, "peak_tflops", None) or device_peak_tflops(self.accelerator.device)
        if peak:
            flops = training_flops(model, tokens, tokens_times_length, n=self._perf_matmul_params)
            out["perf/mfu"] = flops / seconds / (peak * 1e12 * processes)
        return out

    # Adds the perf/* figures to Trainer's training logs (the ones with the running `loss`), not to evaluation
    # logs or the end-of-training summary.
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and not any(k.startswith("eval_") for k in logs):
            logs.update(self._perf_metrics())
        super().log(logs, start_time)
