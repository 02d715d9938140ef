"""Pure tensor functions for the alignkit losses. No models, no TRL: each is testable in milliseconds.

The trainers call these; the math lives only here and in :mod:`alignkit.divergences`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .divergences import DEFAULT_MAX_EXPONENT, Divergence

__all__ = [
    "FDPO_LOSS_TYPES",
    "FDPOScores",
    "fdpo_scores",
    "preference_loss",
    "preference_ece",
]

#: TRL loss types for which the f-DPO link is meaningful: each depends on the policy only through the
#: chosen-minus-rejected difference of the per-sequence scores (Theorem 1 fixes the reward only up to
#: a per-prompt constant, which cancels there and nowhere else).
FDPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust", "sigmoid_norm")


@dataclass
class FDPOScores:
    """Per-sequence link values ``f'(u) - f'(1)`` for the chosen and rejected completions."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    #: how many of the link values were continued linearly by ``safe_exp`` (0-d tensor)
    num_clamped: torch.Tensor


def fdpo_scores(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    divergence: Divergence,
    max_exponent: float | None = DEFAULT_MAX_EXPONENT,
) -> FDPOScores:
    """Map sequence log-ratios ``log pi/pi_ref`` to f-DPO scores (computed in float32 at least)."""
    dtype = torch.promote_types(chosen_logratios.dtype, torch.float32)
    chosen_logratios = chosen_logratios.to(dtype)
    rejected_logratios = rejected_logratios.to(dtype)
    chosen = divergence.link(chosen_logratios, max_exponent)
    rejected = divergence.link(rejected_logratios, max_exponent)
    num_clamped = chosen.new_zeros(())
    if max_exponent is not None:
        with torch.no_grad():
            for logu in (chosen_logratios, rejected_logratios):
                exponent = divergence.link_exponent(logu)
                if exponent is not None:
                    num_clamped = num_clamped + (exponent > max_exponent).sum()
    return FDPOScores(chosen=chosen, rejected=rejected, num_clamped=num_clamped)


def preference_loss(
    chosen_scores: torch.Tensor,
    rejected_scores: torch.Tensor,
    loss_type: str,
    beta: float,
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sequence preference loss on scores (for f-DPO, the link values).

    * ``sigmoid`` (Eq. 2.2): ``-log sigma(beta * (s_w - s_l))``
    * ``hinge``: ``relu(1 - beta * (s_w - s_l))``
    * ``robust`` (label-noise-robust DPO, flip probability ``label_smoothing``)
    * ``ipo``: ``(s_w/|y_w| - s_l/|y_l| - 1/(2 beta))^2`` on length-normalised scores, as TRL does
    * ``sigmoid_norm``: ``-log sigma(beta * (s_w/|y_w| - s_l/|y_l|))``

    ``chosen_lengths``/``rejected_lengths`` (completion token counts) are required by ``ipo`` and
    ``sigmoid_norm``.
    """
    if loss_type in ("ipo", "sigmoid_norm"):
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError(f"loss_type={loss_type!r} needs the completion lengths")
        delta = chosen_scores / chosen_lengths.clamp(min=1.0) - rejected_scores / rejected_lengths.clamp(min=1.0)
    else:
        delta = chosen_scores - rejected_scores

    if loss_type == "sigmoid" or loss_type == "sigmoid_norm":
        return -F.logsigmoid(beta * delta)
    if loss_type == "hinge":
        return torch.relu(1.0 - beta * delta)
    if loss_type == "ipo":
        return (delta - 1.0 / (2.0 * beta)) ** 2
    if loss_type == "robust":
        eps = label_smoothing
        return (-(1.0 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1.0 - 2.0 * eps)
    raise ValueError(
        f"loss_type {loss_type!r} has no f-divergence generalisation; use one of {', '.join(FDPO_LOSS_TYPES)}"
    )


def preference_ece(
    chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, beta: float, n_bins: int = 10
) -> torch.Tensor:
    """Expected calibration error of the implied preference probabilities (SPEC.md section 1).

    ``p = sigma(beta * (s_w - s_l))`` is the model's probability that the chosen completion wins. The
    predicted label is "chosen" when ``p > 0.5`` (then it is correct, since the data says chosen wins),
    and its confidence is ``max(p, 1 - p)``; ECE is ``sum_b (n_b / N) |acc_b - conf_b|`` over 10
    equal-width confidence bins on [0, 1] (Guo et al., 2017). Returns a 0-d tensor.
    """
    p = torch.sigmoid(beta * (chosen_scores - rejected_scores).detach().float()).flatten()
    if p.numel() == 0:
        return p.new_zeros(())
    correct = (p > 0.5).float()
    conf = torch.maximum(p, 1.0 - p)
    bins = torch.clamp((conf * n_bins).long(), max=n_bins - 1)
    conf_sum = torch.bincount(bins, weights=conf, minlength=n_bins)
    acc_sum = torch.bincount(bins, weights=correct, minlength=n_bins)
    return (acc_sum - conf_sum).abs().sum() / p.numel()


# ------------------------------------------------------------------------------------------------
# Multi-sample preference optimisation (thesis chapter 3, SPEC.md section 2)
# ------------------------------------------------------------------------------------------------


@dataclass
class GroupStats:
    """Per-row statistics of the per-completion scores of one side (chosen or rejected)."""

    mean: torch.Tensor  # (rows,)
    var: torch.Tensor  # (rows,) Bessel-corrected sample variance; 0 for a group of one
    count: torch.Tensor  # (rows,)


def group_stats(scores: torch.Tensor, row_index: torch.Tensor, num_rows: int) -> GroupStats:
    """Mean and Bessel-corrected variance of ``scores`` grouped by ``row_index`` (ragged groups).

    ``scores`` and ``row_index`` are flat (one entry per completion). Every row must have at least one
    completion. Differentiable in ``scores``.
    """
    count = torch.zeros(num_rows, dtype=scores.dtype, device=scores.device).index_add_(
        0, row_index, torch.ones_like(scores))
    if (count == 0).any():
        raise ValueError("every row needs at least one completion on each side")
    mean = torch.zeros(num_rows, dtype=scores.dtype, device=scores.device).index_add_(0, row_index, scores) / count
    centred = scores - mean[row_index]
    ss = torch.zeros_like(mean).index_add_(0, row_index, centred * centred)
    var = torch.where(count > 1, ss / (count - 1).clamp(min=1), torch.zeros_like(ss))
    return GroupStats(mean=mean, var=var, count=count)


def mdpo_loss(chosen: GroupStats, rejected: GroupStats, beta: float) -> torch.Tensor:
    """mDPO, per row: ``-log sigma(beta * (mean_w h - mean_l h))`` (biased, low variance)."""
    return -F.logsigmoid(beta * (chosen.mean - rejected.mean))


def mipo_loss(chosen: GroupStats, rejected: GroupStats, beta: float, unbiased: bool = True) -> torch.Tensor:
    """mIPO, per row (Proposition 1): ``(mean_w - mean_l - 1/(2 beta))^2 - s_w^2/n - s_l^2/m``.

    With ``unbiased=True`` this is an unbiased estimate of ``(E_w h - E_l h - c)^2``; it can be negative.
    A group of one contributes no variance term. ``unbiased=False`` gives the naive (biased) square.
    ``beta`` plays the role of IPO's ``tau``, as in TRL.
    """
    sq = (chosen.mean - rejected.mean - 1.0 / (2.0 * beta)) ** 2
    if not unbiased:
        return sq
    return sq - chosen.var / chosen.count - rejected.var / rejected.count
