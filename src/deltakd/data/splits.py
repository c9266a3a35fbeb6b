"""Splits: train/valid re-split, k-shot sampling, subsets. All seeded."""

from __future__ import annotations

import random
from collections import defaultdict

from sklearn.model_selection import train_test_split

from ..errors import DeltakdError
from .readers import Example


def resplit(train: list[Example], fraction: float, seed: int, stratify: bool) -> tuple[list[Example], list[Example]]:
    """Train -> (train, valid) in (1 - fraction) : fraction, stratified by label for classification."""
    idx = list(range(len(train)))
    labels = [ex["label"] for ex in train] if stratify else None
    try:
        tr, va = train_test_split(idx, test_size=fraction, random_state=seed, stratify=labels)
    except ValueError:  # a class too rare to stratify: fall back to a plain seeded split
        tr, va = train_test_split(idx, test_size=fraction, random_state=seed)
    return [train[i] for i in sorted(tr)], [train[i] for i in sorted(va)]


def k_shot(train: list[Example], k: int, per_class: bool, seed: int) -> list[Example]:
    """k examples per class (or k in total), sampled with ``seed``; original order kept."""
    rng = random.Random(seed)
    if not per_class:
        if k > len(train):
            raise DeltakdError(f"task.k_shot.k: {k} examples asked, the training split has {len(train)}")
        return [train[i] for i in sorted(rng.sample(range(len(train)), k))]
    by_class: dict[str, list[int]] = defaultdict(list)
    for i, ex in enumerate(train):
        by_class[ex["label"]].append(i)
    chosen: list[int] = []
    for label in sorted(by_class):
        pool = by_class[label]
        if k > len(pool):
            raise DeltakdError(f"task.k_shot.k: {k} per class asked, class {label!r} has {len(pool)} examples")
        chosen.extend(rng.sample(pool, k))
    return [train[i] for i in sorted(chosen)]


def subset(examples: list[Example], n: int, seed: int) -> list[Example]:
    if n >= len(examples):
        return examples
    rng = random.Random(seed)
    return [examples[i] for i in sorted(rng.sample(range(len(examples)), n))]
