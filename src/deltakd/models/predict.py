"""Predictions of a finished classification / regression run on new texts: the label by its name
(``id2label`` of the saved config: the task's label names) with its probability, or the score."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import DeltakdError
from ..runs import RunDir
from ..runs.rundir import read_recipe_data
from .delta import find_model_dir, load_trained, read_meta

Text = str | tuple[str, str]  # one text, or a pair for a pair task (premise, hypothesis)


def _max_length(model_dir: Path, tokenizer: Any) -> int:
    """The recipe's ``task.max_length`` of the run that saved ``model_dir`` (its texts were cut there)."""
    data = read_recipe_data(RunDir(model_dir.parent)) or {}
    task = data.get("task") if isinstance(data.get("task"), dict) else {}
    return int(task.get("max_length") or min(int(tokenizer.model_max_length), 512))


@torch.no_grad()
def predict_texts(model: torch.nn.Module, tokenizer: Any, texts: Sequence[Text], names: Sequence[str] | None,
                  max_length: int, batch_size: int = 32) -> list[dict[str, Any]]:
    """One dict per text: ``label`` (a name) and ``score`` (its probability) and ``scores`` (every
    label's); for regression (``names`` None) only ``score``, the predicted value."""
    out: list[dict[str, Any]] = []
    device = next(model.parameters()).device
    for start in range(0, len(texts), batch_size):
        batch = texts[start:start + batch_size]
        pairs = [t if isinstance(t, (tuple, list)) else (t, None) for t in batch]
        first = [a for a, _ in pairs]
        second = [b for _, b in pairs]
        if any(b is None for b in second) and any(b is not None for b in second):
            raise DeltakdError("predict: give every text as a pair, or none")
        enc = tokenizer(first, None if second[0] is None else second, truncation=True, max_length=max_length,
                        padding=True, return_tensors="pt").to(device)
        logits = model(**enc).logits.float()  # (B, C)
        if names is None:
            out += [{"score": float(v)} for v in logits[:, 0]]
            continue
        probs = logits.softmax(-1)  # (B, C)
        for row in probs:
            best = int(row.argmax())
            out.append({"label": names[best], "score": float(row[best]),
                        "scores": {n: float(p) for n, p in zip(names, row)}})
    return out


def predict_run(run_dir: str | Path, texts: Text | Iterable[Text], batch_size: int = 32) -> list[dict[str, Any]]:
    """Load a finished run's model (any save format) and predict ``texts``; see :func:`predict_texts`."""
    model_dir = find_model_dir(run_dir, "run")
    meta = read_meta(model_dir)
    if meta["problem_type"] == "causal_lm":
        raise DeltakdError(f"'{run_dir}' is a causal-LM run; predict needs a classifier (use generate)")
    items = [texts] if isinstance(texts, (str, tuple)) else list(texts)
    if not items:
        return []
    model, tokenizer = load_trained(model_dir)
    names = meta.get("label_names") or meta.get("labels")
    return predict_texts(model, tokenizer, items, names, _max_length(model_dir, tokenizer), batch_size)
