"""Recipe task sections with ``dialogue:`` options -> DailyDialog data for each task kind."""

from __future__ import annotations

import pytest

from deltakd.data import load_task
from deltakd.data.dailydialog import ACTS
from deltakd.data.dailydialog_tasks import dialogue_format, lm_texts, response_split
from deltakd.errors import DeltakdError
from deltakd.recipe.schema import TaskConfig

from .conftest import SAMPLE


def _cfg(**kw) -> TaskConfig:
    return TaskConfig(name="dd", data_dir=SAMPLE, **kw)


def test_act_classification_task_has_every_utterance_with_its_act(sample_train):
    task = load_task(_cfg(dialogue={}), seed=0)
    assert task.labels == ACTS and task.spec.metrics == ("accuracy", "f1")
    assert len(task.splits["train"]) == 1959 == sum(map(len, sample_train))
    first = sample_train[0][0]
    assert task.splits["train"][0] == {"text_a": " ".join(first.text.split()), "text_b": None,
                                       "label": ACTS.index(first.act)}
    small = load_task(_cfg(dialogue={"max_dialogues": 5, "max_eval_dialogues": 2}), seed=0)
    assert len(small.splits["train"]) == sum(len(d) for d in sample_train[:5])
    assert len(small.splits["valid"]) < len(task.splits["valid"])


def test_response_examples_and_lm_text_of_a_split(sample_train):
    cfg = _cfg(kind="dialogue", dialogue={"context_turns": 2, "max_dialogues": 3})
    exs = response_split(cfg, "train")
    assert len(exs) == sum(len(d) - 1 for d in sample_train[:3])
    assert exs[2].context == (sample_train[0][1].text, sample_train[0][2].text)
    assert exs[2].response == sample_train[0][3].text and exs[2].act == sample_train[0][3].act
    texts = lm_texts(cfg)
    assert texts["train"] == [t.text for d in sample_train[:3] for t in d]
    assert len(response_split(_cfg(kind="dialogue"), "train")) == 1959 - 240


def test_dialogue_options_are_checked():
    assert _cfg(kind="dialogue").dialogue.act_position == "first"  # defaults filled in
    with pytest.raises(ValueError, match="task.dialogue: give task.data_dir"):
        TaskConfig(name="dd", train_file="x.txt", dialogue={})
    with pytest.raises(DeltakdError, match="62 \\+ 4 virtual tokens exceeds the model's 64 positions"):
        dialogue_format(_cfg(kind="dialogue", max_length=62), 4, 64)
    with pytest.raises(DeltakdError, match="max_response_tokens: 40 .* does not fit task.max_length 32"):
        dialogue_format(_cfg(kind="dialogue", max_length=32, dialogue={"max_response_tokens": 40}))
    with pytest.raises(DeltakdError, match=r"task.metrics: \['perplexity'\] do not apply"):
        load_task(_cfg(dialogue={}, metrics=["perplexity"]), seed=0)
    with pytest.raises(DeltakdError, match="not regression"):
        load_task(_cfg(kind="regression", dialogue={}), seed=0)
    with pytest.raises(DeltakdError, match="DailyDialog file .* does not exist"):
        load_task(TaskConfig(name="dd", data_dir=SAMPLE.parent, dialogue={}), seed=0)
