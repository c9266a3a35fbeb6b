"""Numbers, durations, grid values and setting names as written in report tables; markdown tables."""

from __future__ import annotations

import math
from typing import Any, Sequence

import yaml


def lower_is_better(metric: str) -> bool:
    """Perplexity and losses fall as a model improves; every other metric rises."""
    return metric == "perplexity" or metric.endswith("loss")


def fmt_num(v: Any) -> str:
    """A metric for a table: 4 decimals, 1 above 100; blank when missing."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:.1f}" if abs(v) >= 100 else f"{v:.4f}"


def fmt_duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)) or math.isnan(seconds):
        return ""
    return f"{seconds:.1f} s" if seconds < 60 else f"{seconds / 60:.1f} min" if seconds < 3600 else \
        f"{seconds / 3600:.2f} h"


def fmt_rate(v: Any) -> str:
    return f"{v:,.1f}" if isinstance(v, (int, float)) and not math.isnan(v) else ""


def fmt_value(v: Any) -> str:
    """A grid value as written in names and tables: floats by shortest repr, the rest as flow YAML."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (int, str)):
        return str(v)
    if v is None:
        return "null"
    return yaml.safe_dump(v, default_flow_style=True, width=10_000).strip()


def short_keys(keys: Sequence[str]) -> dict[str, str]:
    """``train.lr`` -> ``lr``, unless two keys share their last part (then the full dotted key)."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def setting_label(setting: dict[str, Any]) -> str:
    """``{train.lr: 1e-05, peft.r: 8}`` -> ``lr=1e-05 r=8`` (``base`` for the empty setting)."""
    names = short_keys(list(setting))
    return " ".join(f"{names[k]}={fmt_value(v)}" for k, v in setting.items()) or "base"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def cell(x: str) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |",
             "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)

