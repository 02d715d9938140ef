"""Model cards, written in one place for every trainer, with huggingface_hub's card machinery (as TRL's are): the
trainer's name, paper and tags (TRL's `_name`, `_paper`, `_tag_names`), the base model named as it was given
(a hub id, a local folder or a built-in), a quick start that loads the saved folder, the method's settings
(`card_details()` of each trainer) and the recipe when `alignkit train` trained it."""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version

from .. import _adapter
from ._common import base_model_name, describe_base_model

__all__ = ["write_model_card"]

THESIS_CITATION = """@phdthesis{wang2025robust,
    title  = {{Towards Robust Alignment of Language Models with Human Preferences}},
    author = {Chaoqi Wang},
    school = {University of Chicago},
    year   = 2025,
}"""

_TEMPLATE = """---
{{ card_data }}
---

# Model Card for {{ model_name }}

This model is a fine-tuned version of {{ base_model }}{% if dataset_name %} on the {{ dataset_name }} dataset{% endif %}.
It has been trained with {{ trainer_name }} (`{{ trainer_class }}`) from alignkit, on top of
[TRL](https://github.com/huggingface/trl){% if paper_id %}; the method was introduced in
[{{ paper_title }}](https://huggingface.co/papers/{{ paper_id }}){% endif %}.

## Quick start

```python
{{ quick_start }}
```

## alignkit
{% for line in details %}
- {{ line }}{% endfor %}
{% if recipe %}
Recipe:

```yaml
{{ recipe }}
```
{% endif %}
### Framework versions
{% for name, v in versions %}
- {{ name }}: {{ v }}{% endfor %}

## Citations
{% if trainer_citation %}
Cite {{ trainer_name }} as:

```bibtex
{{ trainer_citation }}
```
{% endif %}
Cite the thesis the methods come from as:

```bibtex
{{ thesis_citation }}
```
"""

_POLICY_START = '''from transformers import pipeline

generator = pipeline("text-generation", model="{path}")
print(generator([{{"role": "user", "content": "Hello!"}}], max_new_tokens=64, return_full_text=False)[0]["generated_text"])'''

_REWARD_START = '''from transformers import pipeline

scorer = pipeline("text-classification", model="{path}", function_to_apply="none")  # the raw reward
print(scorer("A reply to score."))'''


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def write_model_card(trainer, model_name: str | None = None, dataset_name: str | None = None,
                     tags=None, reward_model: bool = False) -> None:
    """Write `output_dir/README.md` for `trainer` (rank 0 only)."""
    if not trainer.is_world_process_zero():
        return
    from huggingface_hub import ModelCard, ModelCardData

    out = trainer.args.output_dir
    base = base_model_name(trainer)
    hub_id = base if base and not base.startswith("builtin:") and not os.path.exists(base) \
        and not base.startswith((".", "/", "~")) else None
    tags = [tags] if isinstance(tags, str) else list(tags or [])
    name, paper, trainer_tags = _adapter.card_name(trainer), _adapter.card_paper(trainer), \
        _adapter.card_tags(trainer)
    card_data = ModelCardData(base_model=hub_id, datasets=dataset_name, library_name="transformers",
                              model_name=model_name or os.path.basename(os.path.abspath(out)),
                              tags=["generated_from_trainer", *dict.fromkeys([*trainer_tags, *tags])])
    recipe = getattr(trainer, "alignkit_recipe", None)
    from .. import __version__

    card = ModelCard.from_template(
        card_data, template_str=_TEMPLATE, model_name=card_data.model_name, base_model=describe_base_model(base),
        dataset_name=dataset_name, trainer_name=name, trainer_class=type(trainer).__name__,
        paper_id=paper.get("id"), paper_title=paper.get("title"), trainer_citation=paper.get("citation"),
        thesis_citation=THESIS_CITATION, quick_start=(_REWARD_START if reward_model else _POLICY_START).format(path=out),
        details=trainer.card_details(), recipe=recipe.rstrip() if recipe else None,
        versions=[("alignkit", __version__)] + [(p, _version(p)) for p in
                                                ("trl", "transformers", "torch", "datasets", "tokenizers")])
    card.save(os.path.join(out, "README.md"))
