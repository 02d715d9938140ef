"""Spurious attributes Z and their bins, for causal reward models (thesis chapter 4, docs/methods.md section 3).

An attribute is read from a dataset column (numeric or categorical) or computed from a completion by a
built-in extractor: ``length`` (characters, or tokens with a tokenizer) or ``regex:PATTERN`` (1 when the
pattern occurs, else 0). Numeric attributes are binned by quantiles (default) or equal widths; a
categorical one gets one bin per value; several attributes are binned jointly (the product of their
bins, e.g. the thesis' 4 age x 3 gender x 5 race = 60 bins). Bin edges are fitted once, on the
training set, and saved with the model (:meth:`AttributeBinner.save`).
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from .validation import DatasetError

__all__ = ["AttributeSpec", "AttributeBinner", "extract_attribute"]


@dataclass
class AttributeSpec:
    """One spurious attribute.

    ``source``: a column name, ``length`` / ``length:tokens`` / ``length:chars``, or ``regex:PATTERN``.
    ``kind``: ``numeric`` or ``categorical`` (default: categorical for regex and non-numeric columns).
    """

    source: str
    kind: str | None = None
    n_bins: int = 10
    binning: str = "quantile"  # or "equal_width"

    def __post_init__(self):
        if self.binning not in ("quantile", "equal_width"):
            raise ValueError(f"binning must be 'quantile' or 'equal_width', got {self.binning!r}")
        if self.kind not in (None, "numeric", "categorical"):
            raise ValueError(f"kind must be 'numeric' or 'categorical', got {self.kind!r}")
        if self.n_bins < 2:
            raise ValueError(f"n_bins must be at least 2, got {self.n_bins}")
        if self.source.startswith("regex:"):
            try:
                re.compile(self.source[len("regex:"):])
            except re.error as exc:
                raise ValueError(f"attribute {self.source!r}: invalid regular expression ({exc})") from None


def extract_attribute(spec: AttributeSpec, rows: Sequence[dict], text_key: str = "completion",
                      tokenizer=None) -> list:
    """The attribute's value for each row (``text_key`` names the completion for extractors)."""
    src = spec.source
    if src.startswith("length"):
        unit = src.split(":", 1)[1] if ":" in src else ("tokens" if tokenizer is not None else "chars")
        if unit == "tokens":
            if tokenizer is None:
                raise ValueError("attribute 'length:tokens' needs a tokenizer")
            return [len(tokenizer(_text(r[text_key]), add_special_tokens=False).input_ids) for r in rows]
        return [len(_text(r[text_key])) for r in rows]
    if src.startswith("regex:"):
        pattern = re.compile(src[len("regex:"):])
        return [int(bool(pattern.search(_text(r[text_key])))) for r in rows]
    if rows and src not in rows[0]:
        raise DatasetError(f"attribute column {src!r} is not in the dataset; it has {sorted(rows[0])}. Name a "
                           "column, or use an extractor: length, length:tokens, length:chars, regex:PATTERN.")
    return [r[src] for r in rows]


def _text(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # chat messages
        return " ".join(str(m.get("content", "")) for m in value)
    return str(value)


@dataclass
class _Fitted:
    kind: str
    edges: list[float] = field(default_factory=list)  # numeric: inner edges (n_bins - 1)
    categories: list[Any] = field(default_factory=list)  # categorical: sorted values

    @property
    def n_bins(self) -> int:
        return len(self.edges) + 1 if self.kind == "numeric" else len(self.categories)


class AttributeBinner:
    """Fit bins on training values, then map values to (joint) bin ids."""

    def __init__(self, specs: Sequence[AttributeSpec]):
        if not specs:
            raise ValueError("give at least one attribute")
        self.specs = list(specs)
        self.fitted: list[_Fitted] | None = None

    def fit(self, values: Sequence[Sequence]) -> "AttributeBinner":
        """``values[k]`` holds attribute k's training values."""
        if len(values) != len(self.specs):
            raise ValueError(f"expected values for {len(self.specs)} attribute(s), got {len(values)}")
        self.fitted = [self._fit_one(spec, list(v)) for spec, v in zip(self.specs, values)]
        return self

    @staticmethod
    def _fit_one(spec: AttributeSpec, vals: list) -> _Fitted:
        numeric_values = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals)
        kind = spec.kind or ("numeric" if numeric_values and not spec.source.startswith("regex:") else "categorical")
        distinct = sorted(set(vals), key=lambda v: (str(type(v)), v))
        if len(distinct) < 2:
            warnings.warn(f"attribute {spec.source!r} takes a single value on the training set ({distinct}); the "
                          "MMD penalty has no signal from it" + (" (the regex never matches)" if
                                                                 spec.source.startswith("regex:") else "") + ".",
                          stacklevel=3)
        if kind == "numeric":
            if not numeric_values:
                raise DatasetError(f"attribute {spec.source!r} is declared numeric but has non-numeric values.")
            if len(distinct) <= spec.n_bins:
                if len(distinct) < spec.n_bins:
                    warnings.warn(f"attribute {spec.source!r} has {len(distinct)} distinct values, fewer than "
                                  f"n_bins={spec.n_bins}; using one bin per value instead.", stacklevel=3)
                return _Fitted("categorical", categories=distinct)
            t = torch.tensor(vals, dtype=torch.float64)
            if spec.binning == "quantile":
                qs = torch.linspace(0, 1, spec.n_bins + 1, dtype=torch.float64)[1:-1]
                # each edge halfway between its quantile and the next distinct value above it: with heavy ties
                # a raw quantile equals the minimum or maximum and would leave a bin empty by construction
                levels = torch.tensor(distinct, dtype=torch.float64)
                edges = []
                for q in torch.quantile(t, qs).tolist():
                    above = levels[levels > q]
                    if above.numel():
                        below = levels[levels <= q].max().item()
                        edges.append((below + above.min().item()) / 2)
            else:
                lo, hi = t.min().item(), t.max().item()
                edges = [lo + (hi - lo) * i / spec.n_bins for i in range(1, spec.n_bins)]
            edges = sorted(set(edges))  # heavy ties can merge quantile edges
            return _Fitted("numeric", edges=edges)
        return _Fitted("categorical", categories=distinct)

    @property
    def n_bins(self) -> int:
        self._check_fitted()
        return math.prod(f.n_bins for f in self.fitted)

    def transform(self, values: Sequence[Sequence]) -> torch.Tensor:
        """Joint bin id of each example (``values[k]`` as in :meth:`fit`). Unseen categories raise."""
        self._check_fitted()
        joint = None
        for spec, fit, vals in zip(self.specs, self.fitted, values):
            if fit.kind == "numeric":
                ids = torch.bucketize(torch.tensor(list(vals), dtype=torch.float64),
                                      torch.tensor(fit.edges, dtype=torch.float64), right=True)
            else:
                index = {c: i for i, c in enumerate(fit.categories)}
                unseen = [v for v in vals if v not in index]
                if unseen:
                    raise DatasetError(f"attribute {spec.source!r} has value(s) {sorted(set(map(str, unseen)))[:5]} "
                                       "that the training set did not have.")
                ids = torch.tensor([index[v] for v in vals], dtype=torch.long)
            joint = ids if joint is None else joint * fit.n_bins + ids
        return joint

    def _check_fitted(self):
        if self.fitted is None:
            raise RuntimeError("call fit() on the training values first")

    def to_dict(self) -> dict:
        self._check_fitted()
        return {"specs": [asdict(s) for s in self.specs], "fitted": [asdict(f) for f in self.fitted]}

    @classmethod
    def from_dict(cls, data: dict) -> "AttributeBinner":
        binner = cls([AttributeSpec(**s) for s in data["specs"]])
        binner.fitted = [_Fitted(**f) for f in data["fitted"]]
        return binner

    def save(self, directory: str | Path, name: str = "alignkit_attribute_bins.json") -> Path:
        path = Path(directory) / name
        path.write_text(json.dumps(self.to_dict(), indent=2, default=str))
        return path

    @classmethod
    def load(cls, directory: str | Path, name: str = "alignkit_attribute_bins.json") -> "AttributeBinner":
        return cls.from_dict(json.loads((Path(directory) / name).read_text()))
