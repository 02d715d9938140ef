"""PPO with f-divergence penalties (thesis 2.6.1, docs/methods.md section 1), driven by (causal) reward models.

TRL removed its PPOTrainer in 1.13. This one keeps the constructor and config fields of TRL's former
`trl.experimental.ppo.PPOTrainer` (policy, ref_model, reward_model, value_model, train_dataset of prompts,
processing_class, peft_config; kl_coef, kl_estimator, cliprange, ...), so a script that used it changes
its import, and adds the f-divergence constraint of the thesis:

* `divergence_penalty: reward` subtracts `kl_coef * [g(t) - g'(1)(t - 1)]` per token from the reward
  (t = pi_ref / pi at the sampled token); for reverse KL `kl_estimator` picks the classic `k1`
  (log pi - log pi_ref) or `k3` (the estimator above), exactly as TRL's PPO did;
* `divergence_penalty: loss` keeps the reward and adds `kl_coef` times the sequence estimate (the sum of
  the per-token estimates under the current policy) to the loss. The thesis recommends it for forward
  KL and JS, whose reward penalty grows much faster than reverse KL's.

One `global_step` is one PPO iteration: generate for a batch of prompts, score, compute advantages (GAE),
then `num_ppo_epochs` passes of `num_mini_batches` clipped policy/value updates. The rollout is in `rollout.py`, the
update in `update.py`, the configs in `on_policy_config.py`; this module holds the trainer's set-up, loop,
evaluation and saving.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from typing import Any

import torch
import torch.nn as nn
from transformers import GenerationConfig, Trainer, TrainerState
from transformers.trainer_utils import TrainOutput, get_last_checkpoint

from .. import _adapter
from ..divergences import get_divergence
from ._card import write_model_card
from ._common import ConfigResolverMixin
from ._perf import PerfMetricsMixin
from ._samples import write_sample_table
from .on_policy_config import OnPolicyConfig, PPOConfig
from .rollout import (ESTIMATED_DIVERGENCES, TIMED_PARTS, PolicyAndValue, RewardFunc, Rollout,
                      divergence_estimates)
from .update import Update

__all__ = ["OnPolicyConfig", "PPOConfig", "PPOTrainer"]


class PPOTrainer(Rollout, Update, PerfMetricsMixin, ConfigResolverMixin, Trainer):
    """PPO for causal LMs with an f-divergence constraint; TRL's former experimental PPOTrainer API.

    Example:
        ```python
        from alignkit import PPOConfig, PPOTrainer      # was: from trl.experimental.ppo import ...

        trainer = PPOTrainer(args=PPOConfig(output_dir="ppo", divergence="jsd", divergence_penalty="loss"),
                             processing_class=tokenizer, model=policy, ref_model=ref, reward_model=rm,
                             value_model=value, train_dataset=prompts)
        trainer.train()
        ```

    `reward_model` is a sequence-classification model with one output (e.g. a `CausalRewardTrainer`
    output), or a callable `(prompts, completions) -> list[float]` on decoded text, or a list of them
    (`alignkit.rewards.RewardSource`): the score is then their sum weighted by `reward_weights`, and each source's
    own scores are logged as `rewards/<name>/{mean,std}` (TRL GRPO's names). `train_dataset` has
    a `prompt` column (text or conversational) or already tokenized `input_ids`.

    `eval_dataset` (prompts, or a dict of them) is evaluated by `evaluate()`: every `eval_steps` with
    `eval_strategy: steps`, after each pass over the prompts with `epoch`; it reports `eval_objective/scores`,
    `eval_divergence/<name>`, `eval_response/length` and `eval_objective/entropy`. `num_sample_generations`
    tables of completions go to `output_dir/samples/` (and W&B). `data_collator`, if given, turns a list of
    tokenized rows (`input_ids`) into a left-padded batch (`input_ids`, `attention_mask`). Checkpoints follow
    `save_strategy` (`steps`, `epoch` or `no`) and resume with `train(resume_from_checkpoint=...)`.

    Under DeepSpeed ZeRO-2/3 policy and value model train as one engine; under ZeRO-3 the reference and reward
    model are sharded too, generation gathers the policy (`ds3_gather_for_generation`) or runs from the shards
    with `synced_gpus`, and `save_model` must be called on every rank.
    """

    config_class = PPOConfig
    _config_with_article = "a PPOConfig"
    _default_run_suffix = "PPO"
    _tag_names = ["trl", "ppo", "alignkit"]
    _name = "PPO"

    def __init__(self, args: PPOConfig | None = None, processing_class=None, model=None, ref_model=None,
                 reward_model: nn.Module | RewardFunc | None = None, train_dataset=None, value_model=None,
                 data_collator=None, eval_dataset=None, optimizers=(None, None), callbacks=None,
                 peft_config=None):
        who = type(self).__name__
        if args is not None and isinstance(args, OnPolicyConfig):
            model, ref_model, reward_model, value_model = self._load_from_paths(
                args, model, ref_model, reward_model, value_model, peft_config)
        if model is None:
            raise ValueError(f"{who} needs the policy as `model` (or `sft_model_path` in the config).")
        args = self._resolve_args(model, args)
        if processing_class is None:
            raise ValueError(f"{who} needs `processing_class` (the policy's tokenizer).")
        tok = getattr(processing_class, "tokenizer", processing_class)
        if tok.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set one, e.g. `tokenizer.pad_token = "
                             "tokenizer.eos_token`, before building the trainer.")
        sources = self._check_reward_sources(reward_model)
        weights = args.reward_weights if args.reward_weights is not None else [1.0] * len(sources)
        if len(weights) != len(sources):
            raise ValueError(f"reward_weights has {len(weights)} weights for {len(sources)} reward sources; give one "
                             "weight per reward model / function (or leave it unset).")
        if value_model is None:
            raise ValueError("PPOTrainer needs a `value_model` (e.g. AutoModelForSequenceClassification with "
                             "num_labels=1, often initialised from the reward model).")
        if train_dataset is None:
            raise ValueError(f"{who} needs a train_dataset of prompts.")
        self.tokenizer = tok
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        self.is_peft_model = hasattr(model, "disable_adapter")
        if args.gradient_checkpointing:
            self._enable_gradient_checkpointing(args, model, value_model)
        if ref_model is None and not self.is_peft_model:
            raise ValueError(f"{who} needs a `ref_model` (or a PEFT policy, whose reference is the policy "
                             "with its adapter disabled).")
        if ref_model is model:
            raise ValueError("`model` and `ref_model` must not be the same object; pass a copy (or use PEFT).")
        self.policy, self.ref_model, self.value_model = model, ref_model, value_model
        #: the reward sources and their weights: the score is the weighted sum
        self.reward_funcs, self.reward_weights = sources, [float(w) for w in weights]
        self.divergence = get_divergence(args.divergence, args.alpha)
        self.stop_token_id = args.stop_token_id if args.stop_token_id is not None else (
            tok.eos_token_id if args.stop_token == "eos" else None)
        train_dataset = self._prepare_prompts(train_dataset, tok, args)
        if isinstance(eval_dataset, dict):
            eval_dataset = {k: self._prepare_prompts(v, tok, args) for k, v in eval_dataset.items()}
        elif eval_dataset is not None:
            eval_dataset = self._prepare_prompts(eval_dataset, tok, args)
        if args.total_episodes is not None:
            args.max_steps = math.ceil(args.total_episodes / (args.local_batch_size * args.world_size))
        if args.max_steps <= 0:
            args.max_steps = math.ceil(args.num_train_epochs * len(train_dataset) /
                                       (args.local_batch_size * args.world_size))
        per_iter = args.local_batch_size * args.world_size
        if len(train_dataset) < per_iter:
            raise ValueError(f"the dataset has {len(train_dataset)} prompts, fewer than one PPO batch "
                             "(per_device_train_batch_size x gradient_accumulation_steps x num_mini_batches x "
                             "processes); lower one of them or add prompts.")
        wrapper = PolicyAndValue(model, value_model)
        _adapter.require()
        super().__init__(model=wrapper, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, optimizers=optimizers, callbacks=callbacks,
                         data_collator=data_collator or self._collate)
        self._timings = dict.fromkeys(TIMED_PARTS, 0.0)
        self._frozen_engines = []  # under ZeRO-3: the DeepSpeed engines that shard the reference and reward model
        if isinstance(self.ref_model, nn.Module):
            self.ref_model = self._prepare_frozen(self.ref_model)
        self.reward_funcs = [self._prepare_frozen(m) if isinstance(m, nn.Module) else m for m in self.reward_funcs]
        self.generation_config = GenerationConfig(
            max_new_tokens=args.response_length, temperature=args.temperature + 1e-7, top_k=args.top_k, top_p=1.0,
            do_sample=True, pad_token_id=tok.pad_token_id,
            eos_token_id=self.stop_token_id if self.stop_token_id is not None else None)


    def _enable_gradient_checkpointing(self, args, policy, value_model) -> None:
        """`gradient_checkpointing: true` on the models this trainer updates (the policy, and PPO's value model).
        Replaces what Trainer's own loop would do (`_inner_training_loop` enables it on `self.model`), which this
        trainer's loop does not run and which would not reach inside the policy/value wrapper. As TRL's DPOTrainer:
        a PEFT policy needs its inputs to require gradients, and under ZeRO-3 reentrant checkpointing (DeepSpeed
        gathers the sharded LoRA weights correctly only there). Generation runs in eval mode, where the checkpointed
        modules use their KV cache as before."""
        kwargs = dict(args.gradient_checkpointing_kwargs or {})
        plugin = getattr(args, "deepspeed_plugin", None)
        if self.is_peft_model and plugin is not None and plugin.zero_stage == 3:
            kwargs["use_reentrant"] = True
        args.gradient_checkpointing_kwargs = kwargs or None
        for module in (policy, value_model):
            if module is None:
                continue
            if not getattr(module, "supports_gradient_checkpointing", True) and not hasattr(module, "get_base_model"):
                raise ValueError(f"gradient_checkpointing: {type(module).__name__} does not support it; set "
                                 "gradient_checkpointing: false.")
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs)
        if self.is_peft_model:
            policy.enable_input_require_grads()

    def _check_reward_sources(self, reward_model) -> list:
        """The reward sources (`alignkit.rewards.RewardSource`: sequence-classification models with one output, or
        functions), one or a list, checked; and `reward_weights` against them."""
        sources = list(reward_model) if isinstance(reward_model, (list, tuple)) else \
            ([] if reward_model is None else [reward_model])
        if not sources:
            raise ValueError(f"{type(self).__name__} needs a `reward_model` (a sequence-classification model or a "
                             "callable (prompts, completions) -> scores, or a list of them).")
        for source in sources:
            if isinstance(source, nn.Module):
                n = getattr(source.config, "num_labels", 1)
                if n != 1:
                    raise ValueError(f"the reward model must have one output (a scalar score); it has num_labels={n}.")
            elif not callable(source):
                raise TypeError(f"reward_model must be a model or a callable, got {type(source).__name__}.")
        return sources

    def _prepare_frozen(self, m: nn.Module) -> nn.Module:
        """A model that scores but never trains (reference, reward model), in eval mode without gradients: under
        ZeRO-3 sharded like the policy (TRL's helper; the module is called directly, its ZeRO-3 hooks gather the
        weights of each submodule in turn, so every rank runs the same forwards), else a whole copy on the
        device (one process, DDP, ZeRO-2)."""
        m.eval().requires_grad_(False)
        if self._is_zero3:
            engine = _adapter.prepare_deepspeed(m, self.accelerator)
            self._frozen_engines.append(engine)
            return engine.module
        return m.to(self.accelerator.device)

    @property
    def reward_model(self):
        """The reward source, when there is one (TRL's former PPOTrainer attribute); `reward_funcs` holds them all."""
        return self.reward_funcs[0] if len(self.reward_funcs) == 1 else self.reward_funcs

    @property
    def reward_func_names(self) -> list[str]:
        """One name per reward source, as TRL's GRPOTrainer names them: a model's checkpoint folder name, a
        function's `__name__`; repeated names get `_2`, `_3`, ..."""
        names = []
        for source in self.reward_funcs:
            if isinstance(source, nn.Module):
                name = os.path.basename(str(getattr(source.config, "name_or_path", "") or "").rstrip("/"))
                name = name or type(source).__name__
            else:
                name = getattr(source, "__name__", None) or type(source).__name__
            k, base = 2, name
            while name in names:
                name, k = f"{base}_{k}", k + 1
            names.append(name)
        return names

    @property
    def _is_zero3(self) -> bool:
        return bool(self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3)

    @staticmethod
    def _load_from_paths(args, model, ref_model, reward_model, value_model, peft_config):
        """TRL's former `sft_model_path` / `reward_model_path`: the models they name are loaded where none is
        passed (reference: a second copy of the policy unless PEFT; value model: initialised from the reward
        model, as TRL's PPO examples did). A path and a model for the same role is an error."""
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        for path_field, given, role in (("sft_model_path", model, "model"),
                                        ("reward_model_path", reward_model, "reward_model")):
            if getattr(args, path_field) and given is not None:
                raise ValueError(f"both `{role}` and `{path_field}` are set; pass one of them.")
        if args.sft_model_path:
            model = AutoModelForCausalLM.from_pretrained(args.sft_model_path)
            if ref_model is None and peft_config is None:
                ref_model = AutoModelForCausalLM.from_pretrained(args.sft_model_path)
        if args.reward_model_path:
            reward_model = AutoModelForSequenceClassification.from_pretrained(args.reward_model_path, num_labels=1)
            if value_model is None:
                value_model = AutoModelForSequenceClassification.from_pretrained(args.reward_model_path, num_labels=1)
        return model, ref_model, reward_model, value_model

    # ---- data ------------------------------------------------------------------------------------
    def _prepare_prompts(self, dataset, tok, args):
        names = dataset.column_names or []
        if "input_ids" in names:
            return dataset
        if "prompt" not in names:
            raise ValueError(f"the PPO dataset needs a 'prompt' column (or tokenized 'input_ids'); it has "
                             f"{names}. Rename your prompt column, e.g. dataset.rename_column('query', 'prompt').")

        def tokenize(row):
            prompt = row["prompt"]
            if isinstance(prompt, list):  # conversational
                # return_dict: tokenizers differ in what tokenize=True alone returns (a list, or a BatchEncoding)
                ids = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"]
            else:
                ids = tok(prompt, add_special_tokens=False)["input_ids"]
            if args.max_prompt_length is not None:
                ids = ids[-args.max_prompt_length:]
            return {"input_ids": list(ids)}

        return dataset.map(tokenize, remove_columns=names, num_proc=args.dataset_num_proc,
                           desc="Tokenizing prompts")

    def _collate(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Left-padded prompts (generation appends on the right)."""
        width = max(len(r["input_ids"]) for r in rows)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(r["input_ids"])) + list(r["input_ids"]) for r in rows])
        mask = torch.tensor([[0] * (width - len(r["input_ids"])) + [1] * len(r["input_ids"]) for r in rows])
        return {"input_ids": ids, "attention_mask": mask}

    def _prompt_batches(self, start_iteration: int):
        """Batches of `local_batch_size` prompts per process, reshuffled each pass over the data with a
        generator of its own (so resuming reproduces the order without touching the global RNG)."""
        n, per_iter = len(self.train_dataset), self.args.local_batch_size * self.args.world_size
        rank = self.args.process_index
        iteration, epoch = 0, 0
        while True:
            g = torch.Generator().manual_seed(self.args.seed + epoch)
            order = torch.randperm(n, generator=g).tolist()
            for s in range(0, n - per_iter + 1, per_iter):
                if iteration >= start_iteration:
                    idx = order[s + rank * self.args.local_batch_size: s + (rank + 1) * self.args.local_batch_size]
                    yield self.data_collator([self.train_dataset[i] for i in idx])
                iteration += 1
            epoch += 1


    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """Run `max_steps` PPO iterations (resuming from a checkpoint of this trainer if asked)."""
        args = self.args
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"no checkpoint found in {args.output_dir} to resume from.")
        num_updates = args.max_steps * self._updates_per_iteration()
        if self.is_deepspeed_enabled:
            # as Trainer does: the DeepSpeed config finalised (its "auto" values) and the optimizer created, then
            # the engine built around PolicyAndValue and the optimizer together; the scheduler on the prepared
            # optimizer (saved in scheduler.pt by Trainer's checkpoints, the rest by the engine's save_checkpoint)
            if isinstance(self.model, nn.Module) and not hasattr(self.model, "save_checkpoint"):
                self.optimizer, self.lr_scheduler = _adapter.deepspeed_init(self, num_training_steps=num_updates)
                self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
            if self.lr_scheduler is None:
                self.create_scheduler(num_training_steps=num_updates, optimizer=self.optimizer)
            self.deepspeed = self.model
        else:
            self.create_optimizer_and_scheduler(num_training_steps=num_updates)
            self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        self.model_wrapped = self.model
        self.state = TrainerState(stateful_callbacks=[cb for cb in self.callback_handler.callbacks + [self.control]
                                                      if hasattr(cb, "state")])
        self.state.max_steps, self.state.logging_steps = args.max_steps, args.logging_steps
        self.state.save_steps = args.save_steps
        self.state.eval_steps = args.eval_steps if args.eval_steps is not None else args.logging_steps
        start = 0
        if resume_from_checkpoint:
            if self.is_deepspeed_enabled:  # weights and optimizer state from the engine's checkpoint
                _adapter.deepspeed_load_checkpoint(self.model_wrapped, resume_from_checkpoint)
            else:
                self._load_checkpoint_weights(resume_from_checkpoint)
            _adapter.load_optimizer_and_scheduler(self, resume_from_checkpoint)
            self.state = TrainerState.load_from_json(os.path.join(resume_from_checkpoint, "trainer_state.json"))
            _adapter.load_rng_state(self, resume_from_checkpoint)
            start = self.state.global_step
        self.state.is_local_process_zero = self.is_local_process_zero()
        self.state.is_world_process_zero = self.is_world_process_zero()
        self.control = self.callback_handler.on_train_begin(args, self.state, self.control)
        batches = self._prompt_batches(start)
        iterations_per_epoch = max(1, len(self.train_dataset) // (args.local_batch_size * args.world_size))
        sample_every = args.max_steps // args.num_sample_generations if args.num_sample_generations > 0 else 0
        loss_sum = 0.0
        start_time = time.time()
        self.model.train()
        # Progress is shown by Trainer's progress callback (on_step_end), as in every other trainer.
        for it in range(start, args.max_steps):
            self.control = self.callback_handler.on_step_begin(args, self.state, self.control)
            self._timings = dict.fromkeys(TIMED_PARTS, 0.0)
            loss_value, iteration_metrics = self._training_iteration(next(batches))
            loss_sum += loss_value
            self.state.global_step = it + 1
            self.state.epoch = (it + 1) * args.local_batch_size * args.world_size / len(self.train_dataset)
            self.control = self.callback_handler.on_step_end(args, self.state, self.control)
            if (it + 1) % iterations_per_epoch == 0:  # a pass over the prompts: epoch-based saving/evaluation
                self.control = self.callback_handler.on_epoch_end(args, self.state, self.control)
            if self.control.should_log or (it + 1) % max(args.logging_steps, 1) == 0 or it + 1 == args.max_steps:
                self.log(iteration_metrics(), start_time)
                self.control.should_log = False
            if sample_every and (it + 1) % sample_every == 0:
                self._log_sample_generations()
            if self.control.should_evaluate:
                if self.eval_dataset is not None:
                    self.evaluate()
                self.control.should_evaluate = False
            if self.control.should_save:
                _adapter.save_checkpoint(self)
                self.control = self.callback_handler.on_save(args, self.state, self.control)
                self.control.should_save = False
            if self.control.should_training_stop:
                break
        self.control = self.callback_handler.on_train_end(args, self.state, self.control)
        runtime = time.time() - start_time
        done = self.state.global_step - start
        metrics = {"train_runtime": runtime, "train_iterations": done,
                   "train_iterations_per_second": done / max(runtime, 1e-9),
                   "train_loss": loss_sum / max(done, 1)}
        self.log(metrics)
        return TrainOutput(self.state.global_step, metrics["train_loss"], metrics)

    # ---- evaluation ------------------------------------------------------------------------------
    def _eval_prompts(self, dataset):
        """The prompts of `dataset` for this process: tokenized like the training prompts, rows split over
        processes (rank r takes rows r, r + world, ...)."""
        dataset = self._prepare_prompts(dataset, self.tokenizer, self.args)
        rows = list(range(self.args.process_index, len(dataset), self.args.world_size))
        bs = self.args.per_device_eval_batch_size
        for s in range(0, len(rows), bs):
            yield self.data_collator([dataset[i] for i in rows[s:s + bs]])
        if self._is_zero3:
            # ZeRO-3's forwards are collective: every rank runs as many batches as rank 0 (which has the most rows);
            # the extra ones (a repeat of the first prompt) are marked by `_eval_filler` and not counted
            extra = -(-len(range(0, len(dataset), self.args.world_size)) // bs) - (-(-len(rows) // bs))
            for _ in range(extra):
                batch = self.data_collator([dataset[0]])
                batch["_eval_filler"] = True
                yield batch

    @contextlib.contextmanager
    def _rollouts_outside_training(self):
        """Evaluation and sample tables: sampling under a forked RNG seeded with `seed` (repeatable, and the
        training run's RNG stream is untouched) and the iteration's `time/*` figures left as they were."""
        saved_timings = dict(self._timings)
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.args.seed)
            yield
        self._timings = saved_timings

    @torch.no_grad()
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Rollouts of the current policy on the eval prompts, scored by the training reward: mean score, the
        estimate of every divergence of the family from the reference, response length and entropy.

        Replaces Trainer.evaluate (which runs the loss on labelled batches; PPO has none). Sampling runs under a
        forked RNG seeded with `seed`, so evaluating never changes the training trajectory and is repeatable.
        Several eval datasets (a dict) are evaluated one by one, with their name in the prefix, as in Trainer."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("PPOTrainer.evaluate needs an eval_dataset of prompts (pass one to the trainer or here).")
        if isinstance(dataset, dict):
            out = {}
            for name, part in dataset.items():
                out.update(self.evaluate(part, ignore_keys, f"{metric_key_prefix}_{name}"))
            return out
        start = time.time()
        with self._rollouts_outside_training():
            sums = torch.zeros(8, device=self.accelerator.device)
            for batch in self._eval_prompts(dataset):
                filler = bool(batch.pop("_eval_filler", False))
                r = self._generate_and_score(batch, values=False)
                rmask = r["response_mask"].float()
                logr = (r["logp"] - r["ref_logp"]) * rmask
                per_seq = [r["scores"], rmask.sum(1), (r["entropy"] * rmask).sum(1),
                           *divergence_estimates(logr, rmask).values(),
                           torch.ones_like(rmask[:, 0])]  # the count of rollouts
                if not filler:
                    sums += torch.stack([x.float().sum() for x in per_seq])
        total = self.accelerator.reduce(sums, reduction="sum").tolist()
        n = max(total[7], 1.0)
        metrics = {
            f"{metric_key_prefix}_objective/scores": total[0] / n,
            f"{metric_key_prefix}_response/length": total[1] / n,
            f"{metric_key_prefix}_objective/entropy": total[2] / max(total[1], 1.0),
        }
        for k, name in enumerate(ESTIMATED_DIVERGENCES):
            metrics[f"{metric_key_prefix}_divergence/{name}"] = total[3 + k] / n
        metrics[f"{metric_key_prefix}_runtime"] = time.time() - start
        metrics[f"{metric_key_prefix}_samples"] = int(total[7])
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    @torch.no_grad()
    def _log_sample_generations(self) -> None:
        """`num_sample_generations`, as in TRL's former PPOTrainer: a table of completions for a few prompts (the
        eval prompts, else the first training prompts) at evenly spaced iterations. Written to
        `output_dir/samples/step_<N>.jsonl` and, when W&B is logging, as the table `samples/step_<N>`."""
        dataset = self.eval_dataset if self.eval_dataset is not None else self.train_dataset
        if isinstance(dataset, dict):
            dataset = next(iter(dataset.values()))
        dataset = self._prepare_prompts(dataset, self.tokenizer, self.args)
        rows = [dataset[i] for i in range(min(len(dataset), self.args.per_device_eval_batch_size))]
        with self._rollouts_outside_training():
            r = self._generate_and_score(self.data_collator(rows), values=False)
        if not self.is_world_process_zero():
            return
        c = r["context_len"]
        table = []
        for ids, rmask, score in zip(r["ids"], r["response_mask"], r["scores"].tolist()):
            prompt = self.tokenizer.decode(ids[:c], skip_special_tokens=True)
            completion = self.tokenizer.decode(ids[c:][rmask.bool()], skip_special_tokens=True)
            table.append({"step": self.state.global_step, "prompt": prompt, "completion": completion,
                          "score": score})
        write_sample_table(self, table, f"step_{self.state.global_step}")


    # ---- saving ----------------------------------------------------------------------------------
    # Replaces Trainer._save: the policy is saved as a normal Hugging Face model (loadable with
    # from_pretrained), the value model in `value_model/`, instead of the state dict of the wrapper.
    # `state_dict` (of PolicyAndValue: keys `policy.*` and `value_model.*`) is given under ZeRO-3, where the
    # modules' own parameters are shards.
    def _save(self, output_dir: str | None = None, state_dict=None):
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        unwrapped = self.accelerator.unwrap_model(self.model)
        parts = {name: {} for name, _ in self._saved_modules(output_dir)}
        if state_dict is not None:
            for key, value in state_dict.items():
                prefix, _, rest = key.partition(".")
                parts[prefix][rest] = value
        for name, folder in self._saved_modules(output_dir):
            kwargs = {"state_dict": parts[name]} if state_dict is not None else {}
            getattr(unwrapped, name).save_pretrained(folder, **kwargs)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _saved_modules(self, folder: str) -> list[tuple[str, str]]:
        """(attribute of the wrapper, folder) of each module a checkpoint holds: the policy in `folder`, the value
        model (when there is one) in `folder/value_model`."""
        return [("policy", folder), ("value_model", os.path.join(folder, "value_model"))]

    def _load_checkpoint_weights(self, checkpoint: str):
        from safetensors.torch import load_file

        unwrapped = self.accelerator.unwrap_model(self.model)
        for name, folder in self._saved_modules(checkpoint):
            module = getattr(unwrapped, name)
            if hasattr(module, "disable_adapter"):
                from peft import set_peft_model_state_dict

                set_peft_model_state_dict(module, load_file(os.path.join(folder, "adapter_model.safetensors")))
            else:
                missing, unexpected = module.load_state_dict(load_file(os.path.join(folder, "model.safetensors")),
                                                             strict=False)
                tied = set(getattr(module, "all_tied_weights_keys", None) or {})  # transformers' public list
                if unexpected or [k for k in missing if k not in tied and "lm_head" not in k]:
                    raise ValueError(f"checkpoint {folder} does not match the model (missing {missing[:3]}, "
                                     f"unexpected {unexpected[:3]}).")

    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None, tags=None, **_):
        """The model card (alignkit's one writer, _card.py): the divergence, the penalty and the recipe."""
        write_model_card(self, model_name, dataset_name, tags)

    def card_details(self) -> list[str]:
        """The method's settings, one line each, for the model card."""
        alpha = f", alpha={self.divergence.alpha:g}" if self.divergence.name == "alpha" else ""
        reward = ", ".join(f"{name} (x{w:g})" if len(self.reward_weights) > 1 else name
                           for name, w in zip(self.reward_func_names, self.reward_weights))
        return [f"method: PPO (`{type(self).__name__}`)",
                f"divergence: `{self.divergence.name}`{alpha}, penalty in the {self.args.divergence_penalty}, "
                f"kl_coef {self.args.kl_coef}", f"reward: {reward}", f"iterations: {self.state.global_step}"]

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """Save the policy (a Hugging Face model folder, or the adapter for PEFT) and the value model in
        `value_model/`. Under ZeRO-3 every rank must call it (the weights are gathered collectively; rank 0
        writes); elsewhere rank 0 writes and other ranks return."""
        output_dir = output_dir or self.args.output_dir
        if self._is_zero3 and hasattr(self.model_wrapped, "save_checkpoint"):
            state_dict = self.accelerator.get_state_dict(self.model_wrapped)  # collective: every rank
            if self.is_world_process_zero():
                self._save(output_dir, state_dict=state_dict)
        elif self.is_world_process_zero():
            self._save(output_dir)
