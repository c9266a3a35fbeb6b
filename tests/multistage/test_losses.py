"""Multistage losses against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from deltakd.multistage.losses import (
    cosine_logits,
    in_batch_bce,
    in_batch_ce,
    info_nce,
    mcl_loss,
    reimers_mse,
)

# queries a, keys b: cos(a_i, b_j) = [[1, 0.6], [0, 0.8]]; at temperature 0.5 the logits are
# [[2, 1.2], [0, 1.6]]
A = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
B = torch.tensor([[1.0, 0.0], [0.6, 0.8]])


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_reimers_mse_hand_value():
    s_en, s_tr, t_en = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 0.0]])
    # MSE(s_en, t) = (0 + 4) / 2 = 2; MSE(s_tr, t) = (1 + 0) / 2 = 0.5; mean of the two = 1.25
    assert reimers_mse(s_en, s_tr, t_en).item() == pytest.approx(1.25)


def test_reimers_mse_matches_sentence_transformers_reduction():
    torch.manual_seed(0)
    s_en, s_tr, t = torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 8)
    # sentence-transformers' MSELoss: mean of the per-column MSEs
    expected = torch.stack([torch.nn.functional.mse_loss(s_en, t), torch.nn.functional.mse_loss(s_tr, t)]).mean()
    assert torch.allclose(reimers_mse(s_en, s_tr, t), expected)


def test_cosine_logits_hand_value():
    assert torch.allclose(cosine_logits(A, B, temperature=0.5), torch.tensor([[2.0, 1.2], [0.0, 1.6]]))
    # scale-invariant: cosine, not dot product
    assert torch.allclose(cosine_logits(3 * A, 0.5 * B, temperature=0.5), cosine_logits(A, B, temperature=0.5))


def test_info_nce_rows_hand_value():
    # row 0: -log(e^2 / (e^2 + e^1.2)) = softplus(-0.8); row 1: -log(e^1.6 / (e^0 + e^1.6)) = softplus(-1.6)
    rows = (softplus(-0.8) + softplus(-1.6)) / 2
    assert info_nce(A, B, temperature=0.5).item() == pytest.approx(rows, rel=1e-6)
    assert in_batch_ce(A, B, temperature=0.5).item() == pytest.approx(rows, rel=1e-6)


def test_info_nce_symmetric_hand_value():
    rows = (softplus(-0.8) + softplus(-1.6)) / 2
    # column 0: logits (2, 0), target 0 -> softplus(-2); column 1: logits (1.2, 1.6), target 1 -> softplus(-0.4)
    cols = (softplus(-2.0) + softplus(-0.4)) / 2
    assert info_nce(A, B, temperature=0.5, symmetric=True).item() == pytest.approx((rows + cols) / 2, rel=1e-6)
    assert mcl_loss(A, B, temperature=0.5).item() == pytest.approx((rows + cols) / 2, rel=1e-6)


def test_info_nce_prefers_aligned_pairs():
    torch.manual_seed(0)
    x = torch.randn(8, 16)
    aligned = info_nce(x, x + 0.01 * torch.randn(8, 16))
    shuffled = info_nce(x, x[torch.randperm(8)])
    assert aligned < shuffled
    assert aligned < 0.05


def test_in_batch_bce_hand_value():
    # logits [[2, 1.2], [0, 1.6]], targets eye: BCE(x, 1) = softplus(-x), BCE(x, 0) = softplus(x)
    expected = (softplus(-2.0) + softplus(1.2) + softplus(0.0) + softplus(-1.6)) / 4
    assert in_batch_bce(A, B, temperature=0.5).item() == pytest.approx(expected, rel=1e-6)
    # bias shifts every logit
    shifted = (softplus(-1.0) + softplus(0.2) + softplus(-1.0) + softplus(-0.6)) / 4
    assert in_batch_bce(A, B, temperature=0.5, bias=-1.0).item() == pytest.approx(shifted, rel=1e-6)


def test_losses_backpropagate_to_student_only_inputs():
    torch.manual_seed(0)
    s = torch.randn(4, 8, requires_grad=True)
    t = torch.randn(4, 8)
    bias = torch.tensor(-2.0, requires_grad=True)
    loss = info_nce(s, t, symmetric=True) + in_batch_bce(s, t, bias=bias) + reimers_mse(s, s, t)
    loss.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()
    assert bias.grad is not None


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="temperature"):
        info_nce(A, B, temperature=0.0)
    with pytest.raises(ValueError, match="same shape"):
        info_nce(A, B[:1])
    with pytest.raises(ValueError, match="same shape"):
        reimers_mse(A, A, B[:1])
    with pytest.raises(ValueError, match="same shape"):
        in_batch_bce(A.unsqueeze(0), B.unsqueeze(0))
