"""PPO's update (thesis 2.6.1): the clipped policy and value losses over minibatches of a rollout, the optimizer
steps, and the iteration's metrics. The math is in `alignkit.losses`. `Update` is mixed into `PPOTrainer`."""

from __future__ import annotations

import torch

from ..losses import masked_mean, ppo_policy_loss, ppo_value_loss, sequence_divergence_penalty
from .rollout import divergence_estimates, now

__all__ = ["Update"]


class Update:
    """The update half of `PPOTrainer`: losses over minibatches of a rollout, and the optimizer steps."""

    # ---- optimisation ----------------------------------------------------------------------------
    def _ppo_loss(self, ro, idx) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        args = self.args
        ids, mask, rmask, c = ro["ids"][idx], ro["mask"][idx], ro["response_mask"][idx], ro["context_len"]
        logp, vpred = self.model(ids, mask, c, args.temperature)  # through DDP when there are several ranks
        old_logp, old_v, adv, ret = ro["logp"][idx], ro["values"][idx], ro["advantages"][idx], ro["returns"][idx]
        vf_loss, vf_clipfrac = ppo_value_loss(vpred, old_v, ret, rmask, args.cliprange_value)
        pg_loss, pg_clipfrac, ratio, approxkl = ppo_policy_loss(logp, old_logp, adv, rmask, args.cliprange)
        loss = pg_loss + args.vf_coef * vf_loss
        div_loss = torch.zeros((), device=loss.device)
        if args.divergence_penalty == "loss":
            logr = (logp - ro["ref_logp"][idx]) * rmask
            per_seq = sequence_divergence_penalty(self.divergence.estimator(logr) * rmask, rmask,
                                                  args.divergence_penalty_normalization)
            div_loss = per_seq.mean()
            loss = loss + args.kl_coef * div_loss
        stats = {"loss": loss.detach(), "pg_loss": pg_loss.detach(), "vf_loss": vf_loss.detach(),
                 "div_loss": div_loss.detach(), "pg_clipfrac": pg_clipfrac, "vf_clipfrac": vf_clipfrac,
                 "approxkl": approxkl, "ratio": ratio}
        return loss, stats

    def _micro_batch_backward(self, share: torch.Tensor, num_micro: int, last: bool) -> None:
        """Backward of one micro-batch's `share` of an update's loss (the shares of its `num_micro` micro-batches
        add up to the loss), then, after the last, the optimizer step (gradients clipped to `max_grad_norm`).
        Under DeepSpeed the engine accumulates over its `gradient_accumulation_steps` (= `num_micro`) micro-batches,
        dividing each loss by their number, and steps at the last: the share is scaled back. Without it
        transformers 5 builds the accelerator with accumulation left to the training loop: the gradients add up
        here."""
        args = self.args
        if self.is_deepspeed_enabled:
            with self.accelerator.accumulate(self.model):
                self.accelerator.backward(share * num_micro)
                if self.accelerator.sync_gradients and args.max_grad_norm:
                    self.accelerator.clip_grad_norm_(self.model.parameters(), args.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad()
            return
        self.accelerator.backward(share)
        if last:
            if args.max_grad_norm:
                self.accelerator.clip_grad_norm_(self.model.parameters(), args.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad()

    def _updates_per_iteration(self) -> int:
        """Optimizer steps per iteration (sizes the learning-rate schedule)."""
        return self.args.num_ppo_epochs * self.args.num_mini_batches

    def _training_iteration(self, batch):
        """One PPO iteration on a batch of prompts: rollout, then `num_ppo_epochs` passes of `num_mini_batches`
        updates. Returns the mean loss and a function computing the iteration's metrics (called when logging)."""
        args = self.args
        mb_size = args.per_device_train_batch_size * args.gradient_accumulation_steps
        ro = self._rollout(batch)
        # perf/*: the tokens the policy trains on (prompt and response, once per PPO epoch); the iteration's
        # time includes the rollout, so perf/tokens_per_second is end-to-end PPO throughput
        self._perf_count(ro["mask"].sum(1), repeats=args.num_ppo_epochs)
        t_opt = now()
        n = ro["ids"].size(0)
        acc = {k: [] for k in ("loss", "pg_loss", "vf_loss", "div_loss", "pg_clipfrac", "vf_clipfrac", "approxkl",
                               "ratio")}
        for _ in range(args.num_ppo_epochs):
            order = torch.randperm(n, device=ro["ids"].device)
            for mb in range(0, n, mb_size):
                mb_idx = order[mb:mb + mb_size]
                starts = range(0, mb_idx.numel(), args.per_device_train_batch_size)
                for k_micro, micro in enumerate(starts):
                    idx = mb_idx[micro:micro + args.per_device_train_batch_size]
                    loss, stats = self._ppo_loss(ro, idx)
                    # one update per mini-batch: the mean of its micro-batch losses
                    self._micro_batch_backward(loss / len(starts), len(starts), last=k_micro == len(starts) - 1)
                    for k, v in stats.items():
                        acc[k].append(v)
                self.lr_scheduler.step()
        self._timings["optimisation"] = now() - t_opt
        return torch.stack(acc["loss"]).mean().item(), lambda: self._iteration_metrics(ro, acc)

    @torch.no_grad()
    def _iteration_metrics(self, ro, acc) -> dict[str, float]:
        gather = self.accelerator.gather_for_metrics
        rmask = ro["response_mask"]
        seq_penalty = ro["penalty"].sum(1)
        metrics = {
            "objective/scores": gather(ro["raw_scores"]).mean().item(),
            "objective/rlhf_reward": gather(ro["rewards"].sum(1)).mean().item(),
            f"objective/{self.divergence.name}": gather(seq_penalty).mean().item(),
            "objective/entropy": gather(masked_mean(ro["entropy"], rmask).reshape(1)).mean().item(),
            "val/num_eos_tokens": gather(ro["has_stop"].sum().reshape(1)).sum().item(),
            "response/length": gather(ro["lengths"]).mean().item(),
            "lr": self.lr_scheduler.get_last_lr()[0],
            "episode": self.state.global_step * ro["ids"].size(0) * self.args.world_size,
        }
        # seconds of this iteration: sampling, no-grad forwards (policy, reference, value), reward, updates
        metrics.update({f"time/{k}": v for k, v in self._timings.items()})
        # each reward source's own (unweighted) scores, as TRL's GRPOTrainer logs them
        for name, scores in zip(self.reward_func_names, ro["source_scores"]):
            every = gather(scores)
            metrics[f"rewards/{name}/mean"] = every.mean().item()
            metrics[f"rewards/{name}/std"] = every.std().item() if every.numel() > 1 else 0.0
        # the unbiased estimate of every divergence of the family, from the same samples
        for name, est in divergence_estimates(ro["logr"], rmask).items():
            metrics[f"divergence/{name}"] = gather(est).mean().item()
        names = {"loss": "loss", "pg_loss": "loss/policy_avg", "vf_loss": "loss/value_avg", "div_loss": "loss/divergence_avg",
                 "pg_clipfrac": "policy/clipfrac_avg", "vf_clipfrac": "val/clipfrac_avg",
                 "approxkl": "policy/approxkl_avg", "ratio": "val/ratio"}
        for k, v in acc.items():
            metrics[names[k]] = gather(torch.stack(v).mean().reshape(1)).mean().item()
        return metrics
