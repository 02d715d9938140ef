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
