"""PPOTrainer: learns, matches the documented penalties, resumes, refuses bad input, and reward models
from CausalRewardTrainer plug into it and into TRL's GRPOTrainer."""

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from alignkit import PPOConfig, PPOTrainer
from alignkit.divergences import get_divergence
from tests.conftest import base_args

TARGET = "e"


def _count_target(prompts, completions):
    """A reward that prefers one token (here a character, frequent enough for a random-init policy to find):
    how often TARGET appears in the completion, / 4."""
    return [c.count(TARGET) / 4 for c in completions]


def _token_reward_model(tiny_model_path, tokenizer, token=" great"):
    """A sequence-classification reward model that prefers one token: its transformer blocks are silenced (the
    residual stream stays the token embedding) and the score head reads the agreement of the last token's
    normalised embedding with the target's: 5 for the target, about -2..2 for other tokens."""
    (target,) = tokenizer(token, add_special_tokens=False)["input_ids"]
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_model_path, num_labels=1)
    with torch.no_grad():
        for layer in rm.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        e = rm.model.norm(rm.model.embed_tokens.weight[target][None])[0]
        rm.score.weight.copy_(5 * e / e.norm() ** 2)
    assert rm(input_ids=torch.tensor([[5, 6, target]])).logits.item() == pytest.approx(5.0, rel=1e-4)
    return rm


@pytest.fixture
def prompts():
    from alignkit.data.synthetic import sentiment

    return sentiment("train", num_samples=64).select_columns(["prompt"])


def _trainer(tiny_model_path, tokenizer, prompts, tmp_path, reward=_count_target, seed=0, **kw):
    """`seed` seeds the value head's initialisation and the run (prompt order, sampling): change it to measure
    the seed-to-seed spread of what a test asserts."""
    torch.manual_seed(seed)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    value = AutoModelForSequenceClassification.from_pretrained(tiny_model_path, num_labels=1)
    args = dict(base_args(tmp_path, seed=seed), per_device_train_batch_size=16, num_ppo_epochs=4, response_length=8,
                learning_rate=1e-2, lr_scheduler_type="constant", temperature=1.0, kl_coef=0.05, logging_steps=1)
    eval_dataset = kw.pop("eval_dataset", None)
    args.update(kw)
    return PPOTrainer(args=PPOConfig(**args), processing_class=tokenizer, model=policy, ref_model=ref,
                      reward_model=reward, value_model=value, train_dataset=prompts, eval_dataset=eval_dataset)


def _gain(scores):
    """How much a run raised the mean score: the mean over its second half minus the mean of its first 3
    iterations (the policy is still about the reference there). Averages over many iterations, so one noisy
    batch or a late dip (a policy that found the best token and briefly left it) does not decide the outcome."""
    half = len(scores) // 2
    return sum(scores[-half:]) / half - sum(scores[:3]) / 3


# What the spreads below were measured over: seeds 0-9 (`_trainer(seed=...)`: torch.manual_seed and the
# PPOConfig seed) with 1 torch thread, seeds 0-2 (0-4 for the reward function) with 2 threads (identical to 1
# thread on our AMD EPYC with AVX2), and seeds 0-4 with ATEN_CPU_CAPABILITY=default (torch's unvectorised kernels:
# other float rounding, standing in for another CPU). A CI machine's rounding turned seed 0's alpha/loss run at the
# former settings (2-token responses) from 0.26 -> 0.75 (mean score of the first -> last 3 iterations) into
# 0.26 -> 0.60, as a change of seed does.


@pytest.mark.parametrize("placement", ["reward", "loss"])
@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl", "jsd", "alpha"])
def test_ppo_raises_the_reward_for_every_divergence(divergence, placement, tiny_model_path, tokenizer, prompts,
                                                     tmp_path):
    rm = _token_reward_model(tiny_model_path, tokenizer)
    # one-token responses: the reward model reads the last token, so a second token only added noise (with 2
    # tokens the smallest gain measured was 0.47, a policy settling on a token scored ~0.6)
    trainer = _trainer(tiny_model_path, tokenizer, prompts, tmp_path, reward=rm, divergence=divergence,
                       divergence_penalty=placement, alpha=0.5 if divergence == "alpha" else None, max_steps=32,
                       response_length=1)
    trainer.train()
    logs = [e for e in trainer.state.log_history if "objective/scores" in e]
    scores = [e["objective/scores"] for e in logs]
    # measured (see above; 144 runs over the 8 parametrisations): the first 3 iterations score -0.06..0.20, the
    # second half 0.78-5.0 (the policy settles on a token scored ~1-1.5, or on the target, 5); gain 0.83-4.8.
    # 0.4 is half the smallest gain, and 5 standard deviations of a run that learns nothing (sd 0.08).
    assert _gain(scores) > 0.4, scores
    est = [e[f"divergence/{divergence}"] for e in logs]
    assert abs(est[0]) < 1e-3  # the policy starts as the reference (measured: exactly 0, same weights)
    assert all(torch.isfinite(torch.tensor(est))) and est[-1] > 1e-3  # measured 0.64-5.9 at the end


def test_ppo_with_a_reward_function(tiny_model_path, tokenizer, prompts, tmp_path):
    trainer = _trainer(tiny_model_path, tokenizer, prompts, tmp_path, divergence="jsd", divergence_penalty="loss",
                       max_steps=24)
    trainer.train()
    scores = [e["objective/scores"] for e in trainer.state.log_history if "objective/scores" in e]
    # the random-init policy starts near 0.3-0.5 "e" per 4 characters; measured (see above, 20 runs) gain
    # 0.77-3.4 over 24 iterations (second half 1.1-3.7). 0.35 is under half the smallest gain, and 7 standard
    # deviations of a run that learns nothing (sd 0.05).
    assert _gain(scores) > 0.35, scores


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_reverse_kl_reward_penalty_is_k1_or_k3(estimator, tiny_model_path, tokenizer, prompts, tmp_path):
    trainer = _trainer(tiny_model_path, tokenizer, prompts, tmp_path, kl_estimator=estimator, kl_coef=0.3)
    with torch.no_grad():  # move the policy away from the reference so that the penalty is not 0
        for p in trainer.policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    rows = [{"input_ids": tokenizer(prompts[i]["prompt"], add_special_tokens=False)["input_ids"]} for i in range(4)]
    batch = trainer._collate(rows)
    ro = trainer._rollout(batch)
    ids, mask, c = ro["ids"], ro["mask"], ro["context_len"]
    pos = (mask.cumsum(1) - 1).clamp(min=0)

    def logps(model):  # plain forward, independent of the trainer's helpers
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, c - 1:-1] / (1.0 + 1e-7)
        return logits.log_softmax(-1).gather(-1, ids[:, c:, None]).squeeze(-1)

    logr = logps(trainer.policy) - logps(trainer.ref_model)
    k = logr if estimator == "k1" else (torch.exp(-logr) - 1) + logr  # TRL's k1 and k3 (Schulman's estimators)
    expected = -0.3 * k
    last = ro["lengths"].long() - 1
    expected[torch.arange(4), last] += ro["scores"]
    torch.testing.assert_close(ro["rewards"], expected, rtol=0, atol=1e-5)
    assert (k.abs() > 1e-3).any()


def test_per_token_estimator_is_unbiased_for_every_divergence():
    """What PPO subtracts per token, averaged over tokens sampled from pi, is D_f(pi || pi_ref)."""
    g = torch.Generator().manual_seed(0)
    pi = torch.tensor([0.5, 0.3, 0.15, 0.05])
    ref = torch.tensor([0.25, 0.25, 0.25, 0.25])
    samples = torch.multinomial(pi, 200_000, replacement=True, generator=g)
    logr = (pi.log() - ref.log())[samples].double()
    for name, alpha in [("reverse_kl", None), ("forward_kl", None), ("jsd", None), ("alpha", 0.3)]:
        d = get_divergence(name, alpha)
        est = d.estimator(logr)
        exact = d.divergence(pi.log().double(), ref.log().double())  # D_f(pi || ref) = E_ref f(pi/ref)
        se = est.std() / len(est) ** 0.5
        assert abs(est.mean() - exact) < 4 * se, (name, est.mean().item(), exact.item())


def test_resume_continues_like_an_uninterrupted_run(tiny_model_path, tokenizer, prompts, tmp_path):
    full = _trainer(tiny_model_path, tokenizer, prompts, tmp_path / "full", max_steps=4)
    full.train()
    part = _trainer(tiny_model_path, tokenizer, prompts, tmp_path / "part", max_steps=4, save_strategy="steps",
                    save_steps=2)
    part.train()  # writes checkpoint-2 and checkpoint-4
    resumed = _trainer(tiny_model_path, tokenizer, prompts, tmp_path / "part", max_steps=4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "part" / "checkpoint-2"))

    def at(trainer, step):
        return next(e for e in trainer.state.log_history if e.get("step") == step and "objective/scores" in e)

    for key in ("objective/scores", "loss/policy_avg", "loss/value_avg", "divergence/reverse_kl"):
        assert at(resumed, 3)[key] == pytest.approx(at(full, 3)[key], rel=1e-4, abs=1e-5), key
        assert at(resumed, 4)[key] == pytest.approx(at(full, 4)[key], rel=1e-4, abs=1e-5), key


def test_reward_sources_a_model_and_a_function_weighted(tiny_model_path, tokenizer, prompts, tmp_path):
    """`reward_model` takes a list of reward sources (alignkit.rewards.RewardSource): the score is their sum
    weighted by `reward_weights`, and each source's own scores are logged under TRL GRPO's names."""
    rm = _token_reward_model(tiny_model_path, tokenizer)
    trainer = _trainer(tiny_model_path, tokenizer, prompts, tmp_path, reward=[rm, _count_target],
                       reward_weights=[1.0, 0.5], max_steps=2)
    trainer.train()
    names = trainer.reward_func_names
    assert names[1] == "_count_target" and len(trainer.reward_funcs) == 2
    for e in (e for e in trainer.state.log_history if "objective/scores" in e):
        assert e["objective/scores"] == pytest.approx(e[f"rewards/{names[0]}/mean"]
                                                      + 0.5 * e["rewards/_count_target/mean"], abs=1e-5)
    with pytest.raises(ValueError, match="reward_weights has 1 weights for 2 reward sources"):
        _trainer(tiny_model_path, tokenizer, prompts, tmp_path, reward=[rm, _count_target], reward_weights=[1.0])


def test_bad_inputs(tiny_model_path, tokenizer, prompts, tmp_path):
    two = AutoModelForSequenceClassification.from_pretrained(tiny_model_path, num_labels=2)
    with pytest.raises(ValueError, match="one output"):
        _trainer(tiny_model_path, tokenizer, prompts, tmp_path, reward=two)
    with pytest.raises(ValueError, match="'prompt' column"):
        _trainer(tiny_model_path, tokenizer, Dataset.from_list([{"query": "hi"}] * 4), tmp_path)
    import copy

    no_pad = copy.deepcopy(tokenizer)
    no_pad.pad_token = None
    with pytest.raises(ValueError, match="no pad token"):
        _trainer(tiny_model_path, no_pad, prompts, tmp_path)
    with pytest.raises(ValueError, match="divergence_penalty"):
        PPOConfig(**base_args(tmp_path, divergence_penalty="both"))


def test_a_saved_causal_reward_model_drives_ppo_and_trl_grpo(tiny_model_path, tokenizer, prompts, tmp_path):
    from trl import GRPOConfig, GRPOTrainer

    from alignkit import CausalRewardConfig, CausalRewardTrainer
    from alignkit.data.synthetic import sycophancy

    rm = AutoModelForSequenceClassification.from_pretrained(tiny_model_path, num_labels=1)
    crm = CausalRewardTrainer(model=rm, args=CausalRewardConfig(**base_args(tmp_path / "crm", attributes=["sycophantic"])),
                              train_dataset=sycophancy("train", num_samples=16), processing_class=tokenizer)
    crm.train()
    crm.save_model(str(tmp_path / "crm" / "final"))
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "crm" / "final")

    ppo = _trainer(tiny_model_path, tokenizer, prompts, tmp_path / "ppo", reward=loaded, max_steps=2)
    ppo.train()
    assert all(torch.isfinite(torch.tensor(e["objective/scores"])) for e in ppo.state.log_history
               if "objective/scores" in e)

    grpo_args = GRPOConfig(**base_args(tmp_path / "grpo", per_device_train_batch_size=4, max_steps=1),
                           num_generations=4, max_completion_length=8)
    grpo = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_path), reward_funcs=loaded,
                       reward_processing_classes=tokenizer, args=grpo_args, train_dataset=prompts,
                       processing_class=tokenizer)
    grpo.train()
    assert any("reward" in k for e in grpo.state.log_history for k in e)


def test_lora_policy_uses_the_disabled_adapter_as_reference(tiny_model_path, tokenizer, prompts, tmp_path):
    from peft import LoraConfig

    torch.manual_seed(0)
    args = PPOConfig(**dict(base_args(tmp_path), per_device_train_batch_size=16, num_ppo_epochs=4, response_length=8,
                            learning_rate=1e-2, temperature=1.0, logging_steps=1, max_steps=3))
    trainer = PPOTrainer(args=args, processing_class=tokenizer, model=AutoModelForCausalLM.from_pretrained(tiny_model_path),
                         reward_model=_count_target,
                         value_model=AutoModelForSequenceClassification.from_pretrained(tiny_model_path, num_labels=1),
                         train_dataset=prompts, peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    trainer.train()
    est = [e["divergence/reverse_kl"] for e in trainer.state.log_history if "divergence/reverse_kl" in e]
    assert abs(est[0]) < 1e-6 and est[-1] > 1e-4  # LoRA B starts at 0: policy == reference, then moves away
    log = next(e for e in trainer.state.log_history if "objective/scores" in e)
    for key in ("time/generation", "time/forward", "time/scoring", "time/optimisation", "objective/entropy",
                "loss/value_avg", "policy/clipfrac_avg", "val/clipfrac_avg", "response/length", "divergence/jsd"):
        assert key in log, key
    trainer.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / "adapter_model.safetensors").exists()


def test_config_takes_the_fields_of_trls_former_ppo_config(tmp_path):
    """A script written for trl.experimental.ppo.PPOConfig (TRL <= 1.12) builds our config unchanged."""
    former = dict(exp_name="ppo", reward_model_path="rm", sft_model_path="sft", num_ppo_epochs=4, whiten_rewards=False,
                  kl_coef=0.05, kl_estimator="k3", cliprange=0.2, vf_coef=0.1, cliprange_value=0.2, gamma=1.0,
                  lam=0.95, ds3_gather_for_generation=True, dataset_num_proc=None, num_mini_batches=1,
                  total_episodes=None, local_rollout_forward_batch_size=64, num_sample_generations=10,
                  response_length=53, stop_token="eos", stop_token_id=None, temperature=0.7, missing_eos_penalty=1.0)
    cfg = PPOConfig(**base_args(tmp_path), **former)
    assert cfg.kl_estimator == "k3" and cfg.divergence == "reverse_kl" and cfg.divergence_penalty == "reward"
    with pytest.raises(ValueError, match="not supported"):
        PPOConfig(**base_args(tmp_path), ref_adapter_name="ref")


def test_ppo_under_ddp_keeps_the_ranks_in_sync(tmp_path):
    """2 CPU processes, different prompts per rank; after 3 iterations every rank holds the same weights (the
    update goes through the DDP wrapper), and they moved."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                           str(root / "tests" / "scripts" / "ppo_ddp.py"), str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2 and r0["iterations"] == r1["iterations"] == 3
    assert r0["first_batch"] != r1["first_batch"]  # each rank generated for its own prompts
    assert r0["before"] == pytest.approx(r1["before"], abs=1e-9)
    assert r0["after"] == pytest.approx(r1["after"], rel=1e-9) and abs(r0["after"] - r0["before"]) > 1e-3


# ---- evaluation during training, samples, checkpoints, collator, former TRL fields (issue 14) -----------------

def _small(tiny_model_path, tokenizer, prompts, tmp_path, **kw):
    args = dict(per_device_train_batch_size=8, num_ppo_epochs=1, response_length=2, max_steps=4,
                num_sample_generations=0)
    args.update(kw)
    return _trainer(tiny_model_path, tokenizer, prompts, tmp_path, **args)


def _train_logs(trainer):
    trainer.train()
    return [{k: v for k, v in log.items() if not k.startswith(("eval_", "time/", "perf/", "train_runtime", "train_iter"))}
            for log in trainer.state.log_history if not any(k.startswith("eval_") for k in log)]


def test_evaluation_every_eval_steps_reports_and_never_changes_training(tiny_model_path, tokenizer, prompts,
                                                                         tmp_path):
    eval_prompts = prompts.select(range(10))
    with_eval = _small(tiny_model_path, tokenizer, prompts, tmp_path / "a", eval_strategy="steps", eval_steps=2,
                       per_device_eval_batch_size=4, eval_dataset=eval_prompts)
    logs_a = _train_logs(with_eval)
    evals = [log for log in with_eval.state.log_history if "eval_objective/scores" in log]
    assert [log["step"] for log in evals] == [2, 4]
    for log in evals:
        assert log["eval_samples"] == 10 and log["eval_response/length"] > 0
        assert {f"eval_divergence/{d}" for d in ("reverse_kl", "forward_kl", "jsd", "alpha")} <= set(log)
    # the same run without evaluation trains identically (evaluation samples under a forked RNG)
    logs_b = _train_logs(_small(tiny_model_path, tokenizer, prompts, tmp_path / "b"))
    assert logs_a == logs_b
    # and evaluating twice gives the same figures
    again = with_eval.evaluate()
    assert again["eval_objective/scores"] == with_eval.evaluate()["eval_objective/scores"]


def test_train_returns_the_mean_loss_and_old_logprobs_are_computed_without_dropout(tiny_model_path, tokenizer,
                                                                                  prompts, tmp_path):
    trainer = _small(tiny_model_path, tokenizer, prompts, tmp_path)
    result = trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 4 and result.training_loss == pytest.approx(sum(losses) / 4, rel=1e-6)
    assert result.training_loss != 0.0
    # old log-probs: with dropout in the policy, the rollout's log-probs equal an eval-mode forward
    policy = trainer.accelerator.unwrap_model(trainer.model).policy
    policy.config.attention_dropout = 0.5
    for layer in policy.model.layers:
        layer.self_attn.attention_dropout = 0.5
    batch = next(trainer._prompt_batches(0))
    ro = trainer._rollout(batch)
    from alignkit.trainers.rollout import response_logprobs

    policy.eval()
    with torch.no_grad():
        expected, _ = response_logprobs(policy, ro["ids"], ro["mask"], ro["context_len"], trainer.args.temperature)
    torch.testing.assert_close(ro["logp"], expected, rtol=0, atol=1e-6)


def test_divergence_penalty_normalization_in_the_loss(tiny_model_path, tokenizer, prompts, tmp_path):
    losses = {}
    for norm in ("sum", "length_plus_one"):
        trainer = _small(tiny_model_path, tokenizer, prompts, tmp_path / norm, divergence_penalty="loss",
                         divergence_penalty_normalization=norm, response_length=4)
        torch.manual_seed(0)
        ro = trainer._rollout(next(trainer._prompt_batches(0)))
        ro["ref_logp"] = ro["ref_logp"] - 0.3  # a policy away from its reference
        idx = torch.arange(ro["ids"].size(0))
        _, stats = trainer._ppo_loss(ro, idx)
        lengths = ro["response_mask"].sum(1)
        losses[norm] = (stats["div_loss"].item(), lengths)
    (s, lengths), (n, _) = losses["sum"], losses["length_plus_one"]
    # the same rollouts (seeded), so the estimates per sequence agree; with equal lengths L, sum = (L + 1) * norm
    assert torch.all(lengths == lengths[0])
    assert s == pytest.approx(n * (lengths[0].item() + 1), rel=1e-5)
    with pytest.raises(ValueError, match="divergence_penalty_normalization must be one of sum, length_plus_one"):
        PPOConfig(**base_args(tmp_path, divergence_penalty_normalization="mean"))


@pytest.mark.parametrize("strategy,expected", [("no", []), ("steps", ["checkpoint-2", "checkpoint-4"]),
                                               ("epoch", ["checkpoint-4"])])
def test_every_save_strategy_is_honoured(strategy, expected, tiny_model_path, tokenizer, prompts, tmp_path):
    # 64 prompts, 16 per iteration: an epoch is 4 iterations
    trainer = _small(tiny_model_path, tokenizer, prompts, tmp_path, per_device_train_batch_size=16,
                     save_strategy=strategy, save_steps=2)
    trainer.train()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == expected
    with pytest.raises(ValueError, match="save_strategy 'best'"):
        PPOConfig(**base_args(tmp_path, save_strategy="best", eval_strategy="steps", metric_for_best_model="loss"))


def test_data_collator_and_sample_generations_are_used(tiny_model_path, tokenizer, prompts, tmp_path):
    calls = []
    trainer = _small(tiny_model_path, tokenizer, prompts, tmp_path, num_sample_generations=2,
                     per_device_eval_batch_size=3)

    def collator(rows):
        calls.append(len(rows))
        return trainer._collate(rows)

    trainer.data_collator = collator
    trainer.train()
    assert calls and calls[0] == 8  # every training batch goes through the given collator
    import json

    files = sorted(p.name for p in (tmp_path / "samples").glob("*.jsonl"))
    assert files == ["step_2.jsonl", "step_4.jsonl"]
    rows = [json.loads(line) for line in (tmp_path / "samples" / "step_4.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and set(rows[0]) == {"step", "prompt", "completion", "score"}


def test_former_trl_model_paths_load_the_models(tiny_model_path, tokenizer, prompts, tmp_path):
    args = PPOConfig(**base_args(tmp_path, sft_model_path=tiny_model_path, reward_model_path=tiny_model_path,
                                 max_steps=1, per_device_train_batch_size=8, response_length=2, num_ppo_epochs=1,
                                 num_sample_generations=0))
    trainer = PPOTrainer(args=args, processing_class=tokenizer, train_dataset=prompts)
    assert trainer.ref_model is not None and trainer.value_model is not None
    assert trainer.reward_model.config.num_labels == 1
    trainer.train()
    assert args.run_name == "ppo"  # exp_name names the run when run_name is unset
    with pytest.raises(ValueError, match="both `model` and `sft_model_path`"):
        PPOTrainer(args=args, processing_class=tokenizer, model=AutoModelForCausalLM.from_pretrained(tiny_model_path),
                   train_dataset=prompts)


def test_gradient_accumulation_equals_the_larger_micro_batch(tiny_model_path, tokenizer, prompts, tmp_path):
    """gradient_accumulation_steps=2 with micro-batches of 4 is one update per mini-batch of 8, as a micro-batch of
    8 is (it used to step the optimizer after every micro-batch: transformers 5 leaves accumulation to the loop).
    Responses have a fixed length (no stop token), so each micro-batch mean weighs the same number of tokens."""
    def run(out, **kw):
        trainer = _small(tiny_model_path, tokenizer, prompts, out, num_ppo_epochs=2, max_steps=3, **kw)
        trainer.train()
        return [log["loss"] for log in trainer.state.log_history if "loss" in log], trainer

    accumulated, a = run(tmp_path / "ga2", per_device_train_batch_size=4, gradient_accumulation_steps=2)
    whole, b = run(tmp_path / "ga1", per_device_train_batch_size=8)
    assert accumulated == pytest.approx(whole, rel=1e-4)
    # Summing two micro-batch gradients instead of one batch's reorders float additions: the parameters then differ
    # by at most 1.2e-5 (measured with 1, 2 and 4 threads; CI saw 1.16e-5). Two optimizer steps per mini-batch, the
    # defect this guards against, moves them by up to 0.16 (0.037 on average), so 1e-4 separates the two cleanly.
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-4)


@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_is_applied_and_changes_nothing_but_memory(lora, tiny_model_path, tokenizer, prompts,
                                                                          tmp_path):
    """`gradient_checkpointing: true` recomputes the policy's and the value model's activations in the backward pass
    (PPO's own loop used to leave it off without a word): the modules are checkpointed, and the run gives the same
    losses and weights as without it. Recomputation runs the same float operations: measured, the losses and weights
    are bit-identical (full and LoRA, 1 and 2 threads); the tolerances only allow for another CPU's kernels."""
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")

    def run(out, **kw):
        torch.manual_seed(0)
        policy = AutoModelForCausalLM.from_pretrained(tiny_model_path)
        value = AutoModelForSequenceClassification.from_pretrained(tiny_model_path, num_labels=1)
        args = dict(base_args(out), per_device_train_batch_size=8, num_ppo_epochs=2, response_length=4,
                    learning_rate=1e-2, temperature=1.0, max_steps=2, num_sample_generations=0, **kw)
        trainer = PPOTrainer(args=PPOConfig(**args), processing_class=tokenizer, model=policy,
                             ref_model=None if lora else AutoModelForCausalLM.from_pretrained(tiny_model_path),
                             reward_model=_count_target, value_model=value, train_dataset=prompts,
                             peft_config=peft_config)
        trainer.train()
        return trainer, [log["loss"] for log in trainer.state.log_history if "loss" in log]

    plain, plain_losses = run(tmp_path / "plain")
    ckpt, ckpt_losses = run(tmp_path / "ckpt", gradient_checkpointing=True)
    unwrapped = ckpt.accelerator.unwrap_model(ckpt.model)
    for module in (unwrapped.policy, unwrapped.value_model):
        base = module.get_base_model() if hasattr(module, "get_base_model") else module
        assert base.is_gradient_checkpointing, type(module).__name__
    assert not plain.accelerator.unwrap_model(plain.model).policy.is_gradient_checkpointing
    assert ckpt_losses == pytest.approx(plain_losses, rel=1e-6, abs=1e-7)
    for p, q in zip(plain.model.parameters(), ckpt.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
