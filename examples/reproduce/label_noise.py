"""Reproduction: multi-sample comparisons are robust to per-sample label noise (thesis 3.6.4, Fig. 3.10/3.11).

The thesis trains Llama-3-8B on five Llama-3-70B responses per prompt (chosen group) against five Llama-3-8B
ones (rejected group): the 70B model is better on average, but single responses overlap in quality, so the
single pairs are often mislabelled while the groups are not (Remark 1). mDPO/mIPO with k = 2..5 then beat
k = 1 (DPO/IPO on the same data), by win rates judged by GPT-4o; with noise-free labels they do not.

Here, at toy scale, everything is built in this script:

* **Task**: for every training prompt (the `builtin:sentiment` PROMPTS over its train ITEMS: 24 items x 4
  prompts = 96 prompts), two "sources" each write 5 reviews from the sentiment COMPLETIONS templates, each of
  the two adjectives drawn from POSITIVE with probability `p_good` = 0.65 (the strong source) or `p_bad` =
  0.35 (the weak one), else from NEGATIVE. The true quality of a review is `alignkit.rewards.sentiment`
  (the `builtin:sentiment` reward: positive minus negative words, so -2, 0 or +2 for a training review).
  The strong source is better on average (+0.6 against -0.6) but single pairs are often wrong or tied; the
  script prints and tabulates the measured label-noise rates (pairs and first-k groups).
* **SFT start**: the tiny Llama trained by `_common.sft` (400 steps) on both sources' reviews, so positive and
  negative adjectives are equally likely: a neutral start (quality -0.07).
* **Preference training** from that start, `MultiSampleDPOTrainer` with `loss_type="sigmoid"` (mDPO; groups
  of one are exactly DPO): chosen group = the first k strong reviews, rejected = the first k weak ones, for k
  in {1, 3, 5}, plus "k=1 all pairs": the same completions as k=5 cut into 5 single pairs per prompt. Same
  prompts, steps (120), learning rate (5e-4, constant), beta (0.5) and NLL weight on the chosen group (1.0);
  16 prompts per step for k = 1, 3, 5 (so k=5 sees 5x the completions per step of k=1), and 80 pairs per step
  for "k=1 all pairs" (the completions per step of k=5): k=5 against k=1 is the thesis' comparison, k=5
  against "all pairs" asks whether grouping, not the amount of data, is what helps. `--losses sigmoid ipo`
  runs the same four with mIPO/IPO (unbiased) too.
* **Evaluation**: every policy samples 16 completions for each of the 24 held-out prompts (test ITEMS),
  scored by the true quality; per method the mean quality, and per prompt (the prompt's mean quality) against
  k=1 of the same loss, and k=5 against all pairs: the fraction of prompts won/tied/lost and
  `metrics.win_rate_score` (50 + (wins - losses) / N * 100: 50 = even, 150 = always better). Also the
  fraction of well-formed samples (a template with two known adjectives) and the quality of those alone: a
  degenerate policy writes junk that scores 0 like a neutral review, or more than 2 by repeating praise.

Why beta 0.5 and NLL 1.0 (a small exploration, seed 0, on these same held-out prompts: there is no separate
validation split, so read the settings as tuned): without the NLL term the tiny policy collapses (lr 1e-3, beta
0.5: mDPO k=5 samples were byte junk, quality 0.00); with beta 0.1 the NLL dominates and all methods end near
the strong source (100 steps: k=1 +0.81, k=5 +0.80, all pairs +0.90, no effect); longer training overfits the
96 prompts (300 steps at lr 5e-4: every method falls back to ~+0.7-0.8, k=5 peaks at ~100 steps). Noisy DPO
has a finite optimum (mislabelled pairs push back), groups of 5 a larger one, so a larger beta, which keeps
that optimum short of saturation, is where the difference shows.

    python examples/reproduce/label_noise.py --threads 1          # full form: mDPO, 3 seeds, ~4 min
    python examples/reproduce/label_noise.py --quick              # CI-sized: k=1 and k=5, 60 steps, 1 seed, ~26 s
    python examples/reproduce/label_noise.py --losses ipo --output outputs/reproduce/label_noise_ipo

Status (full form, 1 thread, 238 s wall, about 4 min, on a 2-core CPU shared with another engineer's runs;
--losses ipo alone also 241 s; the runs are deterministic on this machine: a re-run gave the same numbers):

    | comparison (training data, true quality) | n | wrong | tie | right |
    |---|---|---|---|---|
    | single pairs (all 5 per prompt) | 480 | 0.133 | 0.321 | 0.546 |
    | group means, k=1 | 96 | 0.115 | 0.344 | 0.542 |
    | group means, k=3 | 96 | 0.062 | 0.188 | 0.750 |
    | group means, k=5 | 96 | 0.073 | 0.083 | 0.844 |

    | method | mean quality | per seed | well-formed | quality if well-formed |
    |---|---|---|---|---|
    | SFT | -0.065 | -0.07 -0.07 -0.07 | 0.865 | -0.060 |
    | mDPO k=1 | 0.866 | +0.85 +0.84 +0.91 | 0.473 | 0.956 |
    | mDPO k=3 | 1.233 | +1.20 +1.18 +1.31 | 0.635 | 1.348 |
    | mDPO k=5 | 1.363 | +1.31 +1.37 +1.41 | 0.767 | 1.408 |
    | mDPO k=1 all pairs | 1.053 | +1.07 +1.02 +1.07 | 0.804 | 1.123 |
    | mIPO k=1 | 0.899 | +0.89 +0.91 +0.89 | 0.527 | 0.946 |
    | mIPO k=3 | 1.159 | +1.11 +1.25 +1.12 | 0.267 | 1.191 |
    | mIPO k=5 | 1.201 | +1.05 +1.04 +1.51 | 0.511 | 1.210 |
    | mIPO k=1 all pairs | 1.116 | +1.03 +1.18 +1.14 | 0.731 | 1.212 |

    | comparison (24 held-out prompts x 3 seeds) | wins | ties | losses | win_rate_score | score per seed |
    |---|---|---|---|---|---|
    | mDPO k=3 vs mDPO k=1 | 0.792 | 0.069 | 0.139 | 115.3 | 117 112 117 |
    | mDPO k=5 vs mDPO k=1 | 0.903 | 0.042 | 0.056 | 134.7 | 129 133 142 |
    | mDPO k=1 all pairs vs mDPO k=1 | 0.653 | 0.069 | 0.278 | 87.5 | 117 67 79 |
    | mDPO k=5 vs mDPO k=1 all pairs | 0.778 | 0.069 | 0.153 | 112.5 | 96 117 125 |
    | mIPO k=3 vs mIPO k=1 | 0.639 | 0.014 | 0.347 | 79.2 | 67 79 92 |
    | mIPO k=5 vs mIPO k=1 | 0.681 | 0.028 | 0.292 | 88.9 | 75 62 129 |
    | mIPO k=1 all pairs vs mIPO k=1 | 0.667 | 0.014 | 0.319 | 84.7 | 83 75 96 |
    | mIPO k=5 vs mIPO k=1 all pairs | 0.514 | 0.056 | 0.431 | 58.3 | 50 8 117 |

Agrees with the thesis for mDPO: k=3 and k=5 beat k=1 on every seed (quality +1.23 and +1.36 against +0.87;
win_rate_score 115 and 135), and k > 1 improves with k. More than data: k=5 also beats "k=1 all pairs", which saw
the same completions (+1.36 against +1.05: higher on every seed; per-prompt score 112.5, per seed 96, 117, 125),
and all pairs is itself only a little better than k=1. Part of k=1's deficit is fluency: it memorises its 96 pairs
(training reward accuracy 0.99 after its 20 epochs, though only 55% of the pairs are right by the true quality;
all pairs ends at 0.88) and half its samples are malformed; among well-formed samples the ordering is the same
(k=1 0.96 < all pairs 1.12 < k=3 1.35 < k=5 1.41). For mIPO the picture is weaker: k=3 and k=5 beat k=1 (scores 79
and 89, mean quality +1.16 and +1.20 against +0.90) but so does all pairs (85), and k=5 against all pairs is a
seed-by-seed coin toss (50, 8, 117); mIPO k=3 writes many malformed samples (0.27). The group-level label noise is
measured on 96 prompts only, so k=5's 0.073 wrong is above k=3's 0.062 by sampling (the expected rates are 0.085,
0.053 for k=3, k=5 with these p's). Toy caveats: one SFT start, one data draw, settings tuned on the evaluation
prompts (above), and the thesis' noise-free control (GPT-4o labels, where k > 1 has no advantage) is not
reproduced here.
"""

from __future__ import annotations

import argparse
import random
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import align, count, nonnegative, positive, probability, pyplot, setup, sft, write_table  # noqa: E402

N_REVIEWS = 5
PROMPTS_PER_STEP = 16
# method -> (group size k, all pairs?)
METHODS = {"k=1": (1, False), "k=3": (3, False), "k=5": (5, False), "k=1 all pairs": (1, True)}
LOSS_NAMES = {"sigmoid": "mDPO", "ipo": "mIPO"}


def quality(completions: list[str]) -> list[float]:
    """The true quality: the `builtin:sentiment` reward (positive minus negative words)."""
    from alignkit.rewards import sentiment

    return sentiment([""] * len(completions), completions)


def build_task(p_good: float, p_bad: float, seed: int = 0, split: str = "train") -> list[dict]:
    """One row per prompt of `split`: `prompt`, and `strong`/`weak`, 5 reviews by each source."""
    from alignkit.data.synthetic import _TEST_ITEMS, COMPLETIONS, ITEMS, NEGATIVE, POSITIVE, PROMPTS

    rng = random.Random(f"label-noise-{split}-{seed}")

    def review(item: str, p: float) -> str:
        a, b = (rng.choice(POSITIVE if rng.random() < p else NEGATIVE) for _ in range(2))
        return rng.choice(COMPLETIONS).format(item=item, a=a, b=b)

    items = [i for i in ITEMS if (i in _TEST_ITEMS) == (split == "test")]
    return [{"prompt": p.format(item=item) + " ",  # the sentiment task's convention: prompt + " ", completion
             "strong": [review(item, p_good) for _ in range(N_REVIEWS)],
             "weak": [review(item, p_bad) for _ in range(N_REVIEWS)]} for item in items for p in PROMPTS]


def noise_rates(task: list[dict]) -> list[dict]:
    """How often the preference label is wrong (rejected better by the true quality) or uninformative (tie):
    for the 5 single pairs of every prompt, and for the first-k groups (group means compared)."""
    def rates(unit: str, pairs: list[tuple[float, float]]) -> dict:
        n = len(pairs)
        return {"comparison": unit, "n": n, "wrong": sum(c < r for c, r in pairs) / n,
                "tie": sum(c == r for c, r in pairs) / n, "right": sum(c > r for c, r in pairs) / n}

    q = [(quality(r["strong"]), quality(r["weak"])) for r in task]
    rows = [rates("single pairs (all 5 per prompt)", [(c, r) for qs, qw in q for c, r in zip(qs, qw)])]
    rows += [rates(f"group means, k={k}", [(statistics.mean(qs[:k]), statistics.mean(qw[:k])) for qs, qw in q])
             for k in (1, 3, 5)]
    return rows


def preference_rows(task: list[dict], k: int, all_pairs: bool) -> list[dict]:
    if all_pairs:
        return [{"prompt": r["prompt"], "chosen": [c], "rejected": [j]} for r in task
                for c, j in zip(r["strong"], r["weak"])]
    return [{"prompt": r["prompt"], "chosen": r["strong"][:k], "rejected": r["weak"][:k]} for r in task]


def train(start: str, out: Path, rows: list[dict], loss_type: str, batch_size: int, steps: int, seed: int,
          beta: float, lr: float, nll_weight: float) -> str:
    from datasets import Dataset

    from alignkit import MultiSampleDPOConfig, MultiSampleDPOTrainer

    args = MultiSampleDPOConfig(
        output_dir=str(out), loss_type=loss_type, beta=beta, nll_weight=nll_weight, learning_rate=lr,
        per_device_train_batch_size=batch_size, max_steps=steps, lr_scheduler_type="constant", report_to=[],
        save_strategy="no",
        logging_steps=max(steps // 4, 1), disable_tqdm=True, bf16=False, seed=seed)
    return align(MultiSampleDPOTrainer, start, args, Dataset.from_list(rows))


def well_formed(text: str) -> bool:
    """A review in one of the task's templates with two known adjectives (a collapsed policy writes junk,
    which scores 0 like a neutral review: this tells the two apart)."""
    from alignkit.data.synthetic import NEGATIVE, POSITIVE

    m = re.fullmatch(r"The \w+ was (\w+) and (\w+)\.|A (\w+), (\w+) \w+\.|I found the \w+ (\w+), even (\w+)\.",
                     text.strip())
    return bool(m) and all(w in POSITIVE or w in NEGATIVE for w in m.groups() if w is not None)


def per_prompt_quality(model: str, prompts: list[str], k: int, seed: int) -> tuple[list[float], dict]:
    """Mean true quality of `k` sampled completions, per prompt; and the fraction of well-formed samples
    with the mean quality of those alone (so that fluency and sentiment can be read apart)."""
    from alignkit.metrics.evaluate import evaluate

    rep = evaluate(model, prompts, k=k, max_new_tokens=16, temperature=1.0, seed=seed)
    texts = [s["completion"] for s in rep["samples"]]
    q = quality(texts)
    ok = [well_formed(t) for t in texts]
    formed = {"well-formed": statistics.mean(ok),
              "quality if well-formed": statistics.mean([x for x, o in zip(q, ok) if o] or [float("nan")])}
    return [statistics.mean(q[i * k:(i + 1) * k]) for i in range(len(prompts))], formed


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CI-sized: shorter SFT and training, k=1 and k=5 only, 1 seed")
    p.add_argument("--output", default="outputs/reproduce/label_noise")
    p.add_argument("--seeds", type=count, default=None, help="preference-training seeds (default 3, 1 with --quick)")
    p.add_argument("--steps", type=count, default=None, help="preference-training steps (default 120, 60 with --quick)")
    p.add_argument("--losses", nargs="+", choices=list(LOSS_NAMES), default=["sigmoid"],
                   help="sigmoid = mDPO (default), ipo = mIPO")
    p.add_argument("--p-good", type=probability, default=0.65,
                   help="strong source: probability of a positive adjective")
    p.add_argument("--p-bad", type=probability, default=0.35, help="weak source: probability of a positive adjective")
    p.add_argument("--beta", type=positive, default=0.5)
    p.add_argument("--lr", type=positive, default=5e-4)
    p.add_argument("--nll-weight", type=nonnegative, default=1.0,
                   help="NLL of the chosen group (keeps the policy fluent)")
    p.add_argument("--threads", type=count, default=None, help="torch CPU threads (default: torch's)")
    a = p.parse_args(argv)
    t0 = time.time()
    setup(a.threads)

    out = Path(a.output)
    sft_steps, steps, k_eval, seeds = (200, 60, 16, 1) if a.quick else (400, 120, 16, 3)
    steps, seeds = a.steps or steps, a.seeds or seeds
    methods = {m: METHODS[m] for m in (("k=1", "k=5") if a.quick else METHODS)}
    task = build_task(a.p_good, a.p_bad)
    noise = noise_rates(task)
    for r in noise:
        print(f"label noise, {r['comparison']}: wrong {r['wrong']:.3f}, tie {r['tie']:.3f}, right {r['right']:.3f}")
    start = sft([{"prompt": r["prompt"], "completion": c} for r in task for c in r["strong"] + r["weak"]], out,
                sft_steps)
    prompts = [r["prompt"] for r in build_task(a.p_good, a.p_bad, split="test")]

    q, wf = per_prompt_quality(start, prompts, k_eval, seed=0)
    scores, formed = {"SFT": [q] * seeds}, {"SFT": [wf] * seeds}  # method -> per seed -> per-prompt qualities / dict
    for seed in range(seeds):
        for loss in a.losses:
            for name, (k, all_pairs) in methods.items():
                method = f"{LOSS_NAMES[loss]} {name}"
                bs = PROMPTS_PER_STEP * (N_REVIEWS if all_pairs else 1)
                t = time.time()
                model = train(start, out / f"seed{seed}" / method.replace(" ", "_").replace("=", ""),
                              preference_rows(task, k, all_pairs), loss, bs, steps, seed, a.beta, a.lr, a.nll_weight)
                q, wf = per_prompt_quality(model, prompts, k_eval, seed=seed)
                scores.setdefault(method, []).append(q)
                formed.setdefault(method, []).append(wf)
                print(f"seed {seed} {method}: quality {statistics.mean(q):+.3f}, well-formed {wf['well-formed']:.2f} "
                      f"({time.time() - t:.0f} s)", flush=True)
    wall = time.time() - t0
    setup_row = {"training prompts": len(task), "p_good": a.p_good, "p_bad": a.p_bad, "beta": a.beta, "lr": a.lr,
                 "nll_weight": a.nll_weight, "steps": steps, "sft_steps": sft_steps, "seeds": seeds,
                 "held-out prompts": len(prompts), "k_eval": k_eval, "threads": a.threads, "wall_s": round(wall, 1)}
    return report(out, setup_row, noise, scores, formed, a.losses)


def report(out: Path, setup_row: dict, noise: list[dict], scores: dict, formed: dict, losses) -> dict:
    from alignkit.metrics import win_rate_score

    method_rows = [{"method": m, "mean quality": statistics.mean(statistics.mean(s) for s in per_seed),
                    **{key: statistics.mean(f[key] for f in formed[m]) for key in formed[m][0]},
                    "per seed": " ".join(f"{statistics.mean(s):+.2f}" for s in per_seed)}
                   for m, per_seed in scores.items()]
    win_rows = []
    for loss in losses:
        name = LOSS_NAMES[loss]
        for m, base in [(f"{name} k=3", f"{name} k=1"), (f"{name} k=5", f"{name} k=1"),
                        (f"{name} k=1 all pairs", f"{name} k=1"), (f"{name} k=5", f"{name} k=1 all pairs")]:
            if m not in scores or base not in scores:
                continue
            pairs = list(zip(scores[m], scores[base]))  # per seed: per-prompt mean qualities of m and base
            wins = statistics.mean(sum(x > y for x, y in zip(s, b)) / len(s) for s, b in pairs)
            ties = statistics.mean(sum(x == y for x, y in zip(s, b)) / len(s) for s, b in pairs)
            wrs = [win_rate_score(s, b) for s, b in pairs]
            win_rows.append({"comparison": f"{m} vs {base}", "wins": wins, "ties": ties, "losses": 1 - wins - ties,
                             "win_rate_score": statistics.mean(wrs),
                             "score per seed": " ".join(f"{w:.0f}" for w in wrs)})
    s = setup_row
    md = (f"{s['training prompts']} training prompts, p_good {s['p_good']}, p_bad {s['p_bad']}, beta {s['beta']}, "
          f"lr {s['lr']}, nll_weight {s['nll_weight']}, {s['steps']} steps of {PROMPTS_PER_STEP} prompts, "
          f"{s['seeds']} seed(s), {s['held-out prompts']} held-out prompts x {s['k_eval']} samples, "
          f"{s['threads']} thread(s), {s['wall_s']:.0f} s\n\nLabel noise of the training data (true quality):\n\n")
    md += write_table(noise, ["comparison", "n", "wrong", "tie", "right"], out, "noise")
    md += ("\nMean true quality of the sampled reviews (positive minus negative words; -2..2 for a well-formed "
           "review), fraction of well-formed samples:\n\n")
    md += write_table(method_rows, ["method", "mean quality", "per seed", "well-formed", "quality if well-formed"],
                      out, "methods")
    md += ("\nAgainst k=1 (and k=5 against all pairs), per held-out prompt (mean quality of its samples compared), "
           "mean over seeds; win_rate_score = 50 + (wins - losses) / N * 100:\n\n")
    md += write_table(win_rows, ["comparison", "wins", "ties", "losses", "win_rate_score", "score per seed"], out,
                      "win_rates")
    write_table([setup_row], list(setup_row), out, "setup")
    (out / "table.md").write_text(md)

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1.2 * len(method_rows) + 1.5, 3.6))
    names = [r["method"] for r in method_rows]
    ax.bar(range(len(names)), [r["mean quality"] for r in method_rows],
           color=["#999999"] + ["#4C72B0" if "mDPO" in n else "#C44E52" for n in names[1:]])
    for i, m in enumerate(names):  # per-seed points
        ax.plot([i] * len(scores[m]), [statistics.mean(x) for x in scores[m]], "k.", ms=4)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("mean true quality of samples")
    ax.set_title(f"{s['held-out prompts']} held-out prompts; training pairs {noise[0]['wrong']:.0%} wrong, "
                 f"{noise[0]['tie']:.0%} tied", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "label_noise.png", dpi=100)
    plt.close(fig)
    print(md)
    return {"setup": setup_row, "noise": noise, "methods": method_rows, "win_rates": win_rows}


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
