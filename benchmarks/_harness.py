"""Shared measurement helpers for the benchmarks (not a benchmark itself)."""

from __future__ import annotations

import json
import os
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
    from alignkit.metrics.perf import peak_memory_gb

    # the process' own high-water mark (ru_maxrss would start at the parent's, carried over fork and exec)
    return peak_memory_gb("cpu") * 1e9 / 2**20 - before


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


def comparison_main(script: str, doc: str, label: str, choices: list[str], time_worker, memory_worker, title,
                    target: float, extra=None) -> None:
    """The driver shared by the ours-vs-TRL benchmarks: parse the common options, run (in fresh processes)
    one timing worker per choice and `--rounds` memory workers per (trainer, choice), print the table.

    `label` names what varies (`divergence`, `variant`): `--<label>s` picks the choices, and the workers read
    `opts.<label>`. `title(opts)` is the table's heading; `target` the ratio the verdict is checked against."""
    import argparse

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60, help="alternating timed steps per trainer")
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the median")
    p.add_argument("--rounds", type=int, default=3, help=f"processes per (trainer, {label}) for peak memory")
    p.add_argument("--memory-steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", default=None, help="model folder (default: builtin small-llama, 4 layers x 256)")
    p.add_argument("--bf16", action="store_true")
    p.add_argument(f"--{label}s", nargs="*", default=list(choices))
    p.add_argument("--worker", choices=["time", "memory"], help=argparse.SUPPRESS)
    p.add_argument("--trainer", choices=["alignkit", "trl"], help=argparse.SUPPRESS)
    p.add_argument(f"--{label}", help=argparse.SUPPRESS)
    passed = extra(p) if extra else []  # a benchmark's own options, passed on to its workers
    opts = p.parse_args()
    if opts.worker:
        result = time_worker(opts) if opts.worker == "time" else memory_worker(opts)
        print("RESULT " + json.dumps(result), flush=True)
        return

    common = ["--steps", str(opts.steps), "--warmup", str(opts.warmup), "--batch-size", str(opts.batch_size),
              "--threads", str(opts.threads), "--memory-steps", str(opts.memory_steps)]
    common += (["--model", opts.model] if opts.model else []) + (["--bf16"] if opts.bf16 else [])
    for name in passed:
        value = getattr(opts, name)
        flag = "--" + name.replace("_", "-")
        common += ([flag] if value is True else []) if isinstance(value, bool) else [flag, str(value)]
    rows = []
    for choice in getattr(opts, f"{label}s"):
        print(f"timing {choice} ...", file=sys.stderr, flush=True)
        t = run_worker(script, ["--worker", "time", f"--{label}", choice, *common])
        mem = {"trl": [], "alignkit": []}
        for r in range(opts.rounds):
            for k in (("trl", "alignkit") if r % 2 == 0 else ("alignkit", "trl")):
                print(f"  memory {choice} {k} round {r + 1}", file=sys.stderr, flush=True)
                mem[k].append(run_worker(script, ["--worker", "memory", "--trainer", k, f"--{label}", choice,
                                                  *common])["peak_mb"])
        rows.append((choice, t, {k: statistics.median(v) for k, v in mem.items()}))

    print(f"\n{title(opts)}")
    print(f"{label:20s} {'TRL ms/step':>12s} {'ours ms/step':>13s} {'time ratio':>11s} {'TRL act MB':>11s} "
          f"{'ours act MB':>12s} {'act ratio':>10s} {'TRL peak MB':>12s} {'ours peak MB':>13s} {'peak ratio':>11s}")
    worst = 0.0
    for choice, t, m in rows:
        tr, ar, mr = t["alignkit"] / t["trl"], t["saved_alignkit"] / t["saved_trl"], m["alignkit"] / m["trl"]
        # the verdict uses the deterministic figures: time, saved activations, and on a GPU the CUDA peak
        worst = max(worst, tr, ar, mr if cuda() else 0.0)
        print(f"{choice:20s} {t['trl']:12.1f} {t['alignkit']:13.1f} {tr:11.3f} {t['saved_trl']:11.1f} "
              f"{t['saved_alignkit']:12.1f} {ar:10.3f} {m['trl']:12.1f} {m['alignkit']:13.1f} {mr:11.3f}")
    print("act = tensors saved for backward in one step (deterministic); peak = CUDA peak, or on a CPU the peak "
          "RSS rise during training (varies +-3% between processes, shown for reference)")
    print(f"\nworst ratio: {worst:.3f} (target <= {target:g})")
