"""Run under `torchrun --nproc_per_node 2`: PPO with plain DDP on CPUs. Each rank writes a checksum of its policy
and value weights and the first prompt batch it saw into OUT_DIR/rank<r>.json."""

import json
import os
import sys

os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

from alignkit import PPOConfig, PPOTrainer  # noqa: E402
from alignkit.data.synthetic import sentiment  # noqa: E402
from alignkit.models import build_tiny_model  # noqa: E402

out_dir = sys.argv[1]
path = str(build_tiny_model("tiny-llama"))
tok = AutoTokenizer.from_pretrained(path)
torch.manual_seed(0)
args = PPOConfig(output_dir=os.path.join(out_dir, "run"), per_device_train_batch_size=8, num_ppo_epochs=2,
                 response_length=4, learning_rate=1e-2, temperature=1.0, max_steps=3, logging_steps=1, use_cpu=True,
                 bf16=False, report_to=[], save_strategy="no", disable_tqdm=True, seed=0)
trainer = PPOTrainer(args=args, processing_class=tok, model=AutoModelForCausalLM.from_pretrained(path),
                     ref_model=AutoModelForCausalLM.from_pretrained(path),
                     reward_model=lambda prompts, completions: [c.count("e") / 4 for c in completions],
                     value_model=AutoModelForSequenceClassification.from_pretrained(path, num_labels=1),
                     train_dataset=sentiment("train", num_samples=64).select_columns(["prompt"]))
first = next(trainer._prompt_batches(0))["input_ids"][:, -3:].tolist()
before = sum(p.double().sum().item() for p in trainer.model.parameters())
trainer.train()
after = sum(p.double().sum().item() for p in trainer.accelerator.unwrap_model(trainer.model).parameters())
rank = trainer.accelerator.process_index
with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
    json.dump({"world": trainer.accelerator.num_processes, "before": before, "after": after, "first_batch": first,
               "iterations": trainer.state.global_step}, fh)
