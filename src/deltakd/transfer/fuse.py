"""Weighted fusion of trained delta modules (state dicts of delta parameters) into one initial module.

Inputs are plain state dicts, e.g. ``peft.get_peft_model_state_dict(model)`` (keys like
``...query.lora_A.weight``) or :func:`deltakd.models.bottleneck.adapter_state_dict`, and one weight per
source (usually :func:`deltakd.transfer.estimators.softmax_weights`, summing to 1).

- LoRA (Hu et al. 2022), exact: ``dW = sum_i w_i * s_i * B_i @ A_i`` per adapted module (``s_i`` the
  source's scaling, ``alpha / r`` in peft), re-factored by truncated SVD into rank ``r`` factors for
  the target's scaling ``s``: ``dW / s = U S V^T``, ``B = U_r sqrt(S_r)``, ``A = sqrt(S_r) V_r^T``
  (the best rank-``r`` approximation, Eckart-Young). Sources may differ in rank and scaling.
- LoRA, naive (for comparison): ``A = sum_i w_i A_i``, ``B = sum_i w_i B_i``. ``B @ A`` then holds
  cross terms ``w_i w_j B_i A_j`` and is *not* the weighted sum of the sources' ``dW``.
- Bottleneck adapters, prefixes, prompts: weighted averaging of each parameter.
- Before weighting, task vectors (``theta_i - theta_base``; for LoRA the ``dW_i`` themselves) may be
  sparsified: TIES-merging (Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging
  Models": trim to the top-k% magnitudes, elect a sign, disjoint mean) or DARE (Yu et al. 2023,
  "Language Models are Super Mario": drop each entry with probability ``p``, rescale by
  ``1 / (1 - p)``), see :class:`deltakd.transfer.merging.Combine`.

Task heads are never fused with the delta: :func:`deltakd.transfer.state_dicts.split_head` separates
them, and :func:`fuse_heads` averages them only when every source has the same label set (same
labels, same order); otherwise the target's head starts fresh (``None``), because rows of heads with
different label sets mean different things (or differ in number).

Shapes: ``S`` sources, ``r`` LoRA rank, ``out``/``in`` the adapted layer's output/input width.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor

from .merging import Combine, combine_task_vectors
from .state_dicts import (
    HEAD_PATTERNS,
    PerModule,
    StateDict,
    TransferError,
    check_no_head,
    check_same_keys,
    lora_delta_weights,
    lora_pairs,
    per_module,
    split_head,
)

__all__ = [
    "fuse_average",
    "fuse_heads",
    "fuse_lora",
    "fuse_lora_factors",
    "fuse_modules",
    "merged_lora_delta",
    "refactor_lora",
]


# --------------------------------------------------------------------------------------------
# plain parameter averaging: bottleneck adapters, prefixes, prompts
# --------------------------------------------------------------------------------------------


def fuse_average(states: Sequence[StateDict], weights: Tensor | Sequence[float], *,
                 base: StateDict | None = None, combine: Combine = Combine(),
                 head_patterns: Sequence[str] = HEAD_PATTERNS) -> dict[str, Tensor]:
    """Weighted parameter averaging of delta modules with identical keys and shapes.

    Result ``base + combine(theta_i - base)``; without ``base`` (the modules' common initialisation)
    task vectors are the parameters themselves (``base = 0``), so ``average`` gives ``sum_i w_i theta_i``.
    For TIES / DARE pass ``base`` to follow the papers' definition of a task vector.
    """
    keys = check_same_keys(states)
    for s in states:
        check_no_head(s, head_patterns, "fuse_average")
    if base is None:
        return combine_task_vectors(states, weights, combine)
    missing = sorted(set(keys) - set(base))
    if missing:
        raise TransferError(f"base state lacks {missing[:3]}")
    taus = [{k: s[k] - base[k] for k in keys} for s in states]
    merged = combine_task_vectors(taus, weights, combine)
    return {k: base[k] + merged[k] for k in keys}


# --------------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------------


def _per_source(value: PerModule | Sequence[PerModule], n: int, what: str) -> list[PerModule]:
    if isinstance(value, (int, float, Mapping)):
        return [value] * n
    values = list(value)
    if len(values) != n:
        raise TransferError(f"got {len(values)} {what} values for {n} source modules")
    return values


def merged_lora_delta(states: Sequence[StateDict], weights: Tensor | Sequence[float], *,
                      source_scaling: PerModule | Sequence[PerModule],
                      combine: Combine = Combine()) -> dict[str, Tensor]:
    """The exact fused update ``{module: combine_i(s_i * B_i @ A_i)}``; with ``average`` that is
    ``sum_i w_i s_i B_i A_i``  # each (out, in)

    ``source_scaling``: one :data:`PerModule` for all sources, or one per source.
    """
    if not states:
        raise TransferError("no source modules to fuse")
    scalings = _per_source(source_scaling, len(states), "source_scaling")
    deltas = [lora_delta_weights(s, sc) for s, sc in zip(states, scalings)]
    if not deltas[0]:
        raise TransferError("the source state dicts hold no LoRA factors (keys '...lora_A.weight')")
    return combine_task_vectors(deltas, weights, combine)


def refactor_lora(delta: Tensor, rank: int, scaling: float = 1.0) -> tuple[Tensor, Tensor]:
    """``(A, B)`` with ``scaling * B @ A`` the best rank-``rank`` approximation of ``delta`` (out, in).

    Truncated SVD ``delta / scaling = U S V^T``; the singular values are split evenly:
    ``B = U_r sqrt(S_r)`` (out, r), ``A = sqrt(S_r) V_r^T`` (r, in). When ``rank > min(out, in)`` the
    extra rows of ``A`` / columns of ``B`` are zero. Computed in float32 at least, returned in
    ``delta``'s dtype.
    """
    if rank < 1:
        raise TransferError(f"LoRA rank must be >= 1, got {rank}")
    if scaling == 0 or not math.isfinite(scaling):
        raise TransferError(f"LoRA scaling must be finite and non-zero, got {scaling}")
    work = delta.detach()
    if work.dtype not in (torch.float32, torch.float64):
        work = work.float()
    u, s, vh = torch.linalg.svd(work / scaling, full_matrices=False)  # (out, k), (k,), (k, in)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    b = torch.zeros(delta.shape[0], rank, dtype=work.dtype, device=work.device)  # (out, r)
    a = torch.zeros(rank, delta.shape[1], dtype=work.dtype, device=work.device)  # (r, in)
    b[:, :k] = u[:, :k] * root
    a[:k] = root[:, None] * vh[:k]
    return a.to(delta.dtype), b.to(delta.dtype)


def fuse_lora(states: Sequence[StateDict], weights: Tensor | Sequence[float], *,
              rank: int | Mapping[str, int], source_scaling: PerModule | Sequence[PerModule],
              target_scaling: PerModule, combine: Combine = Combine(),
              head_patterns: Sequence[str] = HEAD_PATTERNS) -> dict[str, Tensor]:
    """Exact LoRA fusion: :func:`merged_lora_delta`, then :func:`refactor_lora` per module.

    ``rank`` / ``target_scaling`` describe the target's LoRA config (``r``, ``alpha / r``), one value
    or per module; ``source_scaling`` those of the sources (one for all, or one per source; see
    :func:`lora_scalings`). Sources may have different ranks. Keys follow source 0's naming; non-LoRA
    keys (e.g. LoRA biases, DoRA magnitudes) are fused by :func:`fuse_average` (same shapes needed).
    If ``rank`` >= the rank of the fused update, the loaded module reproduces it exactly.
    """
    if not states:
        raise TransferError("no source modules to fuse")
    for s in states:
        check_no_head(s, head_patterns, "fuse_lora")
    pairs, other = lora_pairs(states[0])
    for i, s in enumerate(states[1:], start=1):
        p_i, o_i = lora_pairs(s)
        if set(p_i) != set(pairs) or set(o_i) != set(other):
            diff = sorted(set(p_i) ^ set(pairs))[:3] or sorted(set(o_i) ^ set(other))[:3]
            raise TransferError(f"source {i} adapts different modules from source 0 (e.g. {diff})")
    delta = merged_lora_delta(states, weights, source_scaling=source_scaling, combine=combine)
    out: dict[str, Tensor] = {}
    for module, pair in pairs.items():
        r = int(per_module(rank, module, "rank"))
        a, b = refactor_lora(delta[module], r, per_module(target_scaling, module, "target_scaling"))
        out[pair.a_key], out[pair.b_key] = a, b
    if other:
        out.update(fuse_average([{k: s[k] for k in other} for s in states], weights, combine=combine,
                                head_patterns=head_patterns))
    return out


def fuse_lora_factors(states: Sequence[StateDict], weights: Tensor | Sequence[float], *,
                      head_patterns: Sequence[str] = HEAD_PATTERNS) -> dict[str, Tensor]:
    """Naive factor-wise LoRA average ``A = sum_i w_i A_i``, ``B = sum_i w_i B_i`` (and every other key).

    Needs equal ranks and scalings; ``B @ A`` then contains cross terms ``w_i w_j B_i A_j`` and differs
    from the exact ``sum_i w_i B_i A_i`` (see :func:`fuse_lora`). Kept as a baseline.
    """
    return fuse_average(states, weights, head_patterns=head_patterns)


# --------------------------------------------------------------------------------------------
# heads, and everything together
# --------------------------------------------------------------------------------------------


def fuse_heads(heads: Sequence[StateDict], weights: Tensor | Sequence[float],
               label_sets: Sequence[Sequence[str] | None]) -> dict[str, Tensor] | None:
    """Weighted average of task heads when *all* sources have the identical label set (same labels in
    the same order, or all ``None`` for regression); otherwise ``None``: the target's head starts fresh.

    Heads for different label sets cannot be fused: their rows mean different classes (or their
    number differs), so averaging them would produce a meaningless initial classifier.
    """
    if len(label_sets) != len(heads):
        raise TransferError(f"got {len(label_sets)} label sets for {len(heads)} heads")
    sets = {None if ls is None else tuple(ls) for ls in label_sets}
    if len(sets) != 1 or not heads or not heads[0]:
        return None
    return fuse_average(heads, weights, head_patterns=())


def fuse_modules(states: Sequence[StateDict], weights: Tensor | Sequence[float], *,
                 method: Literal["lora_svd", "lora_factors", "average"],
                 label_sets: Sequence[Sequence[str] | None] | None = None,
                 rank: int | Mapping[str, int] | None = None,
                 source_scaling: PerModule | Sequence[PerModule] | None = None,
                 target_scaling: PerModule | None = None, base: StateDict | None = None,
                 combine: Combine = Combine(),
                 head_patterns: Sequence[str] = HEAD_PATTERNS) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
    """Split heads off, fuse the delta with ``method``, fuse heads per :func:`fuse_heads`.

    Returns ``(delta, head)``; ``head`` is ``None`` (start fresh) unless ``label_sets`` are given and
    identical. ``lora_svd`` needs ``rank``, ``source_scaling`` and ``target_scaling``.
    """
    split = [split_head(s, head_patterns) for s in states]
    deltas, heads = [d for d, _ in split], [h for _, h in split]
    if method == "lora_svd":
        if rank is None or source_scaling is None or target_scaling is None:
            raise TransferError("method 'lora_svd' needs rank, source_scaling and target_scaling")
        delta = fuse_lora(deltas, weights, rank=rank, source_scaling=source_scaling,
                          target_scaling=target_scaling, combine=combine, head_patterns=head_patterns)
    elif method == "lora_factors":
        if combine.method != "average":
            raise TransferError("TIES / DARE act on task vectors dW; use method 'lora_svd' with them")
        delta = fuse_lora_factors(deltas, weights, head_patterns=head_patterns)
    elif method == "average":
        delta = fuse_average(deltas, weights, base=base, combine=combine, head_patterns=head_patterns)
    else:
        raise TransferError(f"fusion method '{method}': expected one of ['average', 'lora_factors', 'lora_svd']")
    head = None if label_sets is None else fuse_heads(heads, weights, label_sets)
    return delta, head
