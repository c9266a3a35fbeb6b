from __future__ import annotations

import json

import pytest

from deltakd.data import load_task
from deltakd.data.tokenize import tokenize_examples
from deltakd.errors import DeltakdError
from deltakd.recipe.schema import TaskConfig

from ..conftest import ROOT, SHARED_DATA, sentiment_rows, write_tsv


def task(**kw) -> TaskConfig:
    return TaskConfig.model_validate(kw)


def test_sst2_preset_with_resplit_makes_dev_the_test_split():
    data = load_task(task(name="sst2", data_dir=ROOT / "data/sst2", resplit_valid=0.1), seed=7)
    assert [len(data.splits[s]) for s in ("train", "valid", "test")] == [9000, 1000, 872]
    assert data.labels == ("0", "1") and data.spec.metrics == ("accuracy",)
    again = load_task(task(name="sst2", data_dir=ROOT / "data/sst2", resplit_valid=0.1), seed=7)
    assert again.splits["valid"] == data.splits["valid"]  # seeded
    other = load_task(task(name="sst2", data_dir=ROOT / "data/sst2", resplit_valid=0.1), seed=8)
    assert other.splits["valid"] != data.splits["valid"]
    # split_seed pins the split whatever the training seed (a seed sweep shares one split)
    pinned = [load_task(task(name="sst2", data_dir=ROOT / "data/sst2", resplit_valid=0.1, split_seed=7), seed=s)
              for s in (1, 8)]
    assert pinned[0].splits["valid"] == pinned[1].splits["valid"] == data.splits["valid"]
    # stratified: the label balance of valid is within a point of train's
    share = lambda xs: sum(e["label"] for e in xs) / len(xs)  # noqa: E731
    assert abs(share(data.splits["valid"]) - share(data.splits["train"])) < 0.01


def test_k_shot_per_class_and_total(toy_task):
    per_class = load_task(task(name="sst2", data_dir=toy_task, k_shot={"k": 8, "seed": 3}), seed=0)
    labels = [e["label"] for e in per_class.splits["train"]]
    assert labels.count(0) == 8 and labels.count(1) == 8
    total = load_task(task(name="sst2", data_dir=toy_task, k_shot={"k": 10, "per_class": False}), seed=0)
    assert len(total.splits["train"]) == 10
    with pytest.raises(DeltakdError, match="per class asked"):
        load_task(task(name="sst2", data_dir=toy_task, k_shot={"k": 5000}), seed=0)


@pytest.mark.parametrize("content, expected", [
    ("sentence\tlabel\ngood film\t1\nbad film\n", "train.tsv line 3: missing column 'label'"),
    ("sentence\tlabel\ngood film\t1\nbad film\t7\n", "train.tsv line 3: label '7' is not in the label set ['0', '1']"),
    ("sentence\tlabel\ngood film\t1\n \t0\n", "train.tsv line 3: empty text in column 'sentence'"),
    ("text\tlabel\ngood film\t1\n", "train.tsv line 2: missing column 'sentence'"),
])
def test_malformed_rows_name_file_and_line(tmp_path, content, expected):
    (tmp_path / "train.tsv").write_text(content)
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nok\t1\n")
    with pytest.raises(DeltakdError) as e:
        load_task(task(name="sst2", data_dir=tmp_path), seed=0)
    assert expected in str(e.value)


def test_custom_task_from_csv_and_jsonl_with_inferred_labels(tmp_path):
    (tmp_path / "train.csv").write_text('premise,hypothesis,y\n"a, b",c,yes\nd,e,no\nf,g,maybe\n')
    (tmp_path / "dev.jsonl").write_text(json.dumps({"premise": "x", "hypothesis": "y", "y": "no"}) + "\n")
    t = task(name="nli-ish", train_file=str(tmp_path / "train.csv"), valid_file=str(tmp_path / "dev.jsonl"),
             text_columns=["premise", "hypothesis"], label_column="y")
    data = load_task(t, seed=0)
    assert data.labels == ("maybe", "no", "yes")
    assert data.splits["train"][0] == {"text_a": "a, b", "text_b": "c", "label": 2}
    assert data.splits["valid"][0]["label"] == 1
    with pytest.raises(DeltakdError, match="not a preset"):
        load_task(task(name="mystery", train_file=str(tmp_path / "train.csv")), seed=0)


def test_headerless_and_regression_layouts(tmp_path):
    # CoLA (GLUE) has no header: source, label, original label, sentence
    (tmp_path / "cola").mkdir()
    (tmp_path / "cola/train.tsv").write_text("gj04\t1\t\tThe cat sat.\ngj04\t0\t*\tCat the sat.\n")
    (tmp_path / "cola/dev.tsv").write_text("gj04\t1\t\tA dog ran.\n")
    cola = load_task(task(name="cola", data_dir=tmp_path / "cola"), seed=0)
    assert cola.splits["train"][1] == {"text_a": "Cat the sat.", "text_b": None, "label": 0}
    assert cola.spec.main_metric == "matthews"
    # STS-B in its original release layout (tab-separated, .csv names, score in column 4)
    (tmp_path / "stsb").mkdir()
    row = "main-captions\tMSRvid\t2012test\t0001\t{s}\tA plane is taking off.\tAn air plane is taking off.\n"
    (tmp_path / "stsb/sts-train.csv").write_text(row.format(s="5.000") + row.format(s="3.800"))
    (tmp_path / "stsb/sts-dev.csv").write_text(row.format(s="1.5"))
    stsb = load_task(task(name="stsb", data_dir=tmp_path / "stsb"), seed=0)
    assert stsb.labels is None and stsb.num_labels == 1
    assert [e["label"] for e in stsb.splits["train"]] == [5.0, 3.8]
    assert stsb.splits["train"][0]["text_b"] == "An air plane is taking off."


def test_hf_datasets_source_offline_with_local_files(tmp_path):
    write_tsv(tmp_path / "train.tsv", sentiment_rows(20, 0))
    (tmp_path / "dev.jsonl").write_text("".join(json.dumps({"sentence": t, "label": y}) + "\n"
                                                for t, y in sentiment_rows(5, 1)))
    tsv = task(name="sst2", hf={"path": "csv", "data_files": {"train": str(tmp_path / "train.tsv")},
                                "options": {"sep": "\t"}}, resplit_valid=0.25)
    data = load_task(tsv, seed=0)
    assert len(data.splits["train"]) == 15 and len(data.splits["valid"]) == 5
    assert data.splits["train"][0]["text_a"] in {t for t, _ in sentiment_rows(20, 0)}
    js = task(name="sst2", hf={"path": "json", "data_files": {"train": str(tmp_path / "dev.jsonl"),
                                                              "validation": str(tmp_path / "dev.jsonl")}})
    assert [e["label"] for e in load_task(js, seed=0).splits["valid"]] == [y for _, y in sentiment_rows(5, 1)]
    with pytest.raises(DeltakdError, match="cannot load dataset 'no-such-dataset-xyz'"):
        load_task(task(name="sst2", hf={"path": "no-such-dataset-xyz"}), seed=0)


@pytest.mark.skipif(not (SHARED_DATA / "glue/rte").is_dir(), reason="../shared/data not present")
def test_real_glue_rte_and_stsb_from_shared_data():
    rte = load_task(task(name="rte", data_dir=SHARED_DATA / "glue/rte"), seed=0)
    assert len(rte.splits["train"]) == 2490 and len(rte.splits["valid"]) == 277
    assert rte.labels == ("entailment", "not_entailment") and rte.splits["train"][0]["text_b"]
    stsb = load_task(task(name="stsb", data_dir=SHARED_DATA / "glue/stsb"), seed=0)
    assert len(stsb.splits["train"]) == 5749 and len(stsb.splits["test"]) == 1379


def test_tokenisation_is_cached_and_keyed_by_settings(tmp_path, minilm_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path)
    exs = [{"text_a": t, "text_b": None, "label": y} for t, y in sentiment_rows(30, 0)]
    a = tokenize_examples(exs, tok, 16, cache_dir=tmp_path)
    entries = list((tmp_path / "tokenized").iterdir())
    assert len(entries) == 1
    b = tokenize_examples(exs, tok, 16, cache_dir=tmp_path)
    assert list((tmp_path / "tokenized").iterdir()) == entries and a["input_ids"] == b["input_ids"]
    tokenize_examples(exs, tok, 8, cache_dir=tmp_path)  # another max_length: another entry
    tokenize_examples(exs[:-1], tok, 16, cache_dir=tmp_path)  # other data: another entry
    assert len(list((tmp_path / "tokenized").iterdir())) == 3
    assert max(len(ids) for ids in tokenize_examples(exs, tok, 4, cache_dir=tmp_path)["input_ids"]) == 4
    assert a.column_names == ["labels", "input_ids", "token_type_ids", "attention_mask"]
