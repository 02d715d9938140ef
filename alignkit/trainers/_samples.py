"""Sample tables during training: what the policy writes, next to the numbers.

`write_sample_table` is shared by the trainers that sample (f-DPO/mDPO at evaluation, PPO every
`num_sample_generations`): rank 0 writes `output_dir/samples/<name>.jsonl` and, when W&B is logging, a table under
the key `samples/<name>` (one key per step, so the earlier tables stay in the run). Texts are capped at
`MAX_CHARS` characters and every column holds one type (a missing number is NaN), as W&B tables require.
"""

from __future__ import annotations

import json
import math
import os

import torch

from trl.data_utils import get_dataset_column_names

from .. import _adapter

MAX_CHARS = 1000


def _cell(value):
    if isinstance(value, str):
        return value if len(value) <= MAX_CHARS else value[:MAX_CHARS] + " [...]"
    if value is None:
        return math.nan
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def write_sample_table(trainer, rows: list[dict], name: str) -> None:
    """Rank 0 only: `rows` (dicts with the same keys) to `samples/<name>.jsonl` and, with W&B on, a table."""
    if not trainer.is_world_process_zero() or not rows:
        return
    rows = [{k: _cell(v) for k, v in row.items()} for row in rows]
    folder = os.path.join(trainer.args.output_dir, "samples")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{name}.jsonl"), "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(row) + "\n" for row in rows)
    if "wandb" in (trainer.args.report_to or []):
        import wandb

        if wandb.run is not None:
            columns = list(rows[0])
            wandb.log({f"samples/{name}": wandb.Table(columns=columns, data=[[r[k] for k in columns] for r in rows])},
                      commit=False)


def single_eval_dataset(trainer, eval_dataset, tokenized_column: str):
    """The tokenized dataset an `evaluate(eval_dataset)` call evaluates, or None. Trainer.evaluate calls itself once
    per name for a dict of eval datasets (passing the name; the samples are written in those inner calls); a raw
    dataset given to evaluate() (no `tokenized_column`) is prepared as the trainer prepares its own."""
    dataset = trainer.eval_dataset if eval_dataset is None else eval_dataset
    if isinstance(dataset, str):
        dataset = trainer.eval_dataset[dataset]
    if dataset is None or isinstance(dataset, dict):
        return None
    if tokenized_column not in get_dataset_column_names(dataset):  # a streaming dataset's from its first row
        dataset = _adapter.prepare_dataset(trainer, dataset, "eval")
    return dataset


@torch.no_grad()
def sample_completions(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int,
                       seed: int) -> list[list[int]]:
    """One sampled completion (temperature 1, no top-k/top-p) per prompt, each cut after its first eos. The global
    RNG is left as it was (sampling here must not change the training run that follows)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(p) for p in prompt_ids)
    device = next(model.parameters()).device
    ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompt_ids], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids], device=device)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             max_new_tokens=max_new_tokens, pad_token_id=pad)
    completions = []
    for row in out[:, width:].tolist():
        if tokenizer.eos_token_id in row:
            row = row[:row.index(tokenizer.eos_token_id) + 1]
        completions.append(row)
    return completions


@torch.no_grad()
def sequence_logps(model, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> torch.Tensor:
    """Sum of log pi(completion token | context) per (prompt, completion), float32."""
    seqs = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids)]
    width = max(len(s) for s in seqs)
    device = next(model.parameters()).device
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs], device=device)
    attn = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
    target = torch.zeros_like(ids, dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        target[i, len(p):len(p) + len(c)] = True
    logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1].float()
    logps = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
    return (logps * target[:, 1:]).sum(1)
