"""The lora_ild term over a layer map: a group of teacher layers is averaged (per module), by hand."""

from __future__ import annotations

import pytest
import torch

from deltakd.losses.lora import LoraACapture
from deltakd.losses.terms import LossInputs, lora_ild

MODULES = ("query", "key", "value")


def _capture(per_layer: dict[int, list[torch.Tensor]]) -> LoraACapture:
    """A capture as ``capture_lora_a_outputs`` fills it: one output per (layer, module), model order."""
    names, outputs = [], {}
    for layer, feats in sorted(per_layer.items()):
        for module, f in zip(MODULES, feats):
            name = f"base_model.model.bert.encoder.layer.{layer}.attention.self.{module}.lora_A.default"
            names.append(name)
            outputs[name] = [f]
    cap = LoraACapture(names)
    cap.outputs.update(outputs)
    return cap


def _inputs(student: LoraACapture, teacher: LoraACapture, pairs, mask=None) -> LossInputs:
    return LossInputs(kind="classification", student=None, labels=torch.zeros(1), pairs=pairs,
                      student_lora=student, teacher_lora=teacher, mask=mask)


def _masked_mse(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> float:
    per_token = ((s - t) ** 2).mean(-1)  # (B, L)
    return float((per_token * mask).sum() / mask.sum())


def test_an_average_group_is_matched_with_the_mean_of_its_layers():
    g = torch.Generator().manual_seed(0)
    feats = lambda: [torch.randn(2, 3, 4, generator=g) for _ in MODULES]  # noqa: E731  (B 2, L 3, r 4)
    student = _capture({0: feats(), 1: feats()})
    teacher = _capture({j: feats() for j in range(4)})
    t_by = teacher.by_layer()
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    pairs = [(0, [0, 1]), (1, [2, 3])]
    got = float(lora_ild(_inputs(student, teacher, pairs, mask)))
    # by hand: per student layer and module, MSE against the mean of that module over the group
    s_by = student.by_layer()
    expected = sum(_masked_mse(s_by[i][m], (t_by[js[0]][m] + t_by[js[1]][m]) / 2, mask)
                   for i, js in pairs for m in range(len(MODULES))) / (len(pairs) * len(MODULES))
    assert got == pytest.approx(expected, rel=1e-6)
    first_only = sum(_masked_mse(s_by[i][m], t_by[js[0]][m], mask)
                     for i, js in pairs for m in range(len(MODULES))) / (len(pairs) * len(MODULES))
    assert abs(got - first_only) > 1e-3  # the old behaviour (first layer of each group) is a different number


def test_a_student_equal_to_its_group_mean_has_zero_loss_and_groups_of_one_are_plain_pairs():
    t = {j: [torch.full((1, 2, 3), float(10 * j + m)) for m in range(len(MODULES))] for j in range(3)}
    teacher = _capture(t)
    mean01 = [(t[0][m] + t[1][m]) / 2 for m in range(len(MODULES))]
    student = _capture({0: mean01, 1: t[2]})
    assert float(lora_ild(_inputs(student, teacher, [(0, [0, 1]), (1, [2])]))) == 0.0
    # a group of one is the teacher layer itself: student layer 1 (= teacher layer 2) against teacher layer 0
    diff = float(lora_ild(_inputs(student, teacher, [(1, [0])])))
    assert diff == pytest.approx(20.0 ** 2)


def test_teacher_layers_with_different_module_counts_are_refused():
    teacher = _capture({0: [torch.zeros(1, 2, 3)] * 3, 1: [torch.zeros(1, 2, 3)] * 2})
    student = _capture({0: [torch.zeros(1, 2, 3)] * 3})
    with pytest.raises(ValueError, match="different numbers of lora_A outputs"):
        lora_ild(_inputs(student, teacher, [(0, [0, 1])]))
