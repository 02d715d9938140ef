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


from _harness import (alternate_steps, comparison_main, cuda, offline_setup, peak_memory_of_training,
                      saved_activation_mb)

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
    comparison_main(__file__, __doc__, "variant", list(VARIANTS), time_worker, memory_worker,
                    lambda o: (f"CausalRewardTrainer vs TRL RewardTrainer ({'GPU' if cuda() else 'CPU'}): batch {o.batch_size} "
                   f"pairs, {o.steps} alternating steps each (median), Z = length, 10 bins, peak memory median of "
                   f"{o.rounds} processes"), target=1.05)


if __name__ == "__main__":
    main()
