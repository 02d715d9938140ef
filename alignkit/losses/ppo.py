"""PPO (thesis 2.6.1, docs/methods.md section 1): the math of alignkit.trainers.ppo as tensor functions.

Conventions (those of PPOTrainer): per-token tensors are [batch, T] over the response tokens; ``mask`` is
float 0/1 of the same shape, 1 on response tokens, right-padded (a contiguous run of ones from position 0).
Masking multiplies by the mask, so any finite value at a masked position has no effect.
"""

from __future__ import annotations

import torch

__all__ = ['SEQUENCE_PENALTY_NORMALIZATIONS', 'masked_mean', 'masked_whiten', 'gae_advantages', 'ppo_policy_loss',
           'ppo_value_loss', 'sequence_divergence_penalty']

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
