"""`alignkit eval` as a Python API: sample k completions per prompt from a policy and measure what
alignment changed (diversity, divergence from the reference, calibration, reward and its bias).

    from alignkit.metrics.evaluate import evaluate
    report = evaluate("outputs/quickstart", prompts, ref="builtin:tiny-llama", k=4)
"""

from __future__ import annotations

import json
import warnings
import os
from pathlib import Path
from typing import Any

import torch

from .._util import first_line
from . import (bias_at_c, distinct_n, divergence_estimates, first_integer, number_uniformity, predictive_entropy,
               preference_ece, self_bleu, simpson_diversity, spearman, win_rate_score)


class EvalError(ValueError):
    """Bad input to `alignkit eval`; the message names the problem and the fix."""


def _device(model) -> torch.device:
    """Where `model`'s weights are: its inputs go there (a model in training on a GPU, or one `evaluate` loaded)."""
    return next(model.parameters()).device


def _load_causal_lm(name, device=None):
    """The model at `name` (a path or builtin name) in eval mode on `device` (default: a GPU where there is one),
    and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..models import resolve_model_path

    path = resolve_model_path(name) if isinstance(name, str) else name
    try:
        model = AutoModelForCausalLM.from_pretrained(path)
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        from ..models import unreadable_weights

        line = unreadable_weights(exc, str(name), "MODEL")
        if line is not None:
            raise EvalError(line) from None
        if isinstance(exc, OSError):
            raise EvalError(f"could not load model {name!r}: {first_line(exc)}") from None
        raise
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval(), tok


def _prompt_text(tok, prompt) -> str:
    if isinstance(prompt, list):  # conversational
        return tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    return prompt


@torch.no_grad()
def sample(model, tok, prompts: list[str], k: int, max_new_tokens: int, temperature: float, batch_size: int = 16,
           desc: str = "Sampling") -> dict[str, Any]:
    """k completions per prompt (left-padded batched generation); returns texts, token ids and masks."""
    from tqdm.auto import tqdm

    tok.padding_side = "left"
    rows = [p for p in prompts for _ in range(k)]
    out = {"completions": [], "prompt_ids": [], "completion_ids": []}
    device = _device(model)
    for s in tqdm(range(0, len(rows), batch_size), desc=desc, disable=len(rows) <= batch_size):
        enc = tok(rows[s:s + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        gen = model.generate(**{k: v.to(device) for k, v in enc.items()}, do_sample=True,
                             temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                             pad_token_id=tok.pad_token_id).cpu()
        for i in range(gen.size(0)):
            prompt_ids = enc["input_ids"][i][enc["attention_mask"][i].bool()].tolist()
            comp = gen[i, enc["input_ids"].size(1):].tolist()
            if tok.eos_token_id in comp:
                comp = comp[: comp.index(tok.eos_token_id) + 1]
            out["prompt_ids"].append(prompt_ids)
            out["completion_ids"].append(comp)
            out["completions"].append(tok.decode(comp, skip_special_tokens=True))
    return out


@torch.no_grad()
def _sequence_stats(model, prompt_ids, completion_ids, batch_size=16):
    """Per sequence: sum of completion log-probs; and the completion tokens' mean predictive entropy."""
    logps, ents, counts = [], [], []
    device = _device(model)
    for s in range(0, len(prompt_ids), batch_size):
        seqs = [p + c for p, c in zip(prompt_ids[s:s + batch_size], completion_ids[s:s + batch_size])]
        width = max(len(x) for x in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        attn = torch.zeros_like(ids)
        comp = torch.zeros_like(ids)
        for i, (p, c) in enumerate(zip(prompt_ids[s:s + batch_size], completion_ids[s:s + batch_size])):
            ids[i, :len(p) + len(c)] = torch.tensor(p + c)
            attn[i, :len(p) + len(c)] = 1
            comp[i, len(p):len(p) + len(c)] = 1
        ids, attn, comp = (t.to(device) for t in (ids, attn, comp))
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
        mask = comp[:, 1:]
        lp = logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        logps += (lp * mask).sum(1).tolist()
        ents.append(predictive_entropy(logits, mask) * mask.sum().item())
        counts.append(mask.sum().item())
    return torch.tensor(logps), sum(ents) / max(sum(counts), 1)


@torch.no_grad()
def _rewards(reward_model, tok, prompts: list[str], completions: list[str], batch_size=16) -> list[float]:
    """The reward model's score of each prompt + completion, the text prepared as TRL's RewardTrainer prepares
    its training texts: the eos token appended unless the text ends with it, then the tokenizer's own special
    tokens (a BERT reward model sees [CLS] ... [SEP] as in training)."""
    out = []
    tok.padding_side = "right"
    eos = tok.eos_token or ""
    for s in range(0, len(prompts), batch_size):
        texts = [p + c for p, c in zip(prompts[s:s + batch_size], completions[s:s + batch_size])]
        texts = [t if t.endswith(eos) else t + eos for t in texts]
        enc = tok(texts, return_tensors="pt", padding=True).to(_device(reward_model))
        out += reward_model(**enc).logits.squeeze(-1).float().tolist()
    return out


def evaluate(model, prompts, ref=None, k: int = 4, max_new_tokens: int = 32, temperature: float = 1.0,
             reward_model=None, compare_model=None, pairs=None, beta: float = 0.1, attribute: str | None = None,
             seed: int = 0, reward_function=None, exact_numbers: bool = False, tokenizer=None) -> dict[str, Any]:
    """Sample `k` completions for each prompt of `prompts` (a datasets.Dataset with a `prompt` column, or
    a list of strings) and report the metrics that apply:

    * always: predictive entropy, distinct-1/2, self-BLEU (k >= 2), completion length;
    * `ref` (model or path): estimates of every f-divergence D_f(policy || ref) from the samples;
    * prompts with `low`/`high` columns (random numbers): entropy and KL to uniform of the sampled numbers; with
      `exact_numbers`, also each integer's probability from the logits (`metrics.numbers`): the in-range mass,
      the normalised entropy, the KL to uniform and how often `low` is the mode;
    * `pairs` (+ `ref`): accuracy and ECE of the policy's implicit reward `beta * log(pi/pi_ref)` on them;
    * `reward_function` (``builtin:vader``, ``package.module:function`` or a callable ``(prompts, completions)
      -> scores``): mean reward of the samples, and with `compare_model` the win-rate score;
    * `reward_model`: mean reward of the samples; with `compare_model`, the win-rate score against its
      samples; with `pairs`, the reward model's accuracy, and with `attribute` its Spearman correlation
      with the attribute, accuracy where the attribute sits on the rejected side, and the Simpson
      diversity of the attribute over the policy's samples.

    `model` is a path or model id, or a model object with its `tokenizer` (e.g. from a training callback); the
    samples, with their rewards where scored, are in ``report["samples"]``.
    """
    from ..data.attributes import AttributeSpec, extract_attribute

    if k < 1:
        raise EvalError(f"k must be >= 1, got {k}.")
    if reward_model is not None and reward_function is not None:
        raise EvalError("reward_model and reward_function both score the samples; give one of them.")
    if hasattr(prompts, "column_names"):
        if "prompt" not in prompts.column_names:
            raise EvalError(f"the prompts have no 'prompt' column (columns: {prompts.column_names}).")
        rows = prompts.to_list()
    else:
        rows = [{"prompt": p} for p in (prompts or [])]
    if not rows:
        raise EvalError("no prompts to evaluate on; give a dataset with a 'prompt' column and at least one row.")
    if exact_numbers and not {"low", "high"} <= set(rows[0]):
        raise EvalError(f"exact random-number scores need prompts with 'low' and 'high' columns (columns: "
                        f"{sorted(rows[0])}); use --prompts builtin:random_numbers or add them.")
    torch.manual_seed(seed)
    policy, tok = _load_causal_lm(model) if isinstance(model, (str, os.PathLike)) else (model.eval(), tokenizer)
    if tok is None:
        raise EvalError("pass the policy as a path (its tokenizer is loaded from there), or give its `tokenizer`.")
    if tok.pad_token is None:  # batched sampling pads, as for a tokenizer loaded from a path
        tok.pad_token = tok.eos_token
    texts = [_prompt_text(tok, r["prompt"]) for r in rows]
    s = sample(policy, tok, texts, k, max_new_tokens, temperature)
    comps = s["completions"]
    groups = [comps[i * k:(i + 1) * k] for i in range(len(rows))]
    logp, entropy = _sequence_stats(policy, s["prompt_ids"], s["completion_ids"])
    report: dict[str, Any] = {
        "num_prompts": len(rows), "k": k, "max_new_tokens": max_new_tokens, "temperature": temperature,
        "entropy": entropy,
        "distinct_1": sum(distinct_n(g, 1) for g in groups) / len(groups),
        "distinct_2": sum(distinct_n(g, 2) for g in groups) / len(groups),
        "completion_length": sum(len(c) for c in s["completion_ids"]) / len(comps),
    }
    if k >= 2:
        report["self_bleu"] = sum(self_bleu(g) for g in groups) / len(groups)
    ref_model = None
    if ref is not None:
        ref_model, _ = (_load_causal_lm(ref, _device(policy)) if isinstance(ref, (str, os.PathLike))
                        else (ref.eval(), None))
        ref_logp, _ = _sequence_stats(ref_model, s["prompt_ids"], s["completion_ids"])
        report["divergence"] = divergence_estimates(logp - ref_logp)
    if "low" in rows[0] and "high" in rows[0]:
        per = [number_uniformity([first_integer(c) for c in g], r["low"], r["high"]) for g, r in zip(groups, rows)]
        report["random_numbers"] = {key: sum(p[key] for p in per) / len(per) for key in per[0]}
        if exact_numbers:
            from .numbers import random_number_scores

            exact = random_number_scores(policy, tok, texts, [(r["low"], r["high"]) for r in rows])
            report["random_numbers_exact"] = {key: v for key, v in exact.items() if key != "per_prompt"}
    samples = [{"prompt": texts[i // k], "completion": c} for i, c in enumerate(comps)]
    if pairs is not None and ref_model is not None:
        report["pairs"] = _pair_calibration(policy, ref_model, tok, pairs, beta)
    score = None  # (prompts, completions) -> rewards, from the reward function or the reward model
    if reward_function is not None:
        from ..rewards import load_reward_function

        fn = load_reward_function(reward_function) if isinstance(reward_function, str) else reward_function

        def score(ps, cs):
            return [float(x) for x in fn(ps, cs)]
    if reward_model is not None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from ..models import resolve_model_path

        rm_path = resolve_model_path(reward_model) if isinstance(reward_model, str) else reward_model
        rm = AutoModelForSequenceClassification.from_pretrained(rm_path).to(_device(policy)).eval()
        rm_tok = AutoTokenizer.from_pretrained(rm_path)
        if rm_tok.pad_token is None:
            rm_tok.pad_token = rm_tok.eos_token

        def score(ps, cs):
            return _rewards(rm, rm_tok, ps, cs)
    if score is not None:
        prompts_rep = [texts[i // k] for i in range(len(comps))]
        scores = score(prompts_rep, comps)
        for smp, sc in zip(samples, scores):
            smp["reward"] = sc
        report["reward"] = {"mean": sum(scores) / len(scores)}
        if compare_model is not None:
            other, other_tok = _load_causal_lm(compare_model, _device(policy))
            o = sample(other, other_tok, texts, k, max_new_tokens, temperature, desc="Sampling (compare)")
            other_scores = score(prompts_rep, o["completions"])
            report["reward"]["win_rate_score"] = win_rate_score(scores, other_scores)
            report["reward"]["compare_mean"] = sum(other_scores) / len(other_scores)
    if reward_model is not None:
        if pairs is not None:
            report["reward_model_bias"] = _reward_bias(rm, rm_tok, pairs, attribute)
        if attribute is not None and (attribute.startswith("length") or attribute.startswith("regex:")):
            spec = AttributeSpec(attribute)  # an extractor: it applies to the samples too
            values = extract_attribute(spec, [{"completion": c} for c in comps],
                                       tokenizer=tok if attribute.startswith("length") else None)
            report.setdefault("reward_model_bias", {})["simpson_attribute_samples"] = simpson_diversity(values)
    report["samples"] = samples
    return report


@torch.no_grad()
def _pair_calibration(policy, ref, tok, pairs, beta: float) -> dict[str, float]:
    prompts = [_prompt_text(tok, r["prompt"]) for r in pairs]
    enc = lambda texts: [tok(t, add_special_tokens=False)["input_ids"] for t in texts]  # noqa: E731
    p_ids = enc(prompts)
    out = {}
    for side in ("chosen", "rejected"):
        c_ids = [ids + [tok.eos_token_id] for ids in enc([r[side] if isinstance(r[side], str) else
                                                          r[side][0]["content"] for r in pairs])]
        lp, _ = _sequence_stats(policy, p_ids, c_ids)
        rp, _ = _sequence_stats(ref, p_ids, c_ids)
        out[side] = lp - rp
    logits = beta * (out["chosen"] - out["rejected"])
    return {"accuracy": (logits > 0).float().mean().item(),
            "ece": preference_ece(logits, torch.zeros_like(logits), beta=1.0).item()}


@torch.no_grad()
def _reward_bias(rm, tok, pairs, attribute: str | None) -> dict[str, float]:
    from ..data.attributes import AttributeSpec, extract_attribute

    prompts = [r["prompt"] if isinstance(r["prompt"], str) else r["prompt"][0]["content"] for r in pairs]
    chosen = [r["chosen"] for r in pairs]
    rejected = [r["rejected"] for r in pairs]
    rc, rr = _rewards(rm, tok, prompts, chosen), _rewards(rm, tok, prompts, rejected)
    right = [a > b for a, b in zip(rc, rr)]
    out = {"accuracy": sum(right) / len(right)}
    if attribute is not None:
        spec = AttributeSpec(attribute)
        names = pairs.column_names if hasattr(pairs, "column_names") else list(pairs[0])

        def values(side, texts):
            rows = [{"completion": t, **({attribute: r[f"{side}_{attribute}"]} if f"{side}_{attribute}" in names
                                        else {attribute: r.get(attribute)} if attribute in names else {})}
                    for t, r in zip(texts, pairs)]
            return extract_attribute(spec, rows, tokenizer=tok if attribute.startswith("length") else None)

        zc, zr = values("chosen", chosen), values("rejected", rejected)
        z = [float(v) for v in zc + zr]
        out["spearman_reward_attribute"] = spearman(rc + rr, z)
        anti = [ok for ok, a, b in zip(right, zc, zr) if float(b) > float(a)]
        if anti:
            out["accuracy_attribute_on_rejected"] = sum(anti) / len(anti)
        if attribute in names:
            out.update(_concept_bias(right, [r[attribute] for r in pairs],
                                     [r["label"] for r in pairs] if "label" in names else None))
    return out


def _concept_bias(right: list[bool], concept: list, labels: list | None) -> dict[str, float]:
    """Thesis 4.6.3 for a binary, per-pair concept column: accuracy with and without the concept (Acc@C,
    Acc@NoC) and, given the true `label` of each pair's item, Bias@C (Zhou et al. 2023)."""
    if not set(concept) <= {0, 1, True, False}:
        return {}  # not a concept flag (e.g. a numeric attribute): the Spearman figure covers it
    out = {}
    for name, flag in (("accuracy_with_concept", True), ("accuracy_without_concept", False)):
        sel = [ok for ok, c in zip(right, concept) if bool(c) == flag]
        if sel:
            out[name] = sum(sel) / len(sel)
    if labels is not None:
        try:
            out["bias_at_c"] = bias_at_c(right, concept, labels)
        except ValueError as exc:  # some (concept, label) cell is empty: Bias@C is undefined on these pairs
            warnings.warn(f"Bias@C not reported: {exc}", stacklevel=2)
    return out


def write_report(report: dict[str, Any], output_dir: str | os.PathLike) -> list[Path]:
    """report.json, samples.jsonl and PNG plots in `output_dir`; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    summary = {k: v for k, v in report.items() if k != "samples"}
    (out / "report.json").write_text(json.dumps(summary, indent=2))
    files.append(out / "report.json")
    with open(out / "samples.jsonl", "w", encoding="utf-8") as fh:
        for smp in report["samples"]:
            fh.write(json.dumps(smp) + "\n")
    files.append(out / "samples.jsonl")

    names = [n for n in ("entropy", "distinct_1", "distinct_2", "self_bleu") if n in report]
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(names, [report[n] for n in names], color="#4C72B0")
    ax.set_title(f"Diversity ({report['num_prompts']} prompts x {report['k']} samples)")
    fig.tight_layout()
    fig.savefig(out / "diversity.png", dpi=100)
    plt.close(fig)
    files.append(out / "diversity.png")
    if "divergence" in report:
        fig, ax = plt.subplots(figsize=(5, 3))
        d = report["divergence"]
        ax.bar(list(d), list(d.values()), color="#DD8452")
        ax.set_title("D_f(policy || reference), estimated from samples")
        fig.tight_layout()
        fig.savefig(out / "divergences.png", dpi=100)
        plt.close(fig)
        files.append(out / "divergences.png")
    rewards = [smp["reward"] for smp in report["samples"] if "reward" in smp]
    fig, ax = plt.subplots(figsize=(5, 3))
    if rewards:
        ax.hist(rewards, bins=20, color="#55A868")
        ax.set_title("Reward of the samples")
        name = "rewards.png"
    else:
        ax.hist([len(smp["completion"].split()) for smp in report["samples"]], bins=20, color="#55A868")
        ax.set_title("Completion length (words)")
        name = "lengths.png"
    fig.tight_layout()
    fig.savefig(out / name, dpi=100)
    plt.close(fig)
    files.append(out / name)
    return files


def log_to_wandb(report: dict[str, Any], files: list[Path], project: str = "alignkit", name: str | None = None,
                 directory: str | os.PathLike | None = None):
    """The report's numbers as a W&B summary, the samples as a table and the plots as images. `directory`
    (default: $WANDB_DIR) is passed to `wandb.init` explicitly: wandb keeps the settings of an earlier run in
    the same process otherwise."""
    import wandb

    directory = directory or os.environ.get("WANDB_DIR")
    run = wandb.init(project=project, name=name, job_type="eval", dir=str(directory) if directory else None,
                     reinit="finish_previous")
    flat = {}
    for k, v in report.items():
        if isinstance(v, dict):
            flat.update({f"eval/{k}/{kk}": vv for kk, vv in v.items()})
        elif isinstance(v, (int, float)):
            flat[f"eval/{k}"] = v
    run.log(flat)
    cols = ["prompt", "completion"] + (["reward"] if report["samples"] and "reward" in report["samples"][0] else [])
    run.log({"eval/samples": wandb.Table(columns=cols, data=[[s.get(c) for c in cols] for s in report["samples"]])})
    run.log({f"eval/{p.stem}": wandb.Image(str(p)) for p in files if p.suffix == ".png"})
    run.finish()
    # drop wandb's process-wide settings (its directory among them), so that a later run in this process,
    # e.g. a training run started from the same notebook, reads its own environment instead of ours
    wandb.teardown()
    return run



def load_prompts(spec: str, split: str = "test", num: int | None = None):
    """`builtin:<task>` (a split of a built-in task), a .json/.jsonl/.parquet/.csv file, or a saved dataset."""
    import datasets

    if spec.startswith("builtin:"):
        from ..data.synthetic import load_builtin_dataset

        try:
            ds = load_builtin_dataset(spec.split(":", 1)[1], split)
        except ValueError as exc:
            raise EvalError(str(exc)) from None
    elif Path(spec).is_dir():
        try:
            ds = datasets.load_from_disk(spec)
        except (OSError, ValueError) as exc:
            raise EvalError(f"{spec}: not a dataset saved with save_to_disk ({first_line(exc)}); give a "
                            "data file or such a folder.") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise EvalError(f"{spec} has splits {list(ds)}, not {split!r}; choose one with --split/--pairs-split.")
            ds = ds[split]
    elif Path(spec).is_file():
        from ..data.validation import DatasetError, check_data_file, locate_json_error

        fmt = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(Path(spec).suffix.lower())
        if fmt is None:
            raise EvalError(f"{spec}: use a .json, .jsonl, .parquet or .csv file, or a saved dataset folder.")
        try:
            check_data_file(spec)
            ds = datasets.load_dataset(fmt, data_files=spec, split="train")
        except DatasetError as exc:
            raise EvalError(str(exc)) from None
        except Exception as exc:  # parser errors
            try:
                if fmt == "json":
                    locate_json_error(spec)
            except DatasetError as located:
                raise EvalError(str(located)) from None
            raise EvalError(f"{spec}: could not be read ({type(exc).__name__}: {first_line(exc)}).") from None
    else:
        raise EvalError(f"{spec!r}: no such file or folder; give a data file (.jsonl, .json, .parquet, .csv), a saved "
                        "dataset folder or builtin:<task>.")
    if "prompt" not in (ds.column_names or []):
        raise EvalError(f"{spec}: no 'prompt' column (it has {ds.column_names}); rename yours to 'prompt'.")
    if len(ds) == 0:
        raise EvalError(f"{spec}: no rows.")
    if num is not None:
        ds = ds.select(range(min(num, len(ds))))
    return ds
