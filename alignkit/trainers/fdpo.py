"""f-DPO: DPO under an f-divergence constraint (thesis chapter 2, docs/methods.md section 1)."""

from __future__ import annotations

import os
import textwrap
from dataclasses import dataclass, field
from typing import Any

import torch
from trl import DPOConfig, DPOTrainer

from ..divergences import DEFAULT_MAX_EXPONENT, UnsupportedDivergenceError, get_divergence
from ._causal import AttributeBinsMixin, CausalPenaltyArguments, CollatorWithBins
from ._common import (CAUSAL_RULES, PREFERENCE_RULES, TRAINING_RULES, ConfigResolverMixin, check_ranges,
                      default_precision_for_this_machine, name_base_model_in_card)
from ..losses import FDPO_LOSS_TYPES, fdpo_scores, preference_ece, preference_loss

__all__ = ["FDPOConfig", "FDPOTrainer"]


@dataclass
class FDPOConfig(CausalPenaltyArguments, DPOConfig):
    r"""Configuration for [`FDPOTrainer`]: TRL's `DPOConfig` plus the f-divergence.

    Parameters:
        divergence (`str`, defaults to `"reverse_kl"`):
            One of `reverse_kl` (plain DPO), `forward_kl`, `jsd`, `alpha`. TRL's names
            (`js_divergence`, `alpha_divergence`) are accepted as aliases.
        alpha (`float`, *optional*):
            For `divergence="alpha"`: alpha in (0, 1) in the thesis' convention
            (`f(u) = (u^(1-a) - (1-a)u - a)/(a(a-1))`); TRL's `f_alpha_divergence_coef = 1 - alpha`.
        max_link_exponent (`float`, defaults to `20.0`):
            The exponentials inside the forward-KL and alpha links are continued linearly above this
            exponent, so extreme log-ratios give a finite loss and finite gradients. The fraction of
            continued values is logged as `link/clamped_fraction`. `None` disables it.
        mmd_coef (`float`, defaults to `0.0`):
            Causal DPO (thesis 4.8): with `mmd_coef > 0`, the binned MMD^2 penalty of the causal reward model
            is applied to the implicit rewards `beta * (f'(u) - f'(1))` of the batch, making them independent
            of the spurious attribute(s). `attributes`, `num_bins`, `binning`, `conditional`,
            `mmd_bandwidths` and `bin_balanced_sampler` mean what they mean in `CausalRewardConfig`.

    TRL's own `f_divergence_type` / `f_alpha_divergence_coef` must stay at their defaults: set
    `divergence` / `alpha` instead.
    """

    divergence: str = field(
        default="reverse_kl",
        metadata={"help": "f-divergence: reverse_kl, forward_kl, jsd or alpha."},
    )
    alpha: float | None = field(
        default=None,
        metadata={"help": "alpha in (0, 1) for divergence=alpha (thesis convention; TRL's coef = 1 - alpha)."},
    )
    max_link_exponent: float | None = field(
        default=DEFAULT_MAX_EXPONENT,
        metadata={"help": "Exponent above which exp() inside the link is continued linearly (None: never)."},
    )

    def __post_init__(self):
        check_ranges(self, TRAINING_RULES, PREFERENCE_RULES, CAUSAL_RULES)
        default_precision_for_this_machine(self)
        super().__post_init__()
        if self.f_divergence_type != "reverse_kl" or self.f_alpha_divergence_coef != 0.5:
            hint = ""
            if self.f_divergence_type == "alpha_divergence":
                hint = f" (f_alpha_divergence_coef={self.f_alpha_divergence_coef} is alpha: {1 - self.f_alpha_divergence_coef:g})"
            raise ValueError(
                "FDPOConfig takes the divergence from `divergence`/`alpha`; TRL's `f_divergence_type`/"
                "`f_alpha_divergence_coef` must not be set too. Remove them and set "
                f"`divergence: {_trl_to_ours(self.f_divergence_type)}`{hint}."
            )
        canonical = get_divergence(self.divergence, self.alpha if self.divergence in ("alpha", "alpha_divergence") else 0.5)
        if canonical.name != "alpha" and self.alpha is not None:
            raise UnsupportedDivergenceError(
                f"`alpha` is only used with `divergence: alpha`, but divergence is {self.divergence!r}. "
                "Remove `alpha` or set `divergence: alpha`."
            )
        self.divergence = canonical.name
        unsupported = [t for t in self.loss_type if t not in FDPO_LOSS_TYPES + ("sft",)]
        if unsupported:
            raise ValueError(
                f"loss_type {unsupported} is not supported by FDPOTrainer: the f-DPO link is only meaningful "
                f"for losses of the chosen-minus-rejected score difference. Use one of "
                f"{', '.join(FDPO_LOSS_TYPES)} (optionally combined with 'sft'), or TRL's DPOTrainer."
            )
        if self.ld_alpha is not None:
            raise ValueError("`ld_alpha` (LD-DPO) is not supported by FDPOTrainer; remove it or use DPOTrainer.")
        if self.use_weighting:
            raise ValueError("`use_weighting` (WPO) is not supported by FDPOTrainer; remove it or use DPOTrainer.")
        self._check_causal_fields()


def _trl_to_ours(name: str) -> str:
    return {"js_divergence": "jsd", "alpha_divergence": "alpha"}.get(name, name)


class FDPOTrainer(AttributeBinsMixin, ConfigResolverMixin, DPOTrainer):
    """Drop-in replacement for TRL's `DPOTrainer` that trains under any f-divergence of Theorem 1.

    Everything but the loss is TRL's: dataset preparation, the collator, the fused LM head, reference
    handling (separate model, PEFT adapter disabled, or `precompute_ref_log_probs`), evaluation and
    checkpointing. Only `_compute_loss` is replaced (see there).

    Example:
        ```python
        from alignkit import FDPOConfig, FDPOTrainer

        args = FDPOConfig(output_dir="out", divergence="jsd", beta=0.1)
        trainer = FDPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer)
        trainer.train()
        ```
    """

    _tag_names = ["trl", "dpo", "alignkit", "f-dpo"]
    _name = "f-DPO"
    _paper = {
        "title": "Beyond Reverse KL: Generalizing Direct Preference Optimization with Diverse Divergence Constraints",
        "id": "2309.16240",
        "citation": textwrap.dedent("""\
            @inproceedings{wang2024beyond,
                title     = {{Beyond Reverse KL: Generalizing Direct Preference Optimization with Diverse Divergence Constraints}},
                author    = {Chaoqi Wang and Yibo Jiang and Chenghao Yang and Han Liu and Yuxin Chen},
                year      = 2024,
                booktitle = {The Twelfth International Conference on Learning Representations, ICLR 2024},
            }"""),
    }

    #: the config class this trainer takes, and the suffix of its default output_dir
    config_class = FDPOConfig
    _config_with_article = "an FDPOConfig"
    _default_run_suffix = "fDPO"

    #: whether reference precomputation goes through TRL's dataset cache files (shared between ranks)
    _precompute_uses_dataset_cache = True

    def __init__(self, model, ref_model=None, args: FDPOConfig | None = None, *pargs, **kwargs):
        args = self._resolve_args(model, args)
        train_dataset = kwargs.get("train_dataset", pargs[1] if len(pargs) > 1 else None)
        self._check_precompute_is_possible(args, train_dataset)
        self.divergence = get_divergence(args.divergence, args.alpha)
        #: the resolved recipe (set by `alignkit train`), written into the model card
        self.alignkit_recipe: str | None = None
        self.binner = None  # Causal DPO: fitted on the training set in _prepare_dataset
        super().__init__(model, ref_model, args, *pargs, **kwargs)
        self._pref_logits: dict[str, list[torch.Tensor]] = {"train": [], "eval": []}
        if self._causal_enabled():
            self.data_collator = CollatorWithBins(self.data_collator)

    @classmethod
    def _check_precompute_is_possible(cls, args, train_dataset):
        """`precompute_ref_log_probs` with several processes: TRL documents that it never worked under
        DeepSpeed, and its precompute hands results between ranks through dataset cache files, which an
        in-memory dataset does not have (rank 1 then fails on rank 0's missing temp file). Refuse both with
        the fix instead of failing mid-way."""
        if not args.precompute_ref_log_probs or args.world_size <= 1:
            return
        reason = None
        if args.deepspeed:
            reason = "under DeepSpeed"
        elif cls._precompute_uses_dataset_cache and train_dataset is not None and not getattr(
                train_dataset, "cache_files", None):
            reason = "with an in-memory dataset (no cache files the ranks can share)"
        if reason:
            raise ValueError(
                f"precompute_ref_log_probs is not supported with {args.world_size} processes {reason}. Set "
                "precompute_ref_log_probs: false (the reference then runs in each step, sharded like the policy "
                "under ZeRO-3), or precompute on one process" + (", or save the dataset to disk first" if
                                                                  "in-memory" in reason else "") + ".")

    # Causal DPO only: extends DPOTrainer._prepare_dataset (attribute bins computed from the raw completions
    # and carried as two columns), its signature columns (so they survive) and the train sampler.
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if self._causal_enabled(args):
            dataset = self._add_bins_if_needed(dataset, processing_class, args, dataset_name)
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self._causal_enabled():
            self._add_bin_signature_columns()

    def _get_train_sampler(self, *args, **kwargs):
        return self._bin_balanced_sampler() or super()._get_train_sampler(*args, **kwargs)

    def save_model(self, output_dir=None, _internal_call=False):
        super().save_model(output_dir, _internal_call)
        self._save_bins(output_dir)

    # ------------------------------------------------------------------------------------------
    # Replaces DPOTrainer._compute_loss. TRL inlines its f-divergence scores there, and its forward-KL
    # and alpha scores overflow (1 - exp(-logr) is -inf for logr = -1e4); it also has no hook between
    # the log-probs and the loss. We reuse TRL's fused-LM-head forward and `compute_ref_log_probs` (so
    # PEFT adapters, a separate reference and precomputed reference log-probs all work as in TRL) and
    # take the scores and the loss from alignkit.losses. TRL's metric names are kept.
    # ------------------------------------------------------------------------------------------
    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        fwd = self._forward_logps(model, inputs)
        loss, per_pair = self._fdpo_loss(fwd, inputs)
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * fwd["outputs"].aux_loss
        self._check_finite(loss, fwd)
        self._log_step_metrics(mode, fwd, inputs, per_pair)
        if return_outputs:
            with torch.no_grad():
                outputs = model(**fwd["model_kwargs"])
            return loss, outputs
        return loss

    #: batch keys that are not model inputs (TRL's collator and reference precompute add them)
    _non_model_keys = frozenset({"completion_mask", "ref_chosen_logps", "ref_rejected_logps", "z_bins"})

    def _forward_logps(self, model, inputs) -> dict[str, Any]:
        """Policy forward (fused LM head) and reference log-probs, summed over completion tokens."""
        model_kwargs = {k: v for k, v in inputs.items() if k not in self._non_model_keys}
        model_kwargs["use_cache"] = False
        if self.aux_loss_enabled:
            model_kwargs["output_router_logits"] = True
        completion_mask = inputs["completion_mask"]
        shift_mask = completion_mask[..., 1:]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        outputs = self._policy_forward(model, model_kwargs, labels)
        seq_len = shift_mask.size(1)
        # prompt-learning PEFT prepends virtual tokens: keep the positions of the real tokens
        per_token_logps = outputs.log_probs[:, -seq_len:]
        logps = per_token_logps.sum(dim=1)
        if self.precompute_ref_logps:
            ref_logps = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]]).to(logps.dtype)
        else:
            ref_logps = self._reference_logps(model_kwargs, completion_mask)
        return {
            "outputs": outputs,
            "model_kwargs": model_kwargs,
            "per_token_logps": per_token_logps,
            "shift_mask": shift_mask,
            "logps": logps,
            "ref_logps": ref_logps,
            "lengths": completion_mask.sum(dim=1).to(logps.dtype),
            "num_input_tokens": inputs["attention_mask"].sum(),
        }

    def _policy_forward(self, model, model_kwargs, labels):
        return model(**model_kwargs, labels=labels, fused_lm_head=True)

    def _reference_logps(self, model_kwargs, completion_mask) -> torch.Tensor:
        """Reference log-probs of every sequence, through TRL's `compute_ref_log_probs` (which handles a
        separate reference model, and a PEFT model with its adapter disabled)."""
        ref_model = self.ref_model if self.ref_model is not None else self.model
        ref_inputs = {k: v for k, v in model_kwargs.items() if k not in ("use_cache", "output_router_logits")}
        ref_inputs["completion_mask"] = completion_mask
        return torch.cat(self.compute_ref_log_probs(ref_model, ref_inputs))

    def _fdpo_loss(self, fwd, inputs):
        """Eq. 2.2 (and the other link-compatible losses) for a batch laid out as [chosen, rejected]."""
        logratios = fwd["logps"] - fwd["ref_logps"]
        chosen_lr, rejected_lr = logratios.chunk(2, dim=0)
        scores = fdpo_scores(chosen_lr, rejected_lr, self.divergence, self.args.max_link_exponent)
        chosen_len, rejected_len = fwd["lengths"].chunk(2, dim=0)
        loss = 0.0
        for loss_type, weight in zip(self.loss_types, self.loss_weights, strict=True):
            if loss_type == "sft":
                chosen_mask = fwd["shift_mask"].chunk(2, dim=0)[0].bool()
                per_pair = -fwd["per_token_logps"].chunk(2, dim=0)[0][chosen_mask].mean().expand(chosen_lr.size(0))
            else:
                per_pair = preference_loss(
                    scores.chosen,
                    scores.rejected,
                    loss_type,
                    self.beta,
                    label_smoothing=self.label_smoothing,
                    chosen_lengths=chosen_len,
                    rejected_lengths=rejected_len,
                )
            loss = loss + per_pair.mean() * weight
        if self._causal_enabled() and "z_bins" in inputs:  # Causal DPO: the penalty on the implicit rewards
            implicit = self.beta * torch.cat([scores.chosen, scores.rejected])
            mode = "train" if self.model.training else "eval"
            loss = loss + self.args.mmd_coef * self._mmd_penalty(implicit, inputs["z_bins"], mode).penalty
        stats = {
            "chosen_logratios": chosen_lr.detach(),
            "rejected_logratios": rejected_lr.detach(),
            "chosen_link": scores.chosen.detach(),
            "rejected_link": scores.rejected.detach(),
            "num_clamped": scores.num_clamped,
        }
        return loss, stats

    def _check_finite(self, loss, fwd):
        # Trainer's `logging_nan_inf_filter` would hide a non-finite loss from the logs and keep training.
        if not torch.isfinite(loss.detach()).all():
            lr = (fwd["logps"] - fwd["ref_logps"]).detach()
            raise FloatingPointError(
                f"f-DPO loss is {loss.item()} at step {self.state.global_step} (divergence={self.divergence}, "
                f"beta={self.beta}); log-ratios ranged from {lr.min().item():.3g} to {lr.max().item():.3g}, and "
                f"{(~torch.isfinite(fwd['logps'])).sum().item()} policy log-probs were not finite. Lower the "
                "learning rate, check the data for empty completions, or use float32/bf16 instead of fp16."
            )

    def _log_step_metrics(self, mode, fwd, inputs, s):
        """TRL's DPO metrics (same names) plus the f-DPO link values, clamping and calibration.

        All per-batch values are gathered in two collective calls (TRL makes about a dozen).
        """
        gather = self.accelerator.gather_for_metrics
        outputs, mask = fwd["outputs"], fwd["shift_mask"].bool()
        seq_len = mask.size(1)
        chosen_mask, rejected_mask = mask.chunk(2, dim=0)
        mean_logits_c, mean_logits_r = outputs.mean_logits[:, -seq_len:].detach().chunk(2, dim=0)
        top1_c = outputs.is_top1[:, -seq_len:].chunk(2, dim=0)[0]
        sums = torch.stack(
            [
                (outputs.entropy[:, -seq_len:].detach() * mask).sum().float(),
                mask.sum().float(),
                mean_logits_c[chosen_mask].sum().float(),
                chosen_mask.sum().float(),
                mean_logits_r[rejected_mask].sum().float(),
                rejected_mask.sum().float(),
                (top1_c & chosen_mask).sum().float(),
                s["num_clamped"].float().to(mask.device),
                fwd["num_input_tokens"].float(),
            ]
        )
        sums = gather(sums.unsqueeze(0)).sum(0).tolist()
        ent, n_tok, lc, n_c, lr, n_r, top1, n_clamped, n_attn = sums
        per_pair = torch.stack(
            [
                s["chosen_logratios"].float(),
                s["rejected_logratios"].float(),
                s["chosen_link"].float(),
                s["rejected_link"].float(),
                *[x.detach().float() for x in fwd["logps"].chunk(2, dim=0)],
            ],
            dim=1,
        )
        per_pair = gather(per_pair)
        c_lr, r_lr, c_link, r_link, c_logps, r_logps = per_pair.unbind(dim=1)

        m = self._metrics[mode]
        m["entropy"].append(ent / n_tok if n_tok > 0 else 0.0)
        if mode == "train":
            self._total_train_tokens += int(n_attn) // self._tp_size
        m["num_tokens"] = [self._total_train_tokens]
        m["logits/chosen"].append(lc / n_c if n_c > 0 else 0.0)
        m["logits/rejected"].append(lr / n_r if n_r > 0 else 0.0)
        m["mean_token_accuracy"].append(top1 / n_c if n_c > 0 else 0.0)
        # f-DPO's implicit reward is beta * f'(u) (Theorem 1); for reverse KL it is TRL's beta * log-ratio.
        chosen_rewards, rejected_rewards = self.beta * c_link, self.beta * r_link
        m["rewards/chosen"].append(chosen_rewards.mean().item())
        m["rewards/rejected"].append(rejected_rewards.mean().item())
        m["rewards/accuracies"].append((chosen_rewards > rejected_rewards).float().mean().item())
        m["rewards/margins"].append((chosen_rewards - rejected_rewards).mean().item())
        m["logps/chosen"].append(c_logps.mean().item())
        m["logps/rejected"].append(r_logps.mean().item())
        m["logratios/chosen"].append(c_lr.mean().item())
        m["logratios/rejected"].append(r_lr.mean().item())
        m["link/chosen"].append(c_link.mean().item())
        m["link/rejected"].append(r_link.mean().item())
        m["link/clamped_fraction"].append(n_clamped / (2 * c_link.numel()))
        # ECE is computed at log time over every pair seen since the last log, not averaged per batch.
        self._pref_logits[mode].append((self.beta * (c_link - r_link)).cpu())

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        pending = self._pref_logits[mode]
        if pending:
            logits = torch.cat(pending)
            ece = preference_ece(logits, torch.zeros_like(logits), beta=1.0)
            self._metrics[mode]["calibration/ece"] = [ece.item()]
            pending.clear()
        super().log(logs, start_time)

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        """TRL's model card, plus the alignkit method, divergence and (when trained from one) the recipe."""
        tags = set([tags] if isinstance(tags, str) else (tags or []))
        tags.add(f"divergence:{self.divergence.name}")
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=list(tags))
        if not self.is_world_process_zero():
            return
        name_base_model_in_card(self)
        alpha = f", alpha={self.divergence.alpha:g}" if self.divergence.name == "alpha" else ""
        section = [
            "",
            "## alignkit",
            "",
            f"- method: {self._name} (`{type(self).__name__}`)",
            f"- divergence: `{self.divergence.name}`{alpha}",
            f"- beta: {self.beta}, loss_type: {', '.join(self.loss_types)}",
        ]
        if self.alignkit_recipe:
            section += ["", "Recipe:", "", "```yaml", self.alignkit_recipe.rstrip(), "```"]
        with open(os.path.join(self.args.output_dir, "README.md"), "a", encoding="utf-8") as fh:
            fh.write("\n".join(section) + "\n")
