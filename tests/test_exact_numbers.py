"""Exact random-number scores (alignkit.metrics.numbers) against a hand computation on the tiny model."""

import json
import math

import pytest
import torch

from alignkit.metrics.numbers import NumberVocabulary, exact_uniformity, integer_probabilities


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignkit.models import resolve_model_path

    path = resolve_model_path("builtin:tiny-llama")
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_every_spelling_of_an_answer_is_found(tiny):
    """The tiny tokenizer writes " 57" three ways (a whole token, "Ġ5"+"7", and space + digits): all are found,
    each needing a non-digit after it, and nothing else."""
    _, tok = tiny
    vocab = NumberVocabulary.of(tok)
    found = {tuple(tok.convert_ids_to_tokens(list(ids))): term for ids, term in vocab.spellings(" 57")}
    assert found == {("Ġ57",): True, ("Ġ5", "7"): True, ("Ġ", "5", "7"): True}
    assert {tuple(tok.convert_ids_to_tokens(list(ids))) for ids, _ in vocab.spellings("57")} == {("5", "7")}


def test_probabilities_equal_a_hand_computation_with_one_forward_per_spelling(tiny):
    """P(answer = n) from the trie pass equals the sum, over the spellings listed by hand, of the product of the
    next-token probabilities from separate plain forward passes, times P(the next token is no digit)."""
    model, tok = tiny
    prompt = tok("Give me a random integer between 55 and 58. Answer:", add_special_tokens=False)["input_ids"]
    vocab = NumberVocabulary.of(tok)
    ids = tok.convert_tokens_to_ids
    # the spellings of 56 and 57, written out by hand from the tokenizer's vocabulary (it has "Ġ56", "Ġ57", "Ġ5",
    # "Ġ", "Ċ" and single digits, no "ĠĊ" or "ĊĊ"), for the leads "", " ", "\n", " \n" and "\n\n"
    hand = {n: [[f"Ġ{n}"], ["Ġ5", d], ["Ġ", "5", d], ["5", d], ["Ċ", "5", d], ["Ġ", "Ċ", "5", d], ["Ċ", "Ċ", "5", d]]
            for n, d in ((56, "6"), (57, "7"))}
    assert {"ĠĊ", "ĊĊ"}.isdisjoint(tok.get_vocab())
    digit = torch.tensor([(tok.convert_tokens_to_string([t])[:1]).isdigit() for t in tok.convert_ids_to_tokens(
        list(range(len(tok))))])

    def by_hand(pieces):
        seq = ids(pieces)
        with torch.no_grad():
            logp = model(input_ids=torch.tensor([prompt + seq])).logits[0].double().log_softmax(-1)
        lp = sum(logp[len(prompt) - 1 + d, seq[d]].item() for d in range(len(seq)))
        stop = torch.logsumexp(logp[-1, : len(tok)][~digit], 0).item()
        return math.exp(lp + stop)

    probs = integer_probabilities(model, tok, prompt, 55, 58, vocab)
    for n, spellings in hand.items():
        assert probs[n - 55].item() == pytest.approx(sum(by_hand(s) for s in spellings), rel=1e-9)
    # float64 log-softmax of float32 logits: the two computations differ in the order of float32 sums only
    assert 0 < probs.sum().item() < 1


def test_exact_uniformity_by_hand():
    p = torch.tensor([0.2, 0.1, 0.1], dtype=torch.float64)  # 40% of the mass in range, low the mode
    out = exact_uniformity(p)
    q = [0.5, 0.25, 0.25]
    h = -sum(x * math.log(x) for x in q)
    assert out["in_range_mass"] == pytest.approx(0.4)
    assert out["normalized_entropy"] == pytest.approx(h / math.log(3))
    assert out["kl_to_uniform"] == pytest.approx(math.log(3) - h)
    assert out["low_is_mode"] == 1.0
    assert exact_uniformity(torch.tensor([0.1, 0.1, 0.1]))["normalized_entropy"] == pytest.approx(1.0)


def test_eval_exact_reports_the_exact_scores(tmp_path):
    from alignkit.cli import main

    out = tmp_path / "ev"
    assert main(["eval", "builtin:tiny-llama", "--prompts", "builtin:random_numbers", "--num-prompts", "2", "-k", "2",
                 "--max-new-tokens", "2", "--exact", "--output", str(out)]) == 0
    exact = json.loads((out / "report.json").read_text())["random_numbers_exact"]
    assert set(exact) == {"in_range_mass", "normalized_entropy", "kl_to_uniform", "low_is_mode"}
    assert 0 < exact["in_range_mass"] < 1 and 0 < exact["normalized_entropy"] <= 1
