"""Which teacher layers each student layer is distilled from.

Layer indices are 0-based transformer blocks: layer ``i`` is the output of block ``i``, i.e.
``hidden_states[i + 1]`` of an HF model called with ``output_hidden_states=True`` (index 0 there
is the embeddings).

Modes:

- ``fixed``: ``{student_layer: teacher_layer}`` (or a list, entry i for student layer i).
- ``average``: student layer i <-> the mean of teacher layers ``groups[i]``
  (``[[0, 1, 2, 3], [4, 5, 6, 7], ...]``; or a dict ``{student_layer: [teacher layers]}``).
- ``random``: ``k`` distinct teacher layers drawn afresh every optimizer step, sorted, paired in
  order with the student layers (RAIL-KD, Haidar et al. 2022).
- ``random_epoch``: like ``random`` but drawn once per epoch.

Draws come from ``random.Random`` seeded with a string built from (seed, step) or (seed, epoch),
so a resumed run draws the same layers at the same step.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from deltakd.errors import DeltakdError

__all__ = ["LayerMap", "LayerMapError", "LayerMapMode", "MODES"]

LayerMapMode = Literal["fixed", "average", "random", "random_epoch"]
MODES: tuple[str, ...] = ("fixed", "average", "random", "random_epoch")


class LayerMapError(DeltakdError, ValueError):
    """A layer map that does not fit the models (bad index, bad k, bad spec shape)."""


def _as_index(mode: str, what: str, value: Any) -> int:
    if isinstance(value, bool):
        raise LayerMapError(f"layer_map.{mode}: {what} layer {value!r} is not an integer")
    try:
        index = int(value)
    except (TypeError, ValueError):
        raise LayerMapError(f"layer_map.{mode}: {what} layer {value!r} is not an integer") from None
    if index != value and not isinstance(value, str):
        raise LayerMapError(f"layer_map.{mode}: {what} layer {value!r} is not an integer")
    return index


def _check_range(mode: str, what: str, index: int, n_layers: int) -> None:
    if not 0 <= index < n_layers:
        raise LayerMapError(f"layer_map.{mode}: {what} layer {index} out of range 0..{n_layers - 1}")


@dataclass(frozen=True)
class LayerMap:
    """A validated student -> teacher layer map. Build with :meth:`LayerMap.build`.

    ``pairs`` holds the static pairs of ``fixed``/``average``; for the random modes
    ``student_layers`` lists the student layers that receive the k sorted draws, in order.
    """

    mode: LayerMapMode
    n_student: int
    n_teacher: int
    pairs: tuple[tuple[int, tuple[int, ...]], ...] = ()
    student_layers: tuple[int, ...] = ()
    k: int | None = None
    seed: int = 0

    @classmethod
    def build(
        cls,
        mode: str,
        n_student: int,
        n_teacher: int,
        spec: Mapping[Any, Any] | Sequence[Any] | None = None,
        k: int | None = None,
        seed: int = 0,
    ) -> LayerMap:
        """Validate ``spec`` against the real layer counts and return the map.

        ``spec``: ``fixed`` -> ``{s: t}`` or ``[t0, t1, ...]``; ``average`` -> ``[[t...], ...]`` or
        ``{s: [t...]}``; ``random``/``random_epoch`` -> optional list of student layers (default:
        all student layers), ``k`` defaults to their number and must equal it.
        """
        if mode not in MODES:
            raise LayerMapError(f"layer_map.mode: {mode!r} is not one of {', '.join(MODES)}")
        if n_student < 1 or n_teacher < 1:
            raise LayerMapError(
                f"layer_map.{mode}: need at least one layer, got {n_student} student / {n_teacher} teacher"
            )
        if mode == "fixed":
            return cls(mode, n_student, n_teacher, pairs=_fixed_pairs(spec, n_student, n_teacher), seed=seed)
        if mode == "average":
            return cls(mode, n_student, n_teacher, pairs=_average_pairs(spec, n_student, n_teacher), seed=seed)
        return _random_map(mode, n_student, n_teacher, spec, k, seed)

    def select(self, step: int = 0, epoch: int = 0) -> list[tuple[int, list[int]]]:
        """Pairs ``(student_layer, [teacher_layers])`` to distil at this optimizer step / epoch.

        ``fixed`` gives one teacher layer per pair, ``average`` the group to average, the random
        modes one sorted draw per pair. Deterministic in (seed, step) resp. (seed, epoch).
        """
        if self.mode in ("fixed", "average"):
            return [(s, list(ts)) for s, ts in self.pairs]
        assert self.k is not None
        key = f"{self.seed}:step:{int(step)}" if self.mode == "random" else f"{self.seed}:epoch:{int(epoch)}"
        drawn = sorted(random.Random(key).sample(range(self.n_teacher), self.k))
        return [(s, [t]) for s, t in zip(self.student_layers, drawn)]

    @property
    def is_random(self) -> bool:
        return self.mode in ("random", "random_epoch")


def _fixed_pairs(spec: Any, n_student: int, n_teacher: int) -> tuple[tuple[int, tuple[int, ...]], ...]:
    if isinstance(spec, Mapping):
        items = list(spec.items())
    elif isinstance(spec, Sequence) and not isinstance(spec, str):
        items = list(enumerate(spec))
    else:
        raise LayerMapError(f"layer_map.fixed: expected a mapping {{student: teacher}}, got {spec!r}")
    if not items:
        raise LayerMapError("layer_map.fixed: the map is empty")
    pairs: dict[int, tuple[int, ...]] = {}
    for s_raw, t_raw in items:
        s = _as_index("fixed", "student", s_raw)
        t = _as_index("fixed", "teacher", t_raw)
        _check_range("fixed", "student", s, n_student)
        _check_range("fixed", "teacher", t, n_teacher)
        if s in pairs:
            raise LayerMapError(f"layer_map.fixed: student layer {s} mapped twice")
        pairs[s] = (t,)
    return tuple(sorted(pairs.items()))


def _average_pairs(spec: Any, n_student: int, n_teacher: int) -> tuple[tuple[int, tuple[int, ...]], ...]:
    if isinstance(spec, Mapping):
        items = list(spec.items())
    elif isinstance(spec, Sequence) and not isinstance(spec, str):
        items = list(enumerate(spec))
    else:
        raise LayerMapError(f"layer_map.average: expected a list of teacher layer groups, got {spec!r}")
    if not items:
        raise LayerMapError("layer_map.average: no groups given")
    pairs: dict[int, tuple[int, ...]] = {}
    for s_raw, group in items:
        s = _as_index("average", "student", s_raw)
        _check_range("average", "student", s, n_student)
        if s in pairs:
            raise LayerMapError(f"layer_map.average: student layer {s} mapped twice")
        if isinstance(group, (str, bytes)) or not isinstance(group, Sequence) or len(group) == 0:
            raise LayerMapError(
                f"layer_map.average: group for student layer {s} must be a non-empty list, got {group!r}"
            )
        ts = tuple(_as_index("average", "teacher", t) for t in group)
        for t in ts:
            _check_range("average", "teacher", t, n_teacher)
        if len(set(ts)) != len(ts):
            raise LayerMapError(f"layer_map.average: group for student layer {s} repeats a teacher layer: {list(ts)}")
        pairs[s] = ts
    return tuple(sorted(pairs.items()))


def _random_map(mode: str, n_student: int, n_teacher: int, spec: Any, k: int | None, seed: int) -> LayerMap:
    if spec is None:
        if k is not None and k != n_student:
            raise LayerMapError(
                f"layer_map.{mode}: k={k} differs from the {n_student} student layers; "
                f"list the {k} student layers to pair explicitly"
            )
        student_layers = tuple(range(n_student))
    else:
        if isinstance(spec, (str, bytes, Mapping)) or not isinstance(spec, Sequence):
            raise LayerMapError(f"layer_map.{mode}: expected a list of student layers, got {spec!r}")
        student_layers = tuple(_as_index(mode, "student", s) for s in spec)
        for s in student_layers:
            _check_range(mode, "student", s, n_student)
        if len(set(student_layers)) != len(student_layers) or list(student_layers) != sorted(student_layers):
            raise LayerMapError(
                f"layer_map.{mode}: student layers must be distinct and increasing, got {list(student_layers)}"
            )
    if k is None:
        k = len(student_layers)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n_teacher:
        raise LayerMapError(f"layer_map.{mode}: k={k!r} out of range 1..{n_teacher} (teacher layers)")
    if k != len(student_layers):
        raise LayerMapError(f"layer_map.{mode}: k={k} but {len(student_layers)} student layers listed")
    return LayerMap(mode, n_student, n_teacher, student_layers=student_layers, k=k, seed=seed)  # type: ignore[arg-type]
