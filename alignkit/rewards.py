"""Reward functions for PPOTrainer and OnlineMultiSampleTrainer (and TRL's GRPO/RLOO `reward_funcs`):
`(prompts, completions) -> scores`. The built-in ones take texts or, as TRL passes conversational completions, lists
of messages (the last message's content is scored).

Built-in ones: ``sentiment`` scores the built-in synthetic tasks, ``vader`` real English text; recipes name them `builtin:<name>`, or any importable
callable as `package.module:function`.
"""

from __future__ import annotations

import importlib
import re
from typing import TYPE_CHECKING, Callable, Sequence, Union

from ._util import first_line
from .data.synthetic import NEGATIVE, POSITIVE

if TYPE_CHECKING:
    import torch

#: one source of reward: a sequence-classification model with one output (a reward model), or a function
#: `(prompts, completions) -> scores`. PPOTrainer takes one or a list of them (`reward_model`, weighted by
#: `reward_weights`); OnlineMultiSampleTrainer takes TRL GRPO's `reward_funcs`, which also accepts a model's path.
RewardSource = Union["torch.nn.Module", Callable[[Sequence[str], Sequence[str]], Sequence[float]]]

_POS, _NEG = set(POSITIVE), set(NEGATIVE)


def _texts(completions) -> list[str]:
    """Completions as texts: a conversational completion (a list of messages) is its last message's content."""
    return [c[-1]["content"] if isinstance(c, list) else c for c in completions]


def sentiment(prompts: list[str], completions: list[str], **_) -> list[float]:
    """The sentiment task's rule as a reward: praising words minus panning words in the completion."""
    out = []
    for text in _texts(completions):
        words = re.findall(r"[a-z]+", text.lower())
        out.append(float(sum(w in _POS for w in words) - sum(w in _NEG for w in words)))
    return out


_VADER = None


def vader(prompts: list[str], completions: list[str], **_) -> list[float]:
    """A real sentiment scorer for real text: VADER's compound score of the completion, in [-1, 1] (Hutto and
    Gilbert, 2014; the MIT-licensed `vaderSentiment` package, a lexicon and rules, no model)."""
    global _VADER
    if _VADER is None:
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError:
            raise ValueError("builtin:vader needs the vaderSentiment package: pip install vaderSentiment "
                             "(or pip install 'alignkit[real]').") from None
        _VADER = SentimentIntensityAnalyzer()
    return [float(_VADER.polarity_scores(text)["compound"]) for text in _texts(completions)]


BUILTIN_REWARDS = {"sentiment": sentiment, "vader": vader}


def load_reward_function(spec: str):
    """`builtin:<name>` or `package.module:function`."""
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        if name not in BUILTIN_REWARDS:
            raise ValueError(f"unknown built-in reward {spec!r}; available: "
                             f"{', '.join('builtin:' + n for n in BUILTIN_REWARDS)}.")
        return BUILTIN_REWARDS[name]
    if ":" not in spec:
        raise ValueError(f"reward function {spec!r}: write it as 'package.module:function' or 'builtin:<name>'.")
    module, name = spec.split(":", 1)
    try:
        fn = getattr(importlib.import_module(module), name)
    except Exception as exc:  # ImportError, AttributeError, or an error inside the module
        raise ValueError(f"reward function {spec!r} could not be imported ({type(exc).__name__}: "
                         f"{first_line(exc)}); check the module path and that it is "
                         "importable from the current directory.") from None
    if not callable(fn):
        raise ValueError(f"reward function {spec!r} is not callable.")
    return fn
