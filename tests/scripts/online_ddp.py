"""OnlineMultiSampleTrainer on CPUs, one process (`python online_ddp.py OUT 8`) or plain DDP (`torchrun
--nproc_per_node 2 online_ddp.py OUT 4`): the same 8 prompts per iteration either way. Sampling is replaced by a
deterministic function of the prompt and the sample's index in its group, so that both runs see the same groups.
Each rank writes its policy's weights (OUT/rank<r>.pt) and what it saw (OUT/rank<r>.json)."""

import json
import os
import sys

os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from alignkit import OnlineMultiSampleConfig, OnlineMultiSampleTrainer  # noqa: E402
from alignkit.data.synthetic import sentiment  # noqa: E402
from alignkit.models import build_tiny_model  # noqa: E402

out_dir, per_device = sys.argv[1], int(sys.argv[2])
G = 4
path = str(build_tiny_model("tiny-llama"))
tok = AutoTokenizer.from_pretrained(path)
torch.manual_seed(0)
args = OnlineMultiSampleConfig(output_dir=os.path.join(out_dir, "run"), per_device_train_batch_size=per_device,
                               num_generations=G, loss_type="ipo", beta=1.0, divergence="jsd", nll_weight=0.1,
                               num_iterations=2, response_length=4, optim="sgd", learning_rate=0.1, max_steps=2,
                               logging_steps=1, use_cpu=True, bf16=False, report_to=[], save_strategy="no",
                               disable_tqdm=True, seed=0, num_sample_generations=0)
seen = []


def reward(prompts, completions):
    return [float(c.count("e")) for c in completions]


trainer = OnlineMultiSampleTrainer(args=args, processing_class=tok, model=AutoModelForCausalLM.from_pretrained(path),
                                   ref_model=AutoModelForCausalLM.from_pretrained(path), reward_funcs=[reward],
                                   train_dataset=sentiment("train", num_samples=64).select_columns(["prompt"]))


def fixed_generate(input_ids, attention_mask, generation_config, **_):
    """4 tokens per sample, drawn from a generator seeded by the prompt's tokens and the sample's index in its group."""
    tails = []
    for i, (ids, mask) in enumerate(zip(input_ids, attention_mask)):
        prompt = ids[mask.bool()].tolist()
        seen.append(prompt)
        g = torch.Generator().manual_seed(sum((k + 1) * t for k, t in enumerate(prompt)) * 16 + i % G)
        tails.append(torch.randint(3, len(tok), (4,), generator=g))
    return torch.cat([input_ids, torch.stack(tails)], 1)


trainer.policy.generate = fixed_generate
trainer.train()
rank = trainer.accelerator.process_index
policy = trainer.accelerator.unwrap_model(trainer.model).policy
torch.save({k: v.detach().clone() for k, v in policy.state_dict().items()}, os.path.join(out_dir, f"rank{rank}.pt"))
logs = [e for e in trainer.state.log_history if "group/kept_prompts" in e]
with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
    json.dump({"world": trainer.accelerator.num_processes, "iterations": trainer.state.global_step,
               "prompts": seen, "kept": [e["group/kept_prompts"] for e in logs],
               "skipped": [e["group/skipped_prompts"] for e in logs]}, fh)
