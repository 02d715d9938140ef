"""Step time and memory of CausalRewardTrainer against TRL's RewardTrainer, same model and batches.

Variants of the penalty: on the scalar reward (default), conditional, and on the last hidden state; all
with Z = completion length in tokens, 10 quantile bins. Method as in fdpo_vs_trl.py: the two trainers
take turns step by step on identical batches in one process (the bin-balanced sampler's batches, with
`z_bins` removed for TRL), median ms per step; tensors saved for backward in one step (deterministic);
peak memory in separate processes (CUDA peak, or the RSS rise on a CPU; median of `--rounds`).
Target: ratio <= 1.05.

    python benchmarks/crm_vs_trl.py                  # CPU defaults, about 3 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

from _harness import alternate_steps, cuda, offline_setup, peak_memory_of_training, run_worker, saved_activation_mb

VARIANTS = {
    "reward": dict(mmd_on="reward"),
    "reward-conditional": dict(mmd_on="reward", conditional=True),
    "hidden": dict(mmd_on="hidden"),
}


def _build(opts, trainer_kind: str, variant: str, num_rows: int):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    from alignkit import CausalRewardConfig, CausalRewardTrainer
    from alignkit.data.synthetic import length_bias
    from alignkit.models import build_tiny_model

    path = opts.model or str(build_tiny_model("small-llama"))
    tok = AutoTokenizer.from_pretrained(path)
    dtype = torch.bfloat16 if opts.bf16 else torch.float32
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype).to(device)
    common = dict(output_dir="/tmp/alignkit-bench", per_device_train_batch_size=opts.batch_size,
                  max_steps=num_rows // opts.batch_size, bf16=opts.bf16, report_to=[], save_strategy="no",
                  logging_steps=10_000, disable_tqdm=True, learning_rate=1e-5, seed=0)
    ds = length_bias("train", num_samples=num_rows, seed=1)
    if trainer_kind == "trl":
        return RewardTrainer(model=model, args=RewardConfig(**common), train_dataset=ds, processing_class=tok)
    args = CausalRewardConfig(**common, mmd_coef=1.0, attributes=["length"], num_bins=10, **VARIANTS[variant])
    return CausalRewardTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)


def time_worker(opts) -> dict:
    offline_setup(opts.threads)
    trainers = {k: _build(opts, k, opts.variant, opts.batch_size * opts.steps) for k in ("trl", "alignkit")}
    ours = list(trainers["alignkit"].get_train_dataloader())
    theirs = [{k: v for k, v in b.items() if k != "z_bins"} for b in ours]
    batches = {"trl": theirs, "alignkit": ours}
    saved = {f"saved_{k}": saved_activation_mb(t, batches[k][0]) for k, t in trainers.items()}
    return {**alternate_steps(trainers, batches, opts.warmup), **saved}


def memory_worker(opts) -> dict:
    offline_setup(opts.threads)
    return {"peak_mb": peak_memory_of_training(_build(opts, opts.trainer, opts.variant,
                                                      opts.batch_size * opts.memory_steps))}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--memory-steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", default=None, help="model folder (default: builtin small-llama, 4 layers x 256)")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--variants", nargs="*", default=list(VARIANTS))
    p.add_argument("--worker", choices=["time", "memory"], help=argparse.SUPPRESS)
    p.add_argument("--trainer", choices=["alignkit", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    opts = p.parse_args()
    if opts.worker:
        result = time_worker(opts) if opts.worker == "time" else memory_worker(opts)
        print("RESULT " + json.dumps(result), flush=True)
        return

    common = ["--steps", str(opts.steps), "--warmup", str(opts.warmup), "--batch-size", str(opts.batch_size),
              "--threads", str(opts.threads), "--memory-steps", str(opts.memory_steps)]
    common += (["--model", opts.model] if opts.model else []) + (["--bf16"] if opts.bf16 else [])
    rows = []
    for v in opts.variants:
        print(f"timing {v} ...", file=sys.stderr, flush=True)
        t = run_worker(__file__, ["--worker", "time", "--variant", v, *common])
        mem = {"trl": [], "alignkit": []}
        for r in range(opts.rounds):
            for k in (("trl", "alignkit") if r % 2 == 0 else ("alignkit", "trl")):
                mem[k].append(run_worker(__file__, ["--worker", "memory", "--trainer", k, "--variant", v,
                                                    *common])["peak_mb"])
        rows.append((v, t, {k: statistics.median(x) for k, x in mem.items()}))

    print(f"\nCausalRewardTrainer vs TRL RewardTrainer ({'GPU' if cuda() else 'CPU'}): batch {opts.batch_size} pairs, "
          f"{opts.steps} alternating steps each (median), Z = length, 10 bins, peak memory median of {opts.rounds}")
    print(f"{'variant':20s} {'TRL ms/step':>12s} {'ours ms/step':>13s} {'time ratio':>11s} {'TRL act MB':>11s} "
          f"{'ours act MB':>12s} {'act ratio':>10s} {'TRL peak MB':>12s} {'ours peak MB':>13s} {'peak ratio':>11s}")
    worst = 0.0
    for v, t, m in rows:
        tr, ar, mr = t["alignkit"] / t["trl"], t["saved_alignkit"] / t["saved_trl"], m["alignkit"] / m["trl"]
        worst = max(worst, tr, ar, mr if cuda() else 0.0)
        print(f"{v:20s} {t['trl']:12.1f} {t['alignkit']:13.1f} {tr:11.3f} {t['saved_trl']:11.1f} "
              f"{t['saved_alignkit']:12.1f} {ar:10.3f} {m['trl']:12.1f} {m['alignkit']:13.1f} {mr:11.3f}")
    print("act = tensors saved for backward in one step (deterministic); peak = CUDA peak, or on a CPU the peak "
          "RSS rise during training (varies +-3% between processes, shown for reference)")
    print(f"\nworst ratio: {worst:.3f} (target <= 1.05)")


if __name__ == "__main__":
    main()
