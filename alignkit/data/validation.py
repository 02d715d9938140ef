"""Dataset validation with errors that name the problem and the fix."""

from __future__ import annotations

from datasets import Dataset, IterableDataset

__all__ = ["DatasetError", "validate_preference_dataset", "apply_column_mapping"]


class DatasetError(ValueError):
    """A dataset that a trainer cannot use; the message says what to change."""


def apply_column_mapping(dataset, columns: dict[str, str] | None, where: str = "dataset"):
    """Rename the dataset's columns ``{our_name: their_name}`` (e.g. ``{"chosen": "response_a"}``)."""
    if not columns:
        return dataset
    names = dataset.column_names or []
    missing = [src for src in columns.values() if src not in names]
    if missing:
        raise DatasetError(
            f"{where}: the column mapping names column(s) {missing} that the dataset does not have; "
            f"its columns are {names}."
        )
    rename = {src: dst for dst, src in columns.items() if src != dst}
    return dataset.rename_columns(rename) if rename else dataset


def value_kind(value) -> str:
    """``"text"`` for a string, ``"conversational"`` for a non-empty list of chat messages, else the type name."""
    if isinstance(value, str):
        return "text"
    if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        return "conversational"
    if isinstance(value, list) and not value:
        return "empty list"
    return type(value).__name__


def validate_preference_dataset(dataset, where: str = "dataset", required=("chosen", "rejected"),
                                check_rows: int = 16) -> None:
    """Check that ``dataset`` is a pairwise preference dataset TRL's DPOTrainer can use.

    Needs ``chosen`` and ``rejected`` columns (and usually ``prompt``), each plain text or a list of
    chat messages (``{"role", "content"}``), the same kind in every column. Raises :class:`DatasetError`.
    """
    if not isinstance(dataset, (Dataset, IterableDataset)):
        raise DatasetError(f"{where} must be a datasets.Dataset, got {type(dataset).__name__}")
    names = list(dataset.column_names or [])
    missing = [c for c in required if c not in names]
    if missing:
        raise DatasetError(
            f"{where} is missing column(s) {missing}; it has {names}. A preference dataset needs 'prompt', "
            "'chosen' and 'rejected'. If yours are named differently, map them in the recipe, e.g. "
            "dataset: {columns: {prompt: question, chosen: response_good, rejected: response_bad}}."
        )
    if isinstance(dataset, Dataset) and len(dataset) == 0:
        raise DatasetError(f"{where} is empty.")
    cols = [c for c in ("prompt", *required) if c in names]
    rows = dataset.select(range(min(check_rows, len(dataset)))) if isinstance(dataset, Dataset) else dataset.take(check_rows)
    for i, row in enumerate(rows):
        kinds = {c: value_kind(row[c]) for c in cols}
        bad = {c: k for c, k in kinds.items() if k not in ("text", "conversational")}
        if bad:
            raise DatasetError(
                f"{where}, row {i}: column(s) {bad} must hold a string or a non-empty list of chat messages "
                "({'role': ..., 'content': ...})."
            )
        if len(set(kinds.values())) > 1:
            raise DatasetError(
                f"{where}, row {i}: mixes plain text and chat messages across columns ({kinds}); use one "
                "format for prompt, chosen and rejected."
            )
        for c in required:
            if kinds[c] == "text" and not row[c].strip():
                raise DatasetError(f"{where}, row {i}: column {c!r} is empty.")


def validate_prompt_dataset(dataset, where: str = "dataset") -> None:
    """Check that ``dataset`` holds prompts for on-policy training (PPO): a ``prompt`` column (text or
    conversational), or tokenized ``input_ids``."""
    names = dataset.column_names or []
    if "prompt" not in names and "input_ids" not in names:
        raise DatasetError(f"{where} has no 'prompt' column (it has {names}); map yours with dataset.columns, "
                           "e.g. columns: {prompt: question}.")
    if len(dataset) == 0:
        raise DatasetError(f"{where} is empty.")
