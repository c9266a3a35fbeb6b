"""What every tracker of a run shares: tags, numbers of a log event, the final metrics."""

from __future__ import annotations

from typing import Any, Mapping

from transformers import TrainerCallback

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


class StreamCallback(TrainerCallback):
    """A tracker stream opened on the main process at the start of training (or at its first log
    event), to which every log event's numbers go by step: subclasses give ``started``, ``_start``
    and ``log``."""

    step = 0

    @property
    def started(self) -> bool:
        raise NotImplementedError

    def _start(self) -> None:
        raise NotImplementedError

    def log(self, values: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and not self.started:
            self._start()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero:
            return
        if not self.started:
            self._start()
        self.step = state.global_step
        self.log(numbers(logs), state.global_step)
