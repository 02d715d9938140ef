"""The random-number task scored exactly from a model's logits (docs/eval.md, "Exact random-number scores").

Sampling k answers per prompt estimates how uniform a policy is on [a, b] with a large error for small k, and it
cannot tell "spreads over [a, b]" from "spreads over [a, a + 10]" when k is small. Here every integer's probability
is computed instead.

Convention (decided here, stated once): the answer to a prompt is the integer n in [a, b] when the reply begins with
one of `LEADS` (nothing, a space, a newline, a space and a
newline, or two newlines: how SmolLM2 begins its replies), then the decimal digits of n (no sign, no leading
zeros), then anything that does not begin with a digit (the end-of-sequence token included). Its probability sums over every tokenisation of
that text: each way of cutting `lead + digits` into vocabulary pieces, ending either at a piece boundary followed by
a token that does not begin with a digit, or inside a last token that continues with a non-digit ("7." or "7\\n").
These events are disjoint, so the sum is exact. All of it is computed by one forward pass per prompt: the prompt,
then a trie of every piece sequence, each node attending to the prompt and its own ancestors (a 4D mask, positions
continuing the prompt's), so each node sees exactly the context it has in generation.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = ["LEADS", "NumberVocabulary", "integer_probabilities", "exact_uniformity", "random_number_scores"]

#: what may come before the digits of an answer
LEADS = ("", " ", "\n", " \n", "\n\n")
_PIECE = re.compile(r"[ \n]{0,2}\d*")


@dataclass(frozen=True)
class NumberVocabulary:
    """The pieces of a tokenizer that can spell an answer.

    `pieces`: text -> ids for tokens that are an optional lead and digits only (" 57", "5", " "); `closing`: digits
    (with their lead) -> ids for tokens that go on with a non-digit ("7." -> "7"); `digit_start[i]`: token i's text
    begins with a digit (such a token after the last digit would make the number longer)."""

    pieces: dict[str, list[int]]
    closing: dict[str, list[int]]
    digit_start: torch.Tensor

    @classmethod
    def of(cls, tok, size: int | None = None) -> "NumberVocabulary":
        size = max(size or 0, len(tok))
        special = set(tok.all_special_ids)
        pieces: dict[str, list[int]] = {}
        closing: dict[str, list[int]] = {}
        digit_start = torch.zeros(size, dtype=torch.bool)
        for i in range(len(tok)):
            text = tok.convert_tokens_to_string([tok.convert_ids_to_tokens(i)]) if i not in special else ""
            if text[:1].isdigit():
                digit_start[i] = True
            head = _PIECE.match(text).group()
            if not head:
                continue
            if head == text:
                pieces.setdefault(text, []).append(i)
            elif head[-1:].isdigit():  # digits, then a non-digit: the number ends inside this token
                closing.setdefault(head, []).append(i)
        return cls(pieces, closing, digit_start)

    def spellings(self, text: str) -> list[tuple[tuple[int, ...], bool]]:
        """Every token sequence that writes `text` (a lead and digits) and ends the number there: (ids, whether a
        non-digit token must follow)."""
        out: list[tuple[tuple[int, ...], bool]] = []

        def walk(rest: str, ids: tuple[int, ...]) -> None:
            if not rest:
                out.append((ids, True))
                return
            for i in self.closing.get(rest, ()):
                out.append((ids + (i,), False))
            for end in range(1, len(rest) + 1):
                for i in self.pieces.get(rest[:end], ()):
                    walk(rest[end:], ids + (i,))

        walk(text, ())
        return out


@torch.no_grad()
def integer_probabilities(model, tok, prompt_ids: Sequence[int], low: int, high: int,
                          vocab: NumberVocabulary | None = None, leads: Sequence[str] = LEADS) -> torch.Tensor:
    """P(answer = n) for n = low..high under `model` at temperature 1, after the token ids `prompt_ids` (float64,
    length high - low + 1). See the module docstring for what an answer is."""
    if low < 0 or high < low:
        raise ValueError(f"need 0 <= low <= high, got [{low}, {high}]")
    if not prompt_ids:
        raise ValueError("the prompt has no tokens")
    vocab = vocab or NumberVocabulary.of(tok)
    paths = []  # (n - low, ids, needs a non-digit after)
    for n in range(low, high + 1):
        found = [(n - low, ids, term) for lead in leads for ids, term in vocab.spellings(lead + str(n))]
        canonical = tuple(tok(f" {n}", add_special_tokens=False)["input_ids"])
        if not any(ids == canonical for _, ids, _ in found):
            raise ValueError(f"the tokenizer's pieces could not be read: {tok.decode(list(canonical))!r} is written "
                             f"{list(canonical)}, which is not among the spellings found for {n}")
        paths += found
    nodes: dict[tuple[int, ...], int] = {}  # prefix -> its index among the appended tokens
    for _, ids, _ in paths:
        for d in range(1, len(ids) + 1):
            nodes.setdefault(ids[:d], len(nodes))
    p = len(prompt_ids)
    length = p + len(nodes)
    input_ids = torch.tensor([list(prompt_ids) + [ids[-1] for ids in nodes]])
    position_ids = torch.tensor([list(range(p)) + [p - 1 + len(ids) for ids in nodes]])
    allowed = torch.zeros(length, length, dtype=torch.bool)
    allowed[:p, :p] = torch.ones(p, p, dtype=torch.bool).tril()
    for ids, j in nodes.items():
        allowed[p + j, :p] = True
        for d in range(1, len(ids) + 1):
            allowed[p + j, p + nodes[ids[:d]]] = True
    dtype = next(model.parameters()).dtype
    mask = torch.zeros(1, 1, length, length, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    device = next(model.parameters()).device
    logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                   position_ids=position_ids.to(device), use_cache=False).logits[0].double().cpu()
    logp = logits.log_softmax(-1)
    digit = vocab.digit_start
    if digit.numel() < logp.size(-1):
        digit = torch.cat([digit, torch.zeros(logp.size(-1) - digit.numel(), dtype=torch.bool)])
    stop = logp.masked_fill(digit[: logp.size(-1)], -math.inf).logsumexp(-1)  # log P(next token is no digit)

    def position(prefix: tuple[int, ...]) -> int:  # the output that predicts the token after `prefix`
        return p - 1 if not prefix else p + nodes[prefix]

    total = torch.zeros(high - low + 1, dtype=torch.float64)
    for k, ids, term in paths:
        lp = sum(logp[position(ids[:d]), ids[d]] for d in range(len(ids)))
        if term:
            lp = lp + stop[position(ids)]
        total[k] += math.exp(float(lp))
    return total


def exact_uniformity(probs: torch.Tensor) -> dict[str, float]:
    """From the probabilities of the integers low..high: the in-range mass; the entropy of the answers given that
    they are in range, divided by log(high - low + 1) (1 = uniform); the KL from that to uniform; and whether
    `low` is the most likely answer."""
    probs = probs.double()
    mass = float(probs.sum())
    width = probs.numel()
    q = probs / mass if mass > 0 else torch.full_like(probs, 1.0 / width)
    entropy = float(-(q * q.clamp(min=1e-300).log()).sum())
    return {"in_range_mass": mass,
            "normalized_entropy": entropy / math.log(width) if width > 1 else 1.0,
            "kl_to_uniform": math.log(width) - entropy,
            "low_is_mode": float(int(probs.argmax()) == 0)}


def random_number_scores(model, tok, prompts: Sequence[str], bounds: Sequence[tuple[int, int]],
                         progress: bool = False) -> dict:
    """`exact_uniformity` of each prompt text (with its [a, b]) and their means; `per_prompt` keeps the rows."""
    from tqdm.auto import tqdm

    vocab = NumberVocabulary.of(tok)
    per = []
    for text, (a, b) in tqdm(list(zip(prompts, bounds)), desc="Exact scores", disable=not progress):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        per.append(exact_uniformity(integer_probabilities(model, tok, ids, a, b, vocab)))
    means = {key: sum(r[key] for r in per) / len(per) for key in per[0]}
    return {**means, "per_prompt": per}
