"""What a run needs before it starts (`alignkit plan RECIPE`): parameters, memory per device, tokens per step and,
for a stated GPU count and model FLOPs utilisation, the time per step. Nothing here loads weights: the models are
built on PyTorch's meta device from their configs (accelerate's `init_empty_weights`), LoRA adapters included.

Memory per device, for each model of the run (the one being trained; a frozen reference; PPO's value and reward
models), in bytes per parameter P of that model and N data-parallel devices:

* weights: the load precision (4 for float32, 2 for bfloat16/float16; 2 under DeepSpeed with bf16/fp16, which keeps
  the fp32 copy with the optimizer). ZeRO-3 keeps 1/N of them on each device, plus the largest layer gathered while it
  runs (4 bytes per parameter of that layer, as DeepSpeed's estimator counts it); `offload_params` moves them to the
  CPU.
* gradients (trainable parameters only): one per weight, in the weights' precision; with 16-bit weights under
  DeepSpeed, ZeRO-1/2 add a 4-byte fp32 copy and ZeRO-3 keeps the fp32 one alone. ZeRO-2 and ZeRO-3 keep 1/N.
* optimizer states (trainable only): AdamW's two moments (4 bytes each in fp32, else in the weights' precision) and,
  under DeepSpeed, a 4-byte fp32 master copy of the weights (also in float32 under ZeRO-1/2, where DeepSpeed clones
  the partition; measured). ZeRO-1/2/3 keep 1/N; `offload_optimizer` moves them to the CPU.

With 16-bit mixed precision and every weight trainable this is DeepSpeed's own count (2 + 18/N bytes per parameter
under ZeRO-2, 4 x largest layer + 18/N under ZeRO-3; tests/test_plan.py checks it), and `plan` prints DeepSpeed's
estimator beside it
(`estimate_zero2_model_states_mem_needs`, `estimate_zero3_model_states_mem_needs`) when DeepSpeed is installed.

Activations (per device, one micro-batch): each layer of the trained model keeps, per token, its inputs to the two
norms, the attention's query/key/value and output, the MLP's gate, up and activated outputs and the residuals:
about `6 h + 2 kv + 4 i` values (h hidden size, kv key/value width, i MLP width), plus `heads x S` attention
probabilities per token with eager attention (not with SDPA/flash, which recompute them). Gradient checkpointing keeps
only each layer's input (h values per token) and one layer's full set at a time. The output layer adds the logits
and their log-softmax (2 x vocabulary values per token, in float32). These are the formulas of Korthikanti et al.,
"Reducing Activation Recomputation in Large Transformer Models" (2022), written for the model's own shapes; they are
an estimate, compared with measured peaks in docs/distributed.md.

Step time: the model FLOPs of a step (the convention of alignkit.metrics.perf: 6 N per trained token plus attention,
2 N per token of a frozen model's forward, 2 N more per token with gradient checkpointing) over the devices' dense
bf16 peak times the stated MFU. On-policy methods also generate (PPO, online mDPO): that time is not in the estimate.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

__all__ = ["GPUS", "ModelEstimate", "Plan", "gpu_peak_tflops", "parse_gpus", "plan_recipe", "format_plan",
           "EstimateError"]

GB = 1e9

#: memory (GB) of the GPUs `--gpus` knows; their dense bf16 peaks are alignkit.metrics.perf.DEVICE_PEAK_TFLOPS'
GPUS: dict[str, float] = {"H100": 80.0, "H200": 141.0, "B200": 180.0, "A100": 80.0, "A100-40GB": 40.0, "L40S": 48.0,
                          "L4": 24.0, "MI300X": 192.0}


def gpu_peak_tflops(name: str) -> float:
    """The dense bf16 peak of a `--gpus` name, from the table `perf/mfu` uses."""
    from ..metrics.perf import DEVICE_PEAK_TFLOPS

    return DEVICE_PEAK_TFLOPS[name.split("-")[0]]


class EstimateError(ValueError):
    """A plan that cannot be made (an unknown GPU name, a model without a config); one line with the fix."""


def parse_gpus(spec: str) -> tuple[int, int, str]:
    """`8xH100` (8 GPUs on one machine) or `2x8xH100` (2 machines of 8): (machines, GPUs per machine, name)."""
    m = re.fullmatch(r"(?:(\d+)x)?(\d+)x([A-Za-z0-9-]+)", spec.strip())
    names = {k.lower(): k for k in GPUS}
    if not m or m.group(3).lower() not in names or int(m.group(2)) < 1 or (m.group(1) and int(m.group(1)) < 1):
        raise EstimateError(f"--gpus {spec!r}: give COUNTxNAME or MACHINESxCOUNTxNAME, e.g. 8xH100 or 2x8xH100; "
                            f"known GPUs: {', '.join(GPUS)}.")
    return int(m.group(1) or 1), int(m.group(2)), names[m.group(3).lower()]


@dataclasses.dataclass
class ModelEstimate:
    """One model of the run: its parameters and what it costs per device."""

    role: str              # "policy", "reference", "value model", "reward model"
    name: str
    params: int
    trainable: int
    largest_layer: int
    weights_gb: float = 0.0
    gradients_gb: float = 0.0
    optimizer_gb: float = 0.0
    cpu_gb: float = 0.0    # what offloading puts in the CPU's memory, per device


@dataclasses.dataclass
class Plan:
    method: str
    devices: int                   # data-parallel processes (all machines)
    machines: int
    zero_stage: int | None         # None: no DeepSpeed
    precision: str                 # "float32", "bf16 mixed", "bfloat16", ...
    models: list[ModelEstimate]
    activations_gb: float
    sequences_per_micro_batch: int
    sequence_length: int
    tokens_per_step: int           # upper bound: every sequence at sequence_length
    gradient_checkpointing: bool
    flops_per_step: float
    length_from: str = ""
    gpu: str | None = None
    gpu_memory_gb: float | None = None
    mfu: float | None = None
    step_seconds: float | None = None
    deepspeed_estimate_gb: float | None = None   # DeepSpeed's estimator for the trained model (16-bit, all trainable)
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def total_gb(self) -> float:
        return sum(m.weights_gb + m.gradients_gb + m.optimizer_gb for m in self.models) + self.activations_gb

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["total_gb"] = self.total_gb
        return d


# ---- the models, on the meta device ----------------------------------------------------------------------

def _count(model) -> tuple[int, int, int]:
    """(parameters, trainable, largest layer's own parameters) of a model, each tensor once (tied weights)."""
    seen: dict[int, tuple[int, bool]] = {}
    for p in model.parameters():
        seen.setdefault(id(p), (p.numel(), p.requires_grad))
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)
    return sum(n for n, _ in seen.values()), sum(n for n, t in seen.values() if t), largest


def _shape(config) -> dict[str, int]:
    config = getattr(config, "text_config", None) or config
    h = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 1)
    head_dim = getattr(config, "head_dim", None) or h // max(heads, 1)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return {"layers": getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 0), "hidden": h,
            "heads": heads, "kv": kv_heads * head_dim, "mlp": getattr(config, "intermediate_size", None) or 4 * h,
            "vocab": getattr(config, "vocab_size", 0)}


# ---- memory ----------------------------------------------------------------------------------------------

def _bytes(dtype: str) -> int:
    return 4 if dtype in ("float32", "auto-float32") else 2


def _states(m: ModelEstimate, n: int, stage: int | None, weight_bytes: int, mixed_16bit: bool,
            offload_optimizer: bool, offload_params: bool) -> None:
    """Fill weights/gradients/optimizer (per device) of one model, as the module docstring counts them."""
    ds = stage is not None
    wb = 2 if ds and mixed_16bit else weight_bytes
    shard_w = n if stage == 3 else 1
    weights = m.params * wb / shard_w + (4 * m.largest_layer if stage == 3 and n > 1 else 0)
    # 16-bit under DeepSpeed: ZeRO-1/2 keep the 16-bit gradients and an fp32 copy of their partition; ZeRO-3 only
    # the fp32 partition (DeepSpeed's estimator counts them so)
    grad_bytes = (4 if stage == 3 else wb + 4) if ds and wb == 2 else wb
    moment_bytes = 4 if (wb == 4 or ds) else wb
    master = 4 if ds and (wb == 2 or stage in (1, 2)) else 0
    shard_g = n if stage in (2, 3) else 1
    shard_o = n if ds else 1
    grads = m.trainable * grad_bytes / shard_g
    optim = m.trainable * (2 * moment_bytes + master) / shard_o
    if offload_optimizer:
        m.cpu_gb += optim / GB
        optim = 0.0
    if offload_params and stage == 3:
        m.cpu_gb += m.params * wb / shard_w / GB
        weights = 4 * m.largest_layer
    m.weights_gb, m.gradients_gb, m.optimizer_gb = weights / GB, grads / GB, optim / GB


def _activations(shape: dict[str, int], seqs: int, length: int, act_bytes: int, checkpointing: bool,
                 eager: bool) -> float:
    """Activation memory (GB) of one micro-batch of `seqs` sequences of `length` tokens (module docstring)."""
    h, kv, i, layers = shape["hidden"], shape["kv"], shape["mlp"], shape["layers"]
    per_token_layer = 6 * h + 2 * kv + 4 * i + (shape["heads"] * length if eager else 0)
    tokens = seqs * length
    if checkpointing:
        layers_total = tokens * (h * layers + per_token_layer) * act_bytes
    else:
        layers_total = tokens * per_token_layer * layers * act_bytes
    logits = tokens * shape["vocab"] * (act_bytes + 4)
    return (layers_total + logits) / GB


# ---- the recipe's run ------------------------------------------------------------------------------------

#: rows of the training data whose token lengths the plan measures
SAMPLE_ROWS = 256


def _ids(tokenizer, prompt, completion=None) -> int:
    """Tokens of prompt (+ completion), as text or as a conversation."""
    conversational = isinstance(prompt if prompt is not None else completion, list)
    if conversational:
        messages = (prompt or []) + (completion or [])
        return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                 add_generation_prompt=completion is None)["input_ids"])
    return len(tokenizer((prompt or "") + (completion or ""))["input_ids"])


def _sequences(recipe, config, tokenizer) -> tuple[int, int, str]:
    """(sequences per row or prompt in a training micro-batch, tokens per sequence, where that length comes from):
    the longest of the first SAMPLE_ROWS rows of the training data, capped at the config's limits (TRL pads a batch
    to its longest sequence)."""
    from .checks import load_split

    method = recipe.method
    data = load_split(recipe, recipe.dataset.train_split)
    rows = data.select(range(min(SAMPLE_ROWS, len(data))))
    where = f"the longest of {len(rows)} training rows"
    if method in ("ppo", "online_mdpo"):
        prompt = max(_ids(tokenizer, r["prompt"]) for r in rows)
        limit = getattr(config, "max_prompt_length", None)
        prompt = min(prompt, limit) if limit else prompt
        if method == "online_mdpo":  # TRL's GRPO: per_device_train_batch_size already counts completions
            return 1, prompt + config.max_completion_length, f"{where}' prompts + max_completion_length"
        return 1, prompt + config.response_length, f"{where}' prompts + response_length"
    limit = getattr(config, "max_length", None)
    if method == "mdpo":
        per_row, longest = 0, 0
        for r in rows:
            completions = list(r["chosen"]) + list(r["rejected"])
            per_row = max(per_row, len(completions))
            if getattr(config, "shared_prefix", False):  # the prompt once, then every completion: one packed row
                prompt = _ids(tokenizer, r["prompt"])
                longest = max(longest, prompt + sum(_ids(tokenizer, r["prompt"], c) - prompt for c in completions))
            else:
                longest = max(longest, max(_ids(tokenizer, r["prompt"], c) for c in completions))
        if getattr(config, "shared_prefix", False):
            return 1, longest, f"{where}, each group packed into one row (shared_prefix)"
        return per_row, min(longest, limit) if limit else longest, where
    if getattr(config, "shared_prefix", False):  # a pair in one packed row: the prompt once, then both completions
        longest = 0
        for r in rows:
            prompt = _ids(tokenizer, r.get("prompt"))
            longest = max(longest, sum(min(_ids(tokenizer, r.get("prompt"), r[side]), limit or 10**9) - prompt
                                       for side in ("chosen", "rejected")) + prompt)
        return 1, longest, f"{where}, each pair packed into one row (shared_prefix)"
    longest = max(_ids(tokenizer, r.get("prompt"), r[side]) for r in rows for side in ("chosen", "rejected"))
    return 2, min(longest, limit) if limit else longest, where


def plan_recipe(recipe, gpus: str | None = None, mfu: float = 0.4, seq_len: int | None = None) -> Plan:
    """The plan of a recipe (alignkit.run.recipe.Recipe) on its `distributed` section's devices, or on `gpus`
    (`8xH100`, `2x8xH100`): parameters, memory per device, tokens and FLOPs per step, and with a GPU the step time at
    `mfu`. Loads configs and (for mDPO's group sizes) the first row of the data, never weights."""
    from ..metrics.perf import matmul_parameters, training_flops
    from ..models import empty_model, model_config
    from .recipe import ON_POLICY_METHODS, REWARD_MODEL_METHODS

    from .plan import check_distributed
    from .recipe import RecipeError

    try:
        check_distributed(recipe)  # a DeepSpeed name or file that does not resolve, as train refuses it
    except ValueError as exc:
        raise RecipeError(str(exc)) from None
    config = recipe.build_config() if gpus is None else _gpu_settings(recipe)
    dist = recipe.distributed
    machines, per_machine = (dist.num_machines, dist.num_processes) if dist is not None else (1, 1)
    gpu = None
    if gpus is not None:
        machines, per_machine, gpu = parse_gpus(gpus)
    n = machines * per_machine
    stage = None
    ds_spec = (dist.deepspeed if dist is not None else None) or recipe.training.get("deepspeed")
    offload_optimizer = bool(dist and dist.offload_optimizer)
    offload_params = bool(dist and dist.offload_params)
    if ds_spec:
        from .plan import deepspeed_config

        ds = deepspeed_config(ds_spec, offload_optimizer, offload_params) if isinstance(ds_spec, str) else ds_spec
        zero = ds.get("zero_optimization", {})
        stage = int(zero.get("stage", 0))
        offload_optimizer = offload_optimizer or "offload_optimizer" in zero
        offload_params = offload_params or "offload_param" in zero
    m = recipe.model
    policy_config = model_config(m.name_or_path, "model.name_or_path", m.trust_remote_code, m.revision)
    dtype = m.dtype if m.dtype != "auto" else str(getattr(policy_config, "dtype", None) or
                                                 getattr(policy_config, "torch_dtype", None) or "float32")
    dtype = dtype.replace("torch.", "")
    mixed = bool(config.bf16 or config.fp16) or bool(dist and dist.mixed_precision != "no")
    weight_bytes = _bytes(dtype)
    precision = f"{'bf16' if config.bf16 else 'fp16'} mixed" if mixed and weight_bytes == 4 else dtype
    if mixed and stage is not None:
        precision = f"{'bf16' if config.bf16 else 'fp16'} (DeepSpeed, fp32 master weights)"
    peft_config = recipe.build_peft_config()
    kind = "seqcls" if recipe.method in REWARD_MODEL_METHODS else "causal"
    trained = empty_model(policy_config, kind, peft_config)
    params, trainable, largest = _count(trained)
    role = "reward model (trained)" if kind == "seqcls" else "policy"
    models = [ModelEstimate(role, m.name_or_path, params, trainable, largest)]
    notes: list[str] = []
    base_params = params - (trainable if peft_config is not None else 0)
    if recipe.method not in REWARD_MODEL_METHODS and peft_config is None:
        name = m.ref_name_or_path or m.name_or_path
        # a copy of the policy unless another model is named (no LoRA here: the trained model is the policy itself)
        ref_params = (params, 0, largest) if not m.ref_name_or_path else _count(empty_model(
            model_config(name, "model.ref_name_or_path", m.trust_remote_code), "causal"))
        models.append(ModelEstimate("reference (frozen)", name, ref_params[0], 0, ref_params[2]))
    if recipe.method in ON_POLICY_METHODS:
        r = recipe.reward
        if r.model:
            cfg = _config_or_policy(r.model, "reward.model", m, policy_config, notes)
            rp = _count(empty_model(cfg, "seqcls"))
            models.append(ModelEstimate("reward model (frozen)", r.model, rp[0], 0, rp[2]))
        if recipe.method == "ppo":
            name = r.value_model or r.model or m.name_or_path
            cfg = _config_or_policy(name, "reward.value_model", m, policy_config, notes)
            vp = _count(empty_model(cfg, "seqcls"))
            models.append(ModelEstimate("value model (trained)", name, vp[0], vp[0], vp[2]))
    for est in models:
        _states(est, n, stage, weight_bytes, mixed, offload_optimizer, offload_params)
    if peft_config is not None:
        notes.append("LoRA: the reference is the policy with its adapter disabled (no second copy).")
    from ..models import model_tokenizer

    per_row, length, length_from = _sequences(recipe, config, model_tokenizer(m.name_or_path, m.trust_remote_code,
                                                                            m.revision))
    if seq_len is not None:
        length, length_from = seq_len, "--seq-len"
    seqs = per_row * config.per_device_train_batch_size
    shape = _shape(policy_config)
    from .._adapter import attn_implementation

    eager = (m.attn_implementation or attn_implementation(trained)) == "eager"
    act_bytes = 2 if mixed else weight_bytes
    checkpointing = bool(config.gradient_checkpointing)
    activations = _activations(shape, seqs, length, act_bytes, checkpointing, eager)
    steps_per_update = config.gradient_accumulation_steps * (getattr(config, "num_mini_batches", 1) or 1)
    tokens = seqs * length * steps_per_update * n
    # FLOPs: training the policy (6 N per token + attention), frozen forwards (2 N per token), recomputation
    matmul = matmul_parameters(trained)
    flops = training_flops(trained, tokens, tokens * length, n=matmul)  # 6 N per token and the attention products
    if checkpointing:
        flops += 2.0 * matmul * tokens
    for e in models[1:]:  # frozen models run forward (2 N per token); PPO's value model trains (6 N)
        flops += (6.0 if e.trainable else 2.0) * e.params * tokens
    if peft_config is not None and recipe.method not in REWARD_MODEL_METHODS:
        flops += 2.0 * base_params * tokens  # the reference pass: the policy with its adapter off
    plan = Plan(method=recipe.method, devices=n, machines=machines, zero_stage=stage, precision=precision,
                models=models, activations_gb=activations, sequences_per_micro_batch=seqs, sequence_length=length,
                tokens_per_step=tokens, gradient_checkpointing=checkpointing, flops_per_step=flops, notes=notes,
                length_from=length_from)
    if gpu is not None:
        plan.gpu, plan.gpu_memory_gb, plan.mfu = gpu, GPUS[gpu], mfu
        plan.step_seconds = flops / (n * gpu_peak_tflops(gpu) * 1e12 * mfu)
    if stage in (2, 3):
        plan.deepspeed_estimate_gb = deepspeed_estimate(params, largest, per_machine, machines, stage,
                                                        offload_optimizer, offload_params)
    return plan


def _gpu_settings(recipe):
    """The config values a plan reads, for GPUs this machine may not have: the config class's defaults with the
    recipe's values (building the config itself would check bf16 against this machine's devices). An unset bf16 is
    TRL's default on a GPU: on, unless fp16 is."""
    import types

    from .recipe import config_class

    values = {f.name: f.default for f in dataclasses.fields(config_class(recipe.method))
              if f.init and f.default is not dataclasses.MISSING}
    values.update(recipe.training)
    if values.get("bf16") is None:
        values["bf16"] = not values.get("fp16")
    return types.SimpleNamespace(**values)


def _config_or_policy(name: str, key: str, m, policy_config, notes: list[str]):
    """The config of a reward or value model; one that does not exist yet (the output_dir of a reward-model run still
    to come) is counted with the policy's architecture, and the plan says so."""
    from ..models import ModelError, model_config

    try:
        return model_config(name, key, m.trust_remote_code)
    except ModelError:
        if name.startswith(("builtin:", "/")) or "://" in name:
            raise
        notes.append(f"{key}: {name} does not exist yet (a reward-model run still to come?); counted with the "
                     f"policy's architecture.")
        return policy_config


def deepspeed_estimate(params: int, largest_layer: int, per_machine: int, machines: int, stage: int,
                       offload_optimizer: bool = False, offload_params: bool = False) -> float | None:
    """DeepSpeed's own estimate of the model states per GPU (GB), for `params` parameters all trained in 16-bit mixed
    precision; None when DeepSpeed is not installed."""
    try:
        if stage == 3:
            from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

            _, gpu, _ = estimate_zero3_model_states_mem_needs(params, largest_layer, per_machine, machines,
                                                              cpu_offload=offload_optimizer,
                                                              cpu_offload_params=offload_params, zero_init=True)
        else:
            from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

            _, gpu = estimate_zero2_model_states_mem_needs(params, per_machine, machines,
                                                           cpu_offload=offload_optimizer)
    except ImportError:
        return None
    return gpu / GB


# ---- printing ----------------------------------------------------------------------------------------------

def _gb(x: float) -> str:
    return "0" if x == 0 else f"{x:.3g}" if x < 100 else f"{x:.0f}"


def _count_str(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def format_plan(plan: Plan, recipe_name: str) -> str:
    zero = f"DeepSpeed ZeRO-{plan.zero_stage}" if plan.zero_stage is not None else \
        ("DDP" if plan.devices > 1 else "one process")
    where = f"{plan.machines} x {plan.devices // plan.machines} {plan.gpu or 'devices'}" if plan.machines > 1 else \
        f"{plan.devices} {plan.gpu or 'device' + ('s' if plan.devices > 1 else '')}"
    lines = [f"{recipe_name}: {plan.method} on {where}, {zero}, {plan.precision}"
             f"{', gradient checkpointing' if plan.gradient_checkpointing else ''}", "",
             "| model | parameters | trainable | weights GB | gradients GB | optimizer GB | offloaded to CPU GB |",
             "|---|---|---|---|---|---|---|"]
    for m in plan.models:
        lines.append(f"| {m.role}: {m.name} | {_count_str(m.params)} | {_count_str(m.trainable)} | "
                     f"{_gb(m.weights_gb)} | {_gb(m.gradients_gb)} | {_gb(m.optimizer_gb)} | {_gb(m.cpu_gb)} |")
    lines += ["", f"activations: {_gb(plan.activations_gb)} GB per device ({plan.sequences_per_micro_batch} sequences "
                  f"of {plan.sequence_length} tokens per micro-batch: {plan.length_from})",
              f"per device: {_gb(plan.total_gb)} GB"
              + (f" of the {plan.gpu}'s {plan.gpu_memory_gb:.0f} GB: "
                 + ("fits" if plan.total_gb <= plan.gpu_memory_gb else
                    f"does NOT fit ({_gb(plan.total_gb - plan.gpu_memory_gb)} GB over)") if plan.gpu else ""),
              f"tokens per optimizer step: {plan.tokens_per_step:,} (every sequence at that length)",
              f"model FLOPs per step: {plan.flops_per_step:.3g}"]
    if plan.step_seconds is not None:
        lines.append(f"time per step at {plan.mfu:.0%} MFU: {plan.step_seconds:.3g} s "
                     f"({plan.tokens_per_step / plan.step_seconds:,.0f} tokens/s)")
    if plan.deepspeed_estimate_gb is not None:
        lines.append(f"DeepSpeed's estimator for the trained model (every weight trained, 16-bit mixed precision): "
                     f"{_gb(plan.deepspeed_estimate_gb)} GB of model states per GPU")
    lines += [f"note: {n}" for n in plan.notes]
    lines.append("estimates: weights, gradients and optimizer states as DeepSpeed counts them; activations from the "
                 "model's shape (docs/distributed.md compares them with measured peaks)")
    return "\n".join(lines)

