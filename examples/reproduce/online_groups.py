"""Online groups: online mIPO and mDPO against our PPO and TRL's GRPOTrainer at the same number of generated
completions, and online mIPO scored by a vanilla against a causal reward model on sycophancy.

Not a thesis figure: the thesis' three methods in one loop (`OnlineMultiSampleTrainer`, docs/methods.md section 2).

**Part 1, reward against divergence.** The built-in sentiment task (reward = praising minus panning words,
`alignkit.rewards.sentiment`, the ground truth), the tiny Llama after a short SFT on both sides of the pairs (the
neutral start of examples/reproduce/fdpo_frontier.py; also the reference). Every method generates 32 completions
of at most 24 tokens per round, for the same number of rounds:

* online mIPO and online mDPO (`OnlineMultiSampleTrainer`, on TRL's GRPO engine; reverse KL, beta 0.1): 8 prompts
  x 4 samples, the best and the worst of each prompt as chosen / rejected, one update per round;
* our `PPOTrainer`: 32 prompts x 1 sample, a value model from the start, 4 PPO epochs per round, `kl_coef` 0.05;
* TRL's `GRPOTrainer` (TRL's defaults otherwise: `beta` 0, i.e. no reference in the loss; `loss_type` dapo):
  8 prompts x 4 samples, one update per round.

Checkpoints at each quarter of training are scored by `alignkit.metrics.evaluate` on held-out prompts: mean
reward of the samples and the estimated reverse KL (and JSD) from the start. Same learning rate for all.

**Part 2, sycophancy.** Two reward models on `builtin:sycophancy` (tiny Llama, 200 steps, as
benchmarks/crm_bias.py): vanilla, and the unconditional causal reward model (`mmd_coef` 3; it removes the shortcut
there: test_anti 0.04 -> 0.69 over 3 seeds, README). The policy starts from the SFT reference of
examples/reproduce/causal_dpo.py (flatters about half the time) and trains with online mIPO on each reward model.
Measured: the flattery rate of the policy's samples (4 samples for each of 100 test prompts; "you are right" in the
sample), against the reference's.

    python examples/reproduce/online_groups.py --threads 1   # full form: 40 rounds, 2 seeds for part 2, ~6 min
    python examples/reproduce/online_groups.py --quick       # CI-sized (tests/test_reproduce.py)

Status (full form, 226 s on 2 shared cores; docs/results.md, "Online groups"): at equal completions our PPO reaches
the most reward (2.8 after 1280 completions); online mDPO stays near the reference (1.1 at 2.9 nats), online mIPO
drifts (1.7 at 65 nats); one seed, and an earlier run on the former engine ranked mIPO and mDPO the other way. On
sycophancy, online mIPO on the vanilla reward model flatters in 0.98 of samples, on the causal one in 0.44 (seeds
0 / 1: 0.003 / 0.87; reference 0.50).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from _common import checkpoints, count, positive, pyplot, sentiment_sft_rows, setup, sft, write_table  # noqa: E402

METHODS = ("online mIPO", "online mDPO", "PPO", "TRL GRPO")
#: --quick trains these
QUICK_METHODS = METHODS[:4]
#: completions per round, and samples per prompt for the group methods
COMPLETIONS, GROUP = 32, 4
RESPONSE_LENGTH = 24


def _common_args(run: Path, rounds: int, lr: float, seed: int, points: int) -> dict:
    every = max(rounds // points, 1)
    return dict(output_dir=str(run), learning_rate=lr, lr_scheduler_type="constant", max_steps=rounds,
                save_strategy="steps", save_steps=every, save_only_model=True, logging_steps=every, report_to=[],
                disable_tqdm=True, seed=seed, bf16=False)


def train(method: str, start: str, out: Path, rounds: int, lr: float, seed: int = 0, reward=None,
          prompts=None, points: int = 4) -> Path:
    """Train `method` from `start` (also the reference) for `rounds` rounds of COMPLETIONS generated completions,
    with `points` checkpoints along the way. `reward`: a reward function or a sequence-classification model
    (default: the sentiment rule); `prompts`: a dataset with a `prompt` column (default: sentiment train
    prompts)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from alignkit import OnlineMultiSampleConfig, OnlineMultiSampleTrainer, PPOConfig, PPOTrainer
    from alignkit.data.synthetic import sentiment
    from alignkit.rewards import sentiment as sentiment_reward

    reward = reward if reward is not None else sentiment_reward
    prompts = prompts if prompts is not None else sentiment("train", num_samples=512).select_columns(["prompt"])
    run = out / method.lower().replace(" ", "-")
    tok = AutoTokenizer.from_pretrained(start)
    policy = AutoModelForCausalLM.from_pretrained(start)
    common = _common_args(run, rounds, lr, seed, points)
    if method.startswith("online"):
        # on TRL's GRPO engine: per_device_train_batch_size counts completions (8 prompts x 4), and the reference is
        # loaded from the policy's folder (`start`)
        args = OnlineMultiSampleConfig(**common, per_device_train_batch_size=COMPLETIONS, num_generations=GROUP,
                                       loss_type="ipo" if "mIPO" in method else "sigmoid", beta=0.1,
                                       max_completion_length=RESPONSE_LENGTH, use_cpu=True)
        extra = {"reward_processing_classes": tok} if isinstance(reward, torch.nn.Module) else {}
        OnlineMultiSampleTrainer(model=policy, args=args, processing_class=tok, reward_funcs=[reward],
                                 train_dataset=prompts, **extra).train()
    elif method == "PPO":
        args = PPOConfig(**common, per_device_train_batch_size=COMPLETIONS, num_ppo_epochs=4, kl_coef=0.05,
                         response_length=RESPONSE_LENGTH, stop_token="eos")
        PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=copy.deepcopy(policy),
                   reward_model=reward, train_dataset=prompts,
                   value_model=AutoModelForSequenceClassification.from_pretrained(start, num_labels=1)).train()
    elif method == "TRL GRPO":
        from trl import GRPOConfig, GRPOTrainer

        # TRL counts completions in per_device_train_batch_size: 32 completions = 8 prompts x 4
        args = GRPOConfig(**common, per_device_train_batch_size=COMPLETIONS, num_generations=GROUP,
                          max_completion_length=RESPONSE_LENGTH, use_cpu=True)
        extra = {"reward_processing_classes": tok} if isinstance(reward, torch.nn.Module) else {}
        GRPOTrainer(model=policy, reward_funcs=reward, args=args, train_dataset=prompts, processing_class=tok,
                    **extra).train()
    else:
        raise ValueError(f"unknown method {method!r}; one of {', '.join(METHODS)}")
    return run


def point(model: str, start: str, prompts, k: int) -> dict:
    from alignkit.metrics.evaluate import evaluate
    from alignkit.rewards import sentiment as sentiment_reward

    rep = evaluate(model, prompts, ref=start, k=k, max_new_tokens=RESPONSE_LENGTH, temperature=1.0,
                   reward_function=sentiment_reward)
    samples = rep["samples"]
    reward = sentiment_reward([s["prompt"] for s in samples], [s["completion"] for s in samples])
    return {"reward": sum(reward) / len(reward), "reverse_kl": rep["divergence"]["reverse_kl"],
            "jsd": rep["divergence"]["jsd"]}


def frontier(out: Path, rounds: int, sft_steps: int, n_prompts: int, k: int, lr: float, methods,
             points: int) -> list[dict]:
    from alignkit.data.synthetic import sentiment

    start = sft(sentiment_sft_rows(), out, sft_steps)
    prompts = sentiment("test", num_samples=n_prompts).select_columns(["prompt"])
    rows = [{"method": "SFT (reference)", "round": 0, "completions": 0, **point(start, start, prompts, k)}]
    print(rows[-1], flush=True)
    for method in methods:
        t0 = time.time()
        run = train(method, start, out, rounds, lr, points=points)
        seconds = time.time() - t0
        for step, ckpt in checkpoints(run):
            rows.append({"method": method, "round": step, "completions": step * COMPLETIONS,
                         **point(ckpt, start, prompts, k), "train_seconds": seconds})
            print(rows[-1], flush=True)
    return rows


def plot(rows: list[dict], out: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    styles = {"online mIPO": ("o", "#C44E52"), "online mDPO": ("D", "#DD8452"), "PPO": ("s", "#4C72B0"),
              "TRL GRPO": ("^", "#55A868")}
    for method, (marker, color) in styles.items():
        pts = [r for r in rows if r["method"] == method]
        if pts:
            ax.plot([r["reverse_kl"] for r in pts], [r["reward"] for r in pts], marker=marker, color=color,
                    label=method)
    ax.axhline(rows[0]["reward"], color="#999999", ls="--", lw=1, label="SFT")
    ax.set_xscale("symlog", linthresh=0.1)
    ax.set_xlabel("estimated KL(policy || SFT)")
    ax.set_ylabel("mean reward of samples")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "online_groups.png", dpi=100)


def sycophancy_part(out: Path, seeds: int, rm_steps: int, rounds: int, lr: float, n_prompts: int) -> list[dict]:
    """Online mIPO from the flattering SFT reference, scored by a vanilla and by a causal reward model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignkit.data.synthetic import sycophancy
    from causal_dpo import _reference, flattery_rate
    from crm_bias import train_and_score

    rows = []
    for seed in range(seeds):
        start = out / f"syc-seed{seed}" / "sft" / "final"
        if not start.exists():
            _reference(out / f"syc-seed{seed}", seed)
        tok = AutoTokenizer.from_pretrained(start)
        prompts = [r["prompt"] for r in sycophancy("test", seed=seed, num_samples=n_prompts)]
        train_prompts = sycophancy("train", seed=seed).select_columns(["prompt"])
        ref_rate = flattery_rate(AutoModelForCausalLM.from_pretrained(start), tok, prompts)
        for variant in ("vanilla", "unconditional"):
            scores, rm_trainer = train_and_score("sycophancy", variant, rm_steps, seed,
                                                 output_dir=str(out / f"rm-{variant}-{seed}"), return_trainer=True)
            rm = rm_trainer.model.eval()
            run = train("online mIPO", str(start), out / f"syc-{variant}-{seed}", rounds, lr, seed=seed, reward=rm,
                        prompts=train_prompts, points=1)
            final = checkpoints(run)[-1][1]
            rows.append({"seed": seed, "reward model": variant, "rm test_anti": scores["test_anti"],
                         "reference flattery": ref_rate,
                         "policy flattery": flattery_rate(AutoModelForCausalLM.from_pretrained(final), tok, prompts)})
            print(rows[-1], flush=True)
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CI-sized: fewer rounds, prompts and steps, one seed")
    p.add_argument("--output", default="outputs/reproduce/online_groups")
    p.add_argument("--lr", type=positive, default=5e-4, help="learning rate of every policy method")
    p.add_argument("--rounds", type=count, default=None, help="rounds of 32 generated completions (default 40; 4 "
                                                            "with --quick)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=None,
                   help="default: all (the first four with --quick)")
    p.add_argument("--seeds", type=count, default=None, help="seeds of part 2 (default 2; 1 with --quick)")
    p.add_argument("--skip-sycophancy", action="store_true")
    p.add_argument("--threads", type=count, default=None)
    a = p.parse_args(argv)
    setup(a.threads)
    out = Path(a.output)
    if a.quick:
        rounds, sft_steps, n_prompts, k, seeds, rm_steps, syc_prompts, points = (a.rounds or 4, 60, 8, 4,
                                                                                 a.seeds or 1, 40, 10, 1)
    else:
        rounds, sft_steps, n_prompts, k, seeds, rm_steps, syc_prompts, points = (a.rounds or 40, 400, 32, 8,
                                                                                 a.seeds or 2, 200, 100, 4)
    t0 = time.time()
    methods = a.methods or list(QUICK_METHODS if a.quick else METHODS)
    rows = frontier(out, rounds, sft_steps, n_prompts, k, a.lr, methods, points)
    md = write_table(rows, ["method", "round", "completions", "reward", "reverse_kl", "jsd"], out)
    plot(rows, out)
    print(md)
    result = {"rows": rows}
    if not a.skip_sycophancy:
        syc = sycophancy_part(out, seeds, rm_steps, rounds, a.lr, syc_prompts)
        summary = []
        for variant in ("vanilla", "unconditional"):
            mine = [r for r in syc if r["reward model"] == variant]
            summary.append({"reward model": variant,
                            "rm test_anti": statistics.mean(r["rm test_anti"] for r in mine),
                            "reference flattery": statistics.mean(r["reference flattery"] for r in mine),
                            "policy flattery": statistics.mean(r["policy flattery"] for r in mine),
                            "per seed": " / ".join(f"{r['policy flattery']:.3f}" for r in mine)})
        print(write_table(summary, ["reward model", "rm test_anti", "reference flattery", "policy flattery",
                                    "per seed"], out, name="sycophancy"))
        result.update(sycophancy=syc, sycophancy_summary=summary)
    print(f"{time.time() - t0:.0f} s", flush=True)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
