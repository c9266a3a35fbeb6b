"""Evaluating a model on a tokenised split with the Trainer's loop (progress bar, batching, devices)."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import torch
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments, default_data_collator

from ..data import TaskData
from ..evaluate.metrics import compute_metrics
from ..utils import cpu_only
from .batching import fast_batches


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


def default_collator(task: TaskData, tokenizer: Any) -> Any:
    """Token blocks (causal LM) stack as they are; text examples pad to the batch's longest."""
    return default_data_collator if task.spec.kind == "lm" else DataCollatorWithPadding(tokenizer)


MERGE_LIMIT_BYTES = 2 << 30  # a merged copy is made for models up to this size (it costs one copy of the weights)


def mergeable_lora(model: torch.nn.Module) -> bool:
    """A peft model whose adapters are all unmerged LoRA, small enough to copy (see ``merged_evaluation``)."""
    from peft import LoraConfig, PeftModel

    configs = getattr(model, "peft_config", None)
    if not isinstance(model, PeftModel) or not configs or not all(isinstance(c, LoraConfig) for c in configs.values()):
        return False
    if any(getattr(m, "merged", False) for m in model.modules() if hasattr(m, "merged_adapters")):
        return False
    return sum(p.numel() * p.element_size() for p in model.parameters()) <= MERGE_LIMIT_BYTES


def merged_evaluation(trainer: Trainer) -> Trainer:
    """Evaluations of a LoRA model run on a merged copy (``merge_and_unload``: the adapters folded into the
    weights, no extra matmuls per layer; the same logits up to rounding); the trained model itself is never
    merged and unmerged, so training continues on exactly its own weights. One process only."""
    loop = trainer.evaluation_loop

    def evaluation_loop(*args: Any, **kwargs: Any):
        model = trainer.model
        if trainer.args.world_size > 1 or not mergeable_lora(model):
            return loop(*args, **kwargs)
        trainer.model = copy.deepcopy(model).merge_and_unload().eval()
        try:
            return loop(*args, **kwargs)
        finally:
            trainer.model = model

    trainer.evaluation_loop = evaluation_loop
    return trainer


def evaluation_of_current_weights(trainer: Trainer, dataset: Any) -> dict[str, float] | None:
    """The Trainer's logged evaluation (``eval_*`` keys) of the weights it holds now on ``dataset``, if
    training evaluated exactly these weights on it: the evaluation at the best checkpoint's step (its
    weights were evaluated, then saved, then loaded back at the end) or, with no best checkpoint
    loaded, an evaluation at the final step. None: evaluate afresh. Saves evaluating the same
    weights on the same data twice at the end of a run."""
    args, state = trainer.args, trainer.state
    if args.eval_strategy == "no" or dataset is None or trainer.eval_dataset is not dataset:
        return None
    configs = getattr(getattr(trainer, "model", None), "peft_config", None) or {}
    if any(getattr(c, "is_prompt_learning", False) for c in configs.values()):
        return None  # prompt / prefix / p-tuning: a checkpoint holds the encoded prompt, not the weights evaluated
    best = state.best_model_checkpoint
    if args.load_best_model_at_end and best is not None:
        if not Path(best).is_dir():  # the Trainer could not load it and kept the final weights
            return None
        step = int(Path(best).name.rsplit("-", 1)[-1])
    else:
        step = state.global_step
    found = [e for e in state.log_history if e.get("step") == step and "eval_loss" in e]
    return dict(found[-1]) if found else None


def evaluate_raw(model: torch.nn.Module, tokenizer: Any, dataset: Any, task: TaskData, batch_size: int,
                 out_dir: Path, collator: Any = None) -> dict[str, float]:
    """The Trainer's evaluation dict (``eval_*`` keys, samples/s) of ``model`` on ``dataset``."""
    lm = task.spec.kind == "lm"
    args = TrainingArguments(output_dir=str(out_dir), per_device_eval_batch_size=batch_size, report_to="none",
                             dataloader_pin_memory=torch.cuda.is_available(), use_cpu=cpu_only(),
                             label_names=["labels"], remove_unused_columns=False, disable_tqdm=False)
    trainer = Trainer(model=model, args=args, processing_class=tokenizer,
                      data_collator=collator or default_collator(task, tokenizer),
                      compute_metrics=None if lm else metrics_for(task))
    return merged_evaluation(fast_batches(trainer)).evaluate(dataset, metric_key_prefix="eval")


def evaluate_model(model: torch.nn.Module, tokenizer: Any, dataset: Any, task: TaskData, batch_size: int,
                   out_dir: Path, collator: Any = None) -> dict[str, float]:
    """Evaluate a trained model on a tokenised split with a progress bar."""
    return task_metrics(evaluate_raw(model, tokenizer, dataset, task, batch_size, out_dir, collator), "eval", task)
