from __future__ import annotations

import gzip
import logging
import re
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from deltakd.data.readers import read_file
from deltakd.data.tasks import TaskSpec
from deltakd.data.dailydialog import (ACTS, EMOTIONS, IGNORE_INDEX, DialogueCollator, DialogueFormat,
                                   ResponseExample, Turn, encode_generation_prompts, encode_response_example,
                                   encode_response_examples, generation_batch, read_dailydialog,
                                   read_dailydialog_files, response_examples, response_from_generation,
                                   split_files, utterance_examples, write_act_task)
from deltakd.errors import DeltakdError

from ..conftest import SHARED_DATA
from .conftest import SAMPLE

EOS = "<|endoftext|>"
GOOD = ("Hi . __eou__ Hello ! How are you ? __eou__ Fine . __eou__", "1 2 1 ", "0 4 0 ")


# ---- reader: shipped sample ---------------------------------------------------------------------

def test_reads_shipped_sample_and_drops_the_short_labelled_dialogue(caplog):
    with caplog.at_level(logging.WARNING, logger="deltakd.data.dailydialog"):
        dialogues, stats = read_dailydialog_files(*split_files(SAMPLE, "train"))
    assert (stats.dialogues, stats.turns, stats.short_label_lines) == (240, 1959, (167,))
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "1 dialogue(s)" in warnings[0] and "line(s) 167" in warnings[0]
    assert not any(d[0].text.startswith("Sam , can we stop at this bicycle shop ?") for d in dialogues)
    # train line 7852 of the original release: 12 utterances, 11 labels; kept with its last turn dropped
    kept, stats = read_dailydialog_files(*split_files(SAMPLE, "train"), short_labels="drop_last_turn")
    quirk = kept[166]
    assert (stats.dialogues, stats.turns) == (241, 1970)
    assert len(quirk) == 11 and quirk[0] == Turn("Sam , can we stop at this bicycle shop ?", "directive", "no_emotion")
    assert quirk[-1].text.startswith("The price on the tag says £ 565")
    for split, n in (("validation", 80), ("valid", 80), ("test", 80)):
        ds = read_dailydialog(SAMPLE, split)
        assert len(ds) == n
        assert {t.act for d in ds for t in d} == set(ACTS)
        assert {t.emotion for d in ds for t in d} <= set(EMOTIONS)
        assert all(t.text and "__eou__" not in t.text for d in ds for t in d)


@pytest.mark.skipif(not (SHARED_DATA / "dailydialog").is_dir(), reason="needs ../shared/data/dailydialog")
def test_sample_lines_come_from_the_full_splits():
    for split in ("train", "validation", "test"):
        for full, sample in zip(split_files(SHARED_DATA / "dailydialog", split), split_files(SAMPLE, split)):
            opener = gzip.open if full.suffix == ".gz" else open
            with opener(full, "rt", encoding="utf-8") as f:
                lines = set(f.read().split("\n"))
            assert set(sample.read_text(encoding="utf-8").split("\n")[:-1]) <= lines


# ---- reader: constructed files ---------------------------------------------------------------------

def write_split(folder: Path, rows: list[tuple[str, str, str]], split: str = "train", gz: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, stem in enumerate((f"dialogues_{split}.txt", f"dialogues_act_{split}.txt",
                              f"dialogues_emotion_{split}.txt")):
        text = "".join(r[i] + "\n" for r in rows)
        if gz and i == 0:
            with gzip.open(folder / (stem + ".gz"), "wt", encoding="utf-8") as f:
                f.write(text)
        else:
            (folder / stem).write_text(text, encoding="utf-8")
    return folder


def test_one_short_labels_are_dropped_with_a_counted_warning(tmp_path, caplog):
    short = ("A . __eou__ B ? __eou__ C ! __eou__ D . __eou__", "1 2 3 ", "0 0 6 ")
    folder = write_split(tmp_path / "dd", [GOOD, short, GOOD, short], gz=True)  # flat layout, gz text
    with caplog.at_level(logging.WARNING, logger="deltakd.data.dailydialog"):
        dialogues, stats = read_dailydialog_files(*split_files(folder, "train"))
        kept, kept_stats = read_dailydialog_files(*split_files(folder, "train"), short_labels="drop_last_turn")
    assert stats.short_label_lines == kept_stats.short_label_lines == (2, 4)
    assert len(dialogues) == 2 and dialogues[0] == dialogues[1]
    assert dialogues[0][1] == Turn("Hello ! How are you ?", "question", "happiness")
    assert len(kept) == 4 and kept[1] == [Turn("A .", "inform", "no_emotion"), Turn("B ?", "question", "no_emotion"),
                                          Turn("C !", "directive", "surprise")]
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and all("2 dialogue(s)" in m and "line(s) 2, 4" in m for m in messages)
    assert messages[0].endswith("dropped them") and messages[1].endswith("dropped their last turn")
    with pytest.raises(DeltakdError, match="short_labels 'keep' is unknown"):
        read_dailydialog(folder, "train", short_labels="keep")  # type: ignore[arg-type]


@pytest.mark.parametrize("row, which, fragment", [
    (("Hi . __eou__ Yo . __eou__ Bye . __eou__", "1 5 1", "0 0 0"), 1, "act label '5' is out of range"),
    (("Hi . __eou__ Yo . __eou__ Bye . __eou__", "1 1 1", "0 x 0"), 2, "emotion label 'x' is not an integer"),
    (("Hi . __eou__ Yo . __eou__ Bye . __eou__", "1", "0"), 1, "1 act labels for 3 utterances"),
    (("Hi . __eou__ Yo . __eou__ Bye . __eou__", "1 1", "0 0 0"), 1, "2 act labels for 3 utterances"),
    (("Hi . __eou__ Yo . __eou__ Bye . __eou__", "1 1 1", "0 0"), 2, "2 emotion labels for 3 utterances"),
    (("Hi . __eou__ Yo . __eou__", "1 1 1", "0 0 0"), 1, "3 act labels for 2 utterances"),
    (("Hi . __eou__  __eou__ Bye . __eou__", "1 1 1", "0 0 0"), 0, "utterance 2 is empty"),
])
def test_malformed_line_names_file_and_line(tmp_path, row, which, fragment):
    folder = write_split(tmp_path / "dd", [GOOD, GOOD, row, GOOD])
    paths = split_files(folder, "train")
    with pytest.raises(DeltakdError) as err:
        read_dailydialog_files(*paths)
    assert f"{paths[which]} line 3:" in str(err.value) and fragment in str(err.value)


def test_misaligned_files_name_the_short_file(tmp_path):
    folder = write_split(tmp_path / "dd" / "test", [GOOD, GOOD, GOOD], split="test")
    act = folder / "dialogues_act_test.txt"
    act.write_text("1 2 1\n1 2 1\n", encoding="utf-8")
    with pytest.raises(DeltakdError, match=re.escape(f"{act} line 3: has 2 lines but dialogues_test.txt has 3")):
        read_dailydialog(tmp_path / "dd", "test")
    with pytest.raises(DeltakdError, match="split 'dev2' is unknown"):
        split_files(tmp_path / "dd", "dev2")
    with pytest.raises(DeltakdError, match="dialogues_train.txt' \\(or .gz\\) does not exist"):
        read_dailydialog(tmp_path / "dd", "train")


# ---- examples and encoding -------------------------------------------------------------------------

def test_response_examples_one_per_later_turn_with_last_n_context(sample_train):
    exs = response_examples(sample_train, context_turns=2)
    assert len(exs) == sum(len(d) - 1 for d in sample_train)
    d = sample_train[0]
    first, third = exs[0], exs[2]
    assert (first.context, first.response, first.act, first.turn) == ((d[0].text,), d[1].text, d[1].act, 1)
    assert third.context == (d[1].text, d[2].text) and third.response == d[3].text and third.emotion == d[3].emotion
    with pytest.raises(DeltakdError):
        response_examples(sample_train, context_turns=0)


EX = ResponseExample("question", ("Hi there .", "Hello , how are you today ?"), "Fine , and you ?")


@pytest.mark.parametrize("position, expected", [
    ("first", f"question{EOS}Hi there .{EOS}Hello , how are you today ?{EOS}Fine , and you ?{EOS}"),
    ("before_response", f"Hi there .{EOS}Hello , how are you today ?{EOS}question{EOS}Fine , and you ?{EOS}"),
    ("opens_response", f"Hi there .{EOS}Hello , how are you today ?{EOS}questionFine , and you ?{EOS}"),
])
def test_template_and_labels_mask_exactly_the_response(dd_tokenizer, position, expected):
    tok = dd_tokenizer
    enc = encode_response_example(EX, tok, DialogueFormat(position, max_length=128))
    ids, labels = enc["input_ids"], enc["labels"]
    assert tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False) == expected
    assert enc["attention_mask"] == [1] * len(ids) and len(labels) == len(ids)
    response = tok(EX.response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n_prompt = len(ids) - len(response)
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt and labels[n_prompt:] == response
    assert tok.decode([t for t in labels if t != IGNORE_INDEX]) == EX.response + EOS
    # the generation prompt is exactly the labelled-out prefix
    prompt = encode_generation_prompts([EX], tok, DialogueFormat(position, max_length=128))[0]
    assert prompt == ids[:n_prompt]


def test_act_tokens_are_one_added_token_each(dd_tokenizer):
    """act_tokens: the act is one added token (not the word's pieces) and opens the response."""
    import copy

    from deltakd.data.dailydialog import ACTS, act_token

    tok = copy.deepcopy(dd_tokenizer)
    fmt = DialogueFormat("opens_response", max_length=128, act_tokens=True)
    with pytest.raises(DeltakdError, match="has no act token '<|question|>'"):
        encode_response_example(EX, tok, fmt)
    tok.add_tokens([act_token(a) for a in ACTS], special_tokens=True)
    q = tok.convert_tokens_to_ids(act_token("question"))
    enc = encode_response_example(EX, tok, fmt)
    words = encode_response_example(EX, tok, DialogueFormat("opens_response", max_length=128))
    n_word = len(tok("question", add_special_tokens=False)["input_ids"])
    response = tok(EX.response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    # the same sequence with the word's pieces replaced by the single act token, right before the response
    assert enc["input_ids"] == words["input_ids"][:-len(response) - n_word] + [q] + response
    assert enc["input_ids"].count(q) == 1 and enc["labels"][-len(response):] == response
    assert encode_generation_prompts([EX], tok, fmt)[0] == enc["input_ids"][:-len(response)]


def long_turns(tok, n_tokens: int) -> tuple[str, ...]:
    words = "the weather today is nice , would you like to go to the park with me and my sister ?".split()
    turns, total, i = [], 0, 0
    while total <= n_tokens:
        turn = " ".join(words[(i + k) % len(words)] for k in range(i % 7 + 5))
        turns.append(turn)
        total += len(tok(turn, add_special_tokens=False)["input_ids"]) + 1
        i += 1
    return tuple(turns)


@pytest.mark.parametrize("position", ["first", "before_response", "opens_response"])
@pytest.mark.parametrize("giant", [False, True])
def test_left_truncation_keeps_act_and_response_within_max_length(dd_tokenizer, position, giant):
    tok, eos = dd_tokenizer, dd_tokenizer.eos_token_id
    turns = long_turns(tok, 1300)
    context = (" ".join(turns),) if giant else turns  # one 1000-token turn, or many short ones
    ex = ResponseExample("directive", context, "Let's go to the park .")
    stream = [t for c in context for t in tok(c, add_special_tokens=False)["input_ids"] + [eos]]
    assert len(stream) > 1000
    fmt = DialogueFormat(position, max_length=64, max_response_tokens=16)
    ids = encode_response_example(ex, tok, fmt)["input_ids"]
    act = tok("directive", add_special_tokens=False)["input_ids"] + ([] if position == "opens_response" else [eos])
    response = tok(ex.response, add_special_tokens=False)["input_ids"] + [eos]
    assert len(ids) <= 64 and ids[-len(response):] == response
    kept = ids[len(act):-len(response)] if position == "first" else ids[:-len(response) - len(act)]
    if position == "first":
        assert ids[:len(act)] == act
    else:
        assert ids[-len(response) - len(act):-len(response)] == act
    assert 0 < len(kept) and stream[-len(kept):] == kept  # the newest context tokens, oldest cut
    if giant:  # a single turn too long is cut inside: the sequence is filled exactly
        assert len(ids) == 64
    else:  # whole turns: the kept context starts at a turn boundary and the next older turn would not fit
        assert stream[-len(kept) - 1] == eos
        older = tok(turns[-(kept.count(eos) + 1)], add_special_tokens=False)["input_ids"]
        assert len(ids) + len(older) + 1 > 64
    prompts = encode_generation_prompts([ex], tok, fmt)
    assert len(prompts[0]) + fmt.max_response_tokens + 1 <= 64
    assert (prompts[0][:len(act)] == act) if position == "first" else (prompts[0][-len(act):] == act)


def test_long_response_is_cut_from_the_right(dd_tokenizer):
    tok = dd_tokenizer
    resp = " ".join(["we can meet at the station at nine and then take the bus"] * 3)
    enc = encode_response_example(ResponseExample("commissive", ("When ?",), resp), tok,
                                  DialogueFormat(max_length=64, max_response_tokens=8))
    labelled = [t for t in enc["labels"] if t != IGNORE_INDEX]
    assert labelled == tok(resp, add_special_tokens=False)["input_ids"][:8] + [tok.eos_token_id]
    # a max_length too small for act + eos + a response token + eos fails clearly, not with a crash
    with pytest.raises(DeltakdError, match="max_length 4 cannot hold the act"):
        encode_response_example(ResponseExample("commissive", ("When ?",), resp), tok, DialogueFormat(max_length=4))


def test_format_validation_and_model_limit():
    with pytest.raises(DeltakdError, match="act_position 'last' is unknown"):
        DialogueFormat("last")  # type: ignore[arg-type]
    with pytest.raises(DeltakdError, match="exceeds the model's 32 positions"):
        DialogueFormat(max_length=64).check_model(GPT2Config(n_positions=32))
    DialogueFormat(max_length=32).check_model(GPT2Config(n_positions=32))


def test_encode_many_matches_one_by_one(sample_train, dd_tokenizer):
    exs = response_examples(sample_train[:20], context_turns=3)
    fmt = DialogueFormat("before_response", max_length=48, max_response_tokens=12)
    many = encode_response_examples(exs, dd_tokenizer, fmt)
    assert many == [encode_response_example(ex, dd_tokenizer, fmt) for ex in exs]
    assert max(len(e["input_ids"]) for e in many) <= 48


# ---- collation and generation ------------------------------------------------------------------------

def test_collator_pads_right_for_training_and_left_for_prompts():
    feats = [{"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1], "labels": [-100, 2, 3]},
             {"input_ids": [4, 5, 6, 7, 8], "attention_mask": [1] * 5, "labels": [-100, -100, -100, 7, 8]}]
    b = DialogueCollator(pad_token_id=9)(feats)
    assert b["input_ids"].tolist() == [[1, 2, 3, 9, 9], [4, 5, 6, 7, 8]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1] * 5]
    assert b["labels"].tolist() == [[-100, 2, 3, -100, -100], [-100, -100, -100, 7, 8]]
    assert b["input_ids"].dtype == torch.long
    b8 = DialogueCollator(pad_token_id=9, pad_to_multiple_of=8)(feats)
    assert b8["input_ids"].shape == (2, 8) and b8["labels"][0, 3:].tolist() == [-100] * 5
    g = generation_batch([[1, 2], [3, 4, 5, 6]], pad_token_id=9)
    assert set(g) == {"input_ids", "attention_mask"}
    assert g["input_ids"].tolist() == [[9, 9, 1, 2], [3, 4, 5, 6]]
    assert g["attention_mask"].tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]


def test_left_padded_batched_generation_matches_one_at_a_time(sample_train, dd_tokenizer):
    tok, eos = dd_tokenizer, dd_tokenizer.eos_token_id
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                       bos_token_id=eos, eos_token_id=eos)).eval()
    fmt = DialogueFormat(max_length=64, max_response_tokens=7)
    exs = response_examples(sample_train[:3], context_turns=2)[:4]
    prompts = encode_generation_prompts(exs, tok, fmt)
    assert len({len(p) for p in prompts}) > 1
    kw = dict(max_new_tokens=fmt.max_response_tokens + 1, do_sample=False, pad_token_id=eos, eos_token_id=eos)
    with torch.no_grad():
        batch = generation_batch(prompts, eos)
        out = model.generate(**batch, **kw)
        width = batch["input_ids"].shape[1]
        batched = [response_from_generation(row[width:].tolist(), tok) for row in out]
        single = []
        for p in prompts:
            ids = torch.tensor([p])
            o = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
            single.append(response_from_generation(o[0, len(p):].tolist(), tok))
    assert batched == single


def test_response_from_generation_cuts_at_first_eos(dd_tokenizer):
    tok, eos = dd_tokenizer, dd_tokenizer.eos_token_id
    ids = tok("Sure , why not ?", add_special_tokens=False)["input_ids"]
    assert response_from_generation(ids + [eos] + ids, tok) == "Sure , why not ?"
    assert response_from_generation([eos, *ids], tok) == ""
    assert response_from_generation(ids, tok) == "Sure , why not ?"


# ---- act-classifier files --------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", ["tsv", "jsonl"])
def test_act_task_files_read_back_with_the_classification_readers(sample_train, tmp_path, suffix):
    rows = utterance_examples(sample_train) + [("a tab\there and\na newline", "question")]
    path = write_act_task(rows, tmp_path / f"train.{suffix}")
    spec = TaskSpec(name="dd_act", kind="classification", labels=ACTS, metrics=("accuracy",),
                    text_columns=("text",), label_column="label")
    back = read_file(path, spec)
    assert len(back) == len(rows) == 1960
    assert [(e["text_a"], e["label"]) for e in back[:-1]] == rows[:-1]
    assert (back[-1]["text_a"], back[-1]["label"]) == ("a tab here and a newline", "question")
    assert len(utterance_examples(sample_train, dedupe=True)) < len(rows) - 1
    with pytest.raises(DeltakdError, match=r"\.tsv or \.jsonl"):
        write_act_task(rows, tmp_path / "train.csv")


class _ActReader(torch.nn.Module):
    """A fake LM whose response loss is 1.0 when the prompt starts with the 'question' act's
    tokens and 3.0 otherwise (or a constant 2.0 when ``blind``)."""

    def __init__(self, question_ids: list[int], blind: bool = False) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.question_ids, self.blind = question_ids, blind

    def forward(self, input_ids, attention_mask, labels):
        from types import SimpleNamespace

        assert (labels != IGNORE_INDEX).any() and input_ids.shape == labels.shape
        head = input_ids[0, :len(self.question_ids)].tolist()
        loss = 2.0 if self.blind else (1.0 if head == self.question_ids else 3.0)
        return SimpleNamespace(loss=torch.tensor(loss))


def test_act_sensitivity_measures_how_much_the_act_moves_the_response_nll(dd_tokenizer):
    from dataclasses import replace

    from deltakd.dialogue.evaluate import act_sensitivity

    fmt = DialogueFormat("first", max_length=128)
    q_ids = dd_tokenizer("question", add_special_tokens=False)["input_ids"]
    exs = [EX, replace(EX, act="inform"), replace(EX, act="question")]  # EX asks for a question
    assert EX.act == "question"
    reader = act_sensitivity(_ActReader(q_ids), dd_tokenizer, exs, fmt)
    # question examples: others 3.0 - own 1.0 = +2; the inform one: mean(1, 3, 3) - 3 = -2/3
    assert reader["act_nll_gap"] == pytest.approx((2 + 2 - 2 / 3) / 3)
    assert reader["act_recovered"] == pytest.approx(2 / 3)  # the inform one ties with 2 others: not recovered
    blind = act_sensitivity(_ActReader(q_ids, blind=True), dd_tokenizer, exs, fmt)
    assert blind == {"act_nll_gap": 0.0, "act_recovered": 0.0}
