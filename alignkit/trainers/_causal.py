"""What the causal reward model and Causal DPO share: the config fields of the MMD penalty, the attribute
bins computed from the raw dataset and carried to the batch as `z_bins`, the bin-balanced sampler, and the
penalty itself (docs/methods.md section 3; thesis 4.4 and 4.8)."""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Sampler
from trl.data_utils import get_dataset_column_names

from .. import _adapter
from .._util import AlignkitWarning
from ..data.attributes import AttributeBinner, AttributeSpec, extract_attribute
from ..data.validation import DatasetError
from ..losses import BinnedMMD, binned_mmd_penalty

BIN_COLUMNS = ("chosen_z_bin", "rejected_z_bin")


@dataclass
class CausalPenaltyArguments:
    """The MMD penalty's fields, shared by `CausalRewardConfig` and `FDPOConfig` (Causal DPO).

    Parameters:
        mmd_coef (`float`): weight `lambda` of the penalty (thesis sweeps 0.1 to 100). `0` turns it off.
        attributes (`list[str]`, defaults to `["length"]`): the spurious attribute(s) `Z`: a column name (a
            per-row column, or `chosen_<name>`/`rejected_<name>` per completion), `length` (tokens),
            `length:chars`, or `regex:PATTERN` (presence). Several are binned jointly. With `mmd_coef: 0` it
            may be empty (or None): no bins are computed at all.
        attribute_kind (`str`, *optional*): `numeric` or `categorical` for column attributes (default: guessed).
        num_bins (`int`, defaults to `10`): bins per numeric attribute (thesis: 10, 20, 30).
        binning (`str`, defaults to `"quantile"`): `quantile` or `equal_width`.
        conditional (`bool`, defaults to `False`): penalty within chosen and within rejected (reward independent
            of Z given the label) instead of on the pooled completions.
        mmd_bandwidths (`list[float]`, *optional*): RBF bandwidths summed in the kernel (in units of the batch's
            standard deviation with `mmd_standardize`); default: the median heuristic on each batch.
        mmd_standardize (`bool`, defaults to `True`): standardise the penalised values over the (global) batch,
            gradient included, before the kernel. The penalty is then unchanged when every reward is shrunk
            towards a constant, so collapsing the reward no longer lowers it (docs/methods.md section 3). `False`
            is the plain median heuristic of earlier alignkit versions, whose gradient rewards shrinking.
        mmd_estimator (`str`, defaults to `"unbiased"`): `unbiased` (the U-statistic) or `biased` (the
            V-statistic, never negative). With many small bins per batch (e.g. 60 joint demographic bins) the
            unbiased sum can be driven far below zero by spreading the rewards inside each bin; use `biased`
            there (docs/methods.md section 3). `mmd/penalty` far below zero in the logs is the sign.
        bin_balanced_sampler (`bool`, defaults to `True`): batches drawn so that each holds several bins with at
            least two examples each, so the penalty has signal with small batches.
        bin_sampler_examples (`int`, defaults to `2`): examples of each bin the balanced sampler puts in a batch
            (`per_device_train_batch_size // bin_sampler_examples` bins a batch). More examples give each bin
            pair's MMD^2 a less noisy estimate, over fewer bins a batch; with many bins (e.g. 60 joint
            demographic bins) two each is the U-statistic's worst case (docs/methods.md section 3).
        mmd_start_step (`int`, defaults to `0`): optimizer steps trained on the preference loss alone before the
            penalty is added (it is still computed and logged as `mmd/penalty`). On a freshly initialised
            reward head the conditional penalty, turned on from step 0, can stop the reward from learning the
            content at all; started once the preference loss has taught the model something, it removes the
            shortcut (docs/methods.md section 3, docs/results.md). `0`: the thesis' objective from the start.
    """

    mmd_coef: float = field(default=0.0, metadata={"help": "Weight of the MMD penalty (0: off)."})
    attributes: list[str] = field(default_factory=lambda: ["length"], metadata={"help": "Spurious attribute(s) Z."})
    attribute_kind: str | None = field(default=None, metadata={"help": "numeric or categorical (column attributes)."})
    num_bins: int = field(default=10, metadata={"help": "Bins per numeric attribute."})
    binning: str = field(default="quantile", metadata={"help": "quantile or equal_width."})
    conditional: bool = field(default=False, metadata={"help": "Penalty within chosen and within rejected."})
    mmd_bandwidths: list[float] | None = field(default=None, metadata={"help": "RBF bandwidths (None: median)."})
    mmd_standardize: bool = field(default=True, metadata={"help": "Standardise the penalised values per batch (the "
                                                                   "penalty cannot be lowered by shrinking them)."})
    mmd_estimator: str = field(default="unbiased", metadata={"help": "unbiased (U-statistic) or biased "
                                                                     "(V-statistic, never negative)."})
    bin_balanced_sampler: bool = field(default=True, metadata={"help": "Batches cover bins with >= 2 examples."})
    bin_sampler_examples: int = field(default=2, metadata={"help": "Examples of each bin in a balanced batch."})
    mmd_start_step: int = field(default=0, metadata={"help": "Optimizer steps on the preference loss alone before "
                                                             "the penalty is added."})

    def _check_causal_fields(self):
        if isinstance(self.attributes, str):
            self.attributes = [self.attributes]
        if self.mmd_coef < 0:
            raise ValueError(f"mmd_coef must be >= 0, got {self.mmd_coef}.")
        if self.bin_sampler_examples < 2:
            raise ValueError(f"bin_sampler_examples must be >= 2 (the penalty needs two examples of a bin), got "
                             f"{self.bin_sampler_examples}.")
        if self.mmd_estimator not in ("unbiased", "biased"):
            raise ValueError(f"mmd_estimator must be 'unbiased' or 'biased', got {self.mmd_estimator!r}.")
        if not self.attributes:
            if self.mmd_coef > 0:
                raise ValueError("attributes must name at least one spurious attribute.")
            self.attributes = []  # no penalty and no attribute: the plain TRL trainer, no bins computed
        for a in self.attributes:  # validates binning, kind, n_bins and regexes early
            self.attribute_spec(a)
        self._warn_about_settings_without_effect()

    def _warn_about_settings_without_effect(self):
        """No silent no-ops: penalty settings that cannot take effect in this run say so once, here."""
        if self.mmd_coef <= 0:
            return
        if 0 < self.max_steps <= self.mmd_start_step:
            warnings.warn(f"mmd_start_step={self.mmd_start_step} is not below max_steps={self.max_steps}: the MMD "
                          "penalty is only logged, never trained on; lower mmd_start_step (or set mmd_coef: 0).",
                          AlignkitWarning, stacklevel=3)
        if self.bin_balanced_sampler and self.per_device_train_batch_size < 2 * self.bin_sampler_examples:
            warnings.warn(f"bin_sampler_examples={self.bin_sampler_examples} leaves room for fewer than two bins in "
                          f"a batch of per_device_train_batch_size={self.per_device_train_batch_size}: the balanced "
                          "sampler falls back to random order. Lower bin_sampler_examples or raise the batch size.",
                          AlignkitWarning, stacklevel=3)

    def attribute_spec(self, source: str) -> AttributeSpec:
        return AttributeSpec(source, kind=self.attribute_kind, n_bins=self.num_bins, binning=self.binning)


class BinBalancedSampler(Sampler[int]):
    """Index stream in which every consecutive `batch_size` indices cover `batch_size // per_bin` bins with
    `per_bin` examples each (two by default; fewer where a bin is smaller; bins drawn in proportion to their size,
    so the data distribution is kept on average)."""

    def __init__(self, bins: list[int], batch_size: int, seed: int = 0, per_bin: int = 2):
        if per_bin < 2:
            raise ValueError(f"per_bin must be >= 2 (the penalty needs two examples in a bin), got {per_bin}.")
        self.per_bin = per_bin
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
        if len(self.usable) < 2 or self.batch_size < 2 * self.per_bin:
            order = list(range(self.n))
            rng.shuffle(order)
            yield from order
            return
        weights = [len(self.by_bin[b]) for b in self.usable]
        per_batch = self.batch_size // self.per_bin
        out: list[int] = []
        while len(out) < self.n:
            chosen_bins = set()
            while len(chosen_bins) < min(per_batch, len(self.usable)):
                chosen_bins.add(rng.choices(self.usable, weights)[0])
            batch = []
            for b in chosen_bins:
                batch += rng.sample(self.by_bin[b], min(self.per_bin, len(self.by_bin[b])))
            while len(batch) < self.batch_size:  # odd batch sizes / few bins: fill at random
                batch.append(rng.randrange(self.n))
            out += batch[: self.batch_size]
        yield from out[: self.n]


class CollatorWithBins:
    """A TRL preference collator, plus the bins of the [chosen; rejected] batch as `z_bins`."""

    def __init__(self, base):
        self.base = base

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        out = self.base([{k: v for k, v in ex.items() if k not in BIN_COLUMNS} for ex in examples])
        if BIN_COLUMNS[0] in examples[0]:
            out["z_bins"] = torch.tensor([ex[BIN_COLUMNS[0]] for ex in examples] +
                                         [ex[BIN_COLUMNS[1]] for ex in examples], dtype=torch.long)
        return out


class AttributeBins:
    """The causal penalty's part of a trainer, as an object it calls: the attribute bins computed from the raw
    completions (before TRL tokenizes), carried as two columns, the bin-balanced train sampler, and the penalty.

    A trainer declares `attribute_bins = AttributeBins.per_trainer()`; each trainer gets its own, made on first use,
    so nothing needs setting before TRL's `__init__` (which prepares the datasets, and so fits the bins, before it
    returns)."""

    def __init__(self):
        #: fitted on the training set when TRL prepares it; then applied to every other split
        self.binner: AttributeBinner | None = None

    @staticmethod
    def per_trainer() -> "_PerTrainer":
        return _PerTrainer()

    @staticmethod
    def enabled(args) -> bool:
        return args.mmd_coef > 0

    def add_bins_if_needed(self, dataset, processing_class, args, dataset_name):
        if not args.attributes:  # only allowed with mmd_coef 0
            return dataset
        # TRL's helper reads the first row of an IterableDataset whose column names are unknown (None)
        names = get_dataset_column_names(dataset)
        # already tokenized (TRL's `*_ids` columns, or the legacy `*_input_ids` ones it renames): no raw text
        if "chosen_ids" in names or "chosen_input_ids" in names or any(c in names for c in BIN_COLUMNS):
            return dataset
        return self._add_bins(dataset, processing_class, args, dataset_name)

    @staticmethod
    def _attribute_values(dataset, processing_class, args):
        names = get_dataset_column_names(dataset)
        needed = {"chosen", "rejected"} | {c for a in args.attributes for c in (a, f"chosen_{a}", f"rejected_{a}")
                                           if c in names}
        rows = dataset.select_columns([c for c in names if c in needed]).to_list()
        tok = processing_class if any(a in ("length", "length:tokens") for a in args.attributes) else None
        tok = getattr(tok, "tokenizer", tok)  # processors wrap their tokenizer
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
            per_side[side] = [extract_attribute(args.attribute_spec(a), side_rows, tokenizer=tok)
                              for a in args.attributes]
        return per_side

    def _add_bins(self, dataset, processing_class, args, dataset_name):
        values = self._attribute_values(dataset, processing_class, args)
        if self.binner is None:
            if dataset_name != "train":
                raise DatasetError("the attribute bins are fitted on the training set; prepare it first.")
            specs = [args.attribute_spec(a) for a in args.attributes]
            pooled = [values["chosen"][k] + values["rejected"][k] for k in range(len(specs))]
            self.binner = AttributeBinner(specs).fit(pooled)
        chosen = self.binner.transform(values["chosen"]).tolist()
        rejected = self.binner.transform(values["rejected"]).tolist()
        return dataset.add_column(BIN_COLUMNS[0], chosen).add_column(BIN_COLUMNS[1], rejected)

    @staticmethod
    def add_signature_columns(trainer) -> None:
        """The bin columns survive Trainer's removal of the columns the model does not take."""
        _adapter.add_signature_columns(trainer, BIN_COLUMNS)

    @staticmethod
    def sampler(trainer):
        """The bin-balanced sampler when it applies, else None (Trainer's random sampler)."""
        ds, args = trainer.train_dataset, trainer.args
        if (not args.bin_balanced_sampler or not AttributeBins.enabled(args) or ds is None
                or BIN_COLUMNS[0] not in (ds.column_names or [])):
            return None
        # a pair's bin for sampling: its chosen completion's bin (the penalty pools both sides)
        return BinBalancedSampler(ds[BIN_COLUMNS[0]], args.per_device_train_batch_size, seed=args.seed,
                                  per_bin=args.bin_sampler_examples)

    @staticmethod
    def with_penalty(trainer, loss: torch.Tensor, values: torch.Tensor, bins: torch.Tensor,
                     mode: str) -> torch.Tensor:
        """`loss + mmd_coef * penalty(values)`. Before `mmd_start_step` optimizer steps (the trainer state's global
        step, so a resumed run switches it on at the same step) the penalty is computed and logged only, outside
        the graph: no backward through a term of weight 0."""
        if trainer.state.global_step < trainer.args.mmd_start_step:
            with torch.no_grad():
                AttributeBins.penalty(trainer, values, bins, mode)
            return loss
        return loss + trainer.args.mmd_coef * AttributeBins.penalty(trainer, values, bins, mode).penalty

    @staticmethod
    def penalty(trainer, values: torch.Tensor, bins: torch.Tensor, mode: str) -> BinnedMMD:
        """The binned MMD^2 of `values` laid out [chosen; rejected], logged under mmd/*.

        With several processes the penalty is computed on the *global* batch: values (with their gradient),
        bins and sides are all-gathered, every rank computes the same penalty, and the gradient flows back
        to each rank's own completions. Data-parallel training then optimises exactly the single-process
        objective with the same global batch (tested under ZeRO-2/3); a per-rank penalty would instead see
        only per_device_train_batch_size pairs, fewer bins with two or more examples, and a different
        (noisier) objective. Cost: one all-gather of 2 x batch scalars (or hidden states) per step.
        """
        args = trainer.args
        # in float32: half-precision models' values would lose the kernel distances' precision, and torch has no
        # half-precision cdist on CPUs; the gradient flows back through the cast in the model's precision
        values = values.float()
        n = values.size(0) // 2
        bins = bins.to(values.device)
        groups = torch.cat([torch.ones(n), torch.zeros(n)]).to(values.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized() and \
                torch.distributed.get_world_size() > 1:
            from torch.distributed.nn.functional import all_gather

            values = torch.cat(all_gather(values.contiguous()))
            bins = trainer.accelerator.gather(bins)
            groups = trainer.accelerator.gather(groups)
        out = binned_mmd_penalty(values, bins, args.mmd_bandwidths, groups=groups if args.conditional else None,
                                 standardize=args.mmd_standardize, unbiased=args.mmd_estimator == "unbiased")
        m = _adapter.metrics(trainer, mode)  # the same global figures on every rank: no gather needed
        m["mmd/penalty"].append(out.penalty.item())
        m["mmd/bins_used"].append(out.bins_used)
        m["mmd/bins_skipped"].append(out.bins_skipped)
        return out

    def save(self, trainer, output_dir) -> None:
        """The fitted bins beside the model (rank 0)."""
        if self.binner is not None and trainer.is_world_process_zero():
            self.binner.save(output_dir or trainer.args.output_dir)


class _PerTrainer:
    """A class attribute that gives each trainer its own `AttributeBins`, made on first access."""

    def __set_name__(self, owner, name):
        self.key = f"_{name}_instance"

    def __get__(self, trainer, owner=None):
        if trainer is None:
            return self
        found = trainer.__dict__.get(self.key)
        if found is None:
            found = trainer.__dict__[self.key] = AttributeBins()
        return found
