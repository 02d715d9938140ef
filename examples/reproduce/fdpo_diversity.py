"""Reproduction: diversity under different f-divergences at equal beta (thesis Table 2.2).

The thesis finds predictive entropy and distinct-n ordered reverse KL < JSD < alpha 0.5 < forward KL: the
more mass-covering the divergence, the more diverse the policy. Here: the tiny Llama, first taught the
task's language by SFT on the preferred completions (a random-init model has nothing to be diverse about),
then f-DPO with each divergence on the built-in sentiment task, same beta, data, steps and seed; then
`alignkit.metrics.evaluate` on held-out prompts. Writes a table (JSON + Markdown) and a figure.

    python examples/reproduce/fdpo_diversity.py                 # full form, about 1 minute on 2 CPU cores
    python examples/reproduce/fdpo_diversity.py --quick         # CI-sized (a smoke run: too short to mean much)

Status (first full run, one seed, beta 0.1, lr 1e-4, 150 steps): entropy / distinct-2 were reverse KL
1.334 / 0.543, JSD 0.695 / 0.113, alpha 0.5 1.095 / 0.218, forward KL 1.378 / 0.653. Forward KL is the most
diverse, as in the thesis, but JSD, not reverse KL, is the least: the thesis' ordering is not reproduced yet.
The forward-KL and alpha runs saturate (their sequence-level links reach |f'| ~ 1e6 and the loss reaches 0 with
zero gradients within ~50 steps), so the comparison at equal beta is not yet a fair one. With `--lr 2e-5` (no
saturation) the order changes again: reverse KL 1.171 / 0.778, JSD 1.279 / 0.803, alpha 0.5 1.138 / 0.618, forward
KL 1.129 / 0.645. One seed each: the differences are within what seeds move; work in progress.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

DIVERGENCES = [("reverse_kl", None), ("jsd", None), ("alpha", 0.5), ("forward_kl", None)]


def sft_start(out: Path, steps: int) -> str:
    """A starting policy that speaks the task: the tiny Llama after a short SFT on chosen completions."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from alignkit.data.synthetic import sentiment
    from alignkit.models import build_tiny_model

    path = str(build_tiny_model("tiny-llama"))
    tok = AutoTokenizer.from_pretrained(path)
    data = sentiment("train", num_samples=512, seed=7)
    both = [{"prompt": r["prompt"], "completion": c} for r in data for c in (r["chosen"], r["rejected"])]
    from datasets import Dataset

    args = SFTConfig(output_dir=str(out / "sft"), max_steps=steps, per_device_train_batch_size=32, learning_rate=3e-3,
                     report_to=[], save_strategy="no", logging_steps=max(steps // 4, 1), disable_tqdm=True, bf16=False,
                     seed=0)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(path), args=args, train_dataset=Dataset.from_list(both),
                         processing_class=tok)
    trainer.train()
    trainer.save_model(str(out / "sft" / "final"))
    return str(out / "sft" / "final")


def train(start: str, out: Path, divergence: str, alpha, steps: int, beta: float, a_lr: float = 1e-4) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignkit import FDPOConfig, FDPOTrainer
    from alignkit.data.synthetic import sentiment

    tok = AutoTokenizer.from_pretrained(start)
    name = divergence if alpha is None else f"alpha{alpha:g}"
    args = FDPOConfig(output_dir=str(out / name), divergence=divergence, alpha=alpha, beta=beta, max_steps=steps,
                      per_device_train_batch_size=16, learning_rate=a_lr, lr_scheduler_type="constant", report_to=[],
                      save_strategy="no", logging_steps=max(steps // 4, 1), disable_tqdm=True, bf16=False, seed=0)
    trainer = FDPOTrainer(model=AutoModelForCausalLM.from_pretrained(start),
                          ref_model=AutoModelForCausalLM.from_pretrained(start), args=args,
                          train_dataset=sentiment("train", num_samples=512), processing_class=tok)
    trainer.train()
    trainer.save_model(str(out / name / "final"))
    return str(out / name / "final")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CI-sized: fewer steps and prompts")
    p.add_argument("--output", default="outputs/reproduce/fdpo_diversity")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=1e-4, help="f-DPO learning rate")
    p.add_argument("--steps", type=int, default=None, help="f-DPO steps (default: 150, 30 with --quick)")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    import transformers

    from alignkit.data.synthetic import sentiment
    from alignkit.metrics.evaluate import evaluate

    transformers.logging.set_verbosity_error()
    out = Path(a.output)
    sft_steps, steps, n_prompts, k = (60, 30, 16, 4) if a.quick else (400, 150, 64, 8)
    start = sft_start(out, sft_steps)
    prompts = sentiment("test", num_samples=n_prompts).select_columns(["prompt"])
    rows = []
    for div, alpha in DIVERGENCES:
        model = train(start, out, div, alpha, a.steps or steps, a.beta, a.lr)
        rep = evaluate(model, prompts, ref=start, k=k, max_new_tokens=24, temperature=1.0)
        name = div if alpha is None else f"alpha {alpha:g}"
        rows.append({"divergence": name, "entropy": rep["entropy"], "distinct_1": rep["distinct_1"],
                     "distinct_2": rep["distinct_2"], "self_bleu": rep["self_bleu"]})
        print(json.dumps(rows[-1]), flush=True)
    (out / "table.json").write_text(json.dumps(rows, indent=2))
    lines = ["| divergence | entropy | distinct-1 | distinct-2 | self-BLEU |", "|---|---|---|---|---|"]
    lines += [f"| {r['divergence']} | {r['entropy']:.3f} | {r['distinct_1']:.3f} | {r['distinct_2']:.3f} | "
              f"{r['self_bleu']:.3f} |" for r in rows]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    names = [r["divergence"] for r in rows]
    axes[0].bar(names, [r["entropy"] for r in rows], color="#4C72B0")
    axes[0].set_title("predictive entropy (nats)")
    axes[1].bar(names, [r["distinct_2"] for r in rows], color="#DD8452")
    axes[1].set_title("distinct-2")
    fig.tight_layout()
    fig.savefig(out / "fdpo_diversity.png", dpi=100)
    print("\n".join(lines))
    return {"rows": rows}


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
