"""Metrics for act-controlled response generation.

Control accuracy (asked act == the act classifier's prediction), corpus BLEU against the
reference responses (sacrebleu; Papineni et al. 2002, Post 2018), distinct-n (Li et al. 2016:
unique n-grams / all n-grams over every generated response, whitespace tokens) and the share
of empty responses.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import DeltakdError, optional_import


def _same_length(a: Sequence[object], b: Sequence[object], what: str) -> None:
    if len(a) != len(b):
        raise DeltakdError(f"{what}: {len(a)} vs {len(b)} items; they must be aligned")
    if not a:
        raise DeltakdError(f"{what}: no items")


def control_accuracy(asked: Sequence[str], predicted: Sequence[str]) -> float:
    """Share of responses whose classified act equals the act they were asked for."""
    _same_length(asked, predicted, "control_accuracy")
    return sum(a == p for a, p in zip(asked, predicted)) / len(asked)


def require_sacrebleu() -> Any:
    """sacrebleu (the ``dialogue`` extra), imported on first use: BLEU is its only user."""
    return optional_import("sacrebleu", "BLEU (dialogue evaluation)")


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]],
                tokenize: str = "13a") -> float:
    """sacrebleu corpus BLEU (0-100) with its defaults (``exp`` smoothing, ``13a`` tokenisation).

    ``references`` holds one string per hypothesis, or per hypothesis a list of references
    (each hypothesis the same number).
    """
    sacrebleu = require_sacrebleu()
    _same_length(hypotheses, references, "corpus_bleu")
    if all(isinstance(r, str) for r in references):
        streams = [list(references)]
    else:
        counts = {len(r) for r in references}
        if len(counts) != 1 or 0 in counts:
            raise DeltakdError("corpus_bleu: every hypothesis needs the same number (>= 1) of references")
        streams = [list(s) for s in zip(*references)]
    return float(sacrebleu.corpus_bleu(list(hypotheses), streams, tokenize=tokenize).score)


def distinct_n(responses: Sequence[str], n: int) -> float:
    """Unique n-grams / total n-grams over all responses (whitespace tokens); 0.0 when there are none."""
    if n < 1:
        raise DeltakdError(f"distinct_n: n must be >= 1, got {n}")
    grams: list[tuple[str, ...]] = []
    for r in responses:
        toks = r.split()
        grams.extend(tuple(toks[i:i + n]) for i in range(len(toks) - n + 1))
    return len(set(grams)) / len(grams) if grams else 0.0


def empty_rate(responses: Sequence[str]) -> float:
    """Share of responses that are empty or whitespace only."""
    if not responses:
        raise DeltakdError("empty_rate: no responses")
    return sum(not r.strip() for r in responses) / len(responses)


def dialogue_metrics(responses: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]],
                     asked_acts: Sequence[str], predicted_acts: Sequence[str]) -> dict[str, float]:
    """All generation metrics in one dict.

    Keys: ``control_accuracy``, ``bleu``, ``distinct_1``, ``distinct_2``, ``empty_rate``, ``n``.
    ``predicted_acts`` are the act classifier's labels for ``responses``.
    """
    _same_length(responses, asked_acts, "dialogue_metrics: responses and asked_acts")
    return {
        "control_accuracy": control_accuracy(asked_acts, predicted_acts),
        "bleu": corpus_bleu(responses, references),
        "distinct_1": distinct_n(responses, 1),
        "distinct_2": distinct_n(responses, 2),
        "empty_rate": empty_rate(responses),
        "n": float(len(responses)),
    }
