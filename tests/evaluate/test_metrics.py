import numpy as np
import pytest

from deltakd.evaluate.metrics import compute_metrics


def test_classification_metrics_against_hand_computed_values():
    # predictions (argmax): 1, 0, 1, 1, 0 ; labels: 1, 0, 0, 1, 1
    logits = np.array([[0, 1], [2, 0], [0, 3], [1, 2], [5, 1]], dtype=float)
    labels = np.array([1, 0, 0, 1, 1])
    m = compute_metrics(["accuracy", "f1", "matthews"], logits, labels, "classification")
    assert m["accuracy"] == pytest.approx(3 / 5)
    # tp=2 fp=1 fn=1 -> precision 2/3 recall 2/3 -> f1 2/3
    assert m["f1"] == pytest.approx(2 / 3)
    # mcc = (tp*tn - fp*fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) = (2*1-1*1)/sqrt(3*3*2*2) = 1/6
    assert m["matthews"] == pytest.approx(1 / 6)


def test_regression_metrics():
    preds = np.array([[1.0], [2.0], [3.0], [4.0]])
    labels = np.array([2.0, 4.0, 6.0, 8.5])
    m = compute_metrics(["pearson", "spearman"], preds, labels, "regression")
    x, y = preds.ravel(), labels
    r = ((x - x.mean()) * (y - y.mean())).sum() / np.sqrt(((x - x.mean()) ** 2).sum() * ((y - y.mean()) ** 2).sum())
    assert m["pearson"] == pytest.approx(r)
    assert m["spearman"] == pytest.approx(1.0)
    assert compute_metrics(["pearson"], np.ones((4, 1)), labels, "regression")["pearson"] == 0.0
