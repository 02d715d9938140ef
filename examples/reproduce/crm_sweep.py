"""Reproduction: causal reward models against a spurious attribute, swept over mmd_coef (thesis Table 4.1, Fig. 4.2).

The thesis finds that the causal reward models (unconditional and conditional MMD penalty) reward the spurious
attribute less than a vanilla reward model, at a mild cost in ordinary accuracy, and that larger `mmd_coef`
trades more accuracy for less bias. Here: the built-in sycophancy and length tasks and the tiny Llama reward
model of benchmarks/crm_bias.py (whose `train_and_score` does the training and scoring; this script only
sweeps it): vanilla (mmd_coef 0) once, then unconditional and conditional for each coefficient of the sweep,
same data, steps and seed. Scored by pairwise accuracy on `test_anti` (attribute on the rejected side only: a
model that rewards the shortcut fails there), on `test_uncorrelated` (attribute on either side at random: the
cost on ordinary data) and by Spearman(reward, attribute) on `test_uncorrelated`. Writes table.json, table.md
and crm_sweep.png (per task: accuracies against mmd_coef on a log axis, vanilla as horizontal lines).

    python examples/reproduce/crm_sweep.py --threads 1 # full form: 2 tasks x 13 runs of 200 steps, ~8.5 min
    python examples/reproduce/crm_sweep.py --quick     # CI-sized: sycophancy, vanilla + unconditional at 3, ~25 s
    python examples/reproduce/crm_sweep.py --seeds 3 --coefs 1 3 10 --threads 2

Status: the tables in docs/results.md. The toy sweep there (200 steps, batch 32, seed 0) was measured with
--no-standardize (the earlier median-heuristic penalty): mostly reproduced. The reward's correlation with the
attribute falls as mmd_coef grows, the unconditional CRM removes the sycophancy shortcut (test_anti 0.00 -> 0.82
at mmd_coef 3) and mmd_coef 100 costs accuracy everywhere; unlike the thesis, no accuracy cost at moderate
coefficients (test_uncorrelated rises: the vanilla model's shortcut misleads it there too), and the conditional
CRM is no better than the unconditional one. With the standardised penalty (the default), --quick --steps 200
--seeds 5: vanilla test_anti 0.00-0.09, unconditional at 3 0.46-0.82. On MiniLM (`python benchmarks/crm_bias.py
--task sycophancy --model builtin:minilm-l6 --steps 100 --mmd-coef 0.3`, lr 5e-5, 3 seeds) a moderate coefficient
works (unconditional: test_anti 0.00 -> 0.36, test_uncorrelated +9.5 points) and large ones flatten the reward.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import count, nonnegative, positive, pyplot, setup  # noqa: E402

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
TASKS = ("sycophancy", "length_bias", "concept_sentiment")
CAUSAL = ("unconditional", "conditional")
COEFS = (0.1, 0.3, 1.0, 3.0, 10.0, 100.0)
METRICS = ("test_anti", "test_uncorrelated", "test_uncorrelated_spearman")


def load_benchmark():
    """benchmarks/crm_bias.py as a module (benchmarks/ is not a package; it imports its sibling `_harness`)."""
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("crm_bias", BENCH / "crm_bias.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def plan(tasks, coefs) -> list[tuple[str, str, float]]:
    """The (task, variant, mmd_coef) runs: vanilla once per task, then each causal variant at each coefficient."""
    return [run for t in tasks for run in [(t, "vanilla", 0.0), *((t, v, c) for v in CAUSAL for c in coefs)]]


def write_figure(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.6), squeeze=False)
    colors = {"unconditional": "#4C72B0", "conditional": "#DD8452"}
    for ax, task in zip(axes[0], tasks):
        van = next((r for r in rows if r["task"] == task and r["variant"] == "vanilla"), None)
        if van is not None:
            ax.axhline(van["test_anti"], color="gray", lw=1.2, label="vanilla, test_anti")
            ax.axhline(van["test_uncorrelated"], color="gray", lw=1.2, ls="--", label="vanilla, test_uncorrelated")
        for variant in CAUSAL:
            pts = sorted((r["mmd_coef"], r["test_anti"], r["test_uncorrelated"])
                         for r in rows if r["task"] == task and r["variant"] == variant)
            if not pts:
                continue
            x = [p[0] for p in pts]
            ax.plot(x, [p[1] for p in pts], "o-", color=colors[variant], label=f"{variant}, test_anti")
            ax.plot(x, [p[2] for p in pts], "s--", color=colors[variant], label=f"{variant}, test_uncorrelated")
        ax.set_xscale("log")
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("mmd_coef")
        ax.set_ylabel("pairwise accuracy")
        ax.set_title(task)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CI-sized: sycophancy, vanilla + unconditional at 3, 100 steps")
    p.add_argument("--output", default="outputs/reproduce/crm_sweep")
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=None,
                   help="default: sycophancy and length_bias (sycophancy with --quick)")
    p.add_argument("--model", default="builtin:tiny-llama", help="reward backbone: builtin:tiny-llama (trained from "
                   "scratch) or builtin:minilm-l6 (real pretrained MiniLM-L6)")
    p.add_argument("--lr", type=positive, default=None, help="default: 1e-3 for the tiny Llama, 5e-5 for MiniLM")
    p.add_argument("--variants", nargs="+", choices=CAUSAL, default=list(CAUSAL))
    p.add_argument("--no-standardize", action="store_true", help="mmd_standardize=False: the plain median-heuristic "
                   "penalty (the toy table in docs/results.md was measured with it)")
    p.add_argument("--coefs", nargs="+", type=nonnegative, default=None,
                   help=f"default: {' '.join(f'{c:g}' for c in COEFS)}"
                   " (3 with --quick)")
    p.add_argument("--steps", type=count, default=None, help="default: 200 (100 with --quick)")
    p.add_argument("--seeds", type=count, default=1, help="accuracies are averaged over seeds 0..N-1")
    p.add_argument("--batch-size", type=count, default=32)
    p.add_argument("--threads", type=count, default=None, help="torch CPU threads (default: torch's)")
    a = p.parse_args(argv)
    setup(a.threads)
    bench = load_benchmark()
    tasks = a.tasks or (["sycophancy"] if a.quick else ["sycophancy", "length_bias"])
    coefs = a.coefs or ([3.0] if a.quick else list(COEFS))
    steps = a.steps or (100 if a.quick else 200)
    runs = [r for r in plan(tasks, coefs) if r[1] == "vanilla" or r[1] in a.variants]
    if a.quick:
        runs = [r for r in runs if r[1] != "conditional"]
    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    rows, start = [], time.time()
    for i, (task, variant, coef) in enumerate(runs, 1):
        t0 = time.time()
        per_seed = [bench.train_and_score(task, variant, steps=steps, seed=seed, batch_size=a.batch_size,
                                          output_dir=str(out / "runs"), mmd_coef=coef, model=a.model,
                                          learning_rate=a.lr, mmd_standardize=not a.no_standardize)
                    for seed in range(a.seeds)]
        row = {"task": task, "variant": variant, "mmd_coef": coef}
        row |= {k: statistics.mean(r[k] for r in per_seed) for k in per_seed[0]}
        row["per_seed"] = {k: [r[k] for r in per_seed] for k in ("test_anti", "test_uncorrelated")}
        row["per_seed_anti"] = row["per_seed"]["test_anti"]
        rows.append(row)
        print(f"[{i}/{len(runs)}] {task} {variant} mmd_coef {coef:g}: anti {row['test_anti']:.3f} uncorrelated "
              f"{row['test_uncorrelated']:.3f} spearman {row['test_uncorrelated_spearman']:+.3f} "
              f"({time.time() - t0:.0f} s)", flush=True)
    wall = time.time() - start
    settings = {"model": a.model, "mmd_standardize": not a.no_standardize, "steps": steps, "batch_size": a.batch_size, "seeds": a.seeds, "threads": a.threads,
                "wall_s": round(wall, 1)}
    (out / "table.json").write_text(json.dumps({"setup": settings, "rows": rows}, indent=2))
    lines = [f"{a.model}, {steps} steps, batch {a.batch_size}, mean of {a.seeds} seed(s), {a.threads} thread(s), "
             f"{wall:.0f} s", "",
             "| task | variant | mmd_coef | test_anti (per seed) | test_uncorrelated (per seed) | spearman(r, Z) "
             "uncorrelated | reward std (train) | Bias@C |", "|---|---|---|---|---|---|---|---|"]

    def cell(r, k):
        return f"{r[k]:.3f} ({' / '.join(f'{v:.2f}' for v in r['per_seed'][k])})" if a.seeds > 1 else f"{r[k]:.3f}"
    lines += [f"| {r['task']} | {r['variant']} | {r['mmd_coef']:g} | {cell(r, 'test_anti')} | "
              f"{cell(r, 'test_uncorrelated')} | {r['test_uncorrelated_spearman']:+.3f} | {r['train_reward_std']:.3f} | "
              f"{format(r['bias_at_c'], '.1f') if 'bias_at_c' in r else ''} |" for r in rows]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    write_figure(rows, out / "crm_sweep.png")
    print("\n".join(lines))
    return {"rows": rows, "setup": settings}


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
