"""Multi-process launching for `alignkit train`: the recipe's `distributed` section.

    distributed:
      num_processes: 2          # per machine
      deepspeed: zero3          # zero2 | zero3 | zero3_offload | path/to/ds_config.json | null (plain DDP)
      mixed_precision: bf16     # no | bf16 | fp16 (sets the config's bf16/fp16)

`alignkit train` then re-runs itself under `torchrun` with that many processes (`--dry-run` prints the
command instead, for users with their own launcher). Multi-node: `num_machines`, `machine_rank`,
`main_process_ip`, `main_process_port`, run once per machine (the usual torchrun/accelerate arguments).

On a machine without GPU, DeepSpeed runs on its CPU accelerator with the gloo backend. accelerate then
builds a one-process state while DeepSpeed starts a world of N, and the batch-size check fails
(`train_batch_size ... 2 != 2 * 1 * 2`); the worker set-up below creates accelerate's state with the
gloo backend first and tells the Trainer to use it (`accelerator_config.use_configured_state`), which
is what makes ZeRO-2/3 work on CPUs (tested in tests/test_zero.py). On GPUs the same code path uses NCCL.
"""

from __future__ import annotations

import copy
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

_BASE = {
    "bf16": {"enabled": "auto"},
    "fp16": {"enabled": "auto"},
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
}
_ZERO2 = {"stage": 2, "overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": "auto"}
_ZERO3 = {"stage": 3, "overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": "auto",
          "stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto",
          "stage3_gather_16bit_weights_on_model_save": True}
_OFFLOAD = {"device": "cpu", "pin_memory": True}

#: the named DeepSpeed configurations; recipes/deepspeed/<name>.json holds the same (tested)
ZERO_CONFIGS: dict[str, dict[str, Any]] = {
    "zero2": {"zero_optimization": _ZERO2, **_BASE},
    "zero3": {"zero_optimization": _ZERO3, **_BASE},
    "zero3_offload": {"zero_optimization": {**_ZERO3, "offload_optimizer": _OFFLOAD, "offload_param": _OFFLOAD},
                      **_BASE},
}


def has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def deepspeed_config(spec: str, offload_optimizer: bool = False, offload_params: bool = False) -> dict:
    """The DeepSpeed config for a name (`zero2`, `zero3`, `zero3_offload`) or a JSON file, with the
    requested CPU offloads added."""
    if spec in ZERO_CONFIGS:
        cfg = copy.deepcopy(ZERO_CONFIGS[spec])
    else:
        path = Path(spec)
        if not path.is_file():
            raise ValueError(f"distributed.deepspeed: {spec!r} is neither one of {', '.join(ZERO_CONFIGS)} nor a "
                             "JSON file.")
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"distributed.deepspeed: {spec} is not valid JSON ({exc}).") from None
    zero = cfg.setdefault("zero_optimization", {})
    if offload_optimizer:
        zero["offload_optimizer"] = dict(_OFFLOAD)
    if offload_params:
        if zero.get("stage") != 3:
            raise ValueError("distributed.offload_params needs ZeRO stage 3 (deepspeed: zero3).")
        zero["offload_param"] = dict(_OFFLOAD)
    if not has_gpu():
        for section in ("offload_optimizer", "offload_param"):
            if section in zero:
                zero[section]["pin_memory"] = False  # no pinned memory without a GPU
    return cfg


def check_distributed(recipe) -> None:
    """Refuse what cannot run, before anything is launched (ValueError with the fix): a DeepSpeed name or file
    that does not resolve (with one process too: ZeRO on one process is applied, for its memory savings),
    reference precomputation under DeepSpeed with several processes."""
    dist = recipe.distributed
    ds = (dist.deepspeed if dist is not None else None) or recipe.training.get("deepspeed")
    if dist is not None and dist.deepspeed:
        deepspeed_config(dist.deepspeed, dist.offload_optimizer, dist.offload_params)
    elif dist is not None and (dist.offload_optimizer or dist.offload_params):
        raise ValueError("distributed.offload_optimizer / offload_params need distributed.deepspeed (e.g. zero3).")
    world = dist.num_processes * dist.num_machines if dist is not None else 1
    if ds and world > 1 and recipe.training.get("precompute_ref_log_probs"):
        raise ValueError("precompute_ref_log_probs is not supported under DeepSpeed with several processes; set "
                         "precompute_ref_log_probs: false (the reference then runs each step, sharded under ZeRO-3).")


def needs_launch(section) -> bool:
    """Whether `alignkit train` relaunches itself: several processes, or DeepSpeed (which needs a launched
    process group even for one process)."""
    return section is not None and (section.num_processes * section.num_machines > 1 or bool(section.deepspeed))


def is_launched_worker() -> bool:
    """True inside a process started by torchrun / accelerate / deepspeed."""
    return "LOCAL_RANK" in os.environ


def launch_command(section, recipe_path: str, overrides: list[str]) -> tuple[list[str], dict[str, str]]:
    """The torchrun command (and extra environment) that runs this recipe on `num_processes` processes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={section.num_processes}"]
    if section.num_machines > 1:
        cmd += [f"--nnodes={section.num_machines}", f"--node_rank={section.machine_rank}",
                f"--master_addr={section.main_process_ip or '127.0.0.1'}",
                f"--master_port={section.main_process_port}"]
    else:
        cmd += ["--standalone"]
    cmd += ["-m", "alignkit.cli", "train", recipe_path]
    for item in overrides:
        cmd += ["--set", item]
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if section.deepspeed:
        env["ACCELERATE_USE_DEEPSPEED"] = "true"
        if not has_gpu():
            env["DS_ACCELERATOR"] = "cpu"
    return cmd, env


def format_command(cmd: list[str], env: dict[str, str]) -> str:
    return " ".join([f"{k}={shlex.quote(v)}" for k, v in env.items()] + [shlex.quote(c) for c in cmd])


def prepare_worker(section, training: dict[str, Any]) -> dict[str, Any]:
    """Inside a launched process: set up accelerate's state (gloo on CPUs) and return the training
    config's keyword arguments with DeepSpeed and precision filled in."""
    training = dict(training)
    if section.mixed_precision != "no":
        training[section.mixed_precision] = True
    gpu = has_gpu()
    if section.deepspeed:
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        if not gpu:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        training["deepspeed"] = deepspeed_config(section.deepspeed, section.offload_optimizer, section.offload_params)
    elif not gpu:
        training["use_cpu"] = True
    if not gpu:
        from accelerate import PartialState

        # Without DeepSpeed the state must be marked as CPU: a plain gloo PartialState is accelerate's
        # single-process state (DistributedType.NO) even in a world of N, and each rank then trains its own copy
        # with no gradient synchronisation (tests/test_ddp.py). Under DeepSpeed the engine's type is used.
        PartialState(backend="gloo", **({} if section.deepspeed else {"cpu": True}))
        accel = dict(training.get("accelerator_config") or {})
        accel["use_configured_state"] = True
        training["accelerator_config"] = accel
    return training
