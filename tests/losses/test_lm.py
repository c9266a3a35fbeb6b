"""Causal-LM token losses against hand-computed values; micro-batch weighting equals the full batch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from deltakd.losses import lm as L

from .reference import np_kl, np_softmax, t


SL = np.array([[[1.0, 0.0, -1.0, 2.0], [0.5, 0.5, 0.0, 1.0], [2.0, 1.0, 0.0, -1.0]]])  # (1, 3, 4)
TL = np.array([[[0.0, 1.0, -1.0, 1.0], [1.5, -0.5, 0.0, 0.0], [0.0, 0.0, 3.0, 0.0]]])


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_token_kl_matches_formula_with_mask(reverse, temperature):
    p_s, p_t = np_softmax(SL / temperature), np_softmax(TL / temperature)
    per_tok = np_kl(p_s, p_t) if reverse else np_kl(p_t, p_s)  # (1, 3)
    mask = np.array([[1, 0, 1]])
    expected = (per_tok * mask).sum() / mask.sum() * temperature**2
    got = L.token_kl(t(SL), t(TL), temperature, torch.tensor(mask), reverse=reverse)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_token_kl_properties():
    assert L.token_kl(t(SL), t(SL), 2.0).item() == pytest.approx(0.0, abs=1e-6)
    pre_divided = L.token_kl(t(SL) / 2, t(TL) / 2, 1.0)
    assert L.token_kl(t(SL), t(TL), 2.0).item() == pytest.approx(4.0 * pre_divided.item(), rel=1e-5)
    # changing a masked-out position does not change the loss
    mask = torch.tensor([[1, 1, 0]])
    other = t(SL).clone()
    other[0, 2] = 100.0
    assert L.token_kl(other, t(TL), 1.0, mask).item() == pytest.approx(L.token_kl(t(SL), t(TL), 1.0, mask).item())


def test_token_losses_microbatch_weighting_equals_full_batch():
    torch.manual_seed(0)
    s, tt = torch.randn(4, 5, 7), torch.randn(4, 5, 7)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]])
    labels = torch.randint(0, 7, (4, 5)).masked_fill(mask == 0, -100)
    lm_mask = L.next_token_mask(labels)
    for fn, m in (
        (lambda a, b, m: L.token_kl(a, b, 2.0, m), mask),
        (lambda a, b, m: L.token_kl(a, b, 1.0, m, reverse=True), mask),
        (lambda a, b, m: L.generalized_jsd(a, b, 0.3, 1.0, m), mask),
    ):
        full = fn(s, tt, m)
        parts = [(fn(s[i : i + 2], tt[i : i + 2], m[i : i + 2]), m[i : i + 2].sum()) for i in (0, 2)]
        weighted = sum(v * n for v, n in parts) / sum(n for _, n in parts)
        assert full.item() == pytest.approx(weighted.item(), rel=1e-5)
    full = L.lm_ce(s, labels)
    parts = [(L.lm_ce(s[i : i + 2], labels[i : i + 2]), lm_mask[i : i + 2].sum()) for i in (0, 2)]
    assert full.item() == pytest.approx((sum(v * n for v, n in parts) / lm_mask.sum()).item(), rel=1e-5)
    # explicit normalizer: sum / N, so micro-batch values simply add up
    n = int(mask.sum())
    summed = sum(L.token_kl(s[i : i + 2], tt[i : i + 2], 1.0, mask[i : i + 2], normalizer=n) for i in (0, 2))
    assert summed.item() == pytest.approx(L.token_kl(s, tt, 1.0, mask).item(), rel=1e-5)


@pytest.mark.parametrize("beta", [0.5, 0.3, 0.9])
def test_generalized_jsd_matches_formula(beta):
    p, q = np_softmax(TL), np_softmax(SL)  # P teacher, Q student
    m = beta * p + (1 - beta) * q
    per_tok = beta * np_kl(p, m) + (1 - beta) * np_kl(q, m)
    mask = np.array([[1, 1, 0]])
    expected = (per_tok * mask).sum() / 2
    got = L.generalized_jsd(t(SL), t(TL), beta, 1.0, torch.tensor(mask))
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_generalized_jsd_properties():
    s, tt = t(SL), t(TL)
    assert L.generalized_jsd(s, s, 0.5).item() == pytest.approx(0.0, abs=1e-6)
    assert L.generalized_jsd(s, tt, 0.5).item() == pytest.approx(L.generalized_jsd(tt, s, 0.5).item(), rel=1e-5)
    assert L.generalized_jsd(s * 50, tt * 50, 0.5).item() <= math.log(2) + 1e-6
    assert L.generalized_jsd(s, tt, 0.0).item() == pytest.approx(L.token_kl(s, tt, 1.0).item(), rel=1e-6)
    reverse_kl = L.token_kl(s, tt, 1.0, reverse=True)
    assert L.generalized_jsd(s, tt, 1.0).item() == pytest.approx(reverse_kl.item(), rel=1e-6)
    with pytest.raises(ValueError, match="beta"):
        L.generalized_jsd(s, tt, 1.5)
    sg = s.clone().requires_grad_()
    L.generalized_jsd(sg, tt, 0.5).backward()
    assert sg.grad.abs().sum() > 0


def test_lm_ce_shift_and_ignore_by_hand():
    labels = torch.tensor([[3, 2, -100]])
    # position 0 predicts labels[1] = 2; position 1 predicts -100 (ignored)
    expected = -np.log(np_softmax(SL[0, 0])[2])
    assert L.lm_ce(t(SL), labels).item() == pytest.approx(expected, rel=1e-6)
    no_shift = L.lm_ce(t(SL), labels, shift=False)
    expected_ns = -(np.log(np_softmax(SL[0, 0])[3]) + np.log(np_softmax(SL[0, 1])[2])) / 2
    assert no_shift.item() == pytest.approx(expected_ns, rel=1e-6)
    assert L.next_token_mask(labels).tolist() == [[True, False, False]]
