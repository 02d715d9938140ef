"""OnlineMultiSampleTrainer (online mDPO / mIPO): the group split, MultiSampleDPOTrainer's loss on fixed groups,
learning on a known reward, the metrics, and bad input."""

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from alignkit import MultiSampleDPOConfig, MultiSampleDPOTrainer, OnlineMultiSampleConfig, OnlineMultiSampleTrainer
from alignkit.losses import split_groups_by_reward
from tests.conftest import base_args
from tests.test_ppo import _count_target


# ---- the group split (alignkit.losses.split_groups_by_reward) -------------------------------------------------

def test_top_bottom_takes_the_best_and_the_worst_and_skips_flat_groups():
    r = torch.tensor([[0.1, 0.9, 0.5, 0.3],
                      [2.0, 2.0, 2.0, 2.0],   # no spread: skipped
                      [1.0, 1.0, 1.0, 0.0]])  # a tie across the boundary: broken by position
    g = split_groups_by_reward(r, "top_bottom", num_chosen=2, num_rejected=1)
    assert g.kept.tolist() == [True, False, True]
    assert g.chosen.tolist() == [[False, True, True, False], [False] * 4, [True, True, False, False]]
    assert g.rejected.tolist() == [[True, False, False, False], [False] * 4, [False, False, False, True]]
    # min_reward_spread: a spread of 0.8 is not enough for 1.0
    assert split_groups_by_reward(r, "top_bottom", min_spread=1.0).kept.tolist() == [False, False, False]


def test_above_below_mean_leaves_the_mean_out():
    r = torch.tensor([[0.0, 1.0, 2.0, 3.0, 1.5], [5.0, 5.0, 5.0, 5.0, 5.0]])
    g = split_groups_by_reward(r, "above_below_mean")
    assert g.kept.tolist() == [True, False]
    assert g.chosen[0].tolist() == [False, False, True, True, False]
    assert g.rejected[0].tolist() == [True, True, False, False, False]
    assert not g.chosen[1].any() and not g.rejected[1].any()


def test_split_refuses_impossible_sizes():
    with pytest.raises(ValueError, match="num_chosen \\+ num_rejected <= 3"):
        split_groups_by_reward(torch.zeros(2, 3), "top_bottom", num_chosen=2, num_rejected=2)
    with pytest.raises(ValueError, match="grouping must be one of"):
        split_groups_by_reward(torch.zeros(2, 3), "best_worst")


# ---- bad input ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(num_generations=1), "num_generations must be >= 2"),
    (dict(num_generations=4, num_chosen=3, num_rejected=2), r"num_chosen \+ num_rejected \(3 \+ 2\) must be <= "
                                                            r"num_generations \(4\)"),
    (dict(num_chosen=0), "num_chosen and num_rejected must be >= 1"),
    (dict(grouping="best"), "grouping must be one of top_bottom, above_below_mean"),
    (dict(loss_type="hinge"), "loss_type must be 'sigmoid' \\(mDPO\\) or 'ipo' \\(mIPO\\)"),
    (dict(beta=0.0), "beta must be > 0"),
    (dict(num_iterations=0), "num_iterations must be >= 1"),
    (dict(top_p=0.0), "top_p must be in"),
])
def test_bad_config(kwargs, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        OnlineMultiSampleConfig(**base_args(tmp_path, **kwargs))


def test_bad_trainer_input(tiny_model_path, tokenizer, tmp_path):
    prompts = Dataset.from_list([{"prompt": "hello "}] * 8)

    def build(**kw):
        args = kw.pop("args", None) or OnlineMultiSampleConfig(**base_args(tmp_path))
        return OnlineMultiSampleTrainer(args=args, processing_class=tokenizer,
                                        model=AutoModelForCausalLM.from_pretrained(tiny_model_path),
                                        ref_model=AutoModelForCausalLM.from_pretrained(tiny_model_path),
                                        train_dataset=prompts, **kw)

    with pytest.raises(ValueError, match="needs a reward source: pass reward_model="):
        build()
    with pytest.raises(ValueError, match="needs a reward source"):
        build(reward_funcs=[])
    with pytest.raises(ValueError, match="not both"):
        build(reward_model=_count_target, reward_funcs=[_count_target])
    with pytest.raises(ValueError, match="reward_weights has 1 weights for 2 reward sources"):
        build(reward_funcs=[_count_target, _count_target],
              args=OnlineMultiSampleConfig(**base_args(tmp_path, reward_weights=[1.0])))


# ---- fixed groups: MultiSampleDPOTrainer's loss and gradients ---------------------------------------------------

def _perturbed(path, perturb):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if perturb:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(perturb * torch.randn(p.shape, generator=g))
    return model


# mIPO at beta 1 (c = 1/2): at beta 0.1 the loss is about (0 - 5)^2 = 25, where float32's spacing is 1.9e-6 and the two
# batch layouts (left-padded prompts here, right-padded rows there) differ by a few of those: an absolute 1e-6 needs a
# loss of order 1.
@pytest.mark.parametrize("options", [
    dict(loss_type="sigmoid"),
    dict(loss_type="sigmoid", divergence="alpha", alpha=0.3),
    dict(loss_type="ipo", divergence="jsd", beta=1.0),
    dict(loss_type="ipo", divergence="forward_kl", beta=1.0, nll_weight=0.3),
])
def test_fixed_groups_of_one_give_multisample_dpo_loss_and_gradients(options, tiny_model_path, tokenizer, pair_dataset,
                                                                     tmp_path):
    """Two generations per prompt (one per side), injected in place of sampling: the loss and every gradient equal
    MultiSampleDPOTrainer's on the same groups."""
    pairs = pair_dataset(6)
    groups = Dataset.from_list([{"prompt": r["prompt"], "chosen": [r["chosen"]], "rejected": [r["rejected"]]}
                                for r in pairs])
    ms = MultiSampleDPOTrainer(model=_perturbed(tiny_model_path, 0.02), ref_model=_perturbed(tiny_model_path, 0),
                               args=MultiSampleDPOConfig(**base_args(tmp_path / "ms", per_device_train_batch_size=6,
                                                                     **options)),
                               train_dataset=groups, processing_class=tokenizer)
    rows = [ms.train_dataset[i] for i in range(len(groups))]
    chosen_text = {tokenizer.decode(r["chosen_ids"][0], skip_special_tokens=True) for r in rows}
    assert len(chosen_text) == len(rows)

    def reward(prompts, completions):  # knows which completion the data prefers
        return [float(c in chosen_text) for c in completions]

    online = OnlineMultiSampleTrainer(
        args=OnlineMultiSampleConfig(**base_args(tmp_path / "online", per_device_train_batch_size=6, num_generations=2,
                                                 response_length=64, **options)),
        processing_class=tokenizer, model=_perturbed(tiny_model_path, 0.02),
        ref_model=_perturbed(tiny_model_path, 0), reward_funcs=[reward],
        train_dataset=Dataset.from_list([{"input_ids": r["prompt_ids"]} for r in rows]))  # the same prompt tokens

    def fixed_generate(input_ids, attention_mask, generation_config, **_):
        # prompt p's two samples: rejected first, so the split must come from the reward; padded after the EOS
        comps = [c for r in rows for c in (r["rejected_ids"][0], r["chosen_ids"][0])]
        assert input_ids.size(0) == len(comps)
        width = max(map(len, comps))
        pad = tokenizer.pad_token_id
        tail = torch.tensor([list(c) + [pad] * (width - len(c)) for c in comps])
        return torch.cat([input_ids, tail], 1)

    online.policy.generate = fixed_generate  # the test's stand-in for sampling
    ro = online._group_rollout(online._collate([{"input_ids": r["prompt_ids"]} for r in rows]))
    assert ro["groups"].kept.all() and ro["groups"].chosen[:, 1].all() and ro["groups"].rejected[:, 0].all()
    online.model.train()
    rows_total, tokens_total = online._update_counts(ro)
    loss, _ = online._group_loss(ro, torch.arange(len(rows)), rows_total, tokens_total)
    loss.backward()
    grads = {n: p.grad for n, p in online.policy.named_parameters() if p.grad is not None}

    ms.model.train()
    ms_loss = ms.compute_loss(ms.model, next(iter(ms.get_train_dataloader())))
    ms_loss.backward()
    ms_grads = {n: p.grad for n, p in ms.model.named_parameters() if p.grad is not None}
    torch.testing.assert_close(loss.detach(), ms_loss.detach(), rtol=0, atol=1e-6)
    assert grads.keys() == ms_grads.keys() and grads
    # Gradients within 1e-6. With the NLL term they are 7x larger (largest entry 0.51, the tied embedding's) and
    # float32 rounding follows: measured, ours within 2.3e-6 of MultiSampleDPOTrainer's; ours in float64 within 4.9e-6
    # of it, so the gap is that path's own float32 rounding (~1e-5 of the largest entry), not a different loss. There
    # the bound is 2e-5 of the largest entry (1e-5 here).
    atol = 1e-6 if not options.get("nll_weight") else 2e-5 * max(g.abs().max().item() for g in ms_grads.values())
    for k in grads:
        torch.testing.assert_close(grads[k], ms_grads[k], rtol=0, atol=atol, msg=k)
    assert ms_loss.abs().item() > 1e-3  # not a trivial 0 = 0


# ---- learning on a known reward ---------------------------------------------------------------------------------

@pytest.fixture
def prompts():
    from alignkit.data.synthetic import sentiment

    return sentiment("train", num_samples=64).select_columns(["prompt"])


def _online(tiny_model_path, tokenizer, prompts, tmp_path, seed=0, reward=_count_target, eval_dataset=None, **kw):
    """`seed` seeds the run (prompt order, sampling): change it to measure the seed-to-seed spread."""
    torch.manual_seed(seed)
    args = dict(base_args(tmp_path, seed=seed), per_device_train_batch_size=8, response_length=4, learning_rate=1e-2,
                lr_scheduler_type="constant", loss_type="ipo", beta=0.1, num_generations=4, stop_token=None,
                num_sample_generations=0)
    args.update(kw)
    return OnlineMultiSampleTrainer(args=OnlineMultiSampleConfig(**args), processing_class=tokenizer,
                                    model=AutoModelForCausalLM.from_pretrained(tiny_model_path),
                                    ref_model=AutoModelForCausalLM.from_pretrained(tiny_model_path),
                                    reward_funcs=[reward], train_dataset=prompts, eval_dataset=eval_dataset)


def _gain(scores):
    """The mean score over a run's second half minus the mean of its first 3 iterations (as tests/test_ppo.py)."""
    half = len(scores) // 2
    return sum(scores[-half:]) / half - sum(scores[:3]) / 3


# Measured with 1 torch thread (`_online(seed=...)` settings, seeds 0-7, run outside pytest), the gain
# of `_gain` (reward: "e" characters per 4 of a 4-token completion, from about 0.2-0.5 at the start):
#   reverse_kl, beta 0.1, 24 iterations: 1.39 0.80 2.17 1.91 2.27 1.86 0.70 1.74 (min 0.70);
#   jsd,        beta 1.0, 32 iterations: 0.75 0.36 0.45 0.50 0.31 0.57 0.67 0.48 (min 0.31);
#   the same runs at learning_rate 0 (nothing learnt): -0.044..0.061 (8 seeds) and -0.052..0.056 (5 seeds).
# JSD's link saturates (h <= log 2, divided by the length for ipo), so at beta 0.1 its margin target 1/(2 beta) = 5 is
# out of reach and the gain was only 0.14-0.35; beta 1 asks for a reachable margin. The thresholds are half the
# smallest gain measured, and 5x (reverse_kl) / 2.7x (jsd) the largest gain of a run that learns nothing.
@pytest.mark.parametrize("divergence,beta,steps,threshold", [("reverse_kl", 0.1, 24, 0.35), ("jsd", 1.0, 32, 0.15)])
def test_online_mipo_raises_the_reward(divergence, beta, steps, threshold, tiny_model_path, tokenizer, prompts,
                                       tmp_path):
    trainer = _online(tiny_model_path, tokenizer, prompts, tmp_path, divergence=divergence, beta=beta, max_steps=steps)
    trainer.train()
    logs = [e for e in trainer.state.log_history if "reward/mean" in e]
    scores = [e["reward/mean"] for e in logs]
    assert len(logs) == steps
    assert _gain(scores) > threshold, scores
    est = [e[f"divergence/{divergence}"] for e in logs]
    assert abs(est[0]) < 1e-6  # the policy starts as the reference (same weights)
    assert all(torch.isfinite(torch.tensor(est))) and est[-1] > 1e-3
    last = logs[-1]
    for key in ("reward/std", "reward/group_std", "reward/chosen_mean", "reward/rejected_mean", "group/chosen_size",
                "group/rejected_size", "group/skipped_prompts", "divergence/reverse_kl", "divergence/forward_kl",
                "divergence/jsd", "divergence/alpha", "objective/entropy", "response/length", "loss",
                "mipo/variance_correction"):
        assert key in last and torch.isfinite(torch.tensor(float(last[key]))), key
    assert last["group/chosen_size"] == 1 and last["group/rejected_size"] == 1


def test_reward_model_and_weighted_functions_above_below_mean_reuse_and_save(tiny_model_path, tokenizer, prompts,
                                                                             tmp_path):
    """A sequence-classification reward model and a reward function, weighted; groups above / below the mean (sizes
    vary); each batch of generations used for 2 updates; the policy saved as a plain model folder."""
    from tests.test_ppo import _token_reward_model

    rm = _token_reward_model(tiny_model_path, tokenizer)
    calls = []

    def count(prompts, completions):
        calls.append(len(completions))
        return _count_target(prompts, completions)

    torch.manual_seed(0)
    args = OnlineMultiSampleConfig(**base_args(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                                               response_length=3, num_generations=5, grouping="above_below_mean",
                                               num_iterations=2, reward_weights=[1.0, 0.5], max_steps=3,
                                               loss_type="sigmoid", num_sample_generations=0))
    trainer = OnlineMultiSampleTrainer(args=args, processing_class=tokenizer,
                                       model=AutoModelForCausalLM.from_pretrained(tiny_model_path),
                                       ref_model=AutoModelForCausalLM.from_pretrained(tiny_model_path),
                                       reward_funcs=[rm, count], train_dataset=prompts)
    trainer.train()
    assert calls[0] == 8 * 5  # every completion of the iteration's 8 prompts is scored
    logs = [e for e in trainer.state.log_history if "reward/mean" in e]
    assert len(logs) == 3 and trainer.lr_scheduler.last_epoch == 3 * 2  # two updates per iteration
    rm_name = trainer.reward_func_names[0]
    assert trainer.reward_func_names == [rm_name, "count"]  # TRL GRPO's naming: checkpoint folder, __name__
    for e in logs:
        # each source's own scores, logged as TRL's GRPOTrainer logs them; the reward is their weighted sum
        assert e["reward/mean"] == pytest.approx(e[f"rewards/{rm_name}/mean"] + 0.5 * e["rewards/count/mean"],
                                                 abs=1e-5)
        assert e["rewards/count/std"] >= 0
        assert e["group/kept_prompts"] + e["group/skipped_prompts"] == 8
        if e["group/kept_prompts"]:
            assert 1 <= e["group/chosen_size"] <= 4 and 1 <= e["group/rejected_size"] <= 4
            assert e["group/chosen_size"] + e["group/rejected_size"] <= 5
            assert e["reward/chosen_mean"] > e["reward/rejected_mean"]
    trainer.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / "model.safetensors").exists() and not (tmp_path / "final" / "value_model").exists()
    AutoModelForCausalLM.from_pretrained(tmp_path / "final")


def test_two_ddp_processes_train_as_one_with_the_whole_batch(tmp_path):
    """tests/scripts/online_ddp.py with sampling replaced by a deterministic function of the prompt: 2 CPU processes of
    4 prompts each end with the weights of 1 process of 8 (the update is the mean over the kept prompts of every
    process: a prompt of this run is skipped), the ranks hold the same weights, and each prompt's group is sampled,
    scored and trained on by one rank. SGD, so that rounding-level gradient differences stay rounding-level (Adam's
    first step moves every weight by about the learning rate, whatever the gradient's size). Measured: 2 processes
    within 7.5e-9 of 1 process (the weights moved by up to 0.016); ranks identical."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    script = str(root / "tests" / "scripts" / "online_ddp.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    for cmd in ([sys.executable, script, str(one), "8"],
                [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29571",
                 script, str(two), "4"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {(d, r): json.loads((d / f"rank{r}.json").read_text()) for d, r in ((one, 0), (two, 0), (two, 1))}
    assert runs[one, 0]["world"] == 1 and runs[two, 0]["world"] == runs[two, 1]["world"] == 2
    assert runs[one, 0]["kept"] == runs[two, 0]["kept"] and runs[one, 0]["skipped"] == runs[two, 0]["skipped"]
    assert sum(runs[one, 0]["skipped"]) >= 1  # the normalisation over kept prompts is exercised
    # each rank's loss is its share of the global mean: the loss reported is their sum (rank 0 alone: about half)
    assert runs[two, 0]["train_loss"] == pytest.approx(runs[one, 0]["train_loss"], rel=1e-5)
    for run in runs.values():  # samples come in whole groups of 4 (G rows of the same prompt, in a row)
        p = run["prompts"]
        assert all(p[i] == p[i - i % 4] for i in range(len(p)))
    both = sorted(map(tuple, runs[two, 0]["prompts"] + runs[two, 1]["prompts"]))
    assert both == sorted(map(tuple, runs[one, 0]["prompts"]))  # the same prompts, split between the ranks
    w1, w2a, w2b = (torch.load(d / f"rank{r}.pt") for d, r in ((one, 0), (two, 0), (two, 1)))
    for k in w1:
        torch.testing.assert_close(w2a[k], w2b[k], rtol=0, atol=0, msg=k)
        torch.testing.assert_close(w2a[k], w1[k], rtol=0, atol=1e-6, msg=k)


def test_evaluation_sample_tables_and_resume(tiny_model_path, tokenizer, prompts, tmp_path):
    """PPOTrainer's machinery, inherited: evaluation on prompts, tables of samples, and a run resumed from a
    checkpoint (policy only, no value_model/) that continues as the uninterrupted run."""
    import json

    def run(out, **kw):
        return _online(tiny_model_path, tokenizer, prompts, out, max_steps=4, **kw)

    full = run(tmp_path / "full")
    full.train()
    part = run(tmp_path / "part", save_strategy="steps", save_steps=2, num_sample_generations=2,
               per_device_eval_batch_size=3, eval_dataset=prompts.select(range(6)))
    part.train()
    assert (tmp_path / "part" / "checkpoint-2" / "model.safetensors").exists()
    assert not (tmp_path / "part" / "checkpoint-2" / "value_model").exists()
    rows = [json.loads(line) for line in (tmp_path / "part" / "samples" / "step_4.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and set(rows[0]) == {"step", "prompt", "completion", "score"}
    metrics = part.evaluate()
    assert metrics["eval_samples"] == 6 and all(f"eval_divergence/{d}" in metrics for d in ("reverse_kl", "jsd"))
    resumed = run(tmp_path / "part")
    resumed.train(resume_from_checkpoint=str(tmp_path / "part" / "checkpoint-2"))

    def at(trainer, step):
        return next(e for e in trainer.state.log_history if e.get("step") == step and "reward/mean" in e)

    for key in ("reward/mean", "loss", "divergence/reverse_kl", "group/kept_prompts"):
        for step in (3, 4):
            assert at(resumed, step)[key] == pytest.approx(at(full, step)[key], rel=1e-4, abs=1e-5), (key, step)
