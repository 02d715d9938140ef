"""mDPO / mIPO estimators (docs/methods.md section 2): group statistics and Monte Carlo checks of Proposition 1."""

import math

import pytest
import torch
import torch.nn.functional as F

from alignkit.losses import group_stats, mdpo_loss, mipo_loss

DRAWS = 20_000


def _groups(loc_w, scale_w, n, loc_l, scale_l, m, seed=0):
    """DRAWS rows, each with n chosen scores ~ N(loc_w, scale_w^2) and m rejected ~ N(loc_l, scale_l^2)."""
    g = torch.Generator().manual_seed(seed)
    zw = torch.randn(DRAWS, n, generator=g, dtype=torch.float64)
    zl = torch.randn(DRAWS, m, generator=g, dtype=torch.float64)
    hw = (loc_w + scale_w * zw).flatten()
    hl = (loc_l + scale_l * zl).flatten()
    iw = torch.arange(DRAWS).repeat_interleave(n)
    il = torch.arange(DRAWS).repeat_interleave(m)
    return group_stats(hw, iw, DRAWS), group_stats(hl, il, DRAWS)


def _within(samples, target, k=4.0):
    # k standard errors. The draws come from fixed seeds in float64, so the outcome is the same on every machine;
    # but at k=3 a different seed could fail: over seeds 0-99 the checks below reached |z| 3.22 (the fixed seeds:
    # |z| <= 2.48). At 4 the checks still tell the estimators apart: the naive one in place of the unbiased one is
    # off by 56-85 standard errors (5.4 for n=1, m=4, where only the rejected group's variance is corrected), and
    # the other way round by 51-74 (6.9); the naive scale gradient is 72 away from 0.
    mean, se = samples.mean().item(), samples.std().item() / math.sqrt(samples.numel())
    assert abs(mean - target) < k * se, f"mean {mean:.5f} vs {target:.5f} (se {se:.5f})"
    return mean, se


def test_group_stats_ragged():
    scores = torch.tensor([1.0, 3.0, 5.0, 2.0, 10.0, 20.0])
    rows = torch.tensor([0, 0, 0, 1, 2, 2])
    s = group_stats(scores, rows, 3)
    torch.testing.assert_close(s.mean, torch.tensor([3.0, 2.0, 15.0]))
    torch.testing.assert_close(s.var, torch.tensor([4.0, 0.0, 50.0]))  # Bessel; a group of one has none
    torch.testing.assert_close(s.count, torch.tensor([3.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="at least one completion"):
        group_stats(scores, rows, 4)


@pytest.mark.parametrize("n,m", [(3, 2), (5, 5), (2, 7), (1, 4), (2, 1)])
def test_mipo_estimator_is_unbiased_and_naive_bias_is_the_variance(n, m):
    mu_w, s_w, mu_l, s_l, beta = 0.7, 1.5, 0.2, 0.8, 0.5
    c = 1 / (2 * beta)
    target = (mu_w - mu_l - c) ** 2
    w, l = _groups(mu_w, s_w, n, mu_l, s_l, m, seed=1)
    # Unbiased when both groups have >= 2 samples. A group of one has no sample variance, so (as
    # documented) it gets no correction and keeps its s^2/1 bias; the other group is still corrected.
    residual_bias = (s_w**2 if n == 1 else 0.0) + (s_l**2 if m == 1 else 0.0)
    _within(mipo_loss(w, l, beta, unbiased=True) - residual_bias, target)
    # the naive square is biased by exactly Var(mean_w) + Var(mean_l) = s_w^2/n + s_l^2/m
    naive = mipo_loss(w, l, beta, unbiased=False)
    _within(naive - target, s_w**2 / n + s_l**2 / m)
    mean_bias = (naive.mean() - target).item()
    assert mean_bias > 0.5 * (s_w**2 / n + s_l**2 / m)  # and that bias is really there, not noise


def test_mipo_unbiased_pooled_over_many_seeds():
    """The same check on 40 independent batches of 20,000 draws pooled (800,000 rows): a bias of even
    1% of the target would show, and no single seed decides the outcome."""
    mu_w, s_w, mu_l, s_l, beta = 0.7, 1.5, 0.2, 0.8, 0.5
    target = (mu_w - mu_l - 1 / (2 * beta)) ** 2
    est = torch.cat([mipo_loss(*_groups(mu_w, s_w, 3, mu_l, s_l, 2, seed=100 + k), beta) for k in range(40)])
    _within(est, target)


def test_mipo_estimate_can_be_negative():
    w, l = _groups(1.0, 2.0, 2, 0.0, 2.0, 2)
    est = mipo_loss(w, l, beta=0.5)
    assert (est < 0).any()  # correct for an unbiased estimator of a square near 0, not a bug


@pytest.mark.parametrize("param", ["location", "scale"])
def test_mipo_gradient_is_unbiased(param):
    """d/dtheta of the estimator, averaged over draws, equals d/dtheta (E_w h - E_l h - c)^2."""
    n, m, beta = 3, 2, 0.5
    mu_w, s_w, mu_l, s_l = 0.4, 1.2, 0.1, 0.9
    c = 1 / (2 * beta)
    g = torch.Generator().manual_seed(1)
    zw = torch.randn(DRAWS, n, generator=g, dtype=torch.float64)
    zl = torch.randn(DRAWS, m, generator=g, dtype=torch.float64)
    theta = torch.full((DRAWS, 1), mu_w if param == "location" else s_w, dtype=torch.float64, requires_grad=True)
    hw = (theta + s_w * zw) if param == "location" else (mu_w + theta * zw)
    hl = mu_l + s_l * zl
    iw, il = torch.arange(DRAWS).repeat_interleave(n), torch.arange(DRAWS).repeat_interleave(m)
    w, l = group_stats(hw.flatten(), iw, DRAWS), group_stats(hl.flatten(), il, DRAWS)
    grads = {}
    for unbiased in (True, False):
        (grad,) = torch.autograd.grad(mipo_loss(w, l, beta, unbiased=unbiased).sum(), theta, retain_graph=True)
        grads[unbiased] = grad.flatten()
    if param == "location":
        true_grad = 2 * (mu_w - mu_l - c)
        _within(grads[True], true_grad)
    else:
        true_grad = 0.0  # the population square does not depend on the spread of h
        _within(grads[True], true_grad)
        # the naive estimator's gradient is biased by d/ds (s^2/n) = 2 s / n: it shrinks the chosen spread
        _within(grads[False], 2 * s_w / n)


def test_groups_of_one_reduce_to_dpo_and_ipo():
    hw, hl = torch.tensor([0.3, -1.0, 2.0]), torch.tensor([0.1, 0.5, -2.0])
    idx = torch.arange(3)
    w, l = group_stats(hw, idx, 3), group_stats(hl, idx, 3)
    torch.testing.assert_close(mdpo_loss(w, l, 0.1), -F.logsigmoid(0.1 * (hw - hl)))
    torch.testing.assert_close(mipo_loss(w, l, 0.1), (hw - hl - 5.0) ** 2)
