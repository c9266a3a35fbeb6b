"""The run lifecycle every family uses (see :mod:`deltakd.runner.lifecycle`) and what a family plugs
into it (:class:`Family`, :class:`Prepared`). Knows no family by name."""

from .arguments import training_arguments
from .evaluation import evaluate_model, task_metrics
from .family import Family, Prepared
from .lifecycle import run, train

__all__ = ["Family", "Prepared", "evaluate_model", "run", "task_metrics", "train", "training_arguments"]
