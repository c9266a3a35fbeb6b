"""``task.kind: lm`` runs: text cut into token blocks, a causal LM (from scratch, a folder or hub id,
or a student with the teacher's layers), next-token loss or distillation, perplexity."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoModelForCausalLM, Trainer, set_seed

from ..data import TaskData, TaskSpec
from ..data.dailydialog_tasks import lm_texts
from ..data.lm import get_or_train_tokenizer, lm_blocks_cached, read_texts
from ..distill.setup import check_kind, make_schedule
from ..errors import DeltakdError
from ..models.causal_lm import lm_config
from ..models.delta import Head, load_teacher
from ..models.hub import load_pretrained, resolve_model_path
from ..recipe import Recipe
from ..runner import Prepared
from ..runner.transformers_family import TransformersFamily
from ..runs import RunDir, RunResults


def _texts(recipe: Recipe) -> tuple[dict[str, list[str]], dict[str, str | None]]:
    """Documents per split and the files they came from (DailyDialog turns: no files)."""
    cfg = recipe.task
    base = cfg.data_dir or Path(".")
    files = {"train": cfg.train_file, "valid": cfg.valid_file, "test": cfg.test_file}
    if cfg.dialogue is not None:  # DailyDialog turns as documents: turn <eos> turn <eos> ...
        return lm_texts(cfg), {}
    return {split: read_texts([base / f]) for split, f in files.items() if f}, files


def _own_tokenizer(recipe: Recipe) -> tuple[str | None, str | None]:
    """Where the model's own tokenizer loads from, and at which revision: ``model.tokenizer``, else a
    pretrained ``model.name``'s (alias, folder or hub id at ``model.revision``); None for a model built
    from ``model.config`` alone (a BPE trained on the data, or with a teacher the teacher's)."""
    m = recipe.model
    if m.tokenizer:
        return m.tokenizer, None
    if m.config is None:
        path = resolve_model_path(m.name)
        return path, m.revision if path == m.name else None
    return None, None


def _task(recipe: Recipe, datasets: dict[str, Any], files: dict[str, str | None]) -> TaskData:
    base = recipe.task.data_dir or Path(".")
    spec = TaskSpec(recipe.task.name, "lm", None, ("perplexity",), (), "",
                    {k: base / v for k, v in files.items() if v})
    return TaskData(spec, None, {k: [None] * len(ds) for k, ds in datasets.items()})


class CausalLMFamily(TransformersFamily):
    name = "lm"

    def prepare(self, recipe: Recipe) -> Prepared:
        """Token blocks, tokenizer (given, the model's, the teacher's, or BPE trained on the data), model."""
        set_seed(recipe.train.seed)
        cfg = recipe.task
        if cfg.dialogue is None and (not cfg.train_file or not cfg.valid_file):
            raise DeltakdError("task: an lm task needs task.train_file and task.valid_file (plain text)")
        if recipe.distill is not None:  # losses of another task kind: refused before any data is read
            check_kind(set(make_schedule(recipe.distill).loss_names), "lm", 0)
        texts, files = _texts(recipe)
        teacher = None
        if recipe.teacher is not None:
            teacher, teacher_tokenizer = load_teacher(recipe.teacher, causal_lm=True)
            if teacher_tokenizer.pad_token is None:  # as the student's own gets it (data.lm)
                teacher_tokenizer.pad_token = teacher_tokenizer.eos_token
            own, revision = _own_tokenizer(recipe)  # a student from a config alone: the teacher's
            load_own = (lambda: get_or_train_tokenizer(own, (), recipe.model.vocab_size, revision=revision)) \
                if own else None
            tokenizer = self.student_tokenizer(recipe, teacher_tokenizer, load_own)
        else:
            own, revision = _own_tokenizer(recipe)
            tokenizer = get_or_train_tokenizer(own, texts["train"], recipe.model.vocab_size, revision=revision)
        datasets = {split: lm_blocks_cached(t, tokenizer, cfg.block_size) for split, t in texts.items()}
        model, copied = self.student_base(recipe, teacher) if teacher is not None else (None, None)
        if model is None and recipe.model.config is not None:
            config = lm_config(recipe.model.config, tokenizer, pad_token_id=tokenizer.eos_token_id)
            limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
            if limit is not None and limit < cfg.block_size:
                raise DeltakdError(f"task.block_size: {cfg.block_size} exceeds the model's {limit} positions")
            model = AutoModelForCausalLM.from_config(config)
        elif model is None:
            model = load_pretrained(AutoModelForCausalLM.from_pretrained, recipe.model.name, "model",
                                    revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code)
        prep = Prepared(recipe, _task(recipe, datasets, files), tokenizer, datasets, model,
                        Head(0, None, causal_lm=True), teacher)
        if teacher is not None:
            prep.distill = self.distill_setup(prep, copied)
        return prep

    def finish(self, prep: Prepared, trainer: Trainer, run: RunDir, results: RunResults,
               speed: dict[str, float], test: bool) -> RunResults:
        results = super().finish(prep, trainer, run, results, speed, test)
        results.extra["train_tokens_per_second"] = results.train_samples_per_second * prep.recipe.task.block_size
        return results

    def eval_data(self, recipe: Recipe, tokenizer: Any) -> tuple[TaskData, dict[str, Any]]:
        texts, files = _texts(recipe)
        datasets = {k: lm_blocks_cached(t, tokenizer, recipe.task.block_size) for k, t in texts.items()}
        return _task(recipe, datasets, files), datasets
