"""Estimator inputs from live models: fitted heads, logits, gradient norms, short tuning on the target.

Every source module is put on the backbone with a head for the *target's* classes. That head is a
logistic regression fitted on the source-adapted features of the k-shot examples (the input of the
model's classification layer): its cross-validated log-probabilities are the logits of the
logit-based estimators (so a source is judged on examples its head never saw), and the head fitted on
all k examples is loaded into the model for GraNd and for the short tuning of the tuning-based
estimators. The tuning is a few plain AdamW steps on the k-shot data (a probe, not a run: no
checkpoints, no run directory).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from torch import Tensor, nn
from transformers import DataCollatorWithPadding

from ..evaluate.metrics import compute_metrics
from .estimators import per_example_grad_norms
from .library import delta_state
from .state_dicts import is_head_key, split_head

Batch = dict[str, Tensor]


@dataclass
class ProbeData:
    """The target's k-shot examples and a dev subset, padded into whole tensors."""

    train: Batch  # input_ids, attention_mask, ... and labels  # each (E, L)
    dev: Batch
    num_labels: int
    metrics: tuple[str, ...]

    @property
    def labels(self) -> Tensor:
        return self.train["labels"]


def pad_dataset(dataset: Any, tokenizer: Any, limit: int | None = None) -> Batch:
    n = len(dataset) if limit is None else min(limit, len(dataset))
    rows = [dataset[i] for i in range(n)]
    return dict(DataCollatorWithPadding(tokenizer, return_tensors="pt")(rows))


def _chunks(batch: Batch, size: int):
    n = batch["labels"].shape[0]
    for i in range(0, n, size):
        yield {k: v[i:i + size] for k, v in batch.items()}


def head_linears(model: nn.Module, num_labels: int) -> list[nn.Linear]:
    """The model's classification layer(s): Linear modules in the head producing ``num_labels`` outputs
    (peft keeps an original and a trainable copy; both are returned, the forward uses one)."""
    found = [m for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and is_head_key(name) and m.out_features == num_labels]
    if not found:
        raise RuntimeError(f"no classification layer with {num_labels} outputs in {type(model).__name__}")
    return found


@torch.no_grad()
def features(model: nn.Module, batch: Batch, num_labels: int, chunk: int = 64) -> Tensor:
    """The input of the classification layer for every example  # (E, H)"""
    grabbed: list[Tensor] = []
    hooks = [lin.register_forward_pre_hook(lambda mod, args: grabbed.append(args[0].detach()))
             for lin in head_linears(model, num_labels)]
    was = model.training
    model.eval()
    out = []
    try:
        for part in _chunks(batch, chunk):
            grabbed.clear()
            model(**{k: v for k, v in part.items() if k != "labels"})
            x = grabbed[-1]
            out.append(x[:, 0] if x.dim() == 3 else x)  # a sequence-level head input: its first token
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return torch.cat(out).float().cpu()


@torch.no_grad()
def logits(model: nn.Module, batch: Batch, chunk: int = 64) -> Tensor:
    """The model's logits  # (E, C)"""
    was = model.training
    model.eval()
    try:
        out = [model(**{k: v for k, v in part.items() if k != "labels"}).logits.float().cpu()
               for part in _chunks(batch, chunk)]
    finally:
        model.train(was)
    return torch.cat(out)


def dev_metric(model: nn.Module, data: ProbeData) -> float:
    """The target's main metric on the dev subset."""
    z = logits(model, data.dev).numpy()
    return float(compute_metrics(data.metrics[:1], z, data.dev["labels"].numpy(), "classification")[data.metrics[0]])


def _fit(x: np.ndarray, y: np.ndarray, num_labels: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression ``(W (C, H), b (C,))`` over all ``num_labels`` classes; a class
    absent from ``y`` gets zero weights and a bias of -30 (probability ~0)."""
    w = np.zeros((num_labels, x.shape[1]))
    b = np.full(num_labels, -30.0)
    present = np.unique(y)
    if present.size == 1:
        b[present[0]] = 0.0
        return w, b
    lr = LogisticRegression(max_iter=2000, random_state=seed).fit(x, y)
    coef, inter = lr.coef_, lr.intercept_
    if present.size == 2:  # sklearn keeps one row for two classes: log-odds of classes_[1]
        coef = np.stack([-coef[0] / 2, coef[0] / 2])
        inter = np.array([-inter[0] / 2, inter[0] / 2])
    w[lr.classes_], b[lr.classes_] = coef, inter
    return w, b


def fit_head(feats: Tensor, labels: Tensor, num_labels: int, folds: int, seed: int
             ) -> tuple[Tensor, Tensor, Tensor]:
    """``(cv_logits (E, C), W (C, H), b (C,))``: cross-validated log-probabilities of a logistic-regression
    head (each example scored by the head fitted on the other folds) and the head fitted on all."""
    x = feats.double().numpy()
    x_mean, x_std = x.mean(0), x.std(0) + 1e-6
    xs = (x - x_mean) / x_std  # standardised for the solver; folded back into W, b below
    y = labels.numpy()
    n = len(y)
    folds = max(2, min(folds, n))
    order = np.random.RandomState(seed).permutation(n)
    cv = np.zeros((n, num_labels))
    for f in range(folds):
        test = order[f::folds]
        train = np.setdiff1d(order, test)
        w, b = _fit(xs[train], y[train], num_labels, seed)
        z = xs[test] @ w.T + b
        cv[test] = z - np.logaddexp.reduce(z, axis=1, keepdims=True)  # log-probabilities
    w, b = _fit(xs, y, num_labels, seed)
    w_raw = w / x_std
    b_raw = b - w_raw @ x_mean
    return torch.from_numpy(cv), torch.from_numpy(w_raw), torch.from_numpy(b_raw)


@torch.no_grad()
def set_head(model: nn.Module, w: Tensor, b: Tensor) -> None:
    for lin in head_linears(model, w.shape[0]):
        lin.weight.copy_(w.to(lin.weight.dtype))
        if lin.bias is not None:
            lin.bias.copy_(b.to(lin.bias.dtype))


def tune(model: nn.Module, batch: Batch, steps: int, lr: float, batch_size: int, seed: int) -> None:
    """``steps`` AdamW steps on minibatches of ``batch`` (seeded), trainable parameters only, dropout on."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    n = batch["labels"].shape[0]
    model.train()
    order = torch.randperm(n, generator=gen)
    pos = 0
    for _ in range(steps):
        if pos >= n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos:pos + batch_size]
        pos += batch_size
        out = model(**{k: v[idx] for k, v in batch.items()})
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    model.eval()


@dataclass
class SourceProbe:
    """What the estimators need from one source module on one target."""

    cv_logits: Tensor | None = None  # (E, C)
    grad_norms: Tensor | None = None  # (E,)
    before: dict[str, Tensor] | None = None  # delta without head, before tuning
    after: dict[str, Tensor] | None = None
    dev_before: float | None = None
    dev_after: float | None = None
    logits_before: Tensor | None = None  # (E, C)
    logits_after: Tensor | None = None
    dev_logits: Tensor | None = None  # (D, C) on the dev subset, the fitted head, before tuning
    dev_logits_after: Tensor | None = None  # (D, C) after tuning


def probe_module(model: nn.Module, data: ProbeData, *, fit: bool, grads: bool, tuning: bool, steps: int,
                 lr: float, batch_size: int, folds: int, seed: int, dev: bool = False) -> SourceProbe:
    """Fit the head on ``model``'s features, then collect what ``fit`` / ``grads`` / ``tuning`` / ``dev``
    (logits on the dev subset, before and, when ``tuning``, after tuning) ask for.
    ``model`` is changed (head set, and tuned when ``tuning``)."""
    out = SourceProbe()
    cv, w, b = fit_head(features(model, data.train, data.num_labels), data.labels, data.num_labels, folds, seed)
    set_head(model, w, b)
    if fit:
        out.cv_logits = cv
    inputs = {k: v for k, v in data.train.items() if k != "labels"}
    if grads:
        out.grad_norms = per_example_grad_norms(model, inputs, data.labels)
    if dev:
        out.dev_logits = logits(model, data.dev)
    if tuning:
        out.before = split_head(delta_state(model))[0]
        out.dev_before = dev_metric(model, data)
        out.logits_before = logits(model, data.train)
        tune(model, data.train, steps, lr, batch_size, seed)
        out.after = split_head(delta_state(model))[0]
        out.dev_after = dev_metric(model, data)
        out.logits_after = logits(model, data.train)
        if dev:
            out.dev_logits_after = logits(model, data.dev)
    return out


def fresh_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)
