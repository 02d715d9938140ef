"""OnlineMultiSampleTrainer on CPUs: one process (`python online_ddp.py OUT 12`), plain DDP (`torchrun
--nproc_per_node 2 online_ddp.py OUT 6`) or DeepSpeed ZeRO-2/3 (`torchrun --nproc_per_node 2 online_ddp.py
OUT 6 zero3`: 3 completions per micro-batch and gradient_accumulation_steps 2, so that the engine accumulates): the
same 3 prompts x 4 completions per step every way. With 6 completions per process, the middle prompt's group is
split between the two ranks (TRL's GRPO places completions so), which the group loss must see whole. Sampling is
replaced by a deterministic function of the prompt and the completion's place in its group. Each rank writes its
policy's weights (OUT/rank<r>.pt; under ZeRO-3 gathered from the shards) and what it saw (OUT/rank<r>.json); every
rank saves the policy with `save_model` in OUT/final."""

import json
import os
import sys

os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from alignkit import OnlineMultiSampleConfig, OnlineMultiSampleTrainer  # noqa: E402
from alignkit.data.synthetic import sentiment  # noqa: E402
from alignkit.models import build_tiny_model  # noqa: E402

out_dir, per_process = sys.argv[1], int(sys.argv[2])
stage = sys.argv[3] if len(sys.argv) > 3 else None
G = 4
path = str(build_tiny_model("tiny-llama"))
tok = AutoTokenizer.from_pretrained(path)
common = dict(output_dir=os.path.join(out_dir, "run"), per_device_train_batch_size=per_process, num_generations=G,
              loss_type="ipo", beta=1.0, divergence="jsd", nll_weight=0.1, max_completion_length=4, optim="sgd",
              learning_rate=0.1, max_steps=2, logging_steps=1, bf16=False, report_to=[], save_strategy="no",
              disable_tqdm=True, seed=0)
if stage is None:
    common["use_cpu"] = True
else:
    import types

    from alignkit.run.launch import prepare_worker

    common.update(per_device_train_batch_size=per_process // 2, gradient_accumulation_steps=2)
    common = prepare_worker(types.SimpleNamespace(mixed_precision="no", deepspeed=stage, offload_optimizer=False,
                                                  offload_params=False), common)
    common["deepspeed"]["zero_allow_untested_optimizer"] = True  # SGD (see tests/test_online.py)
args = OnlineMultiSampleConfig(**common)
if stage is not None:  # the models load whole, not under zero.Init, so that every run starts from the same weights
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
torch.manual_seed(0)
seen = []
#: the per-step metrics the tests compare across runs
METRICS = ("loss", "reward", "divergence/jsd", "divergence/reverse_kl", "implicit_rewards/margins",
           "group/kept_prompts")


def count_e(completions, **_):
    return [float(c.count("e")) for c in completions]


model = AutoModelForCausalLM.from_pretrained(path)
trainer = OnlineMultiSampleTrainer(model=model, args=args, processing_class=tok, reward_funcs=[count_e],
                                 train_dataset=sentiment("train", num_samples=64).select_columns(["prompt"]))


def fixed_generate(input_ids, attention_mask, **_):
    """4 tokens per completion, drawn from a generator seeded by the prompt's tokens and the completion's place in its
    group (its place in the whole generation batch, which runs over the processes in order, modulo G)."""
    rank, tails = trainer.accelerator.process_index, []
    for i, (ids, mask) in enumerate(zip(input_ids, attention_mask)):
        prompt = ids[mask.bool()].tolist()
        seen.append(prompt)
        place = (rank * input_ids.size(0) + i) % G
        g = torch.Generator().manual_seed(sum((k + 1) * t for k, t in enumerate(prompt)) * 16 + place)
        tails.append(torch.randint(3, len(tok), (4,), generator=g))
    return torch.cat([input_ids, torch.stack(tails)], 1)


model.generate = fixed_generate
output = trainer.train()
trainer.save_model(os.path.join(out_dir, "final"))  # on every rank, as alignkit train does
rank = trainer.accelerator.process_index
policy = trainer.accelerator.unwrap_model(trainer.model)
if stage == "zero3":
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(policy.parameters())):
        weights = {k: v.detach().clone() for k, v in policy.state_dict().items()}
else:
    weights = {k: v.detach().clone() for k, v in policy.state_dict().items()}
torch.save(weights, os.path.join(out_dir, f"rank{rank}.pt"))
logs = [e for e in trainer.state.log_history if "group/kept_prompts" in e]
with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
    json.dump({"world": trainer.accelerator.num_processes, "steps": trainer.state.global_step,
               "deepspeed": trainer.is_deepspeed_enabled, "train_loss": output.training_loss,
               "engine": type(trainer.model_wrapped).__name__, "prompts": seen,
               "metrics": [{k: e[k] for k in METRICS} for e in logs]}, fh)
