"""Causal reward models against discrimination bias, with joint demographic bins (thesis 4.6.4, bins of 4.12.2).

`builtin:demographic`: yes/no loan decisions about an applicant described by age (4 values), gender (3) and home
town (5 fictional towns, standing in for the thesis' race bins), 4 x 3 x 5 = 60 joint groups. The right answer
follows the applicant's references only; the training labels come from a biased labeller who turns deserving
applicants down more often the less favoured their group (0% for the most favoured group, 60% for the least) plus
5% plain noise. The test split has clean labels and 20 applicants of every group.

Trained (the reward model of benchmarks/crm_bias.py: tiny Llama or `--model builtin:minilm-l6`):

* vanilla:        TRL's RewardTrainer objective (mmd_coef 0),
* unconditional:  + mmd_coef * MMD^2 between the 60 demographic bins (age x gender x town, binned jointly),
* conditional:    + the penalty within chosen and within rejected completions,
* decision:       unconditional, with the completion's decision (yes / no) as a fourth joint attribute (120
                  bins): the reward of a "yes" must not depend on the group, nor the reward of a "no".

Scored on the clean test split: accuracy overall, per group (60) and per value of each attribute; the worst
group; the spread of group accuracy (max - min, std); and `flip_corr`, the Spearman correlation between a
group's accuracy and the rate at which its deserving members were turned down in training (near -1: the
reward model learnt the labeller's bias; near 0: it did not).

    python examples/reproduce/crm_demographic.py --threads 1            # 3 seeds, 4 variants
    python examples/reproduce/crm_demographic.py --quick                # CI-sized: 1 seed, vanilla + decision

Status (seed 0, 200 steps, batch 64, tiny Llama): not reproduced. The vanilla model learns the labeller's bias
(accuracy 0.77, worst group 0.35, flip_corr -0.89); every causal variant tried (unconditional and conditional,
mmd_coef 0.001 to 3, either estimator, standardised or not) collapses the reward to a constant (accuracy 0.50;
the demographic x decision variant, 100 steps: 0.57).
Why, and what to try next: docs/results.md, "Discrimination bias with joint demographic bins".
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
from _common import count, nonnegative, setup, write_table  # noqa: E402

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
DEMOGRAPHICS = ["age", "gender", "origin"]
VARIANTS = {
    "vanilla": dict(mmd_coef=0.0, attributes=DEMOGRAPHICS),
    "unconditional": dict(attributes=DEMOGRAPHICS),
    "conditional": dict(attributes=DEMOGRAPHICS, conditional=True),
    "decision": dict(attributes=[*DEMOGRAPHICS, "decision"]),
}


def _bench():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("crm_bias", BENCH / "crm_bias.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def group_scores(reward_model, tokenizer, pairs) -> dict:
    """Accuracy by group and by attribute value on `pairs` (rows of builtin:demographic), and how it follows the
    training labeller's bias."""
    from alignkit.data.synthetic import demographic_flip_rate
    from alignkit.metrics import spearman
    from alignkit.metrics.evaluate import _rewards

    reward_model.eval()
    prompts = list(pairs["prompt"])
    rc, rr = _rewards(reward_model, tokenizer, prompts, list(pairs["chosen"])), \
        _rewards(reward_model, tokenizer, prompts, list(pairs["rejected"]))
    right = [float(a > b) for a, b in zip(rc, rr)]
    groups: dict[tuple, list[float]] = {}
    values: dict[str, dict[str, list[float]]] = {a: {} for a in DEMOGRAPHICS}
    for ok, row in zip(right, pairs):
        groups.setdefault(tuple(row[a] for a in DEMOGRAPHICS), []).append(ok)
        for a in DEMOGRAPHICS:
            values[a].setdefault(row[a], []).append(ok)
    acc = {g: statistics.mean(v) for g, v in groups.items()}
    keys = sorted(acc)
    return {
        "accuracy": statistics.mean(right),
        "worst_group": min(acc.values()),
        "group_spread": max(acc.values()) - min(acc.values()),
        "group_std": statistics.pstdev(acc.values()),
        "flip_corr": spearman([acc[g] for g in keys], [demographic_flip_rate(*g) for g in keys]),
        "by_value": {a: {v: statistics.mean(x) for v, x in sorted(d.items())} for a, d in values.items()},
    }


def run(bench, variant: str, seed: int, args) -> dict:
    cfg = dict(VARIANTS[variant])
    coef = cfg.pop("mmd_coef", args.mmd_coef)
    metrics, trainer = bench.train_and_score(
        "demographic", variant if variant in bench.VARIANTS else "unconditional", steps=args.steps, seed=seed,
        batch_size=args.batch_size, model=args.model, mmd_coef=coef, splits=("test",), return_trainer=True,
        output_dir=f"{args.output}/runs", mmd_estimator=args.mmd_estimator,
        bin_sampler_examples=args.bin_examples, **cfg)
    from alignkit.data.synthetic import demographic

    scores = group_scores(trainer.model, trainer.processing_class, demographic("test", seed=seed))
    return {"variant": variant, "seed": seed, "mmd_coef": coef, "train_reward_std": metrics["train_reward_std"],
            **scores}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", default="outputs/reproduce/crm_demographic")
    p.add_argument("--model", default="builtin:tiny-llama")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--mmd-coef", type=nonnegative, default=3.0)
    p.add_argument("--mmd-estimator", choices=["unbiased", "biased"], default="unbiased")
    p.add_argument("--bin-examples", type=count, default=2, help="bin_sampler_examples: examples of each bin in a "
                                                                   "batch (the balanced sampler's)")
    p.add_argument("--steps", type=count, default=200)
    p.add_argument("--batch-size", type=count, default=64)
    p.add_argument("--seeds", type=count, default=3)
    p.add_argument("--threads", type=count, default=None)
    p.add_argument("--quick", action="store_true", help="1 seed, 100 steps, vanilla and decision")
    a = p.parse_args(argv)
    if a.quick:
        a.seeds, a.steps, a.variants = 1, 100, ["vanilla", "decision"]
    setup(a.threads)
    bench = _bench()
    t0 = time.time()
    runs = [run(bench, v, seed, a) for v in a.variants for seed in range(a.seeds)]
    rows = []
    for v in a.variants:
        mine = [r for r in runs if r["variant"] == v]
        row = {"variant": v, "mmd_coef": mine[0]["mmd_coef"]}
        for k in ("accuracy", "worst_group", "group_spread", "flip_corr", "train_reward_std"):
            row[k] = statistics.mean(r[k] for r in mine)
        row["accuracy per seed"] = " / ".join(f"{r['accuracy']:.2f}" for r in mine)
        row["worst group per seed"] = " / ".join(f"{r['worst_group']:.2f}" for r in mine)
        row["flip_corr per seed"] = " / ".join(f"{r['flip_corr']:+.2f}" for r in mine)
        rows.append(row)
    result = {"rows": rows, "runs": runs, "seconds": round(time.time() - t0, 1),
              "settings": {k: getattr(a, k) for k in ("model", "mmd_coef", "steps", "batch_size", "seeds")}}
    out = Path(a.output)
    print(write_table(rows, list(rows[0]), out))
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(f"{time.time() - t0:.0f} s")
    return result


if __name__ == "__main__":
    main()
