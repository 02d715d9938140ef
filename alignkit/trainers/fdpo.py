"""f-DPO: DPO under an f-divergence constraint (thesis chapter 2, docs/methods.md section 1)."""

from __future__ import annotations

import contextlib
import textwrap
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from trl import DPOConfig, DPOTrainer

from .._util import AlignkitWarning
from ..divergences import DEFAULT_MAX_EXPONENT, get_divergence
from . import _packed
from ._card import write_model_card
from ._causal import AttributeBins, CausalPenaltyArguments, CollatorWithBins
from ._common import (CAUSAL_RULES, PREFERENCE_RULES, TRAINING_RULES, ConfigResolverMixin, check_ranges,
                      default_precision_for_this_machine)
from ._perf import PerfArguments, PerfMetricsMixin
from ..losses import (LOGRATIO_LOSS_TYPES, SCORE_DIFFERENCE_LOSS_TYPES, fdpo_scores, length_desensitised_logps,
                      logratio_loss, preference_ece, preference_loss, wpo_weights)
from .. import _adapter

__all__ = ["FDPOConfig", "FDPOTrainer"]


_TRL_VERSION = _adapter.TRL_VERSION


@dataclass
class FDPOConfig(PerfArguments, CausalPenaltyArguments, DPOConfig):
    r"""Configuration for [`FDPOTrainer`]: TRL's `DPOConfig` plus the f-divergence.

    Parameters:
        divergence (`str`, defaults to `"reverse_kl"`):
            One of `reverse_kl` (plain DPO), `forward_kl`, `jsd`, `alpha`. TRL's names
            (`js_divergence`, `alpha_divergence`) are accepted as aliases.
        alpha (`float`, *optional*, defaults to `0.5` with `divergence="alpha"`):
            For `divergence="alpha"`: alpha in (0, 1) in the thesis' convention
            (`f(u) = (u^(1-a) - (1-a)u - a)/(a(a-1))`); TRL's `f_alpha_divergence_coef = 1 - alpha`. Ignored
            (with a warning) under another divergence.
        max_link_exponent (`float`, defaults to `20.0`):
            The exponentials inside the forward-KL and alpha links are continued linearly above this
            exponent, so extreme log-ratios give a finite loss and finite gradients. The fraction of
            continued values is logged as `link/clamped_fraction`. `None` disables it.
        stop_on_nonfinite_loss (`bool`, defaults to `False`):
            A NaN or infinite loss is reported by one warning (step, log-ratio range, likely causes) and training
            goes on, as in TRL (Trainer's `logging_nan_inf_filter` would otherwise keep it out of the logs).
            `True` stops training there with a `FloatingPointError` instead.
        generate_during_eval (`bool`, defaults to `False`):
            TRL's former field, back: at each evaluation the policy samples one completion for each of the first
            `per_device_eval_batch_size` eval prompts (at most 8; up to 64 new tokens, within `max_length`),
            written with its implicit reward to `output_dir/samples/eval_step_<N>.jsonl` and, with W&B on, as the
            table `samples/eval_step_<N>`. Sampling leaves the random state of the run untouched.
        shared_prefix (`bool`, defaults to `False`):
            Compute each prompt once per pair instead of twice (docs/fdpo.md, "Long prompts: shared_prefix"): the
            row is packed as the prompt, then the chosen and the rejected completion, with a 4D attention mask that
            lets each completion see the prompt and itself only, and positions that restart after the prompt. The
            loss, gradients and metrics equal the unshared run's (to float rounding). Needs `sdpa` or `eager`
            attention (custom 4D masks), `truncation_mode: keep_start` when `max_length` is set, and a model
            without a router (aux) loss.
        mmd_coef (`float`, defaults to `0.0`):
            Causal DPO (thesis 4.8): with `mmd_coef > 0`, the binned MMD^2 penalty of the causal reward model
            is applied to the implicit rewards `beta * (f'(u) - f'(1))` of the batch, making them independent
            of the spurious attribute(s). `attributes`, `num_bins`, `binning`, `conditional`,
            `mmd_bandwidths`, `mmd_start_step` and the other `mmd_*` / `bin_*` fields mean what they mean in
            `CausalRewardConfig`.

    Every other `DPOConfig` field means what it means in TRL (docs/fdpo.md, "Every TRL option works", lists which loss type
    works with which divergence). TRL's own `f_divergence_type` / `f_alpha_divergence_coef` are translated into
    `divergence` / `alpha` (with a warning stating `alpha = 1 - f_alpha_divergence_coef`); after construction they
    mirror `divergence` / `alpha`. Setting both TRL's and alignkit's fields to different divergences is an error.
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
    stop_on_nonfinite_loss: bool = field(
        default=False,
        metadata={"help": "Stop training with an error at a NaN/inf loss (default: warn once and go on, as TRL)."},
    )
    generate_during_eval: bool = field(
        default=False,
        metadata={"help": "At each evaluation, sample the policy on a few eval prompts and write the samples with "
                          "their implicit rewards (samples/*.jsonl, and a W&B table)."},
    )
    shared_prefix: bool = field(
        default=False, metadata={"help": "Compute each prompt once per pair (group): packed rows, 4D attention mask."})

    def __post_init__(self):
        check_ranges(self, TRAINING_RULES, PREFERENCE_RULES, CAUSAL_RULES)
        default_precision_for_this_machine(self)
        super().__post_init__()
        self._resolve_divergence()
        self._check_loss_types()
        self._check_causal_fields()
        _packed.check_config(self)

    def _resolve_divergence(self):
        """`divergence`/`alpha`, TRL's `f_divergence_type`/`f_alpha_divergence_coef` translated into them, and
        TRL's fields mirrored back (so TRL code reading them, and a saved config, agree with the trainer)."""
        trl_name = str(getattr(self.f_divergence_type, "value", self.f_divergence_type))
        if trl_name != "reverse_kl":
            translated = _trl_to_ours(trl_name)
            trl_alpha = 1.0 - self.f_alpha_divergence_coef if translated == "alpha" else None
            given = f"f_divergence_type={trl_name!r}" + (
                f", f_alpha_divergence_coef={self.f_alpha_divergence_coef:g}" if trl_alpha is not None else "")
            ours = get_divergence(self.divergence, 0.5).name
            if ours == "reverse_kl" and self.alpha is None:
                warnings.warn(
                    f"FDPOConfig: TRL's {given} read as divergence={translated!r}"
                    + (f", alpha={trl_alpha:g} (alignkit's alpha = 1 - f_alpha_divergence_coef)" if trl_alpha is not None
                       else "") + ".", AlignkitWarning, stacklevel=4)
                self.divergence, self.alpha = translated, trl_alpha
            elif ours != get_divergence(translated, 0.5).name or (
                    trl_alpha is not None and self.alpha is not None and abs(self.alpha - trl_alpha) > 1e-12):
                mine = f"divergence={self.divergence!r}" + (f", alpha={self.alpha:g}" if self.alpha is not None else "")
                raise ValueError(
                    f"FDPOConfig got both TRL's {given} and {mine}, which disagree (alignkit's alpha = 1 - "
                    "f_alpha_divergence_coef). Set only `divergence`/`alpha`.")
        canonical_name = get_divergence(self.divergence, 0.5).name
        if canonical_name == "alpha":
            if self.alpha is None:
                self.alpha = 0.5
        elif self.alpha is not None:
            warnings.warn(
                f"FDPOConfig: alpha={self.alpha:g} is ignored: it is only used with divergence='alpha', and divergence "
                f"is {self.divergence!r}.", AlignkitWarning, stacklevel=4)
            self.alpha = None
        canonical = get_divergence(self.divergence, self.alpha if canonical_name == "alpha" else 0.5)
        self.divergence = canonical.name
        self.f_divergence_type = _ours_to_trl(canonical.name)
        self.f_alpha_divergence_coef = 1.0 - self.alpha if canonical.name == "alpha" else 0.5

    def _check_loss_types(self):
        known = SCORE_DIFFERENCE_LOSS_TYPES + LOGRATIO_LOSS_TYPES + ("sft",)
        unknown = [t for t in self.loss_type if t not in known]
        if unknown:
            raise ValueError(f"loss_type {unknown} is not a DPO loss type of TRL {_TRL_VERSION}; use any of "
                             f"{', '.join(known)}.")
        per_sequence = [t for t in self.loss_type if t in LOGRATIO_LOSS_TYPES]
        if per_sequence and self.divergence != "reverse_kl":
            raise ValueError(
                f"loss_type {per_sequence} reads the chosen and rejected log-ratios one at a time, and under "
                f"divergence {self.divergence!r} the implicit reward of a single completion is only known up to a "
                "per-prompt constant (only the chosen-minus-rejected difference is determined), so it has no "
                "f-divergence form. Use it with divergence: reverse_kl, or use one of "
                f"{', '.join(SCORE_DIFFERENCE_LOSS_TYPES)}.")
        if "exo_pair" in self.loss_type and not 0.0 < self.label_smoothing < 1.0:
            raise ValueError("loss_type exo_pair needs label_smoothing in (0, 1); the EXO paper uses 1e-3.")
        if self.use_weighting and {"aot", "aot_unpaired"} & set(self.loss_type):
            raise ValueError("use_weighting (WPO) cannot be combined with loss_type aot/aot_unpaired: those sort the "
                             "pairs over the batch, so a pair's weight would not multiply its own loss.")


def _trl_to_ours(name: str) -> str:
    return {"js_divergence": "jsd", "alpha_divergence": "alpha"}.get(name, name)


def _ours_to_trl(name: str) -> str:
    return {"jsd": "js_divergence", "alpha": "alpha_divergence"}.get(name, name)


class FDPOTrainer(PerfMetricsMixin, ConfigResolverMixin, DPOTrainer):
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
    #: Causal DPO / the causal reward model's bins, sampler and penalty (made on first use)
    attribute_bins = AttributeBins.per_trainer()
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
        if args.shared_prefix and kwargs.get("data_collator", pargs[0] if pargs else None) is None:
            collator = self._shared_prefix_collator(model, args, kwargs.get(
                "processing_class", pargs[3] if len(pargs) > 3 else None))
            if pargs:
                pargs = (collator, *pargs[1:])
            else:
                kwargs["data_collator"] = collator
        _adapter.require()
        super().__init__(model, ref_model, args, *pargs, **kwargs)
        _adapter.require(self)
        if args.shared_prefix:
            _packed.check_model(self)
        self._pref_logits: dict[str, list[torch.Tensor]] = {"train": [], "eval": []}
        self._warned_nonfinite = False
        if AttributeBins.enabled(self.args):
            self.data_collator = CollatorWithBins(self.data_collator)

    @staticmethod
    def _shared_prefix_collator(model, args, processing_class):
        """The packed collator of `shared_prefix` for TRL's pair rows (subclasses with other rows replace it)."""
        from ..data.groups import DataCollatorForSharedPrefixPairs

        return DataCollatorForSharedPrefixPairs(pad_token_id=_packed.pad_token_id(model, processing_class),
                                                max_length=args.max_length)

    # With shared_prefix, TRL's reference precompute (`precompute_ref_log_probs`) sees packed batches: they are
    # computed through the packed path (the pair's prompt once), as in training.
    def compute_ref_log_probs(self, model, inputs):
        if not self.args.shared_prefix:
            return super().compute_ref_log_probs(model, inputs)
        logps = self._shared_prefix_reference(inputs)
        n = inputs["chosen_row_index"].numel()
        return logps[:n], logps[n:]

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
        if AttributeBins.enabled(args):
            dataset = self.attribute_bins.add_bins_if_needed(dataset, processing_class, args, dataset_name)
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if AttributeBins.enabled(self.args):
            AttributeBins.add_signature_columns(self)

    def _get_train_sampler(self, *args, **kwargs):
        return AttributeBins.sampler(self) or super()._get_train_sampler(*args, **kwargs)

    def save_model(self, output_dir=None, _internal_call=False):
        super().save_model(output_dir, _internal_call)
        self.attribute_bins.save(self, output_dir)

    # ------------------------------------------------------------------------------------------
    # Replaces DPOTrainer._compute_loss. TRL inlines its f-divergence scores there, and its forward-KL
    # and alpha scores overflow (1 - exp(-logr) is -inf for logr = -1e4); it also has no hook between
    # the log-probs and the loss. We reuse TRL's fused-LM-head forward and `compute_ref_log_probs` (so
    # PEFT adapters, a separate reference and precomputed reference log-probs all work as in TRL) and
    # take the scores and every loss type from alignkit.losses. TRL's metric names are kept.
    # ------------------------------------------------------------------------------------------
    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        fwd = self._forward_logps(model, inputs)
        loss, stats = self._preference_loss(fwd, inputs)
        if self.aux_loss_enabled:  # Mixture-of-Experts load-balancing loss, as TRL adds it
            stats["aux_loss"] = fwd["outputs"].aux_loss.detach()
            loss = loss + self.router_aux_loss_coef * fwd["outputs"].aux_loss
        self._check_finite(loss, fwd)
        self._log_step_metrics(mode, fwd, stats)
        if return_outputs:
            with torch.no_grad():
                outputs = model(**fwd["model_kwargs"])
            return loss, outputs
        return loss

    #: batch keys that are not model inputs (TRL's collator and reference precompute add them; the packed
    #: collators of shared_prefix add the rest)
    _non_model_keys = frozenset({"completion_mask", "ref_chosen_logps", "ref_rejected_logps", "z_bins",
                                 "chosen_row_index", "rejected_row_index", "completion_row", "completion_positions",
                                 "completion_token_mask", "packed_lengths", "unpacked_tokens"})

    def _forward_logps(self, model, inputs) -> dict[str, Any]:
        """Policy forward (fused LM head) and reference log-probs, summed over completion tokens.

        Returns the per-sequence values of a batch laid out as [chosen; rejected], with `is_chosen` marking
        the chosen sequences (subclasses lay out groups the same way, with sides of different sizes)."""
        if self.args.shared_prefix:
            return self._packed_forward_logps(model, inputs)
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
        if self.ld_alpha is None:
            logps = per_token_logps.sum(dim=1)
        else:  # LD-DPO: the longer completion's tail beyond the shorter one's length is down-weighted
            halves = zip(per_token_logps.chunk(2, dim=0), shift_mask.chunk(2, dim=0))
            (c_tok, c_mask), (r_tok, r_mask) = halves
            logps = torch.cat(length_desensitised_logps(c_tok, r_tok, c_mask, r_mask, self.ld_alpha))
        if self.precompute_ref_logps:
            ref_logps = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]]).to(logps.dtype)
        else:
            ref_logps = self._reference_logps(model_kwargs, completion_mask)
        n = logps.size(0)
        return {
            "outputs": outputs,
            "model_kwargs": model_kwargs,
            "per_token_logps": per_token_logps,
            "shift_mask": shift_mask,
            "logps": logps,
            "ref_logps": ref_logps,
            "is_chosen": torch.arange(n, device=logps.device) < self._num_chosen_sequences(inputs, n),
            "lengths": completion_mask.sum(dim=1).to(logps.dtype),
            "num_input_tokens": inputs["attention_mask"].sum(),
        }

    def _packed_forward_logps(self, model, inputs) -> dict[str, Any]:
        """`_forward_logps` of a packed (shared_prefix) batch; see `_packed.forward_logps`."""
        return _packed.forward_logps(self, model, inputs)

    def _shared_prefix_reference(self, inputs) -> torch.Tensor:
        return _packed.reference_logps(self, inputs)

    def _num_chosen_sequences(self, inputs, num_sequences: int) -> int:
        return num_sequences // 2  # TRL's layout: [chosen pairs; rejected pairs]

    def _policy_forward(self, model, model_kwargs, labels):
        return _adapter.fused_forward(model, model_kwargs, labels)

    def _reference_logps(self, model_kwargs, completion_mask) -> torch.Tensor:
        """Reference log-probs of every sequence, through TRL's `compute_ref_log_probs` (which handles a
        separate reference model, a PEFT model with its adapter disabled, and LD-DPO's weighting)."""
        ref_model = self.ref_model if self.ref_model is not None else self.model
        ref_inputs = {k: v for k, v in model_kwargs.items() if k not in ("use_cache", "output_router_logits")}
        ref_inputs["completion_mask"] = completion_mask
        return torch.cat(self.compute_ref_log_probs(ref_model, ref_inputs))

    def _preference_loss(self, fwd, inputs):
        """The loss of a batch of pairs [chosen; rejected]: each loss type of `loss_type` (weighted by
        `loss_weights`, and by WPO's weights with `use_weighting`) on the link values of the divergence, plus
        the Causal DPO penalty. Subclasses replace it for groups. Returns the loss and per-pair statistics."""
        logratios = fwd["logps"] - fwd["ref_logps"]
        chosen_lr, rejected_lr = logratios.chunk(2, dim=0)
        scores = fdpo_scores(chosen_lr, rejected_lr, self.divergence, self.args.max_link_exponent)
        chosen_len, rejected_len = fwd["lengths"].chunk(2, dim=0)
        chosen_logps, rejected_logps = fwd["logps"].chunk(2, dim=0)
        weights = None
        if self.use_weighting:
            seq_len = fwd["shift_mask"].size(1)
            chosen_w, rejected_w = wpo_weights(fwd["per_token_logps"], fwd["outputs"].log_sum_sq_probs[:, -seq_len:],
                                               fwd["shift_mask"]).chunk(2, dim=0)
            weights = chosen_w * rejected_w
        loss = 0.0
        for loss_type, weight in zip(self.loss_types, self.loss_weights, strict=True):
            if loss_type == "sft":
                chosen_mask = fwd["shift_mask"].chunk(2, dim=0)[0].bool()
                per_pair = -fwd["per_token_logps"].chunk(2, dim=0)[0][chosen_mask].mean().expand(chosen_lr.size(0))
            elif loss_type in LOGRATIO_LOSS_TYPES:  # reverse KL only (FDPOConfig refuses the others)
                ref_chosen, ref_rejected = fwd["ref_logps"].chunk(2, dim=0)
                per_pair = logratio_loss(chosen_logps, rejected_logps, ref_chosen, ref_rejected, loss_type, self.beta,
                                         label_smoothing=self.label_smoothing)
            else:
                per_pair = preference_loss(
                    scores.chosen,
                    scores.rejected,
                    loss_type,
                    self.beta,
                    label_smoothing=self.label_smoothing,
                    chosen_lengths=chosen_len,
                    rejected_lengths=rejected_len,
                    discopop_tau=self.args.discopop_tau,
                )
            if weights is not None:
                per_pair = per_pair * weights
            loss = loss + per_pair.mean() * weight
        if AttributeBins.enabled(self.args) and "z_bins" in inputs:  # Causal DPO: the penalty on the implicit rewards
            implicit = self.beta * torch.cat([scores.chosen, scores.rejected])
            mode = "train" if self.model.training else "eval"
            loss = AttributeBins.with_penalty(self, loss, implicit, inputs["z_bins"], mode)
        stats = {
            "chosen_logratios": chosen_lr.detach(),
            "rejected_logratios": rejected_lr.detach(),
            "chosen_link": scores.chosen.detach(),
            "rejected_link": scores.rejected.detach(),
            "chosen_logps": chosen_logps.detach(),
            "rejected_logps": rejected_logps.detach(),
            "num_clamped": scores.num_clamped,
        }
        return loss, stats

    def _check_finite(self, loss, fwd):
        """A non-finite loss: one warning per run (TRL trains on), or an error with `stop_on_nonfinite_loss`."""
        if torch.isfinite(loss.detach()).all() or (self._warned_nonfinite and not self.args.stop_on_nonfinite_loss):
            return
        lr = (fwd["logps"] - fwd["ref_logps"]).detach()
        message = (
            f"f-DPO loss is {loss.item()} at step {self.state.global_step} (divergence={self.divergence}, "
            f"beta={self.beta}); log-ratios ranged from {lr.min().item():.3g} to {lr.max().item():.3g}, and "
            f"{(~torch.isfinite(fwd['logps'])).sum().item()} policy log-probs were not finite. Lower the "
            "learning rate, check the data for empty completions, or use float32/bf16 instead of fp16."
        )
        if self.args.stop_on_nonfinite_loss:
            raise FloatingPointError(message)
        self._warned_nonfinite = True
        warnings.warn(message + " Training goes on (set stop_on_nonfinite_loss: true to stop here).", stacklevel=2)

    def _log_step_metrics(self, mode, fwd, s):
        """TRL's DPO metrics (same names) plus the f-DPO link values, clamping and calibration.

        Token metrics read the chosen and rejected sequences through `fwd["is_chosen"]`; per-pair metrics come
        from the statistics `s` of `_preference_loss` (one entry per pair, or per group row). All per-batch
        values are gathered in two collective calls (TRL makes about a dozen).
        """
        gather = self.accelerator.gather_for_metrics
        outputs, mask = fwd["outputs"], fwd["shift_mask"].bool()
        seq_len = mask.size(1)
        is_chosen = fwd["is_chosen"].unsqueeze(1)
        chosen_mask, rejected_mask = mask & is_chosen, mask & ~is_chosen
        mean_logits = outputs.mean_logits[:, -seq_len:].detach()
        top1 = outputs.is_top1[:, -seq_len:]
        aux = s.get("aux_loss")
        sums = torch.stack(
            [
                (outputs.entropy[:, -seq_len:].detach() * mask).sum().float(),
                mask.sum().float(),
                mean_logits[chosen_mask].sum().float(),
                chosen_mask.sum().float(),
                mean_logits[rejected_mask].sum().float(),
                rejected_mask.sum().float(),
                (top1 & chosen_mask).sum().float(),
                s["num_clamped"].float().to(mask.device),
                fwd["num_input_tokens"].float(),
                (aux.float().to(mask.device) if aux is not None else mask.new_zeros((), dtype=torch.float)),
            ]
        )
        sums = gather(sums.unsqueeze(0))
        world = sums.size(0)
        ent, n_tok, lc, n_c, lr, n_r, top1, n_clamped, n_attn, aux_sum = sums.sum(0).tolist()
        per_pair = torch.stack(
            [
                s["chosen_logratios"].float(),
                s["rejected_logratios"].float(),
                s["chosen_link"].float(),
                s["rejected_link"].float(),
                s["chosen_logps"].float(),
                s["rejected_logps"].float(),
            ],
            dim=1,
        )
        # one row per statistic, each contiguous: its mean is reduced in the order TRL reduces it
        per_pair = gather(per_pair).t().contiguous()
        c_lr, r_lr, c_link, r_link, c_logps, r_logps = per_pair.unbind(dim=0)

        m = _adapter.metrics(self, mode)
        m["entropy"].append(ent / n_tok if n_tok > 0 else 0.0)
        m["num_tokens"] = [_adapter.count_train_tokens(self, int(n_attn) if mode == "train" else 0)]
        m["logits/chosen"].append(lc / n_c if n_c > 0 else 0.0)
        m["logits/rejected"].append(lr / n_r if n_r > 0 else 0.0)
        m["mean_token_accuracy"].append(top1 / n_c if n_c > 0 else 0.0)
        if aux is not None:
            m["aux_loss"].append(aux_sum / world)
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

    # TRL 1.16's DPOTrainer no longer samples during evaluation (its former `generate_during_eval` logged a W&B
    # table of policy and reference samples). With `generate_during_eval`, after TRL's evaluation the policy samples
    # one completion for each of the first `per_device_eval_batch_size` (at most 8) eval prompts, written with the
    # implicit reward of each sample, beta * (f'(pi/pi_ref) - f'(1)) at the sequence level, as `rewards/*` is.
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        from ._samples import single_eval_dataset

        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        dataset = single_eval_dataset(self, eval_dataset, "prompt_ids")
        if self.args.generate_during_eval and dataset is not None:
            self._write_eval_samples(dataset, metric_key_prefix)
        return metrics

    def _write_eval_samples(self, dataset, prefix: str) -> None:
        from trl.models import unwrap_model_for_generation

        from ._samples import sample_completions, sequence_logps, write_sample_table

        tok = getattr(self.processing_class, "tokenizer", self.processing_class)
        n = min(len(dataset), self.args.per_device_eval_batch_size, 8)
        prompts = [list(dataset[i]["prompt_ids"]) for i in range(n)]
        zero3 = self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3
        was_training = self.model.training
        self.model.eval()
        try:
            with unwrap_model_for_generation(self.model_wrapped, self.accelerator) as policy:
                room = (self.args.max_length or 10**9) - max(len(p) for p in prompts)
                completions = sample_completions(policy, tok, prompts, max(1, min(64, room)),
                                                 seed=self.args.seed + self.state.global_step)
                logps = sequence_logps(policy, prompts, completions)
                if self.ref_model is not None:
                    with unwrap_model_for_generation(self.ref_model, self.accelerator) if zero3 else \
                            contextlib.nullcontext(self.ref_model) as ref:
                        ref_logps = sequence_logps(ref, prompts, completions)
                elif hasattr(policy, "disable_adapter"):
                    with policy.disable_adapter():
                        ref_logps = sequence_logps(policy, prompts, completions)
                else:  # precomputed reference log-probs and no reference model: no implicit reward to give
                    ref_logps = None
        finally:
            self.model.train(was_training)
        rewards = [None] * n
        if ref_logps is not None:
            logratio = logps - ref_logps.to(logps.device)
            rewards = (self.beta * self.divergence.link(logratio, self.args.max_link_exponent)).tolist()
        rows = [{"step": self.state.global_step, "prompt": tok.decode(p, skip_special_tokens=False),
                 "completion": tok.decode(c, skip_special_tokens=True), "implicit_reward": r}
                for p, c, r in zip(prompts, completions, rewards)]
        write_sample_table(self, rows, f"{prefix}_step_{self.state.global_step}")

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        pending = self._pref_logits[mode]
        if pending:
            logits = torch.cat(pending)
            ece = preference_ece(logits, torch.zeros_like(logits), beta=1.0)
            _adapter.metrics(self, mode)["calibration/ece"] = [ece.item()]
            pending.clear()
        super().log(logs, start_time)

    # Replaces TRL's card (its template links "[None]" for a local base model): the one writer in _card.py
    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        """The model card: TRL's fields, the alignkit method, divergence and (when trained from one) the recipe."""
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        write_model_card(self, model_name, dataset_name, [*tags, f"divergence:{self.divergence.name}"])

    def card_details(self) -> list[str]:
        """The method's settings, one line each, for the model card."""
        alpha = f", alpha={self.divergence.alpha:g}" if self.divergence.name == "alpha" else ""
        return [f"method: {_adapter.card_name(self)} (`{type(self).__name__}`)",
                f"divergence: `{self.divergence.name}`{alpha}",
                f"beta: {self.beta}, loss_type: {', '.join(self.loss_types)}"]
