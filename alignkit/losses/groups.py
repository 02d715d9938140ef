"""Multi-sample preference optimisation: group statistics, the mDPO and (unbiased) mIPO losses, and the split of
sampled groups by reward (thesis chapter 3, docs/methods.md section 2)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..divergences import DEFAULT_MAX_EXPONENT, Divergence
from .preference import FDPOScores, fdpo_scores


__all__ = ['GroupStats', 'group_mean', 'group_stats', 'mdpo_loss', 'mipo_loss', 'GroupLoss',
           'group_preference_loss', 'GROUPINGS', 'RewardGroups', 'split_groups_by_reward']

@dataclass
class GroupStats:
    """Per-row statistics of the per-completion scores of one side (chosen or rejected)."""

    mean: torch.Tensor  # (rows,)
    var: torch.Tensor  # (rows,) Bessel-corrected sample variance; 0 for a group of one
    count: torch.Tensor  # (rows,)


def group_mean(values: torch.Tensor, row_index: torch.Tensor, num_rows: int,
               count: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``values`` per row (``row_index`` gives each value's row)."""
    if count is None:
        count = torch.zeros(num_rows, dtype=values.dtype, device=values.device).index_add_(
            0, row_index, torch.ones_like(values))
    return torch.zeros(num_rows, dtype=values.dtype, device=values.device).index_add_(0, row_index, values) / count


def group_stats(scores: torch.Tensor, row_index: torch.Tensor, num_rows: int) -> GroupStats:
    """Mean and Bessel-corrected variance of ``scores`` grouped by ``row_index`` (ragged groups).

    ``scores`` and ``row_index`` are flat (one entry per completion). Every row must have at least one
    completion. Differentiable in ``scores``.
    """
    count = torch.zeros(num_rows, dtype=scores.dtype, device=scores.device).index_add_(
        0, row_index, torch.ones_like(scores))
    if (count == 0).any():
        raise ValueError("every row needs at least one completion on each side")
    mean = group_mean(scores, row_index, num_rows, count)
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


@dataclass
class GroupLoss:
    """mDPO / mIPO of a batch of group rows, and what it was computed from."""

    per_row: torch.Tensor  # (rows,) the loss of each row
    scores: FDPOScores  # per-completion link values h (not length-normalised)
    chosen: GroupStats  # statistics of the scores the loss used (length-normalised for ipo)
    rejected: GroupStats


def group_preference_loss(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    chosen_row_index: torch.Tensor,
    rejected_row_index: torch.Tensor,
    num_rows: int,
    divergence: Divergence,
    loss_type: str,
    beta: float,
    unbiased: bool = True,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    max_exponent: float | None = DEFAULT_MAX_EXPONENT,
) -> GroupLoss:
    """mDPO (``loss_type="sigmoid"``) or mIPO (``"ipo"``) per row from the sequence log-ratios ``log pi/pi_ref`` of
    ragged groups (docs/methods.md section 2): each completion's score is the link ``f'(u) - f'(1)`` of
    ``divergence``, divided by its length for ``ipo`` (``chosen_lengths``/``rejected_lengths``, token counts, as
    TRL's IPO), then :func:`mdpo_loss` / :func:`mipo_loss` on the group statistics. ``*_row_index`` give each
    completion's row (every row needs at least one completion on each side)."""
    if loss_type not in ("sigmoid", "ipo"):
        raise ValueError(f"group losses are 'sigmoid' (mDPO) or 'ipo' (mIPO), got {loss_type!r}")
    s = fdpo_scores(chosen_logratios, rejected_logratios, divergence, max_exponent)
    h_c, h_r = s.chosen, s.rejected
    if loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("loss_type='ipo' needs the completion lengths")
        h_c, h_r = h_c / chosen_lengths.clamp(min=1.0), h_r / rejected_lengths.clamp(min=1.0)
    w, l = group_stats(h_c, chosen_row_index, num_rows), group_stats(h_r, rejected_row_index, num_rows)
    per_row = mdpo_loss(w, l, beta) if loss_type == "sigmoid" else mipo_loss(w, l, beta, unbiased=unbiased)
    return GroupLoss(per_row=per_row, scores=s, chosen=w, rejected=l)


#: the accepted values of ``split_groups_by_reward(..., grouping=...)``
GROUPINGS = ("top_bottom", "above_below_mean")


@dataclass
class RewardGroups:
    """Chosen and rejected sub-groups of each prompt's sampled completions."""

    chosen: torch.Tensor  # (prompts, G) bool; all False on a skipped prompt
    rejected: torch.Tensor  # (prompts, G) bool; all False on a skipped prompt
    kept: torch.Tensor  # (prompts,) bool: False where the rewards did not spread


def split_groups_by_reward(
    rewards: torch.Tensor,
    grouping: str,
    num_chosen: int = 1,
    num_rejected: int = 1,
    min_spread: float = 0.0,
) -> RewardGroups:
    """Split each row of ``rewards`` (prompts, G), the rewards of a prompt's G sampled completions, into a chosen
    and a rejected sub-group (for online mDPO / mIPO, docs/methods.md section 2).

    * ``top_bottom``: the ``num_chosen`` highest rewards are chosen, the ``num_rejected`` lowest rejected
      (``num_chosen + num_rejected <= G``; ties are broken by position, first sample first). When the rewards are
      not all equal, the chosen mean is strictly above the rejected mean; a reward tied across the boundary can put
      equally good completions on both sides.
    * ``above_below_mean``: rewards strictly above the prompt's mean reward are chosen, strictly below rejected;
      completions at the mean are left out. The sizes vary from prompt to prompt.

    A prompt is kept when its rewards spread: ``max - min > min_spread`` (and, for ``above_below_mean``, both sides
    are non-empty). Skipped prompts have no chosen and no rejected completion. No gradient.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be (prompts, generations), got shape {tuple(rewards.shape)}")
    g = rewards.size(1)
    rewards = rewards.detach()
    spread = rewards.max(1).values - rewards.min(1).values
    kept = spread > min_spread
    if grouping == "top_bottom":
        if num_chosen < 1 or num_rejected < 1 or num_chosen + num_rejected > g:
            raise ValueError(f"top_bottom needs num_chosen >= 1, num_rejected >= 1 and num_chosen + num_rejected <= "
                             f"{g} (the generations per prompt), got {num_chosen} and {num_rejected}")
        order = torch.sort(rewards, dim=1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(g, device=rewards.device).expand_as(order))
        chosen, rejected = rank < num_chosen, rank >= g - num_rejected
    elif grouping == "above_below_mean":
        mean = rewards.mean(1, keepdim=True)
        chosen, rejected = rewards > mean, rewards < mean
        kept = kept & chosen.any(1) & rejected.any(1)
    else:
        raise ValueError(f"grouping must be one of {', '.join(GROUPINGS)}, got {grouping!r}")
    keep = kept.unsqueeze(1)
    return RewardGroups(chosen=chosen & keep, rejected=rejected & keep, kept=kept)
