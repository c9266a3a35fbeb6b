"""Training and evaluation on the Hugging Face Trainer: wiring only.

Everything the Trainer does well (distribution, mixed precision, accumulation, checkpoints,
resume, trackers) comes from it; this module prepares data, model and arguments for it and
turns its output into a deltakd run directory.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (DataCollatorWithPadding, default_data_collator, EarlyStoppingCallback, Trainer, TrainerCallback,
                          TrainingArguments, set_seed)

from .data import TaskData, TaskSpec, load_task
from .data.tokenize import tokenize_examples
from .evaluate.metrics import compute_metrics
from .errors import DeltakdError
from .models.delta import (Head, attach_delta, count_parameters, load_base, load_teacher, load_tokenizer, plain_copy,
                           save_trained)
from .models.hub import load_pretrained, resolve_model_path
from .models.student import every_other, layer_count, student_from_teacher
from .recipe import Recipe
from .recipe.schema import TrainConfig
from .runs import RunDir
from .trackers import tracker_callbacks
from .utils import cpu_only


class MetricsLogCallback(TrainerCallback):
    """Appends every Trainer log event (train loss, eval metrics) to ``metrics.jsonl``."""

    def __init__(self, run: RunDir) -> None:
        self.run = run

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self.run.log_event({"step": state.global_step, "epoch": state.epoch, "time": time.time(), **logs})


@dataclass
class Prepared:
    """Data, tokenizer and model of a recipe, ready for a Trainer."""

    recipe: Recipe
    task: TaskData
    tokenizer: Any
    datasets: dict[str, Any]
    model: torch.nn.Module
    head: Head
    teacher: torch.nn.Module | None = None
    distill: Any = None  # distill.setup.DistillSetup when a teacher is given
    collator: Any = None  # a data collator of the task's own (dialogue: pads labels with -100)
    base_path: str | None = None  # where a saved adapter's base model reloads from (default: model.name)


def prepare(recipe: Recipe) -> Prepared:
    """Everything that can fail on bad input happens here, before a run directory exists."""
    set_seed(recipe.train.seed)
    if recipe.task.kind == "lm":
        return _prepare_lm(recipe)
    if recipe.task.kind == "dialogue":
        from .dialogue.train import prepare_dialogue

        return prepare_dialogue(recipe)
    task = load_task(recipe.task, recipe.train.seed)
    head = Head(task.num_labels, task.labels)
    teacher = None
    if recipe.teacher is not None:
        teacher, tokenizer = load_teacher(recipe.teacher, causal_lm=False)
        if getattr(teacher.config, "num_labels", None) != head.num_labels:
            raise DeltakdError(f"teacher: predicts {teacher.config.num_labels} labels, the task has {head.num_labels}")
    else:
        tokenizer = load_tokenizer(recipe.model)
    datasets = {name: tokenize_examples(exs, tokenizer, recipe.task.max_length) for name, exs in task.splits.items()}
    base, copied = _student_base(recipe, teacher) if teacher is not None else (None, None)
    if base is None:
        base = load_base(recipe.model, head)
    model = attach_delta(base, recipe.peft, resolve_model_path(recipe.model.name))
    prep = Prepared(recipe, task, tokenizer, datasets, model, head, teacher)
    if teacher is not None:
        prep.distill = _distill_setup(prep, copied)
    return prep


def _distill_setup(prep: Prepared, copied: list[int] | None):
    """Validate the distillation recipe against the models; build layer map, projections, cache."""
    from accelerate import PartialState

    from .distill.setup import prepare_distill

    recipe = prep.recipe
    lm = prep.head.causal_lm
    return prepare_distill(recipe.distill, prep.model, prep.teacher, "lm" if lm else "classification",
                           prep.head.num_labels, None if recipe.student and recipe.student.from_teacher and
                           recipe.student.scratch else copied, recipe.train.seed, prep.datasets,
                           None if lm else DataCollatorWithPadding(prep.tokenizer), recipe.train.eval_batch_size,
                           PartialState(cpu=cpu_only()).device)


def _student_base(recipe: Recipe, teacher: torch.nn.Module) -> tuple[torch.nn.Module | None, list[int] | None]:
    """The student built from the teacher's layers (and which), or None when the recipe names its own model."""
    st = recipe.student
    if st is None or st.from_teacher is None:
        return None, None
    plain = plain_copy(teacher)
    n = layer_count(plain)
    layers = st.from_teacher.layers or every_other(n, st.from_teacher.nb_layers)
    student = student_from_teacher(plain, layers)
    if st.scratch:
        student = type(student)(student.config)  # the same shape, freshly initialised
    return student, list(layers)


def _prepare_lm(recipe: Recipe) -> Prepared:
    """Causal-LM data (token blocks), tokenizer (given, the teacher's, or BPE trained on the data), model."""
    from transformers import AutoModelForCausalLM

    from .data.lm import get_or_train_tokenizer, lm_blocks_cached, read_texts

    cfg = recipe.task
    base = cfg.data_dir or Path(".")
    files = {"train": cfg.train_file, "valid": cfg.valid_file, "test": cfg.test_file}
    if cfg.dialogue is not None:  # DailyDialog turns as documents: turn <eos> turn <eos> ...
        from .dialogue.tasks import lm_texts

        texts, files = lm_texts(cfg), {}
    elif not files["train"] or not files["valid"]:
        raise DeltakdError("task: an lm task needs task.train_file and task.valid_file (plain text)")
    else:
        texts = {split: read_texts([base / f]) for split, f in files.items() if f}
    teacher = None
    if recipe.teacher is not None:
        teacher, tokenizer = load_teacher(recipe.teacher, causal_lm=True)
    else:
        tokenizer = get_or_train_tokenizer(recipe.model.tokenizer, texts["train"], recipe.model.vocab_size)
    datasets = {split: lm_blocks_cached(t, tokenizer, cfg.block_size) for split, t in texts.items()}
    model, copied = _student_base(recipe, teacher) if teacher is not None else (None, None)
    if model is None and recipe.model.config is not None:
        config = lm_config(recipe.model.config, tokenizer, pad_token_id=tokenizer.eos_token_id)
        limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
        if limit is not None and limit < cfg.block_size:
            raise DeltakdError(f"task.block_size: {cfg.block_size} exceeds the model's {limit} positions")
        model = AutoModelForCausalLM.from_config(config)
    elif model is None:
        model = load_pretrained(AutoModelForCausalLM.from_pretrained, recipe.model.name, "model",
                                revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code)
    spec = TaskSpec(cfg.name, "lm", None, ("perplexity",), (), "", {k: base / v for k, v in files.items() if v})
    task = TaskData(spec, None, {k: [None] * len(ds) for k, ds in datasets.items()})
    prep = Prepared(recipe, task, tokenizer, datasets, model, Head(0, None, causal_lm=True), teacher)
    if teacher is not None:
        prep.distill = _distill_setup(prep, copied)
    return prep


def lm_config(config: dict[str, Any], tokenizer: Any, pad_token_id: int | None) -> Any:
    """A from-scratch causal-LM config (recipe ``model.config``) sized to the tokenizer, eos as bos/eos."""
    from transformers import AutoConfig

    conf = dict(config)
    conf.update(vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_token_id)
    try:
        return AutoConfig.for_model(**conf)
    except (ValueError, TypeError) as e:
        raise DeltakdError(f"model.config: {str(e).splitlines()[0]}") from None


def training_arguments(t: TrainConfig, run: RunDir, report_to: list[str], metric: str, has_eval: bool = True,
                       **overrides: Any) -> TrainingArguments:
    """The Trainer arguments of a recipe's ``train:`` section (shared by every family); ``metric`` picks
    the best checkpoint; ``overrides`` replace single arguments (a family's label names, say)."""
    steps = isinstance(t.eval_every, int)
    kwargs: dict[str, Any] = dict(
        output_dir=str(run.checkpoints),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        learning_rate=t.lr,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.eval_batch_size,
        gradient_accumulation_steps=t.grad_accum,
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup_ratio,
        lr_scheduler_type=t.scheduler,
        max_grad_norm=t.max_grad_norm,
        seed=t.seed,
        data_seed=t.seed,
        eval_strategy=("steps" if steps else "epoch") if has_eval else "no",
        eval_steps=t.eval_every if steps else None,
        save_strategy="steps" if steps else "epoch",
        save_steps=(t.eval_every if t.save_every == "eval" else t.save_every) if steps else None,
        save_total_limit=t.save_total_limit,
        load_best_model_at_end=has_eval,
        metric_for_best_model=metric if has_eval else None,
        greater_is_better=not metric.endswith(("loss", "mse")),
        logging_steps=t.logging_steps,
        report_to=report_to or "none",
        bf16=t.bf16,
        fp16=t.fp16,
        dataloader_num_workers=t.num_workers,
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=cpu_only(),
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        label_names=["labels"],
        remove_unused_columns=False,
        disable_tqdm=False,
        save_only_model=False,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def metrics_for(task: TaskData):
    """A Trainer ``compute_metrics`` for the task's metrics."""
    spec = task.spec

    def metrics_fn(pred) -> dict[str, float]:
        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        return compute_metrics(spec.metrics, logits, pred.label_ids, spec.kind)

    return metrics_fn


def task_metrics(logged: dict[str, float], prefix: str, task: TaskData) -> dict[str, float]:
    """The task's metrics and the loss from a Trainer evaluation, without the key prefix."""
    keep = (*task.spec.metrics, "loss")
    out = {k.removeprefix(f"{prefix}_"): float(v) for k, v in logged.items() if k.removeprefix(f"{prefix}_") in keep}
    if task.spec.kind == "lm" and "loss" in out:
        out["perplexity"] = math.exp(min(out["loss"], 50.0))  # per-token cross-entropy -> perplexity
    return out


def make_trainer(prep: Prepared, run: RunDir, args: TrainingArguments, callbacks: list) -> Trainer:
    cbs = [MetricsLogCallback(run), *callbacks]
    recipe = prep.recipe
    if recipe.train.early_stop:
        cbs.append(EarlyStoppingCallback(early_stopping_patience=recipe.train.early_stop))
    lm = prep.task.spec.kind == "lm"
    common = dict(
        model=prep.model,
        args=args,
        train_dataset=prep.datasets["train"],
        eval_dataset=prep.datasets["valid"],
        processing_class=prep.tokenizer,
        data_collator=prep.collator or (default_data_collator if lm else DataCollatorWithPadding(prep.tokenizer)),
        compute_metrics=None if lm else metrics_for(prep.task),
        callbacks=cbs,
    )
    if prep.teacher is None:
        return Trainer(**common)
    from .distill.schedule import CurriculumCallback
    from .distill.trainer import DistillTrainer

    d, setup = recipe.distill, prep.distill
    if d.curriculum is not None and d.curriculum.lr is not None:
        common["callbacks"] = [*cbs, CurriculumCallback(setup.schedule)]
    return DistillTrainer(**common, teacher=setup.teacher, schedule=setup.schedule,
                          kind="lm" if lm else "classification", temperature=d.temperature, jsd_beta=d.jsd_beta,
                          layer_map=setup.layer_map, heads=setup.heads, cache=setup.cache,
                          lora_modules=tuple(d.lora_ild_modules))


def _checkpoint_step(path: str | Path) -> int:
    return int(Path(path).name.rsplit("-", 1)[-1])


def last_complete_checkpoint(folder: Path, prune: bool = True) -> str | None:
    """The newest checkpoint that was written completely; partial ones (a kill mid-save) are removed.

    The Trainer writes ``trainer_state.json`` after the weights, optimizer and RNG states, so a
    checkpoint whose state file parses is whole.
    """
    for ckpt in sorted(Path(folder).glob("checkpoint-*"), key=_checkpoint_step, reverse=True):
        try:
            json.loads((ckpt / "trainer_state.json").read_text())
            return str(ckpt)
        except (OSError, ValueError):
            if prune:
                shutil.rmtree(ckpt, ignore_errors=True)
    return None


def _keep_best_and_last(run: RunDir, best: str | None) -> dict[str, str]:
    """Name the final Trainer checkpoint ``last`` and the best one ``best``."""
    ckpts = sorted(run.checkpoints.glob("checkpoint-*"), key=_checkpoint_step)
    out: dict[str, str] = {}
    if not ckpts:
        return out
    last = ckpts[-1]
    for name in ("best", "last"):
        shutil.rmtree(run.checkpoints / name, ignore_errors=True)
    if best and Path(best).exists() and Path(best) != last:
        shutil.copytree(best, run.checkpoints / "best")
        out["best_step"] = str(_checkpoint_step(best))
    else:
        shutil.copytree(last, run.checkpoints / "best")
        out["best_step"] = str(_checkpoint_step(last))
    last.rename(run.checkpoints / "last")
    out["last_step"] = str(_checkpoint_step(last))
    for extra in run.checkpoints.glob("checkpoint-*"):
        shutil.rmtree(extra)
    return out


def train(prep: Prepared, run: RunDir, resume: bool = False, is_main: bool = True) -> dict[str, Any]:
    """Train, keep best/last, evaluate the best model on every split, save ``model/`` and results."""
    recipe = prep.recipe
    started = time.time()
    report_to, callbacks = tracker_callbacks(recipe.track, run.path, recipe.output_dir)
    metric = recipe.train.metric_for_best or ("loss" if recipe.task.kind in ("lm", "dialogue")
                                              else prep.task.spec.main_metric)
    args = training_arguments(recipe.train, run, report_to, metric)
    trainer = make_trainer(prep, run, args, callbacks)
    checkpoint = last_complete_checkpoint(run.checkpoints, prune=is_main) if resume else None
    if checkpoint and is_main:
        run.truncate_events(_checkpoint_step(checkpoint))
    out = trainer.train(resume_from_checkpoint=checkpoint)
    train_seconds = time.time() - started
    split_metrics: dict[str, dict[str, float]] = {}
    speed: dict[str, float] = {}
    for split, ds in prep.datasets.items():
        if split == "train":
            continue
        raw = trainer.evaluate(ds, metric_key_prefix=split)
        split_metrics[split] = task_metrics(raw, split, prep.task)
        speed[split] = float(raw.get(f"{split}_samples_per_second", float("nan")))
    results: dict[str, Any] = {}
    if is_main:
        ckpt_info = _keep_best_and_last(run, trainer.state.best_model_checkpoint)
        save_trained(trainer.model, run.model_dir, recipe.peft, recipe.model, prep.head, prep.tokenizer,
                     base_path=prep.base_path)
        total, trainable = count_parameters(trainer.model)
        results = {
            "name": recipe.name,
            "run_dir": str(run.path),
            "task": prep.task.spec.name,
            "main_metric": prep.task.spec.main_metric,
            "metrics": split_metrics,
            "params": {"total": total, "trainable": trainable, "trainable_pct": 100.0 * trainable / total},
            "examples": {k: len(v) for k, v in prep.task.splits.items()},
            "train_steps": int(trainer.state.global_step),
            "train_samples_per_second": float(out.metrics.get("train_samples_per_second", float("nan"))),
            "train_runtime_s": float(out.metrics.get("train_runtime", float("nan"))),
            "wall_time_s": time.time() - started,
            "train_wall_time_s": train_seconds,
            "resumed_from": Path(checkpoint).name if checkpoint else None,
            **({"train_tokens_per_second": float(out.metrics.get("train_samples_per_second", 0.0))
                * recipe.task.block_size} if recipe.task.kind == "lm" else {}),
            **ckpt_info,
        }
        eval_split = "test" if "test" in speed else "valid"
        results["eval_samples_per_second"] = speed[eval_split]
        if prep.teacher is not None:
            results["distill"] = _teacher_comparison(prep, trainer, run, eval_split, speed[eval_split])
        run.write_results(results)
    return results


def _teacher_comparison(prep: Prepared, trainer: Trainer, run: RunDir, split: str, student_speed: float
                        ) -> dict[str, Any]:
    """The teacher on the same split with the same batch size: metrics, size, speed-up of the student."""
    setup = prep.distill
    raw = _evaluate_raw(setup.teacher if setup is not None else prep.teacher, prep.tokenizer, prep.datasets[split], prep.task,
                        prep.recipe.train.eval_batch_size, run.path / ".teacher-eval")
    shutil.rmtree(run.path / ".teacher-eval", ignore_errors=True)
    t_speed = float(raw.get("eval_samples_per_second", float("nan")))
    total, _ = count_parameters(setup.teacher if setup is not None else prep.teacher)
    return {
        "teacher_metrics": {split: task_metrics(raw, "eval", prep.task)},
        "teacher_params": total,
        "teacher_eval_samples_per_second": t_speed,
        "speedup": student_speed / t_speed if t_speed > 0 else float("nan"),
        "teacher_forwards": int(getattr(trainer, "teacher_forwards", 0)),
        "teacher_cache": str(setup.cache.path) if setup is not None and setup.cache is not None else None,
        "layer_map": setup.layer_map.mode if setup is not None and setup.layer_map is not None else None,
    }


def eval_data(recipe: Recipe, tokenizer: Any) -> tuple[TaskData, dict[str, Any]]:
    """The task and its tokenised splits, for evaluating a saved model."""
    if recipe.task.kind == "dialogue":
        from .dialogue.train import dialogue_eval_data

        return dialogue_eval_data(recipe, tokenizer)
    if recipe.task.kind == "lm":
        from .data.lm import lm_blocks_cached, read_texts

        base = recipe.task.data_dir or Path(".")
        files = {"train": recipe.task.train_file, "valid": recipe.task.valid_file, "test": recipe.task.test_file}
        if recipe.task.dialogue is not None:
            from .dialogue.tasks import lm_texts

            texts = lm_texts(recipe.task)
        else:
            texts = {k: read_texts([base / f]) for k, f in files.items() if f}
        datasets = {k: lm_blocks_cached(t, tokenizer, recipe.task.block_size) for k, t in texts.items()}
        spec = TaskSpec(recipe.task.name, "lm", None, ("perplexity",), (), "")
        return TaskData(spec, None, {k: [None] * len(v) for k, v in datasets.items()}), datasets
    task = load_task(recipe.task, recipe.train.seed)
    return task, {k: tokenize_examples(v, tokenizer, recipe.task.max_length) for k, v in task.splits.items()}


def eval_collator(recipe: Recipe, tokenizer: Any) -> Any:
    """The task's own data collator for evaluation (dialogue), or None for the default."""
    if recipe.task.kind == "dialogue":
        from .dialogue.data import DialogueCollator

        return DialogueCollator(tokenizer.pad_token_id)
    return None


def evaluate_model(model: torch.nn.Module, tokenizer: Any, dataset: Any, task: TaskData, batch_size: int,
                   out_dir: Path, collator: Any = None) -> dict[str, float]:
    """Evaluate a trained model on a tokenised split with a progress bar."""
    return task_metrics(_evaluate_raw(model, tokenizer, dataset, task, batch_size, out_dir, collator), "eval", task)


def _evaluate_raw(model: torch.nn.Module, tokenizer: Any, dataset: Any, task: TaskData, batch_size: int,
                  out_dir: Path, collator: Any = None) -> dict[str, float]:
    lm = task.spec.kind == "lm"
    args = TrainingArguments(output_dir=str(out_dir), per_device_eval_batch_size=batch_size, report_to="none",
                             dataloader_pin_memory=torch.cuda.is_available(), use_cpu=cpu_only(),
                             label_names=["labels"], remove_unused_columns=False, disable_tqdm=False)
    trainer = Trainer(model=model, args=args, processing_class=tokenizer,
                      data_collator=collator or (default_data_collator if lm else DataCollatorWithPadding(tokenizer)),
                      compute_metrics=None if lm else metrics_for(task))
    return trainer.evaluate(dataset, metric_key_prefix="eval")
