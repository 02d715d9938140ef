"""Throughput figures of a training run: model FLOPs per token, the device's peak, MFU and peak memory.

Convention (PaLM's, Chowdhery et al. 2022, appendix B): the model FLOPs of a forward and backward pass are,
per token of a sequence of length S,

    6 N + 12 L d S

where N counts the weights of the model's matrix multiplications (every `nn.Linear`, the output layer included;
embedding lookups and norms are not matmuls), L is the number of layers and d the width of the attention
(heads x head size). 6 N: a multiply-add (2 FLOPs) per weight in the forward pass and twice that in the backward
(the gradients of the input and of the weight); 12 L d S: the two attention products QK^T and AV, forward and
backward, counted in full even under a causal mask. It counts the *model's* FLOPs, not what the hardware ran:
activation recomputation (gradient checkpointing) and a frozen reference model's forward are not in it, and the
weights a LoRA adapter freezes still count in N. MFU is then (FLOPs per token x tokens per second) over the
device's dense bf16 peak.
"""

from __future__ import annotations

import resource
import sys

import torch
from torch import nn

__all__ = ["matmul_parameters", "flops_per_token", "training_flops", "DEVICE_PEAK_TFLOPS", "device_peak_tflops",
           "peak_memory_gb"]

# Dense (no sparsity) bf16 peak of known accelerators, TFLOP/s, from the vendors' data sheets. Matched in order
# against torch.cuda.get_device_name(): the first key contained in the name wins, so variants come first.
DEVICE_PEAK_TFLOPS: dict[str, float] = {
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.4,   # SXM
    "H200": 989.4,
    "GH200": 989.4,
    "H800": 989.4,
    "B200": 2250.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "MI300X": 1307.4,
}


def _numel(p: torch.Tensor) -> int:
    return int(getattr(p, "ds_numel", 0) or p.numel())  # under ZeRO-3 a partitioned weight's numel() is 0


def matmul_parameters(model: nn.Module) -> int:
    """N: the weights of the model's `nn.Linear` layers (a LoRA adapter's own matrices included), counted whole
    under ZeRO-3 partitioning."""
    return sum(_numel(m.weight) for m in model.modules() if isinstance(m, nn.Linear))


def _attention_shape(config) -> tuple[int, int]:
    """(layers, attention width) of a transformers config; (0, 0) when the config does not say."""
    config = getattr(config, "text_config", None) or config
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None) or 0
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None) or 0
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None) or 0
    head_dim = getattr(config, "head_dim", None) or (hidden // heads if heads else 0)
    return int(layers), int(heads * head_dim)


def training_flops(model: nn.Module, tokens: float, tokens_times_length: float, n: int | None = None) -> float:
    """Forward-and-backward model FLOPs of a batch: `tokens` = sum over sequences of their length S,
    `tokens_times_length` = sum of S^2 (each token attends over its sequence)."""
    n = matmul_parameters(model) if n is None else n
    layers, width = _attention_shape(getattr(model, "config", None))
    return 6.0 * n * tokens + 12.0 * layers * width * tokens_times_length


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Forward-and-backward model FLOPs per token of sequences of length `seq_len` (module docstring)."""
    return training_flops(model, 1.0, float(seq_len))


def device_peak_tflops(device: torch.device | str | None = None) -> float | None:
    """Dense bf16 peak of the CUDA device from `DEVICE_PEAK_TFLOPS`; None on a CPU or an unknown device (then
    give the peak yourself, e.g. `peak_tflops` in the trainer's config)."""
    if not torch.cuda.is_available() or (device is not None and torch.device(device).type != "cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in DEVICE_PEAK_TFLOPS.items() if key in name), None)


def peak_memory_gb(device: torch.device | str | None = None) -> float:
    """Peak memory of this process so far, GB (1e9 bytes): allocated by torch on a CUDA device, else the process'
    peak resident set size. On Linux that is VmHWM of /proc/self/status: `ru_maxrss` carries the parent's high-water
    mark over fork and exec, so a launcher's workers would report the launcher's memory as their own."""
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        return torch.cuda.max_memory_allocated(device) / 1e9
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e9  # kB
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux, bytes on macOS
    return rss * (1 if sys.platform == "darwin" else 1024) / 1e9
