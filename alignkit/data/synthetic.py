"""Built-in synthetic preference tasks, made offline and deterministically from a seed.

``sentiment``
    An IMDB-like task (thesis 2.6.2, synthetic): the prompt asks for a review of an item; the chosen
    completion praises it, the rejected one pans it. The rule (positive words win) generalises to the
    held-out items of the ``test`` split, so a model that learns it shows rising reward accuracy there.
"""

from __future__ import annotations

import random

from datasets import Dataset

ITEMS = [
    "movie", "film", "show", "book", "album", "song", "play", "game", "novel", "series", "comic",
    "podcast", "concert", "musical", "documentary", "poem", "story", "opera", "sequel", "episode",
    "cartoon", "anime", "drama", "thriller", "comedy", "western", "memoir", "biography", "ballet",
    "exhibition",
]
POSITIVE = [
    "wonderful", "brilliant", "delightful", "moving", "superb", "charming", "great", "excellent",
    "beautiful", "gripping", "funny", "clever", "warm", "fresh", "stunning", "masterful",
]
NEGATIVE = [
    "awful", "boring", "dull", "terrible", "tedious", "clumsy", "bad", "poor", "ugly", "flat",
    "lifeless", "silly", "cold", "stale", "weak", "painful",
]
PROMPTS = [
    "Write a review of the {item}.",
    "What did you think of the {item}?",
    "Give your opinion of the {item}.",
    "Describe the {item} in one sentence.",
]
COMPLETIONS = [
    "The {item} was {a} and {b}.",
    "A {a}, {b} {item}.",
    "I found the {item} {a}, even {b}.",
]

# Items held out for the test split (never seen in training prompts).
_TEST_ITEMS = set(ITEMS[::5])


def _sentiment_row(rng: random.Random, items: list[str], conversational: bool) -> dict:
    item = rng.choice(items)
    prompt = rng.choice(PROMPTS).format(item=item)
    template = rng.choice(COMPLETIONS)
    chosen = template.format(item=item, a=rng.choice(POSITIVE), b=rng.choice(POSITIVE))
    rejected = template.format(item=item, a=rng.choice(NEGATIVE), b=rng.choice(NEGATIVE))
    if conversational:
        return {
            "prompt": [{"role": "user", "content": prompt}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
        }
    return {"prompt": prompt + " ", "chosen": chosen, "rejected": rejected}


def sentiment(split: str = "train", num_samples: int | None = None, seed: int = 0,
              conversational: bool = False) -> Dataset:
    """The synthetic sentiment preference task (``split`` is ``train`` or ``test``)."""
    if split not in ("train", "test"):
        raise ValueError(f"builtin:sentiment has splits 'train' and 'test', not {split!r}")
    items = [i for i in ITEMS if (i in _TEST_ITEMS) == (split == "test")]
    n = num_samples if num_samples is not None else (512 if split == "train" else 64)
    rng = random.Random(f"sentiment-{split}-{seed}")
    return Dataset.from_list([_sentiment_row(rng, items, conversational) for _ in range(n)])


def sentiment_groups(split: str = "train", num_samples: int | None = None, seed: int = 0, n_chosen: int | list = 2,
                     n_rejected: int | list = 2, conversational: bool = False) -> Dataset:
    """Group rows of the sentiment task: ``n_chosen`` praising and ``n_rejected`` panning completions.

    ``n_chosen``/``n_rejected`` may be lists, cycled over rows, to get group sizes that vary by row.
    """
    pairs = sentiment(split, num_samples=num_samples, seed=seed, conversational=conversational)
    rng = random.Random(f"sentiment-groups-{split}-{seed}")
    sizes_c = n_chosen if isinstance(n_chosen, list) else [n_chosen]
    sizes_r = n_rejected if isinstance(n_rejected, list) else [n_rejected]
    rows = []
    for i, row in enumerate(pairs):
        item = next(it for it in ITEMS if it in (row["prompt"] if isinstance(row["prompt"], str) else row["prompt"][0]["content"]))

        def sample(words, k):
            out = []
            for _ in range(k):
                text = rng.choice(COMPLETIONS).format(item=item, a=rng.choice(words), b=rng.choice(words))
                out.append([{"role": "assistant", "content": text}] if conversational else text)
            return out

        rows.append({"prompt": row["prompt"], "chosen": sample(POSITIVE, sizes_c[i % len(sizes_c)]),
                     "rejected": sample(NEGATIVE, sizes_r[i % len(sizes_r)])})
    return Dataset.from_list(rows)


BUILTIN_DATASETS = {"sentiment": sentiment, "sentiment_groups": sentiment_groups}


def builtin_dataset_names() -> list[str]:
    return sorted(BUILTIN_DATASETS)


def load_builtin_dataset(name: str, split: str, **kwargs) -> Dataset:
    if name not in BUILTIN_DATASETS:
        import difflib

        close = difflib.get_close_matches(name, BUILTIN_DATASETS, n=1)
        hint = f" Did you mean 'builtin:{close[0]}'?" if close else ""
        raise ValueError(f"unknown built-in dataset 'builtin:{name}'.{hint} Available: {builtin_dataset_names()}")
    return BUILTIN_DATASETS[name](split=split, **kwargs)


def corpus() -> list[str]:
    """Text covering every built-in task, used to train the built-in tokenizer."""
    lines = []
    for item in ITEMS:
        for p in PROMPTS:
            lines.append(p.format(item=item))
        for words in (POSITIVE, NEGATIVE):
            for a in words:
                for t in COMPLETIONS:
                    lines.append(t.format(item=item, a=a, b=words[(len(a) + len(item)) % len(words)]))
    # digits, punctuation and common English so that arbitrary user text still tokenises compactly
    lines += [" ".join(str(i) for i in range(j, j + 20)) for j in range(0, 200, 20)]
    lines += [
        "The quick brown fox jumps over the lazy dog. Yes, you are right. No, that is wrong.",
        "Question: what is the answer? Answer: the answer is correct because it is true.",
        "Please give me a random number between one and ten. Sure, here it is.",
    ] * 5
    return lines
