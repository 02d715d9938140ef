"""FDPOTrainer against TRL's DPOTrainer on the same batch, model and seed (float32, tolerance 1e-6).

Every divergence of Theorem 1 is also in TRL 1.16 (`f_divergence_type`), so each is checked against
TRL's own implementation; our `alpha=a` against TRL's `alpha_divergence` with
`f_alpha_divergence_coef=1-a` (the convention mapping).
"""

import copy

import pytest
import torch
from trl import DPOConfig, DPOTrainer

from alignkit import FDPOConfig, FDPOTrainer
from tests.conftest import base_args

CASES = [
    (dict(divergence="reverse_kl"), dict()),
    (dict(divergence="forward_kl"), dict(f_divergence_type="forward_kl")),
    (dict(divergence="jsd"), dict(f_divergence_type="js_divergence")),
    (dict(divergence="alpha", alpha=0.3), dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.7)),
    (dict(divergence="alpha", alpha=0.8), dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.2)),
]
CASE_IDS = ["reverse_kl", "forward_kl", "jsd", "alpha0.3", "alpha0.8"]


def _loss_and_grads(trainer_cls, config_cls, make_model, tokenizer, dataset, tmp_path, peft_config=None, **kw):
    policy = make_model(perturb=0.02)  # move the policy off the reference so log-ratios are not all 0
    ref = None if peft_config is not None else make_model()
    args = config_cls(**base_args(tmp_path, **kw))
    trainer = trainer_cls(model=policy, ref_model=ref, args=args, train_dataset=dataset,
                          processing_class=tokenizer, peft_config=peft_config)
    trainer.model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, trainer


def _assert_same(ours, theirs):
    (l1, g1, _), (l2, g2, _) = ours, theirs
    torch.testing.assert_close(l1, l2, rtol=0, atol=1e-6)
    assert g1.keys() == g2.keys() and len(g1) > 0
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("ours,theirs", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "robust"])
def test_matches_trl_dpo(ours, theirs, loss_type, make_model, tokenizer, pair_dataset, tmp_path):
    ds = pair_dataset(8)
    extra = dict(loss_type=loss_type, label_smoothing=0.1 if loss_type == "robust" else 0.0)
    a = _loss_and_grads(FDPOTrainer, FDPOConfig, make_model, tokenizer, ds, tmp_path, **ours, **extra)
    b = _loss_and_grads(DPOTrainer, DPOConfig, make_model, tokenizer, ds, tmp_path, **theirs, **extra)
    assert a[0].item() != pytest.approx(0.6931, abs=1e-3) or loss_type != "sigmoid"  # log-ratios really non-zero
    _assert_same(a, b)


def test_divergences_really_differ(make_model, tokenizer, pair_dataset, tmp_path):
    """Guard for the test above: the divergences give different losses on this batch."""
    ds = pair_dataset(8)
    losses = {tuple(o.items()): _loss_and_grads(FDPOTrainer, FDPOConfig, make_model, tokenizer, ds, tmp_path, **o)[0].item()
              for o, _ in CASES}
    values = sorted(losses.values())
    assert min(b - a for a, b in zip(values, values[1:])) > 1e-5, losses


@pytest.mark.parametrize("ours,theirs", CASES[:3], ids=CASE_IDS[:3])
def test_matches_trl_on_conversational_data(ours, theirs, make_model, tokenizer, pair_dataset, tmp_path):
    ds = pair_dataset(8, conversational=True)
    _assert_same(_loss_and_grads(FDPOTrainer, FDPOConfig, make_model, tokenizer, ds, tmp_path, **ours),
                 _loss_and_grads(DPOTrainer, DPOConfig, make_model, tokenizer, ds, tmp_path, **theirs))


def test_matches_trl_with_precomputed_reference(make_model, tokenizer, pair_dataset, tmp_path):
    ds = pair_dataset(8)
    kw = dict(precompute_ref_log_probs=True)
    _assert_same(_loss_and_grads(FDPOTrainer, FDPOConfig, make_model, tokenizer, ds, tmp_path / "a", divergence="jsd", **kw),
                 _loss_and_grads(DPOTrainer, DPOConfig, make_model, tokenizer, ds, tmp_path / "b", f_divergence_type="js_divergence", **kw))


def test_matches_trl_with_lora(make_model, tokenizer, pair_dataset, tmp_path):
    from peft import LoraConfig

    ds = pair_dataset(8)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", init_lora_weights=False)
    a = _loss_and_grads(FDPOTrainer, FDPOConfig, make_model, tokenizer, ds, tmp_path, peft_config=copy.deepcopy(lora),
                        divergence="forward_kl")
    b = _loss_and_grads(DPOTrainer, DPOConfig, make_model, tokenizer, ds, tmp_path, peft_config=copy.deepcopy(lora),
                        f_divergence_type="forward_kl")
    assert all("lora" in n for n in a[1])  # only the adapter is trained; the reference is the adapter-free model
    _assert_same(a, b)


def test_matches_trl_over_steps_with_gradient_accumulation(make_model, tokenizer, pair_dataset, tmp_path):
    """Two optimizer steps, 2 micro-batches each: the trained weights agree with TRL's."""
    ds = pair_dataset(16)
    params = []
    for cls, cfg, kw in ((FDPOTrainer, FDPOConfig, dict(divergence="jsd")),
                         (DPOTrainer, DPOConfig, dict(f_divergence_type="js_divergence"))):
        args = cfg(**base_args(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=2, **kw))
        trainer = cls(model=make_model(), ref_model=make_model(), args=args, train_dataset=ds, processing_class=tokenizer)
        trainer.train()
        params.append(torch.cat([p.detach().flatten() for p in trainer.model.parameters()]))
        assert trainer.state.global_step == 2
    moved = (params[0] - torch.cat([p.detach().flatten() for p in make_model().parameters()])).abs().max()
    assert moved > 1e-4
    torch.testing.assert_close(params[0], params[1], rtol=0, atol=1e-6)
