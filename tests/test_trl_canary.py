"""The canary for TRL's internals: every private name and signature alignkit relies on (listed once, in
alignkit/_adapter.py) exists in the installed TRL/transformers; when one changes, the check fails with one
message naming it (shown here by patching), and so does constructing any alignkit trainer."""

import configparser
from pathlib import Path

import pytest
import trl
import trl.data_utils
from trl import DPOTrainer

from alignkit import CausalRewardConfig, CausalRewardTrainer, FDPOConfig, FDPOTrainer
from alignkit import _adapter as _trl
from tests.conftest import base_args


@pytest.fixture(autouse=True)
def _fresh_check():
    _trl._static_problems.cache_clear()
    yield
    _trl._static_problems.cache_clear()


def test_installed_trl_has_everything_alignkit_relies_on(make_model, tiny_model_path, tokenizer, pair_dataset, tmp_path):
    from transformers import AutoModelForSequenceClassification

    assert _trl.check() == []
    fdpo = FDPOTrainer(model=make_model(), args=FDPOConfig(**base_args(tmp_path / "a", use_weighting=True)),
                       train_dataset=pair_dataset(8), processing_class=tokenizer)
    crm = CausalRewardTrainer(model=AutoModelForSequenceClassification.from_pretrained(tiny_model_path, num_labels=1), args=CausalRewardConfig(**base_args(tmp_path / "b")),
                              train_dataset=pair_dataset(8), processing_class=tokenizer)
    assert _trl.check(fdpo) == [] and _trl.check(crm) == []
    # the fused LM head's output protocol
    batch = next(iter(fdpo.get_train_dataloader()))
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    out = _trl.fused_forward(fdpo.model, {k: batch[k] for k in ("input_ids", "attention_mask")}, labels)
    for field in (*_trl.FUSED_HEAD_FIELDS, "log_sum_sq_probs"):
        value = getattr(out, field, None)
        assert value is not None and value.shape[:2] == labels.shape[:1] + (labels.shape[1] - 1,), field


def test_a_renamed_hook_fails_with_one_message_naming_it(monkeypatch, make_model, tokenizer, pair_dataset, tmp_path):
    monkeypatch.delattr(DPOTrainer, "_compute_loss")
    assert _trl.check() == ["trl.DPOTrainer._compute_loss no longer exists"]
    with pytest.raises(RuntimeError, match=r"TRL .* changed internals it relies on: trl.DPOTrainer._compute_loss no "
                                           r"longer exists\. Install a TRL version in that range"):
        FDPOTrainer(model=make_model(), args=FDPOConfig(**base_args(tmp_path)), train_dataset=pair_dataset(8),
                    processing_class=tokenizer)


def test_a_changed_signature_fails_with_one_message_naming_it(monkeypatch):
    def _tokenize(tokenizer, text, **kwargs):  # parameters renamed
        raise AssertionError("never called")

    monkeypatch.setattr(trl.data_utils, "_tokenize", _tokenize)
    assert _trl.check() == ["trl.data_utils._tokenize now takes (tokenizer, text, kwargs); alignkit passes "
                            "(processing_class, input)"]


def test_a_missing_trainer_attribute_is_named(make_model, tokenizer, pair_dataset, tmp_path):
    trainer = FDPOTrainer(model=make_model(), args=FDPOConfig(**base_args(tmp_path)), train_dataset=pair_dataset(8),
                          processing_class=tokenizer)
    del trainer._total_train_tokens
    assert _trl.check(trainer) == ["DPOTrainer instances no longer have `_total_train_tokens`"]


def test_every_private_trl_name_in_the_package_goes_through_the_adapter():
    """No module but _adapter.py imports a private TRL name, or calls a private Trainer method listed in the hooks
    (subclass overrides calling `super()` are the hooks themselves)."""
    root = Path(_trl.__file__).resolve().parent
    offenders = []
    for path in root.rglob("*.py"):
        if path.name == "_adapter.py":
            continue
        text = path.read_text()
        # a call of a private Trainer method, unless this module overrides it itself
        private_calls = [f"self.{name}(" for _, name, _ in _trl.OVERRIDDEN_HOOKS
                         if name.startswith("_") and f"def {name}(" not in text]
        for line_no, line in enumerate(text.splitlines(), 1):
            code = line.split("#")[0]
            if ("from trl" in code and " import _" in code) or "fused_lm_head" in code or any(
                    c in code for c in private_calls) or "._metrics[" in code or "_attn_implementation" in code:
                offenders.append(f"{path.relative_to(root)}:{line_no}: {line.strip()}")
    assert offenders == []


def test_setup_cfg_declares_the_tested_trl_range():
    cfg = configparser.ConfigParser()
    cfg.read(Path(__file__).resolve().parents[1] / "setup.cfg")
    requirement = [r.strip() for r in cfg["options"]["install_requires"].splitlines() if r.strip().startswith("trl")]
    assert requirement == ["trl" + ",".join(_trl.TESTED_TRL)]
    from packaging.specifiers import SpecifierSet

    assert trl.__version__ in SpecifierSet(",".join(_trl.TESTED_TRL))
    _trl.require()  # the installed TRL and transformers have every name and signature the adapter declares
