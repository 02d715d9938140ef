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


from _harness import (alternate_steps, comparison_main, cuda, offline_setup, peak_memory_of_training,
                      saved_activation_mb)

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


def main():
    comparison_main(__file__, __doc__, "divergence", list(DIVERGENCES), time_worker, memory_worker,
                    lambda o: (f"FDPOTrainer vs TRL DPOTrainer ({'GPU' if cuda() else 'CPU'}): batch {o.batch_size} pairs, "
                   f"{o.steps} alternating steps each (median), peak memory median of {o.rounds} processes"), target=1.03)


if __name__ == "__main__":
    main()
