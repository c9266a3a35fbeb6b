from __future__ import annotations

import math
import sys

import pytest

from deltakd.dialogue.metrics import control_accuracy, corpus_bleu, dialogue_metrics, distinct_n, empty_rate
from deltakd.errors import DeltakdError

HYPS = ["the cat sat on the mat today", "a dog runs in the park"]
REFS = ["the cat sat on the mat", "a dog runs in a park"]


def test_distinct_n_hand_computed():
    responses = ["a b a", "a b c", ""]
    # unigrams a b a a b c: 3 unique of 6; bigrams (a b) (b a) (a b) (b c): 3 unique of 4
    assert distinct_n(responses, 1) == pytest.approx(3 / 6)
    assert distinct_n(responses, 2) == pytest.approx(3 / 4)
    assert distinct_n(responses, 3) == pytest.approx(2 / 2)  # (a b a) (a b c): n-grams never cross responses
    assert distinct_n(["", "one"], 2) == 0.0
    with pytest.raises(DeltakdError):
        distinct_n(responses, 0)


def test_control_accuracy_and_empty_rate_hand_computed():
    asked = ["inform", "question", "directive", "question"]
    assert control_accuracy(asked, ["inform", "inform", "directive", "commissive"]) == 0.5
    assert empty_rate(["", "  ", "x", "y"]) == 0.5
    with pytest.raises(DeltakdError, match="4 vs 3"):
        control_accuracy(asked, ["inform"] * 3)


def test_bleu_perfect_disjoint_and_hand_computed():
    pytest.importorskip("sacrebleu")
    assert corpus_bleu(REFS, REFS) == pytest.approx(100.0)
    assert corpus_bleu(["one two three four five"], ["six seven eight nine ten"]) == 0.0
    # clipped n-gram matches / totals over both sentences (no punctuation: 13a keeps the words);
    # hypotheses are 13 tokens vs 12 in the references, so no brevity penalty
    p = [(6 + 5) / (7 + 6), (5 + 3) / (6 + 5), (4 + 2) / (5 + 4), (3 + 1) / (4 + 3)]
    assert corpus_bleu(HYPS, REFS) == pytest.approx(100 * math.exp(sum(map(math.log, p)) / 4))


def test_bleu_equals_sacrebleu_and_takes_several_references():
    sacrebleu = pytest.importorskip("sacrebleu")
    hyps = ["Yes , I'd love to .", "What time is it now ?"]
    refs = ["Sure , I'd love to come .", "What time is it ?"]
    assert corpus_bleu(hyps, refs) == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    alt = ["Yes , I would love to .", "Do you know what time it is ?"]
    assert corpus_bleu(hyps, list(zip(refs, alt))) == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs, alt]).score)
    assert corpus_bleu(hyps, [[r] for r in refs]) == pytest.approx(corpus_bleu(hyps, refs))


def test_dialogue_metrics_combines_all():
    pytest.importorskip("sacrebleu")
    m = dialogue_metrics(HYPS + [""], REFS + ["Fine ."], ["inform", "question", "inform"],
                         ["inform", "inform", "inform"])
    assert set(m) == {"control_accuracy", "bleu", "distinct_1", "distinct_2", "empty_rate", "n"}
    assert m["control_accuracy"] == pytest.approx(2 / 3) and m["empty_rate"] == pytest.approx(1 / 3)
    assert m["distinct_1"] == pytest.approx(distinct_n(HYPS, 1)) and m["n"] == 3
    assert 0 < m["bleu"] < 100


def test_bleu_without_sacrebleu_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sacrebleu", None)  # import sacrebleu -> ModuleNotFoundError
    with pytest.raises(DeltakdError, match=r"^BLEU \(dialogue evaluation\) needs sacrebleu: pip install 'deltakd\[dialogue\]'$"):
        corpus_bleu(HYPS, REFS)
