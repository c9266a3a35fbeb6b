"""Classification / regression runs: a task's labelled text, a sequence-classification model with
its delta module, and (with a ``teacher:``) a student distilled from it (logits, RAIL-KD, layers)."""

from __future__ import annotations

from typing import Any

from transformers import set_seed

from ..data import TaskData, load_task
from ..data.tokenize import tokenize_examples
from ..errors import DeltakdError
from ..models.delta import Head, attach_delta, load_base, load_teacher, load_tokenizer
from ..models.hub import resolve_model_path
from ..recipe import Recipe
from ..runner import Prepared
from ..runner.transformers_family import TransformersFamily


class ClassificationFamily(TransformersFamily):
    name = "classification"

    def prepare(self, recipe: Recipe) -> Prepared:
        set_seed(recipe.train.seed)
        task = load_task(recipe.task, recipe.train.seed)
        head = Head(task.num_labels, task.labels)
        teacher = None
        if recipe.teacher is not None:
            teacher, teacher_tokenizer = load_teacher(recipe.teacher, causal_lm=False)
            if getattr(teacher.config, "num_labels", None) != head.num_labels:
                raise DeltakdError(f"teacher: predicts {teacher.config.num_labels} labels, the task has {head.num_labels}")
            tokenizer = self.student_tokenizer(recipe, teacher_tokenizer, lambda: load_tokenizer(recipe.model))
        else:
            tokenizer = load_tokenizer(recipe.model)
        datasets = {name: tokenize_examples(exs, tokenizer, recipe.task.max_length) for name, exs in task.splits.items()}
        base, copied = self.student_base(recipe, teacher) if teacher is not None else (None, None)
        if base is None:
            base = load_base(recipe.model, head)
        model = attach_delta(base, recipe.peft, resolve_model_path(recipe.model.name))
        prep = Prepared(recipe, task, tokenizer, datasets, model, head, teacher)
        if teacher is not None:
            prep.distill = self.distill_setup(prep, copied)
        return prep

    def eval_data(self, recipe: Recipe, tokenizer: Any) -> tuple[TaskData, dict[str, Any]]:
        task = load_task(recipe.task, recipe.train.seed)
        return task, {k: tokenize_examples(v, tokenizer, recipe.task.max_length) for k, v in task.splits.items()}
