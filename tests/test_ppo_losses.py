"""PPO's pure tensor functions (alignkit.losses): values computed by hand on tiny examples, the log-ratio clamp,
and masked positions having no effect. Conventions: [batch, T] tensors, float 0/1 masks, right padding."""

import math

import pytest
import torch

from alignkit.losses import (SEQUENCE_PENALTY_NORMALIZATIONS, gae_advantages, masked_mean, masked_whiten,
                             ppo_policy_loss, ppo_value_loss, sequence_divergence_penalty)

D = torch.float64
PAD = 123.0  # an arbitrary value at masked positions


def t(rows):
    return torch.tensor(rows, dtype=D)


def close(actual, expected, tol=1e-12):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), rtol=tol, atol=tol)


# ---- masked_mean / masked_whiten -----------------------------------------------------------------


def test_masked_mean():
    # (1 + 2 + 3) / 3 = 2; the padded 123 is not counted
    close(masked_mean(t([[1.0, 2.0, 3.0, PAD]]), t([[1, 1, 1, 0]])), 2.0)
    # two rows: (1 + 2 + 4) / 3 = 7/3
    close(masked_mean(t([[1.0, 2.0], [4.0, PAD]]), t([[1, 1], [1, 0]])), 7.0 / 3.0)
    # an empty mask divides by max(0, 1): 0, not NaN
    close(masked_mean(t([[5.0, 6.0]]), t([[0, 0]])), 0.0)


def test_masked_whiten_of_1_2_3_pad():
    x, mask = t([[1.0, 2.0, 3.0, PAD]]), t([[1, 1, 1, 0]])
    # mean = 2; biased variance = ((1-2)^2 + 0^2 + (3-2)^2) / 3 = 2/3 (not 1, the Bessel-corrected one)
    s = math.sqrt(2.0 / 3.0 + 1e-8)
    out = masked_whiten(x, mask)
    close(out[:, :3], [[-1.0 / s, 0.0, 1.0 / s]])  # = -+1.2247..., i.e. -+sqrt(3/2)
    close(out[0, 0], -1.224744862, tol=1e-8)
    # shift_mean=False adds the mean 2 back after scaling
    close(masked_whiten(x, mask, shift_mean=False)[:, :3], [[2.0 - 1.0 / s, 2.0, 2.0 + 1.0 / s]])
    # masked positions are not zeroed: (123 - 2) / s (callers multiply by the mask)
    close(out[0, 3], (PAD - 2.0) / s)
    # constant input: variance 0, the 1e-8 keeps it finite: (x - m) * 1e4 = 0
    close(masked_whiten(t([[4.0, 4.0, PAD]]), t([[1, 1, 0]]))[:, :2], [[0.0, 0.0]])


# ---- GAE -------------------------------------------------------------------------------------------


def test_gae_by_hand_with_a_padded_position():
    gamma, lam = 0.9, 0.5  # gamma * lam = 0.45
    rewards = t([[0.0, 1.0, PAD],  # response of 2 tokens, then padding
                 [1.0, 0.0, 2.0]])
    values = t([[0.5, 0.2, PAD],
                [1.0, 2.0, 1.0]])
    mask = t([[1, 1, 0], [1, 1, 1]])
    adv, ret = gae_advantages(rewards, values, mask, gamma, lam)
    # row 0:  t=2 padded: A2 = 0
    #         t=1: delta = 1 + 0.9*0 - 0.2 = 0.8           (V after the last token is 0); A1 = 0.8 + 0.45*0 = 0.8
    #         t=0: delta = 0 + 0.9*0.2 - 0.5 = -0.32;     A0 = -0.32 + 0.45*0.8 = 0.04
    # row 1:  t=2: delta = 2 + 0.9*0 - 1 = 1;             A2 = 1
    #         t=1: delta = 0 + 0.9*1 - 2 = -1.1;          A1 = -1.1 + 0.45*1 = -0.65
    #         t=0: delta = 1 + 0.9*2 - 1 = 1.8;           A0 = 1.8 + 0.45*(-0.65) = 1.5075
    close(adv, [[0.04, 0.8, 0.0], [1.5075, -0.65, 1.0]])
    # returns = A + V (V = 0 at padding): [0.04+0.5, 0.8+0.2, 0], [1.5075+1, -0.65+2, 1+1]
    close(ret, [[0.54, 1.0, 0.0], [2.5075, 1.35, 2.0]])


def test_gae_special_cases_of_gamma_and_lambda():
    rewards, values, mask = t([[1.0, 0.0, 2.0]]), t([[1.0, 2.0, 1.0]]), t([[1, 1, 1]])
    # gamma = lam = 1: A_t = (sum of rewards from t on) - V_t = [3-1, 2-2, 2-1]; returns = reward-to-go
    adv, ret = gae_advantages(rewards, values, mask, 1.0, 1.0)
    close(adv, [[2.0, 0.0, 1.0]])
    close(ret, [[3.0, 2.0, 2.0]])
    # lam = 0: one-step TD error delta_t = r_t + gamma V_{t+1} - V_t with gamma = 0.5:
    # [1 + 0.5*2 - 1, 0 + 0.5*1 - 2, 2 + 0 - 1] = [1, -1.5, 1]
    adv, _ = gae_advantages(rewards, values, mask, 0.5, 0.0)
    close(adv, [[1.0, -1.5, 1.0]])


def test_gae_a_masked_position_inside_a_sequence_ends_the_trajectory():
    # (right padding never has one; documented behaviour) gamma = lam = 1, mask [1, 0, 1]:
    # t=2: delta = 2 - 1 = 1, A2 = 1;  t=1 masked: A1 = 0 (the 1 from t=2 does not flow through it);
    # t=0: delta = 1 + V_1 (= 0, masked) - 1 = 0, A0 = 0 + A1 = 0
    adv, ret = gae_advantages(t([[1.0, PAD, 2.0]]), t([[1.0, PAD, 1.0]]), t([[1, 0, 1]]), 1.0, 1.0)
    close(adv, [[0.0, 0.0, 1.0]])
    close(ret, [[1.0, 0.0, 2.0]])


# ---- policy loss -------------------------------------------------------------------------------------


def _policy_example():
    # ratios pi/pi_old per token (cliprange 0.2, so [0.8, 1.2]) and advantages:
    #   row 0: a: r=1.5, A=+2   -> max(-3.0, -2*1.2=-2.4) = -2.4   clipped term taken
    #          b: r=0.9, A=+1   -> max(-0.9, -0.9)         = -0.9   inside the range: not clipped
    #          c: r=0.5, A=+1   -> max(-0.5, -1*0.8=-0.8)  = -0.5   outside the range, unclipped term taken
    #          padding (log-ratio 50, A=100): no effect
    #   row 1: d: r=0.5, A=-1   -> max(0.5, 0.8)           = 0.8    clipped term taken
    #          e: r=1.5, A=-1   -> max(1.5, 1.2)           = 1.5    outside the range, unclipped term taken
    ratios = t([[1.5, 0.9, 0.5, 1.0], [0.5, 1.5, 1.0, 1.0]])
    old_logp = t([[-1.0, -2.0, -0.5, -3.0], [-1.5, -0.25, -2.0, -2.0]])
    logp = old_logp + ratios.log()
    logp[0, 3] = old_logp[0, 3] + 50.0
    adv = t([[2.0, 1.0, 1.0, 100.0], [-1.0, -1.0, PAD, PAD]])
    mask = t([[1, 1, 1, 0], [1, 1, 0, 0]])
    return logp.requires_grad_(), old_logp, adv, mask


def test_policy_loss_by_hand():
    logp, old_logp, adv, mask = _policy_example()
    loss, clipfrac, ratio_mean, approxkl = ppo_policy_loss(logp, old_logp, adv, mask, cliprange=0.2)
    close(loss, (-2.4 - 0.9 - 0.5 + 0.8 + 1.5) / 5)  # = -0.3
    close(clipfrac, 2 / 5)  # a and d
    close(ratio_mean, (1.5 + 0.9 + 0.5 + 0.5 + 1.5) / 5)  # = 0.98
    logs = [math.log(1.5), math.log(0.9), math.log(0.5), math.log(0.5), math.log(1.5)]
    close(approxkl, 0.5 * sum(v * v for v in logs) / 5)
    close(approxkl, 0.5 * (2 * 0.4054651081**2 + 0.1053605157**2 + 2 * 0.6931471806**2) / 5, tol=1e-9)
    assert not clipfrac.requires_grad and not ratio_mean.requires_grad and not approxkl.requires_grad
    # d loss / d logp: 0 where the clipped term is taken (a, d) and at padding; -A * ratio / 5 elsewhere:
    # b: -1*0.9/5 = -0.18, c: -1*0.5/5 = -0.1, e: +1*1.5/5 = 0.3
    (grad,) = torch.autograd.grad(loss, logp)
    close(grad, [[0.0, -0.18, -0.1, 0.0], [0.0, 0.3, 0.0, 0.0]])


def test_policy_loss_clamps_the_log_ratio():
    # one token with logp - old_logp = 1000: exp(1000) overflows (float64 too); the clamp at 20 keeps it finite
    old_logp = torch.tensor([[-5.0, -1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    for a0, expected in ((1.0, (-1.2 + -1.0) / 2),  # A>0: max(-e^20, -1.2) = -1.2; token 2: r=1, A=1: -1
                         (-1.0, (485165195.4097903 + -1.0) / 2)):  # A<0: max(e^20, 0.8) = e^20 = 4.85e8
        logp = (old_logp + torch.tensor([[1000.0, 0.0, 0.0]])).requires_grad_()
        adv = torch.tensor([[a0, 1.0, 1.0]])
        loss, clipfrac, ratio_mean, approxkl = ppo_policy_loss(logp, old_logp, adv, mask, cliprange=0.2)
        close(loss, expected, tol=1e-6)
        close(ratio_mean, (485165195.4097903 + 1.0) / 2, tol=1e-6)  # (e^20 + 1) / 2
        close(approxkl, 0.5 * (1000.0**2 + 0.0) / 2)  # = 250000, from the unclamped log-ratio
        close(clipfrac, 0.5 if a0 > 0 else 0.0)
        (grad,) = torch.autograd.grad(loss, logp)
        assert torch.isfinite(grad).all()
        # the clamped token gets no gradient; token 2 gets -A * ratio / 2 = -0.5
        close(grad, [[0.0, -0.5, 0.0]], tol=1e-6)
    # without the clamp the ratio is inf and the gradient NaN (0 * inf in exp's backward), even for A>0 where
    # the loss itself is finite: what the clamp is for
    logp = (old_logp + torch.tensor([[1000.0, 0.0, 0.0]])).requires_grad_()
    loss, *_ = ppo_policy_loss(logp, old_logp, torch.tensor([[1.0, 1.0, 1.0]]), mask, 0.2, max_log_ratio=None)
    assert torch.isfinite(loss)
    assert torch.isnan(torch.autograd.grad(loss, logp)[0]).any()


# ---- value loss ------------------------------------------------------------------------------------------


def test_value_loss_by_hand():
    # cliprange_value 0.2
    #   1: v=1,  old=0.5,   R=1.5: vclipped = 0.5 + 0.2 = 0.7; (v-R)^2 = 0.25, (vc-R)^2 = 0.64 -> 0.64, clipped
    #   2: v=1,  old=0.875, R=0:   vclipped = 0.875 + 0.125 = 1 (inside); both 1                -> 1,    not
    #   3: v=2,  old=1,     R=0:   vclipped = 1.2; (v-R)^2 = 4, (vc-R)^2 = 1.44                 -> 4,    not
    #   padding: no effect
    values = t([[1.0, 1.0, 2.0, PAD]]).requires_grad_()
    old = t([[0.5, 0.875, 1.0, -PAD]])
    ret = t([[1.5, 0.0, 0.0, 7.0]])
    mask = t([[1, 1, 1, 0]])
    loss, clipfrac = ppo_value_loss(values, old, ret, mask, cliprange_value=0.2)
    close(loss, 0.5 * (0.64 + 1.0 + 4.0) / 3)  # = 0.94
    close(clipfrac, 1 / 3)
    assert not clipfrac.requires_grad
    # d loss / dv = 0.5 * 2 (v - R) / 3 where the value moves the chosen term: 0 for 1 (clipped, vclipped is
    # constant in v), (1 - 0)/3 for 2, (2 - 0)/3 for 3, 0 at padding
    (grad,) = torch.autograd.grad(loss, values)
    close(grad, [[0.0, 1.0 / 3.0, 2.0 / 3.0, 0.0]])


# ---- sequence divergence penalty -----------------------------------------------------------------------


def test_sequence_penalty_normalisations():
    per_token = t([[0.5, 1.0, 1.5],  # response length 3
                   [2.0, PAD, PAD]])  # response length 1
    mask = t([[1, 1, 1], [1, 0, 0]])
    # sums: 0.5 + 1 + 1.5 = 3; 2
    close(sequence_divergence_penalty(per_token, mask, "sum"), [3.0, 2.0])
    # divided by length + 1: 3 / (3 + 1) = 0.75; 2 / (1 + 1) = 1
    close(sequence_divergence_penalty(per_token, mask, "length_plus_one"), [0.75, 1.0])
    assert SEQUENCE_PENALTY_NORMALIZATIONS == ("sum", "length_plus_one")
    with pytest.raises(ValueError, match="'sum', 'length_plus_one'.*'mean'"):
        sequence_divergence_penalty(per_token, mask, "mean")


# ---- masked positions have no effect ---------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_masked_positions_have_no_effect(seed):
    g = torch.Generator().manual_seed(seed)
    B, T = 4, 6
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T  # one full row, one of length 1
    lengths[1] = 1
    mask = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).to(D)
    names = ("logp", "old_logp", "adv", "values", "old_values", "returns", "rewards", "penalty")
    base = {k: torch.randn(B, T, generator=g, dtype=D) for k in names}
    base["logp"] = base["old_logp"] + 0.3 * base["logp"]
    garbage = {k: torch.where(mask.bool(), v, 1e3 * torch.randn(B, T, generator=g, dtype=D))
               for k, v in base.items()}

    def everything(x):
        logp = x["logp"].clone().requires_grad_()
        values = x["values"].clone().requires_grad_()
        pol = ppo_policy_loss(logp, x["old_logp"], x["adv"], mask, 0.2)
        val = ppo_value_loss(values, x["old_values"], x["returns"], mask, 0.2)
        (g_logp,) = torch.autograd.grad(pol[0], logp)
        (g_values,) = torch.autograd.grad(val[0], values)
        return {
            "mean": masked_mean(x["adv"], mask),
            "whiten": masked_whiten(x["adv"], mask) * mask,
            "whiten_noshift": masked_whiten(x["adv"], mask, shift_mean=False) * mask,
            "gae": torch.stack(gae_advantages(x["rewards"], x["values"], mask, 0.9, 0.5)),
            "policy": torch.stack([v.detach() for v in pol]), "g_logp": g_logp,
            "value": torch.stack([v.detach() for v in val]), "g_values": g_values,
            "sum": sequence_divergence_penalty(x["penalty"], mask, "sum"),
            "lp1": sequence_divergence_penalty(x["penalty"], mask, "length_plus_one"),
        }

    a, b = everything(base), everything(garbage)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-12, atol=1e-12, msg=k)
    assert (a["g_logp"][mask == 0] == 0).all() and (a["g_values"][mask == 0] == 0).all()
    adv, ret = a["gae"]
    assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()


def test_masked_whiten_over_processes_equals_whitening_all_the_data():
    """With `reduce` summing over "processes" (here: two halves of a batch), whitening each half gives the
    whitening of the whole batch (what N PPO processes must do to train as one)."""
    from alignkit.losses import masked_whiten

    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 8.0, 0.0], [-1.0, 5.0, 7.0], [2.0, 2.0, 9.0]])
    m = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    halves = [(x[:2], m[:2]), (x[2:], m[2:])]
    mean = (x * m).sum() / m.sum()  # 43 / 10 = 4.3

    def all_reduce_from(other):
        """What an all-reduce (sum) returns on one process: its statistic plus the other process's."""
        def reduce(t):
            if t.dim() == 1:  # [sum(x * mask), sum(mask)]
                return t + torch.stack([(other[0] * other[1]).sum(), other[1].sum()])
            return t + ((other[0] - mean) ** 2 * other[1]).sum()  # the squared deviations from the global mean
        return reduce

    for shift in (True, False):
        whole = masked_whiten(x, m, shift_mean=shift)
        parts = [masked_whiten(xi, mi, shift_mean=shift, reduce=all_reduce_from(halves[1 - i]))
                 for i, (xi, mi) in enumerate(halves)]
        torch.testing.assert_close(torch.cat(parts) * m, whole * m)
