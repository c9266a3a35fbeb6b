"""TensorBoard: one writer on the run's ``tensorboard/`` for the training curves, the final metrics and hparams."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers.integrations import TensorBoardCallback

from .common import numbers, tag_of


class TensorBoardRun(TensorBoardCallback):
    """The Trainer's TensorBoard callback on ``log_dir``, kept open after training for the final metrics."""

    def __init__(self, log_dir: Path) -> None:
        super().__init__()
        self.logging_dir = str(log_dir)
        self.tags: set[str] = set()
        self.step = 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero:
            return
        if self.tb_writer is None:
            self._init_summary_writer(args)
        self.step = state.global_step
        for k, v in numbers(logs).items():
            self.tags.add(tag_of(k))
            self.tb_writer.add_scalar(tag_of(k), v, state.global_step)
        self.tb_writer.flush()

    def on_train_end(self, args, state, control, **kwargs):
        if self.tb_writer is not None:
            self.tb_writer.flush()  # the final evaluation follows; finish() closes

    def finish(self, params: dict[str, Any], final: dict[str, float]) -> None:
        from torch.utils.tensorboard.summary import hparams

        if self.tb_writer is None:
            return
        for k, v in final.items():  # a family that evaluates outside the Trainer (multistage)
            if tag_of(k) not in self.tags:
                self.tb_writer.add_scalar(tag_of(k), v, self.step)
        metric_tags = {tag_of(k): v for k, v in final.items()}
        for summary in hparams(params, metric_tags):
            self.tb_writer.file_writer.add_summary(summary)
        self.tb_writer.close()
        self.tb_writer = None
