"""What a run prints: quiet by default, the libraries' own output back with ``deltakd --verbose``.

Quiet means: the library output that says nothing to act on is left out (each filter names what it
drops), and the Trainer's log events become one compact line each (:func:`log_line`, printed by the
callbacks of :mod:`deltakd.runner.callbacks`). This module imports the standard library only: the
CLI calls :func:`configure` before torch, transformers or datasets are imported (datasets reads its
progress-bar switch at import; the filters below attach to loggers by name).

Left out unless verbose:

- a transformers load report that only says a task head was created or dropped (``classifier``
  MISSING "... Consider training", e.g. a new classification head, or the head ``deltakd eval``
  restores from the run) - a report naming body weights, mismatched shapes or conversions is kept;
- the FutureWarning transformers raises when peft reads ``is_gradient_checkpointing``;
- the progress bars of datasets (tokenising ``map``, "Saving the dataset") and transformers'
  "Loading weights" / "Writing model shards" (:mod:`deltakd.models.hub`): deltakd's training bar
  and log lines remain.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
import warnings
from typing import Any, Mapping

VERBOSE_ENV = "DELTAKD_VERBOSE"  # "1": the libraries' own output (read by deltakd.models.hub and the runner)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def verbose() -> bool:
    """Whether the libraries' own output is wanted (``deltakd --verbose``, or ``DELTAKD_VERBOSE=1``)."""
    return os.environ.get(VERBOSE_ENV) == "1"


class ExpectedLoadReport(logging.Filter):
    """Drops a transformers LOAD REPORT whose every row is a MISSING or UNEXPECTED key outside the base
    model (``classifier.*`` of a ``BertForSequenceClassification``, not ``bert.*``): a task head that
    is new (to be trained, or restored by deltakd) or not used. Other records pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = _ANSI.sub("", record.getMessage())
        if "LOAD REPORT" not in msg:
            return True
        return not head_only_report(msg)


def head_only_report(report: str) -> bool:
    """Whether a (plain-text) load report lists only task-head keys as MISSING / UNEXPECTED."""
    lines = report.splitlines()
    match = re.match(r"\s*(?:\[transformers\]\s*)?(\w+) LOAD REPORT", lines[0]) if lines else None
    if match is None:
        return False
    prefix = _base_prefix(match.group(1))
    if not prefix:
        return False
    rows = [[c.strip() for c in ln.split("|")] for ln in lines[1:] if "|" in ln]
    rows = [r for r in rows[1:] if len(r) >= 2]  # after the Key | Status header
    if not rows:
        return False
    for key, status, *_ in rows:
        if status not in ("MISSING", "UNEXPECTED") or key.split(".", 1)[0] == prefix:
            return False
    return True


def _base_prefix(class_name: str) -> str | None:
    """The ``base_model_prefix`` of a transformers model class (transformers is loaded: it logged the report)."""
    transformers = sys.modules.get("transformers")
    try:
        return getattr(getattr(transformers, class_name), "base_model_prefix", None) or None
    except Exception:  # noqa: BLE001 - an unknown class: keep the report
        return None


def configure(verbose: bool = False) -> None:
    """Set the console for this process (and the processes it starts): quiet unless ``verbose``.

    Call before transformers and datasets are imported."""
    os.environ[VERBOSE_ENV] = "1" if verbose else "0"
    load_log = logging.getLogger("transformers.modeling_utils")  # the logger transformers reports loads on
    for f in [f for f in load_log.filters if isinstance(f, ExpectedLoadReport)]:
        load_log.removeFilter(f)
    if verbose:
        return
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    load_log.addFilter(ExpectedLoadReport())
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)


# --------------------------------------------------------------------------- Trainer log lines

_DROPPED = ("runtime", "samples_per_second", "steps_per_second", "total_flos")


def _num(key: str, v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if not math.isfinite(v):
        return str(v)
    if key in ("lr", "learning_rate"):
        return f"{v:.2e}"
    if key == "epoch":
        return f"{v:.2f}"
    if key.endswith("loss"):
        return f"{v:.4f}"
    return f"{v:.4g}"


def log_line(logs: Mapping[str, Any], step: int, max_steps: int) -> str:
    """One Trainer log event as a line: ``step 40/1875  epoch 0.06  loss 0.6886  grad_norm 0.138  lr 3.45e-04``;
    evaluation events start with ``eval`` (metrics without their ``eval_`` prefix), the last one with
    ``done`` (runtime and the mean training loss)."""
    if "train_runtime" in logs:
        speed = logs.get("train_steps_per_second")
        parts = [f"done  {step} steps in {logs['train_runtime']:.1f} s"
                 + (f" ({speed:.2f} steps/s)" if isinstance(speed, (int, float)) else "")]
        if "train_loss" in logs:
            parts.append(f"mean loss {_num('loss', logs['train_loss'])}")
        return "  ".join(parts)
    is_eval = any(k.startswith("eval_") for k in logs)
    parts = [f"{'eval  ' if is_eval else ''}step {step}/{max_steps}"]
    if "epoch" in logs:
        parts.append(f"epoch {_num('epoch', logs['epoch'])}")
    for key, v in logs.items():
        if key == "epoch" or key.endswith(_DROPPED):
            continue
        name = {"learning_rate": "lr"}.get(key, key.removeprefix("eval_") if is_eval else key)
        parts.append(f"{name} {_num(name, v)}")
    return "  ".join(parts)
