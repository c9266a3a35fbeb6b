"""The one discriminator of recipe kinds.

A recipe file is one of:
- a run of one family, named by its top-level ``family:`` key (``multistage``), or, for the
  families that share the generic recipe model, by ``task.kind``: ``classification`` (also
  ``regression``, and the default), ``lm`` or ``dialogue``;
- a ``transfer`` experiment (many runs), told by its top-level ``transfer:`` section.
:func:`recipe_kind` is the only place these rules live; :data:`deltakd.families.FAMILIES` maps a
kind to the family that runs it.
"""

from __future__ import annotations

from typing import Any

TRANSFER = "transfer"
_TASK_KINDS = {None: "classification", "classification": "classification", "regression": "classification",
               "lm": "lm", "dialogue": "dialogue"}


def recipe_kind(raw: Any) -> str:
    """The kind of a raw (``extends:`` merged) recipe dict: a family name or ``transfer``.

    Unknown values are returned as they are, for the family table to refuse with the list of
    valid ones."""
    if not isinstance(raw, dict):
        return "classification"
    if "family" in raw:
        return str(raw["family"])
    if TRANSFER in raw:
        return TRANSFER
    task = raw.get("task")
    kind = task.get("kind") if isinstance(task, dict) else None
    return _TASK_KINDS.get(kind, "classification")
