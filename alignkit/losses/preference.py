"""Preference losses of f-DPO and every TRL DPO loss type, the WPO weights, LD-DPO, and calibration (ECE); thesis
chapter 2, docs/methods.md section 1."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..divergences import DEFAULT_MAX_EXPONENT, Divergence

__all__ = ['FDPO_LOSS_TYPES', 'SCORE_DIFFERENCE_LOSS_TYPES', 'LOGRATIO_LOSS_TYPES', 'FDPOScores', 'fdpo_scores',
           'preference_loss', 'logratio_loss', 'wpo_weights', 'length_desensitised_logps', 'preference_ece']

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
