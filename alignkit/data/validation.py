"""Dataset validation with errors that name the problem, the row and the fix.

Every row is read, in batches (a million-row dataset costs seconds, not memory): nulls, types, formats,
empty texts and the mixing of plain text with chat messages are errors naming the row (0-based, as in
``dataset[i]``); rows whose chosen and rejected completions are the same are counted (a warning, or an
error when every row is so). Data files are checked before `datasets` parses them, so a broken JSON line
is reported with its file and line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from datasets import Dataset, IterableDataset

__all__ = ["DatasetError", "DataReport", "validate_preference_dataset", "validate_prompt_dataset",
           "apply_column_mapping", "check_data_file", "locate_json_error", "iter_rows", "iter_arrow", "text_columns",
           "value_kind"]

#: rows read per batch when streaming a dataset through the checks
BATCH_ROWS = 2048
#: rows of an IterableDataset (a streamed hub dataset) that are checked; a Dataset is checked whole
ITERABLE_ROWS = 1000


class DatasetError(ValueError):
    """A dataset that a trainer cannot use; the message says what to change."""


@dataclass
class DataReport:
    """What the checks found besides errors."""

    rows: int = 0
    #: "text" or "conversational"
    format: str = "text"
    #: rows whose chosen and rejected completions are identical (pairs), or that share a completion between
    #: their chosen and rejected groups (groups)
    identical: int = 0
    warnings: list[str] = field(default_factory=list)

    def conclude(self, where: str, kind: str | None, sameness: str = "") -> "DataReport":
        """After every row was read: an empty dataset and one whose every row is the same on both sides are
        errors; some such rows, a warning. ``sameness`` says what "the same" means for this kind of row."""
        if self.rows == 0:
            raise DatasetError(f"{where} is empty (no rows).")
        self.format = kind or "text"
        if self.identical == self.rows:
            raise DatasetError(f"{where}: in every row (all {self.rows}) {sameness}, so there is no preference to "
                               "learn; check the column mapping (dataset.columns).")
        if self.identical:
            self.warnings.append(f"{where}: {self.identical} of {self.rows} rows: {sameness}; they carry no "
                                 "preference (their loss is constant). Drop them to save compute.")
        return self


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
    """``"text"`` for a string, ``"conversational"`` for a non-empty list of chat messages, else what it is
    (``"null"``, ``"empty list"``, ``"list of ..."``, a type name)."""
    if isinstance(value, str):
        return "text"
    if value is None:
        return "null"
    if isinstance(value, list):
        if not value:
            return "empty list"
        if all(isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in value):
            return "conversational"
        return "list of " + "/".join(sorted({type(m).__name__ for m in value}))
    return type(value).__name__


def _is_blank(value, kind: str) -> bool:
    if kind == "text":
        return not value.strip()
    return all(isinstance(m["content"], str) and not m["content"].strip() for m in value)


def _bad_messages(value) -> str | None:
    """What is wrong with a conversational value's messages, if anything."""
    for j, m in enumerate(value):
        content = m["content"]
        if content is None:
            return f"message {j} has no content (null)"
        if not isinstance(content, (str, list)):
            return f"message {j} has content of type {type(content).__name__}"
    return None


def iter_rows(dataset, columns: list[str]):
    """Yield ``(index, row)`` for every row of ``dataset`` (only ``columns``), read in batches."""
    if isinstance(dataset, IterableDataset):
        for i, row in enumerate(dataset.select_columns(columns).take(ITERABLE_ROWS)):
            yield i, row
        return
    i = 0
    for batch in dataset.select_columns(columns).iter(batch_size=BATCH_ROWS):
        n = len(batch[columns[0]])
        for j in range(n):
            yield i, {c: batch[c][j] for c in columns}
            i += 1


def text_columns(dataset, columns: list[str]) -> bool:
    """Whether every one of ``columns`` is a plain string column (then the checks run on Arrow arrays)."""
    from datasets import Value

    features = getattr(dataset, "features", None) or {}
    return isinstance(dataset, Dataset) and all(
        isinstance(features.get(c), Value) and features[c].dtype in ("string", "large_string") for c in columns)


def iter_arrow(dataset, columns: list[str]):
    """Yield ``(offset, pyarrow.Table)`` batches of ``columns`` (row order as in the dataset)."""
    offset = 0
    for batch in dataset.select_columns(columns).with_format("arrow").iter(batch_size=BATCH_ROWS * 32):
        yield offset, batch
        offset += batch.num_rows


def _first(mask) -> int | None:
    import pyarrow.compute as pc

    hits = pc.indices_nonzero(pc.fill_null(mask, False))
    return hits[0].as_py() if len(hits) else None


def _check_text_columns(dataset, where: str, columns: list[str], required: tuple, report: "DataReport") -> None:
    """The row checks of plain-text columns, vectorised: nulls, empty texts, identical pairs."""
    import pyarrow.compute as pc

    for offset, batch in iter_arrow(dataset, columns):
        for c in columns:
            col = batch.column(c)
            i = _first(col.is_null())
            if i is not None:
                raise DatasetError(f"{where}, row {offset + i} (0-based): {c!r} is missing (null); it must be a string "
                                   "or a non-empty list of chat messages ({'role': ..., 'content': ...}). Fix or drop "
                                   "that row.")
            if c in required:
                i = _first(pc.equal(pc.binary_length(pc.utf8_trim_whitespace(col)), 0))
                if i is not None:
                    raise DatasetError(f"{where}, row {offset + i} (0-based): {c!r} is empty. Fix or drop that row.")
        if len(required) == 2:
            report.identical += pc.sum(pc.equal(batch.column(required[0]), batch.column(required[1]))).as_py() or 0
        report.rows += batch.num_rows


def _check_value(where: str, i: int, column: str, value, expected_kind: str | None) -> str:
    """Check one prompt/completion; return its kind."""
    kind = value_kind(value)
    if kind not in ("text", "conversational"):
        what = "missing (null)" if kind == "null" else "an empty list" if kind == "empty list" else \
            f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"
        raise DatasetError(f"{where}, row {i} (0-based): {column!r} is {what}; it must be a string or a non-empty list "
                           "of chat messages ({'role': ..., 'content': ...}). Fix or drop that row.")
    if kind == "conversational":
        problem = _bad_messages(value)
        if problem:
            raise DatasetError(f"{where}, row {i} (0-based): {column!r}: {problem}; every message needs a string "
                               "'content'. Fix or drop that row.")
    if expected_kind is not None and kind != expected_kind:
        raise DatasetError(f"{where}, row {i} (0-based): {column!r} is {kind} but earlier values are "
                           f"{expected_kind}; use one format (plain text or chat messages) for every prompt and "
                           "completion of the dataset.")
    return kind


def validate_preference_dataset(dataset, where: str = "dataset", required=("chosen", "rejected")) -> DataReport:
    """Check that ``dataset`` is a pairwise preference dataset TRL's DPOTrainer / RewardTrainer can use.

    Needs ``chosen`` and ``rejected`` columns (and usually ``prompt``), each plain text or a list of chat
    messages (``{"role", "content"}``), the same format in every column and every row, no nulls, no empty
    completions. Rows whose chosen and rejected completions are identical are counted in the report (an
    error when every row is so: nothing to learn). Raises :class:`DatasetError`.
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
    cols = [c for c in ("prompt", *required) if c in names]
    report = DataReport()
    kind = None
    if text_columns(dataset, cols):
        _check_text_columns(dataset, where, cols, tuple(required), report)
        kind = "text"
    else:
        for i, row in iter_rows(dataset, cols):
            for c in cols:
                kind = _check_value(where, i, c, row[c], kind)
                if c in required and _is_blank(row[c], kind):
                    raise DatasetError(f"{where}, row {i} (0-based): {c!r} is empty. Fix or drop that row.")
            if row[required[0]] == row[required[1]]:
                report.identical += 1
            report.rows += 1
    return report.conclude(where, kind, f"'{required[0]}' and '{required[1]}' are the same")


def validate_prompt_dataset(dataset, where: str = "dataset") -> DataReport:
    """Check that ``dataset`` holds prompts for on-policy training (PPO): a ``prompt`` column (text or
    conversational, one format, none empty), or tokenized ``input_ids``."""
    names = dataset.column_names or []
    if "prompt" not in names and "input_ids" not in names:
        raise DatasetError(f"{where} has no 'prompt' column (it has {names}); map yours with dataset.columns, "
                           "e.g. columns: {prompt: question}.")
    report = DataReport()
    kind = None
    if "prompt" in names and text_columns(dataset, ["prompt"]):
        _check_text_columns(dataset, where, ["prompt"], ("prompt",), report)
    elif "prompt" in names:
        for i, row in iter_rows(dataset, ["prompt"]):
            kind = _check_value(where, i, "prompt", row["prompt"], kind)
            if _is_blank(row["prompt"], kind):
                raise DatasetError(f"{where}, row {i} (0-based): 'prompt' is empty. Fix or drop that row.")
            report.rows += 1
    else:
        report.rows = len(dataset)
    return report.conclude(where, kind)


# ---- data files -----------------------------------------------------------------------------------------

def check_data_file(path: str | Path) -> None:
    """The cheap checks of a local data file before `datasets` parses it: it exists with content. (Where
    parsing then fails, :func:`locate_json_error` finds the line.) Raises DatasetError."""
    path = Path(path)
    if path.stat().st_size == 0:
        raise DatasetError(f"{path}: the file is empty; it needs one example per line (.jsonl) or row (.csv).")
    if path.suffix.lower() in (".json", ".jsonl"):
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 16), b""):
                if chunk.strip():
                    return
        raise DatasetError(f"{path}: the file holds only whitespace; it needs one JSON object per line.")


def locate_json_error(path: str | Path) -> None:
    """Find what makes a JSON data file unreadable: a line that does not parse or is not an object (JSON
    Lines), or the error in a JSON array. Raises DatasetError with the file and line; returns if it finds
    nothing wrong. Reads line by line (called only when `datasets` failed to parse the file)."""
    path = Path(path)
    with open(path, "rb") as fh:
        first = b""
        for chunk in iter(lambda: fh.read(4096), b""):
            first = chunk.lstrip()
            if first:
                break
    if first[:1] == b"[":
        _check_json_document(path)
        return
    records = 0
    with open(path, "rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DatasetError(f"{path}, line {line_no}: not UTF-8 text; save the file as UTF-8.") from None
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                if line_no == 1 and first[:1] == b"{":
                    try:  # one JSON document over several lines (datasets reads it too)
                        _check_json_document(path)
                        return
                    except DatasetError:
                        pass
                raise DatasetError(f"{path}, line {line_no}: not valid JSON ({exc.msg} at column {exc.colno}); each "
                                   "line must be one JSON object. Fix or remove that line.") from None
            if not isinstance(record, dict):
                raise DatasetError(f"{path}, line {line_no}: a JSON {type(record).__name__}, not an object; each line "
                                   'must be one object such as {"prompt": ..., "chosen": ..., "rejected": ...}.')
            records += 1
    if records == 0:
        raise DatasetError(f"{path}: the file holds no records; it needs one JSON object per line.")


def _check_json_document(path: Path) -> None:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise DatasetError(f"{path}: not UTF-8 text; save the file as UTF-8.") from None
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}, line {exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno}).") from None
    if isinstance(doc, list):
        if not doc:
            raise DatasetError(f"{path}: the JSON array is empty; it needs one object per example.")
        for i, record in enumerate(doc):
            if not isinstance(record, dict):
                raise DatasetError(f"{path}: element {i} of the JSON array is a {type(record).__name__}, not an "
                                   "object; each example must be an object such as {\"prompt\": ..., ...}.")
