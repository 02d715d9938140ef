"""FDPOConfig(shared_prefix=True): each prompt computed once per pair. The loss, every gradient and every logged metric
equal the unshared run's in float32 (the built-in tiny Llama: rotary positions), with prompts of different lengths in
one batch, truncation by max_length, every divergence, the loss types that read per-sequence log-probs, a PEFT
adapter, precomputed reference log-probs, and Mixture-of-Experts models without a router loss; refused with the reason
where it cannot hold."""

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from alignkit import FDPOConfig, FDPOTrainer
from tests.conftest import base_args, perturbed_model

#: the loss: measured at most 2.4e-7 (float32; the two layouts sum the same terms in another order)
ATOL = 1e-6
#: gradients, relative to the largest entry (about 0.35 here): measured at most 4.3e-7 of it (reverse KL) and 5.0e-6
#: (forward KL, whose link exp(-logr) amplifies the rounding of the log-ratios)
GRAD_RTOL = 2e-5
#: the logged metrics: sequence log-probs are about -80 here, where float32's spacing is 7.6e-6, so log-ratios and
#: the figures made from them differ by rounding of that size (measured: at most 2.6e-6, logratios/chosen)
METRIC_ATOL = 1e-5


def _pairs(n=8):
    """Prompts of very different lengths (3 to ~40 tokens), so one batch pads some sequences far more than others."""
    words = "the film was long and the plot was thin but the actors were good".split()
    rows = []
    for i in range(n):
        prompt = " ".join(words[: 1 + (i * 5) % len(words)] * (1 + i % 3)) + " Review:"
        rows.append({"prompt": prompt, "chosen": " great film" + " really" * (i % 4),
                     "rejected": " awful" + " truly bad" * (i % 3)})
    return Dataset.from_list(rows)


def _model(path, perturb=0.02):
    return perturbed_model(path, perturb)


def _step(path, tokenizer, tmp_path, shared, data=None, model=None, peft_config=None, **kw):
    """One training step's loss, gradients and logged metrics."""
    args = FDPOConfig(**base_args(tmp_path / str(shared), per_device_train_batch_size=8, **kw), shared_prefix=shared)
    trainer = FDPOTrainer(model=model if model is not None else _model(path),
                          ref_model=None if peft_config is not None else AutoModelForCausalLM.from_pretrained(path),
                          args=args, train_dataset=data if data is not None else _pairs(), processing_class=tokenizer,
                          peft_config=peft_config)
    trainer.model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    from alignkit import _adapter

    metrics = {k: v[-1] for k, v in _adapter.metrics(trainer, "train").items() if not k.startswith("perf/")}
    return loss.detach(), grads, metrics, batch


def _same(a, b):
    (la, ga, ma, _), (lb, gb, mb, _) = a, b
    torch.testing.assert_close(la, lb, rtol=0, atol=ATOL)
    assert ga.keys() == gb.keys() and ga
    atol = GRAD_RTOL * max(g.abs().max().item() for g in ga.values())
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], rtol=0, atol=atol, msg=k)
    assert ma.keys() == mb.keys()
    for k in ma:
        assert ma[k] == pytest.approx(mb[k], rel=1e-6, abs=METRIC_ATOL), k
    assert abs(la.item()) > 1e-3


@pytest.mark.parametrize("options", [
    dict(),
    dict(divergence="forward_kl"),
    dict(divergence="jsd"),
    dict(divergence="alpha", alpha=0.3),
    dict(loss_type=["ipo"], beta=1.0),
    dict(loss_type=["hinge"]),
    dict(loss_type=["robust"], label_smoothing=0.1),
    dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]),
    dict(loss_type=["apo_zero"]),
    dict(max_length=12),  # truncation: the longest prompts lose their completions' tails (keep_start)
])
def test_shared_prefix_equals_the_unshared_step(options, tiny_model_path, tokenizer, tmp_path):
    shared = _step(tiny_model_path, tokenizer, tmp_path, True, **options)
    _same(_step(tiny_model_path, tokenizer, tmp_path, False, **options), shared)
    batch = shared[3]
    # each pair's prompt is in the packed batch once: fewer tokens than the unshared layout's, which num_tokens
    # counts in both runs
    assert batch["packed_lengths"].sum() < batch["unpacked_tokens"]


def test_the_batch_is_packed_and_truncation_cuts_completions(tiny_model_path, tokenizer, tmp_path):
    *_, batch = _step(tiny_model_path, tokenizer, tmp_path, True, max_length=12)
    rows = batch["input_ids"].size(0)
    assert batch["attention_mask"].dim() == 4 and rows < 8  # one row per pair; TRL drops prompts of >= 12 tokens
    assert batch["unpacked_tokens"] <= 2 * rows * 12  # every sequence cut to max_length, as TRL cuts it


@pytest.mark.parametrize("side", ["left", "right"])
def test_the_tokenizers_padding_side_does_not_matter(side, tiny_model_path, tokenizer, tmp_path):
    tokenizer.padding_side = side
    try:
        _same(_step(tiny_model_path, tokenizer, tmp_path, False), _step(tiny_model_path, tokenizer, tmp_path, True))
    finally:
        tokenizer.padding_side = "right"


def test_peft_and_precomputed_reference(tiny_model_path, tokenizer, tmp_path):
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                      lora_dropout=0.0)

    def peft_step(shared):
        torch.manual_seed(0)  # the same LoRA initialisation
        return _step(tiny_model_path, tokenizer, tmp_path, shared, model=_model(tiny_model_path), peft_config=lora)

    _same(peft_step(False), peft_step(True))
    _same(_step(tiny_model_path, tokenizer, tmp_path, False, precompute_ref_log_probs=True),
          _step(tiny_model_path, tokenizer, tmp_path, True, precompute_ref_log_probs=True))


def _tiny_moe(tmp_path, tokenizer, router_loss: bool):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           output_router_logits=router_loss, pad_token_id=tokenizer.pad_token_id,
                           eos_token_id=tokenizer.eos_token_id, attn_implementation="sdpa")
    path = tmp_path / f"moe-{router_loss}"
    MixtralForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_moe_without_a_router_loss_is_exact_and_with_one_is_refused(tokenizer, tmp_path):
    """A Mixture-of-Experts model routes each token by its own hidden state, so packing changes no routing: exact
    with `router_aux_loss_coef: 0`. Its router (load-balancing) loss is computed over every token of the batch, the
    prompt once here and twice there, so it cannot match: refused with that reason."""
    path = _tiny_moe(tmp_path, tokenizer, router_loss=False)
    _same(_step(path, tokenizer, tmp_path, False, router_aux_loss_coef=0.0),
          _step(path, tokenizer, tmp_path, True, router_aux_loss_coef=0.0))
    with pytest.raises(ValueError, match="router"):
        _step(_tiny_moe(tmp_path, tokenizer, router_loss=True), tokenizer, tmp_path, True)


@pytest.mark.parametrize("kwargs,match", [
    (dict(truncation_mode="keep_end", max_length=64), "keep_start"),
    (dict(use_weighting=True), "use_weighting"),
    (dict(padding_free=True), "padding_free"),
])
def test_refusals(kwargs, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        FDPOConfig(**base_args(tmp_path, **kwargs), shared_prefix=True)


def test_flash_attention_is_refused(tiny_model_path, tokenizer, tmp_path, monkeypatch):
    from alignkit import _adapter

    monkeypatch.setattr(_adapter, "attn_implementation", lambda model: "flash_attention_2")
    with pytest.raises(ValueError, match="sdpa"):
        FDPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_path), train_dataset=_pairs(),
                    args=FDPOConfig(**base_args(tmp_path), shared_prefix=True), processing_class=tokenizer)


# ---- reward models: CausalRewardConfig(shared_prefix=True) -------------------------------------------------------

def _reward_step(path, tokenizer, tmp_path, shared, model=None, **kw):
    from transformers import AutoModelForSequenceClassification

    from alignkit import CausalRewardConfig, CausalRewardTrainer, _adapter

    torch.manual_seed(0)  # the same new score head
    model = model or AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
    args = CausalRewardConfig(**base_args(tmp_path / f"rm{shared}", per_device_train_batch_size=8, **kw),
                              shared_prefix=shared)
    trainer = CausalRewardTrainer(model=model, args=args, train_dataset=_pairs(), processing_class=tokenizer)
    trainer.model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    loss = trainer.compute_loss(trainer.model, dict(batch))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    metrics = {k: v[-1] for k, v in _adapter.metrics(trainer, "train").items() if not k.startswith("perf/")}
    return loss.detach(), grads, metrics, batch


# Measured: TRL's loss (mmd_coef 0) within 6e-8 and its gradients within 1.2e-7 (largest entry 0.23); with the MMD
# penalty on the rewards, whose gradients reach 52 here, the loss within 3.6e-6 relative and the gradients within
# 1.9e-6 of the largest entry (float32 rounding, amplified by the kernel); on the hidden state 7e-7.
@pytest.mark.parametrize("options", [dict(mmd_coef=0.0, attributes=[]), dict(mmd_coef=1.0, attributes=["length"]),
                                     dict(mmd_coef=1.0, attributes=["length"], mmd_on="hidden")])
def test_reward_model_shared_prefix_equals_the_unshared_step(options, tiny_model_path, tokenizer, tmp_path):
    (la, ga, ma, _), (lb, gb, mb, batch) = (_reward_step(tiny_model_path, tokenizer, tmp_path, s, **options)
                                            for s in (False, True))
    torch.testing.assert_close(la, lb, rtol=2e-5, atol=ATOL)
    atol = GRAD_RTOL * max(g.abs().max().item() for g in ga.values())
    assert ga.keys() == gb.keys() and ga
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], rtol=0, atol=atol, msg=k)
    assert ma.keys() == mb.keys()
    for k in ma:
        assert ma[k] == pytest.approx(mb[k], rel=2e-5, abs=METRIC_ATOL), k
    assert batch["input_ids"].size(0) == 8 and batch["packed_lengths"].sum() < batch["unpacked_tokens"]


def test_an_encoder_reward_model_is_refused_with_the_reason(tokenizer, tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    model = BertForSequenceClassification(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=64, num_labels=1,
                                                     pad_token_id=tokenizer.pad_token_id))
    with pytest.raises(ValueError, match="attends in both directions"):
        _reward_step(None, tokenizer, tmp_path, True, model=model)
