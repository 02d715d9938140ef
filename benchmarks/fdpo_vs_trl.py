"""Step time and peak memory of FDPOTrainer against TRL's DPOTrainer, same model and batches.

For every divergence, FDPOTrainer(divergence=d) is compared with TRL's DPOTrainer running the same
divergence (TRL 1.16 has all four as `f_divergence_type`), on identical batches, model and seed.

* Time: both trainers live in one process and take turns, step by step, on the same batches (the
  order alternates every step); the median of the per-step times (forward, backward, optimizer step)
  is compared. Separate processes differ by a few percent from run to run, which would swamp the
  difference being measured.
* Peak memory: each (trainer, divergence) trains in its own process; on a GPU the peak of
  `torch.cuda.max_memory_allocated`, on a CPU the peak resident memory during training above what was
  resident before it. Median over `--rounds` processes.

Printed: ms/step, peak MB, and the ratios ours/TRL (target <= 1.03).

    python benchmarks/fdpo_vs_trl.py                 # CPU defaults, about 5 minutes on 2 cores
    python benchmarks/fdpo_vs_trl.py --steps 100 --model /path/to/model --bf16
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

DIVERGENCES = {
    "reverse_kl": (dict(divergence="reverse_kl"), dict()),
    "forward_kl": (dict(divergence="forward_kl"), dict(f_divergence_type="forward_kl")),
    "jsd": (dict(divergence="jsd"), dict(f_divergence_type="js_divergence")),
    "alpha0.5": (dict(divergence="alpha", alpha=0.5), dict(f_divergence_type="alpha_divergence",
                                                           f_alpha_divergence_coef=0.5)),
}


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _setup(opts):
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled")
    import datasets
    import torch

    datasets.disable_progress_bars()
    torch.set_num_threads(opts.threads)


def _build(opts, trainer_kind: str, divergence: str, num_rows: int):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from alignkit import FDPOConfig, FDPOTrainer
    from alignkit.data.synthetic import sentiment
    from alignkit.models import build_tiny_model

    path = opts.model or str(build_tiny_model("small-llama"))
    tok = AutoTokenizer.from_pretrained(path)
    ours, theirs = DIVERGENCES[divergence]
    cls, cfg_cls, kw = (FDPOTrainer, FDPOConfig, ours) if trainer_kind == "alignkit" else (DPOTrainer, DPOConfig, theirs)
    dtype = torch.bfloat16 if opts.bf16 else torch.float32
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    args = cfg_cls(output_dir="/tmp/alignkit-bench", per_device_train_batch_size=opts.batch_size,
                   max_steps=num_rows // opts.batch_size, bf16=opts.bf16, report_to=[], save_strategy="no",
                   logging_steps=10_000, disable_tqdm=True, learning_rate=1e-5, seed=0, **kw)
    ds = sentiment("train", num_samples=num_rows, seed=1)
    return cls(model=model, ref_model=ref, args=args, train_dataset=ds, processing_class=tok)


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_worker(opts) -> dict:
    """Alternate steps of TRL's and our trainer on identical batches; median ms per step of each."""
    _setup(opts)
    trainers = {k: _build(opts, k, opts.divergence, opts.batch_size * opts.steps) for k in ("trl", "alignkit")}
    batches = list(trainers["trl"].get_train_dataloader())
    for t in trainers.values():
        t.create_optimizer()
        t.model.train()
        t.current_gradient_accumulation_steps = 1  # set by Trainer.train's loop, which we drive by hand
    times = {k: [] for k in trainers}
    for i, batch in enumerate(batches):
        order = ("trl", "alignkit") if i % 2 == 0 else ("alignkit", "trl")
        for k in order:
            t = trainers[k]
            inputs = t._prepare_inputs(batch)
            _sync()
            start = time.perf_counter()
            t.training_step(t.model, inputs)
            t.optimizer.step()
            t.optimizer.zero_grad()
            _sync()
            times[k].append(time.perf_counter() - start)
    return {k: 1000 * statistics.median(v[opts.warmup:]) for k, v in times.items()}


def memory_worker(opts) -> dict:
    """Train one trainer in this process and report its peak memory."""
    _setup(opts)
    import torch

    trainer = _build(opts, opts.trainer, opts.divergence, opts.batch_size * opts.memory_steps)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    rss_before = _rss_mb()
    trainer.train()
    if torch.cuda.is_available():
        return {"peak_mb": torch.cuda.max_memory_allocated() / 2**20}
    return {"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before}


def _run(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False)
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode != 0 or not line:
        sys.exit(f"worker {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(line[0][7:])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60, help="alternating timed steps per trainer")
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the median")
    p.add_argument("--rounds", type=int, default=3, help="processes per (trainer, divergence) for peak memory")
    p.add_argument("--memory-steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", default=None, help="model folder (default: builtin small-llama, 4 layers x 256)")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--divergences", nargs="*", default=list(DIVERGENCES))
    p.add_argument("--worker", choices=["time", "memory"], help=argparse.SUPPRESS)
    p.add_argument("--trainer", choices=["alignkit", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--divergence", help=argparse.SUPPRESS)
    opts = p.parse_args()
    if opts.worker:
        result = time_worker(opts) if opts.worker == "time" else memory_worker(opts)
        print("RESULT " + json.dumps(result), flush=True)
        return

    common = ["--steps", str(opts.steps), "--warmup", str(opts.warmup), "--batch-size", str(opts.batch_size),
              "--threads", str(opts.threads), "--memory-steps", str(opts.memory_steps)]
    common += (["--model", opts.model] if opts.model else []) + (["--bf16"] if opts.bf16 else [])
    rows = []
    for div in opts.divergences:
        print(f"timing {div} ...", file=sys.stderr, flush=True)
        t = _run(["--worker", "time", "--divergence", div, *common])
        mem = {"trl": [], "alignkit": []}
        for r in range(opts.rounds):
            for k in (("trl", "alignkit") if r % 2 == 0 else ("alignkit", "trl")):
                print(f"  memory {div} {k} round {r + 1}", file=sys.stderr, flush=True)
                mem[k].append(_run(["--worker", "memory", "--trainer", k, "--divergence", div, *common])["peak_mb"])
        rows.append((div, t, {k: statistics.median(v) for k, v in mem.items()}))

    print(f"\nFDPOTrainer vs TRL DPOTrainer ({'GPU' if _cuda() else 'CPU'}): batch {opts.batch_size} pairs, "
          f"{opts.steps} alternating steps each (median), peak memory median of {opts.rounds} processes")
    print(f"{'divergence':12s} {'TRL ms/step':>12s} {'ours ms/step':>13s} {'time ratio':>11s} "
          f"{'TRL peak MB':>12s} {'ours peak MB':>13s} {'mem ratio':>10s}")
    worst = 0.0
    for div, t, m in rows:
        tr, mr = t["alignkit"] / t["trl"], m["alignkit"] / m["trl"]
        worst = max(worst, tr, mr)
        print(f"{div:12s} {t['trl']:12.1f} {t['alignkit']:13.1f} {tr:11.3f} {m['trl']:12.1f} {m['alignkit']:13.1f} {mr:10.3f}")
    print(f"\nworst ratio: {worst:.3f} (target <= 1.03)")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
