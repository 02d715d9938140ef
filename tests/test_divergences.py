"""The f-divergence family: derivatives, limits, inverses, refusals, the perspective estimator."""

import math

import pytest
import torch

from alignkit.divergences import (
    AlphaDivergence,
    UnsupportedDivergenceError,
    get_divergence,
    safe_exp,
)

ALL = [get_divergence("reverse_kl"), get_divergence("forward_kl"), get_divergence("jsd"),
       get_divergence("alpha", 0.3), get_divergence("alpha", 0.5), get_divergence("alpha", 0.8)]
IDS = [str(d) for d in ALL]
LOGU = torch.linspace(-4.0, 4.0, 41, dtype=torch.float64)


@pytest.mark.parametrize("div", ALL, ids=IDS)
def test_f_prime_is_the_derivative_of_f(div):
    u = torch.exp(LOGU).requires_grad_(True)
    (grad,) = torch.autograd.grad(div.f(torch.log(u)).sum(), u)
    torch.testing.assert_close(div.f_prime(LOGU), grad, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("div", ALL, ids=IDS)
def test_f_is_a_valid_generator(div):
    zero = torch.zeros((), dtype=torch.float64)
    assert abs(div.f(zero).item()) < 1e-12  # f(1) = 0
    assert abs(div.g(zero).item()) < 1e-12  # g(1) = 0
    assert abs(div.link(zero).item()) < 1e-12  # link(1) = f'(1) - f'(1) = 0
    # convexity: f'' >= 0 <=> f' increasing in u
    assert (div.f_prime(LOGU).diff() > 0).all()


@pytest.mark.parametrize("div", ALL, ids=IDS)
def test_f_prime_inverse(div):
    u = torch.exp(LOGU)
    torch.testing.assert_close(div.f_prime_inverse(div.f_prime(LOGU)), u, rtol=1e-8, atol=1e-10)
    assert (div.f_prime(LOGU) < div.f_prime_sup).all()


@pytest.mark.parametrize("div", ALL, ids=IDS)
def test_perspective_is_t_f_of_one_over_t(div):
    logt = LOGU
    expected = torch.exp(logt) * div.f(-logt)
    torch.testing.assert_close(div.g(logt), expected, rtol=1e-9, atol=1e-12)


def _categorical_pair(k=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    log_p = torch.log_softmax(torch.randn(k, generator=g, dtype=torch.float64), 0)
    log_q = torch.log_softmax(torch.randn(k, generator=g, dtype=torch.float64), 0)
    return log_p, log_q


def test_alpha_limits_are_reverse_and_forward_kl():
    log_p, log_q = _categorical_pair()
    rkl, fkl = get_divergence("reverse_kl"), get_divergence("forward_kl")
    near0, near1 = AlphaDivergence(alpha=1e-6), AlphaDivergence(alpha=1 - 1e-6)
    # the links (what the losses use)
    torch.testing.assert_close(near0.link(LOGU), rkl.link(LOGU), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(near1.link(LOGU), fkl.link(LOGU), rtol=1e-4, atol=1e-4)
    # the divergences themselves (f differs from the KL generators only by c*(u - 1), which integrates to 0)
    assert near0.divergence(log_p, log_q).item() == pytest.approx(rkl.divergence(log_p, log_q).item(), rel=1e-4)
    assert near1.divergence(log_p, log_q).item() == pytest.approx(fkl.divergence(log_p, log_q).item(), rel=1e-4)
    # and they are genuinely different divergences in between
    mid = AlphaDivergence(alpha=0.5).divergence(log_p, log_q).item()
    assert abs(mid - rkl.divergence(log_p, log_q).item()) > 1e-3


def test_exact_divergences_match_textbook_formulas():
    log_p, log_q = _categorical_pair()
    p, q = log_p.exp(), log_q.exp()
    kl_pq = (p * (log_p - log_q)).sum()
    kl_qp = (q * (log_q - log_p)).sum()
    m = 0.5 * (p + q)
    # the thesis' JSD generator is 2x the usual JS divergence
    js = (p * (p / m).log()).sum() + (q * (q / m).log()).sum()
    torch.testing.assert_close(get_divergence("reverse_kl").divergence(log_p, log_q), kl_pq)
    torch.testing.assert_close(get_divergence("forward_kl").divergence(log_p, log_q), kl_qp)
    torch.testing.assert_close(get_divergence("jsd").divergence(log_p, log_q), js)


@pytest.mark.parametrize("div", ALL, ids=IDS)
def test_perspective_estimator_is_unbiased(div):
    """Monte Carlo: mean over samples y ~ pi_theta equals the exact D_f(pi_theta || pi_ref)."""
    log_p, log_q = _categorical_pair(seed=3)  # p = policy, q = reference
    exact = div.divergence(log_p, log_q).item()
    g = torch.Generator().manual_seed(0)
    n = 200_000
    y = torch.multinomial(log_p.exp(), n, replacement=True, generator=g)
    est = div.estimator(log_p[y] - log_q[y])
    assert (est >= -1e-12).all(), "the estimator is non-negative (g convex)"
    mean, se = est.mean().item(), est.std().item() / math.sqrt(n)
    assert abs(mean - exact) < 4 * se + 1e-9, (mean, exact, se)
    # the exact expectation over the categorical is the divergence to machine precision
    torch.testing.assert_close((log_p.exp() * div.estimator(log_p - log_q)).sum(), torch.tensor(exact, dtype=torch.float64))


def test_reverse_kl_estimator_is_k3():
    logr = torch.tensor([-2.0, -0.1, 0.0, 0.3, 5.0], dtype=torch.float64)
    t = torch.exp(-logr)
    torch.testing.assert_close(get_divergence("reverse_kl").estimator(logr), (t - 1) - torch.log(t))
    torch.testing.assert_close(get_divergence("forward_kl").estimator(logr), t * torch.log(t) - (t - 1))
    torch.testing.assert_close(get_divergence("jsd").estimator(logr), get_divergence("jsd").f(-logr))


@pytest.mark.parametrize("name", ["total_variation", "tv", "chi_squared", "chi2"])
def test_divergences_outside_theorem_1_are_refused(name):
    with pytest.raises(UnsupportedDivergenceError, match="Theorem 1"):
        get_divergence(name)


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.2, 1.5, True])
def test_alpha_outside_open_interval_is_refused(alpha):
    with pytest.raises(UnsupportedDivergenceError, match="strictly between 0 and 1"):
        get_divergence("alpha", alpha)


def test_unknown_divergence_suggests_closest():
    with pytest.raises(UnsupportedDivergenceError, match="forward_kl"):
        get_divergence("forwrd_kl")


def test_trl_names_are_aliases():
    assert get_divergence("js_divergence").name == "jsd"
    assert get_divergence("alpha_divergence", 0.4).alpha == 0.4


def test_safe_exp_is_exp_then_its_tangent():
    x = torch.tensor([-3.0, 0.0, 19.9, 20.0, 25.0, 1e4], dtype=torch.float64, requires_grad=True)
    y = safe_exp(x, 20.0)
    torch.testing.assert_close(y[:4], torch.exp(x[:4]))
    assert y[4].item() == pytest.approx(math.exp(20) * 6.0)
    assert torch.isfinite(y).all()
    (grad,) = torch.autograd.grad(y.sum(), x)
    assert torch.isfinite(grad).all() and (grad > 0).all()
    assert grad[5].item() == pytest.approx(math.exp(20))  # slope continues, C1 at the threshold
