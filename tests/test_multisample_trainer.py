"""MultiSampleDPOTrainer: groups of one are TRL's DPO / IPO; groups train, never split; sub-batching."""

import pytest
import torch
from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from alignkit import MultiSampleDPOConfig, MultiSampleDPOTrainer
from alignkit.data.synthetic import sentiment_groups
from alignkit.data.validation import DatasetError
from tests.conftest import base_args


def _grads_after_one_batch(trainer):
    trainer.model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def _as_groups(pairs):
    return Dataset.from_list([{"prompt": r["prompt"], "chosen": [r["chosen"]], "rejected": [r["rejected"]]} for r in pairs])


#: TRL options that make sense on groups, each checked with groups of one against TRL's DPOTrainer on the pairs
GROUP_OPTIONS = {
    "mdpo": dict(loss_type="sigmoid"),
    "mipo": dict(loss_type="ipo"),
    "mdpo_conversational": dict(loss_type="sigmoid", conversational=True),
    "mipo_conversational": dict(loss_type="ipo", conversational=True),
    "mdpo_jsd": dict(loss_type="sigmoid", divergence="jsd"),
    "mdpo_sft": dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]),
    "mipo_precomputed": dict(loss_type="ipo", precompute_ref_log_probs=True),
    "mdpo_label_smoothing_ignored": dict(loss_type="sigmoid", label_smoothing=0.2),  # TRL's sigmoid ignores it too
    "mdpo_max_length": dict(loss_type="sigmoid", max_length=12),
    "mdpo_lora": dict(loss_type="sigmoid", lora=True),
}


@pytest.mark.parametrize("option", list(GROUP_OPTIONS))
def test_groups_of_one_equal_trl(option, make_model, tokenizer, pair_dataset, tmp_path):
    """Loss, every gradient and every metric TRL logs (rewards/* aside under JSD: see test_fdpo_trl_equivalence)."""
    kw = dict(GROUP_OPTIONS[option])
    pairs = pair_dataset(8, conversational=kw.pop("conversational", False))
    peft = None
    if kw.pop("lora", False):
        from peft import LoraConfig

        peft = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    divergence = kw.pop("divergence", "reverse_kl")
    trl_kw = dict(kw, **({"f_divergence_type": "js_divergence"} if divergence == "jsd" else {}))

    def build(cls, config_cls, out, data, **extra):
        torch.manual_seed(0)  # the LoRA adapters start the same in both
        return cls(model=make_model(perturb=0.02), ref_model=None if peft else make_model(),
                   args=config_cls(**base_args(out, **extra)), train_dataset=data, processing_class=tokenizer,
                   peft_config=peft)

    ours = build(MultiSampleDPOTrainer, MultiSampleDPOConfig, tmp_path / "ours", _as_groups(pairs),
                 divergence=divergence, **kw)
    trl = build(DPOTrainer, DPOConfig, tmp_path / "trl", pairs, **trl_kw)
    (l1, g1), (l2, g2) = _grads_after_one_batch(ours), _grads_after_one_batch(trl)
    torch.testing.assert_close(l1, l2, rtol=0, atol=1e-6)
    assert g1.keys() == g2.keys() and g1
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], rtol=0, atol=1e-6, msg=k)
    m1, m2 = ours._metrics["train"], trl._metrics["train"]
    assert set(m2) <= set(m1)
    for key in m2:
        if divergence == "reverse_kl" or not key.startswith("rewards/"):
            assert m1[key] == pytest.approx(m2[key], rel=0, abs=1e-6), key


@pytest.mark.parametrize("kwargs,match", [
    (dict(loss_type="hinge"), "no group form"),
    (dict(loss_type=["sigmoid", "bco_pair"]), "no group form"),
    (dict(use_weighting=True), "WPO"),
    (dict(ld_alpha=0.5), "LD-DPO"),
    (dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], nll_weight=0.3), "set one of them"),
])
def test_options_without_a_group_form_are_refused_with_the_reason(kwargs, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        MultiSampleDPOConfig(**base_args(tmp_path, **kwargs))


def test_unequal_and_varying_group_sizes_train_with_accumulation(make_model, tokenizer, tmp_path):
    ds = sentiment_groups("train", num_samples=24, n_chosen=[1, 3, 2], n_rejected=[4, 1, 2])
    args = MultiSampleDPOConfig(**base_args(tmp_path, loss_type="ipo", per_device_train_batch_size=3,
                                            gradient_accumulation_steps=2, max_steps=3, nll_weight=0.1))
    trainer = MultiSampleDPOTrainer(model=make_model(), ref_model=make_model(), args=args, train_dataset=ds,
                                    processing_class=tokenizer)
    # every micro-batch holds whole groups: per row, exactly the completions of that row
    sizes = {(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in trainer.train_dataset}
    for batch in trainer.get_train_dataloader():
        c = torch.bincount(batch["chosen_row_index"]).tolist()
        r = torch.bincount(batch["rejected_row_index"]).tolist()
        assert len(c) == len(r) == 3 and set(zip(c, r)) <= sizes
    trainer.train()
    log = next(e for e in trainer.state.log_history if "loss" in e)
    for key in ("rewards/chosen_group_std", "mipo/variance_correction", "rewards/accuracies", "group/chosen_size"):
        assert key in log, key


def test_sub_batches_give_the_same_gradients(make_model, tokenizer, tmp_path):
    ds = sentiment_groups("train", num_samples=4, n_chosen=3, n_rejected=2)
    results = []
    for sub in (None, 3):
        args = MultiSampleDPOConfig(**base_args(tmp_path, loss_type="ipo", per_device_train_batch_size=4,
                                                completion_sub_batch_size=sub, divergence="jsd"))
        trainer = MultiSampleDPOTrainer(model=make_model(perturb=0.02), ref_model=make_model(), args=args,
                                        train_dataset=ds, processing_class=tokenizer)
        results.append(_grads_after_one_batch(trainer))
    (l1, g1), (l2, g2) = results
    torch.testing.assert_close(l1, l2, rtol=0, atol=1e-5)
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], rtol=0, atol=1e-5, msg=k)


def test_precomputed_reference_with_groups(make_model, tokenizer, tmp_path):
    ds = sentiment_groups("train", num_samples=6, n_chosen=[2, 1], n_rejected=[1, 3])
    res = []
    for pre in (False, True):
        args = MultiSampleDPOConfig(**base_args(tmp_path / str(pre), precompute_ref_log_probs=pre, per_device_train_batch_size=6))
        trainer = MultiSampleDPOTrainer(model=make_model(perturb=0.02), ref_model=make_model(), args=args,
                                        train_dataset=ds, processing_class=tokenizer)
        res.append(_grads_after_one_batch(trainer)[0])
    torch.testing.assert_close(res[0], res[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "row,match",
    [
        ({"prompt": "p", "chosen": "a single string", "rejected": ["x"]}, "must be a list of completions"),
        ({"prompt": "p", "chosen": [], "rejected": ["x"]}, "group is empty"),
        ({"prompt": "p", "chosen": [[{"role": "assistant", "content": "b"}]],
          "rejected": [[{"role": "assistant", "content": "c"}]]}, r"use one format \(plain text or chat messages\)"),
    ],
)
def test_bad_group_rows(row, match, make_model, tokenizer, tmp_path):
    with pytest.raises(DatasetError, match=match):
        MultiSampleDPOTrainer(model=make_model(), ref_model=make_model(), args=MultiSampleDPOConfig(**base_args(tmp_path)),
                              train_dataset=Dataset.from_list([row]), processing_class=tokenizer)


def test_groups_are_never_split_across_two_data_parallel_processes(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent / "scripts" / "multisample_ddp.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                           str(script), str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 and r["steps"] == 2 for r in ranks)
    assert all(r["whole"] for r in ranks), ranks
    assert ranks[0]["batches"] != ranks[1]["batches"]  # the ranks really got different rows


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_shared_prefix_gives_the_same_loss_and_gradients(attn, loss_type, tiny_model_path, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    def model(perturb):
        m = AutoModelForCausalLM.from_pretrained(tiny_model_path, attn_implementation=attn)
        if perturb:
            g = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(0.02 * torch.randn(p.shape, generator=g))
        return m

    ds = sentiment_groups("train", num_samples=4, n_chosen=[3, 1], n_rejected=[2, 4], conversational=True)
    results = []
    for shared in (False, True):
        args = MultiSampleDPOConfig(**base_args(tmp_path, loss_type=loss_type, per_device_train_batch_size=4,
                                                shared_prefix=shared, nll_weight=0.1, divergence="forward_kl"))
        trainer = MultiSampleDPOTrainer(model=model(True), ref_model=model(False), args=args, train_dataset=ds,
                                        processing_class=tokenizer)
        results.append(_grads_after_one_batch(trainer))
    (l1, g1), (l2, g2) = results
    # Packing changes the order of float32 sums inside attention: differences scale with the values' size.
    # Measured (1 and 2 threads, and ATEN_CPU_CAPABILITY=default for another CPU's rounding): the loss (1.4 or 26) within
    # 5.7e-6, 2.2e-7 of its size; a gradient within 8.6e-6 of its largest entry. Both were checked at
    # 1e-5 absolute / relative, within 2x of that; now 1e-5 of the loss's size and 5e-5 of the largest entry
    # (6-45x the rounding seen). A mask that lets each token see the one before it across packed completions
    # misses these by 11-22x (loss) and 1000x (gradients).
    torch.testing.assert_close(l1, l2, rtol=0, atol=1e-5 * max(1.0, l1.abs().item()))
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], rtol=0, atol=5e-5 * max(1.0, g1[k].abs().max().item()), msg=k)


def test_per_row_chat_template_kwargs_are_applied_as_trl_applies_them(make_model, tokenizer, pair_dataset, tmp_path):
    """A `chat_template_kwargs` column (and `tools`) reaches the chat template for every row, as in TRL's DPOTrainer:
    with groups of one, the tokenized prompts and completions are TRL's, and differ from those without the column."""
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}{% if m['role'] == 'user' %} as "
                         "{{ persona | default('nobody') }}{% endif %}>{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    pairs = pair_dataset(6, conversational=True)
    personas = [{"persona": p} for p in ("pirate", "poet", "pirate", "judge", "poet", "child")]
    with_kwargs = pairs.add_column("chat_template_kwargs", personas)

    def prepared(cls, config_cls, data, out):
        trainer = cls(model=make_model(), ref_model=make_model(), args=config_cls(**base_args(tmp_path / out)),
                      train_dataset=data, processing_class=tok)
        return trainer.train_dataset.to_dict()

    ours = prepared(MultiSampleDPOTrainer, MultiSampleDPOConfig, _as_groups(with_kwargs).add_column(
        "chat_template_kwargs", personas), "ours")
    trl = prepared(DPOTrainer, DPOConfig, with_kwargs, "trl")
    plain = prepared(MultiSampleDPOTrainer, MultiSampleDPOConfig, _as_groups(pairs), "plain")
    assert ours["prompt_ids"] == trl["prompt_ids"] != plain["prompt_ids"]
    assert [c[0] for c in ours["chosen_ids"]] == trl["chosen_ids"]
    assert [r[0] for r in ours["rejected_ids"]] == trl["rejected_ids"]
