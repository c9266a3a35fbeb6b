"""Trainer callbacks every run gets."""

from __future__ import annotations

import time

from transformers import TrainerCallback

from ..runs import RunDir


class MetricsLogCallback(TrainerCallback):
    """Appends every Trainer log event (train loss, eval metrics) to ``metrics.jsonl`` (main process)."""

    def __init__(self, run: RunDir) -> None:
        self.run = run

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self.run.log_event({"step": state.global_step, "epoch": state.epoch, "time": time.time(), **logs})
