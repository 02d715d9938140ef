"""Online mDPO / mIPO (OnlineMultiSampleTrainer, on TRL's GRPO engine) over seeds on the tiny task of
tests/test_online.py. Prints, per seed, the reward gain (mean reward over the run's second half minus the mean of its
first 3 steps, as the test measures it), the reverse KL from the reference at the end and the time per step; then
their spread, beside the same figures of the former engine: alignkit's own loop on PPOTrainer, as of commit bd68fa4
(the last with it; `git checkout bd68fa4 -- alignkit` brings it back), measured by this script's first version, which
ran both engines alternately on the same seeds.

    python benchmarks/online_engines.py                    # 8 seeds, about a minute on 2 CPU cores
    python benchmarks/online_engines.py --seeds 3 --steps 12

The task (tests/test_online.py's): the built-in tiny Llama, 8 prompts of builtin:sentiment per iteration, 4 samples of
4 tokens each, reward = how often "e" appears / 4, mIPO (beta 0.1), learning rate 1e-2 constant, 1 torch thread.
"""

from __future__ import annotations

import argparse
import statistics
import time

from _harness import offline_setup

TARGET = "e"


def count_target(prompts=None, completions=None, **_):
    return [c.count(TARGET) / 4 for c in completions]


def gain(scores: list[float]) -> float:
    half = len(scores) // 2
    return sum(scores[-half:]) / half - sum(scores[:3]) / 3


#: the former engine's figures (seeds 0-7, 1 thread; the code of commit bd68fa4, run alternately with this trainer)
FORMER = {"gain": [1.389, 0.803, 2.168, 1.913, 2.269, 1.859, 0.706, 1.737],
          "reverse_kl": [17.310, 16.117, 19.584, 19.377, 20.443, 19.645, 14.236, 18.679], "seconds_per_step": 0.04}


def run(seed: int, steps: int, out: str, learning_rate: float = 1e-2) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignkit import OnlineMultiSampleConfig, OnlineMultiSampleTrainer
    from alignkit.data.synthetic import sentiment
    from alignkit.models import resolve_model_path

    path = resolve_model_path("builtin:tiny-llama")
    tok = AutoTokenizer.from_pretrained(path)
    prompts = sentiment("train", num_samples=64).select_columns(["prompt"])
    args = OnlineMultiSampleConfig(output_dir=out, learning_rate=learning_rate, lr_scheduler_type="constant",
                                   loss_type="ipo", beta=0.1, num_generations=4, max_steps=steps, seed=seed,
                                   report_to=[], save_strategy="no", logging_steps=1, bf16=False, disable_tqdm=True,
                                   per_device_train_batch_size=32, max_completion_length=4)
    torch.manual_seed(seed)
    trainer = OnlineMultiSampleTrainer(model=AutoModelForCausalLM.from_pretrained(path), args=args,
                                       processing_class=tok, reward_funcs=[count_target], train_dataset=prompts)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    logs = [e for e in trainer.state.log_history if "reward" in e and "loss" in e]
    return {"gain": gain([e["reward"] for e in logs]), "reverse_kl": logs[-1]["divergence/reverse_kl"],
            "seconds_per_step": seconds / len(logs)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--learning-rate", type=float, default=1e-2, help="0: a run that learns nothing (the noise)")
    a = p.parse_args(argv)
    offline_setup(a.threads)
    import tempfile

    import transformers

    transformers.logging.set_verbosity_error()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for seed in range(a.seeds):
            r = run(seed, a.steps, f"{d}/{seed}", a.learning_rate)
            rows.append(r)
            print(f"seed {seed}: gain {r['gain']:.3f}, reverse KL {r['reverse_kl']:.3f}, "
                  f"{r['seconds_per_step']:.2f} s/step", flush=True)
    print()
    print("| engine | gain: mean (min-max) | reverse KL at the end: mean (min-max) | s/step (median) |")
    print("|---|---|---|---|")
    g, kl = [r["gain"] for r in rows], [r["reverse_kl"] for r in rows]
    fg, fkl = FORMER["gain"], FORMER["reverse_kl"]
    print(f"| former loop (bd68fa4) | {statistics.mean(fg):.2f} ({min(fg):.2f}-{max(fg):.2f}) | "
          f"{statistics.mean(fkl):.2f} ({min(fkl):.2f}-{max(fkl):.2f}) | {FORMER['seconds_per_step']:.2f} |")
    step = statistics.median(r["seconds_per_step"] for r in rows)
    print(f"| TRL's GRPO engine | {statistics.mean(g):.2f} ({min(g):.2f}-{max(g):.2f}) | {statistics.mean(kl):.2f} "
          f"({min(kl):.2f}-{max(kl):.2f}) | {step:.2f} |")
    print(f"\ntime per step against the former loop's (1.98 when measured alternately): {step / FORMER['seconds_per_step']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
