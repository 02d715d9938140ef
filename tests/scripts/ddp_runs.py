"""f-DPO under plain DDP on CPU processes, set up as `alignkit train` sets up its workers.

    torchrun --nproc_per_node 2 tests/scripts/ddp_runs.py OUT_DIR

Rank 0 writes OUT_DIR/result.json: accelerate's distributed type, the per-step losses, and a checksum of every
rank's weights after training (equal on all ranks only if gradients were synchronised).
"""

import json
import os
import sys
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled")


def main(out: str) -> None:
    import torch
    import torch.distributed as dist

    import zero_runs
    from alignkit.run.launch import prepare_worker

    world = int(os.environ["WORLD_SIZE"])
    section = types.SimpleNamespace(mixed_precision="no", deepspeed=None, offload_optimizer=False, offload_params=False)
    trainer = zero_runs.build("fdpo", os.path.join(out, "fdpo"), world, stage=None,
                              **prepare_worker(section, {"use_cpu": False}))
    trainer.train()
    checksum = torch.tensor([sum(p.double().sum().item() for p in trainer.model.parameters())], dtype=torch.float64)
    gathered = [torch.zeros(1, dtype=torch.float64) for _ in range(world)]
    dist.all_gather(gathered, checksum)
    if dist.get_rank() == 0:
        result = {"world": world, "distributed_type": str(trainer.accelerator.distributed_type),
                  "losses": zero_runs.losses(trainer), "checksums": [g.item() for g in gathered]}
        with open(os.path.join(out, "result.json"), "w") as fh:
            json.dump(result, fh)


if __name__ == "__main__":
    main(sys.argv[1])
