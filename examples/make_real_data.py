"""Build the data files of the real-model recipes (recipes/real/data/), from SmolLM2's own samples.

The files are committed, so the recipes need neither this script nor the packages it reads; it documents how they
were made and rebuilds them (deterministic given the seed, on the same machine and thread count):

* ``random-numbers-smollm2.jsonl``: the random-number task of thesis 3.6.1 on SmolLM2-135M-Instruct. Each row asks
  for a random integer in [a, b] (interval widths 5 to 10) with the reply begun "Here is a random integer between a
  and b:"; chosen = 4 distinct uniform draws from [a, b], rejected = 4 of SmolLM2's own samples (its bias).
* ``chat-prompts.jsonl``: English questions and remarks from the chatterbot-corpus package (BSD-3-Clause; ChatterBot
  Corpus contributors), one user turn each: PPO prompts on real text.
* ``cheerful-smollm2.jsonl``: for those prompts, 4 SmolLM2 replies each, scored by VADER sentiment (builtin:vader);
  chosen = the most positive reply, rejected = the most negative, kept when they differ by at least 0.3: a real
  preference (a more cheerful assistant) labelled by a real scorer.

    pip install --no-deps chatterbot-corpus     # only this script needs it
    python examples/make_real_data.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "reproduce"))
from _common import count, sample_groups, setup  # noqa: E402

OUT = ROOT / "recipes" / "real" / "data"


def chat_prompts(limit: int) -> list[str]:
    """The first turns of chatterbot-corpus' English conversations: questions and remarks a user would type."""
    import importlib.metadata

    import yaml

    try:
        dist = importlib.metadata.distribution("chatterbot-corpus")
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit("this script reads chatterbot-corpus: pip install --no-deps chatterbot-corpus") from None
    seen, out = set(), []
    files = sorted(str(f) for f in dist.files if "/data/english/" in str(f) and str(f).endswith(".yml"))
    for name in files:
        if name.endswith("botprofile.yml"):  # the bot's self-description, not users' turns
            continue
        convs = yaml.safe_load(Path(dist.locate_file(name)).read_text(encoding="utf-8")).get("conversations") or []
        for conv in convs:
            first = str(conv[0]).strip() if conv else ""
            key = first.lower().rstrip("?.! ")
            if 3 <= len(first.split()) <= 20 and key not in seen:
                seen.add(key)
                out.append(first[0].upper() + first[1:])
    return out[:limit]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=count, default=None)
    p.add_argument("--random-numbers", type=count, default=160, help="rows of the random-number file")
    p.add_argument("--chat", type=count, default=160, help="prompts to sample replies for (cheerful file)")
    p.add_argument("--only", choices=["random-numbers", "chat"], default=None)
    a = p.parse_args(argv)
    setup(a.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignkit.models import resolve_model_path
    from alignkit.rewards import vader

    path = resolve_model_path("builtin:smollm2-135m-instruct")
    model, tok = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    OUT.mkdir(parents=True, exist_ok=True)

    if a.only in (None, "random-numbers"):
        from random_numbers_real import preference_data

        rows = preference_data(tok, model, a.random_numbers, seed=0)
        with open(OUT / "random-numbers-smollm2.jsonl", "w") as fh:
            for r in rows:
                fh.write(json.dumps(r) + "\n")
        print(f"random-numbers-smollm2.jsonl: {len(rows)} rows")

    if a.only in (None, "chat"):
        prompts = chat_prompts(10_000)
        with open(OUT / "chat-prompts.jsonl", "w") as fh:
            for q in prompts:
                fh.write(json.dumps({"prompt": [{"role": "user", "content": q}]}) + "\n")
        print(f"chat-prompts.jsonl: {len(prompts)} prompts")
        chosen_prompts = prompts[:: max(len(prompts) // a.chat, 1)][:a.chat]
        texts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
                 for q in chosen_prompts]
        groups = sample_groups(model, tok, texts, 4, seed=0, max_new_tokens=40)
        kept = 0
        with open(OUT / "cheerful-smollm2.jsonl", "w") as fh:
            for q, g in zip(chosen_prompts, groups):
                g = [c.strip() for c in g if c.strip()]
                if len(g) < 2:
                    continue
                scores = vader([q] * len(g), g)
                hi, lo = max(range(len(g)), key=scores.__getitem__), min(range(len(g)), key=scores.__getitem__)
                if scores[hi] - scores[lo] < 0.3:
                    continue
                fh.write(json.dumps({"prompt": [{"role": "user", "content": q}],
                                     "chosen": [{"role": "assistant", "content": g[hi]}],
                                     "rejected": [{"role": "assistant", "content": g[lo]}],
                                     "score_chosen": scores[hi], "score_rejected": scores[lo]}) + "\n")
                kept += 1
        print(f"cheerful-smollm2.jsonl: {kept} pairs from {len(chosen_prompts)} prompts")


if __name__ == "__main__":
    main()
