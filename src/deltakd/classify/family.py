"""Classification / regression runs: a task's labelled text, a sequence-classification model with
its delta module, and (with a ``teacher:``) a student distilled from it (logits, RAIL-KD, layers)."""

from __future__ import annotations

import re
from types import SimpleNamespace
from typing import Any

from transformers import AutoConfig, set_seed

from ..data import TaskData, load_task
from ..data.tokenize import tokenize_examples
from ..errors import DeltakdError
from ..models.delta import Head, attach_delta, find_model_dir, load_base, load_teacher, load_tokenizer, read_meta
from ..models.hub import load_pretrained, resolve_model_path
from ..recipe import Recipe
from ..runner import Prepared
from ..runner.transformers_family import TransformersFamily

_DEFAULT_NAME = re.compile(r"LABEL_\d+")  # transformers' names for a head saved without label names


def check_teacher_head(config: Any, head: Head) -> None:
    """The teacher predicts the task's labels: as many, and (when it names them) the same, in order."""
    n = getattr(config, "num_labels", None)
    if n != head.num_labels:
        raise DeltakdError(f"teacher: predicts {n} labels, the task has {head.num_labels}")
    names = [str((getattr(config, "id2label", None) or {}).get(i, "")) for i in range(n)]
    # unnamed classes: LABEL_i, empty, or the class id itself (a deltakd run of a numerically labelled task)
    if head.labels is None or all(_DEFAULT_NAME.fullmatch(x) or not x or x == str(i) for i, x in enumerate(names)):
        return
    if tuple(names) not in (tuple(head.labels), tuple(head.names or head.labels)):
        raise DeltakdError(f"teacher: labels {names}, the task has {list(head.names or head.labels)}")


def teacher_head_config(cfg: Any) -> Any:
    """The teacher's head (``num_labels``, ``id2label``) without loading its weights: a hub/model
    config, or a deltakd run's model metadata."""
    if cfg.run is None:
        return load_pretrained(AutoConfig.from_pretrained, cfg.model, "teacher.model", revision=cfg.revision)
    meta = read_meta(find_model_dir(cfg.run))
    return SimpleNamespace(num_labels=meta["num_labels"], id2label=dict(enumerate(meta["labels"] or ())))


class ClassificationFamily(TransformersFamily):
    name = "classification"

    def prepare(self, recipe: Recipe) -> Prepared:
        set_seed(recipe.train.seed)
        task = load_task(recipe.task, recipe.train.seed)
        head = Head(task.num_labels, task.labels, names=task.label_names)
        teacher = None
        if recipe.teacher is not None:
            check_teacher_head(teacher_head_config(recipe.teacher), head)  # before its weights load
            teacher, teacher_tokenizer = load_teacher(recipe.teacher, causal_lm=False)
            check_teacher_head(teacher.config, head)
            tokenizer = self.student_tokenizer(recipe, teacher_tokenizer, lambda: load_tokenizer(recipe.model))
        else:
            tokenizer = load_tokenizer(recipe.model)
        base, copied = self.student_base(recipe, teacher) if teacher is not None else (None, None)
        if base is None:
            base = load_base(recipe.model, head)
        model = attach_delta(base, recipe.peft, resolve_model_path(recipe.model.name), revision=recipe.model.revision)
        prep = Prepared(recipe, task, tokenizer, {}, model, head, teacher)
        checked = self.distill_check(prep, copied) if teacher is not None else None  # nothing tokenised or cached yet
        prep.datasets = {name: tokenize_examples(exs, tokenizer, recipe.task.max_length)
                         for name, exs in task.splits.items()}
        if teacher is not None:
            prep.distill = self.distill_setup(prep, copied, checked)
        return prep

    def eval_data(self, recipe: Recipe, tokenizer: Any) -> tuple[TaskData, dict[str, Any]]:
        task = load_task(recipe.task, recipe.train.seed)
        return task, {k: tokenize_examples(v, tokenizer, recipe.task.max_length) for k, v in task.splits.items()}
