"""Causal DPO (thesis 4.8): the MMD penalty on f-DPO's implicit rewards, inside FDPOTrainer."""

import copy

import pytest
import torch

from alignkit import FDPOConfig, FDPOTrainer, MultiSampleDPOConfig
from alignkit.divergences import get_divergence
from alignkit.losses import binned_mmd_penalty
from tests.conftest import base_args


def _loss(trainer):
    """The loss on the whole (8-row) training set as one batch, in dataset order."""
    trainer.model.train()
    ds = trainer.train_dataset
    batch = trainer.data_collator([ds[i] for i in range(len(ds))])
    return trainer.compute_loss(trainer.model, batch), batch


def _seq_logps(model, prompt_ids, completion_ids):
    ids = torch.tensor([prompt_ids + completion_ids])
    logits = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
    targets = ids[0, 1:]
    lp = logits.gather(-1, targets[:, None]).squeeze(-1)
    return lp[len(prompt_ids) - 1:].sum()


@pytest.mark.parametrize("divergence,conditional", [("reverse_kl", False), ("forward_kl", True), ("jsd", False)])
def test_penalty_on_implicit_rewards_matches_a_hand_computation(divergence, conditional, make_model, tokenizer,
                                                                pair_dataset, tmp_path):
    policy = make_model(perturb=0.05)
    ref = make_model()
    ds = pair_dataset(8)
    common = dict(divergence=divergence, beta=0.5, attributes=["length:chars"], num_bins=3, conditional=conditional,
                  bin_balanced_sampler=False)
    plain = FDPOTrainer(model=copy.deepcopy(policy), ref_model=ref,
                        args=FDPOConfig(**base_args(tmp_path, **common, mmd_coef=0.0)),
                        train_dataset=ds, processing_class=tokenizer)
    causal = FDPOTrainer(model=copy.deepcopy(policy), ref_model=ref,
                         args=FDPOConfig(**base_args(tmp_path, **common, mmd_coef=2.0)),
                         train_dataset=ds, processing_class=tokenizer)
    (l0, _), (l1, batch) = _loss(plain), _loss(causal)

    # implicit rewards beta * link(log pi/pi_ref), per completion, from plain forward passes
    div = get_divergence(divergence)
    rows = causal.train_dataset
    with torch.no_grad():
        lr = [_seq_logps(policy, r["prompt_ids"], r[f"{s}_ids"]) - _seq_logps(ref, r["prompt_ids"], r[f"{s}_ids"])
              for s in ("chosen", "rejected") for r in rows]
    implicit = 0.5 * div.link(torch.stack(lr))
    bins = torch.tensor(list(rows["chosen_z_bin"]) + list(rows["rejected_z_bin"]))
    assert torch.equal(batch["z_bins"], bins)
    groups = torch.cat([torch.ones(8), torch.zeros(8)]) if conditional else None
    expected = binned_mmd_penalty(implicit, bins, groups=groups).penalty
    assert expected.abs() > 0.1  # the penalty is far from zero on this batch (about -0.3 here)
    # 1e-4: the hand log-probs come from an unfused float32 forward, summed in another order than TRL's
    # fused LM head (differences up to ~2e-5 after forward KL's exp); a wrong bin, side or beta moves it by >0.1
    torch.testing.assert_close(l1.detach(), (l0 + 2.0 * expected).detach(), rtol=0, atol=1e-4)


def test_causal_dpo_trains_logs_and_saves_bins(make_model, tokenizer, pair_dataset, tmp_path):
    args = FDPOConfig(**base_args(tmp_path, mmd_coef=1.0, attributes=["length"], num_bins=4, max_steps=3,
                                  precompute_ref_log_probs=True))
    trainer = FDPOTrainer(model=make_model(), ref_model=make_model(), args=args, train_dataset=pair_dataset(32),
                          processing_class=tokenizer)
    trainer.train()
    log = next(e for e in trainer.state.log_history if "loss" in e)
    assert "mmd/penalty" in log and log["mmd/bins_used"] >= 2
    trainer.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / "alignkit_attribute_bins.json").exists()


def test_plain_fdpo_computes_no_bins(make_model, tokenizer, pair_dataset, tmp_path):
    trainer = FDPOTrainer(model=make_model(), ref_model=make_model(), args=FDPOConfig(**base_args(tmp_path)),
                          train_dataset=pair_dataset(8), processing_class=tokenizer)
    assert "chosen_z_bin" not in trainer.train_dataset.column_names and trainer.attribute_bins.binner is None


def test_groups_refuse_the_penalty(tmp_path):
    with pytest.raises(ValueError, match="not available for groups"):
        MultiSampleDPOConfig(**base_args(tmp_path, mmd_coef=1.0))
