"""Real pretrained models under DeepSpeed ZeRO-2/3 with 2 processes, against one process on the same global batch.

    python benchmarks/zero_real.py                      # every case, ZeRO-2 and ZeRO-3 (make zero-real)
    python benchmarks/zero_real.py --cases fdpo-lora --stages zero3 --steps 3

Each case trains SmolLM2-135M-Instruct (builtin:smollm2-135m-instruct) or MiniLM-L6 (builtin:minilm-l6) for a few
optimizer steps, float32, gradient checkpointing on, once in one process and once per ZeRO stage in 2 processes
(torchrun; gloo and DeepSpeed's CPU accelerator on a machine without GPU, NCCL on GPUs: the same code). Every run is
a fresh process that builds its trainer the way `alignkit train` does inside a launched worker
(`alignkit.run.launch.prepare_worker`), trains, saves with `save_model` and writes what it measured. The script then
prints, per case and stage:

* the largest relative difference of the logged losses from the one-process run;
* the largest absolute difference of the saved weights (reloaded without DeepSpeed), beside the largest change
  training made to a weight; and `diff/update`, the norm of the weight differences over the norm of what training
  moved the trainable weights in one process (1e-3: the runs agree to 0.1% of the update). Adam divides each
  gradient entry by its own scale, so an entry whose gradient is rounding noise moves by a full step either way:
  the largest difference can reach the size of a step where the norms agree closely;
* the median time per optimizer step (the first step left out), one process and per ZeRO rank;
* the peak memory of each rank during training (resident set on a CPU, torch's peak allocation on a GPU; reset once
  the trainer is built, so that loading the models does not count) and, measured from the tensors themselves, the
  weights and optimizer states each rank holds: what `alignkit plan` estimates, which it prints beside them.

Cases (`--cases`): fdpo-lora, fdpo-full, mipo-groups (mIPO on groups with `shared_prefix`), online-mipo, ppo (LoRA
policy, full value model), crm-minilm. Sampling in the on-policy cases is made a function of the prompt and the
sample's index (ppo: greedy; online-mipo: each sample drawn alone from a generator seeded by its prompt and index),
so that one process and 2 ranks see the same completions, as in tests/test_zero.py. Dropout is off (MiniLM has
some): each rank would draw other masks than one process.
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

ROOT = Path(__file__).resolve().parents[1]
GLOBAL_BATCH = 4
CASES = ("fdpo-tiny", "fdpo-lora", "fdpo-full", "mipo-groups", "online-mipo", "ppo", "crm-minilm")
STAGES = ("zero2", "zero3")
#: a fixed input for the logits check of the saved model
PROBE = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


def _peak_memory_gb() -> float:
    from alignkit.metrics.perf import peak_memory_gb

    return peak_memory_gb()


def _reset_peak() -> float:
    """Reset the process' peak resident set to what it holds now (Linux's /proc/self/clear_refs), so that the peak read
    later is that of what follows (training), not of loading the models; returns the resident set now, GB. On a GPU,
    torch's peak allocation is reset."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 1e9
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass
    return _peak_memory_gb()


def _rows(path: str, n: int):
    with open(ROOT / path) as fh:
        return [json.loads(line) for _, line in zip(range(n), fh)]


def build(case: str, output_dir: str, world: int = 1, stage: str | None = None, steps: int = 3, max_length: int = 96,
          **extra):
    """The trainer of `case` for a run over `world` processes (`stage`: None for one process without DeepSpeed,
    else zero2/zero3 inside torchrun), with GLOBAL_BATCH rows per optimizer step."""
    import types

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    import alignkit
    from alignkit.run.launch import prepare_worker
    from alignkit.models import resolve_model_path

    smol = resolve_model_path("builtin:smollm2-135m-instruct")
    common = dict(output_dir=output_dir, per_device_train_batch_size=GLOBAL_BATCH // world, max_steps=steps,
                  logging_steps=1, seed=0, report_to=[], save_strategy="no", disable_tqdm=True, bf16=False,
                  gradient_checkpointing=True, learning_rate=1e-4, lr_scheduler_type="constant")
    if stage is None:
        common["use_cpu"] = not torch.cuda.is_available()
    common.update(extra)
    if stage is not None:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=False)  # one Accelerator per trainer (tests/test_zero.py)
        common = prepare_worker(types.SimpleNamespace(mixed_precision="no", deepspeed=stage, offload_optimizer=False,
                                                      offload_params=False), common)
    # the models load whole (not under zero.Init) so that a new head is initialised as in one process
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    torch.manual_seed(0)
    lora = None
    if case in ("fdpo-lora", "mipo-groups", "online-mipo", "ppo"):
        from peft import LoraConfig

        lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    if case == "crm-minilm":
        path = resolve_model_path("builtin:minilm-l6")
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, hidden_dropout_prob=0.0,
                                                                   attention_probs_dropout_prob=0.0)
        from alignkit.data.synthetic import sycophancy

        args = alignkit.CausalRewardConfig(**common, mmd_coef=1.0, attributes=["sycophantic"],
                                           bin_balanced_sampler=False, max_length=128)
        return alignkit.CausalRewardTrainer(model=model, args=args, processing_class=tok,
                                            train_dataset=sycophancy("train", num_samples=64))
    if case == "fdpo-tiny":  # the built-in 2-layer Llama, for the plan's comparison at the small end
        from alignkit.data.synthetic import sentiment

        tiny = resolve_model_path("builtin:tiny-llama")
        args = alignkit.FDPOConfig(**{**common, "learning_rate": 1e-3}, divergence="jsd", beta=0.1,
                                   max_length=max_length)
        return alignkit.FDPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny), args=args,
                                    ref_model=AutoModelForCausalLM.from_pretrained(tiny), train_dataset=sentiment(
                                        "train", num_samples=64), processing_class=AutoTokenizer.from_pretrained(tiny))
    tok = AutoTokenizer.from_pretrained(smol)
    policy = AutoModelForCausalLM.from_pretrained(smol, dtype=torch.float32)
    if case in ("fdpo-lora", "fdpo-full"):
        rows = _rows("recipes/real/data/cheerful-smollm2.jsonl", 32)
        ds = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
        ref = None if lora else AutoModelForCausalLM.from_pretrained(smol, dtype=torch.float32)
        if case == "fdpo-full":
            common["learning_rate"] = 1e-5
        args = alignkit.FDPOConfig(**common, divergence="jsd", beta=0.1, max_length=max_length)
        return alignkit.FDPOTrainer(model=policy, ref_model=ref, args=args, processing_class=tok, train_dataset=ds,
                                    peft_config=lora)
    if case == "mipo-groups":
        ds = Dataset.from_list(_rows("recipes/real/data/random-numbers-smollm2.jsonl", 32))
        args = alignkit.MultiSampleDPOConfig(**common, loss_type="ipo", unbiased=True, beta=0.1, nll_weight=1.0,
                                             shared_prefix=True)
        return alignkit.MultiSampleDPOTrainer(model=policy, args=args, processing_class=tok, train_dataset=ds,
                                              peft_config=lora)
    prompts = Dataset.from_list(_rows("recipes/real/data/chat-prompts.jsonl", 64))
    from alignkit.rewards import load_reward_function

    vader = load_reward_function("builtin:vader")
    if case == "online-mipo":
        # TRL's GRPO counts completions: the same 4 prompts per step, 4 completions each
        args = alignkit.OnlineMultiSampleConfig(**{**common, "per_device_train_batch_size": 4 * GLOBAL_BATCH // world},
                                                num_generations=4, loss_type="ipo", beta=0.1, divergence="jsd",
                                                max_completion_length=12)
        trainer = alignkit.OnlineMultiSampleTrainer(model=policy, args=args, processing_class=tok,
                                                    reward_funcs=[vader], train_dataset=prompts, peft_config=lora)
        _seeded_sampling(trainer, 4)
        return trainer
    if case == "ppo":
        from transformers import GenerationConfig

        value = AutoModelForSequenceClassification.from_pretrained(smol, num_labels=1, dtype=torch.float32)
        args = alignkit.PPOConfig(**{**common, "learning_rate": 1e-5}, response_length=12, num_ppo_epochs=2,
                                  kl_coef=0.05, divergence="jsd", num_sample_generations=0)
        trainer = alignkit.PPOTrainer(model=policy, args=args, processing_class=tok, reward_model=vader,
                                      value_model=value, train_dataset=prompts, peft_config=lora)
        # greedy rollouts: the same responses whichever rank (and RNG) generates a prompt's
        trainer.generation_config = GenerationConfig(max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id,
                                                     eos_token_id=tok.eos_token_id)
        return trainer
    raise ValueError(f"unknown case {case!r}; one of {', '.join(CASES)}")


def recipe_for(case: str, world: int, stage: str | None, max_length: int = 96) -> dict:
    """The recipe of `alignkit train` that trains as `build` does (for `alignkit plan`'s estimate of the run)."""
    smol = "builtin:smollm2-135m-instruct"
    lora = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear"}
    cheerful = {"name": "recipes/real/data/cheerful-smollm2.jsonl", "max_train_samples": 32}
    recipe = {"model": {"name_or_path": smol, "dtype": "float32"}, "per_device_train_batch_size": GLOBAL_BATCH // world,
              "gradient_checkpointing": True, "bf16": False, "report_to": "none"}
    if world > 1:
        recipe["distributed"] = {"num_processes": world, "deepspeed": stage}
    if case == "fdpo-tiny":
        recipe.update(method="fdpo", model={"name_or_path": "builtin:tiny-llama", "dtype": "float32"},
                      dataset={"name": "builtin:sentiment", "builtin_kwargs": {"num_samples": 64}},
                      max_length=max_length)
    elif case in ("fdpo-lora", "fdpo-full"):
        recipe.update(method="fdpo", dataset=cheerful, max_length=max_length,
                      **({"peft": lora} if case == "fdpo-lora" else {}))
    elif case == "mipo-groups":
        recipe.update(method="mdpo", loss_type="ipo", shared_prefix=True, peft=lora,
                      dataset={"name": "recipes/real/data/random-numbers-smollm2.jsonl", "max_train_samples": 32})
    elif case in ("online-mipo", "ppo"):
        recipe.update(method="online_mdpo" if case == "online-mipo" else "ppo", peft=lora,
                      reward={"function": "builtin:vader"},
                      dataset={"name": "recipes/real/data/chat-prompts.jsonl", "max_train_samples": 64})
        if case == "online-mipo":
            recipe.update(num_generations=4, max_completion_length=12,
                          per_device_train_batch_size=4 * GLOBAL_BATCH // world)
        else:
            recipe["response_length"] = 12
    elif case == "crm-minilm":
        recipe.update(method="crm", model={"name_or_path": "builtin:minilm-l6", "dtype": "float32"}, max_length=128,
                      dataset={"name": "builtin:sycophancy", "builtin_kwargs": {"num_samples": 64}})
    return recipe


def plan_estimate(case: str, world: int, stage: str | None, max_length: int = 96) -> dict:
    """`alignkit plan`'s figures for the run (per device, GB)."""
    from alignkit.run.estimate import plan_recipe
    from alignkit.run.recipe import parse_recipe

    plan = plan_recipe(parse_recipe(recipe_for(case, world, stage, max_length), source=f"{case}.yaml"))
    return {"weights_gb": sum(m.weights_gb for m in plan.models),
            "states_gb": sum(m.gradients_gb + m.optimizer_gb for m in plan.models),
            "optimizer_gb": sum(m.optimizer_gb for m in plan.models),
            "activations_gb": plan.activations_gb, "total_gb": plan.total_gb}


def _seeded_sampling(trainer, group: int) -> None:
    """Sample each completion alone (no padding), from a generator seeded by its prompt's tokens and its place in its
    group (its place in the whole generation batch, which runs over the processes in order): the same groups in one
    process and on 2 ranks, wherever TRL puts a group's completions."""
    import torch

    policy = trainer.accelerator.unwrap_model(trainer.model)
    generate = policy.generate
    pad = trainer.processing_class.pad_token_id

    def seeded_generate(input_ids, attention_mask, generation_config, **kwargs):
        tails, rank = [], trainer.accelerator.process_index
        for i, (ids, mask) in enumerate(zip(input_ids, attention_mask)):
            prompt = ids[mask.bool()]
            place = (rank * input_ids.size(0) + i) % group
            torch.manual_seed(sum((k + 1) * t for k, t in enumerate(prompt.tolist())) * 16 + place)
            out = generate(input_ids=prompt[None], attention_mask=torch.ones_like(prompt)[None],
                           generation_config=generation_config, **kwargs)[0, len(prompt):]
            tails.append(torch.nn.functional.pad(out, (0, generation_config.max_new_tokens - len(out)), value=pad))
        return torch.cat([input_ids, torch.stack(tails)], 1)

    policy.generate = seeded_generate


def _step_times():
    """A callback that records the wall time of each optimizer step (in `.times`)."""
    from transformers import TrainerCallback

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.t0)

    return StepTimes()


def state_bytes(trainer) -> dict[str, float]:
    """What this rank holds, from the tensors themselves, GB: the weights of every model (each ZeRO-3 parameter's
    local partition), and the optimizer's state (its moments, and the fp32 master partitions DeepSpeed keeps)."""
    import torch

    models = [trainer.model] + [getattr(trainer, n, None) for n in ("ref_model", "reward_model")]
    seen, weights = set(), 0
    for m in models:
        if not isinstance(m, torch.nn.Module):
            continue
        for p in m.parameters():
            local = getattr(p, "ds_tensor", None)
            t = local if local is not None else p
            if t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            weights += t.numel() * t.element_size()
    opt = trainer.optimizer
    while hasattr(opt, "optimizer"):  # accelerate's wrapper, then DeepSpeed's ZeRO optimizer, then torch's
        opt = opt.optimizer
    state = 0
    for s in getattr(opt, "state", {}).values():
        state += sum(v.numel() * v.element_size() for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
    master = 0
    for group in getattr(opt, "param_groups", []):
        for p in group["params"]:
            if p.data_ptr() not in seen:
                master += p.numel() * p.element_size()
    return {"weights_gb": weights / 1e9, "optimizer_gb": (state + master) / 1e9}


def _logits(trainer):
    """Logits of the trained policy (or reward) on PROBE, on every rank (ZeRO-3 gathers the shards as it runs)."""
    import torch

    model = trainer.accelerator.unwrap_model(trainer.model)
    model = getattr(model, "policy", model)
    ids = trainer.processing_class(PROBE, return_tensors="pt")["input_ids"].to(trainer.accelerator.device)
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float().cpu()


def worker(case: str, stage: str, out: str, steps: int, resume: bool = False, max_length: int = 96) -> None:
    """One run (in this process, or in each rank under torchrun): train, save, write OUT/rank<r>.json. With
    `resume`, the run writes a checkpoint halfway, and a second trainer resumes from it."""
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    import peft  # noqa: F401  (the baseline: the process with its libraries, before any model)
    import trl  # noqa: F401

    import alignkit  # noqa: F401
    if stage != "single":
        import deepspeed  # noqa: F401
    baseline = _peak_memory_gb()
    stage_ = None if stage == "single" else stage
    saving = dict(save_strategy="steps", save_steps=steps // 2) if resume else {}
    trainer = build(case, os.path.join(out, "run"), world, stage_, steps, max_length, **saving)
    timer = _step_times()
    trainer.add_callback(timer)
    loaded = _reset_peak()  # from here the peak is training's: built models in place, not their loading
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad} \
        if world == 1 else {}
    trainer.train()
    update = [(p.detach() - before[n]).float() for n, p in trainer.model.named_parameters() if n in before]
    result = {"world": world, "case": case, "stage": stage, "deepspeed": trainer.is_deepspeed_enabled,
              "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
              "step_times": timer.times, "baseline_gb": baseline, **state_bytes(trainer)}
    if update:  # one process: how far training moved the trainable weights (the scale of the differences)
        result["update_l2"] = sum(u.square().sum().item() for u in update) ** 0.5
        result["update_max"] = max(u.abs().max().item() for u in update)
    result["peak_memory_gb"] = _peak_memory_gb()
    result["peak_from_gb"] = loaded
    trainer.save_model(os.path.join(out, "final"))  # on every rank, as alignkit train does
    logits = _logits(trainer)
    if rank == 0:
        torch.save(logits, os.path.join(out, "logits.pt"))
    if resume:  # a new trainer continues from the checkpoint written halfway
        again = build(case, os.path.join(out, "run"), world, stage_, steps, max_length)
        again.train(resume_from_checkpoint=os.path.join(out, "run", f"checkpoint-{steps // 2}"))
        result["resumed_losses"] = [e["loss"] for e in again.state.log_history if "loss" in e]
        again.save_model(os.path.join(out, "resumed"))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
        json.dump(result, fh)


def launch(case: str, stage: str, out: Path, steps: int, port: int, resume: bool = False, max_length: int = 96,
           timeout: int = 1800):
    """Run `worker` in fresh processes: one (stage "single") or 2 under torchrun; returns the ranks' results."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), "WANDB_MODE": "disabled",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    args = [__file__, "--worker", case, stage, str(out), str(steps), str(max_length)] + (["--resume"] if resume else [])
    if stage == "single":
        cmd = [sys.executable] + args
    else:
        import torch

        env["ACCELERATE_USE_DEEPSPEED"] = "true"
        if not torch.cuda.is_available():
            env["DS_ACCELERATOR"] = "cpu"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{case} {stage} failed:\n{proc.stderr[-6000:]}")
    ranks = sorted(out.glob("rank*.json"))
    return [json.loads(p.read_text()) for p in ranks]


def _load_weights(case: str, folder: Path) -> dict:
    """The saved model's weights, loaded without DeepSpeed (a LoRA adapter: its own tensors)."""
    import torch

    if (folder / "adapter_model.safetensors").is_file():
        from safetensors.torch import load_file

        weights = load_file(folder / "adapter_model.safetensors")
        value = folder / "value_model"
        if value.is_dir():
            from transformers import AutoModelForSequenceClassification

            m = AutoModelForSequenceClassification.from_pretrained(value, dtype=torch.float32)
            weights.update({f"value.{k}": v for k, v in m.state_dict().items()})
        return weights
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForSequenceClassification if case == "crm-minilm" else AutoModelForCausalLM
    return cls.from_pretrained(folder, dtype=torch.float32).state_dict()


def compare(case: str, single: list[dict], runs: list[dict], single_dir: Path, run_dir: Path) -> dict:
    """Differences of a ZeRO run from the one-process run, and its cost."""
    ref, ours = single[0], runs[0]
    loss_rel = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(ours["losses"], ref["losses"]))
    loss_abs = max(abs(a - b) for a, b in zip(ours["losses"], ref["losses"]))
    w_ref = _load_weights(case, single_dir / "final")
    w_ours = _load_weights(case, run_dir / "final")
    assert set(w_ref) == set(w_ours), sorted(set(w_ref) ^ set(w_ours))[:5]
    deltas = [(w_ours[k].float() - w_ref[k].float()) for k in w_ref]
    diff = max(d.abs().max().item() for d in deltas)
    diff_l2 = sum(d.square().sum().item() for d in deltas) ** 0.5
    import torch

    logits_ref = torch.load(single_dir / "logits.pt")
    logits_ours = torch.load(run_dir / "logits.pt")
    plan = plan_estimate(case, len(runs), ours["stage"])
    return {"case": case, "stage": ours["stage"], "loss_rel": loss_rel, "loss_abs": loss_abs, "weight_abs": diff,
            "plan_weights_gb": plan["weights_gb"], "plan_optimizer_gb": plan["optimizer_gb"],
            "plan_total_gb": plan["total_gb"],
            "update_max": ref["update_max"], "diff_over_update": diff_l2 / ref["update_l2"],
            "logits_abs": (logits_ours - logits_ref).abs().max().item(),
            "s_per_step_single": statistics.median(ref["step_times"][1:] or ref["step_times"]),
            "s_per_step": statistics.median(ours["step_times"][1:] or ours["step_times"]),
            "peak_gb_single": ref["peak_memory_gb"], "peak_gb": [r["peak_memory_gb"] for r in runs],
            "baseline_gb": [r["baseline_gb"] for r in runs],
            "weights_gb_single": ref["weights_gb"], "weights_gb": [r["weights_gb"] for r in runs],
            "optimizer_gb_single": ref["optimizer_gb"], "optimizer_gb": [r["optimizer_gb"] for r in runs]}


def plan_table(rows: list[dict]) -> str:
    """`alignkit plan`'s estimates per device against what rank 0 measured (MB: the tiny model's are small)."""
    mb = lambda x: f"{x * 1000:.1f}" if x < 0.1 else f"{x * 1000:.0f}"  # noqa: E731
    lines = ["| case | stage | weights MB: plan / measured | optimizer MB: plan / measured | plan total + libraries / "
             "measured peak in training, MB |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['stage']} | {mb(r['plan_weights_gb'])} / {mb(r['weights_gb'][0])} | "
                     f"{mb(r['plan_optimizer_gb'])} / {mb(r['optimizer_gb'][0])} | "
                     f"{mb(r['plan_total_gb'] + r['baseline_gb'][0])} / {mb(r['peak_gb'][0])} |")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    lines = ["| case | stage | loss diff: rel. (abs.) | weight diff (largest update) | diff/update | s/step 1 proc | "
             "s/step ZeRO | "
             "peak GB 1 proc | peak GB per rank | weights GB per rank | optimizer GB per rank |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        per = lambda k: " / ".join(f"{v:.2f}" for v in r[k])  # noqa: E731
        lines.append(f"| {r['case']} | {r['stage']} | {r['loss_rel']:.1e} ({r['loss_abs']:.0e}) | "
                     f"{r['weight_abs']:.1e} ({r['update_max']:.1e}) | "
                     f"{r['diff_over_update']:.1e} | {r['s_per_step_single']:.2f} | {r['s_per_step']:.2f} | "
                     f"{r['peak_gb_single']:.2f} | {per('peak_gb')} | {per('weights_gb')} | {per('optimizer_gb')} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", default="outputs/zero_real")
    p.add_argument("--port", type=int, default=29601)
    p.add_argument("--json", help="also write the rows to this JSON file")
    a = p.parse_args(argv)
    out = Path(a.out)
    rows = []
    t0 = time.time()
    for case in a.cases:
        single = launch(case, "single", out / case / "single", a.steps, a.port)
        for stage in a.stages:
            runs = launch(case, stage, out / case / stage, a.steps, a.port)
            rows.append(compare(case, single, runs, out / case / "single", out / case / stage))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(f"\n{table(rows)}\n\n{len(rows)} runs against one process in {time.time() - t0:.0f} s "
          f"(float32, gradient checkpointing, global batch {GLOBAL_BATCH}, {a.steps} steps)")
    print(f"\nalignkit plan against the measurement, per rank:\n\n{plan_table(rows)}")
    if a.json:  # the rows, with the command, date and versions that produced them
        import datetime
        import importlib.metadata as md
        import platform

        meta = {"command": "python benchmarks/zero_real.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                "date": str(datetime.date.today()), "machine": f"{platform.processor() or platform.machine()}, "
                f"{os.cpu_count()} cores", "seconds": round(time.time() - t0),
                "versions": {n: md.version(n) for n in ("torch", "transformers", "trl", "deepspeed", "accelerate",
                                                        "peft")}}
        Path(a.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        sys.path.insert(0, str(ROOT))
        worker(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), resume="--resume" in sys.argv,
               max_length=int(sys.argv[6]))
    else:
        main()
