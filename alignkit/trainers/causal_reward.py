"""Causal reward models: Bradley-Terry reward models with an MMD penalty (thesis chapter 4, docs/methods.md section 3).

    L = -E log sigma(r(x, y_w) - r(x, y_l)) + mmd_coef * sum_{m < m'} MMD^2(P_m, P_m')

`P_b` is the distribution of the reward (or of the last hidden state) over the examples whose spurious
attribute `Z` falls in bin `b`, within the batch. Unconditional: chosen and rejected completions pooled;
conditional: the penalty within the chosen set plus within the rejected set.
"""

from __future__ import annotations

import itertools

from dataclasses import dataclass, field

import torch
from trl import RewardConfig, RewardTrainer

from .. import _adapter
from . import _packed
from ._card import write_model_card
from ._causal import AttributeBins, BinBalancedSampler, CausalPenaltyArguments, CollatorWithBins
from ..losses import spearman as _spearman
from ._common import (CAUSAL_RULES, REWARD_RULES, TRAINING_RULES, ConfigResolverMixin, check_ranges,
                      default_precision_for_this_machine)
from ._perf import PerfArguments, PerfMetricsMixin
from ._samples import single_eval_dataset, write_sample_table

__all__ = ["CausalRewardConfig", "CausalRewardTrainer", "BinBalancedSampler"]


@dataclass
class CausalRewardConfig(PerfArguments, CausalPenaltyArguments, RewardConfig):
    r"""Configuration for [`CausalRewardTrainer`]: TRL's `RewardConfig` plus the MMD penalty.

    Parameters:
        mmd_coef (`float`, defaults to `1.0`): weight `lambda` of the penalty (thesis sweeps 0.1 to 100).
            `0` is exactly TRL's RewardTrainer (same data, loss, gradients and metrics), which also logs the
            attribute metrics `mmd/spearman_reward_bin` and `reward_by_bin/*` for comparison, unless
            `attributes: []` (no bins computed at all).
        attributes, attribute_kind, num_bins, binning, conditional, mmd_bandwidths, bin_balanced_sampler:
            the spurious attribute(s), their bins and the kernel; see `CausalPenaltyArguments` (shared with
            `FDPOConfig`, where they give Causal DPO).
        mmd_on (`str`, defaults to `"reward"`): `reward` (the scalar reward) or `hidden` (the last hidden
            state at the scored token).
        eval_sample_pairs (`int`, defaults to `8`): at each evaluation, the first eval pairs are written with their
            rewards and attribute bins to `output_dir/samples/eval_step_<N>.jsonl` and, with W&B on, as the table
            `samples/eval_step_<N>`. `0` writes none.
        shared_prefix (`bool`, defaults to `False`): compute the tokens a pair's two sequences share at their start
            (the prompt) once instead of twice: the pair is packed in one row with a 4D attention mask (docs/causal.md,
            "Long prompts"). The loss, gradients and metrics equal the unshared run's (to float rounding). Causal-LM
            backbones only (Llama, Qwen, SmolLM2, ...), with a `score` head and `sdpa` or `eager` attention: an encoder
            such as MiniLM attends in both directions, so its prompt tokens see the completion and cannot be shared.
    """

    mmd_coef: float = field(default=1.0, metadata={"help": "Weight of the MMD penalty (0: plain RewardTrainer)."})
    mmd_on: str = field(default="reward", metadata={"help": "reward or hidden."})
    eval_sample_pairs: int = field(default=8, metadata={"help": "Eval pairs written with their rewards and bins at "
                                                                  "each evaluation (0: none)."})
    shared_prefix: bool = field(default=False, metadata={"help": "Compute a pair's common prefix once (causal-LM "
                                                                 "backbones)."})

    def __post_init__(self):
        check_ranges(self, TRAINING_RULES, REWARD_RULES, CAUSAL_RULES)
        default_precision_for_this_machine(self)
        super().__post_init__()
        if self.mmd_on not in ("reward", "hidden"):
            raise ValueError(f"mmd_on must be 'reward' or 'hidden', got {self.mmd_on!r}.")
        self._check_causal_fields()


class CausalRewardTrainer(PerfMetricsMixin, ConfigResolverMixin, RewardTrainer):
    """Drop-in replacement for TRL's `RewardTrainer` that makes the reward independent of a spurious
    attribute with an MMD penalty. Everything but the penalty is TRL's (data preparation, collator,
    loss, metrics, saving); the fitted attribute bins are saved next to the model."""

    config_class = CausalRewardConfig
    _config_with_article = "a CausalRewardConfig"
    _default_run_suffix = "CRM"
    _tag_names = ["trl", "reward-trainer", "alignkit", "causal-reward-model"]
    _name = "Causal reward model"
    #: Causal DPO / the causal reward model's bins, sampler and penalty (made on first use)
    attribute_bins = AttributeBins.per_trainer()

    def __init__(self, model, args: CausalRewardConfig | None = None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, *pargs, **kwargs):
        args = self._resolve_args(model, args)
        self._window: dict[str, list] = {"train": [], "eval": []}
        self._eval_prefix = "eval"
        _adapter.require()
        super().__init__(model, args, data_collator, train_dataset, eval_dataset, processing_class, *pargs, **kwargs)
        _adapter.require(self)
        if args.shared_prefix:
            self._check_shared_prefix()
            if data_collator is None:
                from ..data.groups import DataCollatorForSharedPrefixRewardPairs

                tok = getattr(self.processing_class, "tokenizer", self.processing_class)
                self.data_collator = DataCollatorForSharedPrefixRewardPairs(pad_token_id=tok.pad_token_id)
        self.data_collator = CollatorWithBins(self.data_collator)
        if self.model.config.num_labels != 1:
            raise ValueError(f"a reward model has one output; this model has num_labels={self.model.config.num_labels}.")

    def _check_shared_prefix(self) -> None:
        from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

        model = self.accelerator.unwrap_model(self.model)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        kind = base.config.model_type
        if kind in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
            raise ValueError(f"shared_prefix: this reward model is a {kind} encoder, which attends in both directions: "
                             "its prompt tokens see the completion, so two completions cannot share them. It needs a "
                             "causal-LM backbone (Llama, Qwen, SmolLM2, ...); drop shared_prefix for this model.")
        if not isinstance(getattr(base, "score", None), torch.nn.Module):
            raise ValueError(f"shared_prefix reads the reward from the `score` head at each sequence's last token; "
                             f"{type(base).__name__} has none. Drop shared_prefix for this model.")
        impl = _adapter.attn_implementation(base)
        if impl not in ("sdpa", "eager"):
            raise ValueError(f"shared_prefix needs attn_implementation 'sdpa' or 'eager' (custom 4D masks); the model "
                             f"uses {impl!r}. Load it with attn_implementation='sdpa' or drop shared_prefix.")

    # Extends RewardTrainer._prepare_dataset: the attribute bins are computed from the raw completions
    # (before TRL adds EOS and tokenizes) and carried as two extra columns.
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        dataset = self.attribute_bins.add_bins_if_needed(dataset, processing_class, args, dataset_name)
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        AttributeBins.add_signature_columns(self)

    # Replaces Trainer's random sampler with the bin-balanced one (when enabled).
    def _get_train_sampler(self, *args, **kwargs):
        return AttributeBins.sampler(self) or super()._get_train_sampler(*args, **kwargs)

    # Extends RewardTrainer.compute_loss: TRL's loss and metrics, plus the MMD penalty on its outputs. With
    # mmd_coef 0 the loss is TRL's, untouched; the attribute metrics are still recorded (for comparisons).
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        bins = inputs.pop("z_bins", None)
        if self.args.shared_prefix:
            # TRL's loss and metrics, on the rewards of the packed pairs: RewardTrainer.compute_loss calls
            # `model(**inputs)` and sums `attention_mask` for its token count, so it gets the packed forward and the
            # unshared layout's count
            packed = model = _PackedRewards(self, model, inputs)
            inputs = {"attention_mask": inputs["unpacked_tokens"].reshape(1),
                      **({"margin": inputs["margin"]} if "margin" in inputs else {})}
        if bins is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        penalised = self.args.mmd_coef > 0
        if penalised and self.args.mmd_on == "hidden":
            inputs["output_hidden_states"] = True
        loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        rewards = outputs.logits.squeeze(-1)
        bins = bins.to(rewards.device)
        mode = "train" if self.model.training else "eval"
        if penalised:
            if self.args.mmd_on == "hidden" and self.args.shared_prefix:
                values = packed.scored_hidden
            elif self.args.mmd_on == "hidden":
                last = inputs["attention_mask"].sum(1) - 1
                values = outputs.hidden_states[-1][torch.arange(last.size(0), device=last.device), last]
            else:
                values = rewards
            loss = AttributeBins.with_penalty(self, loss, values, bins, mode)
        with torch.no_grad():  # rewards and bins since the last log (train) or over the eval set (eval)
            # gathered per side: gather_for_metrics trims the last eval batch to the dataset's remainder in
            # *rows*, which would cut a [chosen; rejected] tensor of twice that length in the wrong place
            n = rewards.size(0) // 2
            gather = self.accelerator.gather_for_metrics
            self._window[mode].append((
                torch.cat([gather(rewards[:n].detach().float()), gather(rewards[n:].detach().float())]).cpu(),
                torch.cat([gather(bins[:n]), gather(bins[n:])]).cpu()))
        return (loss, outputs) if return_outputs else loss

    def _window_metrics(self, mode: str) -> dict[str, float]:
        """Spearman correlation of rewards with the bin, the rewards' standard deviation and the mean reward per bin,
        over the window."""
        if not self._window[mode]:
            return {}
        r = torch.cat([w[0] for w in self._window[mode]])
        z = torch.cat([w[1] for w in self._window[mode]])
        self._window[mode].clear()
        # the reward's spread: a penalty that is cheapest to lower by shrinking every reward shows up here first
        out = {"mmd/spearman_reward_bin": _spearman(r, z.float()), "mmd/reward_std": r.std(unbiased=False).item()}
        n_bins = self.attribute_bins.binner.n_bins
        sums = torch.zeros(n_bins).index_add_(0, z, r)
        counts = torch.bincount(z, minlength=n_bins)
        out.update({f"reward_by_bin/{b}": (sums[b] / counts[b]).item() for b in range(len(counts)) if counts[b]})
        return out

    # Replaces RewardTrainer.log's naming of eval metrics: TRL always writes "eval_<metric>", so with several
    # eval datasets their accuracies overwrite each other; here they follow the evaluate() prefix
    # ("eval_<dataset>_<metric>"), like the loss does. Also adds the window metrics above.
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        for key, value in self._window_metrics(mode).items():
            _adapter.metrics(self, mode)[key] = [value]
        if mode == "eval" and self._eval_prefix != "eval":
            logs.update({f"{self._eval_prefix}_{k}": sum(v) / len(v) for k, v in _adapter.metrics(self, mode).items() if v})
            _adapter.metrics(self, mode).clear()
        super().log(logs, start_time)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        previous, self._eval_prefix = self._eval_prefix, metric_key_prefix
        try:
            metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        finally:
            self._eval_prefix = previous
        dataset = single_eval_dataset(self, eval_dataset, "chosen_ids")
        if self.args.eval_sample_pairs and dataset is not None:
            self._write_eval_pairs(dataset, metric_key_prefix)
        return metrics

    @torch.no_grad()
    def _write_eval_pairs(self, dataset, prefix: str) -> None:
        """The first `eval_sample_pairs` eval pairs with the reward of each side and its attribute bin, through
        the training collator (so the bins are the ones the penalty sees). Every process runs the forward (ZeRO-3
        needs them all); rank 0 writes."""

        # the first rows, map-style or streaming, with the columns the training dataloader keeps
        keep = set(_adapter.signature_columns(self))
        rows = [{k: v for k, v in row.items() if k in keep}
                for row in itertools.islice(iter(dataset), self.args.eval_sample_pairs)]
        if not rows:
            return
        batch = _adapter.prepare_inputs(self, self.data_collator(rows))
        bins = batch.pop("z_bins", None)
        was_training = self.model.training
        self.model.eval()
        try:
            if self.args.shared_prefix:
                rewards = _PackedRewards(self, self.model, batch)().logits[:, 0]
            else:
                rewards = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
        finally:
            self.model.train(was_training)
        n = len(rows)
        tok = getattr(self.processing_class, "tokenizer", self.processing_class)
        table = []
        for i, row in enumerate(rows):
            entry = {"step": self.state.global_step, "chosen": tok.decode(row["chosen_ids"], skip_special_tokens=True),
                     "rejected": tok.decode(row["rejected_ids"], skip_special_tokens=True),
                     "reward_chosen": rewards[i].item(), "reward_rejected": rewards[n + i].item()}
            if bins is not None:
                entry.update(bin_chosen=int(bins[i]), bin_rejected=int(bins[n + i]))
            table.append(entry)
        write_sample_table(self, table, f"{prefix}_step_{self.state.global_step}")

    # Replaces TRL's card (its template links "[None]" for a local base model): the one writer in _card.py
    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        """The model card: TRL's fields, the penalty's settings and (when trained from one) the recipe."""
        write_model_card(self, model_name, dataset_name, tags, reward_model=True)

    def card_details(self) -> list[str]:
        """The penalty's settings, one line each, for the model card."""
        a = self.args
        return [f"method: {_adapter.card_name(self)} (`{type(self).__name__}`)",
                f"mmd_coef: {a.mmd_coef}, attributes: {', '.join(a.attributes or []) or 'none'}, "
                f"conditional: {a.conditional}, on: {a.mmd_on}"]

    def save_model(self, output_dir=None, _internal_call=False):
        super().save_model(output_dir, _internal_call)
        self.attribute_bins.save(self, output_dir)


class _PackedRewards:
    """What RewardTrainer.compute_loss calls as `model(**inputs)` for a shared-prefix batch
    (DataCollatorForSharedPrefixRewardPairs): one forward of the packed rows through the (DDP- / DeepSpeed-)wrapped
    model, the `score` head's output read at each sequence's last token. The head's per-token output is taken by a
    forward hook, inside the model's own forward (the pooled output, read at the packed row's last token, is not
    used). Returns the `logits` [chosen; rejected] as a model output, and keeps the head's input there in
    `scored_hidden` (for `mmd_on: hidden`)."""

    def __init__(self, trainer, model, batch):
        self.trainer, self.model, self.batch = trainer, model, batch

    def __call__(self, **_):
        from transformers.modeling_outputs import SequenceClassifierOutput

        b, trainer = self.batch, self.trainer
        base = trainer.accelerator.unwrap_model(trainer.model)
        base = base.get_base_model() if hasattr(base, "get_base_model") else base
        seen = {}

        def keep(module, args, output):
            seen["hidden"], seen["scores"] = args[0], output

        handle = base.score.register_forward_hook(keep)
        mask = _packed.model_mask(base, b["attention_mask"])
        try:
            self.model(input_ids=b["input_ids"], attention_mask=mask, position_ids=b["position_ids"], use_cache=False)
        finally:
            handle.remove()
        n = b["chosen_end"].size(0)
        rows = torch.arange(n, device=b["input_ids"].device).repeat(2)
        ends = torch.cat([b["chosen_end"], b["rejected_end"]]).to(rows.device)
        self.scored_hidden = seen["hidden"][rows, ends]
        return SequenceClassifierOutput(logits=seen["scores"][rows, ends])
