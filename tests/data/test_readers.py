"""Task files as users have them: byte-order marks, CRLF, other encodings, quoting, NaN, stray labels, extra cells."""

from __future__ import annotations

import hashlib

import pytest

from deltakd.data import load_task
from deltakd.data.readers import read_file
from deltakd.data.tasks import resolve_task
from deltakd.errors import DeltakdError
from deltakd.recipe.schema import TaskConfig

from ..conftest import ROOT, SHARED_DATA


def task(**kw) -> TaskConfig:
    return TaskConfig.model_validate(kw)


def files(tmp_path, train: bytes | str, dev: bytes | str = "sentence\tlabel\nok film\t1\n",
          names=("train.tsv", "dev.tsv")):
    for name, content in zip(names, (train, dev)):
        data = content.encode("utf-8") if isinstance(content, str) else content
        (tmp_path / name).write_bytes(data)
    return tmp_path


def custom(tmp_path, train, dev, names=("train.tsv", "dev.tsv"), **kw):
    files(tmp_path, train, dev, names)
    return task(name="custom", train_file=str(tmp_path / names[0]), valid_file=str(tmp_path / names[1]),
                text_columns=["text"], label_column="y", **kw)


def failure(cfg: TaskConfig) -> str:
    with pytest.raises(DeltakdError) as e:
        load_task(cfg, seed=0)
    return str(e.value)


def test_utf8_byte_order_mark_and_crlf_line_ends(tmp_path):
    # the original GLUE MRPC release starts with a byte-order mark
    mrpc = "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\r\n1\t1\t2\tA b.\tA c.\r\n0\t3\t4\tX y.\tZ w.\r\n"
    data = load_task(task(name="mrpc", data_dir=files(tmp_path, mrpc, mrpc)), seed=0)
    assert data.splits["train"] == [{"text_a": "A b.", "text_b": "A c.", "label": 1},
                                    {"text_a": "X y.", "text_b": "Z w.", "label": 0}]
    csv_data = load_task(custom(tmp_path, "\ufefftext,y\r\ngood,a\r\nbad,b\r\n", "text,y\nok,a\n",
                                names=("t.csv", "d.csv")), seed=0)
    assert csv_data.labels == ("a", "b") and csv_data.splits["train"][1]["text_a"] == "bad"
    js = load_task(custom(tmp_path, '\ufeff{"text": "good", "y": "a"}\r\n{"text": "bad", "y": "b"}\r\n',
                          '{"text": "ok", "y": "a"}\n', names=("t.jsonl", "d.jsonl")), seed=0)
    assert [e["label"] for e in js.splits["train"]] == [0, 1]


def test_bytes_that_are_not_utf8_name_file_line_and_offset(tmp_path):
    msg = failure(task(name="sst2", data_dir=files(tmp_path, b"sentence\tlabel\ngood film\t1\ncaf\xe9 bad\t0\n")))
    assert msg.endswith("train.tsv line 3: byte 0xe9 (file offset 30, column 4) is not UTF-8; save the file as UTF-8")
    assert "\n" not in msg
    # the offset counts the byte-order mark: it is where a hex editor shows the byte
    msg = failure(task(name="sst2", data_dir=files(tmp_path, b"\xef\xbb\xbfsentence\tlabel\n\xff\t1\n")))
    assert "train.tsv line 2: byte 0xff (file offset 18, column 1)" in msg


def test_quoted_tsv_field_holding_a_tab_is_one_cell(tmp_path):
    train = 'sentence\tlabel\n"good\tfilm"\t1\n"a ""great"" one\t!"\t1\nbad film\t0\n'
    data = load_task(task(name="sst2", data_dir=files(tmp_path, train)), seed=0)
    assert [e["text_a"] for e in data.splits["train"]] == ["good\tfilm", 'a "great" one\t!', "bad film"]


def test_tsv_quotes_inside_sentences_stay_text_as_in_glue(tmp_path):
    # GLUE sentences hold quotes that are text: whole-cell, unbalanced, and across two cells (STS-B line 2104)
    row = 'main-forum\tdeft-forum\t2014\t0103\t1.8\t"Oh, you\'re good!\tYou\'re bad!"\n'
    quoted = 'main\tMSRvid\t2012\t0002\t2.5\t"Would you?"\tThe "plan\n'
    files(tmp_path, row + quoted, row, names=("sts-train.csv", "sts-dev.csv"))
    stsb = load_task(task(name="stsb", data_dir=tmp_path), seed=0)
    assert [(e["text_a"], e["text_b"]) for e in stsb.splits["train"]] == [
        ('"Oh, you\'re good!', 'You\'re bad!"'), ('"Would you?"', 'The "plan')]
    train = 'sentence\tlabel\n"the movie" is fine\t1\n"dull"\t0\n'
    sst = load_task(task(name="sst2", data_dir=files(tmp_path, train)), seed=0)
    assert [e["text_a"] for e in sst.splits["train"]] == ['"the movie" is fine', '"dull"']


def digest(examples) -> str:
    text = "\n".join(f"{e['text_a']}\t{e['text_b']}\t{e['label']}" for e in examples)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# rows and a digest of their texts and labels as the reader before quoting/BOM support read them
GLUE_AS_BEFORE = [
    ("sst2", "sst2", "train.tsv", 67349, "cde6160cff7e7071"), ("sst2", "sst2", "dev.tsv", 872, "5e7ca87216e06f86"),
    ("cola", "cola", "train.tsv", 8551, "134627e59c74358b"), ("cola", "cola", "dev.tsv", 1043, "55d35c1c5ed2928d"),
    ("rte", "rte", "train.tsv", 2490, "7056c193dabc41f1"), ("rte", "rte", "dev.tsv", 277, "21e637ae325acab8"),
    ("stsb", "stsb", "sts-train.csv", 5749, "d44578ae7e180826"), ("stsb", "stsb", "sts-dev.csv", 1500, "4e55eb4d33cf8e02"),
    ("stsb", "stsb", "sts-test.csv", 1379, "75d9211cdf146aef"),
]


def test_packaged_sst2_sample_reads_as_before():
    spec = resolve_task(task(name="sst2", data_dir=ROOT / "data/sst2"))
    got = [(len(exs), digest(exs)) for exs in (read_file(spec.files[s], spec) for s in ("train", "valid"))]
    assert got == [(10000, "9c6b5934dbda8daa"), (872, "5e7ca87216e06f86")]


@pytest.mark.skipif(not (SHARED_DATA / "glue/stsb").is_dir(), reason="../shared/data not present")
@pytest.mark.parametrize("name, folder, file, rows, expected", GLUE_AS_BEFORE)
def test_real_glue_files_read_as_before(name, folder, file, rows, expected):
    spec = resolve_task(task(name=name, data_dir=SHARED_DATA / "glue" / folder))
    examples = read_file(SHARED_DATA / "glue" / folder / file, spec)
    assert (len(examples), digest(examples)) == (rows, expected)


def test_nan_and_infinite_labels_are_refused(tmp_path):
    msg = failure(custom(tmp_path, "text\ty\ngood\t1\nbad\tNaN\n", "text\ty\nok\t1\n"))
    assert msg.endswith("train.tsv line 3: label 'NaN' in column 'y' is a missing value, not a class; "
                        "drop the row or list the labels in task.labels")
    msg = failure(custom(tmp_path, '{"text": "good", "y": 1}\n{"text": "bad", "y": NaN}\n', '{"text": "ok", "y": 1}\n',
                         names=("t.jsonl", "d.jsonl")))
    assert "t.jsonl line 2: label 'nan' in column 'y' is a missing value" in msg
    for bad in ("nan", "inf", "-Infinity"):
        msg = failure(custom(tmp_path, f"text\ty\ngood\t1.5\nbad\t{bad}\n", "text\ty\nok\t1\n", kind="regression"))
        assert msg.endswith(f"train.tsv line 3: label '{bad}' in column 'y' is not a finite number")
    # a class the recipe names is a class, whatever its name
    named = load_task(custom(tmp_path, "text\ty\ngood\tnan\nbad\tx\n", "text\ty\nok\tx\n", labels=["nan", "x"]), seed=0)
    assert named.labels == ("nan", "x")


def test_label_outside_training_labels_names_file_and_line(tmp_path):
    msg = failure(custom(tmp_path, "text\ty\ngood\tpos\nbad\tneg\n", "text\ty\nok\tpos\nhm\tmaybe\n"))
    assert msg.endswith("dev.tsv line 3: label 'maybe' is not among the training labels ['neg', 'pos']")
    # a preset's fixed labels bind the training file too
    msg = failure(task(name="sst2", data_dir=files(tmp_path, "sentence\tlabel\ngood\t1\nbad\t2\n")))
    assert msg.endswith("train.tsv line 3: label '2' is not in the label set ['0', '1']")
    msg = failure(task(name="sst2", data_dir=files(tmp_path, "sentence\tlabel\ngood\t1\n",
                                                   "sentence\tlabel\nok\t1\nhm\t2\n")))
    assert msg.endswith("dev.tsv line 3: label '2' is not in the label set ['0', '1']")


def test_row_with_more_cells_than_the_header(tmp_path):
    train = "sentence\tlabel\ngood film\t1\nbad film\t0\tnote\n"
    msg = failure(task(name="sst2", data_dir=files(tmp_path, train)))
    assert msg.endswith("train.tsv line 3: 3 cells but the header names 2 columns (an unquoted tab or comma in a "
                        "text?); fix the row, or set task.extra_cells: ignore to read only the named columns")
    msg = failure(custom(tmp_path, "text,y\ngood,a\nbad, really bad,b\n", "text,y\nok,a\n", names=("t.csv", "d.csv")))
    assert "t.csv line 3: 3 cells but the header names 2 columns" in msg
    data = load_task(task(name="sst2", data_dir=tmp_path, extra_cells="ignore"), seed=0)
    assert data.splits["train"][1] == {"text_a": "bad film", "text_b": None, "label": 0}
    # empty trailing cells lose nothing
    ok = load_task(task(name="sst2", data_dir=files(tmp_path, "sentence\tlabel\ngood\t1\t\nbad\t0\t \n")), seed=0)
    assert [e["label"] for e in ok.splits["train"]] == [1, 0]
    with pytest.raises(ValueError, match="extra_cells"):
        task(name="sst2", data_dir=tmp_path, extra_cells="drop")
