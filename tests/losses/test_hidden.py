"""Intermediate-layer losses (hidden states, attention, RAIL-KD) against hand-computed values and properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from deltakd.losses import hidden as L

from .reference import t


def test_hidden_mse_mask_excludes_padding():
    s = t([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])  # (1, 3, 2)
    zeros = torch.zeros_like(s)
    mask = torch.tensor([[1, 1, 0]])
    # token means: (1+4)/2 = 2.5, (9+16)/2 = 12.5 -> 7.5
    assert L.hidden_mse(s, zeros, mask=mask).item() == pytest.approx(7.5)
    assert L.hidden_mse(s, zeros).item() == pytest.approx((1 + 4 + 9 + 16 + 10000 + 10000) / 6)


def test_hidden_mse_projection_values_and_gradient():
    proj = nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        proj.weight.copy_(t([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    s = t([[[1.0, 2.0]]])  # (1, 1, 2) -> projected [1, 2, 3]
    target = t([[[0.0, 0.0, 0.0]]])  # (1, 1, 3)
    loss = L.hidden_mse(s, target, proj=proj)
    assert loss.item() == pytest.approx((1 + 4 + 9) / 3)
    loss.backward()
    assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0


def test_hidden_cosine_values_and_mask():
    s = t([[[1.0, 0.0], [1.0, 1.0], [5.0, -3.0]]])  # (1, 3, 2)
    tt = t([[[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    cos2 = 1 / math.sqrt(2)
    cos3 = (5 - 3) / (math.sqrt(34) * math.sqrt(2))
    assert L.hidden_cosine(s, tt).item() == pytest.approx((0 + (1 - cos2) + (1 - cos3)) / 3, rel=1e-6)
    assert L.hidden_cosine(s, tt, mask=torch.tensor([[1, 1, 0]])).item() == pytest.approx((1 - cos2) / 2, rel=1e-6)
    assert L.hidden_cosine(s, s).item() == pytest.approx(0.0, abs=1e-6)


def test_hidden_cosine_gradient_reaches_projection():
    proj = nn.Linear(4, 6)
    L.hidden_cosine(torch.randn(2, 3, 4), torch.randn(2, 3, 6), proj=proj).backward()
    assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0


def test_hidden_shape_mismatch_is_clear():
    with pytest.raises(ValueError, match="hidden_mse: student shape"):
        L.hidden_mse(torch.zeros(1, 2, 4), torch.zeros(1, 2, 6))


def test_attention_kl_values_heads_and_mask():
    teacher = np.array([[0.5, 0.5], [1.0, 0.0]])
    student = np.array([[0.25, 0.75], [0.5, 0.5]])
    row1 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    row2 = math.log(1.0 / 0.5)  # 0 * log 0 = 0
    ta = t(np.stack([teacher, teacher])[None])  # (1, 2 heads, 2, 2)
    sa = t(np.stack([student, student])[None])
    assert L.attention_kl(sa, ta).item() == pytest.approx((row1 + row2) / 2, rel=1e-6)
    assert L.attention_kl(sa, ta, mask=torch.tensor([[1, 0]])).item() == pytest.approx(row1, rel=1e-6)
    assert L.attention_kl(ta, ta).item() == pytest.approx(0.0, abs=1e-7)


def test_mean_pool():
    hidden = t([[[1.0, 2.0], [3.0, 4.0], [9.0, 9.0]], [[2.0, 0.0], [0.0, 0.0], [0.0, 0.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    np.testing.assert_allclose(L.mean_pool(hidden, mask).numpy(), [[2.0, 3.0], [2.0, 0.0]])


# ---------------------------------------------------------------- RAIL-KD


def _np_normalize(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_rail_kd_concat_identity_projections_by_hand():
    eye = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        eye.weight.copy_(torch.eye(4))
    s = [t([[3.0, 4.0]]), t([[1.0, 0.0]])]  # normalised: [.6, .8], [1, 0]
    tt = [t([[0.0, 2.0]]), t([[0.0, 1.0]])]  # normalised: [0, 1], [0, 1]
    # concat: [.6, .8, 1, 0] vs [0, 1, 0, 1] -> (.36 + .04 + 1 + 1) / 4
    assert L.rail_kd_concat(s, tt, eye, eye).item() == pytest.approx(0.6, rel=1e-6)


def test_rail_kd_concat_head_matches_numpy_and_trains_both_projections():
    torch.manual_seed(0)
    head = L.RailKDConcatHead(n_layers=2, hidden_student=3, hidden_teacher=5, dim=4)
    s = [torch.randn(2, 3), torch.randn(2, 3)]
    tt = [torch.randn(2, 5), torch.randn(2, 5)]
    loss = head(s, tt)
    cat_s = np.concatenate([_np_normalize(x.numpy()) for x in s], -1)  # (2, 6)
    cat_t = np.concatenate([_np_normalize(x.numpy()) for x in tt], -1)  # (2, 10)
    ws, bs = head.proj_s.weight.detach().numpy(), head.proj_s.bias.detach().numpy()
    wt, bt = head.proj_t.weight.detach().numpy(), head.proj_t.bias.detach().numpy()
    expected = np.mean((cat_s @ ws.T + bs - (cat_t @ wt.T + bt)) ** 2)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert head.proj_s.weight.grad.abs().sum() > 0 and head.proj_t.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="built for 2 layers"):
        head(s[:1], tt[:1])


def test_rail_kd_layerwise_head_matches_numpy_and_trains():
    torch.manual_seed(1)
    head = L.RailKDLayerwiseHead(n_layers=3, hidden_student=3, hidden_teacher=5, dim=4)
    s = [torch.randn(2, 3) for _ in range(3)]
    tt = [torch.randn(2, 5) for _ in range(3)]
    loss = head(s, tt)
    per_layer = []
    for i in range(3):
        ps, pt = head.projs_s[i], head.projs_t[i]
        u = _np_normalize(s[i].numpy() @ ps.weight.detach().numpy().T + ps.bias.detach().numpy())
        v = _np_normalize(tt[i].numpy() @ pt.weight.detach().numpy().T + pt.bias.detach().numpy())
        per_layer.append(np.mean((u - v) ** 2))
    assert loss.item() == pytest.approx(np.mean(per_layer), rel=1e-5)
    loss.backward()
    assert all(p.weight.grad.abs().sum() > 0 for p in list(head.projs_s) + list(head.projs_t))


def test_rail_kd_layerwise_identity_and_zero():
    x = [torch.randn(2, 4), torch.randn(2, 4)]
    scaled = [2.0 * v for v in x]  # same direction -> 0 after normalisation
    assert L.rail_kd_layerwise(x, scaled, [None, None], [None, None]).item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="same non-zero number"):
        L.rail_kd_layerwise(x, x[:1], [None], [None])
