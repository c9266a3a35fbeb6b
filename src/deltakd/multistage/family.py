"""The multistage family on the shared run lifecycle: one stage of multilingual sentence-embedding
distillation (MSE to the teacher's English embeddings, MCL, ...) with ``MultistageTrainer``.

Its own hooks: the stage is prepared by :func:`deltakd.multistage.stage.prepare_stage`; training
evaluates on the held-out pairs; ``model/`` is a plain sentence-transformers folder (plus the
compact form the next stage rebuilds from); the final test loads that *saved* folder with
``SentenceTransformer(path)``. Chaining stages is :mod:`deltakd.pipeline`.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Iterable

from transformers import Trainer, TrainingArguments

from ..errors import DeltakdError
from ..runner import Family, Prepared, training_arguments
from ..runs import RunDir, RunResults
from ..utils import atomic_write_json, replace_dir
from .evaluate import evaluate_multilingual, hf_encoder
from .recipe import MultistageRecipe, load_multistage_recipe, validate
from .processes import is_main_process
from .saving import portable_parameters, save_student, sentence_transformers
from .stage import Stage, eval_saved, measure, prepare_stage, read_pairs, read_sts_sets, teacher_metrics
from .structure import count_parameters, multistage_spec
from .teacher import load_teacher, teacher_embeddings
from .trainer import MultistageTrainer, PairBatchCollator


def _stage(prep: Prepared) -> Stage:
    return prep.state


class MultistageFamily(Family):
    name = "multistage"

    def validate(self, data: dict[str, Any], source: str = "recipe", check_files: bool = True) -> MultistageRecipe:
        return validate(data, source=source, check_files=check_files)

    def load_recipe(self, path: str | Path, overrides: Iterable[str] = (), check_files: bool = True
                    ) -> MultistageRecipe:
        return load_multistage_recipe(path, overrides, check_files=check_files)

    def prepare(self, recipe: MultistageRecipe) -> Prepared:
        sentence_transformers()  # the embeddings extra, before any work
        stage = prepare_stage(recipe)
        data = {"train": stage.split.train, "valid": stage.split.heldout}
        return Prepared(recipe, None, stage.tokenizer, data, stage.student, teacher=stage.teacher, state=stage)

    def metric_for_best(self, prep: Prepared) -> str:
        return prep.recipe.train.metric_for_best or "loss"

    def arguments(self, prep: Prepared, run: RunDir, report_to: list[str]) -> TrainingArguments:
        has_eval = bool(_stage(prep).split.heldout)
        return training_arguments(prep.recipe.train, run, report_to, self.metric_for_best(prep), has_eval,
                                  label_names=["teacher_en"], prediction_loss_only=True,
                                  train_sampling_strategy="random",
                                  # DDP: every trainable parameter gets a gradient each step (the unused
                                  # pooler is frozen in prepare_stage), and a student's projection runs
                                  # after the model's forward, which graph search would mark unused
                                  ddp_find_unused_parameters=False)

    def before_training(self, prep: Prepared) -> None:
        stage, recipe = _stage(prep), prep.recipe
        if recipe.eval.before:
            enc = hf_encoder(stage.student, stage.tokenizer, recipe.eval.batch_size, recipe.data.max_length,
                             stage.normalize)
            stage.before = measure(enc, stage, speed=False)

    def make_trainer(self, prep: Prepared, args: TrainingArguments, callbacks: list) -> Trainer:
        stage, recipe = _stage(prep), prep.recipe
        heldout = stage.split.heldout

        def extra_eval(model: Any) -> dict[str, float]:
            enc = hf_encoder(model, stage.tokenizer, recipe.eval.batch_size, recipe.data.max_length, stage.normalize)
            m = evaluate_multilingual(enc, heldout, lambda sentences: stage.targets.lookup(list(sentences)),
                                      speed=False)
            return {k: v for k, v in m.items() if k.endswith(("/acc", "/mse"))}

        return MultistageTrainer(
            model=stage.student, args=args, train_dataset=stage.split.train,
            eval_dataset=heldout if heldout else None,
            data_collator=PairBatchCollator(stage.tokenizer, stage.targets, recipe.data.max_length),
            callbacks=callbacks, loss=recipe.loss, normalize=stage.normalize, extra_eval=extra_eval)

    def evaluate(self, prep: Prepared, trainer: Trainer) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
        return {}, {}  # measured on the saved folder in finish()

    def save_model(self, prep: Prepared, trainer: Trainer, run: RunDir) -> None:
        if not is_main_process():  # the lifecycle calls it on the main process only; never two writers
            return
        stage, model = _stage(prep), trainer.model
        model.eval()
        tmp = run.path / ".model-tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_student(model, tmp, tokenizer=stage.tokenizer, normalize=stage.normalize,
                     max_seq_length=prep.recipe.data.max_length)
        replace_dir(tmp, run.model_dir)

    def finish(self, prep: Prepared, trainer: Trainer, run: RunDir, results: RunResults,
               speed: dict[str, float], test: bool) -> RunResults:
        stage, recipe, model = _stage(prep), prep.recipe, trainer.model
        teacher_params, params = count_parameters(stage.teacher), count_parameters(model)
        trainable = count_parameters(model, trainable_only=True)  # all but the unused [CLS] pooler
        results.params = {"total": params, "trainable": trainable, "trainable_pct": 100.0 * trainable / params,
                          "portable": portable_parameters(model),
                          "teacher": teacher_params, "ratio_to_teacher": params / teacher_params}
        results.main_metric = "avg/sts_spearman" if stage.sts else "avg/acc"
        results.examples = {"train": len(stage.split.train), "heldout": len(stage.split.heldout),
                            "dropped": len(stage.split.dropped), "test_pairs": len(stage.eval_pairs),
                            "sts": {s.name: len(s) for s in stage.sts}}
        results.extra.update({
            "init_from": str(stage.init_run.path if stage.init_run else stage.init_model) if recipe.init_from else None,
            "structure": multistage_spec(model),
            "built": stage.built,
            "normalize": stage.normalize,
            "losses": {k: v for k, v in recipe.loss.weights().items() if v > 0},
            "teacher_cache": str(stage.targets.path) if stage.targets.path else None,
            "tested": False,
        })
        if stage.before is not None:
            results.extra["before"] = stage.before
        if test:
            add_test(results, run.model_dir, stage)
        return results

    def evaluate_saved(self, run: RunDir, split: str, batch_size: int | None) -> dict[str, float]:
        """Every eval set of the stage's recipe (``split`` and ``batch_size`` do not apply)."""
        return flat_metrics(evaluate_run(run, self))


def add_test(results: RunResults, model_dir: Path, stage: Stage) -> None:
    """The saved folder's held-out / test metrics and speed (and the teacher's) into ``results``."""
    measured = eval_saved(model_dir, stage)
    results.extra["speed_sent_per_s"] = measured.pop("speed_sent_per_s")
    results.metrics = measured
    if stage.recipe.eval.teacher:
        results.extra["teacher"] = teacher_metrics(stage)
    results.extra["tested"] = True


def evaluate_run(run: RunDir, family: MultistageFamily | None = None) -> RunResults:
    """Re-test a finished (or trained-without-test) run's saved model on its recipe's eval sets;
    writes ``eval.json`` and fills ``results.json``'s metrics when they were not measured."""
    family = family or MultistageFamily()
    if not run.recipe_file.is_file():
        raise DeltakdError(f"'{run.path}' is not a deltakd run directory (no readable recipe.yaml)")
    recipe = family.saved_recipe(run)
    if not (run.model_dir / "config.json").is_file():
        raise DeltakdError(f"run '{run.path}' has no model/ (did it finish?)")
    split, eval_pairs = read_pairs(recipe)
    teacher = load_teacher(recipe.teacher.model, recipe.teacher.max_seq_length, revision=recipe.teacher.revision)
    english = [p.english for p in (*split.train, *split.heldout, *eval_pairs)]
    targets = teacher_embeddings(teacher, english, batch_size=recipe.eval.batch_size)
    stage = Stage(recipe, teacher, None, None, False, split, eval_pairs, read_sts_sets(recipe), targets)
    tested = RunResults(recipe.name, str(run.path))
    add_test(tested, run.model_dir, stage)
    measured = {"metrics": tested.metrics, **tested.extra}
    if not is_main_process():  # under torchrun: measured everywhere, written once
        return tested
    atomic_write_json(run.path / "eval.json", measured)
    if run.finished:
        saved = run.read_results()
        if not saved.get("tested"):
            saved.metrics = tested.metrics
            saved.extra.update(tested.extra)
            run.write_results(saved)
    return tested


def flat_metrics(results: RunResults) -> dict[str, float]:
    """``{'heldout/de/acc': ..., 'test/sts/en-de/spearman': ..., 'speed_sent_per_s': ...}`` of a test result."""
    out = {f"{split}/{k}": float(v) for split, m in results.metrics.items() for k, v in m.items()}
    if "speed_sent_per_s" in results:
        out["speed_sent_per_s"] = float(results["speed_sent_per_s"])
    return out
