"""Theorem 1 in a test.

A tiny Llama answers one fixed prompt with one of K single-token responses. It is trained on the
*population* f-DPO loss of Bradley-Terry preferences with known rewards r: every ordered pair (i, j)
weighted by P(i > j) = sigma(r_i - r_j). At the minimiser sigma(beta*(f'_i - f'_j)) = sigma(r_i - r_j)
for every pair, i.e. beta * f'(pi/pi_ref) - r is the same constant for all K responses.

Tolerance: 300 Adam steps reach a residual spread (max - min over the K responses) of about 1e-6 for
every divergence (float32 log-ratios carry ~1e-7 relative error). 1e-4 is 0.005% of the spread of r
(2.0), and a wrong link misses by far more: the reverse-KL link applied to the forward-KL, JSD and
alpha optima leaves spreads of 0.87, 0.55 and 0.41 (asserted > 0.1 below).
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

from alignkit.divergences import get_divergence
from alignkit.losses import fdpo_scores, preference_loss

REWARDS = torch.tensor([1.0, 0.4, 0.0, -0.3, -1.0])
BETA = 0.5
TOL = 1e-4


def _train_to_optimum(model_path, tokenizer, div, steps=300):
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    prompt = tokenizer("Give your opinion of the movie.", return_tensors="pt").input_ids
    tokens = torch.arange(100, 100 + len(REWARDS))  # the K responses: single tokens
    with torch.no_grad():
        ref_logp = torch.log_softmax(ref(prompt).logits[0, -1], -1)[tokens]
    k = len(REWARDS)
    i, j = torch.meshgrid(torch.arange(k), torch.arange(k), indexing="ij")
    off = i != j
    i, j = i[off], j[off]
    weight = torch.sigmoid(REWARDS[i] - REWARDS[j])  # population of BT preferences: i preferred to j
    opt = torch.optim.Adam(policy.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)

    def population_loss():
        logp = torch.log_softmax(policy(prompt).logits[0, -1], -1)[tokens]
        logr = logp - ref_logp
        s = fdpo_scores(logr[i], logr[j], div)
        return (weight * preference_loss(s.chosen, s.rejected, "sigmoid", BETA)).sum() / weight.sum(), logr

    for _ in range(steps):
        opt.zero_grad()
        loss, _ = population_loss()
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        _, logr = population_loss()
    return logr.double()


@pytest.mark.parametrize("spec", ["reverse_kl", "forward_kl", "jsd", ("alpha", 0.3)], ids=str)
def test_population_minimiser_satisfies_theorem_1(spec, tiny_model_path, tokenizer):
    div = get_divergence(*spec) if isinstance(spec, tuple) else get_divergence(spec)
    logr = _train_to_optimum(tiny_model_path, tokenizer, div)
    residual = BETA * div.f_prime(logr) - REWARDS.double()
    spread = (residual.max() - residual.min()).item()
    assert spread < TOL, f"{div}: beta*f'(pi/pi_ref) - r = {residual.tolist()}"
    # The policy moved in the order of the rewards...
    assert (logr.diff() < 0).all(), logr.tolist()
    if div.name != "reverse_kl":
        # ...and by the amounts this divergence implies, not reverse KL's (a wrong link fails the check).
        wrong = BETA * get_divergence("reverse_kl").f_prime(logr) - REWARDS.double()
        assert (wrong.max() - wrong.min()).item() > 0.1
