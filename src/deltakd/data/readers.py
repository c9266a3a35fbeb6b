"""Reading task files (tsv / csv / jsonl) and HF datasets into validated examples.

Every malformed row stops the run with the file and line that hold it.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any, Iterator

import datasets

from ..errors import DeltakdError
from .tasks import TaskSpec

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))

Example = dict[str, Any]  # {"text_a": str, "text_b": str | None, "label": str | float}


def detect_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    suffix = path.suffix.lower().lstrip(".")
    if suffix in ("tsv", "csv", "jsonl"):
        return suffix
    if suffix == "json":
        return "jsonl"
    raise DeltakdError(f"{path}: cannot tell the format from the extension; set task.format (tsv, csv, jsonl)")


def _rows(path: Path, fmt: str, header: bool) -> Iterator[tuple[int, dict[Any, Any]]]:
    """(line number, row) pairs; a row maps column name (or index when headerless) to value."""
    with open(path, encoding="utf-8", newline="") as f:
        if fmt == "jsonl":
            for i, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DeltakdError(f"{path} line {i}: invalid JSON: {e.msg}") from None
                if not isinstance(row, dict):
                    raise DeltakdError(f"{path} line {i}: expected a JSON object, got {type(row).__name__}")
                yield i, row
            return
        if fmt == "tsv":
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        else:
            reader = csv.reader(f)
        names: list[str] | None = None
        for cells in reader:
            line = reader.line_num
            if not cells or all(not c.strip() for c in cells):
                continue
            if header and names is None:
                names = [c.strip() for c in cells]
                continue
            if names is None:
                yield line, dict(enumerate(cells))
            else:
                yield line, {n: (cells[j] if j < len(cells) else None) for j, n in enumerate(names)}


def _get(row: dict[Any, Any], col: str | int, where: str) -> Any:
    if col not in row or row[col] is None:
        raise DeltakdError(f"{where}: missing column {col!r}")
    return row[col]


def _label_key(value: Any) -> str:
    """Labels compare as strings: 1, '1' and 1.0 from JSON all mean class '1'."""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def to_example(row: dict[Any, Any], spec: TaskSpec, where: str, labelled: bool = True) -> Example:
    texts = []
    for col in spec.text_columns:
        text = _get(row, col, where)
        text = str(text).strip()
        if not text:
            raise DeltakdError(f"{where}: empty text in column {col!r}")
        texts.append(text)
    ex: Example = {"text_a": texts[0], "text_b": texts[1] if len(texts) > 1 else None}
    if labelled:
        raw = _get(row, spec.label_column, where)
        if spec.kind == "regression":
            try:
                ex["label"] = float(raw)
            except (TypeError, ValueError):
                raise DeltakdError(f"{where}: label {raw!r} in column {spec.label_column!r} is not a number") from None
        else:
            key = _label_key(raw)
            if spec.labels is not None and key not in spec.labels:
                raise DeltakdError(f"{where}: label {key!r} is not in the label set {list(spec.labels)}")
            if not key:
                raise DeltakdError(f"{where}: empty label in column {spec.label_column!r}")
            ex["label"] = key
    return ex


def read_file(path: Path, spec: TaskSpec) -> list[Example]:
    if not path.is_file():
        raise DeltakdError(f"data file '{path}' does not exist")
    fmt = detect_format(path, spec.format)
    header = spec.header if fmt != "jsonl" else True
    examples = [to_example(row, spec, f"{path} line {line}") for line, row in _rows(path, fmt, header)]
    if not examples:
        raise DeltakdError(f"{path}: no examples")
    return examples


def read_hf(source: Any, spec: TaskSpec) -> dict[str, list[Example]]:
    """Splits of a ``datasets.load_dataset`` source (hub name, builder such as 'csv', or a folder)."""
    try:
        ds = datasets.load_dataset(source.path, source.name, data_files=source.data_files,
                                   revision=source.revision, **source.options)
    except Exception as e:  # datasets raises many kinds; the user needs the message, not a trace
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DeltakdError(f"task.hf: cannot load dataset '{source.path}': {msg}") from None
    out: dict[str, list[Example]] = {}
    for split, hf_split in source.splits.items():
        if hf_split not in ds:
            if split == "train":
                raise DeltakdError(f"task.hf.splits: '{hf_split}' not in dataset '{source.path}' "
                                   f"(has {', '.join(ds.keys())})")
            continue
        label_names = _class_label_names(ds[hf_split], spec.label_column)
        rows = []
        for i, row in enumerate(ds[hf_split]):
            if (label_names is not None and isinstance(row.get(spec.label_column), int)
                    and (spec.labels is None or set(label_names) <= set(spec.labels))):
                row = {**row, spec.label_column: label_names[row[spec.label_column]]}
            rows.append(to_example(row, spec, f"dataset '{source.path}' split '{hf_split}' row {i}"))
        out[split] = rows
    return out


def _class_label_names(ds: Any, column: Any) -> list[str] | None:
    feat = ds.features.get(column) if isinstance(column, str) else None
    names = getattr(feat, "names", None)
    return list(names) if names else None
