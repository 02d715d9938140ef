"""The configs of the on-policy trainers: `OnPolicyConfig` (what every on-policy trainer shares: where the models
come from, how responses are sampled and scored, the f-divergence) and `PPOConfig` (PPO's optimisation fields)."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from ..divergences import get_divergence
from ..losses import SEQUENCE_PENALTY_NORMALIZATIONS
from ._common import PPO_RULES, TRAINING_RULES, check_ranges, default_precision_for_this_machine
from ._perf import PerfArguments

__all__ = ["OnPolicyConfig", "PPOConfig"]


@dataclass
class OnPolicyConfig(PerfArguments, TrainingArguments):
    r"""The fields every on-policy alignkit trainer shares (TRL's former `OnPolicyConfig`): where the models come
    from, how responses are sampled and scored, and the f-divergence of the constraint. [`PPOConfig`] adds PPO's
    optimisation fields. (Online mDPO / mIPO runs on TRL's GRPOTrainer and uses TRL's `GRPOConfig` instead.)

    alignkit fields:
        divergence (`str`, defaults to `"reverse_kl"`), alpha (`float`, *optional*): the f-divergence of the
            constraint, as in `FDPOConfig`.
        length_penalty (`float`, defaults to `0.0`): subtracted from the score per response token (the
            thesis' length-penalty baseline).
        reward_weights (`list[float]`, *optional*): with several reward sources (`reward_model=[...]`), one weight
            each, as TRL's `GRPOConfig` has it; the score is their weighted sum. Unset: every weight 1.
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
    reward_weights: list[float] | None = field(default=None, metadata={
        "help": "One weight per reward source (TRL GRPO's name); the score is their weighted sum. Unset: every 1."})

    def __post_init__(self):
        if self.load_best_model_at_end:
            raise ValueError(f"load_best_model_at_end: {type(self).__name__}'s loop keeps the last policy and never "
                             "loads a best one; remove it (evaluate checkpoints with alignkit eval instead).")
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
