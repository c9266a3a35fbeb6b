"""What every tracker of a run shares: tags, numbers of a log event, the final metrics."""

from __future__ import annotations

from typing import Any, Mapping

_SPLITS = ("eval", "valid", "test")


def tag_of(key: str) -> str:
    """A Trainer log key as a TensorBoard tag: ``valid_accuracy`` -> ``valid/accuracy``, ``loss`` -> ``train/loss``."""
    for split in _SPLITS:
        if key.startswith(f"{split}_"):
            return f"{split}/{key[len(split) + 1:]}"
    return f"train/{key}"


def numbers(logs: Mapping[str, Any] | None) -> dict[str, float]:
    return {k: float(v) for k, v in (logs or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def final_metrics(results: Mapping[str, Any]) -> dict[str, float]:
    """``{split}_{metric}`` -> value of a run's final evaluation (the keys the Trainer logs them under)."""
    metrics = results.get("metrics") or {}
    return {f"{split}_{k}": float(v) for split, m in metrics.items() for k, v in (m or {}).items()
            if isinstance(v, (int, float))}
