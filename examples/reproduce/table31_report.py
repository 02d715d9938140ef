"""Tables of thesis Table 3.1 at scale from the cached results of table31_real.py: scores with bootstrap intervals,
win rates at equal completions and at equal training time, curves, and a verdict per row."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import bootstrap, fmt, point, verdict, win  # noqa: E402,F401  (bootstrap, verdict: tests use them here)

THESIS = {("mIPO", "IPO"): 0.95, ("mDPO", "DPO"): 0.80, ("mIPO", "base"): 0.99, ("IPO", "base"): 0.98,
          ("mDPO", "base"): 0.99, ("DPO", "base"): 0.99}


def load(folder: Path) -> dict:
    runs = {}
    for f in sorted(folder.glob("*.json")):
        if f.name != "settings.json":
            r = json.loads(f.read_text())
            runs[(r["method"], r["seed"])] = r
    return runs


#: a change of mean normalised entropy between the last two scored points above this counts as "still moving"
MOVING = 0.02


def still_moving(run: dict, part: str) -> float:
    c = run["curve"]
    if len(c) < 2:
        return 0.0
    return statistics.mean(c[-1][part]["normalized_entropy"]) - statistics.mean(c[-2][part]["normalized_entropy"])


def report(folder: Path, methods: list[str], pairs: list[tuple[str, str]]) -> str:
    runs = load(folder)
    if not runs:
        return f"no results in {folder} yet"
    seeds = sorted({s for m, s in runs if m != "base"})
    base = runs.get(("base", 0))
    lines = [f"results: {folder} ({len(runs)} runs; seeds {seeds})", ""]
    for part in ("inside", "outside"):
        lines += [f"### held-out widths {part} the training widths", "",
                  "| method | normalised entropy | in-range mass | `a` the mode | seeds | still moving at the end |",
                  "|---|---|---|---|---|---|"]
        if base:
            b = base["curve"][0][part]
            lines.append(f"| SmolLM2 (start) | {statistics.mean(b['normalized_entropy']):.2f} | "
                         f"{statistics.mean(b['in_range_mass']):.2f} | {statistics.mean(b['low_is_mode']):.2f} | | |")
        for m in methods:
            got = [runs[(m, s)] for s in seeds if (m, s) in runs]
            if not got:
                continue
            cells = [fmt(*bootstrap([point(r)[part][key] for r in got])) for key in
                     ("normalized_entropy", "in_range_mass", "low_is_mode")]
            moving = [f"{still_moving(r, part):+.3f}" for r in got]
            lines.append(f"| {m} | {' | '.join(cells)} | {len(got)} | {' '.join(moving)} |")
        lines.append("")
    lines += ["### win rates by normalised entropy (ties half), 95% bootstrap intervals over seeds and prompts", "",
              "| comparison | held-out widths | thesis | equal completions | equal training time | verdict |",
              "|---|---|---|---|---|---|"]
    for x, y in pairs:
        for part in ("inside", "outside"):
            cols = []
            for timed in (False, True):
                per_seed = []
                for s in seeds:
                    if (x, s) not in runs or (y != "base" and (y, s) not in runs) or (y == "base" and not base):
                        continue
                    px = point(runs[(x, s)])
                    if y == "base":
                        py = base["curve"][0]
                    else:
                        py = point(runs[(y, s)], px["train_seconds"] if timed else None)
                    per_seed.append([win(u, v) for u, v in zip(px[part]["normalized_entropy"],
                                                               py[part]["normalized_entropy"])])
                cols.append(bootstrap(per_seed) if per_seed else None)
            if cols[0] is None:
                continue
            shown = [fmt(*c) if c else "" for c in cols]
            if y == "base":
                shown[1] = "(the start)"
            moving = any(abs(still_moving(runs[(m, s)], part)) > MOVING for s in seeds for m in (x, y)
                         if (m, s) in runs)
            lines.append(f"| {x} vs {y} | {part} | {THESIS[(x, y)]:.2f} | {shown[0]} | {shown[1]} | "
                         f"{verdict(cols[0][1], cols[0][2], THESIS[(x, y)], len(per_seed), moving)} |")
    return "\n".join(lines) + "\n"
