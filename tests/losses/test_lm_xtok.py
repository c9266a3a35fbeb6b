"""Losses that need no shared vocabulary (cross-tokenizer distillation): ULD and the mapped token KL."""

from __future__ import annotations

import math

import pytest
import torch

from deltakd.losses import lm, table


def _logits(*rows: list[float]) -> torch.Tensor:
    return torch.log(torch.tensor([rows], dtype=torch.float64))  # (1, L, V) from probabilities


def test_uld_hand_computed():
    s = _logits([0.7, 0.2, 0.1], [1 / 3, 1 / 3, 1 / 3])  # student: 3 tokens
    t = _logits([0.4, 0.6], [0.1, 0.9])  # teacher: 2 tokens, zero-padded to 3 after sorting
    # sorted: [.7 .2 .1] vs [.6 .4 0] -> .1 + .2 + .1 = .4 ; [1/3 1/3 1/3] vs [.9 .1 0] -> 17/30 + 7/30 + 10/30
    assert float(lm.uld(s, t, mask=torch.tensor([[True, False]]))) == pytest.approx(0.4)
    assert float(lm.uld(s, t)) == pytest.approx((0.4 + 34 / 30) / 2)
    assert float(lm.uld(s, t, normalizer=4)) == pytest.approx((0.4 + 34 / 30) / 4)
    assert float(lm.uld(s, t[..., [1, 0]])) == pytest.approx(float(lm.uld(s, t)))  # token identity does not matter
    assert float(lm.uld(t, s)) == pytest.approx(float(lm.uld(s, t)))  # nor which side is wider
    assert float(lm.uld(s, t, temperature=2.0)) != pytest.approx(float(lm.uld(s, t)))
    with pytest.raises(ValueError, match="positions"):
        lm.uld(s, t[:, :1])


def test_mapped_kl_hand_computed():
    s = _logits([0.6, 0.4])  # student: 2 tokens
    t = _logits([0.5, 0.3, 0.2])  # teacher: 3 tokens
    # teacher tokens 0, 1 -> student 0; teacher 2 -> student 1: target [.8 .2]
    want = 0.8 * math.log(0.8 / 0.6) + 0.2 * math.log(0.2 / 0.4)
    assert float(lm.mapped_kl(s, t, torch.tensor([0, 0, 1]))) == pytest.approx(want, rel=1e-5)
    # teacher token 1 maps nowhere: target [.5 .2] / .7
    want = (5 / 7) * math.log((5 / 7) / 0.6) + (2 / 7) * math.log((2 / 7) / 0.4)
    assert float(lm.mapped_kl(s, t, torch.tensor([0, -1, 1]))) == pytest.approx(want, rel=1e-5)
    # identity map over one vocabulary: the token KL (x T^2)
    torch.manual_seed(0)
    a, b = torch.randn(2, 4, 6), torch.randn(2, 4, 6)
    torch.testing.assert_close(lm.mapped_kl(a, b, torch.arange(6), temperature=2.0),
                               lm.token_kl(a, b, temperature=2.0))


def test_table_marks_the_losses_that_work_across_tokenizers():
    assert table.LOSSES["uld"].any_vocab and table.LOSSES["kd_mapped"].any_vocab
    assert table.LOSSES["hidden_mse"].any_vocab and table.LOSSES["hidden_cos"].any_vocab  # on aligned positions
    assert not table.LOSSES["kd"].any_vocab and not table.LOSSES["attention_kl"].any_vocab
    assert table.across_tokenizers(["kd", "uld", "ce", "attention_kl", "hidden_mse", "kd_mapped"]) == (
        "ce", "hidden_mse", "uld", "kd_mapped")
    assert set(table.names_for(table.LM)) >= {"uld", "kd_mapped"}
    assert "uld" not in table.names_for(table.CLASSIFICATION)
