"""The multistage Trainer: wiring only (student embeddings, cached teacher targets, loss terms, logs).

A batch is two tokenised sides of the same pairs plus the cached teacher embedding of each
English sentence (``PairBatchCollator``); the student (a plain HF encoder, possibly with a
bottleneck embedding or shared layers, built beforehand in ``bottleneck.py`` / ``recurrence.py``)
embeds both sides with mean pooling (-> its learned projection to the teacher's width, for a
student of another width) (+ L2 when the teacher normalises), and the loss is the recipe's
weighted sum of the pure functions in ``losses.py``; under torchrun the in-batch terms see every
process's rows (``processes.gather_rows``). Every term is logged as
``loss_<term>``. Evaluation adds held-out translation accuracy and MSE x100 to the Trainer's
``eval_loss``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

from ..distill.trainer import TermLoggingTrainer
from .data import ParallelCollator, ParallelPair
from .evaluate import sentence_embedding
from .losses import loss_terms
from .processes import gather_rows, mean_over_processes
from .recipe import LossConfig
from .teacher import TeacherEmbeddings

__all__ = ["MultistageTrainer", "PairBatchCollator", "embed", "loss_terms"]


class PairBatchCollator(ParallelCollator):
    """``ParallelCollator`` plus ``teacher_en`` (B, H): the cached teacher embedding of each English side."""

    def __init__(self, tokenizer: Any, teacher: TeacherEmbeddings, max_length: int = 128) -> None:
        super().__init__(tokenizer, max_length)
        self.teacher = teacher

    def __call__(self, pairs: Sequence[ParallelPair]) -> dict[str, Any]:
        batch = super().__call__(pairs)
        batch.pop("lang")  # strings: the Trainer would try to move them to the device
        batch["teacher_en"] = self.teacher.lookup([p.english for p in pairs])  # (B, H)
        return batch


def embed(model: nn.Module, encoded: dict[str, Tensor], normalize: bool) -> Tensor:
    """Mean-pooled last hidden state (-> the student's projection) (+ L2), as the saved
    sentence-transformers pipeline: Pooling('mean') [+ Dense] [+ Normalize]. (B, H)."""
    return sentence_embedding(model, encoded, normalize)


class MultistageTrainer(TermLoggingTrainer):
    """``transformers.Trainer`` whose loss is the recipe's weighted embedding objectives.

    ``extra_eval``: called with the model at every evaluation, returns metrics (without prefix)
    added as ``eval_<key>`` (held-out translation accuracy, MSE x100).
    """

    def __init__(self, *args: Any, loss: LossConfig, normalize: bool,
                 extra_eval: Callable[[nn.Module], dict[str, float]] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.loss_cfg = loss
        self.normalize = normalize
        self.extra_eval = extra_eval

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        s_en = embed(model, inputs["english"], self.normalize)  # (B, H)
        s_tr = embed(model, inputs["translation"], self.normalize)  # (B, H)
        t_en = inputs["teacher_en"].to(s_en.dtype)  # (B, H)
        terms = loss_terms(s_en, s_tr, t_en, self.loss_cfg, gather=gather_rows)
        weights = self.loss_cfg.weights()
        loss = sum(weights[k] * v for k, v in terms.items())
        if model.training:  # each term over the global batch (the MSE averaged over processes)
            self.record_terms({k: mean_over_processes(v) for k, v in terms.items()})
        return (loss, {"embeddings": s_tr}) if return_outputs else loss

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        if self.extra_eval is not None:
            extra = {f"{metric_key_prefix}_{k}": float(v) for k, v in self.extra_eval(self.model).items()}
            self.log(extra)
            metrics.update(extra)
        return metrics

