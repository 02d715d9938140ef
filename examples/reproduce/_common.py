"""What the reproduction scripts share: offline set-up, the SFT starting policy, tables and figures."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence


def _number(kind: type, ok, need: str):
    """An argparse type: `kind(text)` where `ok` holds, else one line saying what to give (argparse exits 2)."""
    import argparse

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"give {need} (got {text!r})")
        return value

    parse.__name__ = need  # argparse names the type in its message
    return parse


#: the checked argparse types of the scripts' numeric options (a bare int or float lets 0 or -1 through)
count = _number(int, lambda v: v >= 1, "a whole number of at least 1")
whole = _number(int, lambda v: v >= 0, "a whole number of at least 0")
positive = _number(float, lambda v: v > 0 and v != float("inf"), "a number above 0")
nonnegative = _number(float, lambda v: 0 <= v < float("inf"), "a number of at least 0")
probability = _number(float, lambda v: 0 <= v <= 1, "a probability between 0 and 1")


def setup(threads: int | None = None) -> None:
    """Offline, quiet, and (optionally) a fixed number of CPU threads."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    if threads:
        torch.set_num_threads(threads)


def sft(rows: list[dict], out: Path, steps: int, lr: float = 3e-3, batch_size: int = 32, seed: int = 0,
        model: str = "builtin:tiny-llama") -> str:
    """Fine-tune `model` on prompt/completion `rows` with TRL's SFTTrainer; returns the saved folder.
    A model trained from scratch has nothing to align yet: this gives it the task's language first."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from alignkit.models import resolve_model_path

    path = resolve_model_path(model)
    args = SFTConfig(output_dir=str(out / "sft"), max_steps=steps, per_device_train_batch_size=batch_size,
                     learning_rate=lr, report_to=[], save_strategy="no", logging_steps=max(steps // 4, 1),
                     disable_tqdm=True, bf16=False, seed=seed)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(path), args=args,
                         train_dataset=Dataset.from_list(rows), processing_class=AutoTokenizer.from_pretrained(path))
    trainer.train()
    trainer.save_model(str(out / "sft" / "final"))
    return str(out / "sft" / "final")


def align(trainer_cls, start: str, args, train_dataset) -> str:
    """Train a preference trainer (FDPOTrainer, MultiSampleDPOTrainer) from the model in `start`, which is also
    its reference; save the result to `<args.output_dir>/final` and return that folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trainer = trainer_cls(model=AutoModelForCausalLM.from_pretrained(start),
                          ref_model=AutoModelForCausalLM.from_pretrained(start), args=args,
                          train_dataset=train_dataset, processing_class=AutoTokenizer.from_pretrained(start))
    trainer.train()
    final = str(Path(args.output_dir) / "final")
    trainer.save_model(final)
    return final


def sentiment_sft_rows(num_samples: int = 512, seed: int = 7) -> list[dict]:
    """Prompt/completion rows of the built-in sentiment task, both sides of every pair: an SFT on them teaches
    the language of the task without a preference (the neutral start the f-DPO reproductions align)."""
    from alignkit.data.synthetic import sentiment

    data = sentiment("train", num_samples=num_samples, seed=seed)
    return [{"prompt": r["prompt"], "completion": c} for r in data for c in (r["chosen"], r["rejected"])]


def checkpoints(run: Path) -> list[tuple[int, str]]:
    """The `checkpoint-<step>` folders a Trainer saved under `run`, as (step, path), in step order."""
    return sorted((int(p.name.split("-")[1]), str(p)) for p in Path(run).glob("checkpoint-*"))


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def write_table(rows: list[dict], columns: Sequence[str], out: Path, name: str = "table") -> str:
    """`rows` as `<name>.json` and as a Markdown table `<name>.md` (the given columns); returns the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(rows, indent=2))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    md = "\n".join(lines) + "\n"
    (out / f"{name}.md").write_text(md)
    return md


def pyplot():
    """matplotlib's pyplot on the file-only backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def sample_groups(model, tok, prompts: list[str], k: int, seed: int, max_new_tokens: int = 6) -> list[list[str]]:
    """k sampled completions per prompt (temperature 1, the whole vocabulary, as `alignkit eval` samples). The
    prompt is run once and its cache repeated k times: 6x cheaper here than sampling k copies of a 50-token prompt."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    eos, out = tok.eos_token_id, []
    for text in prompts:
        with torch.no_grad():
            out.append(_sample_one(model, tok, text, k, gen, eos, max_new_tokens))
    return out


def _sample_one(model, tok, text: str, k: int, gen, eos: int, max_new_tokens: int) -> list[str]:
    """k completions of one prompt: the prompt runs once, its KV cache is repeated k times."""
    import torch

    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    step = model(input_ids=ids, use_cache=True)
    cache = step.past_key_values
    cache.batch_repeat_interleave(k)
    logits = step.logits[:, -1].float().repeat(k, 1)
    tokens, done = [], torch.zeros(k, dtype=torch.bool)
    for _ in range(max_new_tokens):
        nxt = torch.multinomial(logits.softmax(-1), 1, generator=gen).squeeze(1)
        nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
        tokens.append(nxt)
        done |= nxt == eos
        if done.all():
            break
        step = model(input_ids=nxt[:, None], past_key_values=cache, use_cache=True)
        cache, logits = step.past_key_values, step.logits[:, -1].float()
    seqs = torch.stack(tokens, 1).tolist()
    return [tok.decode(q[:q.index(eos)] if eos in q else q, skip_special_tokens=True) for q in seqs]
