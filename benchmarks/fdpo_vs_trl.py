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

**Long prompts (`--ratios`).** FDPOTrainer with `shared_prefix: true` (reverse KL) against TRL's DPOTrainer on pairs
whose prompt is 1, 4 or 16 times as long as each completion (`--completion-tokens` each): TRL runs every prompt twice,
once per completion, and shared_prefix once. Target: at least 1.4x TRL's speed at 4:1, no slower at 1:1.

    python benchmarks/fdpo_vs_trl.py --ratios 1:1 4:1 16:1
    python benchmarks/fdpo_vs_trl.py --ratios 1:1 4:1 16:1 --model builtin:smollm2-135m-instruct --lora \
        --batch-size 4 --steps 8 --warmup 2 --rounds 1      # SmolLM2 with LoRA
"""

from __future__ import annotations


from _harness import (alternate_steps, comparison_main, cuda, offline_setup, peak_memory_of_training,
                      saved_activation_mb)

DIVERGENCES = {
    "reverse_kl": (dict(divergence="reverse_kl"), dict()),
    "forward_kl": (dict(divergence="forward_kl"), dict(f_divergence_type="forward_kl")),
    "jsd": (dict(divergence="jsd"), dict(f_divergence_type="js_divergence")),
    "alpha0.5": (dict(divergence="alpha", alpha=0.5), dict(f_divergence_type="alpha_divergence",
                                                           f_alpha_divergence_coef=0.5)),
}


def _long_prompt_pairs(ratio: str, num_rows: int, completion_tokens: int, tok):
    """Pairs with prompts `ratio` times as long as the completions, in tokens (words of the built-in corpus, cut)."""
    import random

    from datasets import Dataset

    from alignkit.data.synthetic import corpus

    words = " ".join(corpus()).split()
    p_len = completion_tokens * int(ratio.split(":")[0])
    rng = random.Random(0)

    def text(n):
        ids = tok(" ".join(rng.choice(words) for _ in range(n)), add_special_tokens=False)["input_ids"][:n]
        return tok.decode(ids)

    return Dataset.from_list([{"prompt": text(p_len), "chosen": " " + text(completion_tokens),
                               "rejected": " " + text(completion_tokens)} for _ in range(num_rows)])


def _build(opts, trainer_kind: str, divergence: str, num_rows: int):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from alignkit import FDPOConfig, FDPOTrainer
    from alignkit.data.synthetic import sentiment
    from alignkit.models import build_tiny_model

    from alignkit.models import resolve_model_path

    path = resolve_model_path(opts.model) if opts.model else str(build_tiny_model("small-llama"))
    tok = AutoTokenizer.from_pretrained(path)
    ratio = getattr(opts, "ratio", None)
    ours, theirs = DIVERGENCES["reverse_kl" if ratio else divergence]
    if ratio:
        ours = {**ours, "shared_prefix": True}
    cls, cfg_cls, kw = (FDPOTrainer, FDPOConfig, ours) if trainer_kind == "alignkit" else (DPOTrainer, DPOConfig, theirs)
    dtype = torch.bfloat16 if opts.bf16 else torch.float32
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    args = cfg_cls(output_dir="/tmp/alignkit-bench", per_device_train_batch_size=opts.batch_size,
                   max_steps=num_rows // opts.batch_size, bf16=opts.bf16, report_to=[], save_strategy="no",
                   logging_steps=10_000, disable_tqdm=True, learning_rate=1e-5, seed=0, **kw)
    ds = _long_prompt_pairs(ratio, num_rows, opts.completion_tokens, tok) if ratio else \
        sentiment("train", num_samples=num_rows, seed=1)
    peft = None
    if getattr(opts, "lora", False):
        from peft import LoraConfig

        peft, ref = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"), None
    return cls(model=model, ref_model=ref, args=args, train_dataset=ds, processing_class=tok, peft_config=peft)


def time_worker(opts) -> dict:
    """Alternate steps of TRL's and our trainer on identical batches; median ms per step of each."""
    offline_setup(opts.threads)
    trainers = {k: _build(opts, k, getattr(opts, "divergence", None), opts.batch_size * opts.steps)
                for k in ("trl", "alignkit")}
    # the same rows in the same order (both samplers draw from args.seed); each trainer's own collator (shared_prefix
    # packs them)
    batches = {k: list(t.get_train_dataloader()) for k, t in trainers.items()}
    saved = {f"saved_{k}": saved_activation_mb(t, batches[k][0]) for k, t in trainers.items()}
    return {**alternate_steps(trainers, batches, opts.warmup), **saved}


def memory_worker(opts) -> dict:
    """Train one trainer in this process and report its peak memory."""
    offline_setup(opts.threads)
    trainer = _build(opts, opts.trainer, getattr(opts, "divergence", None), opts.batch_size * opts.memory_steps)
    return {"peak_mb": peak_memory_of_training(trainer)}


RATIOS = ["1:1", "4:1", "16:1"]


def main():
    import sys

    if any(a == "--ratios" or a.startswith("--ratio") for a in sys.argv[1:]):
        comparison_main(__file__, __doc__, "ratio", RATIOS, time_worker, memory_worker,
                        lambda o: (f"FDPOTrainer(shared_prefix) vs TRL DPOTrainer ({'GPU' if cuda() else 'CPU'}), prompt:"
                                   f"completion ratios, {o.completion_tokens}-token completions: batch {o.batch_size} "
                                   f"pairs, {o.steps} alternating steps each (median), peak memory median of {o.rounds} "
                                   "processes; a ratio below 1 is faster than TRL"), target=1.0,
                        extra=_ratio_options)
        return
    comparison_main(__file__, __doc__, "divergence", list(DIVERGENCES), time_worker, memory_worker,
                    lambda o: (f"FDPOTrainer vs TRL DPOTrainer ({'GPU' if cuda() else 'CPU'}): batch {o.batch_size} pairs, "
                   f"{o.steps} alternating steps each (median), peak memory median of {o.rounds} processes"), target=1.03)


def _ratio_options(p) -> list[str]:
    """The ratio mode's own options; returns the names to pass on to the workers."""
    p.add_argument("--completion-tokens", type=int, default=16)
    p.add_argument("--lora", action="store_true", help="train a LoRA adapter (r=16, all linear layers)")
    return ["completion_tokens", "lora"]


if __name__ == "__main__":
    main()
