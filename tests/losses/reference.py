"""Reference formulas in numpy for the loss tests."""

from __future__ import annotations

import numpy as np
import torch


def np_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def np_kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(p || q) over the last axis."""
    return (p * (np.log(p) - np.log(q))).sum(-1)


def t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)
