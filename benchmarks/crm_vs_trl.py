"""Step time and memory of CausalRewardTrainer against TRL's RewardTrainer, same model and batches.

Variants of the penalty: on the scalar reward (default), conditional, and on the last hidden state; all
with Z = completion length in tokens, 10 quantile bins. Method as in fdpo_vs_trl.py: the two trainers
take turns step by step on identical batches in one process (the bin-balanced sampler's batches, with
`z_bins` removed for TRL), median ms per step; tensors saved for backward in one step (deterministic);
peak memory in separate processes (CUDA peak, or the RSS rise on a CPU; median of `--rounds`).
Target: ratio <= 1.05.

    python benchmarks/crm_vs_trl.py                  # CPU defaults, about 3 minutes on 2 cores

**Long prompts (`--ratios`).** CausalRewardTrainer with `shared_prefix: true` (and `mmd_coef: 0`, i.e. TRL's loss)
against TRL's RewardTrainer on pairs whose prompt is 1, 4 or 16 times as long as each completion: TRL runs the
prompt once per side, shared_prefix once per pair (fdpo_vs_trl.py's pairs and options).

    python benchmarks/crm_vs_trl.py --ratios 1:1 4:1 16:1 --threads 1
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

    from alignkit.models import resolve_model_path

    path = resolve_model_path(opts.model) if opts.model else str(build_tiny_model("small-llama"))
    tok = AutoTokenizer.from_pretrained(path)
    ratio = getattr(opts, "ratio", None)
    dtype = torch.bfloat16 if opts.bf16 else torch.float32
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype).to(device)
    common = dict(output_dir="/tmp/alignkit-bench", per_device_train_batch_size=opts.batch_size,
                  max_steps=num_rows // opts.batch_size, bf16=opts.bf16, report_to=[], save_strategy="no",
                  logging_steps=10_000, disable_tqdm=True, learning_rate=1e-5, seed=0)
    peft = None
    if getattr(opts, "lora", False):
        from peft import LoraConfig

        peft = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="SEQ_CLS")
    if ratio:
        from fdpo_vs_trl import _long_prompt_pairs

        ds = _long_prompt_pairs(ratio, num_rows, opts.completion_tokens, tok)
    else:
        ds = length_bias("train", num_samples=num_rows, seed=1)
    if trainer_kind == "trl":
        return RewardTrainer(model=model, args=RewardConfig(**common), train_dataset=ds, processing_class=tok,
                             peft_config=peft)
    penalty = dict(mmd_coef=0.0, attributes=[], shared_prefix=True) if ratio else \
        dict(mmd_coef=1.0, attributes=["length"], num_bins=10, **VARIANTS[variant])
    args = CausalRewardConfig(**common, **penalty)
    return CausalRewardTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=peft)


def time_worker(opts) -> dict:
    offline_setup(opts.threads)
    variant = getattr(opts, "variant", None)
    trainers = {k: _build(opts, k, variant, opts.batch_size * opts.steps) for k in ("trl", "alignkit")}
    ours = list(trainers["alignkit"].get_train_dataloader())
    if getattr(opts, "ratio", None):  # each trainer's own collator (shared_prefix packs), the same rows in order
        theirs = list(trainers["trl"].get_train_dataloader())
    else:
        theirs = [{k: v for k, v in b.items() if k != "z_bins"} for b in ours]
    batches = {"trl": theirs, "alignkit": ours}
    saved = {f"saved_{k}": saved_activation_mb(t, batches[k][0]) for k, t in trainers.items()}
    return {**alternate_steps(trainers, batches, opts.warmup), **saved}


def memory_worker(opts) -> dict:
    offline_setup(opts.threads)
    return {"peak_mb": peak_memory_of_training(_build(opts, opts.trainer, getattr(opts, "variant", None),
                                                      opts.batch_size * opts.memory_steps))}


def main():
    import sys

    if any(a.startswith("--ratio") for a in sys.argv[1:]):
        from fdpo_vs_trl import RATIOS, _ratio_options

        comparison_main(__file__, __doc__, "ratio", RATIOS, time_worker, memory_worker,
                        lambda o: (f"CausalRewardTrainer(shared_prefix) vs TRL RewardTrainer ({'GPU' if cuda() else 'CPU'}),"
                                   f" prompt:completion ratios, {o.completion_tokens}-token completions: batch "
                                   f"{o.batch_size} pairs, {o.steps} alternating steps each (median), peak memory median "
                                   f"of {o.rounds} processes; a ratio below 1 is faster than TRL"), target=1.0,
                        extra=_ratio_options)
        return
    comparison_main(__file__, __doc__, "variant", list(VARIANTS), time_worker, memory_worker,
                    lambda o: (f"CausalRewardTrainer vs TRL RewardTrainer ({'GPU' if cuda() else 'CPU'}): batch {o.batch_size} "
                   f"pairs, {o.steps} alternating steps each (median), Z = length, 10 bins, peak memory median of "
                   f"{o.rounds} processes"), target=1.05)


if __name__ == "__main__":
    main()
