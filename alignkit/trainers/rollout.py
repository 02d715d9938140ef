"""PPO's rollout (thesis 2.6.1): sample responses with the current policy, then score them: the log-probs of policy and
reference, the values, the rewards (a reward model or functions), and the advantages (GAE). No parameter changes here;
`update.py` holds the optimisation. `Rollout` is mixed into `PPOTrainer`, whose state it reads."""

from __future__ import annotations

import contextlib
import time
from typing import Callable

import torch
import torch.nn as nn

from .. import _adapter
from ..divergences import get_divergence
from ..losses import gae_advantages, masked_whiten

__all__ = ["Rollout", "PolicyAndValue", "response_logprobs", "response_values", "divergence_estimates",
           "ESTIMATED_DIVERGENCES", "TIMED_PARTS", "now", "RewardFunc"]

RewardFunc = Callable[[list[str], list[str]], list[float]]



def _positions(mask: torch.Tensor) -> torch.Tensor:
    # left padding: positions count real tokens only
    return (mask.cumsum(1) - 1).clamp(min=0)


def response_logprobs(model, ids, mask, context_len: int, temperature: float | None):
    """Log-probs of the response tokens under temperature-scaled logits (as sampled), and the token entropy;
    `temperature=None`: the model's own logits, unscaled."""
    out = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=False)
    logits = out.logits[:, context_len - 1:-1]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # float32 at least (float64 stays)
    if temperature is not None:
        logits = logits / (temperature + 1e-7)
    logp_all = logits.log_softmax(-1)
    logp = logp_all.gather(-1, ids[:, context_len:].unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def response_values(value_model, ids, mask, context_len: int):
    """Per-token values: the value model's score head applied to every position's last hidden state."""
    backbone = getattr(value_model, value_model.base_model_prefix)
    hidden = backbone(input_ids=ids, attention_mask=mask, position_ids=_positions(mask),
                      use_cache=False).last_hidden_state
    head = value_model.score if hasattr(value_model, "score") else value_model.classifier
    return head(hidden).squeeze(-1)[:, context_len - 1:-1].float()


class PolicyAndValue(nn.Module):
    """Policy and value model as one module, so that one optimizer (and one checkpoint) holds both, and the
    training forward goes through the (DDP-)wrapped module, which is what synchronises gradients."""

    def __init__(self, policy, value_model):
        super().__init__()
        self.policy = policy
        self.value_model = value_model

    @property
    def config(self):
        return self.policy.config

    def forward(self, input_ids, attention_mask, context_len: int, temperature: float):
        logp, _ = response_logprobs(self.policy, input_ids, attention_mask, context_len, temperature)
        return logp, response_values(self.value_model, input_ids, attention_mask, context_len)


#: the divergences estimated from every batch of rollouts (divergence/<name>), alpha at 0.5
ESTIMATED_DIVERGENCES = ("reverse_kl", "forward_kl", "jsd", "alpha")


def divergence_estimates(logr: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per sequence, the unbiased estimate of each divergence of `ESTIMATED_DIVERGENCES` from the reference."""
    return {name: (get_divergence(name, 0.5 if name == "alpha" else None).estimator(logr) * mask).sum(1)
            for name in ESTIMATED_DIVERGENCES}


#: the parts of a PPO iteration logged as time/<part> (gather: ZeRO-3 weight gathering, inside generation)
TIMED_PARTS = ("generation", "gather", "forward", "scoring", "optimisation")


def now() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


class Rollout:
    """The rollout half of `PPOTrainer`."""

    # ---- rollout ---------------------------------------------------------------------------------
    def _ref_context(self):
        if self.ref_model is None:
            return self.accelerator.unwrap_model(self.model).policy.disable_adapter()
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def _policy_for_generation(self, model):
        """The policy to generate with, and extra `generate` arguments. Under ZeRO-3 with
        `ds3_gather_for_generation` the policy's weights are gathered on every rank for the duration of `generate`
        (ZeRO's hooks removed meanwhile, as TRL's `unwrap_model_for_generation` does) and sharded again after;
        without it the policy generates from the sharded weights with `synced_gpus=True`, so every rank keeps
        running forwards (which gather the weights collectively) until all ranks are done."""
        if not self._is_zero3:
            yield model.policy, {}
        elif not self.args.ds3_gather_for_generation:
            yield model.policy, {"synced_gpus": True}
        else:
            import deepspeed

            t0 = now()  # time/gather: gathering the weights and sharding them again (part of time/generation)
            with deepspeed.zero.GatheredParameters(list(model.policy.parameters())):
                _adapter.remove_hooks(self.model_wrapped)
                self._timings["gather"] += now() - t0
                try:
                    yield model.policy, {}
                finally:
                    t0 = now()
                    _adapter.add_hooks(self.model_wrapped)
            self._timings["gather"] += now() - t0

    @property
    def _sum_over_processes(self):
        """`None` on one process (the plain masked statistics), else a sum over processes."""
        if self.args.world_size <= 1:
            return None
        return lambda t: self.accelerator.reduce(t, reduction="sum")

    def _token_logprobs(self, model, ids, mask, context_len):
        return response_logprobs(model, ids, mask, context_len, self.args.temperature)

    def _values(self, value_model, ids, mask, context_len):
        return response_values(value_model, ids, mask, context_len)

    def _scores(self, ids, mask, context_len, response_mask) -> torch.Tensor:
        """The weighted sum of the reward sources' scores; each source's own (unweighted) scores are kept for its
        `rewards/<name>/mean` and `/std` metrics (TRL GRPO's names)."""
        total = None
        for k, (weight, source) in enumerate(zip(self.reward_weights, self.reward_funcs)):
            raw = self._score_with(source, ids, mask, context_len, response_mask)
            self._source_scores[k].append(raw)
            total = weight * raw if total is None else total + weight * raw
        return total

    def _score_with(self, reward, ids, mask, context_len, response_mask) -> torch.Tensor:
        """The scores of one reward source: a sequence-classification model, or a function on decoded text."""
        if isinstance(reward, nn.Module):
            # the score at the last real token of each sequence (the RewardTrainer convention)
            last = (mask * torch.arange(mask.size(1), device=mask.device)).argmax(1)
            backbone = getattr(reward, reward.base_model_prefix)
            hidden = backbone(input_ids=ids, attention_mask=mask, position_ids=_positions(mask),
                              use_cache=False).last_hidden_state
            head = reward.score if hasattr(reward, "score") else reward.classifier
            return head(hidden[torch.arange(ids.size(0), device=ids.device), last]).squeeze(-1).float()
        prompts = self.tokenizer.batch_decode(ids[:, :context_len], skip_special_tokens=True)
        completions = [self.tokenizer.decode(r[m.bool()], skip_special_tokens=True)
                       for r, m in zip(ids[:, context_len:], response_mask)]
        return torch.tensor(reward(prompts, completions), dtype=torch.float, device=ids.device)

    def _penalty_per_token(self, logr: torch.Tensor) -> torch.Tensor:
        """The per-token divergence estimate: k1/k3 for reverse KL (as TRL), the unbiased estimator else."""
        if self.divergence.name == "reverse_kl" and self.args.kl_estimator == "k1":
            return logr
        return self.divergence.estimator(logr)

    @torch.no_grad()
    def _generate_and_score(self, batch, values: bool = True) -> dict[str, torch.Tensor]:
        """Sample a response per prompt with the current policy, then (dropout off) the log-probs of policy
        and reference, the token entropy, the values (if asked) and the scores."""
        args, model = self.args, self.accelerator.unwrap_model(self.model)
        device = self.accelerator.device
        prompt_ids, prompt_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        context_len = prompt_ids.size(1)
        self._source_scores = [[] for _ in self.reward_funcs]  # filled by _scores, chunk by chunk
        t0 = now()
        model.eval()
        with self._policy_for_generation(model) as (policy, extra):
            seqs = policy.generate(input_ids=prompt_ids, attention_mask=prompt_mask,
                                   generation_config=self.generation_config, **extra)
        self._timings["generation"] += now() - t0
        response = seqs[:, context_len:]
        # a response ends at its first stop token (kept); everything after is padding
        if self.stop_token_id is not None:
            is_stop = response == self.stop_token_id
            after = (is_stop.cumsum(1) - is_stop.long()) > 0
            has_stop = is_stop.any(1)
        else:
            after = torch.zeros_like(response, dtype=torch.bool)
            has_stop = torch.zeros(response.size(0), dtype=torch.bool, device=device)
        response_mask = (~after).long()
        response = response.masked_fill(after, self.tokenizer.pad_token_id)
        ids = torch.cat([prompt_ids, response], 1)
        mask = torch.cat([prompt_mask, response_mask], 1)

        chunks = {k: [] for k in ("logp", "ref_logp", "values", "scores", "entropy")}
        bs = args.local_rollout_forward_batch_size
        for s in range(0, ids.size(0), bs):
            i, m, rm = ids[s:s + bs], mask[s:s + bs], response_mask[s:s + bs]
            t0 = now()
            logp, ent = self._token_logprobs(model.policy, i, m, context_len)
            with self._ref_context():
                ref_logp, _ = self._token_logprobs(self.ref_model or model.policy, i, m, context_len)
            chunks["logp"].append(logp)
            chunks["entropy"].append(ent)
            chunks["ref_logp"].append(ref_logp)
            if values:
                chunks["values"].append(self._values(model.value_model, i, m, context_len))
            t1 = now()
            chunks["scores"].append(self._scores(i, m, context_len, rm))
            self._timings["forward"] += t1 - t0
            self._timings["scoring"] += now() - t1
        r = {k: torch.cat(v) for k, v in chunks.items() if v}
        model.train()  # the old log-probs and values above were computed with dropout off
        r.update(ids=ids, mask=mask, response_mask=response_mask, context_len=context_len, has_stop=has_stop,
                 source_scores=[torch.cat(c) for c in self._source_scores])
        return r

    def _penalised_scores(self, scores, lengths, has_stop) -> torch.Tensor:
        """The scores the objective uses: `length_penalty` per response token and `missing_eos_penalty` for a
        response without a stop token subtracted."""
        scores = scores - self.args.length_penalty * lengths
        if self.args.missing_eos_penalty is not None:
            scores = scores - self.args.missing_eos_penalty * (~has_stop).float()
        return scores

    @torch.no_grad()
    def _rollout(self, batch) -> dict[str, torch.Tensor]:
        args, device = self.args, self.accelerator.device
        r = self._generate_and_score(batch)
        ids, mask, response_mask, has_stop = r["ids"], r["mask"], r["response_mask"], r["has_stop"]
        context_len = r["context_len"]
        lengths = response_mask.sum(1).float()
        scores = self._penalised_scores(r["scores"], lengths, has_stop)
        maskf = response_mask.float()
        logr = (r["logp"] - r["ref_logp"]) * maskf
        penalty = self._penalty_per_token(logr) * maskf
        rewards = torch.zeros_like(logr)
        if args.divergence_penalty == "reward":
            rewards = rewards - args.kl_coef * penalty
        last = (lengths.long() - 1).clamp(min=0)
        rewards[torch.arange(rewards.size(0), device=device), last] += scores
        if args.whiten_rewards:
            rewards = masked_whiten(rewards, maskf, shift_mean=False, reduce=self._sum_over_processes) * maskf
        values = r["values"] * maskf
        advantages, returns = gae_advantages(rewards, values, maskf, args.gamma, args.lam)
        # whitened over the rollouts of every process: N processes train as one process with the same global batch
        advantages = masked_whiten(advantages, maskf, reduce=self._sum_over_processes) * maskf
        return {"ids": ids, "mask": mask, "response_mask": maskf, "context_len": context_len,
                "logp": r["logp"], "ref_logp": r["ref_logp"], "values": values, "advantages": advantages,
                "returns": returns, "scores": scores, "raw_scores": r["scores"], "penalty": penalty,
                "logr": logr, "entropy": r["entropy"], "lengths": lengths, "has_stop": has_stop.float(),
                "rewards": rewards, "source_scores": r["source_scores"]}
