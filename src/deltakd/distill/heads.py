"""Learned projections some distillation losses need; trained with the student, then dropped.

- RAIL-KD_c (Haidar et al. 2022): one projection of the student's concatenated, L2-normalised
  pooled layers (k*Hs) onto the teacher's concatenation (k*Ht).
- RAIL-KD_l: one projection per selected layer (Hs -> Ht), L2-normalised after projecting.
- Hidden-state MSE / cosine between models of different widths: one Hs -> Ht projection per
  student layer.

Only the student side is projected: the teacher's vectors are fixed targets, so the loss has no
trivial zero (projecting both sides lets both projections collapse to 0). Square projections
start as the identity, so a student copied from its teacher starts at a meaningful loss.
"""

from __future__ import annotations

from torch import nn


def _projection(d_in: int, d_out: int) -> nn.Linear:
    proj = nn.Linear(d_in, d_out)
    if d_in == d_out:
        nn.init.eye_(proj.weight)
        nn.init.zeros_(proj.bias)
    return proj


class DistillHeads(nn.Module):
    """The projections of one distillation run; empty when no active loss needs one."""

    def __init__(self, hidden_student: int, hidden_teacher: int, n_pairs: int, rail_c: bool = False,
                 rail_l: bool = False, hidden_layers: list[int] | tuple[int, ...] = ()) -> None:
        super().__init__()
        self.rail_c = _projection(n_pairs * hidden_student, n_pairs * hidden_teacher) if rail_c else None
        self.rail_l = nn.ModuleList(_projection(hidden_student, hidden_teacher) for _ in range(n_pairs)) \
            if rail_l else None
        widths_differ = hidden_student != hidden_teacher
        self.hidden = nn.ModuleDict({str(i): _projection(hidden_student, hidden_teacher) for i in hidden_layers}) \
            if widths_differ and hidden_layers else None

    def hidden_proj(self, student_layer: int) -> nn.Module | None:
        """The Hs -> Ht projection of a student layer, or None when the widths agree."""
        return None if self.hidden is None else self.hidden[str(student_layer)]

    @property
    def empty(self) -> bool:
        return not any(True for _ in self.parameters())
