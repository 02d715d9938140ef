"""Run under `torchrun --nproc_per_node 2`: every rank checks its batches hold whole groups, then trains.

Writes one JSON per rank into the folder given as argv[1].
"""

import json
import os
import sys

os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from alignkit import MultiSampleDPOConfig, MultiSampleDPOTrainer  # noqa: E402
from alignkit.data.synthetic import sentiment_groups  # noqa: E402
from alignkit.models import build_tiny_model  # noqa: E402

out_dir = sys.argv[1]
path = str(build_tiny_model("tiny-llama"))
tok = AutoTokenizer.from_pretrained(path)
ds = sentiment_groups("train", num_samples=16, n_chosen=[1, 3, 2, 4], n_rejected=[2, 1, 3, 1])
args = MultiSampleDPOConfig(output_dir=os.path.join(out_dir, "run"), per_device_train_batch_size=2,
                            gradient_accumulation_steps=2, max_steps=2, use_cpu=True, bf16=False, report_to=[],
                            save_strategy="no", logging_steps=1, loss_type="ipo", disable_tqdm=True, seed=0)
trainer = MultiSampleDPOTrainer(model=AutoModelForCausalLM.from_pretrained(path),
                                ref_model=AutoModelForCausalLM.from_pretrained(path), args=args, train_dataset=ds,
                                processing_class=tok)
sizes = {(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in trainer.train_dataset}
seen = []
for batch in trainer.get_train_dataloader():
    c = torch.bincount(batch["chosen_row_index"]).tolist()
    r = torch.bincount(batch["rejected_row_index"]).tolist()
    seen.append(list(zip(c, r)))
whole = all(set(map(tuple, b)) <= sizes for b in seen)
trainer.train()
losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
rank = trainer.accelerator.process_index
with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
    json.dump({"world": trainer.accelerator.num_processes, "whole": whole, "batches": seen, "losses": losses,
               "steps": trainer.state.global_step}, fh)
