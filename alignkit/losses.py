"""Pure tensor functions for the alignkit losses. No models, no TRL: each is testable in milliseconds.

The trainers call these; the math lives only here and in :mod:`alignkit.divergences`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .divergences import DEFAULT_MAX_EXPONENT, Divergence

__all__ = [
    "FDPO_LOSS_TYPES",
    "SCORE_DIFFERENCE_LOSS_TYPES",
    "LOGRATIO_LOSS_TYPES",
    "FDPOScores",
    "fdpo_scores",
    "preference_loss",
    "logratio_loss",
    "wpo_weights",
    "length_desensitised_logps",
    "preference_ece",
    "SEQUENCE_PENALTY_NORMALIZATIONS",
    "masked_mean",
    "masked_whiten",
    "gae_advantages",
    "ppo_policy_loss",
    "ppo_value_loss",
    "sequence_divergence_penalty",
    "GroupStats",
    "group_mean",
    "group_stats",
    "mdpo_loss",
    "mipo_loss",
    "GroupLoss",
    "group_preference_loss",
    "GROUPINGS",
    "RewardGroups",
    "split_groups_by_reward",
]

#: TRL loss types that depend on the policy only through the chosen-minus-rejected difference of the
#: per-sequence scores. Theorem 1 fixes the implicit reward only up to a per-prompt constant, which cancels in
#: that difference and nowhere else, so these (and only these) compose with any f-divergence link.
SCORE_DIFFERENCE_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "robust", "discopop", "sigmoid_norm")
#: kept for code written against earlier alignkit versions
FDPO_LOSS_TYPES = SCORE_DIFFERENCE_LOSS_TYPES
#: TRL loss types that read the chosen and rejected log-ratios one by one (or sorted over the batch). Under
#: reverse KL they are TRL's losses; under another divergence the link value of one sequence carries the unknown
#: per-prompt constant, so they have no f-divergence form.
LOGRATIO_LOSS_TYPES = ("nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down")


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


def _smoothed_sigmoid_loss(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """``-(1 - e) log sigma(z) - e log sigma(-z)``: the logistic loss against a label that is flipped with
    probability ``e``."""
    return -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def preference_loss(
    chosen_scores: torch.Tensor,
    rejected_scores: torch.Tensor,
    loss_type: str,
    beta: float,
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    discopop_tau: float = 0.05,
) -> torch.Tensor:
    """Per-sequence preference loss on scores (for f-DPO, the link values); ``z = beta * (s_w - s_l)``.

    * ``sigmoid`` (Eq. 2.2): ``-log sigma(z)``
    * ``hinge``: ``relu(1 - z)``
    * ``robust`` (label-noise-robust DPO, flip probability ``e = label_smoothing``):
      ``(-(1 - e) log sigma(z) + e log sigma(-z)) / (1 - 2e)``
    * ``exo_pair`` (EXO, arXiv 2402.00856): ``KL(q || p)`` between the model's preference ``q = (sigma(z),
      sigma(-z))`` and the smoothed label ``p = (1 - e, e)``; needs ``e > 0``
    * ``discopop`` (arXiv 2406.08414): ``(1 - m) (-log sigma(z)) + m exp(-z)`` with ``m = sigma(z / tau)``
    * ``ipo``: ``(s_w/|y_w| - s_l/|y_l| - 1/(2 beta))^2`` on length-normalised scores, as TRL does
    * ``sigmoid_norm``: ``-log sigma(beta * (s_w/|y_w| - s_l/|y_l|))``

    ``chosen_lengths``/``rejected_lengths`` (completion token counts) are required by ``ipo`` and
    ``sigmoid_norm``. The losses on individual log-ratios are in :func:`logratio_loss`.
    """
    if loss_type in ("ipo", "sigmoid_norm"):
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError(f"loss_type={loss_type!r} needs the completion lengths")
        delta = chosen_scores / chosen_lengths.clamp(min=1.0) - rejected_scores / rejected_lengths.clamp(min=1.0)
    else:
        delta = chosen_scores - rejected_scores

    z = beta * delta
    if loss_type == "sigmoid" or loss_type == "sigmoid_norm":
        return -F.logsigmoid(z)
    if loss_type == "hinge":
        return torch.relu(1.0 - z)
    if loss_type == "ipo":
        return (delta - 1.0 / (2.0 * beta)) ** 2
    if loss_type == "robust":
        eps = label_smoothing
        return (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)
    if loss_type == "exo_pair":
        if not 0.0 < label_smoothing < 1.0:
            raise ValueError("loss_type='exo_pair' needs 0 < label_smoothing < 1 (the EXO paper uses 1e-3)")
        log_p_w, log_p_l = math.log1p(-label_smoothing), math.log(label_smoothing)
        return torch.sigmoid(z) * (F.logsigmoid(z) - log_p_w) + torch.sigmoid(-z) * (F.logsigmoid(-z) - log_p_l)
    if loss_type == "discopop":
        mix = torch.sigmoid(z / discopop_tau)
        return (1.0 - mix) * -F.logsigmoid(z) + mix * torch.exp(-z)
    raise ValueError(
        f"loss_type {loss_type!r} has no f-divergence generalisation; use one of {', '.join(SCORE_DIFFERENCE_LOSS_TYPES)}"
    )


def logratio_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    loss_type: str,
    beta: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Per-pair losses of plain DPO (reverse KL) that read each log-ratio ``r = log pi/pi_ref`` on its own.

    With ``r_w``, ``r_l`` the chosen and rejected log-ratios and ``sigma`` the logistic function:

    * ``nca_pair`` (NCA, arXiv 2402.05369): ``-log sigma(beta r_w) - 1/2 log sigma(-beta r_w) - 1/2 log sigma(-beta r_l)``
    * ``bco_pair`` (BCO): ``-log sigma(beta r_w) - log sigma(-beta r_l)``
    * ``sppo_hard`` (SPPO with hard win probabilities, arXiv 2405.00675): ``(r_w - 1/(2 beta))^2 + (r_l + 1/(2 beta))^2``
    * ``aot`` (AOT, arXiv 2406.05882): the smoothed logistic loss of ``beta * (sort(log pi_w - log pi_l) -
      sort(log ref_w - log ref_l))``, each sorted over the batch
    * ``aot_unpaired``: the same on ``beta * (sort(r_w) - sort(r_l))``
    * ``apo_zero`` (APO, arXiv 2408.06266, Eq. 7): ``1 - sigma(beta r_w) + sigma(beta r_l)``
    * ``apo_down`` (APO, Eq. 8): ``sigma(beta r_w) + 1 - sigma(beta (r_w - r_l))``
    """
    chosen_lr = chosen_logps - ref_chosen_logps
    rejected_lr = rejected_logps - ref_rejected_logps
    if loss_type == "nca_pair":
        return -F.logsigmoid(beta * chosen_lr) - 0.5 * F.logsigmoid(-beta * chosen_lr) - 0.5 * F.logsigmoid(-beta * rejected_lr)
    if loss_type == "bco_pair":
        return -F.logsigmoid(beta * chosen_lr) - F.logsigmoid(-beta * rejected_lr)
    if loss_type == "sppo_hard":
        half_margin = 0.5 / beta
        return (chosen_lr - half_margin) ** 2 + (rejected_lr + half_margin) ** 2
    if loss_type == "aot":
        policy_margin = torch.sort(chosen_logps - rejected_logps, dim=0).values
        reference_margin = torch.sort(ref_chosen_logps - ref_rejected_logps, dim=0).values
        return _smoothed_sigmoid_loss(beta * (policy_margin - reference_margin), label_smoothing)
    if loss_type == "aot_unpaired":
        delta = torch.sort(chosen_lr, dim=0).values - torch.sort(rejected_lr, dim=0).values
        return _smoothed_sigmoid_loss(beta * delta, label_smoothing)
    if loss_type == "apo_zero":
        return 1.0 - torch.sigmoid(beta * chosen_lr) + torch.sigmoid(beta * rejected_lr)
    if loss_type == "apo_down":
        return torch.sigmoid(beta * chosen_lr) + 1.0 - torch.sigmoid(beta * (chosen_lr - rejected_lr))
    raise ValueError(f"loss_type {loss_type!r} is not one of {', '.join(LOGRATIO_LOSS_TYPES)}")


def wpo_weights(
    per_token_logps: torch.Tensor, log_sum_sq_probs: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """WPO's per-sequence weight (arXiv 2406.11827, Eq. 2), without gradient.

    ``exp`` of the mean over completion tokens of ``log p(y_t) - log sum_v p(v)^2``: the probability of the
    sequence under the current policy, per token, relative to how peaked each next-token distribution is.
    ``per_token_logps``, ``log_sum_sq_probs`` and ``mask`` are ``[sequences, tokens]``. The pair's weight is the
    product of its chosen and rejected sequences' weights.
    """
    with torch.no_grad():
        mask = mask.to(per_token_logps.dtype)
        aligned = ((per_token_logps - log_sum_sq_probs) * mask).sum(dim=1)
        return torch.exp(aligned / mask.sum(dim=1).clamp_min(1))


def length_desensitised_logps(
    chosen_token_logps: torch.Tensor,
    rejected_token_logps: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_mask: torch.Tensor,
    ld_alpha: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LD-DPO's sequence log-probs (arXiv 2409.06411): in each pair, the tokens up to the shorter completion's
    length count fully, the longer completion's tail is weighted by ``ld_alpha`` (1: plain sum, 0: cut)."""
    pos_c, pos_r = chosen_mask.cumsum(dim=1), rejected_mask.cumsum(dim=1)
    shared = torch.minimum(chosen_mask.sum(dim=1), rejected_mask.sum(dim=1)).unsqueeze(1)

    def weighted(logps, pos):
        head = (pos > 0) & (pos <= shared)
        return (logps * head).sum(dim=1) + ld_alpha * (logps * (pos > shared)).sum(dim=1)

    return weighted(chosen_token_logps, pos_c), weighted(rejected_token_logps, pos_r)


def preference_ece(
    chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, beta: float, n_bins: int = 10
) -> torch.Tensor:
    """Expected calibration error of the implied preference probabilities (docs/methods.md section 1).

    ``p = sigma(beta * (s_w - s_l))`` is the model's probability that the chosen completion wins. The
    predicted label is "chosen" when ``p > 0.5`` (then it is correct, since the data says chosen wins),
    and its confidence is ``max(p, 1 - p)``; ECE is ``sum_b (n_b / N) |acc_b - conf_b|`` over 10
    equal-width confidence bins on [0, 1] (Guo et al., 2017). Pairs with a non-finite score difference are
    left out. Returns a 0-d tensor.
    """
    logits = (beta * (chosen_scores - rejected_scores).detach().float()).flatten()
    p = torch.sigmoid(logits[torch.isfinite(logits)])  # a diverged (NaN) pair has no confidence: left out
    if p.numel() == 0:
        return p.new_zeros(())
    correct = (p > 0.5).float()
    conf = torch.maximum(p, 1.0 - p)
    bins = torch.clamp((conf * n_bins).long(), max=n_bins - 1)
    conf_sum = torch.bincount(bins, weights=conf, minlength=n_bins)
    acc_sum = torch.bincount(bins, weights=correct, minlength=n_bins)
    return (acc_sum - conf_sum).abs().sum() / p.numel()


# ------------------------------------------------------------------------------------------------
# Multi-sample preference optimisation (thesis chapter 3, docs/methods.md section 2)
# ------------------------------------------------------------------------------------------------


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


# ------------------------------------------------------------------------------------------------
# MMD penalties for causal reward models (thesis chapter 4, docs/methods.md section 3)
# ------------------------------------------------------------------------------------------------


def rbf_kernel(x: torch.Tensor, y: torch.Tensor, bandwidths) -> torch.Tensor:
    """``sum_s exp(-||x_i - y_j||^2 / (2 s^2))`` for each bandwidth ``s``; ``x`` (n[, d]), ``y`` (m[, d])."""
    x = x.reshape(x.size(0), -1)
    y = y.reshape(y.size(0), -1)
    d2 = (x.unsqueeze(1) - y.unsqueeze(0)).pow(2).sum(-1)
    bw = torch.as_tensor(bandwidths, dtype=d2.dtype, device=d2.device).reshape(-1, 1, 1)
    return torch.exp(-d2.unsqueeze(0) / (2.0 * bw * bw)).sum(0)


def median_bandwidth(x: torch.Tensor) -> torch.Tensor:
    """Median heuristic: the median pairwise distance of the pooled sample (no gradient through it)."""
    with torch.no_grad():
        flat = x.reshape(x.size(0), -1)
        d = torch.cdist(flat, flat)
        off = d[~torch.eye(d.size(0), dtype=torch.bool, device=d.device)]
        med = off.median() if off.numel() else d.new_tensor(1.0)
        return torch.where(med > 0, med, med.new_tensor(1.0))


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor, bandwidths=None) -> torch.Tensor:
    """Unbiased U-statistic estimate of MMD^2 between samples ``x`` (n >= 2) and ``y`` (m >= 2).

    Kernel: a sum of RBF kernels over ``bandwidths`` (default: the median heuristic on the pooled
    sample). Can be slightly negative, as any unbiased estimate of a non-negative quantity.
    """
    n, m = x.size(0), y.size(0)
    if n < 2 or m < 2:
        raise ValueError(f"MMD^2 needs at least two samples on each side, got {n} and {m}")
    if bandwidths is None:
        bandwidths = median_bandwidth(torch.cat([x.reshape(n, -1), y.reshape(m, -1)]))
    kxx, kyy, kxy = rbf_kernel(x, x, bandwidths), rbf_kernel(y, y, bandwidths), rbf_kernel(x, y, bandwidths)
    sxx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    syy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return sxx + syy - 2.0 * kxy.mean()


@dataclass
class BinnedMMD:
    """Sum of MMD^2 over all pairs of bins present in a batch, and what was skipped."""

    penalty: torch.Tensor  # 0-d
    bins_used: int
    bins_skipped: int  # bins present with fewer than two examples
    pairs: int


def standardize_values(values: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``values`` (N[, d]) centred on their mean and divided by their RMS distance to it (for scalars: the population
    standard deviation), with the gradient flowing through the scale. Constant values give zeros."""
    centred = values - values.mean(0, keepdim=True)
    scale = centred.reshape(values.size(0), -1).pow(2).sum(-1).mean().clamp_min(eps * eps).sqrt()
    return centred / scale


def binned_mmd_penalty(values: torch.Tensor, bins: torch.Tensor, bandwidths=None,
                       groups: torch.Tensor | None = None, standardize: bool = False,
                       unbiased: bool = True) -> BinnedMMD:
    """``sum_{m < m'} MMD^2(P_m, P_m')`` of ``values`` (N[, d]) grouped by integer ``bins`` (N,).

    Bins with fewer than two examples are skipped (counted in ``bins_skipped``). With ``groups``
    (e.g. 1 for chosen, 0 for rejected) the penalty is computed within each group separately and
    summed: the *conditional* form, which regularises ``r`` independent of ``Z`` given the label.
    One kernel matrix is built for the whole batch; every bin pair's MMD^2 comes from its block sums.

    ``standardize``: the values are first standardised over the whole batch (:func:`standardize_values`,
    gradient included), and ``bandwidths`` are in units of that scale. The penalty is then unchanged, value
    and gradient, when every value is moved towards a constant: shrinking the reward cannot lower it
    (docs/methods.md section 3). Without it, the median-heuristic bandwidth (which carries no gradient)
    gives a penalty whose gradient points towards shrinking the values, with a size that grows as 1/scale.

    ``unbiased``: each bin pair's MMD^2 is the unbiased U-statistic (the within-bin means leave out ``k(x, x)``).
    It can be negative, and with two or three examples a bin it is most negative when the examples *inside* each
    bin are far apart: summed over many small bins, a penalty that training can drive far below zero by
    spreading the rewards of each bin at random. ``False`` uses the biased V-statistic, the squared RKHS distance
    between the bins' empirical kernel means: never negative, zero exactly when every bin has the same empirical
    distribution (docs/methods.md section 3).
    """
    if standardize:
        values = standardize_values(values)
    if groups is not None:
        total, used, skipped, pairs = values.new_zeros(()), 0, 0, 0
        for g in torch.unique(groups):
            sel = groups == g
            part = binned_mmd_penalty(values[sel], bins[sel], bandwidths, unbiased=unbiased)
            total = total + part.penalty
            used, skipped, pairs = used + part.bins_used, skipped + part.bins_skipped, pairs + part.pairs
        return BinnedMMD(total, used, skipped, pairs)
    uniq, inverse, counts = torch.unique(bins, return_inverse=True, return_counts=True)
    keep = counts >= 2
    skipped = int((~keep).sum())
    if int(keep.sum()) < 2:
        return BinnedMMD(values.new_zeros(()) * values.sum(), int(keep.sum()), skipped, 0)
    rows = keep[inverse]
    v, idx = values[rows], inverse[rows]
    _, idx = torch.unique(idx, return_inverse=True)  # renumber the kept bins 0..B-1
    n_bins = int(idx.max()) + 1
    if bandwidths is None:
        bandwidths = median_bandwidth(v)
    k = rbf_kernel(v, v, bandwidths)
    onehot = F.one_hot(idx, n_bins).to(k.dtype)  # (N, B)
    block = onehot.t() @ k @ onehot  # S[a, b] = sum_{i in a, j in b} k_ij
    diag = onehot.t() @ k.diagonal()  # sum_{i in a} k_ii
    n = onehot.sum(0)
    if unbiased:
        within = (block.diagonal() - diag) / (n * (n - 1))  # mean off-diagonal kernel inside a bin
    else:
        within = block.diagonal() / (n * n)  # mean kernel inside a bin, k(x, x) included
    cross = block / (n.unsqueeze(1) * n.unsqueeze(0))
    mmd = within.unsqueeze(1) + within.unsqueeze(0) - 2.0 * cross  # (B, B)
    upper = torch.triu(torch.ones_like(mmd, dtype=torch.bool), diagonal=1)
    return BinnedMMD(mmd[upper].sum(), n_bins, skipped, int(upper.sum()))


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
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


# ------------------------------------------------------------------------------------------------
# PPO (thesis 2.6.1, docs/methods.md section 1): the math of alignkit.trainers.ppo as tensor functions
# ------------------------------------------------------------------------------------------------
#
# Conventions (those of PPOTrainer): per-token tensors are [batch, T] over the response tokens; ``mask`` is
# float 0/1 of the same shape, 1 on response tokens, right-padded (a contiguous run of ones from position 0).
# Masking multiplies by the mask, so any finite value at a masked position has no effect.

#: the accepted values of ``sequence_divergence_penalty(..., normalization=...)``
SEQUENCE_PENALTY_NORMALIZATIONS = ("sum", "length_plus_one")


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``sum(x * mask) / max(sum(mask), 1)`` over all elements: a 0-d tensor (0 when the mask is empty)."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, reduce=None) -> torch.Tensor:
    """``(x - m) / sqrt(v + 1e-8)``, with ``m`` the masked mean and ``v = masked_mean((x - m)^2)`` the biased
    (divide by the number of tokens) masked variance. With ``shift_mean=False`` the mean is added back:
    ``(x - m) / sqrt(v + 1e-8) + m`` (the scale changes, the mean stays; used for rewards).

    Masked positions are not zeroed in the output (the caller multiplies by the mask where needed).
    Advantage normalisation is an implementation practice of PPO codes (Schulman et al. 2017, arXiv 1707.06347,
    and their baselines), not part of the objective.

    ``reduce`` (a function summing a tensor over processes, e.g. ``accelerator.reduce(t, "sum")``) takes the mean
    and variance over the tokens of every process, so that N processes whiten as one process with all the data.
    """
    if reduce is None:
        mean = masked_mean(x, mask)
        var = masked_mean((x - mean) ** 2, mask)
    else:
        total, count = reduce(torch.stack([(x * mask).sum(), mask.sum()])).unbind()
        mean = total / count.clamp(min=1)
        var = reduce(((x - mean) ** 2 * mask).sum()) / count.clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return out if shift_mean else out + mean


def gae_advantages(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, "High-Dimensional Continuous Control Using
    Generalized Advantage Estimation", arXiv 1506.02438, Eq. 16), per token.

    With ``r`` and ``V`` the per-token rewards and values multiplied by ``mask`` (so masked positions count as
    reward 0, value 0), and ``V_T = 0`` past the last column::

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = (delta_t + gamma * lam * A_{t+1}) * mask_t        (A_T = 0)
        returns = A + V

    The value after a sequence's last response token is therefore 0 (the episode ends there), and nothing flows
    back from padding: advantages and returns are 0 at masked positions. A masked position inside a sequence
    would end the trajectory there as well. Advantages are not whitened (see :func:`masked_whiten`).
    Returns ``(advantages, returns)``, both ``[batch, T]``.
    """
    rewards = rewards * mask
    values = values * mask
    T = rewards.size(1)
    gae = torch.zeros_like(rewards[:, 0])
    reversed_advantages = []
    for t in reversed(range(T)):
        next_v = values[:, t + 1] if t + 1 < T else torch.zeros_like(gae)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        gae = (delta + gamma * lam * gae) * mask[:, t]
        reversed_advantages.append(gae)
    advantages = torch.stack(reversed_advantages[::-1], dim=1)
    return advantages, advantages + values


def ppo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
    max_log_ratio: float | None = 20.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate objective (Schulman et al. 2017, "Proximal Policy Optimization Algorithms",
    arXiv 1707.06347, Eq. 7), as a per-token loss to minimise.

    With ``d = (logp - old_logp) * mask`` and ``c = cliprange``::

        ratio = exp(clamp(d, -max_log_ratio, max_log_ratio))
        pg    = max(-A * ratio, -A * clamp(ratio, 1 - c, 1 + c))
        loss  = masked_mean(pg)

    The clamp of the log-ratio (``max_log_ratio=None`` turns it off) keeps one bad token from overflowing the
    ratio (``exp(d)`` is ``inf`` in float32 from ``d ~ 89``, and then the gradient is NaN even where the clipped
    term is taken). It only acts where ``|d| > max_log_ratio`` (a ratio beyond ``e^20 ~ 4.9e8`` by default), far
    outside any clip range; such a token gets no gradient through its ratio (the clamp's derivative is 0).

    Also returned, without gradient (0-d tensors):

    * ``clipfrac``: masked mean of ``(-A * clamp(ratio, 1 - c, 1 + c) > -A * ratio)``, the fraction of tokens
      where the clipped term is the one taken (and strictly larger);
    * ``ratio_mean``: masked mean of ``ratio`` (after the clamp);
    * ``approxkl``: ``0.5 * masked_mean((logp - old_logp)^2)``, the quadratic approximation of
      ``KL(old || new)`` logged by OpenAI's and TRL's PPO (from the unclamped log-ratio).

    Returns ``(loss, clipfrac, ratio_mean, approxkl)``.
    """
    logratio = (logp - old_logp) * mask
    if max_log_ratio is not None:
        logratio = logratio.clamp(-max_log_ratio, max_log_ratio)
    ratio = torch.exp(logratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).to(loss.dtype), mask)
        ratio_mean = masked_mean(ratio, mask)
        approxkl = 0.5 * masked_mean((logp - old_logp) ** 2, mask)
    return loss, clipfrac, ratio_mean, approxkl


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss of PPO implementations (OpenAI baselines' ``ppo2``, TRL's PPO; the PPO paper,
    Schulman et al. 2017, arXiv 1707.06347, Eq. 9, has the unclipped squared error ``(V - R)^2``)::

        vclipped = old_values + clamp(values - old_values, -c, c)
        loss     = 0.5 * masked_mean(max((values - R)^2, (vclipped - R)^2))

    Also returned, without gradient: ``clipfrac = masked_mean((vclipped - R)^2 > (values - R)^2)``.
    Returns ``(loss, clipfrac)``.
    """
    vclipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    unclipped_sq = (values - returns) ** 2
    clipped_sq = (vclipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_sq, clipped_sq), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped_sq > unclipped_sq).to(loss.dtype), mask)
    return loss, clipfrac


def sequence_divergence_penalty(
    per_token_penalty: torch.Tensor, mask: torch.Tensor, normalization: str
) -> torch.Tensor:
    """Per-sequence divergence penalty ``[batch]`` from per-token estimates ``[batch, T]`` (e.g. the unbiased
    estimator ``g(t) - g'(1)(t - 1)`` of docs/methods.md section 1, or ``k1``/``k3`` for reverse KL).

    * ``"sum"``: ``sum_t penalty_t * mask_t``, the sequence estimate of ``D_f`` (what PPOTrainer's loss
      placement uses today);
    * ``"length_plus_one"``: that sum divided by ``sum_t mask_t + 1`` (the response length plus one), the
      normalisation of the thesis' own code.
    """
    if normalization not in SEQUENCE_PENALTY_NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {', '.join(map(repr, SEQUENCE_PENALTY_NORMALIZATIONS))}, "
                         f"got {normalization!r}")
    total = (per_token_penalty * mask).sum(dim=1)
    if normalization == "sum":
        return total
    return total / (mask.sum(dim=1) + 1.0)
