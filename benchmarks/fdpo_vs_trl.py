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

* Saved activations: bytes of the tensors autograd keeps for backward in one step (each storage once),
  a deterministic figure for the part of memory a loss implementation can change.

Printed: ms/step, MB, and the ratios ours/TRL (target <= 1.03).

    python benchmarks/fdpo_vs_trl.py                 # CPU defaults, about 5 minutes on 2 cores
    python benchmarks/fdpo_vs_trl.py --steps 100 --model /path/to/model --bf16
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

from _harness import alternate_steps, cuda, offline_setup, peak_memory_of_training, run_worker, saved_activation_mb

DIVERGENCES = {
    "reverse_kl": (dict(divergence="reverse_kl"), dict()),
    "forward_kl": (dict(divergence="forward_kl"), dict(f_divergence_type="forward_kl")),
    "jsd": (dict(divergence="jsd"), dict(f_divergence_type="js_divergence")),
    "alpha0.5": (dict(divergence="alpha", alpha=0.5), dict(f_divergence_type="alpha_divergence",
                                                           f_alpha_divergence_coef=0.5)),
}


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


def time_worker(opts) -> dict:
    """Alternate steps of TRL's and our trainer on identical batches; median ms per step of each."""
    offline_setup(opts.threads)
    trainers = {k: _build(opts, k, opts.divergence, opts.batch_size * opts.steps) for k in ("trl", "alignkit")}
    batches = list(trainers["trl"].get_train_dataloader())
    saved = {f"saved_{k}": saved_activation_mb(t, batches[0]) for k, t in trainers.items()}
    return {**alternate_steps(trainers, {k: batches for k in trainers}, opts.warmup), **saved}


def memory_worker(opts) -> dict:
    """Train one trainer in this process and report its peak memory."""
    offline_setup(opts.threads)
    trainer = _build(opts, opts.trainer, opts.divergence, opts.batch_size * opts.memory_steps)
    return {"peak_mb": peak_memory_of_training(trainer)}


def _run(args: list[str]) -> dict:
    return run_worker(__file__, args)


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

    print(f"\nFDPOTrainer vs TRL DPOTrainer ({'GPU' if cuda() else 'CPU'}): batch {opts.batch_size} pairs, "
          f"{opts.steps} alternating steps each (median), peak memory median of {opts.rounds} processes")
    print(f"{'divergence':12s} {'TRL ms/step':>12s} {'ours ms/step':>13s} {'time ratio':>11s} "
          f"{'TRL act MB':>11s} {'ours act MB':>12s} {'act ratio':>10s} "
          f"{'TRL peak MB':>12s} {'ours peak MB':>13s} {'peak ratio':>11s}")
    worst = 0.0
    for div, t, m in rows:
        tr, ar, mr = t["alignkit"] / t["trl"], t["saved_alignkit"] / t["saved_trl"], m["alignkit"] / m["trl"]
        # The verdict uses the deterministic figures: time, saved activations, and on a GPU the CUDA peak.
        worst = max(worst, tr, ar, mr if cuda() else 0.0)
        print(f"{div:12s} {t['trl']:12.1f} {t['alignkit']:13.1f} {tr:11.3f} {t['saved_trl']:11.1f} "
              f"{t['saved_alignkit']:12.1f} {ar:10.3f} {m['trl']:12.1f} {m['alignkit']:13.1f} {mr:11.3f}")
    print("act = tensors saved for backward in one step (deterministic); peak = CUDA peak, or on a CPU the peak "
          "RSS rise during training (varies +-3% between processes, shown for reference)")
    print(f"\nworst ratio: {worst:.3f} (target <= 1.03)")


if __name__ == "__main__":
    main()
