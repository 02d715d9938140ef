"""Group data helpers: building groups from pairs and from scored generations; the built-in tasks."""

import pytest

from alignkit.data.groups import groups_from_pairs, groups_from_scored, validate_group_dataset
from alignkit.data.synthetic import random_numbers, sentiment_groups
from alignkit.data.validation import DatasetError


def test_groups_from_pairs_share_a_prompt():
    pairs = [
        {"prompt": "p1", "chosen": "a", "rejected": "x"},
        {"prompt": "p2", "chosen": "b", "rejected": "y"},
        {"prompt": "p1", "chosen": "c", "rejected": "x"},
        {"prompt": "p1", "chosen": "a", "rejected": "z"},
    ]
    ds = groups_from_pairs(pairs)
    assert ds.to_list() == [
        {"prompt": "p1", "chosen": ["a", "c"], "rejected": ["x", "z"]},
        {"prompt": "p2", "chosen": ["b"], "rejected": ["y"]},
    ]
    assert groups_from_pairs(pairs, dedupe=False)[0]["rejected"] == ["x", "x", "z"]
    validate_group_dataset(ds)


def test_groups_from_scored_by_source_and_by_score():
    samples = [
        {"prompt": "p", "completion": "s1", "source": "strong", "score": 0.9},
        {"prompt": "p", "completion": "w1", "source": "weak", "score": 0.2},
        {"prompt": "p", "completion": "s2", "source": "strong", "score": 0.7},
        {"prompt": "p", "completion": "w2", "source": "weak", "score": 0.4},
        {"prompt": "q", "completion": "s3", "source": "strong", "score": 0.5},  # no weak sample: skipped
    ]
    by_source = groups_from_scored(samples, chosen="strong", rejected="weak")
    assert by_source.to_list() == [{"prompt": "p", "chosen": ["s1", "s2"], "rejected": ["w1", "w2"]}]
    by_score = groups_from_scored(samples[:4], k=1)
    assert by_score.to_list() == [{"prompt": "p", "chosen": ["s1"], "rejected": ["w1"]}]
    with pytest.raises(DatasetError, match="no prompt has both"):
        groups_from_scored(samples[4:], chosen="strong", rejected="weak")


def test_random_numbers_task():
    train, test = random_numbers("train", num_samples=50), random_numbers("test", num_samples=50)
    validate_group_dataset(train)
    for row in train:
        a, b = row["low"], row["high"]
        assert 5 <= b - a <= 10
        assert len(set(row["chosen"])) == len(row["chosen"]) == 4  # distinct, uniform draws
        assert all(a <= int(x) <= b for x in row["chosen"] + row["rejected"])
        assert str(a) in row["prompt"] and str(b) in row["prompt"]
    assert all(not (5 <= r["high"] - r["low"] <= 10) for r in test)  # held-out intervals
    # the rejected groups are biased: far fewer distinct numbers than the chosen groups
    distinct = lambda side: sum(len(set(r[side])) for r in train) / len(train)  # noqa: E731
    assert distinct("rejected") < 0.75 * distinct("chosen")


def test_sentiment_groups_sizes_vary_by_row():
    ds = sentiment_groups(num_samples=6, n_chosen=[1, 2, 3], n_rejected=[3, 1])
    assert [len(r["chosen"]) for r in ds] == [1, 2, 3, 1, 2, 3]
    assert [len(r["rejected"]) for r in ds] == [3, 1, 3, 1, 3, 1]
    conv = sentiment_groups(num_samples=2, conversational=True)
    validate_group_dataset(conv)


def test_random_numbers_tokenise_the_same_joined_or_apart():
    """SFT tokenises prompt + completion as one string, DPO each part alone; a prompt ending in a space
    made those differ under BPE (" 37" is one token, " " + "37" three), so a model trained one way
    answered nothing when prompted the other."""
    from transformers import AutoTokenizer

    from alignkit.models import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("builtin:tiny-llama"))
    for row in random_numbers("train", num_samples=20):
        for c in row["chosen"] + row["rejected"]:
            joined = tok(row["prompt"] + c, add_special_tokens=False)["input_ids"]
            apart = tok(row["prompt"], add_special_tokens=False)["input_ids"] + tok(c, add_special_tokens=False)["input_ids"]
            assert joined == apart, (row["prompt"], c)
