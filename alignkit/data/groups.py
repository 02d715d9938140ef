"""Group preference data for mDPO / mIPO (thesis chapter 3, docs/methods.md section 2).

A group row holds one ``prompt``, a list of ``chosen`` completions and a list of ``rejected``
completions, plain text or conversational (lists of chat messages). The two groups may differ in size,
and sizes may vary from row to row.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from datasets import Dataset

from .validation import DataReport, DatasetError, _check_value, _is_blank, iter_rows

__all__ = [
    "validate_group_dataset",
    "groups_from_pairs",
    "groups_from_scored",
    "DataCollatorForGroupPreference",
    "DataCollatorForSharedPrefixGroups",
    "DataCollatorForSharedPrefixPairs",
    "DataCollatorForSharedPrefixRewardPairs",
]


def validate_group_dataset(dataset, where: str = "dataset") -> DataReport:
    """Check every row of a group preference dataset; raise :class:`DatasetError` naming the row and the fix.

    Rows whose chosen and rejected groups hold the same completions are counted (a warning in the report;
    an error when every row is so)."""
    names = list(dataset.column_names or [])
    missing = [c for c in ("prompt", "chosen", "rejected") if c not in names]
    if missing:
        raise DatasetError(
            f"{where} is missing column(s) {missing}; it has {names}. A group preference dataset has 'prompt', "
            "'chosen' (a list of completions) and 'rejected' (a list of completions); map other names with "
            "dataset.columns in a recipe."
        )
    report = DataReport()
    kind = None
    for i, row in iter_rows(dataset, ["prompt", "chosen", "rejected"]):
        at = f"{where}, row {i} (0-based)"
        kind = _check_value(where, i, "prompt", row["prompt"], kind)
        for side in ("chosen", "rejected"):
            group = row[side]
            if isinstance(group, str) or (isinstance(group, list) and group and isinstance(group[0], dict)):
                raise DatasetError(
                    f"{at}: {side!r} must be a list of completions (a group), got a single completion. "
                    f"Wrap it in a list ([...]) or use method: fdpo (FDPOTrainer) for pairs."
                )
            if not isinstance(group, list):
                what = "missing (null)" if group is None else f"a {type(group).__name__}"
                raise DatasetError(f"{at}: {side!r} is {what}; it must be a list of completions. Fix or drop that row.")
            if len(group) == 0:
                raise DatasetError(f"{at}: the {side} group is empty; every group needs at least one completion.")
            for completion in group:
                _check_value(f"{where}, {side} group", i, side, completion, kind)
                if _is_blank(completion, kind):
                    raise DatasetError(f"{at}: the {side} group holds an empty completion. Fix or drop that row.")
        if sorted(map(repr, row["chosen"])) == sorted(map(repr, row["rejected"])):
            report.identical += 1
        report.rows += 1
    return report.conclude(where, kind, "the chosen and rejected groups hold the same completions")


def _key(prompt) -> Any:
    return prompt if isinstance(prompt, str) else repr(prompt)


def groups_from_pairs(pairs: Iterable[dict], dedupe: bool = True) -> Dataset:
    """Group pair rows (``prompt``, ``chosen``, ``rejected``) that share a prompt into group rows.

    The chosen group of a prompt is every completion that was chosen in one of its pairs, the rejected
    group every completion that was rejected (duplicates removed unless ``dedupe=False``).
    """
    groups: "OrderedDict[Any, dict]" = OrderedDict()
    for row in pairs:
        g = groups.setdefault(_key(row["prompt"]), {"prompt": row["prompt"], "chosen": [], "rejected": []})
        for side in ("chosen", "rejected"):
            if not dedupe or row[side] not in g[side]:
                g[side].append(row[side])
    return Dataset.from_list(list(groups.values()))


def groups_from_scored(samples: Iterable[dict], chosen: str | None = None, rejected: str | None = None,
                       k: int | None = None, score_key: str = "score", source_key: str = "source") -> Dataset:
    """Build group rows from per-sample generations (``prompt``, ``completion`` and a score or a source).

    * By source (thesis 3.6.4): ``chosen="strong", rejected="weak"`` puts a stronger model's samples in
      the chosen group and a weaker model's in the rejected group.
    * By score: without ``chosen``/``rejected``, each prompt's samples are sorted by ``score_key``; the
      top ``k`` form the chosen group and the bottom ``k`` the rejected group (``k`` defaults to half).
    Prompts that end up with an empty group are skipped.
    """
    by_prompt: "OrderedDict[Any, dict]" = OrderedDict()
    for s in samples:
        by_prompt.setdefault(_key(s["prompt"]), {"prompt": s["prompt"], "samples": []})["samples"].append(s)
    rows = []
    for entry in by_prompt.values():
        samples_ = entry["samples"]
        if chosen is not None or rejected is not None:
            if chosen is None or rejected is None:
                raise ValueError("give both `chosen` and `rejected` sources, or neither (to group by score)")
            w = [s["completion"] for s in samples_ if s[source_key] == chosen]
            l = [s["completion"] for s in samples_ if s[source_key] == rejected]
        else:
            ranked = sorted(samples_, key=lambda s: s[score_key], reverse=True)
            kk = k if k is not None else len(ranked) // 2
            w = [s["completion"] for s in ranked[:kk]]
            l = [s["completion"] for s in ranked[len(ranked) - kk:]] if kk else []
        if w and l:
            rows.append({"prompt": entry["prompt"], "chosen": w, "rejected": l})
    if not rows:
        raise DatasetError("no prompt has both a chosen and a rejected group; check the sources / scores.")
    return Dataset.from_list(rows)


@dataclass
class DataCollatorForGroupPreference:
    """Collate tokenized group rows into one padded batch of every completion of every row.

    Layout (as TRL's pair collator for groups of one): all chosen completions (row by row), then all
    rejected completions. ``chosen_row_index``/``rejected_row_index`` give each completion's row, so
    a group is always whole inside a batch: rows, not completions, are what the sampler splits across
    micro-batches, accumulation steps and ranks.
    """

    pad_token_id: int
    max_length: int | None = None
    truncation_mode: str = "keep_start"
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        from .._adapter import pad

        seqs, masks, rows = {"chosen": [], "rejected": []}, {"chosen": [], "rejected": []}, {"chosen": [], "rejected": []}
        for r, ex in enumerate(examples):
            for side in ("chosen", "rejected"):
                for comp in ex[f"{side}_ids"]:
                    seqs[side].append(ex["prompt_ids"] + comp)
                    masks[side].append([0] * len(ex["prompt_ids"]) + [1] * len(comp))
                    rows[side].append(r)
        ids, cmask = seqs["chosen"] + seqs["rejected"], masks["chosen"] + masks["rejected"]
        if self.max_length is not None:
            sl = slice(None, self.max_length) if self.truncation_mode == "keep_start" else slice(-self.max_length, None)
            ids, cmask = [x[sl] for x in ids], [m[sl] for m in cmask]
        out = {
            "input_ids": pad([torch.tensor(x) for x in ids], padding_value=self.pad_token_id, padding_side="right",
                             pad_to_multiple_of=self.pad_to_multiple_of),
            "attention_mask": pad([torch.ones(len(x), dtype=torch.long) for x in ids], padding_value=0,
                                  padding_side="right", pad_to_multiple_of=self.pad_to_multiple_of),
            "completion_mask": pad([torch.tensor(m, dtype=torch.long) for m in cmask], padding_value=0,
                                   padding_side="right", pad_to_multiple_of=self.pad_to_multiple_of),
            "chosen_row_index": torch.tensor(rows["chosen"], dtype=torch.long),
            "rejected_row_index": torch.tensor(rows["rejected"], dtype=torch.long),
        }
        if "ref_chosen_logps" in examples[0]:
            out["ref_chosen_logps"] = torch.tensor([v for ex in examples for v in ex["ref_chosen_logps"]])
            out["ref_rejected_logps"] = torch.tensor([v for ex in examples for v in ex["ref_rejected_logps"]])
        return out


def _segment_attention(seg: torch.Tensor) -> torch.Tensor:
    """The [rows, L, L] boolean mask of packed rows whose tokens carry segment ids (-2 padding, -1 the shared
    prefix, k >= 0 segment k): causal, and a token sees the shared prefix and its own segment only. Padding attends to
    itself, so that no softmax row is empty."""
    length = seg.size(1)
    q, k = seg.unsqueeze(2), seg.unsqueeze(1)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    allowed = causal & (k != -2) & (q != -2) & ((k == -1) | (k == q))
    return allowed | torch.eye(length, dtype=torch.bool)


@dataclass
class DataCollatorForSharedPrefixGroups:
    """Pack each row so its prompt is computed once for the whole group (`shared_prefix=True`).

    Row layout: ``prompt[:-1]``, then one segment ``[prompt[-1], *completion]`` per completion (chosen
    first, then rejected). A 4D attention mask lets each segment see the shared prompt and itself only,
    and position ids restart every segment at ``len(prompt) - 1``, so each completion is scored in
    exactly the context it has in the unshared layout, while the prompt's tokens are processed once
    instead of once per completion. The repeated ``prompt[-1]`` token carries the prediction of each
    completion's first token.

    Besides the model inputs it returns, per completion (chosen then rejected, row by row as
    :class:`DataCollatorForGroupPreference`), its row (``completion_row``) and its token positions in
    the packed row (``completion_positions``, ``completion_token_mask``); and ``unpacked_tokens``, the
    tokens the unshared layout would hold (each completion with its own prompt).
    """

    pad_token_id: int
    max_length: int | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows_ids, rows_pos, rows_seg, rows_cmask, unpacked = [], [], [], [], []
        comps = {"chosen": [], "rejected": []}  # (row, positions)
        for r, ex in enumerate(examples):
            prompt = ex["prompt_ids"]
            if len(prompt) == 0:
                raise ValueError("shared_prefix needs a non-empty prompt in every row")
            ids, pos, seg, cmask = list(prompt[:-1]), list(range(len(prompt) - 1)), [-1] * (len(prompt) - 1), [0] * (len(prompt) - 1)
            s = 0
            for side in ("chosen", "rejected"):
                for comp in ex[f"{side}_ids"]:
                    if self.max_length is not None:
                        comp = comp[: max(0, self.max_length - len(prompt))]
                    start = len(ids)
                    ids += [prompt[-1], *comp]
                    pos += list(range(len(prompt) - 1, len(prompt) + len(comp)))
                    seg += [s] * (len(comp) + 1)
                    cmask += [0] + [1] * len(comp)
                    comps[side].append((r, list(range(start + 1, start + 1 + len(comp)))))
                    unpacked.append(len(prompt) + len(comp))
                    s += 1
            rows_ids.append(ids)
            rows_pos.append(pos)
            rows_seg.append(seg)
            rows_cmask.append(cmask)
        length = max(len(x) for x in rows_ids)
        n_rows = len(examples)
        input_ids = torch.full((n_rows, length), self.pad_token_id, dtype=torch.long)
        position_ids = torch.zeros((n_rows, length), dtype=torch.long)
        seg = torch.full((n_rows, length), -2, dtype=torch.long)  # -2 padding, -1 shared prompt, k segment k
        completion_mask = torch.zeros((n_rows, length), dtype=torch.long)
        for r in range(n_rows):
            n = len(rows_ids[r])
            input_ids[r, :n] = torch.tensor(rows_ids[r])
            position_ids[r, :n] = torch.tensor(rows_pos[r])
            seg[r, :n] = torch.tensor(rows_seg[r])
            completion_mask[r, :n] = torch.tensor(rows_cmask[r])
        allowed = _segment_attention(seg)
        all_comps = comps["chosen"] + comps["rejected"]
        cmax = max(len(p) for _, p in all_comps)
        positions = torch.zeros((len(all_comps), cmax), dtype=torch.long)
        token_mask = torch.zeros((len(all_comps), cmax), dtype=torch.long)
        for i, (_, p) in enumerate(all_comps):
            positions[i, : len(p)] = torch.tensor(p, dtype=torch.long)
            token_mask[i, : len(p)] = 1
        out = {
            "input_ids": input_ids,
            "attention_mask": allowed.unsqueeze(1),
            "position_ids": position_ids,
            "completion_mask": completion_mask,
            "chosen_row_index": torch.tensor([r for r, _ in comps["chosen"]], dtype=torch.long),
            "rejected_row_index": torch.tensor([r for r, _ in comps["rejected"]], dtype=torch.long),
            "completion_row": torch.tensor([r for r, _ in all_comps], dtype=torch.long),
            "completion_positions": positions,
            "completion_token_mask": token_mask,
            "packed_lengths": torch.tensor([len(x) for x in rows_ids], dtype=torch.long),
            # what the unshared layout would hold: each completion with its own copy of the prompt (the
            # `num_tokens` metric counts these, so that it means the same with and without shared_prefix)
            "unpacked_tokens": torch.tensor(sum(unpacked), dtype=torch.long),
        }
        if "ref_chosen_logps" in examples[0]:
            out["ref_chosen_logps"] = torch.tensor([v for ex in examples for v in ex["ref_chosen_logps"]])
            out["ref_rejected_logps"] = torch.tensor([v for ex in examples for v in ex["ref_rejected_logps"]])
        return out


@dataclass
class DataCollatorForSharedPrefixPairs:
    """`DataCollatorForSharedPrefixGroups` for TRL's pair rows (`FDPOConfig(shared_prefix=True)`): a pair is a group
    of one chosen and one rejected completion, so each prompt is computed once for both. The packed batch unpacks
    to TRL's [chosen; rejected] layout (and carries precomputed reference log-probs as TRL's collator does)."""

    pad_token_id: int
    max_length: int | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        groups = []
        for ex in examples:
            row = {"prompt_ids": ex["prompt_ids"], "chosen_ids": [ex["chosen_ids"]],
                   "rejected_ids": [ex["rejected_ids"]]}
            if "ref_chosen_logps" in ex:
                row["ref_chosen_logps"] = [ex["ref_chosen_logps"]]
                row["ref_rejected_logps"] = [ex["ref_rejected_logps"]]
            groups.append(row)
        return DataCollatorForSharedPrefixGroups(self.pad_token_id, self.max_length)(groups)


@dataclass
class DataCollatorForSharedPrefixRewardPairs:
    """Reward-model pairs (TRL's `chosen_ids` / `rejected_ids`, each the whole prompt + completion) packed so that
    the tokens the two sequences share at their start are computed once (`CausalRewardConfig(shared_prefix=True)`).

    Row layout: the common prefix, the rest of the chosen sequence, the rest of the rejected one. A 4D attention mask
    lets each rest see the prefix and itself only; positions continue the prefix's in both rests, so every token
    has the context and position it has alone (causal models only). `chosen_end` / `rejected_end` give where each
    sequence's reward is read: its last token that is not padding, as a sequence-classification model reads it.
    `unpacked_tokens` counts the tokens of the unshared layout (TRL's `num_tokens`); `margin` passes through."""

    pad_token_id: int

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows, ends = [], {"chosen": [], "rejected": []}
        for ex in examples:
            c, j = list(ex["chosen_ids"]), list(ex["rejected_ids"])
            p = 0
            while p < min(len(c), len(j)) and c[p] == j[p]:
                p += 1
            ids = c + j[p:]
            pos = list(range(len(c))) + list(range(p, len(j)))
            seg = [-1] * p + [0] * (len(c) - p) + [1] * (len(j) - p)
            for side, seq, offset in (("chosen", c, 0), ("rejected", j, len(c) - p)):
                last = max((i for i, t in enumerate(seq) if t != self.pad_token_id), default=0)
                ends[side].append(last if last < p else last + offset)
            rows.append((ids, pos, seg))
        length = max(len(r[0]) for r in rows)
        n = len(rows)
        input_ids = torch.full((n, length), self.pad_token_id, dtype=torch.long)
        position_ids = torch.zeros((n, length), dtype=torch.long)
        seg = torch.full((n, length), -2, dtype=torch.long)  # -2 padding, -1 shared, 0 chosen, 1 rejected
        for r, (ids, pos, sg) in enumerate(rows):
            input_ids[r, :len(ids)] = torch.tensor(ids)
            position_ids[r, :len(ids)] = torch.tensor(pos)
            seg[r, :len(ids)] = torch.tensor(sg)
        allowed = _segment_attention(seg)
        out = {"input_ids": input_ids, "attention_mask": allowed.unsqueeze(1), "position_ids": position_ids,
               "chosen_end": torch.tensor(ends["chosen"]), "rejected_end": torch.tensor(ends["rejected"]),
               "unpacked_tokens": torch.tensor(sum(len(ex["chosen_ids"]) + len(ex["rejected_ids"]) for ex in examples)),
               "packed_lengths": torch.tensor([len(r[0]) for r in rows])}
        if "margin" in examples[0]:
            out["margin"] = torch.tensor([ex["margin"] for ex in examples], dtype=torch.float)
        return out
