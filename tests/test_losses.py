"""Pure loss functions: numerical safety, hand-computed values, calibration error."""

import pytest
import torch
import torch.nn.functional as F

from alignkit.divergences import get_divergence
from alignkit.losses import fdpo_scores, preference_ece, preference_loss

DIVS = ["reverse_kl", "forward_kl", "jsd", ("alpha", 0.3), ("alpha", 0.7)]


def _div(spec):
    return get_divergence(*spec) if isinstance(spec, tuple) else get_divergence(spec)


@pytest.mark.parametrize("spec", DIVS, ids=str)
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "robust", "sigmoid_norm"])
def test_extreme_log_ratios_give_finite_loss_and_gradients(spec, loss_type):
    div = _div(spec)
    chosen = torch.tensor([-1e4, 1e4, -50.0, 3.0, 0.0], requires_grad=True)
    rejected = torch.tensor([1e4, -1e4, 50.0, -1e4, -1e4], requires_grad=True)
    s = fdpo_scores(chosen, rejected, div)
    lengths = torch.tensor([5.0, 7.0, 3.0, 9.0, 1.0])
    loss = preference_loss(s.chosen, s.rejected, loss_type, beta=0.1, label_smoothing=0.1,
                           chosen_lengths=lengths, rejected_lengths=lengths).mean()
    assert torch.isfinite(loss)
    gc, gr = torch.autograd.grad(loss, (chosen, rejected))
    assert torch.isfinite(gc).all() and torch.isfinite(gr).all()
    if loss_type in ("sigmoid", "sigmoid_norm", "robust") and div.name != "jsd":
        # the gradient still pushes the badly placed chosen completion up (descent direction)
        assert gc[0] < 0


def test_forward_kl_counts_clamped_values():
    div = get_divergence("forward_kl")
    s = fdpo_scores(torch.tensor([-1e4, 0.0, -25.0]), torch.tensor([1.0, -19.0, 2.0]), div, max_exponent=20.0)
    assert s.num_clamped.item() == 2  # -1e4 and -25 exceed the exponent 20; -19 does not
    s = fdpo_scores(torch.tensor([-1e4]), torch.tensor([0.0]), get_divergence("jsd"))
    assert s.num_clamped.item() == 0  # bounded link, nothing to clamp


def test_links_are_exact_below_the_threshold():
    logr = torch.linspace(-19.0, 19.0, 39, dtype=torch.float64)
    div = get_divergence("forward_kl")
    torch.testing.assert_close(div.link(logr), 1 - torch.exp(-logr))
    div = get_divergence("alpha", 0.5)
    torch.testing.assert_close(div.link(logr), (1 - torch.exp(-0.5 * logr)) / 0.5)


def test_preference_losses_match_hand_formulas():
    sw, sl = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 1.0])
    lw, ll = torch.tensor([4.0, 2.0]), torch.tensor([1.0, 5.0])
    b = 0.5
    d = sw - sl
    torch.testing.assert_close(preference_loss(sw, sl, "sigmoid", b), -F.logsigmoid(b * d))
    torch.testing.assert_close(preference_loss(sw, sl, "hinge", b), torch.relu(1 - b * d))
    dn = sw / lw - sl / ll
    torch.testing.assert_close(preference_loss(sw, sl, "ipo", b, chosen_lengths=lw, rejected_lengths=ll),
                               (dn - 1 / (2 * b)) ** 2)
    eps = 0.2
    expected = (-(1 - eps) * F.logsigmoid(b * d) + eps * F.logsigmoid(-b * d)) / (1 - 2 * eps)
    torch.testing.assert_close(preference_loss(sw, sl, "robust", b, label_smoothing=eps), expected)
    with pytest.raises(ValueError, match="no f-divergence generalisation"):
        preference_loss(sw, sl, "bco_pair", b)


def test_ece_on_fixed_probabilities():
    # p = sigma(logit); confidence max(p, 1-p); correct iff p > 0.5
    p = torch.tensor([0.95, 0.92, 0.75, 0.3, 0.62, 0.5])
    logits = torch.log(p / (1 - p))
    # bins (width 0.1) of confidence: 0.95,0.92 -> [0.9,1): acc 1, conf .935; 0.75 -> [0.7,.8): acc 1, conf .75;
    # 0.3 -> conf 0.7 -> [0.7,0.8): acc 0 ; 0.62 -> [0.6,0.7): acc 1 conf .62; 0.5 -> [0.5,0.6): acc 0 conf .5
    expected = (2 * abs(1 - 0.935) + abs((1 + 0) - (0.75 + 0.7)) + abs(1 - 0.62) + abs(0 - 0.5)) / 6
    got = preference_ece(logits, torch.zeros_like(logits), beta=1.0).item()
    assert got == pytest.approx(expected, abs=1e-6)


def test_ece_of_a_perfectly_calibrated_predictor_is_small():
    g = torch.Generator().manual_seed(0)
    # predicted probabilities p, and the label "chosen wins" drawn with probability p: swap when it loses
    p = torch.rand(200_000, generator=g)
    wins = torch.rand(200_000, generator=g) < p
    logit = torch.log(p / (1 - p))
    logit = torch.where(wins, logit, -logit)  # from the data's point of view chosen is always the winner
    assert preference_ece(logit, torch.zeros_like(logit), beta=1.0).item() < 0.01
    # and an overconfident one is not
    assert preference_ece(3 * logit, torch.zeros_like(logit), beta=1.0).item() > 0.1
