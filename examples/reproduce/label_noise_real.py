"""Thesis 3.6.4 on a real model, with label noise as the thesis makes it: the chosen group is sampled from a better
model, the rejected group from a worse one, and single samples of the two overlap in quality (Remark 1).

Setting: SmolLM2-135M-Instruct answers real English chat prompts (chatterbot-corpus). The quality of a reply is its
VADER sentiment (`builtin:vader`), the property the training should raise. Two sources write `group_size` replies
to every training prompt:

* the **better source** is SmolLM2 told by a system prompt to be cheerful (`SETTINGS["better_system"]`);
* the **worse source** is SmolLM2 as it is (the policy's own start).

The better source is better on average, but many single replies of the worse one score higher than their better
counterpart: those pairs are mislabelled when the label is the source, as in the thesis (70B chosen, 8B rejected).
The script measures that overlap on the training data, for single pairs and for group means of 2 to 4.

Three labellings of the same replies: the first two as in thesis Figure 3.11, the third the random-swap form of
the noise that our earlier studies used (`SWAP_P` of the pairs swapped at random; the thesis does not use it):

* **source** (the thesis' default, noisy): chosen = the better source's group or reply;
* **vader** (the thesis' GPT-4o labels, clean): the group (mDPO, mIPO) or the pair (DPO, IPO) ordered by its VADER
  mean;
* **swap** (noisy by hand): each pair ordered by VADER, then swapped with probability `SWAP_P`; the groups are the
  pairs' chosen sides against their rejected sides (`sides`).

DPO and IPO train on the same replies cut into pairs, mDPO and mIPO on the groups; the same LoRA, beta, learning
rate, NLL weight, completions per step and epochs for all (the policy's prompt has no system prompt). Held out:
chat prompts that neither training nor the earlier real-model pairs use, `eval_k` samples each, scored by VADER at
`eval_points` points of training. Win rates compare the per-prompt mean VADER, at equal completions and at equal
training time (CPU seconds of training steps, one torch thread), with 95% bootstrap intervals over seeds and
prompts.

Runs are cached by their settings (docs/results/label_noise/<settings hash>/, one JSON per finished run with its
command, date and versions; the training replies too): interrupt and start again to resume; add seeds with --seeds.

    python examples/reproduce/label_noise_real.py --jobs 2              # the runs (hours on CPUs; resumable)
    python examples/reproduce/label_noise_real.py --report              # tables from the committed results
    python examples/reproduce/label_noise_real.py --quick               # a smoke run (minutes)
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import sample_groups  # noqa: E402
from _runs import (METHODS, MODEL, bootstrap, fmt, load_base, point, read_json, stamp, study_main,  # noqa: E402
                   tokenizer, train_and_score, verdict, win, write_json)

DATA = Path(__file__).resolve().parents[2] / "recipes" / "real" / "data"
LABELS = ("source", "vader", "swap")
#: the random-swap form's rate, as in the earlier random-swap row (random_numbers_real.py --label-noise 0.3); a
#: constant, not a setting, so that adding the form kept the cached runs of the other two
SWAP_P = 0.3
SETTINGS = dict(model=MODEL, train_prompts=160, group_size=4, max_new_tokens=24, prompts_per_step=4, epochs=1,
                better_system="You are a cheerful, upbeat assistant. Answer warmly and positively.",
                beta=0.1, lr=1e-4, nll_weight=1.0, lora_r=16, eval_prompts=40, eval_k=8, eval_points=3,
                eval_seed=12345)
QUICK = dict(SETTINGS, train_prompts=8, prompts_per_step=2, eval_prompts=4, eval_k=4, eval_points=2)
#: what the thesis reports (Figures 3.9-3.11, no single number): groups win under noisy labels, not under clean ones
THESIS = {"source": 0.6, "vader": 0.5, "swap": 0.6}
#: and a method trained on noisy labels loses to itself trained on clean ones (Figure 3.11, right)
THESIS_NOISY_VS_CLEAN = 0.4
#: a change of mean held-out VADER between the last two scored points above this counts as "still moving" (the
#: rule of Table 3.1's report, on a score of the same order)
MOVING = 0.02


def chat_prompts(s: dict) -> tuple[list[list[dict]], list[list[dict]]]:
    """(training prompts, held-out prompts): held-out ones spread over the chat prompts, none of them in the earlier
    real-model pairs (recipes/real/data/cheerful-smollm2.jsonl); the training ones drawn from the rest."""
    rows = [json.loads(x) for x in (DATA / "chat-prompts.jsonl").read_text().splitlines() if x.strip()]
    used = {json.loads(x)["prompt"][0]["content"] for x in
            (DATA / "cheerful-smollm2.jsonl").read_text().splitlines() if x.strip()}
    free = [r["prompt"] for r in rows if r["prompt"][0]["content"] not in used]
    held_out = free[:: max(len(free) // s["eval_prompts"], 1)][: s["eval_prompts"]]
    rest = [p for p in rows if p["prompt"] not in held_out]
    train = random.Random("train-prompts").sample([r["prompt"] for r in rest], s["train_prompts"])
    return train, held_out


def text(tok, prompt: list[dict], system: str | None = None) -> str:
    messages = ([{"role": "system", "content": system}] if system else []) + prompt
    return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def vader(texts: list[str]) -> list[float]:
    from alignkit.rewards import vader as score

    return score([""] * len(texts), texts)


def replies(model, tok, prompts: list[list[dict]], k: int, seed: int, max_new_tokens: int,
            system: str | None = None) -> list[list[str]]:
    """`k` non-empty sampled replies per prompt (an immediate end of turn is no reply to compare)."""
    drawn = sample_groups(model, tok, [text(tok, p, system) for p in prompts], k + 1, seed=seed,
                          max_new_tokens=max_new_tokens)
    out = []
    for g in drawn:
        kept = [c for c in g if c.strip()][:k]
        out.append(kept + [g[0]] * (k - len(kept)))  # all but never short (measured: none of 3 x 160 prompts)
    return out


def make_data(s: dict, seed: int, folder: Path) -> list[dict]:
    """A seed's training replies: `group_size` from each source per prompt, with their VADER scores (cached)."""
    path = folder / f"data-seed{seed}.json.gz"
    if path.exists():
        return read_json(path)
    _, model, tok = load_base()
    train, _ = chat_prompts(s)
    k, n = s["group_size"], s["max_new_tokens"]
    better = replies(model, tok, train, k, 2000 + seed, n, s["better_system"])
    worse = replies(model, tok, train, k, 3000 + seed, n)
    rows = [{"prompt": p, "chosen": c, "rejected": r, "chosen_vader": vader(c), "rejected_vader": vader(r)}
            for p, c, r in zip(train, better, worse)]
    write_json(path, rows)
    return rows


def sides(rows: list[dict], labels: str, k: int, seed: int = 0) -> list[tuple]:
    """The training units under a labelling, each (prompt, chosen, rejected, chosen VADER, rejected VADER): one pair
    per reply when k = 1 (DPO, IPO), one group per prompt otherwise (mDPO, mIPO).

    * `source` keeps the sources' order;
    * `vader` orders each unit by its VADER mean (a tie keeps the source's order);
    * `swap` (the random-swap form of the noise) orders each pair by VADER, as `vader` does for pairs, then swaps it
      with probability `SWAP_P`; a group is the pairs' chosen sides against their rejected sides. The swaps depend
      on the seed only, so pairs and groups of a seed see the same ones."""
    rng = random.Random(f"swap-{seed}")
    units = []
    for r in rows:
        c, j, cs, js = r["chosen"], r["rejected"], r["chosen_vader"], r["rejected_vader"]
        if labels == "swap":
            flip = [(y > x) != (rng.random() < SWAP_P) for x, y in zip(cs, js)]
            c, j = [b if f else a for a, b, f in zip(c, j, flip)], [a if f else b for a, b, f in zip(c, j, flip)]
            cs, js = [y if f else x for x, y, f in zip(cs, js, flip)], [x if f else y for x, y, f in zip(cs, js, flip)]
        pieces = [([a], [b], [x], [y]) for a, b, x, y in zip(c, j, cs, js)] if k == 1 else [(c, j, cs, js)]
        for ch, rj, chs, rjs in pieces:
            if labels == "vader" and statistics.mean(rjs) > statistics.mean(chs):
                ch, rj, chs, rjs = rj, ch, rjs, chs
            units.append((r["prompt"], ch, rj, chs, rjs))
    return units


def labelled(rows: list[dict], labels: str, k: int, seed: int = 0) -> list[dict]:
    """The training data under a labelling (`sides`); pair methods get groups of one in place of the pairs."""
    return [{"prompt": p, "chosen": c, "rejected": j} for p, c, j, _, _ in sides(rows, labels, k, seed)]


def quality(rows: list[dict], labels: str, k: int, seed: int = 0) -> dict[str, float]:
    """How often a labelling's units are wrong, tied or right by their VADER means."""
    d = [statistics.mean(cs) - statistics.mean(js) for *_, cs, js in sides(rows, labels, k, seed)]
    return {"wrong": sum(x < 0 for x in d) / len(d), "tie": sum(x == 0 for x in d) / len(d),
            "right": sum(x > 0 for x in d) / len(d), "n": len(d)}


def overlap(rows: list[dict]) -> dict[str, dict[str, float]]:
    """How often the source label is wrong, tied or right by VADER: single pairs (every i-th chosen against the
    i-th rejected) and the means of the first m of each group (m = 2 .. group_size)."""
    out = {"pairs": quality(rows, "source", 1)}
    for m in range(2, len(rows[0]["chosen"]) + 1):
        first = [{key: r[key][:m] if key != "prompt" else r[key] for key in r} for r in rows]
        out[f"groups of {m}"] = quality(first, "source", m)
    return out


def score(model, tok, s: dict, system: str | None = None) -> dict:
    """Per held-out prompt: the mean VADER of `eval_k` samples, and their mean length in words."""
    _, held_out = chat_prompts(s)
    got = replies(model, tok, held_out, s["eval_k"], s["eval_seed"], s["max_new_tokens"], system)
    return {"vader": [statistics.mean(vader(g)) for g in got],
            "words": [statistics.mean(len(x.split()) for x in g) for g in got]}


def unit_file(folder: Path, name: str, seed: int) -> Path:
    if name == "base":
        return folder / "base.json"
    if name == "data":
        return folder / f"data-seed{seed}.json.gz"
    method, labels = name.split("@")
    return folder / f"seed{seed}-{method}-{labels}.json"


def run_unit(s: dict, folder: Path, name: str, seed: int) -> None:
    """One cached unit: `base` (the start and the better source, scored once), `data` (a seed's training replies)
    or `<method>@<labels>` (a training run)."""
    path = unit_file(folder, name, seed)
    if name == "data":
        make_data(s, seed, folder)
        return
    t0 = time.time()
    if name == "base":
        import torch

        _, model, tok = load_base()
        with torch.no_grad():
            result = {"curve": [{"step": 0, "completions": 0, "train_seconds": 0.0, **score(model, tok, s)}],
                      "better_source": score(model, tok, s, s["better_system"])}
        command = "python examples/reproduce/label_noise_real.py --seeds 0"
    else:
        method, labels = name.split("@")
        _, tok = tokenizer()
        data = [dict(r, prompt=text(tok, r["prompt"])) for r in  # the chat template applied, replies as plain text
                labelled(read_json(unit_file(folder, "data", seed)), labels, METHODS[method][1], seed)]
        result = train_and_score(s, method, seed, data, lambda model, tok: score(model, tok, s))
        result.update(method=method, labels=labels, **({"swap_p": SWAP_P} if labels == "swap" else {}))
        command = f"python examples/reproduce/label_noise_real.py --seeds {seed + 1} --methods {method} " \
                  f"--labels {labels}"
    result.update(name=name, seed=seed, settings=s)
    write_json(path, stamp(result, command, t0))


#: group methods first (a third of a pair method's time), source labels before clean ones, seed by seed
ORDER = ("mDPO", "mIPO", "DPO", "IPO")


def units(seeds: int, methods: list[str], labels: list[str]) -> list[tuple[str, int]]:
    methods = sorted(methods, key=ORDER.index)
    runs = [(f"{m}@{lab}", s) for lab in labels for s in range(seeds) for m in methods]
    return [("base", 0)] + [("data", s) for s in range(seeds)] + runs


def last_change(run: dict) -> float:
    """The change of mean held-out VADER between the last two scored points (0 with one point)."""
    c = run["curve"]
    return statistics.mean(c[-1]["vader"]) - statistics.mean(c[-2]["vader"]) if len(c) > 1 else 0.0


def report(folder: Path, methods: list[str]) -> str:
    runs, data = {}, {}
    for f in sorted(folder.glob("seed*.json")):
        r = json.loads(f.read_text())
        runs[(r["method"], r["labels"], r["seed"])] = r
    for f in sorted(folder.glob("data-seed*.json.gz")):
        data[int(f.name[len("data-seed"):].split(".")[0])] = read_json(f)
    base = read_json(folder / "base.json") if (folder / "base.json").exists() else None
    lines = [f"results: {folder} ({len(runs)} runs; data of seeds {sorted(data)})", ""]
    if data:
        per = [overlap(rows) for rows in data.values()]
        lines += ["### the labels against VADER on the training replies (mean over seeds): by source, then by random "
                  "swaps", "",
                  "| comparison | n per seed | wrong | tied | right |", "|---|---|---|---|---|"]
        for key in per[0]:
            cells = [f"{statistics.mean(q[key][c] for q in per):.3f}" for c in ("wrong", "tie", "right")]
            lines.append(f"| {key} | {per[0][key]['n']} | {' | '.join(cells)} |")
        k = len(next(iter(data.values()))[0]["chosen"])
        for m, key in ((1, "pairs"), (k, f"groups of {k}")):  # the random-swap form, on the same replies
            q = [quality(rows, "swap", m, seed) for seed, rows in data.items()]
            cells = [f"{statistics.mean(x[c] for x in q):.3f}" for c in ("wrong", "tie", "right")]
            lines.append(f"| {key}, random swaps ({SWAP_P:g}) after VADER | {q[0]['n']} | {' | '.join(cells)} |")
        lines.append("")
    lines += ["### mean VADER of held-out samples, 95% bootstrap intervals over seeds and prompts", "",
              "| method | labels | VADER | words | seeds | still moving at the end |", "|---|---|---|---|---|---|"]
    if base:
        b = base["curve"][0]
        lines.append(f"| SmolLM2 (start, the worse source) | | {statistics.mean(b['vader']):.3f} | "
                     f"{statistics.mean(b['words']):.1f} | | |")
        lines.append(f"| the better source (system prompt) | | {statistics.mean(base['better_source']['vader']):.3f} | "
                     f"{statistics.mean(base['better_source']['words']):.1f} | | |")
    seeds = sorted({s for _, _, s in runs})
    for lab in LABELS:
        for m in methods:
            got = [runs[(m, lab, s)] for s in seeds if (m, lab, s) in runs]
            if got:
                moving = " ".join(f"{last_change(r):+.3f}" for r in got if len(r["curve"]) > 1)
                lines.append(f"| {m} | {lab} | {fmt(*bootstrap([point(r)['vader'] for r in got]))} | "
                             f"{statistics.mean(statistics.mean(point(r)['words']) for r in got):.1f} | {len(got)} | "
                             f"{moving} |")
    lines += ["", "### win rates by per-prompt mean VADER (ties half), 95% bootstrap intervals", "",
              "| comparison | thesis | equal completions | equal training time | verdict |", "|---|---|---|---|---|"]
    comparisons = [((g, lab), (p, lab)) for lab in LABELS for g, p in (("mDPO", "DPO"), ("mIPO", "IPO"))]
    comparisons += [((m, noisy), (m, "vader")) for noisy in ("source", "swap") for m in methods]
    for x, y in comparisons:
        cols = []
        # noisy against clean labels is one method against itself, at the same cost: equal time says nothing new
        for timed in (False, True) if x[0] != y[0] else (False,):
            per_seed = []
            for s in seeds:
                if (*x, s) in runs and (*y, s) in runs:
                    px = point(runs[(*x, s)])
                    py = point(runs[(*y, s)], px["train_seconds"] if timed else None)
                    per_seed.append([win(u, v) for u, v in zip(px["vader"], py["vader"])])
            cols.append(bootstrap(per_seed) if per_seed else None)
        if cols[0] is None:
            continue
        (_, lo, hi), n = cols[0], len(per_seed)
        moving = any(abs(last_change(runs[(*u, s)])) > MOVING for u in (x, y) for s in seeds if (*u, s) in runs)
        if x[1] != y[1]:
            claim, thesis_cell = f"{x[0]}, {x[1]} vs vader labels", "below 0.5, less so for groups"
            shown = verdict(lo, hi, THESIS_NOISY_VS_CLEAN, n, moving)
        elif THESIS[x[1]] != 0.5:
            claim, thesis_cell = f"{x[0]} vs {y[0]}, {x[1]} labels", "above 0.5"
            shown = verdict(lo, hi, THESIS[x[1]], n, moving)
        else:  # clean labels: the thesis finds no advantage for groups, pairs even a little better
            claim, thesis_cell = f"{x[0]} vs {y[0]}, {x[1]} labels", "0.5 or below"
            shown = verdict(lo, hi, 0.4, n, moving)
            if n >= 3 and lo <= 0.5 <= hi:
                shown = shown.replace("inconclusive at this scale (the interval holds 0.5)",
                                      "reproduced (no advantage for groups: the interval holds 0.5)")
        timed_cell = fmt(*cols[1]) if len(cols) > 1 and cols[1] else ""
        lines.append(f"| {claim} | {thesis_cell} | {fmt(*cols[0])} | {timed_cell} | {shown} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    def add_arguments(p):
        p.add_argument("--methods", nargs="+", default=["DPO", "mDPO"], choices=list(METHODS))
        p.add_argument("--labels", nargs="+", default=list(LABELS), choices=LABELS)

    return study_main(argv, doc=__doc__, name="label_noise", script=__file__, settings=SETTINGS, quick=QUICK,
                      unit_file=unit_file, run_unit=run_unit, plan=lambda a, s: units(a.seeds, a.methods, a.labels),
                      report=lambda folder, a, s: report(folder, a.methods), add_arguments=add_arguments)


if __name__ == "__main__":
    sys.exit(main())
