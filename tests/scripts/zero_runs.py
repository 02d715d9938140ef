"""The trainers of the ZeRO tests, built the same way in one process and under torchrun.

    torchrun --nproc_per_node 2 tests/scripts/zero_runs.py {zero2|zero3} OUT_DIR

runs every method for a few steps with `per_device_train_batch_size` = GLOBAL_BATCH / 2 under that ZeRO
stage (through alignkit.run.launch.prepare_worker, the code `alignkit train` uses), saves each model,
then resumes FDPO from a ZeRO checkpoint; rank 0 writes OUT_DIR/result.json. The test compares with
single-process runs of the same global batch, built by `build` below in the pytest process.
"""

import json
import os
import sys
import types

os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled")

GLOBAL_BATCH = 8
STEPS = 3
METHODS = ("fdpo", "mipo", "crm", "causal_dpo")


def build(method: str, output_dir: str, world: int = 1, stage: str | None = None, **extra):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from alignkit import (CausalRewardConfig, CausalRewardTrainer, FDPOConfig, FDPOTrainer, MultiSampleDPOConfig,
                          MultiSampleDPOTrainer)
    from alignkit.data.synthetic import sentiment, sentiment_groups
    from alignkit.run.launch import prepare_worker
    from alignkit.models import build_tiny_model

    path = str(build_tiny_model("tiny-llama"))
    tok = AutoTokenizer.from_pretrained(path)
    common = dict(output_dir=output_dir, per_device_train_batch_size=GLOBAL_BATCH // world, max_steps=STEPS,
                  learning_rate=1e-3, logging_steps=1, seed=0, report_to=[], save_strategy="no", disable_tqdm=True,
                  bf16=False)
    common.update(extra)
    if stage is not None:
        # one Accelerator per process is what accelerate supports with DeepSpeed: forget the previous trainer's
        # (the process group and gloo PartialState stay)
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=False)
        section = types.SimpleNamespace(mixed_precision="no", deepspeed=stage, offload_optimizer=False,
                                        offload_params=False)
        common = prepare_worker(section, common)
    torch.manual_seed(0)
    causal = dict(mmd_coef=1.0, attributes=["length:chars"], num_bins=4, bin_balanced_sampler=False)
    if method == "crm":
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
        return CausalRewardTrainer(model=model, args=CausalRewardConfig(**common, **causal),
                                   train_dataset=sentiment("train", num_samples=64), processing_class=tok)
    policy, ref = AutoModelForCausalLM.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)
    if method == "mipo":
        ds = sentiment_groups("train", num_samples=64, n_chosen=[2, 3], n_rejected=[2, 1])
        return MultiSampleDPOTrainer(model=policy, ref_model=ref, args=MultiSampleDPOConfig(**common, loss_type="ipo"),
                                     train_dataset=ds, processing_class=tok)
    kw = dict(divergence="jsd") if method == "fdpo" else dict(causal)
    return FDPOTrainer(model=policy, ref_model=ref, args=FDPOConfig(**common, **kw),
                       train_dataset=sentiment("train", num_samples=64), processing_class=tok)


def losses(trainer) -> list[float]:
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


def main(stage: str, out: str) -> None:
    import torch.distributed as dist

    world = int(os.environ["WORLD_SIZE"])
    result = {"world": world}
    for method in METHODS:
        trainer = build(method, os.path.join(out, method), world, stage)
        trainer.train()
        trainer.save_model(os.path.join(out, method, "final"))
        result[method] = losses(trainer)
        result[f"{method}_deepspeed"] = trainer.is_deepspeed_enabled
    # resume: 4 steps with checkpoints every 2, then a new trainer continues from checkpoint-2
    full = build("fdpo", os.path.join(out, "resume"), world, stage, max_steps=4, save_strategy="steps", save_steps=2)
    full.train()
    resumed = build("fdpo", os.path.join(out, "resume"), world, stage, max_steps=4)
    resumed.train(resume_from_checkpoint=os.path.join(out, "resume", "checkpoint-2"))
    result["resume_full"], result["resume_resumed"] = losses(full), losses(resumed)
    try:  # refused with a clear error rather than failing mid-way
        build("fdpo", os.path.join(out, "pre"), world, stage, precompute_ref_log_probs=True)
        result["precompute_error"] = None
    except ValueError as exc:
        result["precompute_error"] = str(exc)
    if dist.get_rank() == 0:
        with open(os.path.join(out, "result.json"), "w") as fh:
            json.dump(result, fh)


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
    main(sys.argv[1], sys.argv[2])
