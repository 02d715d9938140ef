"""mDPO / mIPO: preference optimisation over groups of samples (thesis chapter 3, docs/methods.md section 2)."""

from __future__ import annotations

import json

import textwrap

from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from datasets import Dataset, IterableDataset
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.groups import DataCollatorForGroupPreference, DataCollatorForSharedPrefixGroups, validate_group_dataset
from ..losses import group_mean, group_preference_loss
from .. import _adapter
from .fdpo import FDPOConfig, FDPOTrainer

__all__ = ["MultiSampleDPOConfig", "MultiSampleDPOTrainer"]


@dataclass
class MultiSampleDPOConfig(FDPOConfig):
    r"""Configuration for [`MultiSampleDPOTrainer`]: `FDPOConfig` plus the group options.

    `loss_type="sigmoid"` is mDPO, `loss_type="ipo"` is mIPO; every `divergence` of `FDPOConfig` works
    (the per-completion score is the link `f'(u) - f'(1)`; for `ipo` divided by the completion length,
    as TRL's IPO does). `per_device_train_batch_size` counts rows (groups), not completions.

    Parameters:
        unbiased (`bool`, defaults to `True`):
            mIPO only: subtract `s_w^2/n + s_l^2/m` (Proposition 1). A group of one has no variance term, so
            with groups of one this is plain IPO. `False` gives the naive, biased square (for ablations).
        nll_weight (`float`, defaults to `0.0`):
            Weight of the mean per-token negative log-likelihood of the chosen group (the thesis adds it for
            stability on the random-number task).
        shared_prefix (`bool`, defaults to `False`):
            As in `FDPOConfig`, for groups: each prompt is processed once per group instead of once per
            completion (one segment per completion after the prompt).
        completion_sub_batch_size (`int`, *optional*):
            Run the policy over at most this many completions at a time, recomputing each sub-batch's
            activations in the backward pass (activation checkpointing). Bounds activation memory by one
            sub-batch for large groups; the loss and gradients are those of the unsplit batch.
    """

    unbiased: bool = field(default=True, metadata={"help": "mIPO: use the unbiased (variance-corrected) estimator."})
    nll_weight: float = field(default=0.0, metadata={"help": "Weight of the NLL of the chosen group."})
    completion_sub_batch_size: int | None = field(
        default=None, metadata={"help": "Completions per policy sub-batch (memory bound; same gradients)."})

    def __post_init__(self):
        super().__post_init__()
        types = list(self.loss_type)
        if len(types) == 2 and types[1] == "sft" and types[0] in ("sigmoid", "ipo"):
            # TRL's ["sigmoid", "sft"] (RPO-style NLL on the chosen side) is nll_weight on groups: the same mean
            # per-token NLL of the chosen completions, weighted by the second loss weight.
            weights = self.loss_weights or [1.0, 1.0]
            if self.nll_weight and self.nll_weight != weights[1]:
                raise ValueError(f"loss_type {types} with loss_weights {weights} sets the NLL weight to {weights[1]}, "
                                 f"but nll_weight is {self.nll_weight}; set one of them.")
            self.nll_weight, self.loss_type, self.loss_weights = weights[1], [types[0]], [weights[0]]
        if self.loss_type not in (["sigmoid"], ["ipo"]):
            raise ValueError(
                f"MultiSampleDPOTrainer takes loss_type 'sigmoid' (mDPO) or 'ipo' (mIPO), optionally with 'sft', got "
                f"{self.loss_type}: the other TRL loss types are defined on one pair, and alignkit has no group form "
                "for them. Use FDPOTrainer on pairs for those.")
        if self.use_weighting:
            raise ValueError("use_weighting (WPO) weights a pair by the policy's probability of its two completions; it "
                             "has no group form here. Remove it, or use FDPOTrainer on pairs.")
        if self.ld_alpha is not None:
            raise ValueError("ld_alpha (LD-DPO) weights tokens by the length of the other completion of a pair; it has "
                             "no group form here. Remove it, or use FDPOTrainer on pairs.")
        if self.nll_weight < 0:
            raise ValueError(f"nll_weight must be >= 0, got {self.nll_weight}.")
        if self.completion_sub_batch_size is not None and self.completion_sub_batch_size < 1:
            raise ValueError(f"completion_sub_batch_size must be >= 1, got {self.completion_sub_batch_size}.")
        if self.shared_prefix and self.completion_sub_batch_size is not None:
            raise ValueError("shared_prefix and completion_sub_batch_size cannot be combined yet; use one of them.")
        if self.mmd_coef > 0:
            raise ValueError("mmd_coef (Causal DPO) is not available for groups yet; use FDPOTrainer on pairs, or set "
                             "mmd_coef: 0.")


class MultiSampleDPOTrainer(FDPOTrainer):
    """mDPO / mIPO on datasets whose rows hold a prompt, a `chosen` group and a `rejected` group.

    Built on [`FDPOTrainer`] (so on TRL's `DPOTrainer`): the group rows are tokenized like TRL tokenizes
    pairs, every completion of a micro-batch goes through the model in one forward pass, and the loss is
    computed per row from the group statistics. Groups of one give exactly DPO (`sigmoid`) and IPO (`ipo`).

    Example:
        ```python
        from alignkit import MultiSampleDPOConfig, MultiSampleDPOTrainer

        ds = Dataset.from_list([{"prompt": "Pick a number: ", "chosen": ["3", "7", "1"], "rejected": ["7", "7"]}])
        args = MultiSampleDPOConfig(output_dir="out", loss_type="ipo", beta=0.1)
        MultiSampleDPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer).train()
        ```
    """

    # our precompute keeps the reference log-probs in memory on each rank (no cache files)
    _precompute_uses_dataset_cache = False

    config_class = MultiSampleDPOConfig
    _config_with_article = "a MultiSampleDPOConfig"
    _default_run_suffix = "mDPO"
    _tag_names = ["trl", "dpo", "alignkit", "mdpo"]
    _name = "Multi-sample DPO"
    _paper = {
        "title": "Preference Optimization with Multi-Sample Comparisons",
        "id": "2410.12138",
        "citation": textwrap.dedent("""\
            @article{wang2024preference,
                title   = {{Preference Optimization with Multi-Sample Comparisons}},
                author  = {Chaoqi Wang and Zhuokai Zhao and Chen Zhu and Karthik Abinav Sankararaman and Michal Valko
                           and Xuefei Cao and Zhaorun Chen and Madian Khabsa and Yuxin Chen and Hao Ma and Sinong Wang},
                journal = {arXiv preprint arXiv:2410.12138},
                year    = 2024,
            }"""),
    }

    def __init__(self, model, ref_model=None, args: MultiSampleDPOConfig | None = None, data_collator=None,
                 train_dataset=None, eval_dataset=None, processing_class=None, *pargs, **kwargs):
        args = self._resolve_args(model, args)
        if processing_class is None:
            from transformers import AutoTokenizer

            processing_class = AutoTokenizer.from_pretrained(model if isinstance(model, str) else model.config.name_or_path)
        if data_collator is None:
            pad_id = processing_class.pad_token_id
            if pad_id is None:
                pad_id = processing_class.eos_token_id
            if args.shared_prefix:
                data_collator = DataCollatorForSharedPrefixGroups(pad_token_id=pad_id, max_length=args.max_length)
        if data_collator is None:
            data_collator = DataCollatorForGroupPreference(
                pad_token_id=pad_id, max_length=args.max_length, truncation_mode=args.truncation_mode,
                pad_to_multiple_of=args.pad_to_multiple_of if isinstance(args.pad_to_multiple_of, int) else None)
        super().__init__(model, ref_model, args, data_collator, train_dataset, eval_dataset, processing_class,
                         *pargs, **kwargs)
        if self.aux_loss_enabled and args.completion_sub_batch_size:
            raise ValueError("completion_sub_batch_size does not compute a Mixture-of-Experts model's router (aux) "
                             "loss; drop it for this model, or set router_aux_loss_coef: 0.")

    # ------------------------------------------------------------------------------------------
    # Replaces DPOTrainer._prepare_dataset: TRL tokenizes one chosen and one rejected string per row;
    # here each side is a list. Same steps as TRL (EOS for plain text, chat template for conversations,
    # completion starts at the common prefix of prompt and prompt+completion), using TRL's helpers.
    # ------------------------------------------------------------------------------------------
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if "prompt_ids" in (dataset.column_names or []):
            return dataset  # already tokenized (idempotent, as TRL's)
        if isinstance(dataset, IterableDataset):
            raise ValueError("MultiSampleDPOTrainer needs a map-style datasets.Dataset (group sizes are checked up front).")
        validate_group_dataset(dataset, f"{dataset_name} dataset")
        eos = _adapter.tokenizer_of(self).eos_token

        def tokenize(example):
            conversational = isinstance(example["prompt"], list)
            # as TRL's DPOTrainer: a row's `tools` and `chat_template_kwargs` reach its chat template
            chat = {}
            if conversational:
                tools = example.get("tools")
                chat = {"tools": json.loads(tools) if isinstance(tools, str) else tools,
                        **(example.get("chat_template_kwargs") or {})}
            prompt_ids = _adapter.tokenize(processing_class, example["prompt"],
                                           **({"add_generation_prompt": True, **chat} if conversational else {}))[
                "input_ids"]
            full = {}
            for side in ("chosen", "rejected"):
                comps = example[side] if conversational else [c if c.endswith(eos) else c + eos for c in example[side]]
                full[side] = [_adapter.tokenize(processing_class, example["prompt"] + c, **chat)["input_ids"]
                              for c in comps]
            prompt_len = min(_adapter.common_prefix_length(prompt_ids, f) for side in full for f in full[side])
            return {
                "prompt_ids": prompt_ids[:prompt_len],
                "chosen_ids": [f[prompt_len:] for f in full["chosen"]],
                "rejected_ids": [f[prompt_len:] for f in full["rejected"]],
            }

        dataset = dataset.map(tokenize, num_proc=args.dataset_num_proc, desc=f"Tokenizing {dataset_name} groups")
        if args.max_length is not None and args.truncation_mode == "keep_start":
            dataset = dataset.filter(lambda ex: len(ex["prompt_ids"]) < args.max_length,
                                     desc=f"Dropping fully truncated rows of {dataset_name} dataset")
        return dataset

    # Replaces DPOTrainer._precompute_ref_logps, which stores one reference log-prob per side and row;
    # groups need a list per side and row. Every rank computes the whole dataset (no cross-rank gather
    # of ragged lists); the reference forward is cheap next to training.
    def _precompute_ref_logps(self, dataset: Dataset, name: str, batch_size: int) -> Dataset:
        if isinstance(dataset, IterableDataset):
            raise ValueError("precompute_ref_log_probs needs a map-style Dataset.")
        if "ref_chosen_logps" in dataset.column_names:
            return dataset
        loader = DataLoader(dataset.remove_columns([c for c in dataset.column_names if c not in
                                                    ("prompt_ids", "chosen_ids", "rejected_ids")]),
                            batch_size=batch_size, collate_fn=self.data_collator, shuffle=False)
        chosen, rejected = [], []
        device = self.accelerator.device
        for batch in tqdm(loader, desc=f"Computing reference log probs for {name} dataset"):
            batch = {k: v.to(device) for k, v in batch.items()}
            logps = self._batch_reference_logps(batch).float().cpu()
            n_c = batch["chosen_row_index"].numel()
            for rows, values, out in ((batch["chosen_row_index"].cpu(), logps[:n_c], chosen),
                                      (batch["rejected_row_index"].cpu(), logps[n_c:], rejected)):
                for r in range(int(rows.max()) + 1):
                    out.append(values[rows == r].tolist())
        return dataset.add_column("ref_chosen_logps", chosen).add_column("ref_rejected_logps", rejected)

    def _batch_reference_logps(self, inputs) -> torch.Tensor:
        if self.args.shared_prefix:
            return self._shared_prefix_reference(inputs)
        kwargs = {k: v for k, v in inputs.items() if k not in self._non_model_keys}
        return self._reference_logps(kwargs, inputs["completion_mask"])

    def _num_chosen_sequences(self, inputs, num_sequences: int) -> int:
        return inputs["chosen_row_index"].numel()  # [chosen completions; rejected completions]

    def _policy_forward(self, model, model_kwargs, labels):
        size = self.args.completion_sub_batch_size
        n = labels.size(0)
        if size is None or size >= n:
            return super()._policy_forward(model, model_kwargs, labels)

        def run(input_ids, attention_mask, lab):
            out = _adapter.fused_forward(model, dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=False),
                                     lab)
            return out.log_probs, out.entropy, out.mean_logits, out.is_top1

        parts = []
        for start in range(0, n, size):
            sl = slice(start, start + size)
            args_ = (model_kwargs["input_ids"][sl], model_kwargs["attention_mask"][sl], labels[sl])
            if torch.is_grad_enabled():
                # Activations of this sub-batch are recomputed in the backward pass instead of kept.
                parts.append(checkpoint(run, *args_, use_reentrant=False))
            else:
                parts.append(run(*args_))
        log_probs, entropy, mean_logits, is_top1 = (torch.cat(p) for p in zip(*parts))
        return SimpleNamespace(log_probs=log_probs, entropy=entropy, mean_logits=mean_logits, is_top1=is_top1,
                               aux_loss=None)

    def _reference_logps(self, model_kwargs, completion_mask):
        size = self.args.completion_sub_batch_size
        n = completion_mask.size(0)
        if size is None or size >= n:
            return super()._reference_logps(model_kwargs, completion_mask)
        parts = []
        for start in range(0, n, size):
            sl = slice(start, start + size)
            sub = {k: (v[sl] if torch.is_tensor(v) and v.dim() > 0 and v.size(0) == n else v)
                   for k, v in model_kwargs.items()}
            parts.append(super()._reference_logps(sub, completion_mask[sl]))
        return torch.cat(parts)

    # ------------------------------------------------------------------------------------------
    # The loss (replaces FDPOTrainer._preference_loss, which pairs sequence i with sequence B + i).
    # ------------------------------------------------------------------------------------------
    def _preference_loss(self, fwd, inputs):
        """mDPO / mIPO per row from the group statistics of the completions' link values; the statistics
        returned are per row (group means), so TRL's pair metrics read as the metrics of the groups."""
        ci, ri = inputs["chosen_row_index"], inputs["rejected_row_index"]
        n_c = ci.numel()
        num_rows = int(ci.max().item()) + 1
        logratios = fwd["logps"] - fwd["ref_logps"]
        lengths = fwd["lengths"]  # IPO scores are length-normalised, as in TRL
        g = group_preference_loss(logratios[:n_c], logratios[n_c:], ci, ri, num_rows, self.divergence,
                                  self.loss_types[0], self.beta, unbiased=self.args.unbiased,
                                  chosen_lengths=lengths[:n_c], rejected_lengths=lengths[n_c:],
                                  max_exponent=self.args.max_link_exponent)
        s, w, l = g.scores, g.chosen, g.rejected
        loss = g.per_row.mean() * self.loss_weights[0]
        if self.args.nll_weight:
            chosen_mask = fwd["shift_mask"][:n_c].bool()
            loss = loss + self.args.nll_weight * -fwd["per_token_logps"][:n_c][chosen_mask].mean()
        stats = {
            "chosen_logratios": group_mean(logratios[:n_c].detach(), ci, num_rows),
            "rejected_logratios": group_mean(logratios[n_c:].detach(), ri, num_rows),
            # the implicit reward beta * f'(u) of each completion, averaged over its group (not length-normalised:
            # TRL's IPO logs un-normalised rewards too)
            "chosen_link": group_mean(s.chosen.detach(), ci, num_rows),
            "rejected_link": group_mean(s.rejected.detach(), ri, num_rows),
            "chosen_logps": group_mean(fwd["logps"][:n_c].detach(), ci, num_rows),
            "rejected_logps": group_mean(fwd["logps"][n_c:].detach(), ri, num_rows),
            "num_clamped": s.num_clamped,
            "chosen_std": w.var.detach().sqrt(),
            "rejected_std": l.var.detach().sqrt(),
            "correction": (w.var / w.count + l.var / l.count).detach(),
        }
        return loss, stats

    def _log_step_metrics(self, mode, fwd, s):
        # FDPO's metrics on per-row group means (rewards/*, link/*, logps/*, ECE on group means)...
        super()._log_step_metrics(mode, fwd, s)
        # ...plus the group statistics.
        inputs_sizes = (fwd["is_chosen"].sum(), (~fwd["is_chosen"]).sum())
        gather = self.accelerator.gather_for_metrics
        extra = gather(torch.stack([self.beta * s["chosen_std"], self.beta * s["rejected_std"], s["correction"]], 1).float())
        m = _adapter.metrics(self, mode)
        m["rewards/chosen_group_std"].append(extra[:, 0].mean().item())
        m["rewards/rejected_group_std"].append(extra[:, 1].mean().item())
        m["mipo/variance_correction"].append(extra[:, 2].mean().item())
        counts = gather(torch.stack(inputs_sizes).float().unsqueeze(0))
        m["group/chosen_size"].append((counts[:, 0].sum() / max(1, extra.size(0))).item())
        m["group/rejected_size"].append((counts[:, 1].sum() / max(1, extra.size(0))).item())
