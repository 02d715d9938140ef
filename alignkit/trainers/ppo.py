"""PPO with f-divergence penalties (thesis 2.6.1, docs/methods.md section 1), driven by (causal) reward models.

TRL removed its PPOTrainer in 1.13. This one keeps the constructor and config fields of TRL's former
`trl.experimental.ppo.PPOTrainer` (policy, ref_model, reward_model, value_model, train_dataset of prompts,
processing_class, peft_config; kl_coef, kl_estimator, cliprange, ...), so a script that used it changes
its import, and adds the f-divergence constraint of the thesis:

* `divergence_penalty: reward` subtracts `kl_coef * [g(t) - g'(1)(t - 1)]` per token from the reward
  (t = pi_ref / pi at the sampled token); for reverse KL `kl_estimator` picks the classic `k1`
  (log pi - log pi_ref) or `k3` (the estimator above), exactly as TRL's PPO did;
* `divergence_penalty: loss` keeps the reward and adds `kl_coef` times the sequence estimate (the sum of
  the per-token estimates under the current policy) to the loss. The thesis recommends it for forward
  KL and JS, whose reward penalty grows much faster than reverse KL's.

One `global_step` is one PPO iteration: generate for a batch of prompts, score, compute advantages (GAE),
then `num_ppo_epochs` passes of `num_mini_batches` clipped policy/value updates.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
from transformers import GenerationConfig, Trainer, TrainerState, TrainingArguments
from transformers.trainer_utils import TrainOutput, get_last_checkpoint

from ..divergences import get_divergence
from ..losses import (SEQUENCE_PENALTY_NORMALIZATIONS, gae_advantages, masked_mean, masked_whiten, ppo_policy_loss,
                      ppo_value_loss, sequence_divergence_penalty)
from .. import _adapter
from ._common import (PPO_RULES, TRAINING_RULES, ConfigResolverMixin, base_model_name, check_ranges,
                      default_precision_for_this_machine, describe_base_model)
from ._perf import PerfArguments, PerfMetricsMixin
from ._samples import write_sample_table

__all__ = ["OnPolicyConfig", "PPOConfig", "PPOTrainer"]

RewardFunc = Callable[[list[str], list[str]], list[float]]


@dataclass
class OnPolicyConfig(PerfArguments, TrainingArguments):
    r"""The fields every on-policy alignkit trainer shares (TRL's former `OnPolicyConfig`): where the models come
    from, how responses are sampled and scored, and the f-divergence of the constraint. [`PPOConfig`] and
    `OnlineMultiSampleConfig` add their own optimisation fields.

    alignkit fields:
        divergence (`str`, defaults to `"reverse_kl"`), alpha (`float`, *optional*): the f-divergence of the
            constraint, as in `FDPOConfig`.
        length_penalty (`float`, defaults to `0.0`): subtracted from the score per response token (the
            thesis' length-penalty baseline).
        top_k (`int`, defaults to `0`): sample from the `top_k` most likely tokens, as in TRL's `GRPOConfig`; 0
            (TRL's former PPO) samples from all of them, 1 is greedy: the rollouts then do not depend on how the
            prompts are split over processes.
    """

    #: the learning rate an unset `learning_rate` becomes (TRL's PPO default)
    _default_learning_rate = 3e-6

    # TRL's former OnPolicyConfig fields
    exp_name: str = field(default="ppo", metadata={"help": "Experiment name: the run name when run_name is unset."})
    reward_model_path: str | None = field(default=None, metadata={
        "help": "Folder or hub id of the reward model, loaded when no reward_model is passed (and of the value "
                "model's initialisation when no value_model is passed)."})
    sft_model_path: str | None = field(default=None, metadata={
        "help": "Folder or hub id of the policy (and reference), loaded when no model (ref_model) is passed."})
    model_adapter_name: str | None = field(default=None, metadata={"help": "Not supported (multi-adapter PEFT)."})
    ref_adapter_name: str | None = field(default=None, metadata={"help": "Not supported (multi-adapter PEFT)."})
    num_sample_generations: int = field(default=10, metadata={"help": "Tables of sample completions during training "
                                                                      "(output_dir/samples, W&B); 0 turns them off."})
    ds3_gather_for_generation: bool = field(default=True, metadata={
        "help": "Under DeepSpeed ZeRO-3: gather the policy's weights for generation (faster; the policy must fit "
                "on one device), else generate from the sharded weights with the ranks kept in step."})
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Processes for dataset tokenization."})
    total_episodes: int | None = field(default=None, metadata={"help": "Prompts to generate for (sets max_steps)."})
    local_rollout_forward_batch_size: int = field(default=64, metadata={"help": "Rows per no-grad forward."})
    response_length: int = field(default=53, metadata={"help": "Maximum new tokens per response."})
    stop_token: str | None = field(default=None, metadata={"help": "'eos' to stop responses at the EOS token."})
    stop_token_id: int | None = field(default=None, metadata={"help": "Token id that ends a response."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature."})
    top_k: int = field(default=0, metadata={"help": "Sample from the top_k most likely tokens (GRPOConfig's name); 0 "
                                                    "samples from all, 1 is greedy (the same responses whatever the "
                                                    "number of processes)."})
    missing_eos_penalty: float | None = field(default=None, metadata={"help": "Subtracted from the score of "
                                                                             "responses without a stop token."})
    max_prompt_length: int | None = field(default=512, metadata={"help": "Prompts are truncated (left) to this."})
    # alignkit
    divergence: str = field(default="reverse_kl", metadata={"help": "reverse_kl, forward_kl, jsd or alpha."})
    alpha: float | None = field(default=None, metadata={"help": "alpha in (0, 1) for divergence=alpha."})
    length_penalty: float = field(default=0.0, metadata={"help": "Score penalty per response token."})

    def __post_init__(self):
        if self.run_name is None:
            self.run_name = self.exp_name
        check_ranges(self, TRAINING_RULES, PPO_RULES)
        default_precision_for_this_machine(self)
        if self.learning_rate == TrainingArguments.learning_rate:
            self.learning_rate = self._default_learning_rate
        super().__post_init__()
        self.divergence = get_divergence(self.divergence, self.alpha).name
        if self.stop_token not in (None, "eos"):
            raise ValueError(f"stop_token must be 'eos' or unset, got {self.stop_token!r}; use stop_token_id "
                             "for another token.")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}; 0 samples from every token, 1 is greedy.")
        if self.response_length < 1:
            raise ValueError(f"response_length must be >= 1, got {self.response_length}.")
        if str(getattr(self.save_strategy, "value", self.save_strategy)) == "best":
            raise ValueError("save_strategy 'best' needs a metric_for_best_model from Trainer's evaluation loop, which "
                             "on-policy training does not run; use 'steps' or 'epoch' (an epoch is a pass over the "
                             "prompts).")
        if self.model_adapter_name or self.ref_adapter_name:
            raise ValueError("model_adapter_name/ref_adapter_name (several adapters on one model) are not supported; "
                             "pass peft_config (the reference is the policy with its adapter disabled) or a "
                             "ref_model.")

    @property
    def local_batch_size(self) -> int:
        """Prompts per process per iteration."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps


@dataclass
class PPOConfig(OnPolicyConfig):
    r"""Configuration for [`PPOTrainer`]: the fields of TRL's former `PPOConfig`, plus the f-divergence.

    Batch sizes follow TRL's PPO: one iteration generates for `per_device_train_batch_size *
    gradient_accumulation_steps * num_mini_batches` prompts per process; each mini-batch update takes
    `gradient_accumulation_steps` micro-batches of `per_device_train_batch_size`. `max_steps` counts
    iterations (or set `total_episodes`, the number of prompts to generate for).

    alignkit fields (besides those of [`OnPolicyConfig`]):
        divergence_penalty (`str`, defaults to `"reward"`): `reward` (per-token penalty in the reward) or
            `loss` (sequence estimate added to the loss).
        divergence_penalty_normalization (`str`, defaults to `"length_plus_one"`): with `divergence_penalty:
            loss`, each sequence's summed divergence estimate is divided by (response length + 1), as the thesis'
            own code does, so `kl_coef` weighs a per-token average; `sum` keeps the sum (a `kl_coef` then weighs
            about `response length + 1` times more).
    """

    # TRL's former PPOConfig fields
    num_mini_batches: int = field(default=1, metadata={"help": "Mini-batches per PPO epoch."})
    num_ppo_epochs: int = field(default=4, metadata={"help": "Passes over each rollout batch."})
    whiten_rewards: bool = field(default=False, metadata={"help": "Whiten the per-token rewards."})
    kl_coef: float = field(default=0.05, metadata={"help": "Weight of the divergence penalty."})
    kl_estimator: str = field(default="k1", metadata={"help": "k1 or k3 (reverse KL, reward placement)."})
    cliprange: float = field(default=0.2, metadata={"help": "Policy ratio clip range."})
    vf_coef: float = field(default=0.1, metadata={"help": "Value loss weight."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Value clip range."})
    gamma: float = field(default=1.0, metadata={"help": "Discount factor."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda."})
    # alignkit
    divergence_penalty: str = field(default="reward", metadata={"help": "reward or loss."})
    divergence_penalty_normalization: str = field(
        default="length_plus_one",
        metadata={"help": "Loss placement: divide each sequence's penalty by (length + 1) (the thesis' code), or sum."})

    def __post_init__(self):
        super().__post_init__()
        if self.divergence_penalty not in ("reward", "loss"):
            raise ValueError(f"divergence_penalty must be 'reward' or 'loss', got {self.divergence_penalty!r}.")
        if self.divergence_penalty_normalization not in SEQUENCE_PENALTY_NORMALIZATIONS:
            raise ValueError(f"divergence_penalty_normalization must be one of {', '.join(SEQUENCE_PENALTY_NORMALIZATIONS)}"
                             f", got {self.divergence_penalty_normalization!r}.")
        if self.kl_estimator not in ("k1", "k3"):
            raise ValueError(f"kl_estimator must be 'k1' or 'k3', got {self.kl_estimator!r}.")
        for name in ("num_mini_batches", "num_ppo_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}.")

    @property
    def local_batch_size(self) -> int:
        """Prompts per process per PPO iteration."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * self.num_mini_batches


def _positions(mask: torch.Tensor) -> torch.Tensor:
    # left padding: positions count real tokens only
    return (mask.cumsum(1) - 1).clamp(min=0)


def response_logprobs(model, ids, mask, context_len: int, temperature: float | None):
    """Log-probs of the response tokens under temperature-scaled logits (as sampled), and the token entropy;
    `temperature=None`: the model's own logits, unscaled."""
    out = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=False)
    logits = out.logits[:, context_len - 1:-1]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # float32 at least (float64 stays)
    if temperature is not None:
        logits = logits / (temperature + 1e-7)
    logp_all = logits.log_softmax(-1)
    logp = logp_all.gather(-1, ids[:, context_len:].unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def response_values(value_model, ids, mask, context_len: int):
    """Per-token values: the value model's score head applied to every position's last hidden state."""
    backbone = getattr(value_model, value_model.base_model_prefix)
    hidden = backbone(input_ids=ids, attention_mask=mask, position_ids=_positions(mask),
                      use_cache=False).last_hidden_state
    head = value_model.score if hasattr(value_model, "score") else value_model.classifier
    return head(hidden).squeeze(-1)[:, context_len - 1:-1].float()


class PolicyOnly(nn.Module):
    """The policy alone, with the attribute layout of `PolicyAndValue` (`.policy`), for on-policy trainers without a
    value model: the training forward goes through the (DDP-)wrapped module. Returns the response tokens' log-probs
    and entropies under `temperature`."""

    def __init__(self, policy):
        super().__init__()
        self.policy = policy

    @property
    def config(self):
        return self.policy.config

    def forward(self, input_ids, attention_mask, context_len: int, temperature: float | None):
        return response_logprobs(self.policy, input_ids, attention_mask, context_len, temperature)


class PolicyAndValue(nn.Module):
    """Policy and value model as one module, so that one optimizer (and one checkpoint) holds both, and the
    training forward goes through the (DDP-)wrapped module, which is what synchronises gradients."""

    def __init__(self, policy, value_model):
        super().__init__()
        self.policy = policy
        self.value_model = value_model

    @property
    def config(self):
        return self.policy.config

    def forward(self, input_ids, attention_mask, context_len: int, temperature: float):
        logp, _ = response_logprobs(self.policy, input_ids, attention_mask, context_len, temperature)
        return logp, response_values(self.value_model, input_ids, attention_mask, context_len)


#: the divergences estimated from every batch of rollouts (divergence/<name>), alpha at 0.5
ESTIMATED_DIVERGENCES = ("reverse_kl", "forward_kl", "jsd", "alpha")


def _divergence_estimates(logr: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per sequence, the unbiased estimate of each divergence of `ESTIMATED_DIVERGENCES` from the reference."""
    return {name: (get_divergence(name, 0.5 if name == "alpha" else None).estimator(logr) * mask).sum(1)
            for name in ESTIMATED_DIVERGENCES}


#: the parts of a PPO iteration logged as time/<part> (gather: ZeRO-3 weight gathering, inside generation)
_TIMED_PARTS = ("generation", "gather", "forward", "scoring", "optimisation")


def _now() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


class PPOTrainer(PerfMetricsMixin, ConfigResolverMixin, Trainer):
    """PPO for causal LMs with an f-divergence constraint; TRL's former experimental PPOTrainer API.

    Example:
        ```python
        from alignkit import PPOConfig, PPOTrainer      # was: from trl.experimental.ppo import ...

        trainer = PPOTrainer(args=PPOConfig(output_dir="ppo", divergence="jsd", divergence_penalty="loss"),
                             processing_class=tokenizer, model=policy, ref_model=ref, reward_model=rm,
                             value_model=value, train_dataset=prompts)
        trainer.train()
        ```

    `reward_model` is a sequence-classification model with one output (e.g. a `CausalRewardTrainer`
    output), or a callable `(prompts, completions) -> list[float]` on decoded text. `train_dataset` has
    a `prompt` column (text or conversational) or already tokenized `input_ids`.

    `eval_dataset` (prompts, or a dict of them) is evaluated by `evaluate()`: every `eval_steps` with
    `eval_strategy: steps`, after each pass over the prompts with `epoch`; it reports `eval_objective/scores`,
    `eval_divergence/<name>`, `eval_response/length` and `eval_objective/entropy`. `num_sample_generations`
    tables of completions go to `output_dir/samples/` (and W&B). `data_collator`, if given, turns a list of
    tokenized rows (`input_ids`) into a left-padded batch (`input_ids`, `attention_mask`). Checkpoints follow
    `save_strategy` (`steps`, `epoch` or `no`) and resume with `train(resume_from_checkpoint=...)`.

    Under DeepSpeed ZeRO-2/3 policy and value model train as one engine; under ZeRO-3 the reference and reward
    model are sharded too, generation gathers the policy (`ds3_gather_for_generation`) or runs from the shards
    with `synced_gpus`, and `save_model` must be called on every rank.
    """

    config_class = PPOConfig
    _config_with_article = "a PPOConfig"
    _default_run_suffix = "PPO"
    _tag_names = ["trl", "ppo", "alignkit"]

    def __init__(self, args: PPOConfig | None = None, processing_class=None, model=None, ref_model=None,
                 reward_model: nn.Module | RewardFunc | None = None, train_dataset=None, value_model=None,
                 data_collator=None, eval_dataset=None, optimizers=(None, None), callbacks=None,
                 peft_config=None):
        who = type(self).__name__
        if args is not None and isinstance(args, OnPolicyConfig):
            model, ref_model, reward_model, value_model = self._load_from_paths(
                args, model, ref_model, reward_model, value_model, peft_config, self._uses_value_model)
        if model is None:
            raise ValueError(f"{who} needs the policy as `model` (or `sft_model_path` in the config).")
        args = self._resolve_args(model, args)
        if processing_class is None:
            raise ValueError(f"{who} needs `processing_class` (the policy's tokenizer).")
        tok = getattr(processing_class, "tokenizer", processing_class)
        if tok.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set one, e.g. `tokenizer.pad_token = "
                             "tokenizer.eos_token`, before building the trainer.")
        reward_model = self._check_reward_source(reward_model)
        if value_model is None and self._uses_value_model:
            raise ValueError("PPOTrainer needs a `value_model` (e.g. AutoModelForSequenceClassification with "
                             "num_labels=1, often initialised from the reward model).")
        if train_dataset is None:
            raise ValueError(f"{who} needs a train_dataset of prompts.")
        self.tokenizer = tok
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        self.is_peft_model = hasattr(model, "disable_adapter")
        if args.gradient_checkpointing:
            self._enable_gradient_checkpointing(args, model, value_model)
        if ref_model is None and not self.is_peft_model:
            raise ValueError(f"{who} needs a `ref_model` (or a PEFT policy, whose reference is the policy "
                             "with its adapter disabled).")
        if ref_model is model:
            raise ValueError("`model` and `ref_model` must not be the same object; pass a copy (or use PEFT).")
        self.policy, self.ref_model, self.reward_model, self.value_model = model, ref_model, reward_model, value_model
        self.divergence = get_divergence(args.divergence, args.alpha)
        self.stop_token_id = args.stop_token_id if args.stop_token_id is not None else (
            tok.eos_token_id if args.stop_token == "eos" else None)
        train_dataset = self._prepare_prompts(train_dataset, tok, args)
        if isinstance(eval_dataset, dict):
            eval_dataset = {k: self._prepare_prompts(v, tok, args) for k, v in eval_dataset.items()}
        elif eval_dataset is not None:
            eval_dataset = self._prepare_prompts(eval_dataset, tok, args)
        if args.total_episodes is not None:
            args.max_steps = math.ceil(args.total_episodes / (args.local_batch_size * args.world_size))
        if args.max_steps <= 0:
            args.max_steps = math.ceil(args.num_train_epochs * len(train_dataset) /
                                       (args.local_batch_size * args.world_size))
        per_iter = args.local_batch_size * args.world_size
        if len(train_dataset) < per_iter:
            raise ValueError(f"the dataset has {len(train_dataset)} prompts, fewer than one {self._batch_description}; "
                             "lower one of them or add prompts.")
        wrapper = PolicyAndValue(model, value_model) if self._uses_value_model else PolicyOnly(model)
        _adapter.require()
        super().__init__(model=wrapper, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, optimizers=optimizers, callbacks=callbacks,
                         data_collator=data_collator or self._collate)
        self._timings = dict.fromkeys(_TIMED_PARTS, 0.0)
        self._frozen_engines = []  # under ZeRO-3: the DeepSpeed engines that shard the reference and reward model
        for name in ("ref_model", "reward_model"):
            m = getattr(self, name)
            if isinstance(m, nn.Module):
                setattr(self, name, self._prepare_frozen(m))
        self.generation_config = GenerationConfig(
            max_new_tokens=args.response_length, temperature=args.temperature + 1e-7, top_k=args.top_k, top_p=1.0,
            do_sample=True, pad_token_id=tok.pad_token_id,
            eos_token_id=self.stop_token_id if self.stop_token_id is not None else None)

    #: PPO trains a value model next to the policy; subclasses without one set this False (the wrapper is then
    #: `PolicyOnly`, and nothing is saved in `value_model/`)
    _uses_value_model = True
    #: what one iteration's prompts are, for the "too few prompts" error
    _batch_description = ("PPO batch (per_device_train_batch_size x gradient_accumulation_steps x num_mini_batches "
                          "x processes)")

    def _enable_gradient_checkpointing(self, args, policy, value_model) -> None:
        """`gradient_checkpointing: true` on the models this trainer updates (the policy, and PPO's value model).
        Replaces what Trainer's own loop would do (`_inner_training_loop` enables it on `self.model`), which this
        trainer's loop does not run and which would not reach inside the policy/value wrapper. As TRL's DPOTrainer:
        a PEFT policy needs its inputs to require gradients, and under ZeRO-3 reentrant checkpointing (DeepSpeed
        gathers the sharded LoRA weights correctly only there). Generation runs in eval mode, where the checkpointed
        modules use their KV cache as before."""
        kwargs = dict(args.gradient_checkpointing_kwargs or {})
        plugin = getattr(args, "deepspeed_plugin", None)
        if self.is_peft_model and plugin is not None and plugin.zero_stage == 3:
            kwargs["use_reentrant"] = True
        args.gradient_checkpointing_kwargs = kwargs or None
        for module in (policy, value_model):
            if module is None:
                continue
            if not getattr(module, "supports_gradient_checkpointing", True) and not hasattr(module, "get_base_model"):
                raise ValueError(f"gradient_checkpointing: {type(module).__name__} does not support it; set "
                                 "gradient_checkpointing: false.")
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs)
        if self.is_peft_model:
            policy.enable_input_require_grads()

    def _check_reward_source(self, reward_model):
        """The reward model (a sequence-classification model with one output) or function, checked."""
        if reward_model is None:
            raise ValueError(f"{type(self).__name__} needs a `reward_model` (a sequence-classification model or a "
                             "callable (prompts, completions) -> scores).")
        if isinstance(reward_model, nn.Module):
            n = getattr(reward_model.config, "num_labels", 1)
            if n != 1:
                raise ValueError(f"the reward model must have one output (a scalar score); it has num_labels={n}.")
        elif not callable(reward_model):
            raise TypeError(f"reward_model must be a model or a callable, got {type(reward_model).__name__}.")
        return reward_model

    def _prepare_frozen(self, m: nn.Module) -> nn.Module:
        """A model that scores but never trains (reference, reward model), in eval mode without gradients: under
        ZeRO-3 sharded like the policy (TRL's helper; the module is called directly, its ZeRO-3 hooks gather the
        weights of each submodule in turn, so every rank runs the same forwards), else a whole copy on the
        device (one process, DDP, ZeRO-2)."""
        m.eval().requires_grad_(False)
        if self._is_zero3:
            engine = _adapter.prepare_deepspeed(m, self.accelerator)
            self._frozen_engines.append(engine)
            return engine.module
        return m.to(self.accelerator.device)

    @property
    def _is_zero3(self) -> bool:
        return bool(self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3)

    @staticmethod
    def _load_from_paths(args, model, ref_model, reward_model, value_model, peft_config, uses_value_model=True):
        """TRL's former `sft_model_path` / `reward_model_path`: the models they name are loaded where none is
        passed (reference: a second copy of the policy unless PEFT; value model: initialised from the reward
        model, as TRL's PPO examples did). A path and a model for the same role is an error."""
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        for path_field, given, role in (("sft_model_path", model, "model"),
                                        ("reward_model_path", reward_model, "reward_model")):
            if getattr(args, path_field) and given is not None:
                raise ValueError(f"both `{role}` and `{path_field}` are set; pass one of them.")
        if args.sft_model_path:
            model = AutoModelForCausalLM.from_pretrained(args.sft_model_path)
            if ref_model is None and peft_config is None:
                ref_model = AutoModelForCausalLM.from_pretrained(args.sft_model_path)
        if args.reward_model_path:
            reward_model = AutoModelForSequenceClassification.from_pretrained(args.reward_model_path, num_labels=1)
            if value_model is None and uses_value_model:
                value_model = AutoModelForSequenceClassification.from_pretrained(args.reward_model_path, num_labels=1)
        return model, ref_model, reward_model, value_model

    # ---- data ------------------------------------------------------------------------------------
    def _prepare_prompts(self, dataset, tok, args):
        names = dataset.column_names or []
        if "input_ids" in names:
            return dataset
        if "prompt" not in names:
            raise ValueError(f"the PPO dataset needs a 'prompt' column (or tokenized 'input_ids'); it has "
                             f"{names}. Rename your prompt column, e.g. dataset.rename_column('query', 'prompt').")

        def tokenize(row):
            prompt = row["prompt"]
            if isinstance(prompt, list):  # conversational
                # return_dict: tokenizers differ in what tokenize=True alone returns (a list, or a BatchEncoding)
                ids = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"]
            else:
                ids = tok(prompt, add_special_tokens=False)["input_ids"]
            if args.max_prompt_length is not None:
                ids = ids[-args.max_prompt_length:]
            return {"input_ids": list(ids)}

        return dataset.map(tokenize, remove_columns=names, num_proc=args.dataset_num_proc,
                           desc="Tokenizing prompts")

    def _collate(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Left-padded prompts (generation appends on the right)."""
        width = max(len(r["input_ids"]) for r in rows)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(r["input_ids"])) + list(r["input_ids"]) for r in rows])
        mask = torch.tensor([[0] * (width - len(r["input_ids"])) + [1] * len(r["input_ids"]) for r in rows])
        return {"input_ids": ids, "attention_mask": mask}

    def _prompt_batches(self, start_iteration: int):
        """Batches of `local_batch_size` prompts per process, reshuffled each pass over the data with a
        generator of its own (so resuming reproduces the order without touching the global RNG)."""
        n, per_iter = len(self.train_dataset), self.args.local_batch_size * self.args.world_size
        rank = self.args.process_index
        iteration, epoch = 0, 0
        while True:
            g = torch.Generator().manual_seed(self.args.seed + epoch)
            order = torch.randperm(n, generator=g).tolist()
            for s in range(0, n - per_iter + 1, per_iter):
                if iteration >= start_iteration:
                    idx = order[s + rank * self.args.local_batch_size: s + (rank + 1) * self.args.local_batch_size]
                    yield self.data_collator([self.train_dataset[i] for i in idx])
                iteration += 1
            epoch += 1

    # ---- rollout ---------------------------------------------------------------------------------
    def _ref_context(self):
        if self.ref_model is None:
            return self.accelerator.unwrap_model(self.model).policy.disable_adapter()
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def _policy_for_generation(self, model):
        """The policy to generate with, and extra `generate` arguments. Under ZeRO-3 with
        `ds3_gather_for_generation` the policy's weights are gathered on every rank for the duration of `generate`
        (ZeRO's hooks removed meanwhile, as TRL's `unwrap_model_for_generation` does) and sharded again after;
        without it the policy generates from the sharded weights with `synced_gpus=True`, so every rank keeps
        running forwards (which gather the weights collectively) until all ranks are done."""
        if not self._is_zero3:
            yield model.policy, {}
        elif not self.args.ds3_gather_for_generation:
            yield model.policy, {"synced_gpus": True}
        else:
            import deepspeed

            t0 = _now()  # time/gather: gathering the weights and sharding them again (part of time/generation)
            with deepspeed.zero.GatheredParameters(list(model.policy.parameters())):
                _adapter.remove_hooks(self.model_wrapped)
                self._timings["gather"] += _now() - t0
                try:
                    yield model.policy, {}
                finally:
                    t0 = _now()
                    _adapter.add_hooks(self.model_wrapped)
            self._timings["gather"] += _now() - t0

    @property
    def _sum_over_processes(self):
        """`None` on one process (the plain masked statistics), else a sum over processes."""
        if self.args.world_size <= 1:
            return None
        return lambda t: self.accelerator.reduce(t, reduction="sum")

    def _token_logprobs(self, model, ids, mask, context_len):
        return response_logprobs(model, ids, mask, context_len, self.args.temperature)

    def _values(self, value_model, ids, mask, context_len):
        return response_values(value_model, ids, mask, context_len)

    def _scores(self, ids, mask, context_len, response_mask) -> torch.Tensor:
        return self._score_with(self.reward_model, ids, mask, context_len, response_mask)

    def _score_with(self, reward, ids, mask, context_len, response_mask) -> torch.Tensor:
        """The scores of one reward source: a sequence-classification model, or a function on decoded text."""
        if isinstance(reward, nn.Module):
            # the score at the last real token of each sequence (the RewardTrainer convention)
            last = (mask * torch.arange(mask.size(1), device=mask.device)).argmax(1)
            backbone = getattr(reward, reward.base_model_prefix)
            hidden = backbone(input_ids=ids, attention_mask=mask, position_ids=_positions(mask),
                              use_cache=False).last_hidden_state
            head = reward.score if hasattr(reward, "score") else reward.classifier
            return head(hidden[torch.arange(ids.size(0), device=ids.device), last]).squeeze(-1).float()
        prompts = self.tokenizer.batch_decode(ids[:, :context_len], skip_special_tokens=True)
        completions = [self.tokenizer.decode(r[m.bool()], skip_special_tokens=True)
                       for r, m in zip(ids[:, context_len:], response_mask)]
        return torch.tensor(reward(prompts, completions), dtype=torch.float, device=ids.device)

    def _penalty_per_token(self, logr: torch.Tensor) -> torch.Tensor:
        """The per-token divergence estimate: k1/k3 for reverse KL (as TRL), the unbiased estimator else."""
        if self.divergence.name == "reverse_kl" and self.args.kl_estimator == "k1":
            return logr
        return self.divergence.estimator(logr)

    @torch.no_grad()
    def _generate_and_score(self, batch, values: bool = True) -> dict[str, torch.Tensor]:
        """Sample a response per prompt with the current policy, then (dropout off) the log-probs of policy
        and reference, the token entropy, the values (if asked) and the scores."""
        args, model = self.args, self.accelerator.unwrap_model(self.model)
        device = self.accelerator.device
        prompt_ids, prompt_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        context_len = prompt_ids.size(1)
        t0 = _now()
        model.eval()
        with self._policy_for_generation(model) as (policy, extra):
            seqs = policy.generate(input_ids=prompt_ids, attention_mask=prompt_mask,
                                   generation_config=self.generation_config, **extra)
        self._timings["generation"] += _now() - t0
        response = seqs[:, context_len:]
        # a response ends at its first stop token (kept); everything after is padding
        if self.stop_token_id is not None:
            is_stop = response == self.stop_token_id
            after = (is_stop.cumsum(1) - is_stop.long()) > 0
            has_stop = is_stop.any(1)
        else:
            after = torch.zeros_like(response, dtype=torch.bool)
            has_stop = torch.zeros(response.size(0), dtype=torch.bool, device=device)
        response_mask = (~after).long()
        response = response.masked_fill(after, self.tokenizer.pad_token_id)
        ids = torch.cat([prompt_ids, response], 1)
        mask = torch.cat([prompt_mask, response_mask], 1)

        chunks = {k: [] for k in ("logp", "ref_logp", "values", "scores", "entropy")}
        bs = args.local_rollout_forward_batch_size
        for s in range(0, ids.size(0), bs):
            i, m, rm = ids[s:s + bs], mask[s:s + bs], response_mask[s:s + bs]
            t0 = _now()
            logp, ent = self._token_logprobs(model.policy, i, m, context_len)
            with self._ref_context():
                ref_logp, _ = self._token_logprobs(self.ref_model or model.policy, i, m, context_len)
            chunks["logp"].append(logp)
            chunks["entropy"].append(ent)
            chunks["ref_logp"].append(ref_logp)
            if values:
                chunks["values"].append(self._values(model.value_model, i, m, context_len))
            t1 = _now()
            chunks["scores"].append(self._scores(i, m, context_len, rm))
            self._timings["forward"] += t1 - t0
            self._timings["scoring"] += _now() - t1
        r = {k: torch.cat(v) for k, v in chunks.items() if v}
        model.train()  # the old log-probs and values above were computed with dropout off
        r.update(ids=ids, mask=mask, response_mask=response_mask, context_len=context_len, has_stop=has_stop)
        return r

    def _penalised_scores(self, scores, lengths, has_stop) -> torch.Tensor:
        """The scores the objective uses: `length_penalty` per response token and `missing_eos_penalty` for a
        response without a stop token subtracted."""
        scores = scores - self.args.length_penalty * lengths
        if self.args.missing_eos_penalty is not None:
            scores = scores - self.args.missing_eos_penalty * (~has_stop).float()
        return scores

    @torch.no_grad()
    def _rollout(self, batch) -> dict[str, torch.Tensor]:
        args, device = self.args, self.accelerator.device
        r = self._generate_and_score(batch)
        ids, mask, response_mask, has_stop = r["ids"], r["mask"], r["response_mask"], r["has_stop"]
        context_len = r["context_len"]
        lengths = response_mask.sum(1).float()
        scores = self._penalised_scores(r["scores"], lengths, has_stop)
        maskf = response_mask.float()
        logr = (r["logp"] - r["ref_logp"]) * maskf
        penalty = self._penalty_per_token(logr) * maskf
        rewards = torch.zeros_like(logr)
        if args.divergence_penalty == "reward":
            rewards = rewards - args.kl_coef * penalty
        last = (lengths.long() - 1).clamp(min=0)
        rewards[torch.arange(rewards.size(0), device=device), last] += scores
        if args.whiten_rewards:
            rewards = masked_whiten(rewards, maskf, shift_mean=False, reduce=self._sum_over_processes) * maskf
        values = r["values"] * maskf
        advantages, returns = gae_advantages(rewards, values, maskf, args.gamma, args.lam)
        # whitened over the rollouts of every process: N processes train as one process with the same global batch
        advantages = masked_whiten(advantages, maskf, reduce=self._sum_over_processes) * maskf
        return {"ids": ids, "mask": mask, "response_mask": maskf, "context_len": context_len,
                "logp": r["logp"], "ref_logp": r["ref_logp"], "values": values, "advantages": advantages,
                "returns": returns, "scores": scores, "raw_scores": r["scores"], "penalty": penalty,
                "logr": logr, "entropy": r["entropy"], "lengths": lengths, "has_stop": has_stop.float(),
                "rewards": rewards}

    # ---- optimisation ----------------------------------------------------------------------------
    def _ppo_loss(self, ro, idx) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        args = self.args
        ids, mask, rmask, c = ro["ids"][idx], ro["mask"][idx], ro["response_mask"][idx], ro["context_len"]
        logp, vpred = self.model(ids, mask, c, args.temperature)  # through DDP when there are several ranks
        old_logp, old_v, adv, ret = ro["logp"][idx], ro["values"][idx], ro["advantages"][idx], ro["returns"][idx]
        vf_loss, vf_clipfrac = ppo_value_loss(vpred, old_v, ret, rmask, args.cliprange_value)
        pg_loss, pg_clipfrac, ratio, approxkl = ppo_policy_loss(logp, old_logp, adv, rmask, args.cliprange)
        loss = pg_loss + args.vf_coef * vf_loss
        div_loss = torch.zeros((), device=loss.device)
        if args.divergence_penalty == "loss":
            logr = (logp - ro["ref_logp"][idx]) * rmask
            per_seq = sequence_divergence_penalty(self.divergence.estimator(logr) * rmask, rmask,
                                                  args.divergence_penalty_normalization)
            div_loss = per_seq.mean()
            loss = loss + args.kl_coef * div_loss
        stats = {"loss": loss.detach(), "pg_loss": pg_loss.detach(), "vf_loss": vf_loss.detach(),
                 "div_loss": div_loss.detach(), "pg_clipfrac": pg_clipfrac, "vf_clipfrac": vf_clipfrac,
                 "approxkl": approxkl, "ratio": ratio}
        return loss, stats

    def _micro_batch_backward(self, share: torch.Tensor, num_micro: int, last: bool) -> None:
        """Backward of one micro-batch's `share` of an update's loss (the shares of its `num_micro` micro-batches
        add up to the loss), then, after the last, the optimizer step (gradients clipped to `max_grad_norm`).
        Under DeepSpeed the engine accumulates over its `gradient_accumulation_steps` (= `num_micro`) micro-batches,
        dividing each loss by their number, and steps at the last: the share is scaled back. Without it
        transformers 5 builds the accelerator with accumulation left to the training loop: the gradients add up
        here."""
        args = self.args
        if self.is_deepspeed_enabled:
            with self.accelerator.accumulate(self.model):
                self.accelerator.backward(share * num_micro)
                if self.accelerator.sync_gradients and args.max_grad_norm:
                    self.accelerator.clip_grad_norm_(self.model.parameters(), args.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad()
            return
        self.accelerator.backward(share)
        if last:
            if args.max_grad_norm:
                self.accelerator.clip_grad_norm_(self.model.parameters(), args.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad()

    def _updates_per_iteration(self) -> int:
        """Optimizer steps per iteration (sizes the learning-rate schedule)."""
        return self.args.num_ppo_epochs * self.args.num_mini_batches

    def _training_iteration(self, batch):
        """One PPO iteration on a batch of prompts: rollout, then `num_ppo_epochs` passes of `num_mini_batches`
        updates. Returns the mean loss and a function computing the iteration's metrics (called when logging)."""
        args = self.args
        mb_size = args.per_device_train_batch_size * args.gradient_accumulation_steps
        ro = self._rollout(batch)
        # perf/*: the tokens the policy trains on (prompt and response, once per PPO epoch); the iteration's
        # time includes the rollout, so perf/tokens_per_second is end-to-end PPO throughput
        self._perf_count(ro["mask"].sum(1), repeats=args.num_ppo_epochs)
        t_opt = _now()
        n = ro["ids"].size(0)
        acc = {k: [] for k in ("loss", "pg_loss", "vf_loss", "div_loss", "pg_clipfrac", "vf_clipfrac", "approxkl",
                               "ratio")}
        for _ in range(args.num_ppo_epochs):
            order = torch.randperm(n, device=ro["ids"].device)
            for mb in range(0, n, mb_size):
                mb_idx = order[mb:mb + mb_size]
                starts = range(0, mb_idx.numel(), args.per_device_train_batch_size)
                for k_micro, micro in enumerate(starts):
                    idx = mb_idx[micro:micro + args.per_device_train_batch_size]
                    loss, stats = self._ppo_loss(ro, idx)
                    # one update per mini-batch: the mean of its micro-batch losses
                    self._micro_batch_backward(loss / len(starts), len(starts), last=k_micro == len(starts) - 1)
                    for k, v in stats.items():
                        acc[k].append(v)
                self.lr_scheduler.step()
        self._timings["optimisation"] = _now() - t_opt
        return torch.stack(acc["loss"]).mean().item(), lambda: self._iteration_metrics(ro, acc)

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """Run `max_steps` PPO iterations (resuming from a checkpoint of this trainer if asked)."""
        args = self.args
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"no checkpoint found in {args.output_dir} to resume from.")
        num_updates = args.max_steps * self._updates_per_iteration()
        if self.is_deepspeed_enabled:
            # as Trainer does: the DeepSpeed config finalised (its "auto" values) and the optimizer created, then
            # the engine built around PolicyAndValue and the optimizer together; the scheduler on the prepared
            # optimizer (saved in scheduler.pt by Trainer's checkpoints, the rest by the engine's save_checkpoint)
            if isinstance(self.model, nn.Module) and not hasattr(self.model, "save_checkpoint"):
                self.optimizer, self.lr_scheduler = _adapter.deepspeed_init(self, num_training_steps=num_updates)
                self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
            if self.lr_scheduler is None:
                self.create_scheduler(num_training_steps=num_updates, optimizer=self.optimizer)
            self.deepspeed = self.model
        else:
            self.create_optimizer_and_scheduler(num_training_steps=num_updates)
            self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        self.model_wrapped = self.model
        self.state = TrainerState(stateful_callbacks=[cb for cb in self.callback_handler.callbacks + [self.control]
                                                      if hasattr(cb, "state")])
        self.state.max_steps, self.state.logging_steps = args.max_steps, args.logging_steps
        self.state.save_steps = args.save_steps
        self.state.eval_steps = args.eval_steps if args.eval_steps is not None else args.logging_steps
        start = 0
        if resume_from_checkpoint:
            if self.is_deepspeed_enabled:  # weights and optimizer state from the engine's checkpoint
                _adapter.deepspeed_load_checkpoint(self.model_wrapped, resume_from_checkpoint)
            else:
                self._load_checkpoint_weights(resume_from_checkpoint)
            _adapter.load_optimizer_and_scheduler(self, resume_from_checkpoint)
            self.state = TrainerState.load_from_json(os.path.join(resume_from_checkpoint, "trainer_state.json"))
            _adapter.load_rng_state(self, resume_from_checkpoint)
            start = self.state.global_step
        self.state.is_local_process_zero = self.is_local_process_zero()
        self.state.is_world_process_zero = self.is_world_process_zero()
        self.control = self.callback_handler.on_train_begin(args, self.state, self.control)
        batches = self._prompt_batches(start)
        iterations_per_epoch = max(1, len(self.train_dataset) // (args.local_batch_size * args.world_size))
        sample_every = args.max_steps // args.num_sample_generations if args.num_sample_generations > 0 else 0
        loss_sum = 0.0
        start_time = time.time()
        self.model.train()
        # Progress is shown by Trainer's progress callback (on_step_end), as in every other trainer.
        for it in range(start, args.max_steps):
            self.control = self.callback_handler.on_step_begin(args, self.state, self.control)
            self._timings = dict.fromkeys(_TIMED_PARTS, 0.0)
            loss_value, iteration_metrics = self._training_iteration(next(batches))
            loss_sum += loss_value
            self.state.global_step = it + 1
            self.state.epoch = (it + 1) * args.local_batch_size * args.world_size / len(self.train_dataset)
            self.control = self.callback_handler.on_step_end(args, self.state, self.control)
            if (it + 1) % iterations_per_epoch == 0:  # a pass over the prompts: epoch-based saving/evaluation
                self.control = self.callback_handler.on_epoch_end(args, self.state, self.control)
            if self.control.should_log or (it + 1) % max(args.logging_steps, 1) == 0 or it + 1 == args.max_steps:
                self.log(iteration_metrics(), start_time)
                self.control.should_log = False
            if sample_every and (it + 1) % sample_every == 0:
                self._log_sample_generations()
            if self.control.should_evaluate:
                if self.eval_dataset is not None:
                    self.evaluate()
                self.control.should_evaluate = False
            if self.control.should_save:
                _adapter.save_checkpoint(self)
                self.control = self.callback_handler.on_save(args, self.state, self.control)
                self.control.should_save = False
            if self.control.should_training_stop:
                break
        self.control = self.callback_handler.on_train_end(args, self.state, self.control)
        runtime = time.time() - start_time
        done = self.state.global_step - start
        metrics = {"train_runtime": runtime, "train_iterations": done,
                   "train_iterations_per_second": done / max(runtime, 1e-9),
                   "train_loss": loss_sum / max(done, 1)}
        self.log(metrics)
        return TrainOutput(self.state.global_step, metrics["train_loss"], metrics)

    # ---- evaluation ------------------------------------------------------------------------------
    def _eval_prompts(self, dataset):
        """The prompts of `dataset` for this process: tokenized like the training prompts, rows split over
        processes (rank r takes rows r, r + world, ...)."""
        dataset = self._prepare_prompts(dataset, self.tokenizer, self.args)
        rows = list(range(self.args.process_index, len(dataset), self.args.world_size))
        bs = self.args.per_device_eval_batch_size
        for s in range(0, len(rows), bs):
            yield self.data_collator([dataset[i] for i in rows[s:s + bs]])
        if self._is_zero3:
            # ZeRO-3's forwards are collective: every rank runs as many batches as rank 0 (which has the most rows);
            # the extra ones (a repeat of the first prompt) are marked by `_eval_filler` and not counted
            extra = -(-len(range(0, len(dataset), self.args.world_size)) // bs) - (-(-len(rows) // bs))
            for _ in range(extra):
                batch = self.data_collator([dataset[0]])
                batch["_eval_filler"] = True
                yield batch

    @contextlib.contextmanager
    def _rollouts_outside_training(self):
        """Evaluation and sample tables: sampling under a forked RNG seeded with `seed` (repeatable, and the
        training run's RNG stream is untouched) and the iteration's `time/*` figures left as they were."""
        saved_timings = dict(self._timings)
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.args.seed)
            yield
        self._timings = saved_timings

    @torch.no_grad()
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Rollouts of the current policy on the eval prompts, scored by the training reward: mean score, the
        estimate of every divergence of the family from the reference, response length and entropy.

        Replaces Trainer.evaluate (which runs the loss on labelled batches; PPO has none). Sampling runs under a
        forked RNG seeded with `seed`, so evaluating never changes the training trajectory and is repeatable.
        Several eval datasets (a dict) are evaluated one by one, with their name in the prefix, as in Trainer."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("PPOTrainer.evaluate needs an eval_dataset of prompts (pass one to the trainer or here).")
        if isinstance(dataset, dict):
            out = {}
            for name, part in dataset.items():
                out.update(self.evaluate(part, ignore_keys, f"{metric_key_prefix}_{name}"))
            return out
        start = time.time()
        with self._rollouts_outside_training():
            sums = torch.zeros(8, device=self.accelerator.device)
            for batch in self._eval_prompts(dataset):
                filler = bool(batch.pop("_eval_filler", False))
                r = self._generate_and_score(batch, values=False)
                rmask = r["response_mask"].float()
                logr = (r["logp"] - r["ref_logp"]) * rmask
                per_seq = [r["scores"], rmask.sum(1), (r["entropy"] * rmask).sum(1),
                           *_divergence_estimates(logr, rmask).values(),
                           torch.ones_like(rmask[:, 0])]  # the count of rollouts
                if not filler:
                    sums += torch.stack([x.float().sum() for x in per_seq])
        total = self.accelerator.reduce(sums, reduction="sum").tolist()
        n = max(total[7], 1.0)
        metrics = {
            f"{metric_key_prefix}_objective/scores": total[0] / n,
            f"{metric_key_prefix}_response/length": total[1] / n,
            f"{metric_key_prefix}_objective/entropy": total[2] / max(total[1], 1.0),
        }
        for k, name in enumerate(ESTIMATED_DIVERGENCES):
            metrics[f"{metric_key_prefix}_divergence/{name}"] = total[3 + k] / n
        metrics[f"{metric_key_prefix}_runtime"] = time.time() - start
        metrics[f"{metric_key_prefix}_samples"] = int(total[7])
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    @torch.no_grad()
    def _log_sample_generations(self) -> None:
        """`num_sample_generations`, as in TRL's former PPOTrainer: a table of completions for a few prompts (the
        eval prompts, else the first training prompts) at evenly spaced iterations. Written to
        `output_dir/samples/step_<N>.jsonl` and, when W&B is logging, as the table `samples/step_<N>`."""
        dataset = self.eval_dataset if self.eval_dataset is not None else self.train_dataset
        if isinstance(dataset, dict):
            dataset = next(iter(dataset.values()))
        dataset = self._prepare_prompts(dataset, self.tokenizer, self.args)
        rows = [dataset[i] for i in range(min(len(dataset), self.args.per_device_eval_batch_size))]
        with self._rollouts_outside_training():
            r = self._generate_and_score(self.data_collator(rows), values=False)
        if not self.is_world_process_zero():
            return
        c = r["context_len"]
        table = []
        for ids, rmask, score in zip(r["ids"], r["response_mask"], r["scores"].tolist()):
            prompt = self.tokenizer.decode(ids[:c], skip_special_tokens=True)
            completion = self.tokenizer.decode(ids[c:][rmask.bool()], skip_special_tokens=True)
            table.append({"step": self.state.global_step, "prompt": prompt, "completion": completion,
                          "score": score})
        write_sample_table(self, table, f"step_{self.state.global_step}")

    @torch.no_grad()
    def _iteration_metrics(self, ro, acc) -> dict[str, float]:
        gather = self.accelerator.gather_for_metrics
        rmask = ro["response_mask"]
        seq_penalty = ro["penalty"].sum(1)
        metrics = {
            "objective/scores": gather(ro["raw_scores"]).mean().item(),
            "objective/rlhf_reward": gather(ro["rewards"].sum(1)).mean().item(),
            f"objective/{self.divergence.name}": gather(seq_penalty).mean().item(),
            "objective/entropy": gather(masked_mean(ro["entropy"], rmask).reshape(1)).mean().item(),
            "val/num_eos_tokens": gather(ro["has_stop"].sum().reshape(1)).sum().item(),
            "response/length": gather(ro["lengths"]).mean().item(),
            "lr": self.lr_scheduler.get_last_lr()[0],
            "episode": self.state.global_step * ro["ids"].size(0) * self.args.world_size,
        }
        # seconds of this iteration: sampling, no-grad forwards (policy, reference, value), reward, updates
        metrics.update({f"time/{k}": v for k, v in self._timings.items()})
        # the unbiased estimate of every divergence of the family, from the same samples
        for name, est in _divergence_estimates(ro["logr"], rmask).items():
            metrics[f"divergence/{name}"] = gather(est).mean().item()
        names = {"loss": "loss", "pg_loss": "loss/policy_avg", "vf_loss": "loss/value_avg", "div_loss": "loss/divergence_avg",
                 "pg_clipfrac": "policy/clipfrac_avg", "vf_clipfrac": "val/clipfrac_avg",
                 "approxkl": "policy/approxkl_avg", "ratio": "val/ratio"}
        for k, v in acc.items():
            metrics[names[k]] = gather(torch.stack(v).mean().reshape(1)).mean().item()
        return metrics

    # ---- saving ----------------------------------------------------------------------------------
    # Replaces Trainer._save: the policy is saved as a normal Hugging Face model (loadable with
    # from_pretrained), the value model in `value_model/`, instead of the state dict of the wrapper.
    # `state_dict` (of PolicyAndValue: keys `policy.*` and `value_model.*`) is given under ZeRO-3, where the
    # modules' own parameters are shards.
    def _save(self, output_dir: str | None = None, state_dict=None):
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        unwrapped = self.accelerator.unwrap_model(self.model)
        parts = {name: {} for name, _ in self._saved_modules(output_dir)}
        if state_dict is not None:
            for key, value in state_dict.items():
                prefix, _, rest = key.partition(".")
                parts[prefix][rest] = value
        for name, folder in self._saved_modules(output_dir):
            kwargs = {"state_dict": parts[name]} if state_dict is not None else {}
            getattr(unwrapped, name).save_pretrained(folder, **kwargs)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _saved_modules(self, folder: str) -> list[tuple[str, str]]:
        """(attribute of the wrapper, folder) of each module a checkpoint holds: the policy in `folder`, the value
        model (when there is one) in `folder/value_model`."""
        parts = [("policy", folder)]
        if self._uses_value_model:
            parts.append(("value_model", os.path.join(folder, "value_model")))
        return parts

    def _load_checkpoint_weights(self, checkpoint: str):
        from safetensors.torch import load_file

        unwrapped = self.accelerator.unwrap_model(self.model)
        for name, folder in self._saved_modules(checkpoint):
            module = getattr(unwrapped, name)
            if hasattr(module, "disable_adapter"):
                from peft import set_peft_model_state_dict

                set_peft_model_state_dict(module, load_file(os.path.join(folder, "adapter_model.safetensors")))
            else:
                missing, unexpected = module.load_state_dict(load_file(os.path.join(folder, "model.safetensors")),
                                                             strict=False)
                tied = set(getattr(module, "all_tied_weights_keys", None) or {})  # transformers' public list
                if unexpected or [k for k in missing if k not in tied and "lm_head" not in k]:
                    raise ValueError(f"checkpoint {folder} does not match the model (missing {missing[:3]}, "
                                     f"unexpected {unexpected[:3]}).")

    def create_model_card(self, model_name: str | None = None, **_):
        """A short model card: the method, divergence, penalty placement and (when trained from one) the recipe."""
        if not self.is_world_process_zero():
            return
        alpha = f", alpha={self.divergence.alpha:g}" if self.divergence.name == "alpha" else ""
        reward = type(self.reward_model).__name__ if isinstance(self.reward_model, nn.Module) else \
            getattr(self.reward_model, "__name__", "a reward function")
        lines = [f"# {model_name or os.path.basename(os.path.abspath(self.args.output_dir))}", "",
                 f"Policy fine-tuned from {describe_base_model(base_model_name(self))} with PPO by alignkit "
                 "(`PPOTrainer`), on top of TRL.", "",
                 "```python", "from transformers import pipeline", "",
                 f'generator = pipeline("text-generation", model="{self.args.output_dir}")', "```", "",
                 f"- divergence: `{self.divergence.name}`{alpha}, penalty in the {self.args.divergence_penalty}, "
                 f"kl_coef {self.args.kl_coef}", f"- reward: {reward}",
                 f"- iterations: {self.state.global_step}", ""]
        recipe = getattr(self, "alignkit_recipe", None)
        if recipe:
            lines += ["Recipe:", "", "```yaml", recipe.rstrip(), "```", ""]
        with open(os.path.join(self.args.output_dir, "README.md"), "w", encoding="utf-8") as fh:
            fh.write("\n".join(lines))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """Save the policy (a Hugging Face model folder, or the adapter for PEFT) and the value model in
        `value_model/`. Under ZeRO-3 every rank must call it (the weights are gathered collectively; rank 0
        writes); elsewhere rank 0 writes and other ranks return."""
        output_dir = output_dir or self.args.output_dir
        if self._is_zero3 and hasattr(self.model_wrapped, "save_checkpoint"):
            state_dict = self.accelerator.get_state_dict(self.model_wrapped)  # collective: every rank
            if self.is_world_process_zero():
                self._save(output_dir, state_dict=state_dict)
        elif self.is_world_process_zero():
            self._save(output_dir)
