"""Checks before training: what they count agrees with what TRL then does, on both code paths (plain-text
columns checked on Arrow arrays, chat messages row by row)."""

import pytest
from datasets import Dataset

from alignkit.data.validation import DatasetError, validate_preference_dataset
from alignkit.run.recipe import parse_recipe
from alignkit.run.checks import count_overlong
from tests.conftest import base_args


def _rows(conversational: bool, n: int = 24):
    """Prompts of growing length (4 to ~50 tokens), so that a max_length in between drops some of them."""
    rows = []
    for i in range(n):
        prompt = "Write a review of the movie. " + "Please be brief. " * i
        chosen, rejected = "A great movie.", "An awful movie, dull."
        if conversational:
            rows.append({"prompt": [{"role": "user", "content": prompt}],
                         "chosen": [{"role": "assistant", "content": chosen}],
                         "rejected": [{"role": "assistant", "content": rejected}]})
        else:
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return Dataset.from_list(rows)


@pytest.mark.parametrize("conversational", [False, True], ids=["text", "chat"])
@pytest.mark.parametrize("method", ["fdpo", "crm"])
def test_rows_counted_as_too_long_are_the_rows_trl_drops(method, conversational, make_model, tokenizer, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from alignkit import CausalRewardConfig, CausalRewardTrainer, FDPOConfig, FDPOTrainer

    data = _rows(conversational)
    max_length = 40
    recipe = parse_recipe({"method": method, "model": "builtin:tiny-llama", "dataset": "builtin:sentiment",
                           "max_length": max_length})
    config = recipe.build_config()
    dropped, rows, longest = count_overlong(recipe, config, tokenizer, data)
    assert 0 < dropped < rows == len(data) and longest > max_length
    args = dict(base_args(tmp_path), max_length=max_length)
    if method == "fdpo":
        trainer = FDPOTrainer(model=make_model(), ref_model=make_model(), args=FDPOConfig(**args),
                              train_dataset=data, processing_class=tokenizer)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(make_model().config._name_or_path, num_labels=1)
        trainer = CausalRewardTrainer(model=model, args=CausalRewardConfig(**args, mmd_coef=0.0), train_dataset=data,
                                      processing_class=tokenizer)
    assert len(trainer.train_dataset) == rows - dropped  # exactly what TRL kept


def test_identical_pairs_are_counted_on_both_paths():
    text = Dataset.from_list([{"prompt": "p", "chosen": "a", "rejected": "a" if i % 3 == 0 else "b"}
                              for i in range(9)])
    report = validate_preference_dataset(text, "train dataset")
    assert report.identical == 3 and report.rows == 9 and "3 of 9 rows" in report.warnings[0]
    chat = Dataset.from_list([{"prompt": [{"role": "user", "content": "p"}],
                               "chosen": [{"role": "assistant", "content": "a"}],
                               "rejected": [{"role": "assistant", "content": "a" if i % 3 == 0 else "b"}]}
                              for i in range(9)])
    report = validate_preference_dataset(chat, "train dataset")
    assert report.identical == 3 and report.format == "conversational"


def test_every_row_is_read_not_only_the_first():
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"} for _ in range(5000)]
    rows[4321]["rejected"] = None
    with pytest.raises(DatasetError, match=r"row 4321 \(0-based\): 'rejected' is missing"):
        validate_preference_dataset(Dataset.from_list(rows), "train dataset")
    rows[4321]["rejected"] = "   "
    with pytest.raises(DatasetError, match=r"row 4321 \(0-based\): 'rejected' is empty"):
        validate_preference_dataset(Dataset.from_list(rows), "train dataset")
