"""Reproduction: diversity under different f-divergences at equal beta (thesis Table 2.2).

The thesis finds predictive entropy and distinct-n ordered reverse KL < JSD < alpha 0.5 < forward KL: the
more mass-covering the divergence, the more diverse the policy. Here: the tiny Llama, first taught the
task's language by SFT on both sides of the pairs (a random-init model has nothing to be diverse about),
then f-DPO with each divergence on the built-in sentiment task, same beta, data, steps and seed; then
`alignkit.metrics.evaluate` on held-out prompts. Writes a table (JSON + Markdown) and a figure.

    python examples/reproduce/fdpo_diversity.py --threads 1     # full form (docs/results.md), about 3 minutes
    python examples/reproduce/fdpo_diversity.py --quick         # CI-sized (a smoke run: too short to mean much)

Status (full form with --threads 1, 3 seeds, 2 min 40 s on 2 cores; table in docs/results.md): not reproduced.
Entropy / distinct-2 / reverse KL from the start: SFT start 1.22 / 0.81 / 0, reverse KL 1.20 / 0.80 / 1.8, JSD
1.12 / 0.46 / 28, alpha 0.5 0.63 / 0.12 / 68, forward KL 1.30 / 0.43 / 33. At equal beta the runs end at very
different distances from the reference: the JSD, alpha and forward-KL links are bounded above, so the loss falls
only by pushing the rejected log-ratios to minus infinity, and they saturate far from the start. Along training
(seed 0, `trajectory.md`), up to a reverse KL of ~10 every divergence stays near the start's diversity, with no
consistent order between them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (align, checkpoints, count, positive, pyplot, sentiment_sft_rows, setup, sft,  # noqa: E402
                    write_table)

DIVERGENCES = [("reverse_kl", None), ("jsd", None), ("alpha", 0.5), ("forward_kl", None)]
METRICS = ("entropy", "distinct_1", "distinct_2", "self_bleu")


def train(start: str, out: Path, divergence: str, alpha, steps: int, beta: float, a_lr: float = 1e-4,
          seed: int = 0, save_every: int | None = None) -> str:
    """f-DPO from `start`; returns the final model's folder. `save_every`: also keep a checkpoint every that
    many steps (for the trajectory)."""
    from alignkit import FDPOConfig, FDPOTrainer
    from alignkit.data.synthetic import sentiment

    name = divergence if alpha is None else f"alpha{alpha:g}"
    args = FDPOConfig(output_dir=str(out / name), divergence=divergence, alpha=alpha, beta=beta, max_steps=steps,
                      per_device_train_batch_size=16, learning_rate=a_lr, lr_scheduler_type="constant", report_to=[],
                      save_strategy="steps" if save_every else "no", save_steps=save_every or 500, save_only_model=True,
                      logging_steps=max(steps // 4, 1), disable_tqdm=True, bf16=False, seed=seed)
    return align(FDPOTrainer, start, args, sentiment("train", num_samples=512))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CI-sized: fewer steps and prompts")
    p.add_argument("--output", default="outputs/reproduce/fdpo_diversity")
    p.add_argument("--beta", type=positive, default=0.1)
    p.add_argument("--lr", type=positive, default=1e-4, help="f-DPO learning rate")
    p.add_argument("--steps", type=count, default=None, help="f-DPO steps (default: 150, 30 with --quick)")
    p.add_argument("--seeds", type=count, default=None, help="f-DPO seeds averaged (default 3, 1 with --quick)")
    p.add_argument("--threads", type=count, default=None)
    a = p.parse_args(argv)
    setup(a.threads)
    from alignkit.data.synthetic import sentiment
    from alignkit.metrics.evaluate import evaluate

    out = Path(a.output)
    sft_steps, steps, n_prompts, k, seeds = (60, 30, 16, 4, 1) if a.quick else (400, 150, 64, 8, 3)
    steps, seeds = a.steps or steps, a.seeds or seeds
    start = sft(sentiment_sft_rows(), out, sft_steps)
    prompts = sentiment("test", num_samples=n_prompts).select_columns(["prompt"])
    ref = evaluate(start, prompts, ref=start, k=k, max_new_tokens=24, temperature=1.0, seed=0)
    rows = [{"divergence": "SFT (start)", **{m: ref[m] for m in METRICS}, "reverse KL from SFT": 0.0}]
    trajectory = []  # seed 0: diversity against the distance from the reference, checkpoint by checkpoint
    for div, alpha in DIVERGENCES:
        name = div if alpha is None else f"alpha {alpha:g}"
        runs = []
        for seed in range(seeds):
            model = train(start, out / f"seed{seed}", div, alpha, steps, a.beta, a.lr, seed,
                          save_every=steps // 5 if seed == 0 else None)
            rep = None
            if seed == 0:
                for step, ckpt in checkpoints(Path(model).parent):
                    rep = evaluate(ckpt, prompts, ref=start, k=k, max_new_tokens=24, temperature=1.0, seed=0)
                    trajectory.append({"divergence": name, "step": step, "entropy": rep["entropy"],
                                       "distinct_2": rep["distinct_2"],
                                       "reverse KL from SFT": rep["divergence"]["reverse_kl"]})
                if step != steps:
                    rep = None  # the last checkpoint is not the final model
            # the checkpoint at the last step holds the final weights: its report is the final one
            runs.append(rep or evaluate(model, prompts, ref=start, k=k, max_new_tokens=24, temperature=1.0,
                                        seed=seed))
        rows.append({"divergence": name, **{m: statistics.mean(r[m] for r in runs) for m in METRICS},
                     "reverse KL from SFT": statistics.mean(r["divergence"]["reverse_kl"] for r in runs),
                     "entropy per seed": " ".join(f"{r['entropy']:.2f}" for r in runs)})
        print(json.dumps(rows[-1]), flush=True)
    md = write_table(rows, ["divergence", *METRICS, "reverse KL from SFT", "entropy per seed"], out)
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    names = [r["divergence"] for r in rows]
    axes[0].bar(names, [r["entropy"] for r in rows], color="#4C72B0")
    axes[0].set_title("predictive entropy (nats)")
    axes[1].bar(names, [r["distinct_2"] for r in rows], color="#DD8452")
    axes[1].set_title("distinct-2")
    fig.tight_layout()
    fig.savefig(out / "fdpo_diversity.png", dpi=100)
    md += "\nSeed 0 along training:\n\n" + write_table(
        trajectory, ["divergence", "step", "entropy", "distinct_2", "reverse KL from SFT"], out, "trajectory")
    plot_trajectory(rows[0], trajectory, out / "fdpo_diversity_trajectory.png")
    print(md)
    return {"rows": rows, "trajectory": trajectory}


def plot_trajectory(sft_row: dict, trajectory: list[dict], path: Path) -> None:
    """Entropy and distinct-2 against the reverse KL from the start, one line per divergence (the fair
    comparison: diversity at a matched distance from the reference, not at a matched beta)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.3))
    for ax, metric in zip(axes, ("entropy", "distinct_2")):
        for name in dict.fromkeys(r["divergence"] for r in trajectory):
            pts = [sft_row] + [r for r in trajectory if r["divergence"] == name]
            ax.plot([r["reverse KL from SFT"] for r in pts], [r[metric] for r in pts], marker="o", label=name)
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlabel("estimated reverse KL from the SFT start")
        ax.set_title(metric)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
