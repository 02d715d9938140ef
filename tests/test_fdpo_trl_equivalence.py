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
    if trainer_cls is DPOTrainer:
        tmp_path = tmp_path / "trl"  # the two trainers never share an output folder
    args = config_cls(**base_args(tmp_path, **kw))
    trainer = trainer_cls(model=policy, ref_model=ref, args=args, train_dataset=dataset,
                          processing_class=tokenizer, peft_config=peft_config)
    trainer.model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, trainer


def _assert_same(ours, theirs, metrics=True):
    """Loss, every gradient and every metric TRL logs: equal at atol 1e-6 in float32.

    Under a divergence other than reverse KL TRL still logs `rewards/*` as beta * log-ratio, where alignkit logs
    the implicit reward of Theorem 1, beta * f'(u): those are not compared there."""
    (l1, g1, t1), (l2, g2, t2) = ours, theirs
    torch.testing.assert_close(l1, l2, rtol=0, atol=1e-6)
    assert g1.keys() == g2.keys() and len(g1) > 0
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=0, atol=1e-6, msg=name)
    if metrics:
        m1, m2 = t1._metrics["train"], t2._metrics["train"]
        assert set(m2) <= set(m1), f"metrics TRL logs and alignkit does not: {set(m2) - set(m1)}"
        for key in m2:
            if t1.divergence.name != "reverse_kl" and key.startswith("rewards/"):
                continue
            assert m1[key] == pytest.approx(m2[key], rel=0, abs=1e-6), key


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


# ---- every TRL 1.16 DPO loss type and option (issue 13) ---------------------------------------------------

#: TRL 1.16's DPO loss types, each with the label_smoothing that exercises it (exo_pair needs one > 0)
ALL_LOSS_TYPES = {
    "sigmoid": 0.0, "hinge": 0.0, "ipo": 0.0, "exo_pair": 1e-3, "nca_pair": 0.0, "robust": 0.1, "bco_pair": 0.0,
    "sppo_hard": 0.0, "aot": 0.1, "aot_unpaired": 0.1, "apo_zero": 0.0, "apo_down": 0.0, "discopop": 0.0,
    "sft": 0.0, "sigmoid_norm": 0.0,
}


def test_the_list_is_every_loss_type_trl_has():
    """Guard for the test below: TRL's own error message lists its loss types; ours must cover them all."""
    import inspect
    import re

    src = inspect.getsource(DPOTrainer._compute_loss)
    trl_types = set(re.findall(r'loss_type == "(\w+)"', src))
    assert trl_types == set(ALL_LOSS_TYPES), trl_types ^ set(ALL_LOSS_TYPES)


@pytest.mark.parametrize("loss_type", list(ALL_LOSS_TYPES))
def test_every_trl_loss_type_with_reverse_kl(loss_type, make_model, tokenizer, pair_dataset, tmp_path):
    ds = pair_dataset(8)
    kw = dict(loss_type=loss_type, label_smoothing=ALL_LOSS_TYPES[loss_type])
    _assert_same(_loss_and_grads(FDPOTrainer, FDPOConfig, make_model, tokenizer, ds, tmp_path, **kw),
                 _loss_and_grads(DPOTrainer, DPOConfig, make_model, tokenizer, ds, tmp_path, **kw))


@pytest.mark.parametrize("loss_type", ["exo_pair", "discopop", "sigmoid_norm"])
@pytest.mark.parametrize("ours,theirs", [CASES[2], CASES[3]], ids=["jsd", "alpha0.3"])
def test_score_difference_losses_compose_with_the_divergence(loss_type, ours, theirs, make_model, tokenizer,
                                                            pair_dataset, tmp_path):
    """exo_pair and discopop depend only on the chosen-minus-rejected score, so they compose with a link;
    the result equals TRL's with its own f-divergence."""
    ds = pair_dataset(8)
    kw = dict(loss_type=loss_type, label_smoothing=ALL_LOSS_TYPES[loss_type])
    _assert_same(_loss_and_grads(FDPOTrainer, FDPOConfig, make_model, tokenizer, ds, tmp_path, **ours, **kw),
                 _loss_and_grads(DPOTrainer, DPOConfig, make_model, tokenizer, ds, tmp_path, **theirs, **kw))


OPTIONS = {
    "mpo": dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]),
    "rpo": dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]),
    "wpo": dict(use_weighting=True),
    "wpo_ipo": dict(use_weighting=True, loss_type="ipo"),
    "ld_dpo": dict(ld_alpha=0.5),
    "ld_dpo_precomputed": dict(ld_alpha=0.3, precompute_ref_log_probs=True),
    "discopop_tau": dict(loss_type="discopop", discopop_tau=0.5),
}


def _uneven_pairs(pair_dataset, n=8):
    """Pairs whose completions differ in length (LD-DPO weights the longer one's tail): every other rejected
    completion gets a longer ending, every other chosen one too."""
    rows = pair_dataset(n).to_list()
    for i, row in enumerate(rows):
        side = "rejected" if i % 2 else "chosen"
        row[side] = row[side] + " I would say so again and again, truly."
    from datasets import Dataset

    return Dataset.from_list(rows)


@pytest.mark.parametrize("option", list(OPTIONS))
def test_trl_options_with_reverse_kl(option, make_model, tokenizer, pair_dataset, tmp_path):
    ds = _uneven_pairs(pair_dataset)
    kw = OPTIONS[option]
    _assert_same(_loss_and_grads(FDPOTrainer, FDPOConfig, make_model, tokenizer, ds, tmp_path, **kw),
                 _loss_and_grads(DPOTrainer, DPOConfig, make_model, tokenizer, ds, tmp_path, **kw))


@pytest.mark.parametrize("option", ["wpo", "ld_dpo", "rpo"])
def test_trl_options_with_jsd(option, make_model, tokenizer, pair_dataset, tmp_path):
    ds = _uneven_pairs(pair_dataset)
    kw = OPTIONS[option]
    _assert_same(_loss_and_grads(FDPOTrainer, FDPOConfig, make_model, tokenizer, ds, tmp_path, divergence="jsd", **kw),
                 _loss_and_grads(DPOTrainer, DPOConfig, make_model, tokenizer, ds, tmp_path,
                                 f_divergence_type="js_divergence", **kw))


def test_options_really_change_the_loss(make_model, tokenizer, pair_dataset, tmp_path):
    """Guard for the tests above: each option changes the loss on this batch (so equality is not vacuous)."""
    ds = _uneven_pairs(pair_dataset)
    plain = _loss_and_grads(FDPOTrainer, FDPOConfig, make_model, tokenizer, ds, tmp_path)[0].item()
    for option in ("wpo", "ld_dpo", "rpo"):
        value = _loss_and_grads(FDPOTrainer, FDPOConfig, make_model, tokenizer, ds, tmp_path, **OPTIONS[option])[0].item()
        assert abs(value - plain) > 1e-4, option


def _tiny_moe(tokenizer, seed=0, perturb=0.0):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    config = Qwen3MoeConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=32, moe_intermediate_size=16,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                            num_experts=4, num_experts_per_tok=2, output_router_logits=False,
                            router_aux_loss_coef=0.01, pad_token_id=tokenizer.pad_token_id)
    model = Qwen3MoeForCausalLM(config).float()
    if perturb:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(perturb * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("loss_type", ["sigmoid", "apo_zero"])
def test_mixture_of_experts_model_adds_and_logs_the_router_loss(loss_type, tokenizer, pair_dataset, tmp_path):
    ds = pair_dataset(8)

    def run(trainer_cls, config_cls, out):
        args = config_cls(**base_args(out, loss_type=loss_type))
        trainer = trainer_cls(model=_tiny_moe(tokenizer, perturb=0.02), ref_model=_tiny_moe(tokenizer), args=args,
                              train_dataset=ds, processing_class=tokenizer)
        assert trainer.aux_loss_enabled
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, next(iter(trainer.get_train_dataloader())))
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        return loss.detach(), grads, trainer

    ours, theirs = run(FDPOTrainer, FDPOConfig, tmp_path / "a"), run(DPOTrainer, DPOConfig, tmp_path / "b")
    assert "aux_loss" in theirs[2]._metrics["train"] and theirs[2]._metrics["train"]["aux_loss"][0] > 0
    _assert_same(ours, theirs)


def test_trl_alpha_fields_train_exactly_as_ours(make_model, tokenizer, pair_dataset, tmp_path):
    """FDPOConfig(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.7) is divergence alpha, alpha 0.3:
    three optimizer steps give the same logs and the same weights."""
    ds = pair_dataset(24)

    def train(out, **kw):
        args = FDPOConfig(**base_args(out, max_steps=3, **kw))
        trainer = FDPOTrainer(model=make_model(perturb=0.02), ref_model=make_model(), args=args, train_dataset=ds,
                              processing_class=tokenizer)
        trainer.train()
        return trainer

    with pytest.warns(UserWarning, match="read as divergence='alpha', alpha=0.3"):
        a = train(tmp_path / "trl-fields", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.7)
    b = train(tmp_path / "ours", divergence="alpha", alpha=0.3)
    drop = ("train_runtime", "train_samples_per_second", "train_steps_per_second")
    logs_a = [{k: v for k, v in log.items() if k not in drop and not k.startswith("perf/")} for log in a.state.log_history]
    logs_b = [{k: v for k, v in log.items() if k not in drop and not k.startswith("perf/")} for log in b.state.log_history]
    assert logs_a == logs_b and len(logs_a) == 4
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(p, q), n
