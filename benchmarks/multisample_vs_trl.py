"""Per-completion cost of mDPO / mIPO against TRL's DPOTrainer on the same completions as pairs.

For each group size k in 1, 2, 4, 8: rows with k chosen and k rejected completions. MultiSampleDPOTrainer
takes `--completions / (2k)` rows per step; TRL's DPOTrainer takes the same completions arranged as k
pairs per row (chosen_i, rejected_i), `--completions / 2` pairs per step. Both process the same
completions per step, so the step-time ratio is the per-completion cost ratio (target <= 1.05).

Time: both trainers in one process, alternating steps (see fdpo_vs_trl.py for why). Peak memory:
separate processes. mDPO is compared with TRL's `sigmoid`, mIPO with TRL's `ipo`.

    python benchmarks/multisample_vs_trl.py                  # about 6 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

from _harness import alternate_steps, cuda, offline_setup, peak_memory_of_training, run_worker, saved_activation_mb


def _data(k: int, rows: int, tok=None, prompt_factor: float = 0.0):
    from datasets import Dataset

    from alignkit.data.synthetic import sentiment_groups

    groups = sentiment_groups("train", num_samples=rows, seed=1, n_chosen=k, n_rejected=k)
    if prompt_factor:
        # Lengthen every prompt to about prompt_factor x the mean completion length (in tokens).
        comp = sum(len(tok(c).input_ids) for g in groups for c in g["chosen"] + g["rejected"]) / (2 * k * len(groups))
        filler = "Please read the request below and answer it in one short sentence. "
        per = len(tok(filler).input_ids)

        def lengthen(row):
            need = prompt_factor * comp - len(tok(row["prompt"]).input_ids)
            return {"prompt": filler * max(0, round(need / per)) + row["prompt"]}

        groups = groups.map(lengthen)
    pairs = Dataset.from_list([{"prompt": g["prompt"], "chosen": c, "rejected": r}
                               for g in groups for c, r in zip(g["chosen"], g["rejected"])])
    return groups, pairs


def _build(opts, kind: str, k: int, steps: int, shared_prefix: bool = False, prompt_factor: float = 0.0):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from alignkit import MultiSampleDPOConfig, MultiSampleDPOTrainer
    from alignkit.models import build_tiny_model

    path = opts.model or str(build_tiny_model("small-llama"))
    tok = AutoTokenizer.from_pretrained(path)
    rows_per_step = max(1, opts.completions // (2 * k))
    groups, pairs = _data(k, rows_per_step * steps, tok, prompt_factor)
    common = dict(output_dir="/tmp/alignkit-bench", bf16=opts.bf16, report_to=[], save_strategy="no",
                  logging_steps=10_000, disable_tqdm=True, learning_rate=1e-5, seed=0, max_steps=steps,
                  loss_type=opts.loss_type)
    dtype = torch.bfloat16 if opts.bf16 else torch.float32
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    if kind == "alignkit":
        args = MultiSampleDPOConfig(per_device_train_batch_size=rows_per_step, shared_prefix=shared_prefix, **common)
        return MultiSampleDPOTrainer(model=model, ref_model=ref, args=args, train_dataset=groups, processing_class=tok)
    args = DPOConfig(per_device_train_batch_size=rows_per_step * k, **common)
    # keep TRL's pairs in row order so a step sees exactly the completions of the same rows
    trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=pairs, processing_class=tok)
    return trainer


def _ordered_batches(trainer):
    """Batches in dataset order (no shuffling), so both trainers see the same completions per step."""
    from torch.utils.data import DataLoader

    ds = trainer._remove_unused_columns(trainer.train_dataset, description="training")
    return list(DataLoader(ds, batch_size=trainer.args.per_device_train_batch_size, collate_fn=trainer.data_collator,
                           shuffle=False))


def time_worker(opts) -> dict:
    offline_setup(opts.threads)
    trainers = {kind: _build(opts, kind, opts.k, opts.steps) for kind in ("trl", "alignkit")}
    batches = {kind: _ordered_batches(t) for kind, t in trainers.items()}
    assert batches["alignkit"][0]["input_ids"].size(0) == batches["trl"][0]["input_ids"].size(0) == opts.completions
    saved = {f"saved_{k}": saved_activation_mb(t, batches[k][0]) for k, t in trainers.items()}
    return {**alternate_steps(trainers, batches, opts.warmup), **saved}


def prefix_worker(opts) -> dict:
    """Ours with and without shared_prefix, long prompts: median ms per step of each."""
    offline_setup(opts.threads)
    trainers = {name: _build(opts, "alignkit", opts.k, opts.steps, shared_prefix=(name == "shared"),
                             prompt_factor=opts.prompt_factor) for name in ("unshared", "shared")}
    batches = {name: _ordered_batches(t) for name, t in trainers.items()}
    lengths = {"prompt_tokens": sum(len(r["prompt_ids"]) for r in trainers["shared"].train_dataset) / len(trainers["shared"].train_dataset),
               "completion_tokens": sum(len(c) for r in trainers["shared"].train_dataset for c in r["chosen_ids"] + r["rejected_ids"])
               / sum(len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in trainers["shared"].train_dataset)}
    return {**alternate_steps(trainers, batches, opts.warmup), **lengths}


def memory_worker(opts) -> dict:
    offline_setup(opts.threads)
    return {"peak_mb": peak_memory_of_training(_build(opts, opts.trainer, opts.k, opts.memory_steps))}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ks", type=int, nargs="*", default=[1, 2, 4, 8])
    p.add_argument("--loss-types", nargs="*", default=["sigmoid", "ipo"], help="sigmoid = mDPO, ipo = mIPO")
    p.add_argument("--completions", type=int, default=32, help="completions per step (both trainers)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2, help="processes per configuration for peak memory")
    p.add_argument("--memory-steps", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", default=None)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--prefix-k", type=int, default=4, help="group size for the shared-prefix comparison (0: skip)")
    p.add_argument("--prompt-factor", type=float, default=4.0, help="prompt length / completion length there")
    p.add_argument("--worker", choices=["time", "memory", "prefix"], help=argparse.SUPPRESS)
    p.add_argument("--trainer", choices=["alignkit", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--k", type=int, help=argparse.SUPPRESS)
    p.add_argument("--loss-type", help=argparse.SUPPRESS)
    opts = p.parse_args()
    if opts.worker:
        result = {"time": time_worker, "memory": memory_worker, "prefix": prefix_worker}[opts.worker](opts)
        print("RESULT " + json.dumps(result), flush=True)
        return

    common = ["--completions", str(opts.completions), "--steps", str(opts.steps), "--warmup", str(opts.warmup),
              "--memory-steps", str(opts.memory_steps), "--threads", str(opts.threads)]
    common += (["--model", opts.model] if opts.model else []) + (["--bf16"] if opts.bf16 else [])
    rows = []
    for lt in opts.loss_types:
        for k in opts.ks:
            cfg = ["--k", str(k), "--loss-type", lt, *common]
            print(f"timing {lt} k={k} ...", file=sys.stderr, flush=True)
            t = run_worker(__file__, ["--worker", "time", *cfg])
            mem = {"trl": [], "alignkit": []}
            for r in range(opts.rounds):
                for kind in (("trl", "alignkit") if r % 2 == 0 else ("alignkit", "trl")):
                    mem[kind].append(run_worker(__file__, ["--worker", "memory", "--trainer", kind, *cfg])["peak_mb"])
            rows.append((lt, k, t, {kk: statistics.median(v) for kk, v in mem.items()}))

    n = opts.completions
    print(f"\nMultiSampleDPOTrainer vs TRL DPOTrainer on the same completions ({'GPU' if cuda() else 'CPU'}): "
          f"{n} completions per step, {opts.steps} alternating steps (median); memory median of {opts.rounds}")
    print(f"{'method':6s} {'k':>2s} {'TRL ms/compl':>13s} {'ours ms/compl':>14s} {'time ratio':>11s} "
          f"{'TRL act MB':>11s} {'ours act MB':>12s} {'act ratio':>10s} {'TRL peak MB':>12s} {'ours peak MB':>13s} "
          f"{'peak ratio':>11s}")
    worst = 0.0
    for lt, k, t, m in rows:
        tr, ar, mr = t["alignkit"] / t["trl"], t["saved_alignkit"] / t["saved_trl"], m["alignkit"] / m["trl"]
        worst = max(worst, tr, ar, mr if cuda() else 0.0)
        name = "mDPO" if lt == "sigmoid" else "mIPO"
        print(f"{name:6s} {k:2d} {t['trl'] / n:13.2f} {t['alignkit'] / n:14.2f} {tr:11.3f} {t['saved_trl']:11.1f} "
              f"{t['saved_alignkit']:12.1f} {ar:10.3f} {m['trl']:12.1f} {m['alignkit']:13.1f} {mr:11.3f}")
    print("act = tensors saved for backward in one step (deterministic); peak = CUDA peak, or on a CPU the peak "
          "RSS rise during training (varies +-3% between processes, shown for reference)")
    print(f"\nworst ratio: {worst:.3f} (target <= 1.05)")

    if opts.prefix_k:
        print(f"\nshared_prefix, k={opts.prefix_k}, prompts ~{opts.prompt_factor:g}x the completions ...", file=sys.stderr)
        r = run_worker(__file__, ["--worker", "prefix", "--k", str(opts.prefix_k), "--loss-type", "ipo",
                                  "--prompt-factor", str(opts.prompt_factor), *common])
        print(f"\nmIPO k={opts.prefix_k}, prompt {r['prompt_tokens']:.0f} tokens, completion {r['completion_tokens']:.1f} "
              f"tokens (mean): without shared_prefix {r['unshared']:.1f} ms/step, with {r['shared']:.1f} ms/step, "
              f"speed-up {r['unshared'] / r['shared']:.2f}x (target >= 1.5x)")


if __name__ == "__main__":
    main()
