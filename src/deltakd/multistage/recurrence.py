"""Parameter recurrence of a student: ``k`` distinct transformer layers reused up to depth ``N``.

Stage 3 of Ding et al. 2022; cross-layer sharing as in ALBERT, "recurrent" layers as in Dehghani
et al. 2019 (Universal Transformers): the student keeps ``k`` distinct transformer layers and runs
them in a cycle up to depth ``N``, position ``i`` using distinct layer ``i % k`` (or any pattern:
``block_pattern``, ``nearest_pattern``). It is built by putting the same module objects several
times into ``encoder.layer``; parameters are counted once (``model.parameters()`` de-duplicates),
and shared layers are declared as tied weights so ``save_pretrained`` stores them once.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from itertools import combinations

from rich.progress import track
from torch import nn
from transformers import PreTrainedModel

from ..errors import DeltakdError
from ..models.student import layer_count
from .structure import layer_list, layer_owner, layer_pattern, sync_spec

__all__ = [
    "apply_recurrence",
    "block_pattern",
    "cycle_pattern",
    "nearest_pattern",
    "recurrence_pattern",
    "recurrent_student",
    "search_keep",
    "unroll",
]


def cycle_pattern(depth: int, k: int) -> list[int]:
    """``[0, 1, ..., k-1, 0, 1, ...]`` of length ``depth``: position i uses distinct layer ``i % k``."""
    if not 1 <= k <= depth:
        raise DeltakdError(f"recurrence: need 1 <= distinct layers ({k}) <= depth ({depth})")
    return [i % k for i in range(depth)]


def block_pattern(depth: int, k: int) -> list[int]:
    """``[0, 0, 1, 1, 2, 2]`` for depth 6, k 3: each distinct layer runs a contiguous block of
    positions (the first blocks one longer when ``k`` does not divide ``depth``), so a kept layer
    stands in for its neighbours instead of for a layer far from it."""
    if not 1 <= k <= depth:
        raise DeltakdError(f"recurrence: need 1 <= distinct layers ({k}) <= depth ({depth})")
    size, extra = divmod(depth, k)
    return [j for j in range(k) for _ in range(size + (j < extra))]


def nearest_pattern(keep: Sequence[int], depth: int, n_layers: int) -> list[int]:
    """Position ``i`` of a depth-``depth`` student runs the kept layer closest to where position
    ``i`` sits in the ``n_layers``-deep original (ties go to the lower layer): keep [0, 3, 5] of 6
    gives [0, 0, 1, 1, 1, 2], i.e. layers 0 0 3 3 3 5. ``keep`` must be sorted."""
    keep = list(keep)
    if keep != sorted(keep) or len(set(keep)) != len(keep):
        raise DeltakdError(f"recurrence keep {keep}: the nearest order needs distinct layers in increasing order")
    if not 1 <= len(keep) <= depth:
        raise DeltakdError(f"recurrence: need 1 <= distinct layers ({len(keep)}) <= depth ({depth})")
    scale = (n_layers - 1) / (depth - 1) if depth > 1 else 0.0
    return [min(range(len(keep)), key=lambda j: (abs(keep[j] - i * scale), j)) for i in range(depth)]


def recurrence_pattern(order: str, keep: Sequence[int], depth: int, n_layers: int) -> list[int]:
    """The layer pattern of ``order`` (``cycle`` / ``block`` / ``nearest``) for these kept layers."""
    k = len(keep)
    if order == "nearest":
        return nearest_pattern(keep, depth, n_layers)
    if order == "block":
        return block_pattern(depth, k)
    if order == "cycle":
        return cycle_pattern(depth, k)
    raise DeltakdError(f"recurrence order '{order}' is unknown; valid: cycle, block, nearest")


def search_keep(
    pretrained: PreTrainedModel,
    k: int,
    depth: int,
    order: str,
    score: Callable[[PreTrainedModel], float],
    candidates: Iterable[Sequence[int]] | None = None,
    progress: bool = True,
) -> tuple[list[int], list[tuple[list[int], float]]]:
    """Try every ``k``-subset of the layers (or ``candidates``) as the kept layers of a recurrent
    student, untrained, and return the one of lowest ``score`` with all (keep, score) pairs.

    ``score`` is the caller's criterion on a student, e.g. the MSE of its English embeddings to the
    teacher's on a sample of *training* sentences (never test data)."""
    n = len(layer_list(pretrained))
    pool = [sorted(c) for c in (candidates if candidates is not None else combinations(range(n), k))]
    if not pool:
        raise DeltakdError(f"recurrence search: no candidate layer subsets (k={k}, {n} layers)")
    scored = []
    for keep in track(pool, description=f"recurrence: scoring {len(pool)} layer subsets", disable=not progress):
        student = recurrent_student(pretrained, keep, depth, recurrence_pattern(order, keep, depth, n))
        scored.append((list(keep), float(score(student))))
        del student
    best = min(scored, key=lambda kv: kv[1])[0]
    return best, scored


def _set_tied_keys(model: nn.Module) -> None:
    """Declare shared layers as tied weights on the base model, so ``save_pretrained`` stores each
    shared tensor once (safetensors refuses aliased tensors) instead of raising."""
    base, _, _, prefix = layer_owner(model)
    layers = layer_list(model)
    first: dict[int, int] = {}
    tied: dict[str, str] = {}
    for i, layer in enumerate(layers):
        j = first.setdefault(id(layer), i)
        if j != i:
            for name, _ in layer.named_parameters():
                tied[f"{prefix}.{i}.{name}"] = f"{prefix}.{j}.{name}"
    if tied:
        base._tied_weights_keys = tied
    elif "_tied_weights_keys" in vars(base):
        del base._tied_weights_keys


def apply_recurrence(model: PreTrainedModel, pattern: Sequence[int]) -> PreTrainedModel:
    """Rebuild the layer list in place so that position ``i`` runs the model's current layer
    ``pattern[i]`` (the same module object, parameters shared). The model must have no shared
    layers yet, and every current layer must be used."""
    layers = layer_list(model)
    if layer_pattern(model) is not None:
        raise DeltakdError("recurrence: the model already shares layers; apply it to a plain model")
    k = len(layers)
    pattern = list(pattern)
    if not pattern or any(not 0 <= j < k for j in pattern):
        raise DeltakdError(f"recurrence pattern {pattern}: entries must index the {k} distinct layers (0..{k - 1})")
    unused = sorted(set(range(k)) - set(pattern))
    if unused:
        raise DeltakdError(f"recurrence pattern {pattern}: distinct layer(s) {unused} never used")
    # first appearance order must be 0, 1, 2, ... so the saved compact form reads back the same
    order = list(dict.fromkeys(pattern))
    if order != list(range(k)):
        raise DeltakdError(f"recurrence pattern {pattern}: distinct layers must first appear in order 0..{k - 1}")
    _, holder, attr, _ = layer_owner(model)
    setattr(holder, attr, nn.ModuleList([layers[j] for j in pattern]))
    for key in ("num_hidden_layers", "n_layers", "n_layer", "num_layers"):
        if isinstance(getattr(model.config, key, None), int):
            setattr(model.config, key, len(pattern))
            break
    _set_tied_keys(model)
    sync_spec(model)
    return model


def recurrent_student(
    pretrained: PreTrainedModel,
    keep: Sequence[int],
    depth: int | None = None,
    pattern: Sequence[int] | None = None,
) -> PreTrainedModel:
    """Student with ``k = len(keep)`` distinct layers copied from ``pretrained`` (its layers
    ``keep``, in that order) reused up to ``depth`` (default: the pretrained depth); position ``i``
    runs distinct layer ``i % k`` unless ``pattern`` says otherwise. Embeddings etc. copied."""
    depth = layer_count(pretrained) if depth is None else depth
    keep = list(keep)
    n = len(layer_list(pretrained))
    if not keep or len(set(keep)) != len(keep) or any(not 0 <= i < n for i in keep):
        raise DeltakdError(f"recurrence keep {keep}: must be distinct layer indices in 0..{n - 1}")
    if layer_pattern(pretrained) is not None:
        raise DeltakdError("recurrence: the pretrained model already shares layers")
    student = copy.deepcopy(pretrained)  # works for bottleneck students too
    _, holder, attr, _ = layer_owner(student)
    layers = getattr(holder, attr)
    setattr(holder, attr, nn.ModuleList([layers[i] for i in keep]))
    return apply_recurrence(student, cycle_pattern(depth, len(keep)) if pattern is None else pattern)


def unroll(model: PreTrainedModel) -> PreTrainedModel:
    """Give every position its own copy of its layer (same values), in place: a plain model with
    the same outputs, no shared parameters. A model without sharing is returned unchanged."""
    if layer_pattern(model) is None:
        return model
    _, holder, attr, _ = layer_owner(model)
    seen: set[int] = set()
    new = []
    for layer in getattr(holder, attr):
        new.append(copy.deepcopy(layer) if id(layer) in seen else layer)
        seen.add(id(layer))
    setattr(holder, attr, nn.ModuleList(new))
    _set_tied_keys(model)
    sync_spec(model)
    return model

