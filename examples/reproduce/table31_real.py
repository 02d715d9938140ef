"""Thesis Table 3.1 at a scale that decides, on a real model: mDPO/mIPO against DPO/IPO on SmolLM2's random-number
bias, scored exactly from the logits, over seeds, with bootstrap intervals and training curves.

Setting (thesis 3.6.1): SmolLM2-135M-Instruct is asked "Give me a random integer between a and b." with its reply
begun "Here is a random integer between a and b:". Training groups as in the thesis: `a` uniform in [0, 1000], gap
b - a uniform in 5..10; chosen = 4 distinct uniform draws from [a, b], rejected = 4 of SmolLM2's own samples. mDPO
and mIPO train on the groups, DPO and IPO on the same completions cut into 4 pairs; the same LoRA, beta, learning
rate, NLL weight, completions per step and epochs for all four. Held-out prompts: new intervals whose widths are
inside the training widths (5-10) and outside them (15-60).

Scores (`alignkit.metrics.numbers`, also `alignkit eval --exact`): per prompt, each integer's probability from the
logits; the normalised entropy of the in-range answers (1 = uniform) is the score the win rates compare, with the
in-range mass beside it. Scored at 4 points of training, so the curves show whether the runs converged, and so
methods can be compared at equal completions seen (the end) and at equal training time (the process's CPU time
spent in training steps, one torch thread: other work on the machine does not count).

Runs are cached by their settings: each finished (method, seed) writes a small JSON under
docs/results/table31/<settings hash>/ (with its command, date and versions), which a re-run skips; the rejected
samples are kept there too. Interrupt it and start it again to resume; add seeds with --seeds.

    python examples/reproduce/table31_real.py --jobs 1                 # the runs (hours on CPUs; resumable)
    python examples/reproduce/table31_real.py --report                 # tables from the committed results
    python examples/reproduce/table31_real.py --quick                  # a smoke run (a minute)
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import sample_groups  # noqa: E402
from _runs import (METHODS, MODEL, load_base, read_json, stamp, study_main, tokenizer,  # noqa: E402
                   train_and_score, write_json)
from random_numbers_real import prompt_text  # noqa: E402  (the same prompt as the earlier reproduction)

PAIRS = [("mDPO", "DPO"), ("mIPO", "IPO"), ("mDPO", "base"), ("DPO", "base"), ("mIPO", "base"), ("IPO", "base")]
SETTINGS = dict(model=MODEL, train_groups=500, a_max=1000, gap=[5, 10], group_size=4, prompts_per_step=4, epochs=1,
                beta=0.1, lr=1e-4, nll_weight=1.0, lora_r=16, eval_inside=50, eval_outside=50, outside_gap=[15, 60],
                eval_points=4, eval_seed=12345)
QUICK = dict(SETTINGS, train_groups=8, prompts_per_step=2, eval_inside=3, eval_outside=3, eval_points=2)


def intervals(n: int, gap: tuple[int, int], a_max: int, seed) -> list[tuple[int, int]]:
    rng = random.Random(f"intervals-{seed}")
    out = []
    for _ in range(n):
        a = rng.randint(0, a_max)
        out.append((a, a + rng.randint(*gap)))
    return out


def eval_prompts(s: dict) -> dict[str, list[tuple[int, int]]]:
    """Held-out intervals, the same for every seed and method: widths inside and outside the training widths."""
    return {"inside": intervals(s["eval_inside"], s["gap"], s["a_max"], f"eval-in-{s['eval_seed']}"),
            "outside": intervals(s["eval_outside"], s["outside_gap"], s["a_max"], f"eval-out-{s['eval_seed']}")}


def make_data(s: dict, seed: int, folder: Path) -> list[dict]:
    """The training groups of one seed (cached: the rejected side is SmolLM2's samples, slow to redraw)."""
    path = folder / f"data-seed{seed}.json.gz"
    if path.exists():
        return read_json(path)
    _, base, tok = load_base()
    bounds = intervals(s["train_groups"] * 2, s["gap"], s["a_max"], f"train-{seed}")
    rng = random.Random(f"chosen-{seed}")
    rows, k = [], s["group_size"]
    for start in range(0, len(bounds), 64):
        chunk = bounds[start:start + 64]
        drawn = sample_groups(base, tok, [prompt_text(tok, a, b) for a, b in chunk], k + 2, seed=1000 + seed + start)
        for (a, b), g in zip(chunk, drawn):
            rejected = [c for c in g if c.strip()][:k]  # an immediate end of turn is not a completion to train on
            if len(rejected) == k:
                rows.append({"low": a, "high": b, "rejected": rejected,
                             "chosen": [f" {x}" for x in rng.sample(range(a, b + 1), k)]})
        if len(rows) >= s["train_groups"]:
            break
    write_json(path, rows[: s["train_groups"]])
    return rows[: s["train_groups"]]


def score(model, tok, held_out: dict) -> dict:
    from alignkit.metrics.numbers import random_number_scores

    out = {}
    for part, bounds in held_out.items():
        r = random_number_scores(model, tok, [prompt_text(tok, a, b) for a, b in bounds], bounds)
        out[part] = {key: [p[key] for p in r["per_prompt"]] for key in ("normalized_entropy", "in_range_mass",
                                                                          "low_is_mode")}
    return out


def train_run(s: dict, method: str, seed: int, rows: list[dict]) -> dict:
    """One method, one seed: LoRA training with exact scores at `eval_points` points (training time excludes them)."""
    _, tok = tokenizer()
    data = [{"prompt": prompt_text(tok, r["low"], r["high"]), "chosen": r["chosen"], "rejected": r["rejected"]}
            for r in rows]
    held_out = eval_prompts(s)
    return train_and_score(s, method, seed, data, lambda model, tok: score(model, tok, held_out))


def unit_file(folder: Path, method: str, seed: int) -> Path:
    if method == "base":
        return folder / "base.json"
    if method == "data":
        return folder / f"data-seed{seed}.json.gz"
    return folder / f"seed{seed}-{method}.json"


def run_unit(s: dict, folder: Path, method: str, seed: int) -> None:
    """One cached unit: `base` (the start, scored once), `data` (a seed's training groups) or a (method, seed) run."""
    path = unit_file(folder, method, seed)
    if method == "data":
        make_data(s, seed, folder)
        return
    t0 = time.time()
    if method == "base":
        import torch

        _, model, tok = load_base()
        with torch.no_grad():
            scores = score(model, tok, eval_prompts(s))
        result = {"curve": [{"step": 0, "completions": 0, "train_seconds": 0.0, **scores}]}
    else:
        result = train_run(s, method, seed, read_json(unit_file(folder, "data", seed)))
    result.update(method=method, seed=seed, settings=s)
    write_json(path, stamp(result, f"python examples/reproduce/table31_real.py --seeds {seed + 1} --methods {method}",
                           t0))


#: the group methods train about 3x faster than the pair methods (one prompt per group): they run first
ORDER = ("mDPO", "mIPO", "DPO", "IPO")


def units(seeds: int, methods: list[str]) -> list[tuple[str, int]]:
    """What a full run is made of, in the order it runs: the start, every seed's data, the group methods seed by
    seed, then the pair methods seed by seed."""
    methods = sorted(methods, key=ORDER.index)
    group, pair = [m for m in methods if m.startswith("m")], [m for m in methods if not m.startswith("m")]
    return [("base", 0)] + [("data", s) for s in range(seeds)] + \
        [(m, s) for s in range(seeds) for m in group] + [(m, s) for s in range(seeds) for m in pair]


def main(argv=None) -> int:
    from table31_report import report

    return study_main(
        argv, doc=__doc__, name="table31", script=__file__, settings=SETTINGS, quick=QUICK, unit_file=unit_file,
        run_unit=run_unit, plan=lambda a, s: units(a.seeds, a.methods),
        report=lambda folder, a, s: report(folder, a.methods, PAIRS),
        add_arguments=lambda p: p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS)))


if __name__ == "__main__":
    sys.exit(main())
