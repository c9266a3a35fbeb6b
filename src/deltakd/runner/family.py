"""What a family adds to a run, and what the lifecycle hands it.

A family is one object with the hooks below; the lifecycle (:mod:`deltakd.runner.lifecycle`)
calls them in order and knows no family by name. The families are listed in one table,
:data:`deltakd.families.FAMILIES`. :class:`Family` holds the defaults every transformers-model
family shares (a Trainer over ``prepared.datasets``, one evaluation per split, the best model
saved with ``save_pretrained``); a family overrides only what differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterable

import torch
from transformers import Trainer, TrainingArguments

from ..data import TaskData
from ..errors import DeltakdError
from ..recipe import apply_overrides, dump_recipe, load_raw
from ..runs import RunDir, RunResults
from ..runs.rundir import read_recipe_data
from .arguments import training_arguments
from .evaluation import (
    default_collator,
    evaluation_of_current_weights,
    metrics_for,
    task_metrics,
)


@dataclass
class Prepared:
    """A recipe made ready for a Trainer: data, tokenizer, model (and a family's own state)."""

    recipe: Any
    task: TaskData | None
    tokenizer: Any
    datasets: dict[str, Any]
    model: torch.nn.Module
    head: Any = None  # models.delta.Head of a transformers-model family
    teacher: torch.nn.Module | None = None
    distill: Any = None  # distill.setup.DistillSetup when a teacher is given
    collator: Any = None  # a data collator of the family's own (dialogue: pads labels with -100)
    base_path: str | None = None  # where a saved adapter's base model reloads from (default: model.name)
    state: Any = None  # anything else the family's later hooks need (multistage: its Stage)


class Family:
    """The hooks of one family, with the defaults of a transformers-model family."""

    name: ClassVar[str] = ""

    # --- recipes -------------------------------------------------------------------------------

    def validate(self, data: dict[str, Any], source: str = "recipe", check_files: bool = True) -> Any:
        raise NotImplementedError

    def load_recipe(self, path: str | Path, overrides: Iterable[str] = (), check_files: bool = True) -> Any:
        """Load (``extends:`` merged, overrides applied) and validate; one-line DeltakdError on bad input."""
        return self.validate(apply_overrides(load_raw(path), overrides), source=str(path), check_files=check_files)

    def dump(self, recipe: Any) -> dict[str, Any]:
        return dump_recipe(recipe)

    def saved_recipe(self, run: RunDir, check_files: bool = False) -> Any:
        """The resolved recipe a run was made from (provenance dropped)."""
        return self.validate(read_recipe_data(run), source=str(run.recipe_file), check_files=check_files)

    def differences(self, saved: dict[str, Any] | None, recipe: Any) -> list[str]:
        """Dotted keys where a saved recipe (a run's) differs from ``recipe``; the free-text
        description does not count (a reworded description trains the same model)."""
        if saved is None:
            return ["recipe.yaml (unreadable)"]
        try:  # defaults of keys newer than the run filled in: a run made before a new key still resumes
            saved = self.dump(self.validate(saved, source="saved recipe", check_files=False))
        except (DeltakdError, ValueError):
            pass  # compared as written
        return _diff({k: v for k, v in saved.items() if k != "description"},
                     {k: v for k, v in self.dump(recipe).items() if k != "description"}, "")

    # --- one run -------------------------------------------------------------------------------

    def prepare(self, recipe: Any) -> Prepared:
        """Data, model, teacher, ... : everything that can fail on bad input, before any write."""
        raise NotImplementedError

    def metric_for_best(self, prep: Prepared) -> str:
        """The recipe's ``train.metric_for_best``, else the task's main metric (the loss for language models)."""
        lm = prep.task is not None and prep.task.spec.kind == "lm"
        return prep.recipe.train.metric_for_best or ("loss" if lm else prep.task.spec.main_metric)

    def arguments(self, prep: Prepared, run: RunDir, report_to: list[str]) -> TrainingArguments:
        return training_arguments(prep.recipe.train, run, report_to, self.metric_for_best(prep))

    def before_training(self, prep: Prepared) -> None:
        """Runs once the run directory exists, before the Trainer is built (measure the start, say)."""

    def trainer_kwargs(self, prep: Prepared, args: TrainingArguments, callbacks: list) -> dict[str, Any]:
        """The keyword arguments of a Trainer over ``prep`` (a family's Trainer subclass adds its own)."""
        lm = prep.task.spec.kind == "lm"
        return dict(model=prep.model, args=args, train_dataset=prep.datasets["train"],
                    eval_dataset=prep.datasets["valid"], processing_class=prep.tokenizer,
                    data_collator=prep.collator or default_collator(prep.task, prep.tokenizer),
                    compute_metrics=None if lm else metrics_for(prep.task), callbacks=callbacks)

    def make_trainer(self, prep: Prepared, args: TrainingArguments, callbacks: list) -> Trainer:
        return Trainer(**self.trainer_kwargs(prep, args, callbacks))

    def evaluate(self, prep: Prepared, trainer: Trainer) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
        """(metrics, samples/s) per split of the best model; every process takes part. The split
        training evaluated on is not evaluated again when training already evaluated these weights."""
        metrics: dict[str, dict[str, float]] = {}
        speed: dict[str, float] = {}
        for split, ds in prep.datasets.items():
            if split == "train":
                continue
            raw = reuse_evaluation(trainer, ds, split)
            if raw is None:
                raw = trainer.evaluate(ds, metric_key_prefix=split)
            metrics[split] = task_metrics(raw, split, prep.task)
            speed[split] = float(raw.get(f"{split}_samples_per_second", float("nan")))
        return metrics, speed

    def save_model(self, prep: Prepared, trainer: Trainer, run: RunDir) -> None:
        """Write ``run.model_dir`` (main process only)."""
        raise NotImplementedError

    def finish(self, prep: Prepared, trainer: Trainer, run: RunDir, results: RunResults,
               speed: dict[str, float], test: bool) -> RunResults:
        """Fill in what the family measures beyond the common fields (main process only)."""
        return results

    # --- a finished run ------------------------------------------------------------------------

    def evaluate_saved(self, run: RunDir, split: str, batch_size: int | None) -> dict[str, float]:
        """Reload a finished run's saved model and evaluate it on ``split`` (``deltakd eval``)."""
        raise DeltakdError(f"'{run.path}': a {self.name} run cannot be re-evaluated")


def reuse_evaluation(trainer: Trainer, dataset: Any, split: str) -> dict[str, float] | None:
    """Training's evaluation of the current weights on ``dataset`` (``runner.evaluation``), logged again
    under ``split``'s prefix (the event stream and trackers see the final metrics as before); None if none."""
    logged = evaluation_of_current_weights(trainer, dataset)
    if logged is None:
        return None
    raw = {f"{split}_{k.removeprefix('eval_')}": v for k, v in logged.items() if k.startswith("eval_")}
    trainer.log(dict(raw))
    return raw


def _diff(x: Any, y: Any, prefix: str) -> list[str]:
    if isinstance(x, dict) and isinstance(y, dict):
        return [d for k in sorted(set(x) | set(y)) for d in _diff(x.get(k), y.get(k), f"{prefix}{k}.")]
    return [] if x == y else [prefix.rstrip(".")]
