"""Delta modules as state dicts: head keys vs delta keys, LoRA factor pairs, per-module values, flattening.

The common ground of the ``transfer`` family: the types (``StateDict``, ``PerModule``), the error
(``TransferError``), which keys belong to a task head (``HEAD_PATTERNS``, ``split_head``), how LoRA
factors pair up (``lora_pairs``) and what update they make (``lora_delta_weights``: ``s * B @ A``
per module), LoRA scalings, and one flat vector of a module for the similarity estimators
(``flatten_delta``).

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
    "LoraPair",
    "PerModule",
    "StateDict",
    "TransferError",
    "as_weights",
    "check_no_head",
    "check_same_keys",
    "flatten_delta",
    "is_head_key",
    "lora_delta_weights",
    "lora_factors",
    "lora_pairs",
    "lora_scaling",
    "lora_scalings",
    "per_module",
    "split_head",
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
    :func:`deltakd.transfer.fuse.fuse_heads` (averaged when all label sets are identical, else the target's
    head starts fresh).
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


def check_no_head(state: StateDict, head_patterns: Sequence[str], where: str) -> None:
    """Raise if ``state`` holds task-head keys (``where`` names the caller in the message)."""
    heads = sorted(k for k in state if is_head_key(k, head_patterns))
    if heads:
        more = f" (+{len(heads) - 3} more)" if len(heads) > 3 else ""
        raise TransferError(
            f"{where}: task-head keys {', '.join(heads[:3])}{more} in a delta state dict; separate them with "
            "split_head() (heads are fused only when all label sets are identical, see fuse_heads)")


def check_same_keys(states: Sequence[StateDict], what: str = "state dict") -> list[str]:
    """Source 0's keys; raises unless every state has the same keys with the same shapes."""
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


def per_module(value: PerModule, module: str, what: str) -> float:
    """``value`` for the LoRA module ``module``: the number itself, or its entry in the mapping."""
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
# LoRA updates
# --------------------------------------------------------------------------------------------


def lora_factors(state: StateDict, pair: LoraPair) -> tuple[Tensor, Tensor]:
    """``(A, B)`` of one LoRA module, checked to be 2-D and of one rank  # (r, in), (out, r)"""
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
        a, b = lora_factors(state, pair)
        out[module] = per_module(scaling, pair.module, "scaling") * (b @ a)  # (out, r) @ (r, in)
    return out


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
            a, b = lora_factors(delta, pair)
            parts.append((pair.a_key, per_module(scaling, pair.module, "scaling") * (b.double() @ a.double())))
        parts += [(k, delta[k]) for k in other]
    elif lora == "factors":
        parts = list(delta.items())
    else:
        raise TransferError(f"lora='{lora}': expected 'product' or 'factors'")
    if not parts:
        raise TransferError("nothing to flatten: the state dict holds only head keys (or nothing)")
    return torch.cat([v.detach().double().flatten().cpu() for _, v in sorted(parts, key=lambda kv: kv[0])])
