"""Shared measurement helpers for the benchmarks (not a benchmark itself)."""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time


def offline_setup(threads: int) -> None:
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled")
    import datasets
    import torch

    datasets.disable_progress_bars()
    torch.set_num_threads(threads)


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def alternate_steps(trainers: dict, batches: dict, warmup: int) -> dict[str, float]:
    """Run the trainers' steps (forward, backward, optimizer) in turns, alternating who goes first;
    return each trainer's median ms per step, leaving the first ``warmup`` steps out."""
    for t in trainers.values():
        t.create_optimizer()
        t.model.train()
        t.current_gradient_accumulation_steps = 1  # normally set by Trainer.train's loop, driven by hand here
    names = list(trainers)
    times = {k: [] for k in names}
    for i in range(min(len(b) for b in batches.values())):
        for k in (names if i % 2 == 0 else names[::-1]):
            t = trainers[k]
            inputs = t._prepare_inputs(batches[k][i])
            sync()
            start = time.perf_counter()
            t.training_step(t.model, inputs)
            t.optimizer.step()
            t.optimizer.zero_grad()
            sync()
            times[k].append(time.perf_counter() - start)
    return {k: 1000 * statistics.median(v[warmup:]) for k, v in times.items()}


def peak_memory_of_training(trainer) -> float:
    """Train and return the peak memory in MB: CUDA peak allocation, or on a CPU the peak resident
    memory during training above what was resident before it."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    before = rss_mb()
    trainer.train()
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before


def run_worker(script: str, args: list[str]) -> dict:
    """Run ``script --worker ...`` in a fresh process and parse its ``RESULT {json}`` line."""
    out = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, check=False)
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode != 0 or not line:
        sys.exit(f"worker {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(line[0][7:])


def saved_activation_mb(trainer, batch) -> float:
    """Bytes (MB) of the tensors autograd keeps for the backward pass of one training loss, each storage
    counted once. Deterministic: parameters, gradients and optimizer state are the same for the trainers
    compared, so this is the part of peak memory a loss implementation changes. (RSS on a CPU varies by
    a few percent from process to process; on a GPU use the CUDA peak instead.)"""
    import torch

    seen: dict[int, int] = {}

    def pack(t):
        try:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, NotImplementedError):
            seen[id(t)] = t.numel() * t.element_size()
        return t

    trainer.model.train()
    inputs = trainer._prepare_inputs(batch)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    trainer.model.zero_grad(set_to_none=True)
    return sum(seen.values()) / 2**20
