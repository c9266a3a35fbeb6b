"""Checks and masked reductions shared by the loss modules."""

from __future__ import annotations

from torch import Tensor


def check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def check_same_shape(name: str, a: Tensor, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name}: student shape {tuple(a.shape)} != teacher shape {tuple(b.shape)}")


def masked_token_mean(per_token: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``per_token`` (B, L) over positions where ``mask`` (B, L) is set."""
    if mask is None:
        return per_token.mean()
    m = mask.to(per_token.dtype)  # (B, L)
    return (per_token * m).sum() / m.sum().clamp_min(1.0)


def normalised_token_sum(per_token: Tensor, mask: Tensor | None, normalizer: float | Tensor | None) -> Tensor:
    """``sum(per_token * mask) / normalizer``; default normalizer = number of valid tokens."""
    if mask is None:
        total = per_token.sum()
        count = per_token.new_tensor(float(per_token.numel()))
    else:
        m = mask.to(per_token.dtype)  # (B, L)
        total = (per_token * m).sum()
        count = m.sum()
    if normalizer is None:
        return total / count.clamp_min(1.0)
    return total / normalizer
