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
  ``1 / (1 - p)``), see :class:`Combine`.

Task heads are never fused with the delta: :func:`split_head` separates them, and :func:`fuse_heads`
averages them only when every source has the same label set (same labels, same order); otherwise the
target's head starts fresh (``None``), because rows of heads with different label sets mean
different things (or differ in number).

Shapes: ``S`` sources, ``r`` LoRA rank, ``out``/``in`` the adapted layer's output/input width.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from ..errors import DeltakdError

__all__ = [
    "HEAD_PATTERNS",
    "Combine",
    "LoraPair",
    "PerModule",
    "TransferError",
    "as_weights",
    "combine_task_vectors",
    "dare",
    "flatten_delta",
    "fuse_average",
    "fuse_heads",
    "fuse_lora",
    "fuse_lora_factors",
    "fuse_modules",
    "is_head_key",
    "lora_delta_weights",
    "lora_pairs",
    "lora_scaling",
    "lora_scalings",
    "merged_lora_delta",
    "refactor_lora",
    "split_head",
    "ties_merge",
]

StateDict = Mapping[str, Tensor]
PerModule = float | Mapping[str, float]
"""A value for every LoRA module: one number for all, or module name (key prefix) -> number."""

HEAD_PATTERNS: tuple[str, ...] = ("classifier", "score")
"""Substrings marking task-head keys (as ``trainable_extra`` in :mod:`deltakd.models.bottleneck`)."""

class TransferError(DeltakdError, ValueError):
    """Bad input to transfer estimation or fusion (mismatched modules, weights, names)."""


# --------------------------------------------------------------------------------------------
# keys
# --------------------------------------------------------------------------------------------

# Linear LoRA: "<module>.lora_A.weight" (peft state dict) or "<module>.lora_A.<adapter>.weight".
_LORA_LINEAR = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
# Embedding LoRA: "<module>.lora_embedding_A" or "<module>.lora_embedding_A.<adapter>" (no ".weight").
_LORA_EMBEDDING = re.compile(r"^(?P<module>.+)\.lora_embedding_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?$")


@dataclass(frozen=True)
class LoraPair:
    """The two factor keys of one LoRA module; ``dW = scaling * B @ A`` (up to a transpose for
    embeddings, where peft stores ``A: (r, vocab)``, ``B: (dim, r)`` and uses ``(B @ A).T``; the
    fusion works in the stored layout, so that transpose never matters here)."""

    module: str  # the adapted module's name, e.g. "base_model.model.bert.encoder.layer.0.attention.self.query"
    a_key: str
    b_key: str


def is_head_key(key: str, head_patterns: Sequence[str] = HEAD_PATTERNS) -> bool:
    """Whether ``key`` belongs to the task head (contains one of ``head_patterns``)."""
    return any(p in key for p in head_patterns)


def split_head(state: StateDict, head_patterns: Sequence[str] = HEAD_PATTERNS) -> tuple[dict[str, Tensor],
                                                                                      dict[str, Tensor]]:
    """``(delta, head)``: the delta-module entries and the task-head entries of ``state``.

    Heads are kept apart because a head only means something for its own label set: see
    :func:`fuse_heads` (averaged when all label sets are identical, else the target's head starts fresh).
    """
    delta = {k: v for k, v in state.items() if not is_head_key(k, head_patterns)}
    head = {k: v for k, v in state.items() if is_head_key(k, head_patterns)}
    return delta, head


def lora_pairs(state: StateDict) -> tuple[dict[str, LoraPair], list[str]]:
    """``({module: LoraPair}, other keys)`` of a state dict; raises if a factor lacks its partner."""
    found: dict[str, dict[str, str]] = {}
    adapters: dict[str, str | None] = {}
    other: list[str] = []
    for key in state:
        m = _LORA_LINEAR.match(key) or _LORA_EMBEDDING.match(key)
        if m is None:
            other.append(key)
            continue
        module = m["module"]
        if adapters.setdefault(module, m["adapter"]) != m["adapter"]:
            raise TransferError(f"LoRA module '{module}' has several adapters in one state dict "
                                f"({adapters[module]}, {m['adapter']}); pass one adapter's weights")
        found.setdefault(module, {})[m["ab"]] = key
    pairs: dict[str, LoraPair] = {}
    for module, ab in found.items():
        if set(ab) != {"A", "B"}:
            lacking = "B" if "A" in ab else "A"
            raise TransferError(f"LoRA module '{module}' has no lora_{lacking} factor in the state dict")
        pairs[module] = LoraPair(module, ab["A"], ab["B"])
    return pairs, other


def _check_no_head(state: StateDict, head_patterns: Sequence[str], where: str) -> None:
    heads = sorted(k for k in state if is_head_key(k, head_patterns))
    if heads:
        more = f" (+{len(heads) - 3} more)" if len(heads) > 3 else ""
        raise TransferError(
            f"{where}: task-head keys {', '.join(heads[:3])}{more} in a delta state dict; separate them with "
            "split_head() (heads are fused only when all label sets are identical, see fuse_heads)")


def _check_same_keys(states: Sequence[StateDict], what: str = "state dict") -> list[str]:
    if not states:
        raise TransferError("no source modules to fuse")
    keys = list(states[0])
    first = set(keys)
    for i, s in enumerate(states[1:], start=1):
        if set(s) != first:
            only0 = sorted(first - set(s))[:3]
            only_i = sorted(set(s) - first)[:3]
            raise TransferError(f"source {i}'s {what} has different keys from source 0's "
                                f"(only in 0: {only0}; only in {i}: {only_i})")
    for k in keys:
        shapes = {tuple(s[k].shape) for s in states}
        if len(shapes) > 1:
            raise TransferError(f"'{k}' has different shapes across sources: {sorted(shapes)}")
    return keys


# --------------------------------------------------------------------------------------------
# weights and per-module values
# --------------------------------------------------------------------------------------------


def as_weights(weights: Tensor | Sequence[float], n: int) -> Tensor:
    """``weights`` as a finite float64 tensor of length ``n``  # (S,)"""
    w = torch.as_tensor(weights, dtype=torch.float64).detach().cpu().flatten()
    if w.numel() != n:
        raise TransferError(f"got {w.numel()} fusion weights for {n} source modules")
    if not torch.isfinite(w).all():
        raise TransferError(f"fusion weights must be finite, got {w.tolist()}")
    return w


def _per_module(value: PerModule, module: str, what: str) -> float:
    if isinstance(value, Mapping):
        if module not in value:
            raise TransferError(f"no {what} for LoRA module '{module}' (have {len(value)} entries, "
                                f"e.g. {sorted(value)[:2]})")
        return float(value[module])
    return float(value)


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """peft's LoRA scaling: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA (Kalajdzievski 2023)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def lora_scalings(model: nn.Module, adapter_name: str = "default") -> dict[str, float]:
    """``{module name: scaling}`` for every LoRA layer of a peft model, read from the layers themselves
    (so ``rank_pattern`` / ``alpha_pattern`` / rsLoRA are honoured). Names match :func:`lora_pairs`'
    module names for ``peft.get_peft_model_state_dict`` keys."""
    out: dict[str, float] = {}
    for name, module in model.named_modules():
        scaling = getattr(module, "scaling", None)
        if isinstance(scaling, dict) and adapter_name in scaling and hasattr(module, "lora_A"):
            out[name] = float(scaling[adapter_name])
    if not out:
        raise TransferError(f"{type(model).__name__} has no LoRA layers with adapter '{adapter_name}'")
    return out


# --------------------------------------------------------------------------------------------
# combining task vectors: weighted average, TIES, DARE
# --------------------------------------------------------------------------------------------


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
    keys = _check_same_keys(vectors, "task vector")
    w = as_weights(weights, len(vectors))
    if combine.method == "ties":
        return _ties_combine(vectors, w, combine.density)
    if combine.method == "dare":
        gen = torch.Generator().manual_seed(combine.seed)
        vectors = [{k: dare(v[k], combine.drop_rate, gen) for k in keys} for v in vectors]
    return {k: sum(float(wi) * v[k] for wi, v in zip(w, vectors)) for k in keys}


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
    keys = _check_same_keys(states)
    for s in states:
        _check_no_head(s, head_patterns, "fuse_average")
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


def _lora_factors(state: StateDict, pair: LoraPair) -> tuple[Tensor, Tensor]:
    a, b = state[pair.a_key], state[pair.b_key]  # (r, in), (out, r)
    if a.dim() != 2 or b.dim() != 2:
        raise TransferError(f"LoRA module '{pair.module}' has {a.dim()}-D factors; exact fusion handles "
                            "Linear / Embedding (2-D) factors only, use fuse_lora_factors")
    if a.shape[0] != b.shape[1]:
        raise TransferError(f"LoRA module '{pair.module}': lora_A {tuple(a.shape)} and lora_B "
                            f"{tuple(b.shape)} disagree on the rank")
    return a, b


def lora_delta_weights(state: StateDict, scaling: PerModule) -> dict[str, Tensor]:
    """``{module: scaling * B @ A}`` for every LoRA module of ``state``  # each (out, in)"""
    pairs, _ = lora_pairs(state)
    out = {}
    for module, pair in pairs.items():
        a, b = _lora_factors(state, pair)
        out[module] = _per_module(scaling, pair.module, "scaling") * (b @ a)  # (out, r) @ (r, in)
    return out


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
        _check_no_head(s, head_patterns, "fuse_lora")
    pairs, other = lora_pairs(states[0])
    for i, s in enumerate(states[1:], start=1):
        p_i, o_i = lora_pairs(s)
        if set(p_i) != set(pairs) or set(o_i) != set(other):
            diff = sorted(set(p_i) ^ set(pairs))[:3] or sorted(set(o_i) ^ set(other))[:3]
            raise TransferError(f"source {i} adapts different modules from source 0 (e.g. {diff})")
    delta = merged_lora_delta(states, weights, source_scaling=source_scaling, combine=combine)
    out: dict[str, Tensor] = {}
    for module, pair in pairs.items():
        r = int(_per_module(rank, module, "rank"))
        a, b = refactor_lora(delta[module], r, _per_module(target_scaling, module, "target_scaling"))
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


# --------------------------------------------------------------------------------------------
# flattening (for similarity estimators)
# --------------------------------------------------------------------------------------------


def flatten_delta(state: StateDict, *, lora: Literal["product", "factors"] = "product",
                  scaling: PerModule = 1.0, head_patterns: Sequence[str] = HEAD_PATTERNS) -> Tensor:
    """One float64 vector of a delta module's parameters, head keys dropped, keys in sorted order.

    ``lora="product"`` puts each LoRA module in as ``scaling * B @ A`` (invariant to the factors'
    gauge ``B M, M^-1 A`` and comparable across ranks); ``"factors"`` puts ``A`` and ``B`` in raw.
    """
    delta, _ = split_head(state, head_patterns)
    parts: list[tuple[str, Tensor]] = []
    if lora == "product":
        pairs, other = lora_pairs(delta)
        for module, pair in pairs.items():
            a, b = _lora_factors(delta, pair)
            parts.append((pair.a_key, _per_module(scaling, pair.module, "scaling") * (b.double() @ a.double())))
        parts += [(k, delta[k]) for k in other]
    elif lora == "factors":
        parts = list(delta.items())
    else:
        raise TransferError(f"lora='{lora}': expected 'product' or 'factors'")
    if not parts:
        raise TransferError("nothing to flatten: the state dict holds only head keys (or nothing)")
    return torch.cat([v.detach().double().flatten().cpu() for _, v in sorted(parts, key=lambda kv: kv[0])])
