"""Online mDPO / mIPO on TRL's GRPO engine (docs/groups.md, "Online mDPO / mIPO").

TRL's `GRPOTrainer` already samples `num_generations` completions per prompt (with transformers or vLLM, colocated or
as a server), scores them with reward functions and reward models (`reward_funcs`, `reward_weights`), computes the
reference log-probs, and runs on several processes and under DeepSpeed. `OnlineMultiSampleTrainer` keeps all of that
and replaces only what makes the method mDPO / mIPO:

1. **The split and the group loss** (`_generate_and_score_completions`, after TRL's): each prompt's group is split by
   reward into a chosen and a rejected sub-group (`alignkit.losses.split_groups_by_reward`), and the mDPO / mIPO
   loss of `alignkit.losses.group_preference_loss` is computed on the sequence log-ratios `log pi - log pi_ref` of
   the whole generation batch (gathered over processes, since TRL may place a prompt's completions on several).
   Its derivative with respect to each completion's sequence log-prob, `c_i = dL / d log pi(y_i)`, goes where GRPO
   keeps its advantages.
2. **The loss** (`_compute_loss`): `sum_i c_i log pi_theta(y_i)` over each micro-batch. Its gradient at the
   parameters that sampled the batch is exactly the gradient of the group loss, because the coefficients were
   computed at those parameters and every micro-batch of a generation batch belongs to the same optimizer step
   (`steps_per_generation == gradient_accumulation_steps`, `num_iterations == 1`; both are checked). The value
   reported as the loss is the group loss itself.

GRPO's reward scaling is turned off (`scale_rewards: none`), so TRL's advantages are each reward minus its group's
mean: the split by advantage is the split by reward (the same order, the same spread for `min_reward_spread`).

Conventions: `per_device_train_batch_size` counts completions, as in TRL's GRPO (a prompt brings `num_generations`
of them); `beta` is mDPO's beta / mIPO's tau, the strength of the pull towards the reference (GRPO's KL coefficient
has the same role); `loss_type` is `sigmoid` (mDPO) or `ipo` (mIPO). The log-probs are TRL's, i.e. of the
distribution that sampled (logits divided by `temperature`); at `temperature: 1`, the default, they are the
policy's own, as `MultiSampleDPOTrainer` uses them.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field

import torch
from trl import GRPOConfig, GRPOTrainer

from .. import _adapter
from ..divergences import DEFAULT_MAX_EXPONENT, get_divergence
from ..losses import GROUPINGS, group_mean, group_preference_loss, split_groups_by_reward
from ._card import write_model_card
from ._common import PREFERENCE_RULES, TRAINING_RULES, check_ranges, default_precision_for_this_machine
from ._perf import PerfArguments, PerfMetricsMixin
from .rollout import divergence_estimates

__all__ = ["OnlineMultiSampleConfig", "OnlineMultiSampleTrainer"]


#: ranges of the online fields (check_ranges): the field, its test, what it must be, a hint
ONLINE_RULES = {
    "temperature": (lambda v: v > 0, "> 0", "sampling divides the logits by it; e.g. 1.0"),
    "min_reward_spread": (lambda v: v >= 0, ">= 0", "0 skips only prompts whose completions all score the same"),
}


@dataclass
class OnlineMultiSampleConfig(PerfArguments, GRPOConfig):
    r"""Configuration for [`OnlineMultiSampleTrainer`]: every field of TRL's `GRPOConfig` (sampling, vLLM, reward
    weights, batch sizes, ...), plus the groups and the mDPO / mIPO loss (docs/methods.md section 2).

    Parameters:
        grouping (`str`, defaults to `"top_bottom"`): `top_bottom` takes the `num_chosen` best and the
            `num_rejected` worst completions of a prompt; `above_below_mean` those above and below its mean reward.
            Prompts whose rewards spread by no more than `min_reward_spread` are skipped (`group/skipped_prompts`).
        num_chosen, num_rejected (`int`, default `1`), min_reward_spread (`float`, defaults to `0.0`).
        loss_type (`str`, defaults to `"sigmoid"`): `sigmoid` (mDPO) or `ipo` (mIPO); replaces GRPO's loss types.
        beta (`float`, defaults to `0.1`): mDPO's beta / mIPO's tau (replaces GRPO's KL coefficient; > 0).
        unbiased (`bool`, defaults to `True`), nll_weight (`float`, defaults to `0.0`), max_link_exponent,
            divergence (`str`, defaults to `"reverse_kl"`), alpha: as in `MultiSampleDPOConfig`.
        peak_tflops (`float`, *optional*): for `perf/mfu`, as in every alignkit config.
    """

    grouping: str = field(default="top_bottom", metadata={"help": "top_bottom or above_below_mean."})
    num_chosen: int = field(default=1, metadata={"help": "top_bottom: the best completions taken as chosen."})
    num_rejected: int = field(default=1, metadata={"help": "top_bottom: the worst completions taken as rejected."})
    min_reward_spread: float = field(default=0.0, metadata={
        "help": "Skip a prompt whose rewards spread by no more than this (max - min)."})
    loss_type: str = field(default="sigmoid", metadata={"help": "sigmoid (mDPO) or ipo (mIPO)."})
    beta: float = field(default=0.1, metadata={"help": "mDPO's beta / mIPO's tau (> 0)."})
    unbiased: bool = field(default=True, metadata={"help": "mIPO: use the unbiased (variance-corrected) estimator."})
    nll_weight: float = field(default=0.0, metadata={"help": "Weight of the NLL of the chosen group."})
    max_link_exponent: float | None = field(default=DEFAULT_MAX_EXPONENT, metadata={
        "help": "Links with an exponential part are continued linearly above this exponent (as FDPOConfig)."})
    divergence: str = field(default="reverse_kl", metadata={"help": "reverse_kl, forward_kl, jsd or alpha."})
    alpha: float | None = field(default=None, metadata={"help": "alpha in (0, 1) for divergence=alpha."})
    scale_rewards: str = field(default="none", metadata={"help": "Must stay 'none' (the split uses raw rewards)."})

    def __post_init__(self):
        check_ranges(self, TRAINING_RULES, PREFERENCE_RULES, ONLINE_RULES)
        default_precision_for_this_machine(self)
        if self.loss_type not in ("sigmoid", "ipo"):
            raise ValueError(f"loss_type must be 'sigmoid' (mDPO) or 'ipo' (mIPO), got {self.loss_type!r}; GRPO's "
                             "loss types do not apply here (the loss is the group loss).")
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}: it is mDPO's beta / mIPO's tau.")
        if self.grouping not in GROUPINGS:
            raise ValueError(f"grouping must be one of {', '.join(GROUPINGS)}, got {self.grouping!r}.")
        if self.num_chosen < 1 or self.num_rejected < 1:
            raise ValueError(f"num_chosen and num_rejected must be >= 1, got {self.num_chosen} and "
                             f"{self.num_rejected}: each prompt needs a chosen and a rejected completion.")
        if self.min_reward_spread < 0:
            raise ValueError(f"min_reward_spread must be >= 0, got {self.min_reward_spread}.")
        if self.num_iterations != 1:
            raise ValueError(f"num_iterations: {self.num_iterations}: the group loss's gradient is exact on the "
                             "parameters that sampled the batch, so each batch of generations serves one optimizer "
                             "step; remove num_iterations (or set it to 1).")
        if self.multi_objective_aggregation != "sum_then_normalize":
            raise ValueError("multi_objective_aggregation must be 'sum_then_normalize': the groups are split by the "
                             "weighted sum of the rewards.")
        if self.scale_rewards not in ("none", False):
            raise ValueError(f"scale_rewards: {self.scale_rewards!r}: the groups are split by the rewards themselves "
                             "(min_reward_spread is in reward units); remove it.")
        self.divergence = get_divergence(self.divergence, self.alpha).name
        g = self.num_generations
        if g is not None and g < 2:
            raise ValueError(f"num_generations must be >= 2, got {g}: a prompt's group needs a chosen and a rejected "
                             "completion; e.g. num_generations: 4.")
        if self.grouping == "top_bottom" and g is not None and self.num_chosen + self.num_rejected > g:
            raise ValueError(f"num_chosen + num_rejected ({self.num_chosen} + {self.num_rejected}) must be <= "
                             f"num_generations ({g}): a completion cannot be both chosen and rejected.")
        super().__post_init__()
        if self.steps_per_generation != self.gradient_accumulation_steps:
            raise ValueError(f"steps_per_generation ({self.steps_per_generation}) must equal "
                             f"gradient_accumulation_steps ({self.gradient_accumulation_steps}): a batch of "
                             "generations is one optimizer step here. Leave both generation_batch_size and "
                             "steps_per_generation unset.")


def as_trl_reward(source):
    """A reward source as TRL's GRPOTrainer calls it (keywords: `prompts`, `completions`, `completion_ids`, ...). A
    function `(prompts, completions)` without `**kwargs` (alignkit's convention, e.g. PPO's reward functions) is
    wrapped, keeping its name (the `rewards/<name>/*` metrics), and given texts: a conversational completion's last
    message, a conversational prompt's messages joined by newlines. Models, paths and functions that take `**kwargs`
    (TRL's convention, and `alignkit.rewards`' built-ins, which read both forms) pass unchanged."""
    if not callable(source) or isinstance(source, torch.nn.Module):
        return source
    try:
        params = inspect.signature(source).parameters.values()
    except (TypeError, ValueError):
        return source
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return source

    def text(x):
        return "\n".join(m["content"] for m in x) if isinstance(x, list) else x

    @functools.wraps(source)
    def reward(prompts=None, completions=None, **_):
        last = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return source([text(p) for p in prompts], last)

    return reward


class OnlineMultiSampleTrainer(PerfMetricsMixin, GRPOTrainer):
    """On-policy mDPO / mIPO with TRL's GRPO engine (see the module docstring).

    Example:
        ```python
        from alignkit import OnlineMultiSampleConfig, OnlineMultiSampleTrainer

        def brevity(completions, **kwargs):
            return [-len(c) for c in completions]

        args = OnlineMultiSampleConfig(output_dir="online", loss_type="ipo", num_generations=4,
                                     per_device_train_batch_size=8)
        trainer = OnlineMultiSampleTrainer(model="builtin:tiny-llama", reward_funcs=[brevity], args=args,
                                         train_dataset=prompts)
        trainer.train()
        ```
    """

    _tag_names = ["trl", "alignkit", "mdpo", "online", "grpo"]
    _name = "Online multi-sample DPO"

    def __init__(self, model, reward_funcs=None, args: OnlineMultiSampleConfig | None = None, **kwargs):
        if args is None:
            raise ValueError("pass args=OnlineMultiSampleConfig(...): its defaults differ from GRPO's (beta, loss_type).")
        sources = [reward_funcs] if reward_funcs is not None and not isinstance(reward_funcs, (list, tuple)) \
            else list(reward_funcs or [])
        if not sources:
            raise ValueError("OnlineMultiSampleTrainer needs a reward source: pass reward_funcs= (a reward function "
                             "(completions, **kwargs) -> list[float], a sequence-classification reward model or its "
                             "path, or a list of them, as TRL's GRPOTrainer takes them).")
        if not isinstance(args, OnlineMultiSampleConfig):
            raise TypeError(f"args must be a OnlineMultiSampleConfig, got {type(args).__name__}.")
        if isinstance(model, str):
            from ..models import is_builtin, resolve_model_path

            model = resolve_model_path(model) if is_builtin(model) else model
        super().__init__(model=model, reward_funcs=[as_trl_reward(r) for r in sources], args=args, **kwargs)
        _adapter.require(self)
        self.divergence = get_divergence(args.divergence, args.alpha)
        self.prompts_trained_on = 0

    # ---- 1. the split and the group loss, after TRL's sampling and scoring ----------------------------------------
    # Replaces GRPO's advantages with each completion's coefficient dL/dlog pi(y) of the group loss (module docstring).
    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
        mask = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
        cmask = out["completion_mask"] * out["tool_mask"] if "tool_mask" in out else out["completion_mask"]
        width = out["completion_ids"].size(1)
        if out.get("old_per_token_logps") is not None:  # TRL computed them already: the same forward
            logp = out["old_per_token_logps"]
        else:
            batch = self.args.per_device_train_batch_size if mode == "train" else self.args.per_device_eval_batch_size
            with torch.no_grad():
                logp, _ = _adapter.grpo_token_logps(self, self.model, ids, mask, width, batch_size=batch)
        ref = out["ref_per_token_logps"]
        logr_tokens = (logp - ref) * cmask
        local = torch.stack([(logp * cmask).sum(1), (ref * cmask).sum(1), cmask.sum(1).to(logp.dtype),
                             out["advantages"].to(logp.dtype)], 1)
        every = self.accelerator.gather(local)  # the whole generation batch, process by process, in order
        g = self.num_generations if mode == "train" else self.num_generations_eval
        coef, loss, stats = self._group_objective(every, g)
        n = local.size(0)
        start = self.accelerator.process_index * n
        out["advantages"] = coef[start:start + n].to(logp.dtype)
        out["group_loss"] = loss.detach()
        if mode == "train":
            self.prompts_trained_on += int(stats["group/kept_prompts"])
            # perf/*: the generation batch's prompt and completion tokens, each trained on once (num_iterations 1);
            # the steps' time includes the sampling, so perf/tokens_per_second is end-to-end, as PPO's
            self._perf_count(mask.sum(1))
        store = _adapter.metrics(self, mode)
        for key, value in stats.items():
            store[key].append(value)
        for name, est in divergence_estimates(logr_tokens, cmask).items():
            store[f"divergence/{name}"].append(self.accelerator.gather(est).mean().item())
        return out

    def _group_objective(self, every: torch.Tensor, g: int):
        """From [policy seq log-prob, reference seq log-prob, length, reward - group mean] of every completion: the
        coefficient of each completion, the group loss (mean over kept prompts, plus the chosen NLL) and metrics."""
        args = self.args
        seq = every[:, 0].detach().clone().requires_grad_(True)
        ref, lengths, centred = every[:, 1], every[:, 2], every[:, 3]
        groups = split_groups_by_reward(centred.view(-1, g).float(), args.grouping, args.num_chosen,
                                        args.num_rejected, args.min_reward_spread)
        kept = groups.kept.nonzero(as_tuple=True)[0]
        stats = {"group/kept_prompts": float(kept.numel()),
                 "group/skipped_prompts": float(groups.kept.numel() - kept.numel())}
        if kept.numel() == 0:
            return torch.zeros_like(seq), seq.new_zeros(()), stats
        c_row, c_gen = groups.chosen[kept].nonzero(as_tuple=True)
        r_row, r_gen = groups.rejected[kept].nonzero(as_tuple=True)
        c_idx, r_idx = kept[c_row] * g + c_gen, kept[r_row] * g + r_gen
        logr = seq - ref
        k = kept.numel()
        res = group_preference_loss(logr[c_idx], logr[r_idx], c_row, r_row, k, self.divergence, args.loss_type,
                                    args.beta, unbiased=args.unbiased, chosen_lengths=lengths[c_idx],
                                    rejected_lengths=lengths[r_idx], max_exponent=args.max_link_exponent)
        loss = res.per_row.sum() / k
        if args.nll_weight:
            loss = loss - args.nll_weight * seq[c_idx].sum() / lengths[c_idx].sum().clamp(min=1.0)
        (coef,) = torch.autograd.grad(loss, seq)
        with torch.no_grad():
            chosen_link = group_mean(res.scores.chosen.detach(), c_row, k)
            rejected_link = group_mean(res.scores.rejected.detach(), r_row, k)
            margins = args.beta * (chosen_link - rejected_link)
            stats.update({
                "group/chosen_size": c_idx.numel() / k, "group/rejected_size": r_idx.numel() / k,
                "group/reward_gap": (group_mean(centred[c_idx], c_row, k) - group_mean(centred[r_idx], r_row, k))
                .mean().item(),
                "implicit_rewards/chosen": (args.beta * chosen_link).mean().item(),
                "implicit_rewards/rejected": (args.beta * rejected_link).mean().item(),
                "implicit_rewards/margins": margins.mean().item(),
                "implicit_rewards/accuracies": (margins > 0).float().mean().item(),
                "logratios/chosen": group_mean(logr[c_idx].detach(), c_row, k).mean().item(),
                "logratios/rejected": group_mean(logr[r_idx].detach(), r_row, k).mean().item(),
                "mipo/variance_correction": (res.chosen.var / res.chosen.count
                                             + res.rejected.var / res.rejected.count).mean().item(),
                "link/num_clamped": float(res.scores.num_clamped),
            })
        return coef.detach(), loss.detach(), stats

    # ---- 2. the loss ---------------------------------------------------------------------------------------------
    # Replaces GRPO's clipped per-token objective: sum_i c_i log pi(y_i), whose gradient is the group loss's; the
    # value returned is the group loss (this micro-batch's share of it).
    def _compute_loss(self, model, inputs):
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        cmask = inputs["completion_mask"] * inputs["tool_mask"] if "tool_mask" in inputs else inputs["completion_mask"]
        logp, entropy = _adapter.grpo_token_logps(self, model, ids, mask, inputs["completion_ids"].size(1),
                                                  compute_entropy=True)
        surrogate = (inputs["advantages"] * (logp * cmask).sum(1)).sum() * self.accelerator.num_processes
        mode = "train" if self.model.training else "eval"
        share = inputs["group_loss"] / (self.current_gradient_accumulation_steps if mode == "train" else 1)
        totals = self.accelerator.reduce(torch.stack([(entropy.detach() * cmask).sum(), cmask.sum().float()]),
                                         reduction="sum")
        _adapter.metrics(self, mode)["entropy"].append((totals[0] / totals[1].clamp(min=1.0)).item())
        return surrogate - surrogate.detach() + share.to(surrogate.dtype)

    # Replaces TRL's card: the one writer in _card.py
    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        write_model_card(self, model_name, dataset_name, [*tags, f"divergence:{self.divergence.name}"])

    def card_details(self) -> list[str]:
        a = self.args
        sizes = f"{a.num_chosen} chosen / {a.num_rejected} rejected" if a.grouping == "top_bottom" else \
            "above / below the mean reward"
        return [f"method: online {'mIPO' if a.loss_type == 'ipo' else 'mDPO'} on TRL's GRPO (`{type(self).__name__}`)",
                f"divergence: `{self.divergence.name}`, beta {a.beta}",
                f"groups: {a.num_generations} samples per prompt, {sizes}",
                f"reward: {', '.join(self.reward_func_names)}"]
