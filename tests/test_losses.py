"""Pure loss functions: numerical safety, hand-computed values, calibration error."""

import math

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


# ---- the TRL loss types and options added for drop-in use (hand-computed values) -----------------------------

def test_length_desensitised_logps_by_hand():
    from alignkit.losses import length_desensitised_logps

    chosen = torch.tensor([[0.0, -1.0, -2.0, -3.0]])  # prompt token, then a 3-token completion
    rejected = torch.tensor([[0.0, -4.0, -5.0, 0.0]])  # prompt token, a 2-token completion, padding
    c_mask, r_mask = torch.tensor([[0, 1, 1, 1]]), torch.tensor([[0, 1, 1, 0]])
    c, r = length_desensitised_logps(chosen, rejected, c_mask, r_mask, ld_alpha=0.5)
    assert c.item() == pytest.approx(-1 - 2 + 0.5 * -3) and r.item() == pytest.approx(-9.0)
    c1, _ = length_desensitised_logps(chosen, rejected, c_mask, r_mask, ld_alpha=1.0)
    assert c1.item() == pytest.approx(-6.0)  # ld_alpha 1 is the plain sum


def test_wpo_weight_by_hand():
    from alignkit.losses import wpo_weights

    logps = torch.tensor([[-1.0, -2.0, 0.0]])
    log_sum_sq = torch.tensor([[-0.5, -0.5, 0.0]])
    w = wpo_weights(logps, log_sum_sq, torch.tensor([[1, 1, 0]]))
    assert w.item() == pytest.approx(math.exp(((-1 + 0.5) + (-2 + 0.5)) / 2))


def test_exo_pair_is_the_kl_to_the_smoothed_label():
    z, eps = 0.7, 0.01
    q = torch.sigmoid(torch.tensor(z)).item()
    kl = q * math.log(q / (1 - eps)) + (1 - q) * math.log((1 - q) / eps)
    value = preference_loss(torch.tensor([z]), torch.tensor([0.0]), "exo_pair", beta=1.0, label_smoothing=eps)
    assert value.item() == pytest.approx(kl, rel=1e-6)


def test_discopop_blends_logistic_and_exponential():
    z = torch.tensor([-3.0, 3.0])
    value = preference_loss(z, torch.zeros(2), "discopop", beta=1.0, discopop_tau=1e-3)
    # a tiny tau makes the mix a step: logistic for z < 0, exponential for z > 0
    assert value.tolist() == pytest.approx([-math.log(torch.sigmoid(torch.tensor(-3.0)).item()), math.exp(-3.0)])


def test_logratio_losses_by_hand():
    from alignkit.losses import logratio_loss

    cw, rw = torch.tensor([-1.0]), torch.tensor([-3.0])  # policy log-probs
    cref, rref = torch.tensor([-1.5]), torch.tensor([-2.0])  # reference: log-ratios +0.5 and -1.0
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    beta = 2.0
    expected = {
        "bco_pair": -math.log(sig(1.0)) - math.log(sig(2.0)),
        "nca_pair": -math.log(sig(1.0)) - 0.5 * math.log(sig(-1.0)) - 0.5 * math.log(sig(2.0)),
        "sppo_hard": (0.5 - 0.25) ** 2 + (-1.0 + 0.25) ** 2,
        "apo_zero": 1 - sig(1.0) + sig(-2.0),
        "apo_down": sig(1.0) + 1 - sig(3.0),
        "aot": -math.log(sig(beta * ((-1 + 3) - (-1.5 + 2)))),  # one pair: sorting changes nothing
        "aot_unpaired": -math.log(sig(beta * 1.5)),
    }
    for loss_type, value in expected.items():
        assert logratio_loss(cw, rw, cref, rref, loss_type, beta).item() == pytest.approx(value, rel=1e-6), loss_type


def test_ece_ignores_non_finite_pairs():
    """A NaN batch (a diverged fp16 run) must not crash logging: non-finite pairs are left out of the ECE."""
    scores = torch.tensor([2.0, float("nan"), -1.0, float("inf")])
    expected = preference_ece(torch.tensor([2.0, -1.0]), torch.zeros(2), beta=1.0)
    assert preference_ece(scores, torch.zeros(4), beta=1.0).item() == pytest.approx(expected.item())
    assert preference_ece(torch.tensor([float("nan")]), torch.zeros(1), beta=1.0).item() == 0.0
