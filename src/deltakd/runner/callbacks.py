"""Trainer callbacks every run gets."""

from __future__ import annotations

import time

from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from ..console import log_line, verbose
from ..runs import RunDir


class MetricsLogCallback(TrainerCallback):
    """Appends every Trainer log event (train loss, eval metrics) to ``metrics.jsonl`` (main process)."""

    def __init__(self, run: RunDir) -> None:
        self.run = run

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self.run.log_event({"step": state.global_step, "epoch": state.epoch, "time": time.time(), **logs})


class CompactProgressCallback(ProgressCallback):
    """transformers' training bar, with each log event written above it as one compact line
    (:func:`deltakd.console.log_line`) instead of a dict of quoted numbers."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs:
            self.training_bar.write(log_line(logs, state.global_step, state.max_steps))


class CompactPrinterCallback(PrinterCallback):
    """transformers' printer of log events (``disable_tqdm``), one compact line per event."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_local_process_zero and logs:
            print(log_line(logs, state.global_step, state.max_steps), flush=True)


def compact_log_lines(trainer: Trainer) -> Trainer:
    """The trainer's log printers replaced by the compact ones, unless ``deltakd --verbose``."""
    if verbose():
        return trainer
    for plain, compact in ((ProgressCallback, CompactProgressCallback), (PrinterCallback, CompactPrinterCallback)):
        if trainer.pop_callback(plain) is not None:
            trainer.add_callback(compact)
    return trainer
