"""Task metrics from scikit-learn and scipy, as GLUE reports them."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef


def _f1(y: np.ndarray, p: np.ndarray) -> float:
    average = "binary" if len(np.unique(np.concatenate([y, p]))) <= 2 and set(np.unique(y)) <= {0, 1} else "macro"
    return float(f1_score(y, p, average=average, zero_division=0))


def _corr(fn: Callable) -> Callable[[np.ndarray, np.ndarray], float]:
    def score(y: np.ndarray, p: np.ndarray) -> float:
        if np.std(p) == 0 or np.std(y) == 0:
            return 0.0  # undefined for a constant prediction; report no correlation
        return float(fn(y, p)[0])
    return score


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": lambda y, p: float(accuracy_score(y, p)),
    "f1": _f1,
    "matthews": lambda y, p: float(matthews_corrcoef(y, p)),
    "pearson": _corr(pearsonr),
    "spearman": _corr(spearmanr),
}


def compute_metrics(names: Sequence[str], logits: np.ndarray, labels: np.ndarray, kind: str) -> dict[str, float]:
    """Metrics for classification (argmax of logits) or regression (the single output)."""
    logits = np.asarray(logits)
    if isinstance(logits, tuple):
        logits = logits[0]
    preds = logits.reshape(-1) if kind == "regression" else logits.argmax(-1)
    labels = np.asarray(labels).reshape(-1) if kind == "regression" else np.asarray(labels)
    return {name: METRICS[name](labels, preds) for name in names}
