"""Helpers shared by the alignkit config classes."""

from __future__ import annotations

import torch


def accelerator_available() -> bool:
    acc = getattr(torch, "accelerator", None)
    if acc is not None and hasattr(acc, "is_available"):
        return bool(acc.is_available())
    return torch.cuda.is_available()


def default_precision_for_this_machine(config) -> None:
    """TRL turns bf16 on when it is left unset; on a machine without an accelerator that makes
    `TrainingArguments` raise ("Your setup doesn't support bf16/gpu") and, where it runs, emulated bf16
    is 2-10x slower. Leave an unset `bf16` off there; keep TRL's default wherever an accelerator exists.
    An explicit `bf16: true` is never changed."""
    if config.bf16 is None and not config.fp16 and (config.use_cpu or not accelerator_available()):
        config.bf16 = False
