"""Evaluation metrics against hand-computed values."""

import math

import pytest
import torch

from alignkit import metrics as M


def test_distinct_n_on_fixed_strings():
    texts = ["the cat sat", "the cat ran"]
    # unigrams: the, cat, sat, the, cat, ran -> 4 unique of 6; bigrams: (the cat) x2, (cat sat), (cat ran) -> 3 of 4
    assert M.distinct_n(texts, 1) == pytest.approx(4 / 6)
    assert M.distinct_n(texts, 2) == pytest.approx(3 / 4)
    assert M.distinct_n(["One two", "one TWO"], 1) == pytest.approx(2 / 4)  # lower-cased
    assert M.distinct_n(["a"], 2) == 0.0


def test_bleu_and_self_bleu_on_fixed_strings():
    # identical sentences: every precision 1, no brevity penalty
    assert M.bleu("the cat sat on the mat", ["the cat sat on the mat"]) == pytest.approx(1.0)
    # hyp "the cat sat" vs ref "the cat ran": p1 = 2/3, p2 = 1/2, p3 = 0 -> smoothed 0.1/1; same length, BP = 1
    expected = math.exp((math.log(2 / 3) + math.log(1 / 2) + math.log(0.1)) / 3)
    assert M.bleu("the cat sat", ["the cat ran"]) == pytest.approx(expected)
    # brevity penalty: hyp of 3 words, closest reference 6 words -> exp(1 - 6/3)
    assert M.bleu("the cat sat", ["the cat sat on the mat"]) == pytest.approx(math.exp(1 - 2))
    # self-BLEU of two samples: each scored against the other; symmetric here
    assert M.self_bleu(["the cat sat", "the cat ran"]) == pytest.approx(expected)
    assert M.self_bleu(["a b c", "a b c", "a b c"]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="k >= 2"):
        M.self_bleu(["only one"])


def test_ece_on_fixed_probabilities():
    # logits -> p = sigma(logit); confidence max(p, 1 - p); correct when p > 0.5
    logits = torch.tensor([2.0, 2.0, -1.0, 0.5])
    p = torch.sigmoid(logits)
    conf = torch.maximum(p, 1 - p)
    correct = (p > 0.5).float()
    # bins of width 0.1: 0.881 (x2) in [0.8, 0.9), 0.731 in [0.7, 0.8), 0.622 in [0.6, 0.7)
    by_hand = (2 * abs(conf[0] - 1) + abs(conf[2] - 0) + abs(conf[3] - 1)) / 4
    assert M.preference_ece(logits, torch.zeros(4), beta=1.0).item() == pytest.approx(by_hand.item(), abs=1e-6)
    assert correct.tolist() == [1, 1, 0, 1]


def test_simpson_diversity():
    assert M.simpson_diversity(["a", "a", "b", "c"]) == pytest.approx(1 - (0.5 ** 2 + 0.25 ** 2 + 0.25 ** 2))
    assert M.simpson_diversity(["x"] * 5) == 0.0


def test_bias_at_c_on_a_fixed_confusion_table():
    # label 1: with concept 3/4 correct, without 1/2 -> Delta_1 = 0.25
    # label 0: with concept 1/2 correct, without 2/2 -> Delta_0 = -0.5; Bias@C = (0.25 + 0.5) * 100 = 75
    rows = ([(1, 1, 1)] * 3 + [(0, 1, 1)] + [(1, 0, 1), (0, 0, 1)] +
            [(1, 1, 0), (0, 1, 0)] + [(1, 0, 0)] * 2)
    correct, concept, label = zip(*rows)
    assert M.bias_at_c(correct, concept, label) == pytest.approx(75.0)
    with pytest.raises(ValueError, match="without the concept for label 0"):
        M.bias_at_c([1, 1], [1, 1], [0, 1])


def test_number_uniformity_and_win_rate():
    u = M.number_uniformity([1, 2, 3, 4], 1, 4)
    assert u["entropy"] == pytest.approx(math.log(4)) and u["kl_to_uniform"] == pytest.approx(0.0)
    skewed = M.number_uniformity([7, 7, 7, 3, None, 99], 0, 9)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert skewed["entropy"] == pytest.approx(h) and skewed["kl_to_uniform"] == pytest.approx(math.log(10) - h)
    assert skewed["invalid_fraction"] == pytest.approx(2 / 6)
    assert M.win_rate_score([3, 1, 2, 5], [1, 1, 4, 2]) == pytest.approx(50 + (2 - 1) / 4 * 100)
    assert [M.first_integer(t) for t in (" 37", "it is 5, not 6", "-3.", "none")] == [37, 5, -3, None]


def test_divergence_estimates_and_entropy():
    # two categoricals: samples from pi, log-ratios log pi - log ref; the estimates average to the exact D_f
    pi, ref = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64), torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    logr = pi.log() - ref.log()
    # exact expectation under pi, by weighting each outcome by pi instead of sampling
    from alignkit.divergences import get_divergence

    for name, alpha in M.DIVERGENCES:
        d = get_divergence(name, alpha)
        exact = d.divergence(pi.log().double(), ref.log().double()).item()
        weighted = (pi.double() * d.estimator(logr.double())).sum().item()
        assert weighted == pytest.approx(exact, rel=1e-9), name
    est = M.divergence_estimates(torch.zeros(5))
    assert set(est) == {"reverse_kl", "forward_kl", "jsd", "alpha_0.5"} and all(v == 0 for v in est.values())
    uniform = torch.zeros(1, 2, 4)
    assert M.predictive_entropy(uniform, torch.ones(1, 2)) == pytest.approx(math.log(4))
