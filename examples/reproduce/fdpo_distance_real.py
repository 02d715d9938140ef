"""Thesis Table 2.2 and Figure 2.2 on a real model, taken far enough from the start for the divergences to differ:
f-DPO under each divergence and PPO at several `kl_coef`, scored at several distances, over seeds.

Why "far": every f-divergence agrees with the others to second order near the reference, so at 0.5 nats (where the
earlier runs stopped) their policies are the same up to noise. Here each run is scored at `eval_at` steps of
training, so that the table holds every method at three or more distances from the start, measured by the
reverse-KL estimate on held-out samples.

* **Table 2.2**: `alignkit.FDPOTrainer` (LoRA r=16) on the real preference pairs of
  `recipes/real/data/cheerful-smollm2.jsonl` (SmolLM2's own replies, VADER-ranked), under reverse KL, Jensen-Shannon,
  alpha 0.5 and forward KL, with the same beta, learning rate, steps and seed. At each point: VADER, predictive
  entropy, distinct-1/2 and self-BLEU of `eval_k` samples on held-out prompts. The thesis' claim: diversity
  ordered reverse KL < JSD < alpha 0.5 < forward KL, the reward in the opposite order.
* **Figure 2.2**: the reward against the reverse KL spent, f-DPO (reverse-KL link) against `alignkit.PPOTrainer`
  with VADER as its reward (the ground truth the pairs were ranked by) at several `kl_coef`, trained on the chat
  prompts that are neither in the pairs nor held out. The thesis' claim: f-DPO's frontier lies above PPO's. The
  report compares the rewards interpolated at matched reverse KL, seed by seed.

Runs are cached by their settings (docs/results/fdpo_distance/<settings hash>/, one JSON per finished run with its
command, date and versions): interrupt and start again to resume; add seeds with --seeds.

    python examples/reproduce/fdpo_distance_real.py --jobs 2          # the runs (many hours on CPUs; resumable)
    python examples/reproduce/fdpo_distance_real.py --report          # tables from the cached results
    python examples/reproduce/fdpo_distance_real.py --quick           # a smoke run (minutes)
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import (MODEL, ScoreAlong, bootstrap, fmt, load_base, read_json, stamp, study_main,  # noqa: E402
                   t_interval, verdict, write_json)
from fdpo_diversity_real import DATA, held_out_prompts, load_jsonl  # noqa: E402
from fdpo_frontier_real import interpolate  # noqa: E402

DIVERGENCES = {"reverse_kl": ("reverse_kl", None), "jsd": ("jsd", None), "alpha0.5": ("alpha", 0.5),
               "forward_kl": ("forward_kl", None)}
SETTINGS = dict(model=MODEL, beta=0.1, lr=2e-4, batch=4, steps=70, eval_at=[10, 25, 45, 70], lora_r=16,
                ppo_kl_coefs=[0.01, 0.03, 0.1], ppo_lr=5e-4, ppo_batch=8, ppo_steps=60, ppo_eval_at=[10, 25, 40, 60],
                eval_prompts=40, eval_k=4, max_new_tokens=32, eval_seed=0)
QUICK = dict(SETTINGS, steps=4, eval_at=[2, 4], ppo_kl_coefs=[0.05], ppo_steps=2, ppo_eval_at=[1, 2], eval_prompts=3,
             eval_k=2, max_new_tokens=8)
METRICS = ("vader", "entropy", "distinct_1", "distinct_2", "self_bleu", "reverse_kl")
MATCHED_KL = (1.0, 2.0, 3.0)  # nats from the start at which Table 2.2 also compares the divergences
#: the thesis' Table 2.2, least diverse first (its reward in the opposite order)
DIVERSITY_ORDER = ("reverse_kl", "jsd", "alpha0.5", "forward_kl")


def lora(s: dict):
    from peft import LoraConfig

    return LoraConfig(r=s["lora_r"], lora_alpha=2 * s["lora_r"], target_modules="all-linear", task_type="CAUSAL_LM")


def scorer(s: dict, tok, ref):
    """`score(model)`: the held-out figures of the model in training (the reference is SmolLM2 itself)."""
    from alignkit.metrics.evaluate import evaluate

    prompts, _ = held_out_prompts(s["eval_prompts"])

    def score(model) -> dict:
        rep = evaluate(model, prompts, ref=ref, k=s["eval_k"], max_new_tokens=s["max_new_tokens"], temperature=1.0,
                       reward_function="builtin:vader", seed=s["eval_seed"], tokenizer=tok)
        k = s["eval_k"]
        per_prompt = [statistics.mean(x["reward"] for x in rep["samples"][i * k:(i + 1) * k])
                      for i in range(len(prompts))]
        return {"vader_per_prompt": per_prompt, "vader": rep["reward"]["mean"], "entropy": rep["entropy"],
                "distinct_1": rep["distinct_1"], "distinct_2": rep["distinct_2"], "self_bleu": rep.get("self_bleu"),
                "reverse_kl": rep["divergence"]["reverse_kl"]}

    return score


def train_fdpo(s: dict, name: str, seed: int) -> dict:
    import tempfile

    from datasets import Dataset

    from alignkit import FDPOConfig, FDPOTrainer

    path, ref, tok = load_base()
    divergence, alpha = DIVERGENCES[name]
    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in load_jsonl(DATA / "cheerful-smollm2.jsonl")]
    along = ScoreAlong(s["eval_at"], scorer(s, tok, ref), lambda step: step * s["batch"] * 2)
    with tempfile.TemporaryDirectory() as out:
        args = FDPOConfig(output_dir=out, divergence=divergence, alpha=alpha, beta=s["beta"], max_steps=s["steps"],
                          per_device_train_batch_size=s["batch"], learning_rate=s["lr"], lr_scheduler_type="constant",
                          gradient_checkpointing=False, report_to=[], save_strategy="no",
                          logging_steps=max(s["steps"] // 10, 1), disable_tqdm=True, seed=seed)
        trainer = FDPOTrainer(path, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                              callbacks=[along], peft_config=lora(s))
        trainer.train()
    return {"curve": along.curve, "log": [h for h in trainer.state.log_history if "loss" in h]}


def train_ppo(s: dict, kl_coef: float, seed: int) -> dict:
    import tempfile

    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from alignkit import PPOConfig, PPOTrainer
    from alignkit.rewards import vader

    path, ref, tok = load_base()
    _, prompts = held_out_prompts(s["eval_prompts"])
    along = ScoreAlong(s["ppo_eval_at"], scorer(s, tok, ref), lambda step: step * s["ppo_batch"])
    with tempfile.TemporaryDirectory() as out:
        args = PPOConfig(output_dir=out, divergence="reverse_kl", divergence_penalty="reward", kl_coef=kl_coef,
                         learning_rate=s["ppo_lr"], lr_scheduler_type="constant",
                         per_device_train_batch_size=s["ppo_batch"], num_mini_batches=1, num_ppo_epochs=1,
                         response_length=s["max_new_tokens"], temperature=1.0, max_steps=s["ppo_steps"],
                         save_strategy="no", logging_steps=max(s["ppo_steps"] // 10, 1), report_to=[],
                         disable_tqdm=True, seed=seed)
        trainer = PPOTrainer(args=args, processing_class=tok, model=AutoModelForCausalLM.from_pretrained(path),
                             reward_model=vader, peft_config=lora(s), callbacks=[along],
                             value_model=AutoModelForSequenceClassification.from_pretrained(path, num_labels=1),
                             train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]))
        trainer.train()
    return {"curve": along.curve}


def unit_file(folder: Path, name: str, seed: int) -> Path:
    return folder / ("base.json" if name == "base" else f"seed{seed}-{name}.json")


def run_unit(s: dict, folder: Path, name: str, seed: int) -> None:
    """One cached unit: `base` (the start, scored once), `fdpo-<divergence>` or `ppo-<kl_coef>` for one seed."""
    path = unit_file(folder, name, seed)
    t0 = time.time()
    if name == "base":
        import torch

        _, model, tok = load_base()
        with torch.no_grad():
            result = {"curve": [{"step": 0, "completions": 0, "train_seconds": 0.0,
                                 **scorer(s, tok, model)(model)}]}
    elif name.startswith("fdpo-"):
        result = train_fdpo(s, name[len("fdpo-"):], seed)
    else:
        result = train_ppo(s, float(name[len("ppo-"):]), seed)
    result.update(name=name, seed=seed, settings=s)
    write_json(path, stamp(result, f"python examples/reproduce/fdpo_distance_real.py --seeds {seed + 1} "
                                   f"--units {name}", t0))


def all_units(s: dict) -> list[str]:
    return [f"fdpo-{d}" for d in DIVERGENCES] + [f"ppo-{kl:g}" for kl in s["ppo_kl_coefs"]]


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def along(run: dict, start: dict, get, x: float | None):
    """`get(point)` on a run's curve: at its last point (x None), or at reverse KL `x` from the start, interpolated
    from `start` (the base model's point) through the scored points; None where the curve does not reach x."""
    if x is None:
        return get(run["curve"][-1])
    return interpolate([(0.0, get(start))] + [(c["reverse_kl"], get(c)) for c in run["curve"]], x)


def per_prompt_differences(pairs, start: dict, x: float | None) -> list[list[float]]:
    """For each seed's (first, second) runs, the first's VADER minus the second's, prompt by prompt, at `x`."""
    per_seed = []
    for a, b in pairs:
        diffs = []
        for j in range(len(start["vader_per_prompt"])):
            u, v = (along(r, start, lambda c: c["vader_per_prompt"][j], x) for r in (a, b))
            if u is not None and v is not None:
                diffs.append(u - v)
        if diffs:
            per_seed.append(diffs)
    return per_seed


def report(folder: Path, s: dict) -> str:
    runs = {}
    for f in sorted(folder.glob("seed*.json")):
        r = json.loads(f.read_text())
        runs[(r["name"], r["seed"])] = r
    base = read_json(folder / "base.json") if (folder / "base.json").exists() else None
    seeds = sorted({sd for _, sd in runs})
    lines = [f"results: {folder} ({len(runs)} runs; seeds {seeds})", "",
             "### Table 2.2 at each distance: mean over seeds (min-max)", "",
             "| divergence | step | " + " | ".join(METRICS) + " | seeds |", "|---|---|" + "---|" * len(METRICS) + "---|"]
    if base:
        b = base["curve"][0]
        lines.append("| SmolLM2 (start) | 0 | " + " | ".join(f"{b[m]:.3f}" for m in METRICS) + " | |")
    for name in [u for u in all_units(s) if u.startswith("fdpo-")] + [u for u in all_units(s)
                                                                          if u.startswith("ppo-")]:
        got = [runs[(name, sd)] for sd in seeds if (name, sd) in runs]
        for i in range(len(got[0]["curve"]) if got else 0):
            cells = [spread([r["curve"][i][m] for r in got]) for m in METRICS]
            lines.append(f"| {name} | {got[0]['curve'][i]['step']} | " + " | ".join(cells) + f" | {len(got)} |")
    if base:  # the divergences reach different distances in the same steps: compare them at equal distance too
        shown = [m for m in METRICS if m != "reverse_kl"]
        lines += ["", "### Table 2.2 at matched reverse KL: each metric on a run's curve (from the start) at "
                  f"{', '.join(f'{x:g}' for x in MATCHED_KL)} nats, mean over seeds (min-max)", "",
                  "| divergence | reverse KL | " + " | ".join(shown) + " | seeds |",
                  "|---|---|" + "---|" * len(shown) + "---|"]
        for name in [u for u in all_units(s) if u.startswith("fdpo-")]:
            got = [runs[(name, sd)] for sd in seeds if (name, sd) in runs]
            for x in MATCHED_KL:
                at = {m: [v for v in (interpolate([(0.0, b[m])] + [(c["reverse_kl"], c[m]) for c in r["curve"]], x)
                                      for r in got) if v is not None] for m in shown}
                if all(at.values()):
                    lines.append(f"| {name} | {x:g} | " + " | ".join(spread(at[m]) for m in shown)
                                 + f" | {len(at[shown[0]])} |")
    if not base:
        return "\n".join(lines) + "\n"
    b = base["curve"][0]
    lines += ["", "### Table 2.2 verdicts: the thesis orders entropy reverse KL < JSD < alpha 0.5 < forward KL and "
              "VADER the other way; each neighbour pair at the last step and at matched reverse KL", "",
              "| pair | at | entropy, second minus first: 95% t-interval over seeds | verdict | VADER, first minus "
              "second: 95% bootstrap over seeds and prompts | verdict |", "|---|---|---|---|---|---|"]
    for first, second in zip(DIVERSITY_ORDER, DIVERSITY_ORDER[1:]):
        pairs = [(runs[(f"fdpo-{first}", sd)], runs[(f"fdpo-{second}", sd)]) for sd in seeds
                 if (f"fdpo-{first}", sd) in runs and (f"fdpo-{second}", sd) in runs]
        for x in (None, *MATCHED_KL) if pairs else ():
            ends = [[along(r, b, lambda c: c["entropy"], x) for r in pair] for pair in pairs]
            ent = [more - less for less, more in ends if less is not None and more is not None]
            vad = per_prompt_differences(pairs, b, x)
            if not ent or not vad:
                continue
            e, v = t_interval(ent), bootstrap(vad)
            where = f"step {pairs[0][0]['curve'][-1]['step']}" if x is None else f"reverse KL {x:g}"
            lines.append(f"| {first} < {second} | {where} | {fmt(*e)} | {verdict(e[1], e[2], 1, len(ent), False, 0)} "
                         f"| {fmt(*v)} | {verdict(v[1], v[2], 1, len(vad), False, 0)} |")
    lines += ["", "### Figure 2.2: f-DPO (reverse KL) minus PPO in mean VADER at matched reverse KL, per seed", "",
              "| PPO kl_coef | reverse KL | f-DPO minus PPO, 95% bootstrap over seeds and prompts | seeds | verdict |",
              "|---|---|---|---|---|"]
    for kl in s["ppo_kl_coefs"]:
        name = f"ppo-{kl:g}"
        pairs = [(runs[("fdpo-reverse_kl", sd)], runs[(name, sd)]) for sd in seeds
                 if ("fdpo-reverse_kl", sd) in runs and (name, sd) in runs]
        if not pairs:
            continue
        reach = min(max(c["reverse_kl"] for c in r["curve"]) for pair in pairs for r in pair)
        for x in (reach * f for f in (0.33, 0.67, 1.0)):
            per_seed = per_prompt_differences(pairs, b, x)
            if per_seed:
                m, lo, hi = bootstrap(per_seed)
                lines.append(f"| {kl:g} | {x:.2f} | {fmt(m, lo, hi)} | {len(per_seed)} | "
                             f"{verdict(lo, hi, 1, len(per_seed), False, 0)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    names = sorted(set(all_units(SETTINGS) + all_units(QUICK)))
    return study_main(
        argv, doc=__doc__, name="fdpo_distance", script=__file__, settings=SETTINGS, quick=QUICK, unit_file=unit_file,
        run_unit=run_unit, report=lambda folder, a, s: report(folder, s),
        plan=lambda a, s: [("base", 0)] + [(n, sd) for sd in range(a.seeds) for n in a.units or all_units(s)],
        add_arguments=lambda p: p.add_argument("--units", nargs="+", default=None, choices=names,
                                               help="which runs (default all)"))


if __name__ == "__main__":
    sys.exit(main())
