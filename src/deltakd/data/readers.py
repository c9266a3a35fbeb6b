"""Reading task files (tsv / csv / jsonl) and HF datasets into validated examples.

Every malformed row stops the run with the file and line that hold it.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import math
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


def _decode(path: Path) -> str:
    """The file as text: UTF-8 with or without a byte-order mark; other bytes stop with their place."""
    raw = path.read_bytes()
    skip = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return raw[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = skip + e.start
        line = raw.count(b"\n", 0, at) + 1
        column = at - raw.rfind(b"\n", 0, at)
        raise DeltakdError(f"{path} line {line}: byte 0x{raw[at]:02x} (file offset {at}, column {column}) "
                           "is not UTF-8; save the file as UTF-8") from None


def _tsv_cells(text: str) -> Iterator[tuple[int, list[str]]]:
    """Tab-separated cells, quotes read as text (GLUE sentences hold unbalanced ones), except in a row that
    has more cells than the first: there csv quoting applies when it makes the row fit ("a<TAB>b")."""
    width = None
    for i, line in enumerate(io.StringIO(text, newline=""), start=1):
        line = line.rstrip("\r\n")
        cells = line.split("\t")
        if width is None:
            width = len(cells) if line.strip() else None
        elif len(cells) > width and '"' in line:
            try:
                quoted = next(csv.reader([line], delimiter="\t", strict=True))
            except csv.Error:  # not valid quoting: the quotes are text
                quoted = cells
            if len(quoted) <= width:
                cells = quoted
        yield i, cells


def _cells(text: str, fmt: str) -> Iterator[tuple[int, list[str]]]:
    """(line number, cells) of a tsv or csv text; CRLF, LF and CR line ends alike."""
    if fmt == "tsv":
        yield from _tsv_cells(text)
        return
    reader = csv.reader(io.StringIO(text, newline=""))
    for cells in reader:
        yield reader.line_num, cells


def _rows(path: Path, fmt: str, header: bool, extra_cells: str = "error") -> Iterator[tuple[int, dict[Any, Any]]]:
    """(line number, row) pairs; a row maps column name (or index when headerless) to value."""
    text = _decode(path)
    if fmt == "jsonl":
        for i, line in enumerate(io.StringIO(text, newline=""), start=1):
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
    names: list[str] | None = None
    for line, cells in _cells(text, fmt):
        if not cells or all(not c.strip() for c in cells):
            continue
        if header and names is None:
            names = [c.strip() for c in cells]
            continue
        if names is None:
            yield line, dict(enumerate(cells))
            continue
        if extra_cells == "error" and any(c.strip() for c in cells[len(names):]):
            raise DeltakdError(f"{path} line {line}: {len(cells)} cells but the header names {len(names)} "
                               "columns (an unquoted tab or comma in a text?); fix the row, or set "
                               "task.extra_cells: ignore to read only the named columns")
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
            if not math.isfinite(ex["label"]):
                raise DeltakdError(f"{where}: label {raw!r} in column {spec.label_column!r} is not a finite number")
        else:
            key = _label_key(raw)
            if spec.labels is not None and key not in spec.labels:
                raise DeltakdError(f"{where}: label {key!r} is not in the label set {list(spec.labels)}")
            if not key:
                raise DeltakdError(f"{where}: empty label in column {spec.label_column!r}")
            if spec.labels is None and key.lower() == "nan":
                raise DeltakdError(f"{where}: label {key!r} in column {spec.label_column!r} is a missing value, "
                                   "not a class; drop the row or list the labels in task.labels")
            ex["label"] = key
    return ex


def read_file(path: Path, spec: TaskSpec, train_labels: tuple[str, ...] | None = None) -> list[Example]:
    """The examples of one file; with ``train_labels`` (an eval split) any other label stops at its line."""
    if not path.is_file():
        raise DeltakdError(f"data file '{path}' does not exist")
    fmt = detect_format(path, spec.format)
    header = spec.header if fmt != "jsonl" else True
    examples = []
    for line, row in _rows(path, fmt, header, spec.extra_cells):
        where = f"{path} line {line}"
        ex = to_example(row, spec, where)
        if train_labels is not None and ex["label"] not in train_labels:
            raise DeltakdError(f"{where}: label {ex['label']!r} is not among the training labels {list(train_labels)}")
        examples.append(ex)
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
