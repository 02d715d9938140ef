"""Causal reward models: Bradley-Terry reward models with an MMD penalty (thesis chapter 4, SPEC.md section 3).

    L = -E log sigma(r(x, y_w) - r(x, y_l)) + mmd_coef * sum_{m < m'} MMD^2(P_m, P_m')

`P_b` is the distribution of the reward (or of the last hidden state) over the examples whose spurious
attribute `Z` falls in bin `b`, within the batch. Unconditional: chosen and rejected completions pooled;
conditional: the penalty within the chosen set plus within the rejected set.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Sampler
from trl import RewardConfig, RewardTrainer

from ..data.attributes import AttributeBinner, AttributeSpec, extract_attribute
from ..data.validation import DatasetError
from ..losses import binned_mmd_penalty
from ._common import ConfigResolverMixin, default_precision_for_this_machine

__all__ = ["CausalRewardConfig", "CausalRewardTrainer", "BinBalancedSampler"]

_BIN_COLUMNS = ("chosen_z_bin", "rejected_z_bin")


@dataclass
class CausalRewardConfig(RewardConfig):
    r"""Configuration for [`CausalRewardTrainer`]: TRL's `RewardConfig` plus the MMD penalty.

    Parameters:
        mmd_coef (`float`, defaults to `1.0`): weight `lambda` of the penalty (thesis sweeps 0.1 to 100).
            `0` is exactly TRL's RewardTrainer.
        attributes (`list[str]`, defaults to `["length"]`): the spurious attribute(s) `Z`: a column name (a
            per-row column, or `chosen_<name>`/`rejected_<name>` per completion), `length` (tokens),
            `length:chars`, or `regex:PATTERN` (presence). Several are binned jointly.
        attribute_kind (`str`, *optional*): `numeric` or `categorical` for column attributes (default: guessed).
        num_bins (`int`, defaults to `10`): bins per numeric attribute (thesis: 10, 20, 30).
        binning (`str`, defaults to `"quantile"`): `quantile` or `equal_width`.
        conditional (`bool`, defaults to `False`): penalty within chosen and within rejected (r independent of Z
            given the label) instead of on the pooled completions.
        mmd_bandwidths (`list[float]`, *optional*): RBF bandwidths summed in the kernel; default: the
            median heuristic on each batch.
        mmd_on (`str`, defaults to `"reward"`): `reward` (the scalar reward) or `hidden` (the last hidden
            state at the scored token).
        bin_balanced_sampler (`bool`, defaults to `True`): batches drawn so that each holds several bins
            with at least two examples each, so the penalty has signal with small batches.
    """

    mmd_coef: float = field(default=1.0, metadata={"help": "Weight of the MMD penalty (0: plain RewardTrainer)."})
    attributes: list[str] = field(default_factory=lambda: ["length"], metadata={"help": "Spurious attribute(s) Z."})
    attribute_kind: str | None = field(default=None, metadata={"help": "numeric or categorical (column attributes)."})
    num_bins: int = field(default=10, metadata={"help": "Bins per numeric attribute."})
    binning: str = field(default="quantile", metadata={"help": "quantile or equal_width."})
    conditional: bool = field(default=False, metadata={"help": "Penalty within chosen and within rejected."})
    mmd_bandwidths: list[float] | None = field(default=None, metadata={"help": "RBF bandwidths (None: median)."})
    mmd_on: str = field(default="reward", metadata={"help": "reward or hidden."})
    bin_balanced_sampler: bool = field(default=True, metadata={"help": "Batches cover bins with >= 2 examples."})

    def __post_init__(self):
        default_precision_for_this_machine(self)
        super().__post_init__()
        if isinstance(self.attributes, str):
            self.attributes = [self.attributes]
        if self.mmd_coef < 0:
            raise ValueError(f"mmd_coef must be >= 0, got {self.mmd_coef}.")
        if self.mmd_on not in ("reward", "hidden"):
            raise ValueError(f"mmd_on must be 'reward' or 'hidden', got {self.mmd_on!r}.")
        if not self.attributes:
            raise ValueError("attributes must name at least one spurious attribute.")
        for a in self.attributes:  # validates binning, kind, n_bins and regexes early
            AttributeSpec(a, kind=self.attribute_kind, n_bins=self.num_bins, binning=self.binning)


class BinBalancedSampler(Sampler[int]):
    """Index stream in which every consecutive `batch_size` indices cover `batch_size // 2` bins with two
    examples each (bins drawn in proportion to their size, so the data distribution is kept on average)."""

    def __init__(self, bins: list[int], batch_size: int, seed: int = 0):
        self.by_bin: dict[int, list[int]] = {}
        for i, b in enumerate(bins):
            self.by_bin.setdefault(int(b), []).append(i)
        self.usable = [b for b, idx in self.by_bin.items() if len(idx) >= 2]
        self.batch_size, self.seed, self.epoch = batch_size, seed, 0
        self.n = len(bins)

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return self.n

    def __iter__(self):
        rng = random.Random(self.seed + self.epoch)
        if len(self.usable) < 2 or self.batch_size < 4:
            order = list(range(self.n))
            rng.shuffle(order)
            yield from order
            return
        weights = [len(self.by_bin[b]) for b in self.usable]
        per_batch = self.batch_size // 2
        out: list[int] = []
        while len(out) < self.n:
            chosen_bins = set()
            while len(chosen_bins) < min(per_batch, len(self.usable)):
                chosen_bins.add(rng.choices(self.usable, weights)[0])
            batch = []
            for b in chosen_bins:
                batch += rng.sample(self.by_bin[b], 2)
            while len(batch) < self.batch_size:  # odd batch sizes / few bins: fill at random
                batch.append(rng.randrange(self.n))
            out += batch[: self.batch_size]
        yield from out[: self.n]


class _CollatorWithBins:
    """TRL's reward collator, plus the bins of the [chosen; rejected] batch as `z_bins`."""

    def __init__(self, base):
        self.base = base

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        out = self.base([{k: v for k, v in ex.items() if k not in _BIN_COLUMNS} for ex in examples])
        if _BIN_COLUMNS[0] in examples[0]:
            out["z_bins"] = torch.tensor([ex[_BIN_COLUMNS[0]] for ex in examples] +
                                         [ex[_BIN_COLUMNS[1]] for ex in examples], dtype=torch.long)
        return out


class CausalRewardTrainer(ConfigResolverMixin, RewardTrainer):
    """Drop-in replacement for TRL's `RewardTrainer` that makes the reward independent of a spurious
    attribute with an MMD penalty. Everything but the penalty is TRL's (data preparation, collator,
    loss, metrics, saving); the fitted attribute bins are saved next to the model."""

    config_class = CausalRewardConfig
    _config_with_article = "a CausalRewardConfig"
    _default_run_suffix = "CRM"
    _tag_names = ["trl", "reward-trainer", "alignkit", "causal-reward-model"]
    _name = "Causal reward model"

    def __init__(self, model, args: CausalRewardConfig | None = None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, *pargs, **kwargs):
        args = self._resolve_args(model, args)
        self.binner: AttributeBinner | None = None
        self._window: dict[str, list] = {"train": [], "eval": []}
        self._eval_prefix = "eval"
        super().__init__(model, args, data_collator, train_dataset, eval_dataset, processing_class, *pargs, **kwargs)
        self.data_collator = _CollatorWithBins(self.data_collator)
        if self.model.config.num_labels != 1:
            raise ValueError(f"a reward model has one output; this model has num_labels={self.model.config.num_labels}.")

    # Extends RewardTrainer._prepare_dataset: the attribute bins are computed from the raw completions
    # (before TRL adds EOS and tokenizes) and carried as two extra columns.
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        names = dataset.column_names or []
        if "chosen_ids" not in names and all(c not in names for c in _BIN_COLUMNS):
            dataset = self._add_bins(dataset, processing_class, args, dataset_name)
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    def _attribute_values(self, dataset, processing_class, args):
        names = dataset.column_names
        needed = {"chosen", "rejected"} | {c for a in args.attributes for c in (a, f"chosen_{a}", f"rejected_{a}")
                                           if c in names}
        rows = dataset.select_columns([c for c in names if c in needed]).to_list()
        tok = processing_class if any(a == "length" or a == "length:tokens" for a in args.attributes) else None
        per_side = {}
        for side in ("chosen", "rejected"):
            side_rows = []
            for r in rows:
                row = dict(r)
                row["completion"] = r[side]
                for a in args.attributes:  # per-completion columns chosen_<a> / rejected_<a>
                    if f"{side}_{a}" in r:
                        row[a] = r[f"{side}_{a}"]
                side_rows.append(row)
            per_side[side] = [extract_attribute(AttributeSpec(a, kind=args.attribute_kind, n_bins=args.num_bins,
                                                              binning=args.binning), side_rows, tokenizer=tok)
                              for a in args.attributes]
        return per_side

    def _add_bins(self, dataset, processing_class, args, dataset_name):
        values = self._attribute_values(dataset, processing_class, args)
        if self.binner is None:
            if dataset_name != "train":
                raise DatasetError("the attribute bins are fitted on the training set; prepare it first.")
            specs = [AttributeSpec(a, kind=args.attribute_kind, n_bins=args.num_bins, binning=args.binning)
                     for a in args.attributes]
            pooled = [values["chosen"][k] + values["rejected"][k] for k in range(len(specs))]
            self.binner = AttributeBinner(specs).fit(pooled)
        chosen = self.binner.transform(values["chosen"]).tolist()
        rejected = self.binner.transform(values["rejected"]).tolist()
        return dataset.add_column(_BIN_COLUMNS[0], chosen).add_column(_BIN_COLUMNS[1], rejected)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        self._signature_columns = list(dict.fromkeys([*self._signature_columns, *_BIN_COLUMNS]))

    # Replaces Trainer's random sampler with the bin-balanced one (when enabled).
    def _get_train_sampler(self, *args, **kwargs):
        ds = self.train_dataset
        if not self.args.bin_balanced_sampler or self.args.mmd_coef == 0 or _BIN_COLUMNS[0] not in ds.column_names:
            return super()._get_train_sampler(*args, **kwargs)
        # a pair's bin for sampling: its chosen completion's bin (the penalty pools both sides)
        return BinBalancedSampler(ds[_BIN_COLUMNS[0]], self.args.per_device_train_batch_size, seed=self.args.seed)

    # Extends RewardTrainer.compute_loss: TRL's loss and metrics, plus the MMD penalty on its outputs. With
    # mmd_coef 0 the loss is TRL's, untouched; the attribute metrics are still recorded (for comparisons).
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        bins = inputs.pop("z_bins", None)
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
            if self.args.mmd_on == "hidden":
                last = inputs["attention_mask"].sum(1) - 1
                values = outputs.hidden_states[-1][torch.arange(last.size(0), device=last.device), last]
            else:
                values = rewards
            n = values.size(0) // 2
            groups = torch.cat([torch.ones(n), torch.zeros(n)]).to(values.device) if self.args.conditional else None
            out = binned_mmd_penalty(values, bins, self.args.mmd_bandwidths, groups=groups)
            loss = loss + self.args.mmd_coef * out.penalty
            stats = self.accelerator.gather_for_metrics(torch.tensor(
                [[out.penalty.item(), out.bins_used, out.bins_skipped]], device=values.device))
            m = self._metrics[mode]
            m["mmd/penalty"].append(stats[:, 0].mean().item())
            m["mmd/bins_used"].append(stats[:, 1].mean().item())
            m["mmd/bins_skipped"].append(stats[:, 2].mean().item())
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
        """Spearman correlation of rewards with the bin, and the mean reward per bin, over the window."""
        if not self._window[mode]:
            return {}
        r = torch.cat([w[0] for w in self._window[mode]])
        z = torch.cat([w[1] for w in self._window[mode]])
        self._window[mode].clear()
        out = {"mmd/spearman_reward_bin": _spearman(r, z.float())}
        sums = torch.zeros(self.binner.n_bins).index_add_(0, z, r)
        counts = torch.bincount(z, minlength=self.binner.n_bins)
        out.update({f"reward_by_bin/{b}": (sums[b] / counts[b]).item() for b in range(len(counts)) if counts[b]})
        return out

    # Replaces RewardTrainer.log's naming of eval metrics: TRL always writes "eval_<metric>", so with several
    # eval datasets their accuracies overwrite each other; here they follow the evaluate() prefix
    # ("eval_<dataset>_<metric>"), like the loss does. Also adds the window metrics above.
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        for key, value in self._window_metrics(mode).items():
            self._metrics[mode][key] = [value]
        if mode == "eval" and self._eval_prefix != "eval":
            logs.update({f"{self._eval_prefix}_{k}": sum(v) / len(v) for k, v in self._metrics[mode].items() if v})
            self._metrics[mode].clear()
        super().log(logs, start_time)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        previous, self._eval_prefix = self._eval_prefix, metric_key_prefix
        try:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        finally:
            self._eval_prefix = previous

    def save_model(self, output_dir=None, _internal_call=False):
        super().save_model(output_dir, _internal_call)
        if self.binner is not None and self.is_world_process_zero():
            self.binner.save(output_dir or self.args.output_dir)


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation (average ranks for ties); 0 when either side is constant."""
    def rank(x):
        sorted_x, order = x.sort()
        _, inverse, counts = torch.unique_consecutive(sorted_x, return_inverse=True, return_counts=True)
        ends = counts.cumsum(0)
        average = (ends - counts + ends - 1).to(x.dtype) / 2  # mean of the 0-based positions of each tie run
        r = torch.empty_like(x)
        r[order] = average[inverse]
        return r

    ra, rb = rank(a.float()), rank(b.float())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.norm() * rb.norm()).item()
    return float((ra @ rb).item() / denom) if denom > 0 else 0.0
