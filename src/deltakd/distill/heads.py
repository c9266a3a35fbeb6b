"""Learned projections some distillation losses need; trained with the student, then dropped.

- RAIL-KD_c (Haidar et al. 2022): one projection of the student's concatenated, L2-normalised
  pooled layers (k*Hs) onto the teacher's concatenation (k*Ht), or, with ``distill.rail_dim`` D,
  onto a D-wide projection of it.
- RAIL-KD_l: one projection per selected layer (Hs -> Ht, or Hs -> D with ``rail_dim``),
  L2-normalised after projecting.
- Hidden-state MSE / cosine between models of different widths: one Hs -> Ht projection per
  student layer.

Only the student side is learned: the teacher's vectors are fixed targets, so the loss has no
trivial zero (learning both sides lets both projections collapse onto one constant). With
``rail_dim`` the teacher side is projected too, by a fixed (never trained) random projection with
orthonormal rows (columns when D is the wider side), drawn from the run's seed; it is a buffer, saved
and resumed with the heads. Square projections start as the identity, and a student projection as
wide as the teacher's starts as the teacher's fixed projection, so a student copied from its teacher
starts at a meaningful loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _projection(d_in: int, d_out: int, like: FixedProjection | None = None) -> nn.Linear:
    proj = nn.Linear(d_in, d_out)
    if like is not None and like.weight.shape == proj.weight.shape:
        with torch.no_grad():
            proj.weight.copy_(like.weight)
        nn.init.zeros_(proj.bias)
    elif d_in == d_out:
        nn.init.eye_(proj.weight)
        nn.init.zeros_(proj.bias)
    return proj


class FixedProjection(nn.Module):
    """``x @ W.T`` with a fixed random ``W`` (d_out, d_in) of orthonormal rows (or columns), no gradient."""

    def __init__(self, d_in: int, d_out: int, generator: torch.Generator) -> None:
        super().__init__()
        weight = torch.empty(d_out, d_in)
        nn.init.orthogonal_(weight, generator=generator)
        self.register_buffer("weight", weight)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype))  # (..., d_in) -> (..., d_out)


class DistillHeads(nn.Module):
    """The projections of one distillation run; empty when no active loss needs one.

    ``rail_dim``: the width RAIL-KD compares at (None: the teacher's, k*Ht for rail_c, Ht for
    rail_l, with no teacher projection); ``seed`` draws the fixed teacher projections.
    """

    def __init__(self, hidden_student: int, hidden_teacher: int, n_pairs: int, rail_c: bool = False,
                 rail_l: bool = False, hidden_layers: list[int] | tuple[int, ...] = (),
                 rail_dim: int | None = None, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(int(seed))
        self.rail_c = self.rail_c_teacher = None
        self.rail_l = self.rail_l_teacher = None
        if rail_c:
            t_width = n_pairs * hidden_teacher
            self.rail_c_teacher = _fixed(t_width, rail_dim, gen)
            self.rail_c = _projection(n_pairs * hidden_student, rail_dim or t_width, self.rail_c_teacher)
        if rail_l:
            teachers = [_fixed(hidden_teacher, rail_dim, gen) for _ in range(n_pairs)]
            self.rail_l_teacher = nn.ModuleList(teachers) if rail_dim not in (None, hidden_teacher) else None
            self.rail_l = nn.ModuleList(_projection(hidden_student, rail_dim or hidden_teacher, t) for t in teachers)
        widths_differ = hidden_student != hidden_teacher
        self.hidden = nn.ModuleDict({str(i): _projection(hidden_student, hidden_teacher) for i in hidden_layers}) \
            if widths_differ and hidden_layers else None

    def hidden_proj(self, student_layer: int) -> nn.Module | None:
        """The Hs -> Ht projection of a student layer, or None when the widths agree."""
        return None if self.hidden is None else self.hidden[str(student_layer)]

    def rail_c_target(self) -> nn.Module:
        """The teacher side of RAIL-KD_c: the fixed projection to ``rail_dim``, or the identity."""
        return self.rail_c_teacher if self.rail_c_teacher is not None else nn.Identity()

    def rail_l_targets(self) -> list[nn.Module | None]:
        """The teacher side of RAIL-KD_l, per pair: fixed projections to ``rail_dim``, or None (identity)."""
        if self.rail_l_teacher is not None:
            return list(self.rail_l_teacher)
        return [None] * (len(self.rail_l) if self.rail_l is not None else 0)

    @property
    def empty(self) -> bool:
        return not any(True for _ in self.parameters())


def _fixed(d_in: int, rail_dim: int | None, generator: torch.Generator) -> FixedProjection | None:
    """The teacher's fixed projection to ``rail_dim``, or None when there is none (no rail_dim, or the
    teacher already has that width)."""
    return None if rail_dim is None or rail_dim == d_in else FixedProjection(d_in, rail_dim, generator)
