"""Batch order of every run's Trainer: length-grouped training batches, length-sorted evaluation.

:func:`fast_batches` replaces two per-instance methods of any Trainer (the plain one and every
subclass), as ``runner.divergence`` does:

- training, ``train_sampling_strategy: group_by_length`` (``train.group_by_length``, on by
  default): transformers' own ``LengthGroupedSampler`` (random mega-batches, each sorted by
  length), the same order as transformers', but with the lengths read from the Arrow column
  at once instead of one ``dataset[i]`` per example;
- evaluation (one process): the examples sorted by length, longest first, so each batch pads
  to little more than its own length. Predictions and labels travel together, so metrics do not
  depend on the order; the per-batch mean losses are weighted by batch size, so the loss differs
  from a sequential pass only by rounding.

Datasets without an ``input_ids`` column of lists (a multistage pair set, token blocks of one
length) keep the Trainer's own samplers where sorting gains nothing.
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import Sampler
from transformers import Trainer
from transformers.trainer_pt_utils import LengthGroupedSampler

INPUT = "input_ids"


def token_lengths(dataset: Any) -> list[int] | None:
    """The token count of each example (``input_ids``), or None where the dataset has none."""
    import datasets
    import pyarrow.compute as pc

    if not isinstance(dataset, datasets.Dataset) or INPUT not in dataset.column_names:
        return None
    column = dataset.with_format(None).data.column(INPUT)
    if dataset._indices is not None:  # a selection / shuffle: lengths in the dataset's own order
        column = column.take(dataset._indices.column(0))
    try:
        return pc.list_value_length(column).to_pylist()
    except (TypeError, ValueError, NotImplementedError):  # not a list column
        return None


class SortedSampler(Sampler):
    """Indices longest first (ties in dataset order): evaluation batches of similar lengths."""

    def __init__(self, lengths: list[int]) -> None:
        self.order = sorted(range(len(lengths)), key=lambda i: -lengths[i])

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self):
        return iter(self.order)


def fast_batches(trainer: Trainer) -> Trainer:
    """Length-grouped training batches (from precomputed lengths), length-sorted evaluation batches."""
    train_sampler, eval_sampler = trainer._get_train_sampler, trainer._get_eval_sampler
    sorted_orders: dict[int, tuple[Any, SortedSampler | None]] = {}  # per evaluated dataset, kept across evaluations

    def get_train_sampler(train_dataset: Any = None) -> Sampler | None:
        ds = trainer.train_dataset if train_dataset is None else train_dataset
        if trainer.args.train_sampling_strategy == "group_by_length" and trainer.args.world_size <= 1:
            lengths = token_lengths(ds)
            if lengths is not None:
                return LengthGroupedSampler(trainer.args.train_batch_size * trainer.args.gradient_accumulation_steps,
                                            lengths=lengths)
        return train_sampler(train_dataset) if train_dataset is not None else train_sampler()

    def get_eval_sampler(eval_dataset: Any) -> Sampler | None:
        if trainer.args.world_size <= 1 and eval_dataset is not None:
            key = id(eval_dataset)
            if key not in sorted_orders or sorted_orders[key][0] is not eval_dataset:
                lengths = token_lengths(eval_dataset)
                unequal = lengths is not None and len(set(lengths)) > 1
                sorted_orders[key] = (eval_dataset, SortedSampler(lengths) if unequal else None)
            sampler = sorted_orders[key][1]
            if sampler is not None:
                return sampler
        return eval_sampler(eval_dataset)

    trainer._get_train_sampler = get_train_sampler
    trainer._get_eval_sampler = get_eval_sampler
    return trainer

