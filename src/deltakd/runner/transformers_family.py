"""The shared part of the families whose model is a transformers model with an optional delta
module and an optional teacher (classification, causal LM, dialogue): distillation wiring, the
student built from the teacher's layers, ``save_pretrained`` output, the teacher comparison and
re-evaluation of a saved model. A family subclasses :class:`TransformersFamily` and supplies
``prepare`` and ``eval_data``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

from ..data import TaskData
from ..distill.schedule import CurriculumCallback
from ..distill.setup import check_distill, make_schedule, prepare_distill
from ..distill.tokenizers import check_tokenizers
from ..distill.trainer import DistillTrainer
from ..errors import DeltakdError
from ..models.delta import count_parameters, load_trained, plain_copy, save_trained
from ..models.student import every_other, layer_count, student_from_teacher
from ..recipe import Recipe, validate
from ..runs import RunDir, RunResults, load_run_recipe
from ..utils import atomic_write_json
from .evaluation import evaluate_model, evaluate_raw, task_metrics
from .family import Family, Prepared
from .lifecycle import distributed_state


class TransformersFamily(Family):
    """Defaults for a transformers model + delta module (+ teacher); see the module docstring."""

    cross_tokenizer = False  # whether the family distils across tokenizers (distill.cross_tokenizer)

    def validate(self, data: dict[str, Any], source: str = "recipe", check_files: bool = True) -> Recipe:
        """The generic recipe model (:class:`deltakd.recipe.Recipe`) these families share."""
        return validate(data, source=source, check_files=check_files)

    def eval_data(self, recipe: Any, tokenizer: Any) -> tuple[TaskData, dict[str, Any]]:
        """The task and its tokenised splits, for evaluating a saved model."""
        raise NotImplementedError

    def eval_collator(self, recipe: Any, tokenizer: Any) -> Any:
        """The data collator for evaluating a saved model (None: the task's default)."""
        return None

    # --- distillation --------------------------------------------------------------------------

    def student_base(self, recipe: Any, teacher: torch.nn.Module) -> tuple[torch.nn.Module | None, list[int] | None]:
        """The student built from the teacher's layers (and which), or None when the recipe names its own model."""
        st = recipe.student
        if st is None or st.from_teacher is None:
            return None, None
        plain = plain_copy(teacher)
        layers = st.from_teacher.layers or every_other(layer_count(plain), st.from_teacher.nb_layers)
        student = student_from_teacher(plain, layers)
        if st.scratch:
            student = type(student)(student.config)  # the same shape, freshly initialised
        return student, list(layers)

    def student_tokenizer(self, recipe: Any, teacher_tokenizer: Any, own: Any) -> Any:
        """The tokenizer the data is tokenised with: the teacher's for a student built from the teacher
        (``own`` is None, or the recipe has ``student.from_teacher``), else the student's own (``own()``),
        which must read ids as the teacher's does (checked here, before any work), unless the recipe
        distils across tokenizers (``distill.cross_tokenizer``, families that support it)."""
        st = recipe.student
        cross = recipe.distill is not None and recipe.distill.cross_tokenizer
        if cross and not self.cross_tokenizer:
            raise DeltakdError(f"distill.cross_tokenizer: applies to causal-LM distillation (task.kind: lm), "
                               f"not to a {self.name} run")
        if own is None or (st is not None and st.from_teacher is not None):
            return teacher_tokenizer
        tokenizer = own()
        check_tokenizers(tokenizer, teacher_tokenizer, make_schedule(recipe.distill).loss_names, cross,
                         cross_possible=self.cross_tokenizer)
        return tokenizer

    def more_metrics(self, recipe: Any, tokenizer: Any, split: str, metrics: dict[str, float],
                     model: Any) -> dict[str, float]:
        """A split's metrics with what the family adds (the causal LM: bits per byte), for the run's
        evaluation, the teacher comparison and a saved model's re-evaluation."""
        return metrics

    def teacher_split(self, prep: Prepared, split: str) -> tuple[Any, Any]:
        """The teacher's tokenizer and data for the teacher comparison (default: the student's)."""
        return prep.tokenizer, prep.datasets[split]

    @staticmethod
    def _distill_args(prep: Prepared, copied: list[int] | None) -> tuple[Any, ...]:
        """What ``check_distill`` and ``prepare_distill`` both take: config, models, kind, labels, copied layers, seed."""
        recipe = prep.recipe
        scratch = recipe.student and recipe.student.from_teacher and recipe.student.scratch
        return (recipe.distill, prep.model, prep.teacher, "lm" if prep.head.causal_lm else "classification",
                prep.head.num_labels, None if scratch else copied, recipe.train.seed)

    def distill_check(self, prep: Prepared, copied: list[int] | None) -> tuple[Any, ...]:
        """``distill_setup``'s checks alone, before any data is tokenised or teacher output cached;
        hand the result to ``distill_setup`` so the checks (and the merged teacher copy) run once."""
        return check_distill(*self._distill_args(prep, copied))

    def distill_setup(self, prep: Prepared, copied: list[int] | None, checked: tuple[Any, ...] | None = None):
        """Validate the distillation recipe against the models; build layer map, projections, cache."""
        collator = None if prep.head.causal_lm else DataCollatorWithPadding(prep.tokenizer)
        return prepare_distill(*self._distill_args(prep, copied), prep.datasets, collator,
                               prep.recipe.train.eval_batch_size, distributed_state().device, checked=checked,
                               tokenizer=prep.tokenizer)

    def make_trainer(self, prep: Prepared, args: TrainingArguments, callbacks: list) -> Trainer:
        if prep.teacher is None:
            return super().make_trainer(prep, args, callbacks)
        d, setup = prep.recipe.distill, prep.distill
        if d.curriculum is not None and d.curriculum.lr is not None:
            callbacks = [*callbacks, CurriculumCallback(setup.schedule)]
        return DistillTrainer(**self.trainer_kwargs(prep, args, callbacks), teacher=setup.teacher,
                              schedule=setup.schedule, kind="lm" if prep.head.causal_lm else "classification",
                              temperature=d.temperature, jsd_beta=d.jsd_beta, layer_map=setup.layer_map,
                              heads=setup.heads, cache=setup.cache, lora_modules=tuple(d.lora_ild_modules),
                              vocab=len(prep.tokenizer), chunked=d.chunked, chunk_tokens=d.chunk_tokens)

    # --- the end of a run ----------------------------------------------------------------------

    def save_model(self, prep: Prepared, trainer: Trainer, run: RunDir) -> None:
        r = prep.recipe
        save_trained(trainer.model, run.model_dir, r.peft, r.model, prep.head, prep.tokenizer, base_path=prep.base_path)

    def finish(self, prep: Prepared, trainer: Trainer, run: RunDir, results: RunResults,
               speed: dict[str, float], test: bool) -> RunResults:
        total, trainable = count_parameters(trainer.model)
        results.task = prep.task.spec.name
        results.main_metric = prep.task.spec.main_metric
        results.params = {"total": total, "trainable": trainable, "trainable_pct": 100.0 * trainable / total}
        results.examples = {k: len(v) for k, v in prep.task.splits.items()}
        eval_split = "test" if "test" in speed else "valid"
        results.extra["eval_samples_per_second"] = speed[eval_split]
        if prep.teacher is not None:
            results.extra["distill"] = self.teacher_comparison(prep, trainer, run, eval_split, speed[eval_split])
        return results

    def evaluate(self, prep: Prepared, trainer: Trainer) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
        """The student's splits, and with a teacher its evaluation on the final split, which
        ``teacher_comparison`` (main process) reports: every process takes part, since under torchrun
        the Trainer's evaluation is distributed (on the main process alone it would wait forever)."""
        metrics, speed = super().evaluate(prep, trainer)
        if prep.teacher is not None:
            split = "test" if "test" in speed else "valid"
            trainer.deltakd_teacher_eval = (split, self._teacher_raw(prep, split))
        return metrics, speed

    def _teacher_raw(self, prep: Prepared, split: str) -> dict[str, float]:
        setup = prep.distill
        teacher = setup.teacher if setup is not None else prep.teacher
        tokenizer, data = self.teacher_split(prep, split)  # cross-tokenizer: the teacher's own tokens
        with tempfile.TemporaryDirectory() as scratch:  # nothing in the run directory
            return evaluate_raw(teacher, tokenizer, data, prep.task,
                                prep.recipe.train.eval_batch_size, Path(scratch))

    def teacher_comparison(self, prep: Prepared, trainer: Trainer, run: RunDir, split: str, student_speed: float
                           ) -> dict[str, Any]:
        """The teacher on the same split with the same batch size: metrics, size, speed-up of the student."""
        setup = prep.distill
        teacher = setup.teacher if setup is not None else prep.teacher
        tokenizer, _ = self.teacher_split(prep, split)
        done = getattr(trainer, "deltakd_teacher_eval", None)
        raw = done[1] if done is not None and done[0] == split else self._teacher_raw(prep, split)
        t_speed = float(raw.get("eval_samples_per_second", float("nan")))
        total, _ = count_parameters(teacher)
        return {
            "teacher_metrics": {split: self.more_metrics(prep.recipe, tokenizer, split,
                                                         task_metrics(raw, "eval", prep.task), teacher)},
            "teacher_params": total,
            "teacher_eval_samples_per_second": t_speed,
            "speedup": student_speed / t_speed if t_speed > 0 else float("nan"),
            "teacher_forwards": int(getattr(trainer, "teacher_forwards", 0)),
            "teacher_cache": str(setup.cache.path) if setup is not None and setup.cache is not None else None,
            "teacher_cache_bytes_per_token": getattr(setup.cache, "bytes_per_token", None) if setup is not None else None,
            "layer_map": setup.layer_map.mode if setup is not None and setup.layer_map is not None else None,
        }

    def evaluate_saved(self, run: RunDir, split: str, batch_size: int | None) -> dict[str, float]:
        recipe = load_run_recipe(run)
        if not run.model_dir.is_dir():
            raise DeltakdError(f"run '{run.path}' has no model/ (did it finish?)")
        model, tokenizer = load_trained(run.model_dir)
        task, datasets = self.eval_data(recipe, tokenizer)
        if split not in datasets:
            raise DeltakdError(f"--split: '{split}' not in this task; available: {', '.join(datasets)}")
        with tempfile.TemporaryDirectory() as scratch:
            metrics = evaluate_model(model, tokenizer, datasets[split], task, batch_size or recipe.train.eval_batch_size,
                                     Path(scratch), collator=self.eval_collator(recipe, tokenizer))
        metrics = self.more_metrics(recipe, tokenizer, split, metrics, model)
        atomic_write_json(run.path / f"eval_{split}.json", {"split": split, "metrics": metrics})
        return metrics
