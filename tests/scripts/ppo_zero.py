"""PPO under DeepSpeed ZeRO-2/3 (and plain DDP, the reference) with 2 CPU processes, built the same way in one
process by the tests (tests/test_zero.py).

    torchrun --nproc_per_node 2 tests/scripts/ppo_zero.py {ddp|zero2|zero3} OUT_DIR

Under every mode: 3 PPO iterations with `per_device_train_batch_size` = GLOBAL_BATCH / 2, a reference model and a
reward model (nn.Modules), greedy rollouts (a test-only generation config, so that the samples do not depend on
which rank's RNG drew them), then `save_model` on every rank. Under ZeRO-2/3 also: a 4-iteration run with
checkpoints every 2 and a resumed run from checkpoint-2 (under ZeRO-3 generating from the sharded weights,
`ds3_gather_for_generation=False`), and a LoRA policy. Rank 0 writes OUT_DIR/result.json.
"""

import json
import os
import sys
import types

os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled")

GLOBAL_BATCH = 8
STEPS = 3
#: the per-iteration metrics the tests compare
KEYS = ("loss", "objective/scores", "objective/reverse_kl", "divergence/reverse_kl", "divergence/forward_kl",
        "divergence/jsd", "loss/policy_avg", "loss/value_avg")


def tiny_model_path() -> str:
    from alignkit.models import build_tiny_model

    return str(build_tiny_model("tiny-llama"))


def build(output_dir: str, world: int = 1, stage: str | None = None, lora: bool = False, **extra):
    """`stage`: None (one process, nothing launched), "ddp" (plain DDP), "zero2" or "zero3" (inside torchrun)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, GenerationConfig

    from alignkit import PPOConfig, PPOTrainer
    from alignkit.data.synthetic import sentiment
    from alignkit.run.launch import prepare_worker
    from alignkit.models import build_tiny_model

    path = str(build_tiny_model("tiny-llama"))
    tok = AutoTokenizer.from_pretrained(path)
    common = dict(output_dir=output_dir, per_device_train_batch_size=GLOBAL_BATCH // world, num_ppo_epochs=2,
                  response_length=5, learning_rate=1e-2, lr_scheduler_type="constant", temperature=1.0, kl_coef=0.05,
                  max_steps=STEPS, logging_steps=1, seed=0, report_to=[], save_strategy="no", disable_tqdm=True,
                  bf16=False, num_sample_generations=1, per_device_eval_batch_size=2)
    common.update(extra)
    if stage == "ddp":  # as tests/scripts/ppo_ddp.py: Trainer's own multi-CPU state (gloo)
        common["use_cpu"] = True
    elif stage is not None:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=False)  # one Accelerator per trainer (see zero_runs.py)
        section = types.SimpleNamespace(mixed_precision="no", deepspeed=stage,
                                        offload_optimizer=False, offload_params=False)
        common = prepare_worker(section, common)
    else:
        common["use_cpu"] = True
    # the models load whole (not under zero.Init, which a previous ZeRO-3 config in this process would switch on),
    # so that every build starts from the same weights
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_pretrained(path)
    ref = None if lora else AutoModelForCausalLM.from_pretrained(path)
    value = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    reward = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    with torch.no_grad():  # a reward head with a clear signal (the random one scores about 0)
        reward.score.weight.mul_(20)
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = PPOTrainer(args=PPOConfig(**common), processing_class=tok, model=policy, ref_model=ref,
                         reward_model=reward, value_model=value, peft_config=peft_config,
                         train_dataset=sentiment("train", num_samples=64).select_columns(["prompt"]))
    # test-only: greedy rollouts, identical whichever rank (and RNG) generates for a prompt
    trainer.generation_config = GenerationConfig(max_new_tokens=common["response_length"], do_sample=False,
                                                 pad_token_id=tok.pad_token_id, eos_token_id=None)
    return trainer


def metrics(trainer) -> list[dict]:
    return [{k: e[k] for k in KEYS} for e in trainer.state.log_history if "loss" in e]


def main(mode: str, out: str) -> None:
    import torch.distributed as dist

    import time

    world = int(os.environ["WORLD_SIZE"])
    result = {"world": world, "times": []}
    t0 = time.time()

    def lap(name):
        result["times"].append((name, round(time.time() - t0, 1)))
    trainer = build(os.path.join(out, "main"), world, mode)
    lap("build")
    trainer.train()
    lap("train")
    trainer.save_model(os.path.join(out, "main", "final"))  # on every rank, as alignkit train does
    lap("save")
    # evaluation: 5 prompts, 2 per batch, so rank 0 runs 2 batches and rank 1 one (plus, under ZeRO-3, a filler
    # batch that is not counted); the samples table of the last iteration (num_sample_generations=1) was written
    from alignkit.data.synthetic import sentiment

    ev = trainer.evaluate(sentiment("test", num_samples=5).select_columns(["prompt"]))
    lap("evaluate")
    result["eval"] = {k: v for k, v in ev.items() if not k.endswith(("_runtime", "_per_second"))}
    result.update(main=metrics(trainer), deepspeed=trainer.is_deepspeed_enabled,
                  engine=type(trainer.model_wrapped).__name__)
    if mode != "ddp":
        # resume: 4 iterations with checkpoints every 2, then a new trainer continues from checkpoint-2
        gather = mode != "zero3"  # under ZeRO-3: generation from the sharded weights (synced_gpus)
        full = build(os.path.join(out, "resume"), world, mode, max_steps=4, save_strategy="steps", save_steps=2,
                     ds3_gather_for_generation=gather)
        lap("build full")
        full.train()
        lap("train full")
        resumed = build(os.path.join(out, "resume"), world, mode, max_steps=4, ds3_gather_for_generation=gather)
        resumed.train(resume_from_checkpoint=os.path.join(out, "resume", "checkpoint-2"))
        lap("resumed")
        result.update(resume_full=metrics(full), resume_resumed=metrics(resumed))
    if mode != "ddp":
        lora = build(os.path.join(out, "lora"), world, mode, lora=True, max_steps=2)
        lora.train()
        import deepspeed

        policy = lora.accelerator.unwrap_model(lora.model).policy
        params = [p for n, p in policy.named_parameters() if "lora_B" in n]  # zeros at initialisation
        with deepspeed.zero.GatheredParameters(params):
            moved = max(p.abs().max().item() for p in params)
        lora.save_model(os.path.join(out, "lora", "final"))
        result.update(lora=metrics(lora), lora_moved=moved)
        lap("lora")
    if dist.get_rank() == 0:
        with open(os.path.join(out, "result.json"), "w") as fh:
            json.dump(result, fh)


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
    main(sys.argv[1], sys.argv[2])
