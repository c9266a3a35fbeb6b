"""Task-similarity estimators: one score per source module, higher = more similar to the target.

Each estimator is a pure function of plain inputs (tensors, state dicts, names) and returns a float64
tensor of scores ``(S,)``, one per source, in the order given. :func:`softmax_weights` turns scores
into fusion weights. Sign conventions (all "higher = transfer more from this source"):

- ``uniform`` (number of sources): 0 for every source, i.e. the plain average after softmax;
- ``task_groups`` (names, mapping): 1 if the source shares a group with the target, else 0;
- ``cosine`` (state dicts): cos(flat delta of the source, flat delta briefly tuned on the target);
- ``euclidean`` (state dicts before/after): ``-||theta_after - theta_before||_2``, a source that moves
  less when tuned N steps on the target is closer;
- ``dev_change`` (numbers): dev metric after minus before tuning on the target (negated for a
  lower-is-better metric);
- ``loss`` (logits + labels, or losses): minus the mean cross-entropy of the target data;
- ``kl`` (logits + labels): ``-KL(q || p_bar)``, ``q`` the target's empirical label distribution,
  ``p_bar`` the source's mean predictive distribution on the target examples;
- ``kl_original`` (target logits + source logits): ``-mean_x KL(p_target(.|x) || p_source(.|x))``,
  ``p_target`` a module tuned *from random init* on the target's k-shot data, ``p_source`` the
  source module, both on the target's dev examples (the original's definition, see below);
- ``kl_shift`` (logits before/after): ``-mean_x KL(p_tuned(.|x) || p_source(.|x))``, the prediction
  shift that tuning the source-initialised model on the target causes;
- ``el2n`` (logits + labels): ``-mean_x ||softmax(f(x)) - onehot(y)||_2``;
- ``grand`` (per-example gradient norms): ``-mean_x ||grad_theta loss(x)||_2``;
- ``logits_labels`` (logits + labels): ``mean_x cos(softmax(f(x)), onehot(y))``.

Logits are over the *target's* classes (a source module with a head fitted on the target):
``(S, E, C)``, or a sequence of ``S`` tensors ``(E, C)``, for ``E`` target examples; labels ``(E,)``.
EL2N and GraNd come from Paul et al. 2021, "Deep Learning on a Data Diet: Finding Important Examples
Early in Training" (scores of examples, averaged here over the target's examples, at one model rather
than an expectation over initialisations). ``kl`` compares label marginals: the per-example
``KL(onehot(y) || p(.|x))`` is exactly the cross-entropy, i.e. the ``loss`` estimator; ``kl_shift``
is the other reading (source-initialised vs target-tuned predictions).

Two definitions of the KL estimator are offered, under two names:

- ``kl`` (this project's): a label-marginal comparison, needing no model tuned on the target; it
  only sees whether a source's predictions on the target are distributed like the target's labels.
- ``kl_original`` (the original's): the original trains a checkpoint on the target's 64-shot data
  *from random init* (no source involved), then, for every source module, sums over the target's
  dev examples ``KL(P || Q)``, ``P`` the target checkpoint's predictive distribution and ``Q`` the
  source checkpoint's (entries where either is 0 dropped); a smaller divergence means a more
  similar source. Here the predictions are over the target's classes (a source module gets a head
  fitted on the target's k-shot features, as for the other logit-based estimators, since its own
  head means other classes), the sum is a mean (the same scale for every source) and it is negated
  (higher = more similar). The target checkpoint is a fresh module with a fitted head tuned
  ``estimate.steps`` AdamW steps on the k-shot data (the probe tuning that ``cosine`` uses too), not
  a converged run: raise ``estimate.steps`` to come closer to the original's converged checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from .estimator_names import ESTIMATOR_NAMES
from .state_dicts import StateDict, TransferError, flatten_delta

__all__ = [
    "ESTIMATORS",
    "UnknownEstimatorError",
    "cosine",
    "dev_change",
    "el2n",
    "euclidean",
    "get_estimator",
    "grand",
    "kl",
    "kl_original",
    "kl_shift",
    "leave_one_out",
    "logits_labels_cosine",
    "per_example_grad_norms",
    "softmax_weights",
    "target_loss",
    "task_groups",
    "uniform",
]

V = TypeVar("V")
Logits = Tensor | Sequence[Tensor]
StateOrVector = StateDict | Tensor


class UnknownEstimatorError(TransferError):
    """An estimator name that is not in :data:`ESTIMATORS`."""


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _stack_logits(logits: Logits) -> Tensor:
    """``(S, E, C)`` float64 from a tensor or a sequence of ``(E, C)``."""
    if isinstance(logits, Tensor):
        out = logits
    else:
        if len(logits) == 0:
            raise TransferError("no source logits")
        shapes = {tuple(t.shape) for t in logits}
        if len(shapes) > 1:
            raise TransferError(f"source logits differ in shape: {sorted(shapes)}")
        out = torch.stack(list(logits))
    if out.dim() != 3:
        raise TransferError(f"logits must be (S, E, C), got shape {tuple(out.shape)}")
    if out.shape[2] < 2:
        raise TransferError("logit-based estimators need classification logits (C >= 2)")
    return out.detach().double().cpu()


def _check_labels(labels: Tensor, num_examples: int, num_classes: int) -> Tensor:
    labels = torch.as_tensor(labels).detach().cpu().long().flatten()
    if labels.numel() != num_examples:
        raise TransferError(f"got {labels.numel()} labels for {num_examples} examples")
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise TransferError(f"labels must be in [0, {num_classes}), got range "
                            f"[{labels.min().item()}, {labels.max().item()}]")
    return labels


def _flat(x: StateOrVector, **kw: Any) -> Tensor:
    return x.detach().double().flatten().cpu() if isinstance(x, Tensor) else flatten_delta(x, **kw)


def _numbers(x: Tensor | Sequence[float], what: str) -> Tensor:
    t = torch.as_tensor(x, dtype=torch.float64).detach().cpu().flatten()
    if not torch.isfinite(t).all():
        raise TransferError(f"{what} must be finite, got {t.tolist()}")
    return t


# --------------------------------------------------------------------------------------------
# estimators
# --------------------------------------------------------------------------------------------


def uniform(num_sources: int) -> Tensor:
    """Equal scores (zeros): the plain average after :func:`softmax_weights`  # (S,)"""
    if num_sources < 1:
        raise TransferError("no source modules")
    return torch.zeros(num_sources, dtype=torch.float64)


def task_groups(sources: Sequence[str], target: str,
                groups: Mapping[str, str] | Mapping[str, Sequence[str]]) -> Tensor:
    """Manual task groups: 1 for sources sharing a group with ``target``, 0 otherwise  # (S,)

    ``groups`` is either task -> group (``{"sst2": "sentiment", ...}``) or group -> tasks
    (``{"sentiment": ["sst2", "imdb"], ...}``; a task may be in several groups). Sources not listed
    are in no group (score 0); the target must be listed. With ``softmax_weights(scores, 0)`` the
    in-group sources are averaged and the others get weight 0.
    """
    member: dict[str, set[str]] = {}
    for key, value in groups.items():
        if isinstance(value, str):
            member.setdefault(key, set()).add(value)
        else:
            for task in value:
                member.setdefault(task, set()).add(key)
    if target not in member:
        raise TransferError(f"target task '{target}' is in no task group (grouped tasks: {sorted(member)})")
    mine = member[target]
    return torch.tensor([1.0 if member.get(s, set()) & mine else 0.0 for s in sources], dtype=torch.float64)


def cosine(sources: Sequence[StateOrVector], target: StateOrVector) -> Tensor:
    """Cosine similarity of each source module's flattened delta with a module briefly tuned on the
    target (as in SPoT, Vu et al. 2022, for prompts)  # (S,)

    State dicts are flattened by :func:`deltakd.transfer.state_dicts.flatten_delta` (heads dropped, LoRA as
    ``B @ A``, unscaled); pass flat tensors to flatten otherwise (per-module scaling, raw factors).
    """
    if not sources:
        raise TransferError("no source modules")
    t = _flat(target)
    out = []
    for i, s in enumerate(sources):
        v = _flat(s)
        if v.shape != t.shape:
            raise TransferError(f"source {i} flattens to {v.numel()} values, the target module to {t.numel()}")
        out.append(F.cosine_similarity(v, t, dim=0, eps=1e-12))
    return torch.stack(out)


def euclidean(before: Sequence[StateOrVector], after: Sequence[StateOrVector]) -> Tensor:
    """Minus the Euclidean distance each source module moves when tuned N steps on the target:
    ``-||theta_i^after - theta_i^before||_2``  # (S,)

    State dicts are compared in raw parameter space (LoRA factors as they are; head keys dropped,
    since a fresh target head would dominate the distance).
    """
    if len(before) != len(after) or not before:
        raise TransferError(f"need one 'after' per 'before' module, got {len(before)} and {len(after)}")
    out = []
    for i, (b, a) in enumerate(zip(before, after)):
        vb, va = _flat(b, lora="factors"), _flat(a, lora="factors")
        if vb.shape != va.shape:
            raise TransferError(f"source {i}: before/after modules flatten to {vb.numel()} and {va.numel()} values")
        out.append(-torch.linalg.vector_norm(va - vb))
    return torch.stack(out)


def dev_change(before: Tensor | Sequence[float], after: Tensor | Sequence[float], *,
               higher_is_better: bool = True) -> Tensor:
    """Change of the target's dev metric when each source-initialised module is tuned on the target:
    ``after - before`` (``before - after`` for a lower-is-better metric such as a loss)  # (S,)"""
    b, a = _numbers(before, "dev metric before"), _numbers(after, "dev metric after")
    if b.shape != a.shape or b.numel() == 0:
        raise TransferError(f"need one 'after' per 'before' metric, got {b.numel()} and {a.numel()}")
    return a - b if higher_is_better else b - a


def target_loss(logits: Logits | None = None, labels: Tensor | None = None, *,
                losses: Tensor | Sequence[Tensor] | None = None) -> Tensor:
    """Minus the mean loss of the target data under each source  # (S,)

    Either ``logits`` + ``labels`` (cross-entropy) or ``losses``: per-example losses, ``(S, E)`` or
    ``S`` tensors ``(E_i,)``.
    """
    if (losses is None) == (logits is None):
        raise TransferError("target_loss: pass either logits and labels, or losses")
    if losses is not None:
        seq = list(losses) if not isinstance(losses, Tensor) else list(losses.reshape(losses.shape[0], -1))
        if not seq:
            raise TransferError("no source losses")
        return -torch.stack([_numbers(x, "losses").mean() for x in seq])
    if labels is None:
        raise TransferError("target_loss: logits need labels")
    z = _stack_logits(logits)  # (S, E, C)
    y = _check_labels(labels, z.shape[1], z.shape[2])
    logp = z.log_softmax(-1)  # (S, E, C)
    return logp[:, torch.arange(y.numel()), y].mean(1)


def kl(logits: Logits, labels: Tensor) -> Tensor:
    """``-KL(q || p_bar)``: ``q`` the target's empirical label distribution, ``p_bar`` each source's
    mean predictive distribution over the target examples (``0 log 0 = 0``)  # (S,)"""
    z = _stack_logits(logits)  # (S, E, C)
    y = _check_labels(labels, z.shape[1], z.shape[2])
    q = torch.bincount(y, minlength=z.shape[2]).double() / y.numel()  # (C,)
    log_p_bar = torch.logsumexp(z.log_softmax(-1), dim=1) - math.log(z.shape[1])  # (S, C)
    terms = torch.where(q > 0, q * (q.clamp_min(1e-300).log() - log_p_bar), torch.zeros_like(log_p_bar))
    return -terms.sum(-1)


def kl_original(target_logits: Tensor, source_logits: Logits) -> Tensor:
    """``-mean_x KL(p_target(.|x) || p_source(.|x))``: the original's KL estimator, ``p_target`` the
    predictions of a module tuned from random init on the target's k-shot data ``(E, C)``, ``p_source``
    each source module's predictions on the same examples ``(S, E, C)``; terms where either
    probability is 0 are left out  # (S,)"""
    zs = _stack_logits(source_logits)  # (S, E, C)
    zt = _stack_logits(torch.as_tensor(target_logits).unsqueeze(0))[0]  # (E, C)
    if zt.shape != zs.shape[1:]:
        raise TransferError(f"target logits {tuple(zt.shape)} and source logits {tuple(zs.shape[1:])} differ in shape")
    lt, ls = zt.log_softmax(-1).unsqueeze(0), zs.log_softmax(-1)  # (1, E, C), (S, E, C)
    pt = lt.exp()
    keep = (pt > 0) & (ls.exp() > 0)
    terms = torch.where(keep, pt * (lt - ls), torch.zeros_like(ls))
    return -terms.sum(-1).mean(1)


def kl_shift(logits_before: Logits, logits_after: Logits) -> Tensor:
    """``-mean_x KL(p_after(.|x) || p_before(.|x))``: how far tuning each source-initialised model on
    the target moves its predictions on the target examples  # (S,)"""
    zb, za = _stack_logits(logits_before), _stack_logits(logits_after)  # (S, E, C)
    if zb.shape != za.shape:
        raise TransferError(f"logits before {tuple(zb.shape)} and after {tuple(za.shape)} differ in shape")
    lb, la = zb.log_softmax(-1), za.log_softmax(-1)
    return -(la.exp() * (la - lb)).sum(-1).mean(1)


def el2n(logits: Logits, labels: Tensor) -> Tensor:
    """EL2N (Paul et al. 2021): ``-mean_x ||softmax(f(x)) - onehot(y)||_2``; lower error = more
    similar  # (S,)"""
    z = _stack_logits(logits)  # (S, E, C)
    y = _check_labels(labels, z.shape[1], z.shape[2])
    err = z.softmax(-1) - F.one_hot(y, z.shape[2]).double()  # (S, E, C)
    return -torch.linalg.vector_norm(err, dim=-1).mean(1)


def logits_labels_cosine(logits: Logits, labels: Tensor) -> Tensor:
    """``mean_x cos(softmax(f(x)), onehot(y)) = mean_x p_y / ||p||_2``  # (S,)"""
    z = _stack_logits(logits)  # (S, E, C)
    y = _check_labels(labels, z.shape[1], z.shape[2])
    p = z.softmax(-1)
    return (p[:, torch.arange(y.numel()), y] / torch.linalg.vector_norm(p, dim=-1)).mean(1)


def grand(grad_norms: Tensor | Sequence[Tensor]) -> Tensor:
    """GraNd (Paul et al. 2021): ``-mean_x ||grad_theta loss(x)||_2`` per source, from per-example
    gradient norms ``(S, E)`` or ``S`` tensors ``(E_i,)`` (see :func:`per_example_grad_norms`)  # (S,)"""
    seq = list(grad_norms) if not isinstance(grad_norms, Tensor) else list(grad_norms.reshape(grad_norms.shape[0], -1))
    if not seq:
        raise TransferError("no source gradient norms")
    return -torch.stack([_numbers(g, "gradient norms").mean() for g in seq])


def _default_loss(output: Any, labels: Tensor) -> Tensor:
    logits = output.logits if hasattr(output, "logits") else output
    return F.cross_entropy(logits, labels)


def per_example_grad_norms(model: nn.Module, inputs: Mapping[str, Tensor], labels: Tensor, *,
                           loss_fn: Callable[[Any, Tensor], Tensor] | None = None,
                           params: Sequence[str] | None = None, use_vmap: bool | None = None) -> Tensor:
    """``||grad_theta loss(model(x_e), y_e)||_2`` for each example ``e`` of a batch  # (E,)

    ``theta``: ``params`` (names) or every parameter with ``requires_grad`` (the delta module and
    head of a peft / bottleneck model). ``inputs`` are keyword tensors with the batch first (e.g.
    ``input_ids``, ``attention_mask``), ``loss_fn(output, labels)`` defaults to cross-entropy on
    ``output.logits``. The model runs in eval mode (no dropout) and is restored afterwards.
    ``use_vmap``: ``torch.func`` ``vmap(grad)`` (fast), a per-example loop (``False``), or ``None``:
    vmap, falling back to the loop if the model cannot be vmapped.
    """
    loss_fn = loss_fn or _default_loss
    named = dict(model.named_parameters())
    names = list(params) if params is not None else [n for n, p in named.items() if p.requires_grad]
    unknown = [n for n in names if n not in named]
    if unknown or not names:
        raise TransferError(f"no such parameters: {unknown[:3]}" if unknown else "no trainable parameters")
    labels = torch.as_tensor(labels)
    n = labels.shape[0]
    if any(v.shape[0] != n for v in inputs.values()):
        raise TransferError(f"inputs and labels disagree on the batch size {n}")
    was_training = model.training
    plist = [named[k] for k in names]
    was_trainable = [p.requires_grad for p in plist]
    model.eval()
    try:
        if use_vmap is not False:
            train = {k: named[k].detach() for k in names}
            frozen = {k: p.detach() for k, p in named.items() if k not in train}
            buffers = dict(model.named_buffers())

            def one(tp: dict[str, Tensor], x: dict[str, Tensor], y: Tensor) -> Tensor:
                batch = {k: v.unsqueeze(0) for k, v in x.items()}
                out = functional_call(model, ({**frozen, **tp}, buffers), args=(), kwargs=batch)
                return loss_fn(out, y.unsqueeze(0))

            try:
                grads = vmap(grad(one), in_dims=(None, 0, 0))(train, dict(inputs), labels)
                sq = sum(g.reshape(n, -1).double().pow(2).sum(1) for g in grads.values())
                return sq.sqrt().cpu()
            except Exception:
                if use_vmap:
                    raise
        for p in plist:
            p.requires_grad_(True)
        out = []
        for e in range(n):
            batch = {k: v[e:e + 1] for k, v in inputs.items()}
            loss = loss_fn(model(**batch), labels[e:e + 1])
            gs = torch.autograd.grad(loss, plist, allow_unused=True)
            out.append(sum(g.double().pow(2).sum() for g in gs if g is not None) ** 0.5)
        return torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in out]).cpu()
    finally:
        model.train(was_training)
        for p, flag in zip(plist, was_trainable):
            p.requires_grad_(flag)


# --------------------------------------------------------------------------------------------
# weights, registry, leave-one-out
# --------------------------------------------------------------------------------------------


def softmax_weights(scores: Tensor | Sequence[float], temperature: float = 1.0) -> Tensor:
    """Fusion weights ``softmax(scores / temperature)``  # (S,)

    ``temperature -> 0`` concentrates on the best source; ``temperature = 0`` is that limit: equal
    weights on the sources tied for the best score, 0 elsewhere (with :func:`task_groups`: the average
    of the target's group). Large temperatures approach the uniform average. Scores of ``-inf``
    exclude a source.
    """
    s = torch.as_tensor(scores, dtype=torch.float64).detach().cpu().flatten()
    if s.numel() == 0:
        raise TransferError("no scores")
    if torch.isnan(s).any() or (s == math.inf).any():
        raise TransferError(f"scores must be numbers below +inf, got {s.tolist()}")
    if (s == -math.inf).all():
        raise TransferError("every source is excluded (all scores are -inf)")
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise TransferError(f"temperature must be a finite number >= 0, got {temperature}")
    if temperature == 0:
        best = (s == s.max()).double()
        return best / best.sum()
    return torch.softmax(s / temperature, dim=0)


ESTIMATORS: dict[str, Callable[..., Tensor]] = {
    "uniform": uniform,
    "task_groups": task_groups,
    "cosine": cosine,
    "euclidean": euclidean,
    "dev_change": dev_change,
    "loss": target_loss,
    "kl": kl,
    "kl_shift": kl_shift,
    "kl_original": kl_original,
    "el2n": el2n,
    "grand": grand,
    "logits_labels": logits_labels_cosine,
}
"""Estimator name -> function (see the table in this module's docstring for inputs and signs)."""

if tuple(ESTIMATORS) != ESTIMATOR_NAMES:  # the recipe validates names from the light tuple, before torch loads
    raise ImportError(f"transfer.estimator_names.ESTIMATOR_NAMES {ESTIMATOR_NAMES} does not list ESTIMATORS "
                      f"{tuple(ESTIMATORS)}; add the new estimator's name there too")


def get_estimator(name: str) -> Callable[..., Tensor]:
    """The estimator called ``name``; :class:`UnknownEstimatorError` lists the valid names."""
    try:
        return ESTIMATORS[name]
    except KeyError:
        raise UnknownEstimatorError(f"unknown similarity estimator '{name}'; valid: "
                                    f"{', '.join(sorted(ESTIMATORS))}") from None


def leave_one_out(sources: Mapping[str, V], target: str) -> dict[str, V]:
    """``sources`` (task name -> module, scores, ...) without the target task's own entry.

    A target that is not among the sources leaves them unchanged; raises if nothing would remain.
    """
    kept = {name: value for name, value in sources.items() if name != target}
    if not kept:
        raise TransferError(f"leave-one-out: no source module left once the target '{target}' is "
                            f"removed (sources: {sorted(sources)})")
    return kept
