"""Evaluation metrics of the thesis (docs/methods.md section 4), as plain functions on texts, numbers and tensors.

Conventions (decided here, stated once):

* Texts are split into words on whitespace after lower-casing; n-grams are word n-grams.
* `distinct_n`: unique n-grams / total n-grams, pooled over the samples of one prompt (corpus-level
  variant, not the mean of per-sample ratios).
* `self_bleu`: each sample's BLEU-3 (uniform weights over 1-3-grams, clipped counts against all the other
  samples of the prompt as references, brevity penalty against the closest reference length), averaged
  over the samples. An n-gram order with no match counts 0.1 matches instead of 0 (Chen & Cherry's
  smoothing 1), so short texts do not all score 0.
* Entropies are in nats.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence

import torch

from ..divergences import get_divergence
from ..losses import preference_ece
from ..losses import spearman as _spearman

__all__ = ["words", "distinct_n", "self_bleu", "bleu", "simpson_diversity", "bias_at_c", "first_integer",
           "number_uniformity", "win_rate_score", "divergence_estimates", "predictive_entropy", "preference_ece",
           "spearman", "DIVERGENCES"]

#: the divergences whose estimates are reported
DIVERGENCES = (("reverse_kl", None), ("forward_kl", None), ("jsd", None), ("alpha", 0.5))


def words(text: str) -> list[str]:
    return text.lower().split()


def _ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Unique word n-grams / total word n-grams over `texts` (0 when there are no n-grams)."""
    grams = [g for t in texts for g in _ngrams(words(t), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def bleu(hypothesis: str, references: Sequence[str], max_n: int = 3, smoothing: float = 0.1) -> float:
    """Sentence BLEU with uniform weights over 1..max_n-grams (see the module docstring)."""
    hyp = words(hypothesis)
    refs = [words(r) for r in references]
    if not hyp or not refs:
        return 0.0
    log_p = 0.0
    for n in range(1, max_n + 1):
        counts = Counter(_ngrams(hyp, n))
        total = sum(counts.values())
        if total == 0:
            return 0.0  # hypothesis shorter than n words
        max_ref = Counter()
        for r in refs:
            for g, c in Counter(_ngrams(r, n)).items():
                max_ref[g] = max(max_ref[g], c)
        matches = sum(min(c, max_ref[g]) for g, c in counts.items())
        log_p += math.log((matches if matches > 0 else smoothing) / total) / max_n
    closest = min((len(r) for r in refs), key=lambda L: (abs(L - len(hyp)), L))
    bp = 1.0 if len(hyp) > closest else math.exp(1 - closest / len(hyp))
    return bp * math.exp(log_p)


def self_bleu(texts: Sequence[str], max_n: int = 3) -> float:
    """Mean BLEU-`max_n` of each sample against the others (needs at least two samples)."""
    if len(texts) < 2:
        raise ValueError(f"self-BLEU compares samples with each other: it needs k >= 2 samples, got {len(texts)}.")
    return sum(bleu(t, [o for j, o in enumerate(texts) if j != i], max_n) for i, t in enumerate(texts)) / len(texts)


def simpson_diversity(labels: Sequence) -> float:
    """Simpson's diversity index `1 - sum_i (n_i / N)^2` over category labels."""
    if not labels:
        raise ValueError("Simpson diversity needs at least one label.")
    n = len(labels)
    return 1.0 - sum((c / n) ** 2 for c in Counter(labels).values())


def bias_at_c(correct: Sequence[bool], has_concept: Sequence[bool], labels: Sequence[int]) -> float:
    """Bias@C (Zhou et al. 2023), x100: `Delta_i = Acc(with c, label i) - Acc(without c, label i)`,
    `Bias@C = Delta_1 - Delta_0`, for binary labels."""
    def acc(c_flag, label):
        sel = [ok for ok, c, y in zip(correct, has_concept, labels) if bool(c) == c_flag and int(y) == label]
        if not sel:
            raise ValueError(f"Bias@C needs examples {'with' if c_flag else 'without'} the concept for label {label}.")
        return sum(map(bool, sel)) / len(sel)

    delta = {y: acc(True, y) - acc(False, y) for y in (0, 1)}
    return 100.0 * (delta[1] - delta[0])


def first_integer(text: str) -> int | None:
    """The first integer written in `text` (how a sampled answer to a random-number prompt is read), or None."""
    m = re.search(r"-?\d+", text)
    return int(m.group()) if m else None


def number_uniformity(numbers: Sequence[int | None], low: int, high: int) -> dict[str, float]:
    """How uniform sampled integers are on [low, high] (thesis 3.6.1): entropy of the empirical distribution
    of the valid samples, KL(empirical || uniform) = log(high - low + 1) - entropy, and the fraction of
    samples that are not an integer in range (`None` or outside)."""
    valid = [x for x in numbers if x is not None and low <= x <= high]
    if not numbers:
        raise ValueError("number_uniformity needs at least one sample.")
    invalid = 1.0 - len(valid) / len(numbers)
    if not valid:
        return {"entropy": 0.0, "kl_to_uniform": math.log(high - low + 1), "invalid_fraction": invalid}
    n = len(valid)
    ent = -sum(c / n * math.log(c / n) for c in Counter(valid).values())
    return {"entropy": ent, "kl_to_uniform": math.log(high - low + 1) - ent, "invalid_fraction": invalid}


def win_rate_score(scores: Sequence[float], other_scores: Sequence[float]) -> float:
    """`50 + (wins - losses) / N * 100` of paired scores, as docs/methods.md gives it (thesis 4.6.2): 50 when wins and
    losses balance, 150 when always better, -50 when always worse."""
    if len(scores) != len(other_scores) or not scores:
        raise ValueError("win rate needs two equally long, non-empty lists of paired scores.")
    wins = sum(a > b for a, b in zip(scores, other_scores))
    losses = sum(a < b for a, b in zip(scores, other_scores))
    return 50.0 + (wins - losses) / len(scores) * 100.0


def divergence_estimates(logr: torch.Tensor) -> dict[str, float]:
    """Estimates of D_f(pi || pi_ref) for every divergence from sequence log-ratios `log pi(y) - log pi_ref(y)`
    of samples `y ~ pi` (the unbiased estimator `g(t) + f'(1)(t - 1)`, `t = pi_ref / pi`)."""
    logr = logr.double()
    out = {}
    for name, alpha in DIVERGENCES:
        d = get_divergence(name, alpha)
        out[d.name if alpha is None else f"alpha_{alpha:g}"] = d.estimator(logr).mean().item()
    return out


def predictive_entropy(logits: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean over the masked positions of `-sum_v p log p` of the next-token distribution (nats)."""
    logp = logits.float().log_softmax(-1)
    ent = -(logp.exp() * logp).sum(-1)
    mask = mask.to(ent.dtype)
    return ((ent * mask).sum() / mask.sum().clamp(min=1)).item()


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation with average ranks for ties (0 when either side is constant)."""
    return _spearman(torch.tensor(list(a), dtype=torch.float64), torch.tensor(list(b), dtype=torch.float64))
