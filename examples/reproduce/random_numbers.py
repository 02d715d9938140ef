"""Reproduction: multi-sample preference optimisation makes random numbers more uniform (thesis 3.6.1, Table 3.1).

The thesis fine-tunes Llama-3-8B to answer "give me a random integer between a and b" uniformly, on groups of
uniform draws (chosen) against groups biased towards a favourite number (rejected), and compares per test
prompt the entropy of the sampled numbers: mIPO beats IPO on 95% of the prompts, mDPO beats DPO on 80%, and
all four beat the SFT model.

Here, at toy scale, everything is built locally:

* **SFT start** (the "LLM that favours 7"): the tiny Llama trained by TRL's SFTTrainer on the *rejected*
  answers of `builtin:random_numbers` (numbers in [0, 100]; 75% of answers are the interval's 7-ending
  favourite), so it answers in range but far from uniformly.
* **Preference training** from that start on fresh `builtin:random_numbers` groups (4 chosen, 4 rejected per
  prompt), with the thesis' NLL term on the chosen group (weight 1.0: at 0.1 the IPO runs lost half their
  answers out of range): mDPO and mIPO (unbiased) on the
  groups, DPO and IPO on the same completions cut into 4 pairs per prompt (groups of one: exactly TRL's DPO
  and IPO, as the tests show). Same beta, learning rate, steps and completions per step for all four.
* **Evaluation**: `alignkit.metrics.evaluate` samples `k` answers for each of 100 prompts on held-out
  intervals (widths outside the training range [5, 10], as in the thesis) and on fresh in-range intervals;
  per prompt the entropy of the sampled numbers (`metrics.number_uniformity`); "A vs B" is the fraction of
  prompts where A's entropy is higher (ties count half).

    python examples/reproduce/random_numbers.py --threads 1  # full form (make reproduce)
    python examples/reproduce/random_numbers.py --quick      # CI-sized

Status (full form, 2 seeds, 6 min 24 s on 2 shared cores; table in docs/results.md): every method makes the
answers far more uniform than the SFT start (win rate vs SFT 0.78-1.00), but the multi-sample advantage is not
reproduced: mDPO vs DPO 0.49-0.50, mIPO vs IPO 0.27-0.40 (mIPO answers out of range more often).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import align, count, nonnegative, positive, pyplot, setup, sft, write_table  # noqa: E402

METHODS = {"DPO": ("sigmoid", 1), "IPO": ("ipo", 1), "mDPO": ("sigmoid", 4), "mIPO": ("ipo", 4)}
COMPARISONS = [("mIPO", "IPO"), ("mIPO", "SFT"), ("IPO", "SFT"), ("mDPO", "DPO"), ("mDPO", "SFT"), ("DPO", "SFT")]
HIGH = 100  # numbers in [0, 100]: one token each for the built-in tokenizer


def as_pairs(groups):
    """The same completions as single-sample pairs: the i-th chosen against the i-th rejected."""
    from datasets import Dataset

    rows = [{"prompt": r["prompt"], "chosen": [c], "rejected": [j]}
            for r in groups for c, j in zip(r["chosen"], r["rejected"])]
    return Dataset.from_list(rows)


def train(start: str, out: Path, name: str, steps: int, seed: int, beta: float, lr: float, nll: float) -> str:
    from alignkit import MultiSampleDPOConfig, MultiSampleDPOTrainer
    from alignkit.data.synthetic import random_numbers

    loss_type, k = METHODS[name]
    data = random_numbers("train", num_samples=1024, seed=100 + seed, high=HIGH).select_columns(
        ["prompt", "chosen", "rejected"])
    if k == 1:
        data = as_pairs(data)
    args = MultiSampleDPOConfig(
        output_dir=str(out / name), loss_type=loss_type, beta=beta, nll_weight=nll, learning_rate=lr,
        per_device_train_batch_size=32 // k,  # 32 chosen and 32 rejected completions per step for every method
        max_steps=steps, lr_scheduler_type="constant", report_to=[], save_strategy="no",
        logging_steps=max(steps // 4, 1), disable_tqdm=True, bf16=False, seed=seed)
    return align(MultiSampleDPOTrainer, start, args, data)


def per_prompt_entropy(model: str, prompts, k: int, seed: int) -> tuple[list[float], dict]:
    from alignkit.metrics import first_integer, number_uniformity
    from alignkit.metrics.evaluate import evaluate

    rep = evaluate(model, prompts, k=k, max_new_tokens=4, temperature=1.0, seed=seed)
    answers = [first_integer(s["completion"]) for s in rep["samples"]]
    ents = [number_uniformity(answers[i * k:(i + 1) * k], r["low"], r["high"])["entropy"]
            for i, r in enumerate(prompts)]
    return ents, rep["random_numbers"]


def win_rate(a: list[float], b: list[float]) -> float:
    """Fraction of prompts where `a` has the higher entropy; ties count half."""
    return sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)) / len(a)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CI-sized: shorter SFT and training, fewer prompts")
    p.add_argument("--output", default="outputs/reproduce/random_numbers")
    p.add_argument("--seeds", type=count, default=None, help="preference-training seeds (default 2, 1 with --quick)")
    p.add_argument("--steps", type=count, default=None, help="preference-training steps (default 200, 60 with --quick)")
    p.add_argument("--beta", type=positive, default=0.1)
    p.add_argument("--lr", type=positive, default=1e-3)
    p.add_argument("--nll-weight", type=nonnegative, default=1.0,
                   help="weight of the chosen group's NLL (thesis: added)")
    p.add_argument("--start", help="reuse this SFT model instead of training one")
    p.add_argument("--threads", type=count, default=None)
    a = p.parse_args(argv)
    setup(a.threads)
    from alignkit.data.synthetic import random_numbers

    out = Path(a.output)
    sft_steps, steps, n_prompts, k, seeds = (600, 60, 40, 16, 1) if a.quick else (1500, 200, 100, 32, 2)
    steps, seeds = a.steps or steps, a.seeds or seeds
    biased = random_numbers("train", num_samples=4096, seed=0, high=HIGH)
    start = a.start or sft([{"prompt": r["prompt"], "completion": c} for r in biased for c in r["rejected"]], out,
                           sft_steps)
    evals = {"held-out widths": random_numbers("test", num_samples=n_prompts, seed=1, high=HIGH),
             "training widths": random_numbers("train", num_samples=n_prompts, seed=999, high=HIGH)}
    evals = {name: ds.select_columns(["prompt", "low", "high"]) for name, ds in evals.items()}

    entropies = {e: {} for e in evals}  # eval set -> method -> per seed -> per-prompt entropies
    summary = {e: {} for e in evals}    # eval set -> method -> list of per-seed aggregate dicts
    for e, prompts in evals.items():
        ents, agg = per_prompt_entropy(start, prompts, k, seed=0)
        entropies[e]["SFT"], summary[e]["SFT"] = [ents] * seeds, [agg]
    for seed in range(seeds):
        for name in METHODS:
            model = train(start, out / f"seed{seed}", name, steps, seed, a.beta, a.lr, a.nll_weight)
            for e, prompts in evals.items():
                ents, agg = per_prompt_entropy(model, prompts, k, seed=seed)
                entropies[e].setdefault(name, []).append(ents)
                summary[e].setdefault(name, []).append(agg)
            print(f"seed {seed} {name}: " + ", ".join(
                f"{e}: entropy {summary[e][name][-1]['entropy']:.3f}" for e in evals), flush=True)

    method_rows, win_rows = [], []
    for e in evals:
        for name, aggs in summary[e].items():
            method_rows.append({"eval prompts": e, "method": name, **{
                key: statistics.mean(x[key] for x in aggs) for key in ("entropy", "kl_to_uniform", "invalid_fraction")}})
        for x, y in COMPARISONS:
            rates = [win_rate(ex, ey) for ex, ey in zip(entropies[e][x], entropies[e][y])]
            win_rows.append({"eval prompts": e, "comparison": f"{x} vs {y}", "win rate": statistics.mean(rates),
                             "per seed": " ".join(f"{r:.2f}" for r in rates)})
    md = "Mean over seeds of the per-prompt entropy of the sampled numbers, KL to uniform, invalid answers:\n\n"
    md += write_table(method_rows, ["eval prompts", "method", "entropy", "kl_to_uniform", "invalid_fraction"], out,
                      "methods")
    md += "\nWin rate by entropy (thesis Table 3.1: mIPO vs IPO 0.95, mDPO vs DPO 0.80, all vs SFT >= 0.98):\n\n"
    md += write_table(win_rows, ["eval prompts", "comparison", "win rate", "per seed"], out, "win_rates")
    (out / "table.md").write_text(md)

    plt = pyplot()
    fig, axes = plt.subplots(1, len(evals), figsize=(5 * len(evals), 3.2), sharey=True)
    for ax, e in zip(axes, evals):
        names = list(summary[e])
        ax.bar(names, [statistics.mean(x["entropy"] for x in summary[e][n]) for n in names],
               color=["#999999", "#4C72B0", "#55A868", "#8172B2", "#C44E52"][:len(names)])
        ax.set_title(f"{e} ({n_prompts} prompts, k={k})")
        ax.set_ylabel("entropy of sampled numbers (nats)")
    fig.tight_layout()
    fig.savefig(out / "random_numbers.png", dpi=100)
    print(md)
    return {"methods": method_rows, "win_rates": win_rows}


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
