"""Combining task vectors: weighted sum, TIES-merging, DARE.

Task vectors are ``theta_i - theta_base`` (for LoRA the updates ``dW_i`` themselves), one state dict
per source with the same keys and shapes. Before weighting they may be sparsified: TIES-merging
(Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models": trim to the top-k%
magnitudes, elect a sign, disjoint mean) or DARE (Yu et al. 2023, "Language Models are Super Mario":
drop each entry with probability ``p``, rescale by ``1 / (1 - p)``), see :class:`Combine`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .state_dicts import StateDict, TransferError, as_weights, check_same_keys

__all__ = ["Combine", "combine_task_vectors", "dare", "ties_merge"]


@dataclass(frozen=True)
class Combine:
    """How task vectors are combined before (or instead of) plain weighting.

    - ``average``: ``sum_i w_i tau_i``;
    - ``ties`` (Yadav et al. 2023): keep the top ``density`` fraction of each ``tau_i`` by magnitude
      (over the whole module, all keys together, as in the paper), elect the sign of
      ``sum_i w_i trim(tau_i)`` per entry, then average, weighted by ``w_i``, only the kept entries whose
      sign agrees. With equal weights this is the paper's disjoint mean; note the result is a weighted
      *mean* (it does not scale with ``sum_i w_i``);
    - ``dare`` (Yu et al. 2023): drop each entry of each ``tau_i`` with probability ``drop_rate``,
      rescale survivors by ``1 / (1 - drop_rate)`` (seeded with ``seed``), then ``sum_i w_i dare(tau_i)``.
    """

    method: Literal["average", "ties", "dare"] = "average"
    density: float = 0.2
    drop_rate: float = 0.9
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in ("average", "ties", "dare"):
            raise TransferError(f"combine method '{self.method}': expected one of ['average', 'ties', 'dare']")
        if not 0.0 < self.density <= 1.0:
            raise TransferError(f"TIES density must be in (0, 1], got {self.density}")
        if not 0.0 <= self.drop_rate < 1.0:
            raise TransferError(f"DARE drop_rate must be in [0, 1), got {self.drop_rate}")


def dare(vector: Tensor, drop_rate: float, generator: torch.Generator | None = None) -> Tensor:
    """DARE (Yu et al. 2023): zero each entry with probability ``drop_rate``, scale the rest by
    ``1 / (1 - drop_rate)`` so the expectation is unchanged."""
    if not 0.0 <= drop_rate < 1.0:
        raise TransferError(f"DARE drop_rate must be in [0, 1), got {drop_rate}")
    if drop_rate == 0.0:
        return vector.clone()
    keep = torch.rand(vector.shape, generator=generator, device="cpu") >= drop_rate
    return vector * keep.to(vector.device, vector.dtype) / (1.0 - drop_rate)


def _trim_threshold(flat_abs: Tensor, density: float) -> Tensor:
    """Magnitude of the ``k``-th largest entry, ``k = ceil(density * n)`` (entries >= it are kept)."""
    n = flat_abs.numel()
    k = max(1, math.ceil(density * n))
    flat_abs = flat_abs.cpu()
    if flat_abs.dtype not in (torch.float32, torch.float64):
        flat_abs = flat_abs.float()
    return torch.kthvalue(flat_abs, n - k + 1).values


def ties_merge(vectors: Tensor, weights: Tensor | Sequence[float] | None = None, density: float = 0.2) -> Tensor:
    """TIES-merging (Yadav et al. 2023) of task vectors ``(S, D)`` into one ``(D,)``.

    Trim each row to its top ``ceil(density * D)`` magnitudes (ties at the threshold are all kept),
    elect per entry the sign of the (weighted) sum of the trimmed rows, and take the (weighted) mean
    of the trimmed entries that agree with it; entries where none agrees are 0.
    """
    if vectors.dim() != 2:
        raise TransferError(f"ties_merge expects (S, D) task vectors, got shape {tuple(vectors.shape)}")
    w = as_weights(torch.ones(vectors.shape[0]) if weights is None else weights, vectors.shape[0])
    merged = _ties_combine([{"v": row} for row in vectors], w, density)
    return merged["v"]


def _ties_combine(vectors: Sequence[StateDict], w: Tensor, density: float) -> dict[str, Tensor]:
    if (w < 0).any():
        raise TransferError(f"TIES needs non-negative weights, got {w.tolist()}")
    keys = list(vectors[0])
    thresholds = [_trim_threshold(torch.cat([v[k].detach().abs().flatten() for k in keys]), density)
                  for v in vectors]
    out: dict[str, Tensor] = {}
    for k in keys:
        stack = torch.stack([v[k] for v in vectors])  # (S, *shape)
        wk = w.to(stack.dtype).to(stack.device).view(-1, *([1] * (stack.dim() - 1)))  # (S, 1, ...)
        thr = torch.stack(thresholds).to(stack.device, stack.dtype).view_as(wk)
        trimmed = torch.where(stack.abs() >= thr, stack, torch.zeros_like(stack))
        elected = torch.sign((wk * trimmed).sum(0))  # (*shape)
        agree = (torch.sign(trimmed) == elected) & (trimmed != 0)  # (S, *shape)
        num = (wk * trimmed * agree).sum(0)
        den = (wk * agree).sum(0)
        out[k] = torch.where(den > 0, num / den.clamp_min(torch.finfo(stack.dtype).tiny), torch.zeros_like(num))
    return out


def combine_task_vectors(vectors: Sequence[StateDict], weights: Tensor | Sequence[float],
                         combine: Combine = Combine()) -> dict[str, Tensor]:
    """Combine per-source task vectors (dicts with the same keys and shapes) as ``combine`` says."""
    keys = check_same_keys(vectors, "task vector")
    w = as_weights(weights, len(vectors))
    if combine.method == "ties":
        return _ties_combine(vectors, w, combine.density)
    if combine.method == "dare":
        gen = torch.Generator().manual_seed(combine.seed)
        vectors = [{k: dare(v[k], combine.drop_rate, gen) for k in keys} for v in vectors]
    return {k: sum(float(wi) * v[k] for wi, v in zip(w, vectors)) for k in keys}

