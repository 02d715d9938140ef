"""CausalRewardTrainer: mmd_coef 0 is TRL's RewardTrainer; the penalty trains, logs and saves its bins."""

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForSequenceClassification
from trl import RewardConfig, RewardTrainer

from alignkit.data.validation import DatasetError
from alignkit.trainers.causal_reward import BinBalancedSampler, CausalRewardConfig, CausalRewardTrainer
from tests.conftest import base_args


@pytest.fixture
def reward_model(tiny_model_path):
    def _make(num_labels=1):
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_pretrained(tiny_model_path, num_labels=num_labels)
    return _make


def _grads(trainer):
    trainer.model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def test_mmd_coef_zero_is_trl_reward_trainer(reward_model, tokenizer, pair_dataset, tmp_path):
    ds = pair_dataset(8)
    ours = CausalRewardTrainer(model=reward_model(), args=CausalRewardConfig(**base_args(tmp_path, mmd_coef=0.0)),
                               train_dataset=ds, processing_class=tokenizer)
    trl = RewardTrainer(model=reward_model(), args=RewardConfig(**base_args(tmp_path)), train_dataset=ds,
                        processing_class=tokenizer)
    (l1, g1), (l2, g2) = _grads(ours), _grads(trl)
    torch.testing.assert_close(l1, l2, rtol=0, atol=1e-6)
    assert g1.keys() == g2.keys() and g1
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], rtol=0, atol=1e-6, msg=k)


@pytest.mark.parametrize("conditional,mmd_on", [(False, "reward"), (True, "reward"), (False, "hidden")])
def test_penalty_trains_logs_and_saves_bins(conditional, mmd_on, reward_model, tokenizer, pair_dataset, tmp_path):
    args = CausalRewardConfig(**base_args(tmp_path, mmd_coef=1.0, attributes=["length:chars"], num_bins=4,
                                          conditional=conditional, mmd_on=mmd_on, max_steps=3))
    trainer = CausalRewardTrainer(model=reward_model(), args=args, train_dataset=pair_dataset(32),
                                  processing_class=tokenizer)
    trainer.train()
    log = next(e for e in trainer.state.log_history if "loss" in e)
    assert "mmd/penalty" in log and log["mmd/bins_used"] >= 2 and "mmd/spearman_reward_bin" in log
    trainer.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / "alignkit_attribute_bins.json").exists()


def test_penalty_changes_the_gradient(reward_model, tokenizer, pair_dataset, tmp_path):
    ds = pair_dataset(16)
    res = []
    for coef in (0.0, 5.0):
        args = CausalRewardConfig(**base_args(tmp_path, mmd_coef=coef, attributes=["length:chars"], num_bins=2,
                                              bin_balanced_sampler=False, per_device_train_batch_size=16))
        res.append(_grads(CausalRewardTrainer(model=reward_model(), args=args, train_dataset=ds,
                                              processing_class=tokenizer)))
    # the penalty enters the loss (its unbiased estimate may be negative when rewards ignore Z, as at init)
    assert abs(res[1][0] - res[0][0]) > 1e-4
    assert any((res[0][1][k] - res[1][1][k]).abs().max() > 1e-6 for k in res[0][1])


def test_mmd_start_step_trains_on_the_preference_loss_alone_until_then(reward_model, tokenizer, pair_dataset,
                                                                     tmp_path):
    """`mmd_start_step` 2: the first two optimizer steps are mmd_coef 0's (TRL's loss: same weights to 1e-6), the
    third is penalised (weights apart); the penalty is logged from the first step."""
    ds = pair_dataset(48)

    def weights(steps, **kw):
        args = CausalRewardConfig(**base_args(tmp_path, attributes=["length:chars"], num_bins=2, max_steps=steps,
                                              bin_balanced_sampler=False, per_device_train_batch_size=16, **kw))
        trainer = CausalRewardTrainer(model=reward_model(), args=args, train_dataset=ds, processing_class=tokenizer)
        trainer.train()
        return trainer, torch.cat([p.detach().flatten() for p in trainer.model.parameters()])

    late, w_late = weights(2, mmd_coef=5.0, mmd_start_step=2)
    _, w_plain = weights(2, mmd_coef=0.0)
    torch.testing.assert_close(w_late, w_plain, rtol=0, atol=1e-6)
    assert all("mmd/penalty" in e for e in late.state.log_history if "loss" in e)
    _, w_late = weights(3, mmd_coef=5.0, mmd_start_step=2)
    _, w_plain = weights(3, mmd_coef=0.0)
    assert (w_late - w_plain).abs().max() > 1e-4  # the penalty of step 3 moved the weights
    with pytest.raises(ValueError, match="mmd_start_step must be an integer >= 0"):
        CausalRewardConfig(**base_args(tmp_path, mmd_start_step=-1))


def test_bin_balanced_sampler_covers_bins_twice():
    bins = [0] * 50 + [1] * 30 + [2] * 15 + [3] * 5
    order = list(BinBalancedSampler(bins, batch_size=8, seed=0))
    assert len(order) == len(bins)
    for start in range(0, len(order) - 8 + 1, 8):
        counts = {}
        for i in order[start:start + 8]:
            counts[bins[i]] = counts.get(bins[i], 0) + 1
        assert all(c >= 2 for c in counts.values()) and len(counts) >= 2


def test_bin_balanced_sampler_takes_bin_sampler_examples_of_each_bin(tmp_path):
    """`bin_sampler_examples` 4: a batch of 16 is 4 bins of 4 examples (each bin pair's MMD^2 then averages 16
    kernel values across bins instead of 4)."""
    bins = [b for b in range(10) for _ in range(40)]
    order = list(BinBalancedSampler(bins, batch_size=16, seed=0, per_bin=4))
    assert len(order) == len(bins)
    for start in range(0, len(order), 16):
        counts = {}
        for i in order[start:start + 16]:
            counts[bins[i]] = counts.get(bins[i], 0) + 1
        assert sorted(counts.values()) == [4, 4, 4, 4]
    with pytest.raises(ValueError, match="bin_sampler_examples must be >= 2"):
        CausalRewardConfig(**base_args(tmp_path, bin_sampler_examples=1))


def test_bad_inputs(reward_model, tokenizer, pair_dataset, tmp_path):
    with pytest.raises(DatasetError, match="not in the dataset"):
        CausalRewardTrainer(model=reward_model(), args=CausalRewardConfig(**base_args(tmp_path, attributes=["age"])),
                            train_dataset=pair_dataset(8), processing_class=tokenizer)
    with pytest.raises(ValueError, match="num_labels=2"):
        CausalRewardTrainer(model=reward_model(2), args=CausalRewardConfig(**base_args(tmp_path)),
                            train_dataset=pair_dataset(8), processing_class=tokenizer)
    with pytest.raises(ValueError, match="mmd_on"):
        CausalRewardConfig(**base_args(tmp_path, mmd_on="logits"))
    with pytest.warns(UserWarning, match="regex never matches"):
        CausalRewardTrainer(model=reward_model(), args=CausalRewardConfig(**base_args(tmp_path, attributes=["regex:zzzq"])),
                            train_dataset=pair_dataset(8), processing_class=tokenizer)


def test_per_completion_attribute_columns(reward_model, tokenizer, tmp_path):
    ds = Dataset.from_list([{"prompt": "q ", "chosen": "a", "rejected": "b", "chosen_polite": i % 2,
                             "rejected_polite": (i + 1) % 2} for i in range(8)])
    trainer = CausalRewardTrainer(model=reward_model(), args=CausalRewardConfig(**base_args(tmp_path, attributes=["polite"])),
                                  train_dataset=ds, processing_class=tokenizer)
    assert trainer.attribute_bins.binner.n_bins == 2
    assert trainer.train_dataset["chosen_z_bin"] == [i % 2 for i in range(8)]


def test_spearman_with_ties_matches_hand_computation():
    from alignkit.trainers.causal_reward import _spearman

    a = torch.tensor([1.0, 2.0, 2.0, 3.0, 5.0])
    b = torch.tensor([1.0, 3.0, 2.0, 4.0, 4.0])
    # average ranks: a -> [0, 1.5, 1.5, 3, 4], b -> [0, 2, 1, 3.5, 3.5]; Pearson of the ranks
    ra, rb = torch.tensor([0, 1.5, 1.5, 3, 4]), torch.tensor([0, 2, 1, 3.5, 3.5])
    ra, rb = ra - ra.mean(), rb - rb.mean()
    assert _spearman(a, b) == pytest.approx((ra @ rb / (ra.norm() * rb.norm())).item(), abs=1e-6)
    assert _spearman(a, torch.ones(5)) == 0.0
    assert _spearman(torch.arange(6.0), -torch.arange(6.0)) == pytest.approx(-1.0)


def test_eval_metrics_per_dataset_and_per_bin(reward_model, tokenizer, tmp_path):
    """Several eval sets keep their own names (TRL's RewardTrainer writes them all as eval_accuracy), and the
    reward correlation and per-bin means are computed over the whole eval set, by hand here."""
    from alignkit.data.synthetic import sycophancy

    evals = {"anti": sycophancy("test_anti", num_samples=24), "plain": sycophancy("test", num_samples=24)}
    args = CausalRewardConfig(**base_args(tmp_path, attributes=["sycophantic"], per_device_eval_batch_size=5))
    trainer = CausalRewardTrainer(model=reward_model(), args=args, train_dataset=sycophancy("train", num_samples=16),
                                  eval_dataset=evals, processing_class=tokenizer)
    metrics = trainer.evaluate()
    assert "eval_anti_accuracy" in metrics and "eval_plain_accuracy" in metrics and "eval_accuracy" not in metrics

    # the anti split: the prefix is always on the rejected side, so bins are [0]*n + [1]*n
    from alignkit.trainers.causal_reward import _spearman
    model = trainer.model.eval()
    ds = trainer.eval_dataset["anti"]
    rewards = {0: [], 1: []}
    all_r, all_z = [], []
    with torch.no_grad():
        for row in ds:
            for side in ("chosen", "rejected"):
                r = model(input_ids=torch.tensor([row[f"{side}_ids"]])).logits.item()
                rewards[row[f"{side}_z_bin"]].append(r)
                all_r.append(r)
                all_z.append(float(row[f"{side}_z_bin"]))
    for b in (0, 1):
        assert metrics[f"eval_anti_reward_by_bin/{b}"] == pytest.approx(sum(rewards[b]) / len(rewards[b]), abs=1e-4)
    assert metrics["eval_anti_mmd/spearman_reward_bin"] == pytest.approx(
        _spearman(torch.tensor(all_r), torch.tensor(all_z)), abs=1e-4)
    assert metrics["eval_anti_mmd/reward_std"] == pytest.approx(torch.tensor(all_r).std(unbiased=False).item(), abs=1e-4)


@pytest.mark.parametrize("mmd_on", ["reward", "hidden"])
def test_the_penalty_works_on_a_half_precision_model(mmd_on, tiny_model_path, tokenizer, pair_dataset, tmp_path):
    """A float16 (or bfloat16) reward model with the default penalty trains on a CPU (the penalty's kernel distances
    are computed in float32: torch has no half-precision `cdist` on CPUs), and its penalty is the float32 penalty of
    the same values."""
    from alignkit.losses import binned_mmd_penalty

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_path, num_labels=1, dtype=torch.float16)
    args = CausalRewardConfig(**base_args(tmp_path, attributes=["length:chars"], num_bins=2, mmd_on=mmd_on))
    trainer = CausalRewardTrainer(model=model, args=args, train_dataset=pair_dataset(16), processing_class=tokenizer)
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, next(iter(trainer.get_train_dataloader())))
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    values, bins = torch.randn(8, dtype=torch.float16), torch.tensor([0, 1] * 4)
    out = trainer.attribute_bins.penalty(trainer, values, bins, "train")
    assert out.penalty.dtype == torch.float32
    torch.testing.assert_close(out.penalty, binned_mmd_penalty(values.float(), bins, args.mmd_bandwidths,
                                                               standardize=args.mmd_standardize).penalty)


@pytest.mark.parametrize("mmd_coef", [0.0, 1.0])
def test_evaluation_on_an_iterable_eval_dataset_writes_its_sample_pairs(mmd_coef, reward_model, tokenizer,
                                                                         pair_dataset, tmp_path):
    """A streaming (iterable) eval dataset evaluates as in TRL's RewardTrainer, and its first pairs are written with
    their rewards, as for a map-style one."""
    import json

    args = CausalRewardConfig(**base_args(tmp_path, mmd_coef=mmd_coef, attributes=["length:chars"], num_bins=2,
                                          eval_strategy="steps", eval_steps=1, eval_sample_pairs=3))
    trainer = CausalRewardTrainer(model=reward_model(), args=args, train_dataset=pair_dataset(8),
                                  eval_dataset=pair_dataset(6, split="test").to_iterable_dataset(),
                                  processing_class=tokenizer)
    metrics = trainer.evaluate()
    assert "eval_loss" in metrics and "eval_accuracy" in metrics
    written = list((tmp_path / "samples").glob("eval_step_0*.jsonl"))
    assert len(written) == 1
    rows = [json.loads(line) for line in written[0].read_text().splitlines()]
    assert len(rows) == 3 and all("reward_chosen" in r and "reward_rejected" in r for r in rows)


@pytest.mark.parametrize("settings,says", [
    (dict(mmd_start_step=10, max_steps=10), "mmd_start_step"),
    (dict(bin_sampler_examples=8, per_device_train_batch_size=8), "bin_sampler_examples"),
])
def test_a_penalty_setting_that_cannot_take_effect_warns_once(settings, says, tmp_path):
    """No silent no-ops (issue 29): a penalty that would start after the last step, or a balanced sampler that cannot
    put two bins in a batch (it falls back to random order), warns when the config is made."""
    import warnings

    from alignkit._util import AlignkitWarning

    args = dict(base_args(tmp_path, mmd_coef=1.0, attributes=["length:chars"]), **settings)
    with pytest.warns(AlignkitWarning, match=says):
        CausalRewardConfig(**args)
    with warnings.catch_warnings():
        warnings.simplefilter("error", AlignkitWarning)
        CausalRewardConfig(**dict(args, mmd_coef=0.0))  # no penalty: nothing to warn about
        CausalRewardConfig(**base_args(tmp_path, mmd_coef=1.0, attributes=["length:chars"]))
