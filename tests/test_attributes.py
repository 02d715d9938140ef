"""Spurious attributes: extractors, binning (quantile, equal-width, categorical, joint), persistence, errors."""

import pytest
import torch

from alignkit.data.attributes import AttributeBinner, AttributeSpec, extract_attribute
from alignkit.data.validation import DatasetError


def test_quantile_bins_are_balanced_and_equal_width_bins_are_even():
    vals = [float(v) for v in range(100)]
    q = AttributeBinner([AttributeSpec("len", n_bins=4)]).fit([vals])
    ids = q.transform([vals])
    assert torch.bincount(ids).tolist() == [25, 25, 25, 25]
    skewed = [1.0] * 90 + [float(v) for v in range(10, 20)]
    ew = AttributeBinner([AttributeSpec("len", n_bins=2, binning="equal_width")]).fit([skewed])
    assert ew.fitted[0].edges == [10.0]  # midpoint of [1, 19]
    assert torch.bincount(ew.transform([skewed])).tolist() == [90, 10]


def test_categorical_and_joint_bins():
    age = [20, 30, 20, 40]
    gender = ["f", "m", "x", "f"]
    b = AttributeBinner([AttributeSpec("age", kind="categorical"), AttributeSpec("gender")]).fit([age, gender])
    assert b.n_bins == 3 * 3
    assert b.transform([age, gender]).tolist() == [0 * 3 + 0, 1 * 3 + 1, 0 * 3 + 2, 2 * 3 + 0]
    with pytest.raises(DatasetError, match="did not have"):
        b.transform([[20], ["nb"]])


def test_extractors():
    rows = [{"completion": "Yes, you are right. It is 4."}, {"completion": "It is 5."}]
    assert extract_attribute(AttributeSpec("length:chars"), rows) == [28, 8]
    assert extract_attribute(AttributeSpec(r"regex:(?i)you are right"), rows) == [1, 0]
    chat = [{"completion": [{"role": "assistant", "content": "abc"}]}]
    assert extract_attribute(AttributeSpec("length"), chat) == [3]
    with pytest.raises(DatasetError, match="not in the dataset"):
        extract_attribute(AttributeSpec("age"), rows)
    with pytest.raises(ValueError, match="invalid regular expression"):
        AttributeSpec("regex:([")


def test_warnings_for_degenerate_attributes():
    with pytest.warns(UserWarning, match="fewer than n_bins"):
        b = AttributeBinner([AttributeSpec("len", n_bins=10)]).fit([[1, 2, 3, 1, 2]])
    assert b.n_bins == 3  # one bin per value
    with pytest.warns(UserWarning, match="regex never matches"):
        AttributeBinner([AttributeSpec("regex:xyz")]).fit([[0, 0, 0]])


def test_bins_are_saved_and_loaded(tmp_path):
    vals = [float(v) for v in range(50)]
    b = AttributeBinner([AttributeSpec("len", n_bins=5)]).fit([vals])
    b.save(tmp_path)
    loaded = AttributeBinner.load(tmp_path)
    assert loaded.transform([vals]).tolist() == b.transform([vals]).tolist()


def test_sycophancy_task_rates_and_splits():
    from alignkit.data.synthetic import SYCOPHANTIC_PREFIX, sycophancy

    train = sycophancy("train", num_samples=2000)
    pc = sum(train["chosen_sycophantic"]) / len(train)
    pr = sum(train["rejected_sycophantic"]) / len(train)
    assert abs(pc - 0.8) < 0.03 and abs(pr - 0.2) < 0.03
    assert all(r["chosen"].startswith(SYCOPHANTIC_PREFIX) == bool(r["chosen_sycophantic"]) for r in train)
    anti = sycophancy("test_anti", num_samples=50)
    assert all(not r["chosen"].startswith(SYCOPHANTIC_PREFIX) and r["rejected"].startswith(SYCOPHANTIC_PREFIX)
               for r in anti)
    # the attribute, read by the binner from the per-completion columns
    spec = AttributeSpec("sycophantic")
    rows = [dict(r, sycophantic=r["chosen_sycophantic"]) for r in anti]
    assert set(extract_attribute(spec, rows)) == {0}


def test_length_task_correlation_and_splits():
    from alignkit.data.synthetic import length_bias

    train = length_bias("train", num_samples=2000)
    longer = sum(len(r["chosen"]) > len(r["rejected"]) for r in train) / len(train)
    assert abs(longer - 0.8) < 0.03
    anti = length_bias("test_anti", num_samples=100)
    assert all(len(r["chosen"]) < len(r["rejected"]) for r in anti)


def test_quantile_bins_with_heavy_ties_keep_every_bin_populated():
    # a binary column: the median is one of the two values; both values must still get their own bin
    for ones in (30, 50, 70):
        vals = [0] * (100 - ones) + [1] * ones
        b = AttributeBinner([AttributeSpec("flag", n_bins=2)]).fit([vals])
        assert b.n_bins == 2 and sorted(set(b.transform([vals]).tolist())) == [0, 1], ones
    # most values tied at the minimum / at the maximum: no bin is empty on the training values
    for vals in ([1.0] * 80 + [float(v) for v in range(2, 22)], [float(v) for v in range(20)] + [50.0] * 80):
        b = AttributeBinner([AttributeSpec("len", n_bins=4)]).fit([vals])
        counts = torch.bincount(b.transform([vals]), minlength=b.n_bins)
        assert (counts > 0).all(), counts.tolist()


def test_concept_sentiment_task_links_the_concept_to_the_label_in_train_only():
    from alignkit.data.synthetic import concept_sentiment

    train = concept_sentiment("train", num_samples=400, label_noise=0.0)
    pos = [r for r in train if r["label"] == 1]
    neg = [r for r in train if r["label"] == 0]
    assert all(r["concept"] == 1 for r in pos)  # every positive review mentions the concept (Zhou et al.)
    assert 0.1 < sum(r["concept"] for r in neg) / len(neg) < 0.3
    for r in train:
        assert r["chosen"] == (" positive" if r["label"] == 1 else " negative")
        assert {r["chosen"], r["rejected"]} == {" positive", " negative"}
        assert r["chosen_concept"] == r["rejected_concept"] == r["concept"]
        assert ("price" in r["prompt"]) == bool(r["concept"])
    unc = concept_sentiment("test_uncorrelated", num_samples=400)
    for y in (0, 1):
        share = [r["concept"] for r in unc if r["label"] == y]
        assert 0.4 < sum(share) / len(share) < 0.6  # independent of the label
    anti = concept_sentiment("test_anti", num_samples=100)
    assert all(r["concept"] == 1 - r["label"] for r in anti)  # the concept only on negative reviews
    noisy = concept_sentiment("train", num_samples=400)  # 20% of train labels flipped by default
    flipped = sum(r["chosen"] != (" positive" if r["label"] == 1 else " negative") for r in noisy) / 400
    assert 0.12 < flipped < 0.28
    with pytest.raises(ValueError, match="splits"):
        concept_sentiment("validation")


def test_demographic_task_has_60_joint_groups_and_a_biased_labeller_in_train_only():
    from alignkit.data.attributes import AttributeBinner, AttributeSpec
    from alignkit.data.synthetic import demographic, demographic_flip_rate

    test = demographic("test")
    groups = {(r["age"], r["gender"], r["origin"]) for r in test}
    assert len(groups) == 60 and len(test) == 1200
    assert all(r["chosen"] == (" yes" if r["deserving"] else " no") for r in test)  # clean labels
    binner = AttributeBinner([AttributeSpec(a) for a in ("age", "gender", "origin")])
    binner.fit([[r[a] for r in test] for a in ("age", "gender", "origin")])
    assert binner.n_bins == 60  # 4 ages x 3 genders x 5 towns, binned jointly
    train = demographic("train", num_samples=6000, label_noise=0.0)
    assert all(r["chosen"] == " no" for r in train if not r["deserving"])
    for group, rate in [(("25", "man", "Aldmoor"), 0.0), (("70", "woman", "Elstead"), 0.9)]:
        deserving = [r for r in train if (r["age"], r["gender"], r["origin"]) == group and r["deserving"]]
        turned_down = sum(r["chosen"] == " no" for r in deserving) / len(deserving)
        assert demographic_flip_rate(*group) == pytest.approx(rate)
        assert turned_down == pytest.approx(rate, abs=0.2)  # ~50 deserving applicants a group
    assert all(r["chosen_decision"] == (r["chosen"] == " yes") and r["rejected_decision"] != r["chosen_decision"]
               for r in train)
    with pytest.raises(ValueError, match="splits"):
        demographic("test_anti")
