"""RAIL-KD projections follow distill.rail_dim: shapes, the fixed teacher side, the terms by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deltakd.distill.heads import DistillHeads
from deltakd.losses.terms import LossInputs, rail_c, rail_l


def test_rail_dim_sets_the_width_of_both_sides():
    heads = DistillHeads(32, 48, 3, rail_c=True, rail_l=True, rail_dim=16, seed=1)
    assert heads.rail_c.weight.shape == (16, 3 * 32)
    assert heads.rail_c_target().weight.shape == (16, 3 * 48)
    assert [tuple(p.weight.shape) for p in heads.rail_l] == [(16, 32)] * 3
    assert [tuple(t.weight.shape) for t in heads.rail_l_targets()] == [(16, 48)] * 3
    # the teacher side is fixed: a buffer (saved with the heads), not a parameter (never trained)
    params = dict(heads.named_parameters())
    assert set(params) == {"rail_c.weight", "rail_c.bias", *(f"rail_l.{i}.{w}" for i in range(3) for w in ("weight", "bias"))}
    assert {"rail_c_teacher.weight", "rail_l_teacher.0.weight"} <= set(heads.state_dict())
    w = heads.rail_c_target().weight  # (16, 144): orthonormal rows
    assert torch.allclose(w @ w.T, torch.eye(16), atol=1e-5)


def test_without_rail_dim_the_student_projects_onto_the_teacher_width():
    heads = DistillHeads(32, 48, 3, rail_c=True, rail_l=True)
    assert heads.rail_c.weight.shape == (3 * 48, 3 * 32)
    assert heads.rail_c_teacher is None and heads.rail_l_teacher is None
    assert heads.rail_l_targets() == [None] * 3
    same = DistillHeads(32, 32, 2, rail_c=True, rail_dim=64)  # rail_dim = the teacher concat's width: no projection
    assert same.rail_c_teacher is None and torch.equal(same.rail_c.weight, torch.eye(64))


def test_teacher_projections_are_drawn_from_the_seed():
    a, b = (DistillHeads(8, 8, 2, rail_c=True, rail_l=True, rail_dim=4, seed=7) for _ in range(2))
    c = DistillHeads(8, 8, 2, rail_c=True, rail_l=True, rail_dim=4, seed=8)
    for key in ("rail_c_teacher.weight", "rail_l_teacher.0.weight", "rail_l_teacher.1.weight"):
        assert torch.equal(a.state_dict()[key], b.state_dict()[key])
        assert not torch.equal(a.state_dict()[key], c.state_dict()[key])
    # a student as wide as its teacher starts with the teacher's projection (a copied student starts near 0)
    assert torch.equal(a.rail_c.weight, a.rail_c_teacher.weight) and not a.rail_c.bias.any()
    assert torch.equal(a.rail_l[1].weight, a.rail_l_teacher[1].weight)


def _pooled_inputs(s_layers, t_layers, heads):
    """LossInputs whose pooled views are the given (B, H) vectors (mean pool over one unmasked token)."""
    B = s_layers[0].shape[0]
    student = type("S", (), {"hidden_states": [None] + [x[:, None, :] for x in s_layers]})()
    pooled = torch.stack([torch.zeros_like(t_layers[0])] + list(t_layers), dim=1)  # (B, n+1, Ht): the cache's view
    return LossInputs(kind="classification", student=student, labels=torch.zeros(B), teacher_pooled=pooled,
                      mask=torch.ones(B, 1), pairs=[(i, [i]) for i in range(len(s_layers))], heads=heads)


@torch.no_grad()
def test_the_terms_compare_at_rail_dim_by_hand():
    g = torch.Generator().manual_seed(0)
    s = [torch.randn(4, 6, generator=g) for _ in range(2)]  # B 4, Hs 6
    t = [torch.randn(4, 10, generator=g) for _ in range(2)]  # Ht 10
    heads = DistillHeads(6, 10, 2, rail_c=True, rail_l=True, rail_dim=3, seed=2)
    x = _pooled_inputs(s, t, heads)
    cat_s = torch.cat([F.normalize(v, dim=-1) for v in s], -1)  # (4, 12)
    cat_t = torch.cat([F.normalize(v, dim=-1) for v in t], -1)  # (4, 20)
    wt = heads.rail_c_teacher.weight  # (3, 20)
    expected_c = ((heads.rail_c(cat_s) - cat_t @ wt.T) ** 2).mean()
    assert float(rail_c(x)) == pytest.approx(float(expected_c), rel=1e-6)
    expected_l = torch.stack([
        ((F.normalize(heads.rail_l[i](s[i]), dim=-1) - F.normalize(t[i] @ heads.rail_l_teacher[i].weight.T, dim=-1)) ** 2)
        .mean() for i in range(2)]).mean()
    assert float(rail_l(x)) == pytest.approx(float(expected_l), rel=1e-6)
    # identical students and teachers of one width start at zero (the student starts with the fixed projection)
    same = DistillHeads(10, 10, 2, rail_c=True, rail_l=True, rail_dim=3, seed=2)
    x_same = _pooled_inputs(t, t, same)
    assert float(rail_c(x_same)) == pytest.approx(0.0, abs=1e-12)
    assert float(rail_l(x_same)) == pytest.approx(0.0, abs=1e-12)
