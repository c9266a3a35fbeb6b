"""Layer maps: each mode, resampling, reproducibility, validation messages."""

from __future__ import annotations

import pytest

from deltakd.distill.layer_map import LayerMap, LayerMapError
from deltakd.errors import DeltakdError


def test_fixed_map_sorted_and_constant():
    lm = LayerMap.build("fixed", n_student=3, n_teacher=12, spec={2: 11, 0: 3, 1: 7})
    expected = [(0, [3]), (1, [7]), (2, [11])]
    assert lm.select(0, 0) == expected
    assert lm.select(step=999, epoch=5) == expected
    assert not lm.is_random


def test_fixed_map_accepts_list_and_string_keys():
    assert LayerMap.build("fixed", 2, 4, [1, 3]).select(0, 0) == [(0, [1]), (1, [3])]
    assert LayerMap.build("fixed", 2, 4, {"1": 3}).select(0, 0) == [(1, [3])]


def test_average_map_groups():
    groups = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    lm = LayerMap.build("average", n_student=3, n_teacher=12, spec=groups)
    assert lm.select(3, 1) == [(0, [0, 1, 2, 3]), (1, [4, 5, 6, 7]), (2, [8, 9, 10, 11])]
    assert LayerMap.build("average", 6, 12, {5: [10, 11]}).select(0, 0) == [(5, [10, 11])]


def test_random_changes_between_steps_sorted_distinct_and_reproducible():
    lm = LayerMap.build("random", n_student=3, n_teacher=12, k=3, seed=7)
    draws = [lm.select(step, 0) for step in range(20)]
    for sel in draws:
        assert [s for s, _ in sel] == [0, 1, 2]
        teachers = [ts[0] for _, ts in sel]
        assert teachers == sorted(teachers) and len(set(teachers)) == 3
        assert all(0 <= x < 12 for x in teachers)
    assert len({tuple(ts[0] for _, ts in sel) for sel in draws}) > 5  # varies with the step
    again = LayerMap.build("random", n_student=3, n_teacher=12, k=3, seed=7)
    assert [again.select(step, 0) for step in range(20)] == draws  # same seed -> same draws
    assert lm.select(5, 0) == lm.select(5, 3)  # epoch is irrelevant in per-step mode
    other_seed = LayerMap.build("random", n_student=3, n_teacher=12, k=3, seed=8)
    assert [other_seed.select(step, 0) for step in range(20)] != draws


def test_random_epoch_constant_within_epoch_changes_across():
    lm = LayerMap.build("random_epoch", n_student=4, n_teacher=12, seed=1)
    assert lm.k == 4
    for epoch in range(5):
        assert len({str(lm.select(step, epoch)) for step in range(10)}) == 1
    assert len({str(lm.select(0, epoch)) for epoch in range(10)}) > 1
    again = LayerMap.build("random_epoch", n_student=4, n_teacher=12, seed=1)
    assert [again.select(0, e) for e in range(10)] == [lm.select(0, e) for e in range(10)]


def test_random_with_explicit_student_layers():
    lm = LayerMap.build("random", n_student=6, n_teacher=12, spec=[1, 3, 5], k=3)
    assert [s for s, _ in lm.select(0, 0)] == [1, 3, 5]


def test_random_k_equal_teacher_layers_takes_all():
    lm = LayerMap.build("random", n_student=4, n_teacher=4)
    assert lm.select(123, 0) == [(0, [0]), (1, [1]), (2, [2]), (3, [3])]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(mode="fixed", spec={0: 12}), r"layer_map\.fixed: teacher layer 12 out of range 0\.\.11"),
        (dict(mode="fixed", spec={3: 0}), r"layer_map\.fixed: student layer 3 out of range 0\.\.2"),
        (dict(mode="fixed", spec={-1: 0}), r"student layer -1 out of range 0\.\.2"),
        (dict(mode="fixed", spec={0: 1.5}), r"teacher layer 1\.5 is not an integer"),
        (dict(mode="fixed", spec={}), r"empty"),
        (dict(mode="average", spec=[[0, 1], [2, 13]]), r"layer_map\.average: teacher layer 13 out of range 0\.\.11"),
        (dict(mode="average", spec=[[0], [1], [2], [3]]), r"student layer 3 out of range 0\.\.2"),
        (dict(mode="average", spec=[[0], []]), r"non-empty list"),
        (dict(mode="average", spec=[[0, 0]]), r"repeats a teacher layer"),
        (dict(mode="random", k=13, spec=[0, 1, 2]), r"k=13 out of range 1\.\.12"),
        (dict(mode="random", k=2), r"k=2 differs from the 3 student layers"),
        (dict(mode="random", spec=[0, 5]), r"layer_map\.random: student layer 5 out of range 0\.\.2"),
        (dict(mode="random_epoch", spec=[2, 1]), r"distinct and increasing"),
        (dict(mode="shuffle"), r"'shuffle' is not one of fixed, average, random, random_epoch"),
    ],
)
def test_validation_errors(kwargs, message):
    mode = kwargs.pop("mode")
    with pytest.raises(LayerMapError, match=message) as info:
        LayerMap.build(mode, n_student=3, n_teacher=12, **kwargs)
    assert isinstance(info.value, ValueError) and isinstance(info.value, DeltakdError)


def test_layer_map_is_frozen():
    lm = LayerMap.build("fixed", 1, 2, {0: 1})
    with pytest.raises(AttributeError):
        lm.seed = 3  # type: ignore[misc]
