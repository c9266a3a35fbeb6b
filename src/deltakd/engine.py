"""Training and evaluation on the Hugging Face Trainer: wiring only.

Everything the Trainer does well (distribution, mixed precision, accumulation, checkpoints,
resume, trackers) comes from it; this module prepares data, model and arguments for it and
turns its output into a deltakd run directory.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import (DataCollatorWithPadding, EarlyStoppingCallback, Trainer, TrainerCallback,
                          TrainingArguments, set_seed)

from .data import TaskData, load_task
from .data.tokenize import tokenize_examples
from .evaluate.metrics import compute_metrics
from .models.delta import Head, attach_delta, count_parameters, load_base, load_tokenizer, save_trained
from .models.hub import resolve_model_path
from .recipe import Recipe
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


def prepare(recipe: Recipe) -> Prepared:
    """Everything that can fail on bad input happens here, before a run directory exists."""
    set_seed(recipe.train.seed)
    task = load_task(recipe.task, recipe.train.seed)
    tokenizer = load_tokenizer(recipe.model)
    datasets = {name: tokenize_examples(exs, tokenizer, recipe.task.max_length) for name, exs in task.splits.items()}
    head = Head(task.num_labels, task.labels)
    model = attach_delta(load_base(recipe.model, head), recipe.peft, resolve_model_path(recipe.model.name))
    return Prepared(recipe, task, tokenizer, datasets, model, head)


def training_arguments(recipe: Recipe, run: RunDir, report_to: list[str], main_metric: str) -> TrainingArguments:
    t = recipe.train
    steps = isinstance(t.eval_every, int)
    metric = t.metric_for_best or main_metric
    return TrainingArguments(
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
        eval_strategy="steps" if steps else "epoch",
        eval_steps=t.eval_every if steps else None,
        save_strategy="steps" if steps else "epoch",
        save_steps=(t.eval_every if t.save_every == "eval" else t.save_every) if steps else None,
        save_total_limit=t.save_total_limit,
        load_best_model_at_end=True,
        metric_for_best_model=metric,
        greater_is_better=not metric.endswith("loss"),
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
    return {k.removeprefix(f"{prefix}_"): float(v) for k, v in logged.items() if k.removeprefix(f"{prefix}_") in keep}


def make_trainer(prep: Prepared, run: RunDir, args: TrainingArguments, callbacks: list) -> Trainer:
    cbs = [MetricsLogCallback(run), *callbacks]
    if prep.recipe.train.early_stop:
        cbs.append(EarlyStoppingCallback(early_stopping_patience=prep.recipe.train.early_stop))
    return Trainer(
        model=prep.model,
        args=args,
        train_dataset=prep.datasets["train"],
        eval_dataset=prep.datasets["valid"],
        processing_class=prep.tokenizer,
        data_collator=DataCollatorWithPadding(prep.tokenizer),
        compute_metrics=metrics_for(prep.task),
        callbacks=cbs,
    )


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
    args = training_arguments(recipe, run, report_to, prep.task.spec.main_metric)
    trainer = make_trainer(prep, run, args, callbacks)
    checkpoint = last_complete_checkpoint(run.checkpoints, prune=is_main) if resume else None
    if checkpoint and is_main:
        run.truncate_events(_checkpoint_step(checkpoint))
    out = trainer.train(resume_from_checkpoint=checkpoint)
    train_seconds = time.time() - started
    split_metrics: dict[str, dict[str, float]] = {}
    for split, ds in prep.datasets.items():
        if split == "train":
            continue
        split_metrics[split] = task_metrics(trainer.evaluate(ds, metric_key_prefix=split), split, prep.task)
    results: dict[str, Any] = {}
    if is_main:
        ckpt_info = _keep_best_and_last(run, trainer.state.best_model_checkpoint)
        save_trained(trainer.model, run.model_dir, recipe.peft, recipe.model, prep.head, prep.tokenizer)
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
            **ckpt_info,
        }
        run.write_results(results)
    return results


def evaluate_model(model: torch.nn.Module, tokenizer: Any, dataset: Any, task: TaskData, batch_size: int,
                   out_dir: Path) -> dict[str, float]:
    """Evaluate a trained model on a tokenised split with a progress bar."""
    args = TrainingArguments(output_dir=str(out_dir), per_device_eval_batch_size=batch_size, report_to="none",
                             dataloader_pin_memory=torch.cuda.is_available(),
                             label_names=["labels"], remove_unused_columns=False, disable_tqdm=False)
    trainer = Trainer(model=model, args=args, processing_class=tokenizer,
                      data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=metrics_for(task))
    return task_metrics(trainer.evaluate(dataset, metric_key_prefix="eval"), "eval", task)
