"""Head losses (cross-entropy, soft-target KL, logit MSE) against hand-computed values and properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deltakd.losses import logits as L

from .reference import np_kl, np_softmax, t

S2 = np.array([[1.0, 2.0, 0.5], [0.1, 0.2, 3.0]])
T2 = np.array([[0.3, 2.5, -1.0], [1.0, -0.5, 2.0]])


def test_ce_loss_classification_matches_formula():
    labels = np.array([1, 2])
    expected = -np.mean(np.log(np_softmax(S2))[np.arange(2), labels])
    got = L.ce_loss(t(S2), torch.tensor(labels))
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_ce_loss_ignore_index():
    got = L.ce_loss(t(S2), torch.tensor([1, -100]))
    assert got.item() == pytest.approx(-np.log(np_softmax(S2[0])[1]), rel=1e-6)


def test_ce_loss_regression_is_mse():
    got = L.ce_loss(t([[0.5], [2.0]]), t([1.0, 1.0]))
    assert got.item() == pytest.approx(((0.5 - 1) ** 2 + (2 - 1) ** 2) / 2)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kd_kl_matches_formula(temperature):
    p_t = np_softmax(T2 / temperature)
    p_s = np_softmax(S2 / temperature)
    expected = np_kl(p_t, p_s).sum() / 2 * temperature**2  # batchmean, T^2
    got = L.kd_kl(t(S2), t(T2), temperature)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_kd_kl_identical_is_zero_and_t2_scaling():
    assert L.kd_kl(t(S2), t(S2), 3.0).item() == pytest.approx(0.0, abs=1e-7)
    # T^2 * KL at T == T^2 * (KL of logits pre-divided by T at T=1)
    at_t = L.kd_kl(t(S2), t(T2), 2.0)
    pre_divided = L.kd_kl(t(S2) / 2.0, t(T2) / 2.0, 1.0)
    assert at_t.item() == pytest.approx(4.0 * pre_divided.item(), rel=1e-6)


def test_kd_kl_gradient_is_t_times_prob_difference():
    temperature = 2.0
    s = t(S2).requires_grad_()
    L.kd_kl(s, t(T2), temperature).backward()
    expected = temperature * (np_softmax(S2 / temperature) - np_softmax(T2 / temperature)) / 2
    np.testing.assert_allclose(s.grad.numpy(), expected, rtol=1e-5, atol=1e-7)


def test_kd_kl_rejects_regression_and_bad_temperature():
    with pytest.raises(ValueError, match="logits_mse"):
        L.kd_kl(t([[1.0]]), t([[2.0]]), 1.0)
    with pytest.raises(ValueError, match="temperature"):
        L.kd_kl(t(S2), t(T2), 0.0)


def test_logits_mse():
    assert L.logits_mse(t(S2), t(T2)).item() == pytest.approx(np.mean((S2 - T2) ** 2), rel=1e-6)
