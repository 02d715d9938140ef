"""Reproduction on a real model: multi-sample preference optimisation against SmolLM2's own random-number bias
(thesis 3.6.1, Table 3.1).

`builtin:smollm2-135m-instruct` (a real pretrained instruct model) is asked "Give me a random integer between a and
b." with its reply begun as "Here is a random integer between a and b:". It is strongly biased: it mostly answers
`a` itself. As in the thesis, the chosen side is uniform draws from [a, b] and the rejected side is the model's
own samples (here sampled from SmolLM2 itself before training), 4 each per prompt:

* **mDPO / mIPO** (unbiased) train on the groups of 4 (shared_prefix: the prompt is run once per group);
* **DPO / IPO** train on the same completions cut into 4 pairs per prompt (groups of one are exactly TRL's DPO and
  IPO, as the tests show).

Same LoRA adapter, beta, learning rate, NLL weight on the chosen side (the thesis adds it), steps and completions per
step for all four. Evaluation on 100 held-out prompts (interval widths outside the training widths [5, 10]):
`k` samples per prompt; per prompt the entropy of the sampled numbers (`metrics.number_uniformity`); the fraction
of valid answers (an integer in [a, b]); "A vs B" is the fraction of prompts where A's entropy is higher (ties half).

    python examples/reproduce/random_numbers_real.py --threads 1 --jobs 2   # full form (make reproduce-real)
    python examples/reproduce/random_numbers_real.py --quick                # a smoke run of the real model
    python examples/reproduce/random_numbers_real.py --jobs 2 --label-noise 0.3 --methods DPO mDPO \
        --output outputs/reproduce/random_numbers_real_noise                  # thesis 3.6.4: per-pair label noise

With `--label-noise p` each (chosen, rejected) pair of a prompt is swapped with probability p before training (the
same swaps for every method); the table reports the measured fraction of wrong pairs and of wrong or tied groups.

Figures and their command: docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (count, nonnegative, positive, probability, pyplot, sample_groups, setup, whole,  # noqa: E402
                    write_table)

MODEL = "builtin:smollm2-135m-instruct"
METHODS = {"DPO": ("sigmoid", 1), "IPO": ("ipo", 1), "mDPO": ("sigmoid", 4), "mIPO": ("ipo", 4)}
COMPARISONS = [("mIPO", "IPO"), ("mDPO", "DPO"), ("mIPO", "base"), ("IPO", "base"), ("mDPO", "base"), ("DPO", "base")]
HIGH = 100


def prompt_text(tok, a: int, b: int) -> str:
    """The chat prompt with the assistant's reply begun, so that the answer is a number and nothing else."""
    user = [{"role": "user", "content": f"Give me a random integer between {a} and {b}."}]
    return tok.apply_chat_template(user, add_generation_prompt=True, tokenize=False) + \
        f"Here is a random integer between {a} and {b}:"


def intervals(split: str, n: int, seed: int) -> list[tuple[int, int]]:
    """Train: widths 5-10; test: held-out widths (the built-in random-number task's intervals, in [0, 100])."""
    from alignkit.data.synthetic import random_numbers

    ds = random_numbers(split, num_samples=n, seed=seed, high=HIGH)
    return list(zip(ds["low"], ds["high"]))


def score(groups: list[list[str]], bounds: list[tuple[int, int]]) -> tuple[list[float], dict]:
    from alignkit.metrics import first_integer, number_uniformity

    per = [number_uniformity([first_integer(c) for c in g], a, b) for g, (a, b) in zip(groups, bounds)]
    agg = {"entropy": statistics.mean(p["entropy"] for p in per),
           "valid_fraction": 1 - statistics.mean(p["invalid_fraction"] for p in per),
           "answers_a": statistics.mean(sum(first_integer(c) == a for c in g) / len(g)
                                        for g, (a, _) in zip(groups, bounds))}
    return [p["entropy"] for p in per], agg


def load_policy(path: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def preference_data(tok, base, n_prompts: int, seed: int, label_noise: float = 0.0):
    """Chosen: 4 distinct uniform draws from [a, b]; rejected: 4 samples of the base model (its own bias)."""
    import random

    bounds = intervals("train", n_prompts, seed=100 + seed)
    prompts = [prompt_text(tok, a, b) for a, b in bounds]
    # 6 draws per prompt, the first 4 that are not blank (an immediate end of turn is not a completion to train on)
    rejected = [[c for c in g if c.strip()][:4] for g in sample_groups(base, tok, prompts, 6, seed=1000 + seed)]
    keep = [i for i, g in enumerate(rejected) if len(g) == 4]
    prompts, bounds, rejected = [prompts[i] for i in keep], [bounds[i] for i in keep], [rejected[i] for i in keep]
    rng = random.Random(f"chosen-{seed}")
    rows = [{"prompt": p, "chosen": [f" {x}" for x in rng.sample(range(a, b + 1), 4)], "rejected": r}
            for p, (a, b), r in zip(prompts, bounds, rejected)]
    if label_noise:  # per-sample label noise (thesis 3.6.4): the i-th pair swapped with probability label_noise
        flip = random.Random(f"noise-{seed}")
        for r in rows:
            for i in range(4):
                if flip.random() < label_noise:
                    r["chosen"][i], r["rejected"][i] = r["rejected"][i], r["chosen"][i]
                    r["swapped"] = r.get("swapped", 0) + 1
    return rows


def train(name: str, rows: list[dict], base_path: str, out: Path, a, seed: int):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignkit import MultiSampleDPOConfig, MultiSampleDPOTrainer

    loss_type, k = METHODS[name]
    if k == 1:  # the same completions as single-sample pairs: the i-th chosen against the i-th rejected
        rows = [{"prompt": r["prompt"], "chosen": [c], "rejected": [j]}
                for r in rows for c, j in zip(r["chosen"], r["rejected"])]
    args = MultiSampleDPOConfig(
        output_dir=str(out / name), loss_type=loss_type, beta=a.beta, nll_weight=a.nll_weight, learning_rate=a.lr,
        per_device_train_batch_size=a.prompts_per_step * 4 // k,  # the same completions per step for every method
        max_steps=a.steps, lr_scheduler_type="constant", shared_prefix=True, gradient_checkpointing=False,
        report_to=[], save_strategy="no", logging_steps=max(a.steps // 4, 1), disable_tqdm=True, seed=seed)
    tok = AutoTokenizer.from_pretrained(base_path)
    trainer = MultiSampleDPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(base_path), args=args, train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    trainer.train()
    trainer.save_model(str(out / name / "final"))  # the LoRA adapter
    return trainer.model.eval(), tok


def run_seed(a, seed: int) -> dict:
    """Every method for one seed; returns {method: (per-prompt entropies, aggregate)} for the eval prompts."""
    from alignkit.models import resolve_model_path

    out = Path(a.output) / f"seed{seed}"
    base_path = resolve_model_path(MODEL)
    base, tok = load_policy(base_path)
    rows = preference_data(tok, base, a.train_prompts, seed, a.label_noise)
    swapped = [r.pop("swapped", 0) for r in rows]
    noise = {"pairs wrong": sum(swapped) / (4 * len(rows)),
             "groups wrong (3-4 of 4 swapped)": sum(n >= 3 for n in swapped) / len(rows),
             "groups tied (2 of 4)": sum(n == 2 for n in swapped) / len(rows)}
    print(f"seed {seed} label noise: {noise}", flush=True)
    bounds = intervals("test", a.eval_prompts, seed=1)
    prompts = [prompt_text(tok, x, y) for x, y in bounds]
    result = {"noise": noise}
    if seed == 0:
        groups = sample_groups(base, tok, prompts, a.k, seed=seed)
        result["base"] = (*score(groups, bounds), groups)
    for name in a.methods:
        t0 = time.time()
        model, _ = train(name, rows, base_path, out, a, seed)
        groups = sample_groups(model, tok, prompts, a.k, seed=seed)
        ents, agg = score(groups, bounds)
        agg["train_seconds"] = time.time() - t0
        result[name] = (ents, agg, groups)
        print(f"seed {seed} {name}: entropy {agg['entropy']:.3f}, valid {agg['valid_fraction']:.3f}, "
              f"answers a {agg['answers_a']:.3f} ({agg['train_seconds']:.0f} s)", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result))
    return result


def win_rate(x: list[float], y: list[float]) -> float:
    return sum(1.0 if p > q else 0.5 if p == q else 0.0 for p, q in zip(x, y)) / len(x)


def report(a, results: list[dict]) -> dict:
    out = Path(a.output)
    base = results[0]["base"]
    noise = [r.get("noise", {}) for r in results]
    bounds = intervals("test", a.eval_prompts, seed=1)
    method_rows = [{"method": "base (SmolLM2)", "entropy": base[1]["entropy"], "valid_fraction": base[1]["valid_fraction"],
                    "answers a": base[1]["answers_a"], "per seed entropy": f"{base[1]['entropy']:.2f}"}]
    for name in a.methods:
        aggs = [r[name][1] for r in results]
        method_rows.append({"method": name, "entropy": statistics.mean(x["entropy"] for x in aggs),
                            "valid_fraction": statistics.mean(x["valid_fraction"] for x in aggs),
                            "answers a": statistics.mean(x["answers_a"] for x in aggs),
                            "per seed entropy": " ".join(f"{x['entropy']:.2f}" for x in aggs),
                            "per seed valid": " ".join(f"{x['valid_fraction']:.2f}" for x in aggs),
                            "train s": statistics.mean(x["train_seconds"] for x in aggs)})
    win_rows = []
    for x, y in COMPARISONS:
        if x not in a.methods or (y != "base" and y not in a.methods):
            continue
        rates = [win_rate(r[x][0], (results[0] if y == "base" else r)[y][0]) for r in results]
        win_rows.append({"comparison": f"{x} vs {y}", "win rate": statistics.mean(rates),
                         "per seed": " ".join(f"{v:.2f}" for v in rates)})
    md = (f"SmolLM2-135M-Instruct, LoRA r=16, {a.steps} steps of {a.prompts_per_step} prompts x 4 chosen + 4 "
          f"rejected, beta {a.beta}, lr {a.lr}, NLL weight {a.nll_weight}; {a.eval_prompts} held-out prompts, "
          f"k={a.k}; {len(results)} seed(s)")
    if a.label_noise:
        md += (f"; label noise {a.label_noise} (each chosen/rejected pair swapped independently): "
               + "; ".join(f"{k} {statistics.mean(n[k] for n in noise):.3f}" for k in noise[0]))
    md += ":\n\n"
    md += write_table(method_rows, ["method", "entropy", "valid_fraction", "answers a", "per seed entropy",
                                    "per seed valid", "train s"], out, "methods")
    md += "\nWin rate by entropy (thesis Table 3.1, Llama-3-8B: mIPO vs IPO 0.95, mDPO vs DPO 0.80):\n\n"
    md += write_table(win_rows, ["comparison", "win rate", "per seed"], out, "win_rates")
    (out / "table.md").write_text(md)

    # histograms of the answers on a few held-out intervals, before and after (seed 0)
    plt = pyplot()
    show = [i for i, (lo, hi) in enumerate(bounds) if hi - lo <= 20][:3] or [0, 1, 2]
    cols = ["base"] + list(a.methods)
    fig, axes = plt.subplots(len(show), len(cols), figsize=(2.6 * len(cols), 2.0 * len(show)), squeeze=False)
    from alignkit.metrics import first_integer

    for r, i in enumerate(show):
        lo, hi = bounds[i]
        for c, name in enumerate(cols):
            answers = [first_integer(s) for s in (base if name == "base" else results[0][name])[2][i]]
            xs = list(range(lo, hi + 1))
            axes[r][c].bar(xs, [answers.count(x) for x in xs], color="#4C72B0" if name == "base" else "#55A868")
            axes[r][c].set_title(f"{name}: [{lo}, {hi}]", fontsize=8)
            axes[r][c].tick_params(labelsize=6)
    fig.suptitle(f"answers to held-out prompts (k={a.k} each), before and after", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "random_numbers_real.png", dpi=100)
    print(md)
    return {"methods": method_rows, "win_rates": win_rows}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: 2 steps, 2 methods, 8 eval prompts, 1 seed")
    p.add_argument("--output", default="outputs/reproduce/random_numbers_real")
    p.add_argument("--seeds", type=count, default=None, help="seeds (default 2; 1 with --quick)")
    p.add_argument("--seed", type=whole, default=None, help="run only this seed and write its result.json")
    p.add_argument("--jobs", type=count, default=1, help="seeds run in parallel processes (1 torch thread each)")
    p.add_argument("--steps", type=count, default=None)
    p.add_argument("--prompts-per-step", type=count, default=2)
    p.add_argument("--train-prompts", type=count, default=None, help="default: steps x prompts per step")
    p.add_argument("--eval-prompts", type=count, default=None)
    p.add_argument("--k", type=count, default=16, help="samples per eval prompt")
    p.add_argument("--beta", type=positive, default=0.1)
    p.add_argument("--lr", type=positive, default=1e-4)
    p.add_argument("--nll-weight", type=nonnegative, default=1.0)
    p.add_argument("--methods", nargs="+", default=None, choices=list(METHODS))
    p.add_argument("--label-noise", type=probability, default=0.0,
                   help="swap each chosen/rejected pair with this probability (thesis 3.6.4)")
    p.add_argument("--threads", type=count, default=None)
    p.add_argument("--report-only", action="store_true", help="tables and figure from the seeds' result.json")
    a = p.parse_args(argv)
    a.steps = a.steps or (2 if a.quick else 50)
    a.seeds = a.seeds or (1 if a.quick else 2)
    a.eval_prompts = a.eval_prompts or (8 if a.quick else 100)
    a.methods = a.methods or (["DPO", "mIPO"] if a.quick else list(METHODS))
    if a.quick:
        a.k = 4
    a.train_prompts = a.train_prompts or a.steps * a.prompts_per_step
    setup(a.threads)
    if a.seed is not None:
        run_seed(a, a.seed)
        return {"seed": a.seed}
    if a.report_only:
        return report(a, [json.loads((Path(a.output) / f"seed{s}" / "result.json").read_text())
                          for s in range(a.seeds)])
    if a.jobs > 1:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        given, base_args = list(argv if argv is not None else sys.argv[1:]), [sys.executable, __file__]
        while given:
            x = given.pop(0)
            if x == "--jobs" or x == "--threads":
                given.pop(0)
            elif not x.startswith(("--jobs=", "--threads=")):
                base_args.append(x)
        from alignkit.models import resolve_model_path

        resolve_model_path(MODEL)  # convert once, before the workers start
        pending = list(range(a.seeds))
        running = []
        while pending or running:
            while pending and len(running) < a.jobs:
                s = pending.pop(0)
                running.append(subprocess.Popen(base_args + ["--threads", "1", "--seed", str(s)], env=env))
            running[0].wait()
            if running[0].returncode:
                raise SystemExit(f"seed worker failed ({running[0].returncode})")
            running.pop(0)
        results = [json.loads((Path(a.output) / f"seed{s}" / "result.json").read_text()) for s in range(a.seeds)]
    else:
        results = [run_seed(a, s) for s in range(a.seeds)]
    return report(a, results)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
