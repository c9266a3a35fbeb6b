"""Issue 22: long examples dropped or truncated (``task.dialogue.long_examples``), the emotion as the
control signal (``task.dialogue.control``), and every dialogue recipe validating (DialoGPT included)."""

from __future__ import annotations

from collections import Counter

import pytest
import yaml
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import PreTrainedTokenizerFast

from deltakd.data import load_task
from deltakd.data.dailydialog import (
    ACTS,
    EMOTIONS,
    IGNORE_INDEX,
    DialogueFormat,
    ResponseExample,
    act_token,
    drop_long_examples,
    encode_generation_prompts,
    encode_response_example,
    encode_response_examples,
    full_lengths,
    utterance_examples,
)
from deltakd.data.dailydialog_tasks import dialogue_format, response_split
from deltakd.errors import DeltakdError
from deltakd.recipe.schema import TaskConfig

from ..conftest import ROOT, SHARED_DATA
from .conftest import SAMPLE

EOS = "<eos>"
WORDS = [*"abcdefghijk", "question", "inform", "happiness", "sadness", "no_emotion"]


def _word_tokenizer(added: list[str] = ()) -> PreTrainedTokenizerFast:
    """One token per whitespace word, so example lengths can be counted by hand."""
    vocab = {w: i for i, w in enumerate([EOS, "<unk>", *WORDS])}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS, unk_token="<unk>")
    out.add_tokens(list(added), special_tokens=True)
    return out


@pytest.fixture()
def words() -> PreTrainedTokenizerFast:
    return _word_tokenizer()


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


# three examples whose lengths are counted by hand (act first: act + eos, each turn + eos, response + eos)
HAND = [
    ResponseExample("question", ("a b c", "d e"), "f g h", "happiness"),  # 2 + 4 + 3 + 4 = 13
    ResponseExample("inform", ("a",), "b c", "no_emotion"),                # 2 + 2 + 3 = 7
    ResponseExample("inform", ("a b c d e f", "g h i"), "j k", "sadness"),  # 2 + 7 + 4 + 3 = 16
]


def test_full_lengths_and_drop_match_a_hand_count(words):
    fmt = DialogueFormat("first", max_length=13, max_response_tokens=8)
    assert full_lengths(HAND, words, fmt) == [13, 7, 16]
    assert drop_long_examples(HAND, words, fmt) == HAND[:2]  # 16 > 13; 13 fits exactly
    assert drop_long_examples(HAND, words, DialogueFormat("first", max_length=12, max_response_tokens=8)) == [HAND[1]]
    # the act opening the response has no eos of its own: one token shorter each
    opens = DialogueFormat("opens_response", max_length=12, max_response_tokens=8)
    assert full_lengths(HAND, words, opens) == [12, 6, 15]
    assert drop_long_examples(HAND, words, opens) == HAND[:2]
    # a kept example is encoded whole; truncation (the default) keeps the long one, cut to max_length
    kept = encode_response_examples(HAND, words, fmt)
    assert [len(r["input_ids"]) for r in kept] == [13, 7, 9]  # the whole oldest turn (7) goes
    whole = encode_response_example(HAND[0], words, fmt)["input_ids"]
    eos = words.eos_token_id
    assert whole == _ids(words, "question") + [eos] + _ids(words, "a b c") + [eos] + _ids(words, "d e") + [eos] + \
        _ids(words, "f g h") + [eos]
    cut = kept[2]["input_ids"]  # the oldest turn went: act, newest turn, response
    assert cut == _ids(words, "inform") + [eos] + _ids(words, "g h i") + [eos] + _ids(words, "j k") + [eos]


def test_emotion_control_puts_the_emotion_where_the_act_was(words):
    eos = words.eos_token_id
    fmt = DialogueFormat("first", max_length=32, max_response_tokens=8, control="emotion")
    row = encode_response_example(HAND[0], words, fmt)
    assert row["input_ids"][:2] == _ids(words, "happiness") + [eos]
    assert _ids(words, "question")[0] not in row["input_ids"]
    assert row["labels"] == [IGNORE_INDEX] * 9 + _ids(words, "f g h") + [eos]
    assert full_lengths(HAND, words, fmt) == [13, 7, 16]  # one word each, as the acts
    # emotion tokens: one added token each, opening the response; prompts end with it
    tok = _word_tokenizer([act_token(e) for e in EMOTIONS])
    tfmt = DialogueFormat("opens_response", max_length=32, max_response_tokens=8, act_tokens=True, control="emotion")
    ids = tok.convert_tokens_to_ids([act_token(e) for e in EMOTIONS])
    rows = encode_response_examples(HAND, tok, tfmt)
    prompts = encode_generation_prompts(HAND, tok, tfmt)
    for ex, r, p in zip(HAND, rows, prompts):
        own = ids[EMOTIONS.index(ex.emotion)]
        assert [t for t in r["input_ids"] if t in ids] == [own]
        n_prompt = r["labels"].count(IGNORE_INDEX)
        assert r["input_ids"][n_prompt - 1] == own and p == r["input_ids"][:n_prompt] and p[-1] == own
    # the act tokens alone do not serve an emotion-controlled format
    acts_only = _word_tokenizer([act_token(a) for a in ACTS])
    with pytest.raises(DeltakdError, match="no emotion token '<\\|happiness\\|>'"):
        encode_response_example(HAND[0], acts_only, tfmt)
    with pytest.raises(DeltakdError, match="control 'mood' is unknown"):
        DialogueFormat(control="mood")


def test_recipe_emotion_control_and_long_examples_options(sample_train):
    cfg = TaskConfig(name="dd", data_dir=SAMPLE, kind="dialogue", dialogue={"control": "emotion", "max_dialogues": 20})
    exs = response_split(cfg, "train")
    want = [(d[t].emotion, d[t].act) for d in sample_train[:20] for t in range(1, len(d))]
    assert [(ex.label("emotion"), ex.label("act")) for ex in exs] == want
    assert {e for e, _ in want} - {"no_emotion"}  # the sample has emotions besides no_emotion
    fmt = dialogue_format(cfg)
    assert fmt.control == "emotion"
    assert dialogue_format(TaskConfig(name="dd", data_dir=SAMPLE, dialogue={})).control == "act"
    assert TaskConfig(name="dd", data_dir=SAMPLE, dialogue={}).dialogue.long_examples == "truncate"
    with pytest.raises(ValueError, match="long_examples"):
        TaskConfig(name="dd", data_dir=SAMPLE, dialogue={"long_examples": "skip"})
    with pytest.raises(ValueError, match="control"):
        TaskConfig(name="dd", data_dir=SAMPLE, dialogue={"control": "topic"})


def test_emotion_classification_task_labels_every_utterance_with_its_emotion(sample_train):
    task = load_task(TaskConfig(name="dd", data_dir=SAMPLE, dialogue={"control": "emotion"}), seed=0)
    assert task.labels == EMOTIONS
    rows = task.splits["train"]
    assert len(rows) == 1959 == sum(map(len, sample_train))
    assert Counter(EMOTIONS[r["label"]] for r in rows) == Counter(t.emotion for d in sample_train for t in d)
    assert [EMOTIONS[r["label"]] for r in rows[:30]] == [t.emotion for d in sample_train for t in d][:30]
    assert utterance_examples(sample_train[:1], control="emotion") == [
        (" ".join(t.text.split()), t.emotion) for t in sample_train[0]]
    with pytest.raises(DeltakdError, match="task.labels: the DailyDialog emotions are"):
        load_task(TaskConfig(name="dd", data_dir=SAMPLE, labels=list(ACTS), dialogue={"control": "emotion"}), seed=0)


DIALOGUE_RECIPES = sorted(p for p in (ROOT / "recipes" / "dialogue").glob("*.yaml") if not p.name.startswith("_"))


def test_every_dialogue_recipe_validates_and_dialogpt_has_every_method(monkeypatch):
    """Every recipes/dialogue recipe loads and validates (the data folder checked where ../shared is
    present); the DialoGPT recipes name the hub model (no weights offline, so nothing is trained
    here), cover full / LoRA / prefix / prompt and fit DialoGPT's 1024 positions."""
    from deltakd import families
    from deltakd.dialogue.train import virtual_tokens

    monkeypatch.chdir(ROOT)
    check = SHARED_DATA.is_dir()
    dialogpt = {}
    for path in DIALOGUE_RECIPES:
        recipe, fam = families.load(path, check_files=check)
        assert recipe.name and recipe.description, path
        if path.name.startswith("dialogpt_"):
            assert fam.name == "dialogue" and recipe.model.name == "microsoft/DialoGPT-small"
            fmt = dialogue_format(recipe.task, virtual_tokens(recipe), 1024)
            assert fmt.act_tokens and fmt.act_position == "opens_response" and fmt.max_length == 256
            dialogpt[path.stem] = (recipe.peft.method, virtual_tokens(recipe))
    assert dialogpt == {"dialogpt_full": ("full", 0), "dialogpt_lora": ("lora", 0),
                        "dialogpt_prefix": ("prefix", 16), "dialogpt_prompt": ("prompt", 16)}
    emo, fam = families.load(ROOT / "recipes" / "dialogue" / "emotion_classifier.yaml", check_files=check)
    act, _ = families.load(ROOT / "recipes" / "dialogue" / "act_classifier.yaml", check_files=check)
    assert fam.name == "classification"
    assert emo.task.dialogue.control == "emotion" and act.task.dialogue.control == "act"
    assert {k: v for k, v in yaml.safe_load((ROOT / "recipes" / "dialogue" / "emotion_classifier.yaml").read_text())
            .items() if k not in ("name", "description", "task")} == \
        {k: v for k, v in yaml.safe_load((ROOT / "recipes" / "dialogue" / "act_classifier.yaml").read_text())
         .items() if k not in ("name", "description", "task")}  # the same model and schedule as the act judge
