"""Online mDPO / mIPO: group preference optimisation on the policy's own samples (docs/methods.md section 2).

Each iteration samples `num_generations` completions per prompt from the current policy, scores them (a
sequence-classification reward model, e.g. a `CausalRewardTrainer` output, or TRL-style reward functions with
`reward_weights`), splits each prompt's group into a chosen and a rejected sub-group by reward
(`alignkit.losses.split_groups_by_reward`), and optimises the mDPO / mIPO loss of `alignkit.losses` against the
frozen reference for `num_iterations` updates on the same generations.

Why it is built on our `PPOTrainer` and not on TRL's `GRPOTrainer`: the loss needs the sequence log-probs of the
policy *and the reference* for each completion, a loss per prompt (not per token) and a split of every group by
reward before the loss; GRPOTrainer's loss and its per-token advantage flow are not hooks one can replace without
overriding most of `_generate_and_score_completions` and `compute_loss`. `PPOTrainer` already owns what is shared
(prompt batches per rank, sampling under DeepSpeed ZeRO-3, the policy/reference log-probs of each sample, reward
model / reward function scoring, the divergence estimates, evaluation, sample tables, checkpoints and resume, its
own `train` loop on top of `transformers.Trainer`), so `OnlineMultiSampleTrainer` subclasses it without a value
model and replaces one iteration (`_training_iteration`) and its metrics. A prompt's generations are sampled,
scored and trained on by the process that holds the prompt: groups never split across ranks (DDP and DeepSpeed
ZeRO-2/3 alike; under ZeRO-3 the reference and reward models are sharded as PPOTrainer shards them).

Conventions:
* The loss uses the policy's and the reference's own log-probs (temperature-1 logits), as mDPO on a dataset does:
  with fixed completions and one completion per side it is `MultiSampleDPOTrainer`'s loss. `temperature` and
  `top_p` only shape sampling; the divergence estimates (`divergence/*`) are unbiased for samples from the policy
  itself, i.e. at `temperature: 1` and `top_p: 1` (the defaults).
* `per_device_train_batch_size` counts prompts (groups), as in `MultiSampleDPOConfig`; an iteration samples for
  `per_device_train_batch_size * gradient_accumulation_steps` prompts per process, and each update is one optimizer
  step on all of them: the mean of the per-prompt losses over the kept prompts of every process.
* Generations are reused without importance weights: mDPO / mIPO are off-policy losses (they hold on any sample of
  completions), so `num_iterations > 1` only makes the samples less fresh.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..divergences import DEFAULT_MAX_EXPONENT
from ..losses import GROUPINGS, group_mean, group_preference_loss, masked_mean, split_groups_by_reward
from ._common import PREFERENCE_RULES, check_ranges
from .on_policy_config import OnPolicyConfig
from .ppo import PPOTrainer
from .rollout import divergence_estimates, now, response_logprobs

__all__ = ["OnlineMultiSampleConfig", "OnlineMultiSampleTrainer"]


@dataclass
class OnlineMultiSampleConfig(OnPolicyConfig):
    r"""Configuration for [`OnlineMultiSampleTrainer`]: sampling and scoring as [`OnPolicyConfig`] (`response_length`
    new tokens at most, `temperature`, `stop_token`, `length_penalty`, `missing_eos_penalty`, `divergence`/`alpha`,
    ...), plus the groups and the mDPO / mIPO loss (docs/methods.md section 2).

    Parameters:
        num_generations (`int`, defaults to `4`): completions sampled per prompt (>= 2).
        grouping (`str`, defaults to `"top_bottom"`): `top_bottom` takes the `num_chosen` best and the
            `num_rejected` worst completions of a prompt; `above_below_mean` takes those above and below the
            prompt's mean reward. Prompts whose rewards do not spread (`max - min <= min_reward_spread`) are
            skipped and counted (`group/skipped_prompts`).
        num_chosen, num_rejected (`int`, default `1`): sub-group sizes of `top_bottom`.
        min_reward_spread (`float`, defaults to `0.0`).
        loss_type (`str`, defaults to `"sigmoid"`): `sigmoid` (mDPO) or `ipo` (mIPO).
        beta (`float`, defaults to `0.1`), unbiased (`bool`, defaults to `True`), nll_weight (`float`, defaults to
            `0.0`), max_link_exponent: as in `MultiSampleDPOConfig`.
        num_iterations (`int`, defaults to `1`): updates on each batch of generations.
        top_p (`float`, defaults to `1.0`): nucleus sampling.
        reward_weights (`list[float]`, *optional*): one weight per reward source (TRL's `reward_weights`); the
            score is their weighted sum. Unset: every weight 1.
    """

    #: an unset learning_rate becomes TRL's GRPO default
    _default_learning_rate = 1e-6

    exp_name: str = field(default="online_mdpo", metadata={"help": "Experiment name: the run name when unset."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    stop_token: str | None = field(default="eos", metadata={"help": "'eos' to stop completions at the EOS token."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling: the smallest set of tokens of this mass."})
    num_generations: int = field(default=4, metadata={"help": "Completions sampled per prompt (>= 2)."})
    grouping: str = field(default="top_bottom", metadata={"help": "top_bottom or above_below_mean."})
    num_chosen: int = field(default=1, metadata={"help": "top_bottom: the best completions taken as chosen."})
    num_rejected: int = field(default=1, metadata={"help": "top_bottom: the worst completions taken as rejected."})
    min_reward_spread: float = field(default=0.0, metadata={
        "help": "Skip a prompt whose rewards spread by no more than this (max - min)."})
    loss_type: str = field(default="sigmoid", metadata={"help": "sigmoid (mDPO) or ipo (mIPO)."})
    beta: float = field(default=0.1, metadata={"help": "mDPO's beta / mIPO's tau."})
    unbiased: bool = field(default=True, metadata={"help": "mIPO: use the unbiased (variance-corrected) estimator."})
    nll_weight: float = field(default=0.0, metadata={"help": "Weight of the NLL of the chosen group."})
    max_link_exponent: float | None = field(default=DEFAULT_MAX_EXPONENT, metadata={
        "help": "Links with an exponential part are continued linearly above this exponent (as FDPOConfig)."})
    num_iterations: int = field(default=1, metadata={"help": "Updates on each batch of generations."})
    reward_weights: list[float] | None = field(default=None, metadata={"help": "One weight per reward source."})

    def __post_init__(self):
        check_ranges(self, PREFERENCE_RULES)
        super().__post_init__()
        if self.num_generations < 2:
            raise ValueError(f"num_generations must be >= 2, got {self.num_generations}: a prompt's group needs a "
                             "chosen and a rejected completion; e.g. num_generations: 4.")
        if self.grouping not in GROUPINGS:
            raise ValueError(f"grouping must be one of {', '.join(GROUPINGS)}, got {self.grouping!r}.")
        if self.grouping == "top_bottom":
            if self.num_chosen < 1 or self.num_rejected < 1:
                raise ValueError(f"num_chosen and num_rejected must be >= 1, got {self.num_chosen} and "
                                 f"{self.num_rejected}: each prompt needs a chosen and a rejected completion.")
            if self.num_chosen + self.num_rejected > self.num_generations:
                raise ValueError(f"num_chosen + num_rejected ({self.num_chosen} + {self.num_rejected}) must be <= "
                                 f"num_generations ({self.num_generations}): a completion cannot be both chosen and "
                                 "rejected. Lower num_chosen/num_rejected or raise num_generations.")
        if self.loss_type not in ("sigmoid", "ipo"):
            raise ValueError(f"loss_type must be 'sigmoid' (mDPO) or 'ipo' (mIPO), got {self.loss_type!r}.")
        if self.num_iterations < 1:
            raise ValueError(f"num_iterations must be >= 1, got {self.num_iterations}.")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}; 1 samples from the whole distribution.")
        if self.min_reward_spread < 0:
            raise ValueError(f"min_reward_spread must be >= 0, got {self.min_reward_spread}.")
        if self.reward_weights is not None:
            self.reward_weights = [float(w) for w in self.reward_weights]


class OnlineMultiSampleTrainer(PPOTrainer):
    """On-policy mDPO / mIPO: groups of the policy's own samples, split by reward (see the module docstring).

    Example:
        ```python
        from alignkit import OnlineMultiSampleConfig, OnlineMultiSampleTrainer
        from alignkit.rewards import sentiment

        args = OnlineMultiSampleConfig(output_dir="online", loss_type="ipo", num_generations=4, divergence="jsd")
        trainer = OnlineMultiSampleTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=ref,
                                           reward_funcs=[sentiment], train_dataset=prompts)
        trainer.train()
        ```

    `reward_model` is a sequence-classification model with one output (e.g. a `CausalRewardTrainer` output) or a
    callable `(prompts, completions) -> list[float]`; `reward_funcs` (TRL's GRPO convention) is one or a list of
    such sources, summed with `reward_weights`. Give one of the two (or `reward_model_path` in the config).
    `train_dataset` has a `prompt` column (text or conversational) or tokenized `input_ids`.
    """

    config_class = OnlineMultiSampleConfig
    _config_with_article = "an OnlineMultiSampleConfig"
    _default_run_suffix = "online-mDPO"
    _tag_names = ["trl", "alignkit", "mdpo", "online"]
    _name = "Online multi-sample DPO"
    # no value model: the group loss needs none (PPOTrainer's wrapper becomes PolicyOnly)
    _uses_value_model = False
    _batch_description = ("iteration's prompts (per_device_train_batch_size x gradient_accumulation_steps x "
                          "processes)")

    def __init__(self, args: OnlineMultiSampleConfig | None = None, processing_class=None, model=None,
                 ref_model=None, reward_model=None, train_dataset=None, reward_funcs=None, data_collator=None,
                 eval_dataset=None, optimizers=(None, None), callbacks=None, peft_config=None):
        if reward_model is not None and reward_funcs is not None:
            raise ValueError("pass the reward as `reward_model` or as `reward_funcs`, not both (reward_funcs takes a "
                             "list: put the reward model in it).")
        super().__init__(args=args, processing_class=processing_class, model=model, ref_model=ref_model,
                         reward_model=reward_funcs if reward_funcs is not None else reward_model,
                         train_dataset=train_dataset, value_model=None, data_collator=data_collator,
                         eval_dataset=eval_dataset, optimizers=optimizers, callbacks=callbacks,
                         peft_config=peft_config)
        self.reward_funcs = self.reward_model  # the list of sources
        weights = self.args.reward_weights
        if weights is None:
            weights = [1.0] * len(self.reward_funcs)
        elif len(weights) != len(self.reward_funcs):
            raise ValueError(f"reward_weights has {len(weights)} weights for {len(self.reward_funcs)} reward "
                             "sources; give one weight per reward model / function (or leave it unset).")
        self.reward_weights = weights
        self._source_scores = [[] for _ in self.reward_funcs]  # per source, the scores of the current rollout
        # frozen, as PPOTrainer does with its one reward model: sharded under ZeRO-3, else a copy on the device
        self.reward_funcs = [self._prepare_frozen(m) if isinstance(m, nn.Module) else m for m in self.reward_funcs]
        # PPOTrainer samples with top_p 1; here top_p is an option
        self.generation_config.top_p = self.args.top_p

    # Replaces PPOTrainer's single reward model: TRL's `reward_funcs` convention, one source or a list of them.
    def _check_reward_source(self, reward):
        sources = list(reward) if isinstance(reward, (list, tuple)) else ([] if reward is None else [reward])
        if not sources:
            raise ValueError("OnlineMultiSampleTrainer needs a reward source: pass reward_model= (a "
                             "sequence-classification model with one output, e.g. a CausalRewardTrainer output, or "
                             "a callable (prompts, completions) -> list[float]), reward_funcs= [one or more of them], "
                             "or set reward_model_path in the config.")
        return [super(OnlineMultiSampleTrainer, self)._check_reward_source(s) for s in sources]

    # Replaces PPOTrainer's one reward: the weighted sum of the sources; each source's own (unweighted) scores
    # are kept for its `rewards/<name>/mean` and `/std` metrics (TRL GRPO's names).
    def _scores(self, ids, mask, context_len, response_mask) -> torch.Tensor:
        total = None
        for k, (weight, source) in enumerate(zip(self.reward_weights, self.reward_funcs)):
            raw = self._score_with(source, ids, mask, context_len, response_mask)
            self._source_scores[k].append(raw)
            total = weight * raw if total is None else total + weight * raw
        return total

    @property
    def reward_func_names(self) -> list[str]:
        """One name per reward source, as TRL's GRPOTrainer names them: a model's checkpoint folder name, a
        function's `__name__`; repeated names get `_2`, `_3`, ..."""
        names = []
        for source in self.reward_funcs:
            if isinstance(source, nn.Module):
                name = os.path.basename(str(getattr(source.config, "name_or_path", "") or "").rstrip("/"))
                name = name or type(source).__name__
            else:
                name = getattr(source, "__name__", None) or type(source).__name__
            k, base = 2, name
            while name in names:
                name, k = f"{base}_{k}", k + 1
            names.append(name)
        return names

    # Replaces PPOTrainer's temperature-scaled log-probs: mDPO / mIPO are defined on the policy's own log-probs
    # (as MultiSampleDPOTrainer computes them), whatever temperature sampled the completions.
    def _token_logprobs(self, model, ids, mask, context_len):
        return response_logprobs(model, ids, mask, context_len, None)

    def _updates_per_iteration(self) -> int:
        return self.args.num_iterations

    # ---- one iteration ---------------------------------------------------------------------------
    @torch.no_grad()
    def _group_rollout(self, batch) -> dict:
        """`num_generations` samples per prompt (prompt p's are rows p*G .. p*G + G - 1), their scores, the
        log-probs of policy and reference, and the chosen / rejected split of each prompt's group."""
        args, g = self.args, self.args.num_generations
        num_prompts = batch["input_ids"].size(0)
        self._source_scores = [[] for _ in self.reward_funcs]
        r = self._generate_and_score({k: v.repeat_interleave(g, dim=0) for k, v in batch.items()}, values=False)
        rmask = r["response_mask"].float()
        lengths = rmask.sum(1)
        scores = self._penalised_scores(r["scores"], lengths, r["has_stop"])
        if not torch.isfinite(scores).all():
            raise ValueError("the reward gave a non-finite score (NaN or inf) to a sampled completion; check the "
                             "reward model / functions.")
        groups = split_groups_by_reward(scores.view(num_prompts, g), args.grouping, args.num_chosen,
                                        args.num_rejected, args.min_reward_spread)
        return {"ids": r["ids"], "mask": r["mask"], "response_mask": rmask, "context_len": r["context_len"],
                "ref_logp": r["ref_logp"], "logr": (r["logp"] - r["ref_logp"]) * rmask, "entropy": r["entropy"],
                "lengths": lengths, "has_stop": r["has_stop"].float(), "scores": scores, "groups": groups,
                "num_prompts": num_prompts, "source_scores": [torch.cat(c) for c in self._source_scores]}

    def _group_loss(self, ro, rows: torch.Tensor, num_rows_total: float, chosen_tokens_total: float):
        """The loss of the prompts `rows` of a rollout: the sum of their per-prompt mDPO / mIPO losses over
        `num_rows_total` (the kept prompts of the whole update, so that the micro-batches add up to the mean), plus
        `nll_weight` times their chosen tokens' NLL over `chosen_tokens_total`. Skipped prompts add nothing."""
        args, g, groups = self.args, self.args.num_generations, ro["groups"]
        rows = rows[groups.kept[rows]]
        ids, mask, rmask_all, c = ro["ids"], ro["mask"], ro["response_mask"], ro["context_len"]
        if rows.numel() == 0:
            # nothing kept here, but another process may have kept prompts: a forward with zero weight keeps
            # DDP's gradient all-reduce in step
            idx = torch.zeros(1, dtype=torch.long, device=ids.device)
            logp, _ = self.model(ids[idx], mask[idx], c, None)
            return (logp * 0).sum(), None
        c_row, c_gen = groups.chosen[rows].nonzero(as_tuple=True)
        r_row, r_gen = groups.rejected[rows].nonzero(as_tuple=True)
        c_idx, r_idx = rows[c_row] * g + c_gen, rows[r_row] * g + r_gen
        idx = torch.cat([c_idx, r_idx])
        # [chosen; rejected], as MultiSampleDPOTrainer lays a batch out; through the (DDP-)wrapped module
        logp, _ = self.model(ids[idx], mask[idx], c, None)
        rmask = rmask_all[idx]
        logratios = (logp * rmask).sum(1) - (ro["ref_logp"][idx] * rmask).sum(1)
        lengths = rmask.sum(1)
        n_c = c_idx.numel()
        out = group_preference_loss(logratios[:n_c], logratios[n_c:], c_row, r_row, rows.numel(), self.divergence,
                                    args.loss_type, args.beta, unbiased=args.unbiased, chosen_lengths=lengths[:n_c],
                                    rejected_lengths=lengths[n_c:], max_exponent=args.max_link_exponent)
        loss = out.per_row.sum() / num_rows_total
        if args.nll_weight:
            loss = loss - args.nll_weight * (logp[:n_c] * rmask[:n_c]).sum() / max(chosen_tokens_total, 1.0)
        with torch.no_grad():
            k = rows.numel()
            stats = {
                "per_row": out.per_row.detach(),
                "chosen_logratio": group_mean(logratios[:n_c].detach(), c_row, k),
                "rejected_logratio": group_mean(logratios[n_c:].detach(), r_row, k),
                "chosen_link": group_mean(out.scores.chosen.detach(), c_row, k),
                "rejected_link": group_mean(out.scores.rejected.detach(), r_row, k),
                "correction": (out.chosen.var / out.chosen.count + out.rejected.var / out.rejected.count).detach(),
                "num_clamped": out.scores.num_clamped.reshape(1).float(),
            }
        return loss, stats

    def _update_counts(self, ro) -> tuple[float, float]:
        """Kept prompts and chosen completion tokens of a rollout, summed over processes: what one update's loss is
        normalised by (`_group_loss`)."""
        groups = ro["groups"]
        chosen_tokens = (ro["response_mask"].sum(1) * groups.chosen.flatten().float()).sum()
        counts = torch.stack([groups.kept.sum().float(), chosen_tokens])
        if self.args.world_size > 1:
            counts = self.accelerator.reduce(counts, reduction="sum")
        rows_total, tokens_total = counts.tolist()
        return rows_total, tokens_total

    # Replaces PPOTrainer's iteration (rollout with values, GAE, clipped updates): group rollout, then
    # `num_iterations` optimizer steps, each on every prompt of the rollout.
    def _training_iteration(self, batch):
        args = self.args
        ro = self._group_rollout(batch)
        groups, n_prompts = ro["groups"], ro["num_prompts"]
        used = (groups.chosen | groups.rejected).flatten()
        rows_total, tokens_total = self._update_counts(ro)
        self.prompts_trained_on = getattr(self, "prompts_trained_on", 0) + int(rows_total)
        self._perf_count(ro["mask"][used].sum(1), repeats=args.num_iterations)
        t_opt = now()
        losses, stats = [], []
        bs = args.per_device_train_batch_size
        for _ in range(args.num_iterations):
            if rows_total > 0:  # every process agrees (global count): with nothing kept anywhere, no step
                total = 0.0
                starts = range(0, n_prompts, bs)  # one micro-batch per `bs` prompts
                for k_micro, start in enumerate(starts):
                    rows = torch.arange(start, min(start + bs, n_prompts), device=ro["ids"].device)
                    loss, s = self._group_loss(ro, rows, rows_total, tokens_total)
                    # the loss is already this micro-batch's share of the global mean: DDP's (and ZeRO's)
                    # averaging over processes is undone
                    self._micro_batch_backward(loss * args.world_size, len(starts), last=k_micro == len(starts) - 1)
                    total += loss.detach().item()
                    if s is not None:
                        stats.append(s)
                losses.append(total)
            self.lr_scheduler.step()
        self._timings["optimisation"] = now() - t_opt
        # each process's loss is its share of the global mean: the iteration's loss is their sum (every process
        # runs this reduction, whatever it kept)
        loss_value = torch.tensor([sum(losses) / len(losses) if losses else 0.0], device=ro["ids"].device)
        if args.world_size > 1:
            loss_value = self.accelerator.reduce(loss_value, reduction="sum")
        loss_value = loss_value.item()
        return loss_value, lambda: self._iteration_metrics(ro, loss_value, stats)

    @torch.no_grad()
    def _iteration_metrics(self, ro, loss_value, stats) -> dict[str, float]:
        gather = self.accelerator.gather_for_metrics
        device = ro["ids"].device
        groups, g = ro["groups"], self.args.num_generations
        scores = gather(ro["scores"])
        per_prompt = ro["scores"].view(-1, g)
        kept = groups.kept
        n_c, n_r = groups.chosen.sum(1).float(), groups.rejected.sum(1).float()
        chosen_scores = (per_prompt * groups.chosen).sum(1) / n_c.clamp(min=1)
        rejected_scores = (per_prompt * groups.rejected).sum(1) / n_r.clamp(min=1)
        rmask = ro["response_mask"]
        # Per kept prompt (sub-group sizes and rewards) and per kept prompt and update (the loss statistics): the
        # number of rows differs from process to process, so each is summed locally and the sums are added over
        # processes in one collective that every process runs, whatever it kept.
        beta = self.args.beta
        per_kept = torch.stack([n_c, n_r, chosen_scores, rejected_scores], 1)[kept]
        if stats:
            cat = {k: torch.cat([s[k] for s in stats]) for k in stats[0]}
            margins = beta * (cat["chosen_link"] - cat["rejected_link"])
            per_update = torch.stack([beta * cat["chosen_link"], beta * cat["rejected_link"], margins,
                                      (margins > 0).float(), cat["chosen_logratio"], cat["rejected_logratio"],
                                      cat["correction"]], 1).float()
            clamped = cat["num_clamped"].sum()
        else:
            per_update, clamped = torch.zeros(0, 7, device=device), torch.zeros((), device=device)
        sums = torch.cat([per_kept.sum(0), per_kept.new_tensor([per_kept.size(0)]), per_update.sum(0).to(device),
                          per_kept.new_tensor([per_update.size(0)]), clamped.reshape(1).float().to(device)])
        if self.args.world_size > 1:
            sums = self.accelerator.reduce(sums, reduction="sum")
        sums = sums.tolist()
        metrics = {
            "objective/scores": scores.mean().item(),
            "reward/mean": scores.mean().item(),
            "reward/std": scores.std().item() if scores.numel() > 1 else 0.0,
            "reward/group_std": gather(per_prompt.std(1)).mean().item(),
            "group/skipped_prompts": gather((~kept).sum().float().reshape(1)).sum().item(),
            "group/kept_prompts": sums[4],
            "objective/entropy": gather(masked_mean(ro["entropy"], rmask).reshape(1)).mean().item(),
            "val/num_eos_tokens": gather(ro["has_stop"].sum().reshape(1)).sum().item(),
            "response/length": gather(ro["lengths"]).mean().item(),
            "loss": loss_value,
            "lr": self.lr_scheduler.get_last_lr()[0],
            "episode": self.state.global_step * ro["ids"].size(0) * self.args.world_size,
        }
        if sums[4]:
            for k, key in enumerate(("group/chosen_size", "group/rejected_size", "reward/chosen_mean",
                                     "reward/rejected_mean")):
                metrics[key] = sums[k] / sums[4]
        for name, source_scores in zip(self.reward_func_names, ro["source_scores"]):
            every = gather(source_scores)
            metrics[f"rewards/{name}/mean"] = every.mean().item()
            metrics[f"rewards/{name}/std"] = every.std().item() if every.numel() > 1 else 0.0
        metrics.update({f"time/{k}": v for k, v in self._timings.items()})
        # the unbiased estimate of every divergence of the family from the reference, from this rollout's samples
        for name, est in divergence_estimates(ro["logr"], rmask).items():
            metrics[f"divergence/{name}"] = gather(est).mean().item()
        if sums[12]:
            for k, key in enumerate(("implicit_rewards/chosen", "implicit_rewards/rejected", "implicit_rewards/margins",
                                     "implicit_rewards/accuracies", "logratios/chosen", "logratios/rejected",
                                     "mipo/variance_correction")):
                metrics[key] = sums[5 + k] / sums[12]
            metrics["link/num_clamped"] = sums[13]
        return metrics

    def card_details(self) -> list[str]:
        """The method's settings, one line each, for the model card (written by PPOTrainer's create_model_card)."""
        a = self.args
        alpha = f", alpha={self.divergence.alpha:g}" if self.divergence.name == "alpha" else ""
        rewards = ", ".join(type(r).__name__ if isinstance(r, nn.Module) else getattr(r, "__name__", "a function")
                            for r in self.reward_funcs)
        sizes = f"{a.num_chosen} chosen / {a.num_rejected} rejected" if a.grouping == "top_bottom" else \
            "above / below the mean reward"
        return [f"method: online {'mIPO' if a.loss_type == 'ipo' else 'mDPO'} (`{type(self).__name__}`)",
                f"divergence: `{self.divergence.name}`{alpha}, beta {a.beta}",
                f"groups: {a.num_generations} samples per prompt, {sizes}", f"reward: {rewards}",
                f"iterations: {self.state.global_step}"]

