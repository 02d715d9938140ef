"""Where a PPO iteration's time goes: generation, no-grad forwards, reward scoring, optimisation.

PPOTrainer times each part of every iteration (logged as `time/*`); this script trains a few iterations
and prints the mean split, leaving the first `--warmup` out. Defaults: the built-in small Llama (4 x 256)
as policy, reference and value model, a reward model of the same shape, 16 prompts per iteration,
responses of 32 tokens, 4 PPO epochs, reverse KL in the reward.

    python benchmarks/ppo_profile.py                      # about a minute on 2 CPU cores
    python benchmarks/ppo_profile.py --model /path/to/model --response-length 128 --bf16
    python benchmarks/ppo_profile.py --zero               # also 2 processes: DDP, ZeRO-2, ZeRO-3 (gathered and
                                                          # sharded generation), same global batch

Under ZeRO-3, `gather` is the part of generation spent gathering the policy's weights and sharding them again
(`ds3_gather_for_generation: true`); with `false` the policy generates from the shards, every forward gathering
each layer's weights collectively.
"""

from __future__ import annotations

import argparse
import statistics
import sys

from _harness import cuda, offline_setup

PARTS = ("generation", "gather", "forward", "scoring", "optimisation")
#: 2-process modes of --zero: (label, deepspeed stage or None for plain DDP, ds3_gather_for_generation)
MODES = {"ddp": (None, True), "zero2": ("zero2", True), "zero3": ("zero3", True), "zero3_sharded_gen": ("zero3", False)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterations", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--response-length", type=int, default=32)
    p.add_argument("--ppo-epochs", type=int, default=4)
    p.add_argument("--divergence", default="reverse_kl")
    p.add_argument("--divergence-penalty", default="reward", choices=["reward", "loss"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", default=None, help="model folder (default: builtin small-llama, 4 layers x 256)")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--zero", action="store_true", help="also profile 2 processes: DDP, ZeRO-2, ZeRO-3 (both generations)")
    p.add_argument("--mode", choices=list(MODES), help=argparse.SUPPRESS)  # inside the launched processes
    a = p.parse_args(argv)
    if a.zero and a.mode is None:
        main([x for x in (argv if argv is not None else sys.argv[1:]) if x != "--zero"])
        return _launch_modes(a, argv if argv is not None else sys.argv[1:])
    offline_setup(a.threads)
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from alignkit import PPOConfig, PPOTrainer
    from alignkit.data.synthetic import sentiment
    from alignkit.models import build_tiny_model

    transformers.logging.set_verbosity_error()
    path = a.model or str(build_tiny_model("small-llama"))
    dtype = torch.bfloat16 if a.bf16 else torch.float32
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    value = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype)
    reward = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype)
    common = dict(output_dir="/tmp/alignkit-bench-ppo", per_device_train_batch_size=a.batch_size,
                  num_ppo_epochs=a.ppo_epochs, response_length=a.response_length, temperature=1.0,
                  max_steps=a.iterations, logging_steps=1, report_to=[], save_strategy="no", disable_tqdm=True,
                  divergence=a.divergence, divergence_penalty=a.divergence_penalty, bf16=a.bf16, seed=0,
                  num_sample_generations=0)
    world = 1
    if a.mode is not None:  # one of 2 launched processes: half the global batch each, set up as alignkit train does
        import os
        import types

        from alignkit.run.launch import prepare_worker

        world = int(os.environ["WORLD_SIZE"])
        stage, gather = MODES[a.mode]
        common.update(per_device_train_batch_size=a.batch_size // world, ds3_gather_for_generation=gather)
        section = types.SimpleNamespace(mixed_precision="bf16" if a.bf16 else "no", deepspeed=stage,
                                        offload_optimizer=False, offload_params=False)
        common = prepare_worker(section, common)
    args = PPOConfig(**common)
    prompts = sentiment("train", num_samples=a.batch_size * a.iterations).select_columns(["prompt"])
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                         value_model=value, train_dataset=prompts)
    trainer.train()
    if not trainer.is_world_process_zero():
        return 0
    logs = [e for e in trainer.state.log_history if "time/generation" in e][a.warmup:]
    if not logs:
        sys.exit("no iterations left after --warmup; raise --iterations")
    mean = {k: statistics.mean(e[f"time/{k}"] for e in logs) for k in PARTS}
    total = sum(v for k, v in mean.items() if k != "gather")  # gather is inside generation
    where = f"{world} processes, {a.mode}" if a.mode else "1 process"
    print(f"\nPPO iteration profile ({'GPU' if cuda() else 'CPU'}, {where}, {a.threads} threads each): {a.batch_size} prompts, "
          f"responses of {a.response_length} tokens, {a.ppo_epochs} PPO epochs, {a.divergence} in the "
          f"{a.divergence_penalty}; mean of {len(logs)} iterations after {a.warmup} warm-up")
    labels = {"generation": "generation (sampling)", "gather": "  of which gathering weights (ZeRO-3)",
              "forward": "no-grad forwards (policy, ref, value)",
              "scoring": "reward scoring", "optimisation": "optimisation (PPO epochs)"}
    for k in PARTS:
        print(f"  {labels[k]:<40s} {1000 * mean[k]:9.1f} ms  {100 * mean[k] / total:5.1f}%")
    print(f"  {'total':<40s} {1000 * total:9.1f} ms")
    return 0


def _launch_modes(a, argv) -> int:
    """Run this script under torchrun with 2 processes once per mode; each prints its own profile."""
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    rest = [x for x in argv if x != "--zero"]
    for port, mode in enumerate(MODES, start=29651):
        env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "PYTHONPATH": str(root)}
        env.pop("ACCELERATE_USE_DEEPSPEED", None)
        if MODES[mode][0]:
            env.update(ACCELERATE_USE_DEEPSPEED="true")
            if not cuda():
                env["DS_ACCELERATOR"] = "cpu"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               __file__, *rest, "--mode", mode]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"\n{mode}: failed\n{proc.stderr[-2000:]}")
            continue
        print(proc.stdout[proc.stdout.find("PPO iteration profile") - 1:].rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
