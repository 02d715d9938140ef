"""MMD^2 (docs/methods.md section 3): unbiasedness, the Gaussian closed form, symmetry, gradients, bins."""

import math

import pytest
import torch

from alignkit.losses import binned_mmd_penalty, mmd2_unbiased


def _gauss_mmd2(mu1, s1, mu2, s2, sigma):
    """Closed form of MMD^2 between N(mu1, s1^2) and N(mu2, s2^2) for k = exp(-(a-b)^2 / (2 sigma^2))."""
    def e(mean_diff, var):
        return math.sqrt(sigma**2 / (sigma**2 + var)) * math.exp(-mean_diff**2 / (2 * (sigma**2 + var)))
    return e(0, 2 * s1**2) + e(0, 2 * s2**2) - 2 * e(mu1 - mu2, s1**2 + s2**2)


def _draws(reps, n, mu, s, seed):
    g = torch.Generator().manual_seed(seed)
    return mu + s * torch.randn(reps, n, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("same", [True, False])
def test_unbiased_against_closed_form(same):
    reps, n, m, sigma = 4000, 6, 5, 1.0
    mu2, s2 = (0.0, 1.0) if same else (0.8, 1.5)
    x, y = _draws(reps, n, 0.0, 1.0, 0), _draws(reps, m, mu2, s2, 1)
    est = torch.stack([mmd2_unbiased(x[i], y[i], bandwidths=[sigma]) for i in range(reps)])
    target = _gauss_mmd2(0.0, 1.0, mu2, s2, sigma)
    se = est.std().item() / math.sqrt(reps)
    assert abs(est.mean().item() - target) < 3 * se, (est.mean().item(), target, se)
    if same:
        assert target == 0.0
    else:
        assert target > 10 * se  # the test could tell the two cases apart


def test_symmetric_and_multi_bandwidth():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(7, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64) + 1
    torch.testing.assert_close(mmd2_unbiased(x, y, [0.5, 2.0]), mmd2_unbiased(y, x, [0.5, 2.0]))
    torch.testing.assert_close(mmd2_unbiased(x, y, [0.5, 2.0]), mmd2_unbiased(x, y, [0.5]) + mmd2_unbiased(x, y, [2.0]))
    torch.testing.assert_close(mmd2_unbiased(x, y), mmd2_unbiased(y, x))  # median heuristic too
    with pytest.raises(ValueError, match="at least two samples"):
        mmd2_unbiased(x[:1], y)


def test_gradient_matches_finite_differences():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(5, generator=g, dtype=torch.float64) + 0.5
    assert torch.autograd.gradcheck(lambda a: mmd2_unbiased(a, y, [0.7, 1.3]), (x,))
    v = torch.randn(12, generator=g, dtype=torch.float64, requires_grad=True)
    bins = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3, 0, 1, 2])
    assert torch.autograd.gradcheck(lambda a: binned_mmd_penalty(a, bins, [1.0]).penalty, (v,))


def test_binned_penalty_is_the_sum_over_bin_pairs():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(20, generator=g, dtype=torch.float64)
    bins = torch.tensor([0] * 6 + [1] * 5 + [2] * 8 + [3])  # bin 3 has one example: skipped
    out = binned_mmd_penalty(v, bins, [1.0])
    parts = [v[bins == b] for b in range(3)]
    expected = sum(mmd2_unbiased(parts[a], parts[b], [1.0]) for a in range(3) for b in range(a + 1, 3))
    torch.testing.assert_close(out.penalty, expected)
    assert (out.bins_used, out.bins_skipped, out.pairs) == (3, 1, 3)


def test_conditional_penalty_sums_within_label_groups():
    g = torch.Generator().manual_seed(1)
    v = torch.randn(24, generator=g, dtype=torch.float64)
    bins = torch.arange(24) % 3
    label = (torch.arange(24) < 12).long()
    out = binned_mmd_penalty(v, bins, [1.0], groups=label)
    expected = binned_mmd_penalty(v[:12], bins[:12], [1.0]).penalty + binned_mmd_penalty(v[12:], bins[12:], [1.0]).penalty
    torch.testing.assert_close(out.penalty, expected)
    assert out.pairs == 6


def test_penalty_is_zero_with_fewer_than_two_usable_bins():
    v = torch.randn(5, requires_grad=True)
    out = binned_mmd_penalty(v, torch.tensor([0, 0, 0, 1, 2]), [1.0])
    assert out.penalty.item() == 0.0 and out.bins_skipped == 2 and out.pairs == 0
    out.penalty.backward()  # still part of the graph, so a batch without signal does not break backward


# --- the penalty cannot be lowered by shrinking every reward towards a constant (issue 16, item 2) ---------------

def _shrunk(v: torch.Tensor, c: float) -> torch.Tensor:
    """Every value moved towards the batch mean: c = 1 leaves them, c -> 0 collapses them to a constant."""
    return v.mean() + c * (v - v.mean())


def _scale_derivative(v: torch.Tensor, bins: torch.Tensor, **kw) -> float:
    """d/dc penalty(mean + c (v - mean)) at c = 1, taken through the gradient the optimiser sees: positive means a
    gradient step lowers the penalty by shrinking the rewards (the collapse pays)."""
    v = v.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(binned_mmd_penalty(v, bins, **kw).penalty, v)
    return float((grad * (v - v.mean())).sum().detach())


def _biased_batch(seed=0):
    """Rewards that follow the bin (a learnt shortcut): bin 1 three within-bin deviations above bin 0."""
    g = torch.Generator().manual_seed(seed)
    bins = torch.arange(32) % 2
    return 0.5 * torch.randn(32, generator=g, dtype=torch.float64) + 1.5 * bins, bins


@pytest.mark.parametrize("conditional", [False, True])
def test_standardised_penalty_does_not_fall_when_rewards_shrink(conditional):
    v, bins = _biased_batch()
    groups = (torch.arange(32) < 16).long() if conditional else None
    values = [binned_mmd_penalty(_shrunk(v, c), bins, groups=groups, standardize=True).penalty.item()
              for c in (1.0, 0.3, 0.1, 0.01)]
    assert values[0] > 0.05  # a real dependence on the bin, not a vanishing penalty
    assert max(values) - min(values) < 1e-9 * values[0]
    # and the optimiser sees no gain in shrinking either: no gradient along the scale direction (to rounding)
    grad_along_scale = _scale_derivative(v, bins, groups=groups, standardize=True)
    assert abs(grad_along_scale) < 1e-9


def test_the_median_heuristic_alone_rewards_shrinking():
    """Why the plain median heuristic collapsed rewards: its value is scale-free, but the bandwidth carries no gradient,
    so every step sees a fixed-bandwidth penalty that shrinking the rewards lowers (and that gradient grows like
    1/scale as they shrink). A fixed bandwidth is lowered by shrinking outright."""
    v, bins = _biased_batch()
    # seeds 0-5 of this batch: the derivative is 0.36-0.56 of the penalty itself, always positive
    assert _scale_derivative(v, bins) > 0.2 * binned_mmd_penalty(v, bins).penalty.item()
    # the derivative per unit of log-scale is the same at every scale: per unit of reward it grows like 1/scale
    torch.testing.assert_close(_scale_derivative(_shrunk(v, 0.1), bins), _scale_derivative(v, bins))
    fixed = [binned_mmd_penalty(_shrunk(v, c), bins, [1.0]).penalty.item() for c in (1.0, 0.1)]
    assert fixed[1] < 0.05 * fixed[0]


def test_standardised_penalty_is_the_penalty_of_standardised_values():
    v, bins = _biased_batch(1)
    z = (v - v.mean()) / v.std(unbiased=False)
    for bw in (None, [0.5, 2.0]):
        torch.testing.assert_close(binned_mmd_penalty(v, bins, bw, standardize=True).penalty,
                                   binned_mmd_penalty(z, bins, bw).penalty)
    v2 = v.reshape(16, 2)  # vectors (mmd_on: hidden): scaled by the RMS distance to the batch mean
    z2 = (v2 - v2.mean(0)) / (v2 - v2.mean(0)).pow(2).sum(1).mean().sqrt()
    torch.testing.assert_close(binned_mmd_penalty(v2, bins[:16], [1.0], standardize=True).penalty,
                               binned_mmd_penalty(z2, bins[:16], [1.0]).penalty)


def test_standardised_penalty_of_constant_rewards_is_zero_and_finite():
    v = torch.full((8,), 3.0, requires_grad=True)
    out = binned_mmd_penalty(v, torch.arange(8) % 2, standardize=True)
    out.penalty.backward()
    assert out.penalty.item() == 0.0 and torch.isfinite(v.grad).all()


def _v_statistic(x, y, bw):
    """||mean phi(x) - mean phi(y)||^2 with the RBF kernel: every k(x_i, x_j) kept, diagonal included (by hand)."""
    def k(a, b):
        return math.exp(-(a - b) ** 2 / (2 * bw * bw))
    mean = lambda u, v: sum(k(a, b) for a in u for b in v) / (len(u) * len(v))  # noqa: E731
    return mean(x, x) + mean(y, y) - 2 * mean(x, y)


def test_biased_estimator_is_the_v_statistic_and_never_negative():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        values = torch.randn(12, generator=g, dtype=torch.float64)
        bins = torch.randint(0, 5, (12,), generator=g)
        out = binned_mmd_penalty(values, bins, bandwidths=[1.0], unbiased=False)
        kept = [b for b in torch.unique(bins).tolist() if int((bins == b).sum()) >= 2]
        groups = [[float(v) for v in values[bins == b]] for b in kept]
        by_hand = sum(_v_statistic(groups[i], groups[j], 1.0) for i in range(len(kept)) for j in range(i + 1, len(kept)))
        assert out.penalty.item() == pytest.approx(by_hand, abs=1e-12)
        assert out.penalty.item() >= -1e-12


def test_unbiased_sum_over_small_bins_is_lowered_by_spreading_each_bin():
    """Two examples a bin, every bin {-1, +1}: identical bins, yet each bin pair's U-statistic is
    2 k(-1, 1) - (1 + k(-1, 1)) = k(-1, 1) - 1 < 0, so the sum over many such bins is far below zero (what training
    exploited on 60 demographic bins, docs/results.md); the V-statistic of the same batch is exactly zero."""
    n_bins = 30
    values = torch.tensor([-1.0, 1.0] * n_bins, dtype=torch.float64)
    bins = torch.arange(n_bins).repeat_interleave(2)
    s = math.exp(-4 / 2)
    unbiased = binned_mmd_penalty(values, bins, bandwidths=[1.0])
    assert unbiased.penalty.item() == pytest.approx(unbiased.pairs * (s - 1), rel=1e-9)
    assert unbiased.penalty.item() < -200
    assert binned_mmd_penalty(values, bins, bandwidths=[1.0], unbiased=False).penalty.item() == pytest.approx(0, abs=1e-12)


def test_mmd_estimator_is_checked():
    from alignkit import CausalRewardConfig

    with pytest.raises(ValueError, match="mmd_estimator must be 'unbiased' or 'biased'"):
        CausalRewardConfig(output_dir="/tmp/x", mmd_coef=1.0, attributes=["length"], mmd_estimator="v")
