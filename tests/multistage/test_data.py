"""Parallel pairs, cross-lingual STS and the held-out split."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from deltakd.errors import DeltakdError
from deltakd.multistage.data import (
    ParallelCollator,
    ParallelPair,
    by_language,
    heldout_split,
    lang_from_name,
    read_parallel,
    read_parallel_files,
    read_sts,
    read_sts_file,
    sts_parallel_pairs,
)

from ..conftest import SHARED_DATA
from .conftest import PAIRS

PARALLEL = SHARED_DATA / "parallel"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_bytes(text.encode("utf-8"))
    return path


def test_lang_from_name():
    assert lang_from_name("train.en-de.tsv.gz") == "de"
    assert lang_from_name("/x/test2016.en-fr.tsv") == "fr"
    assert lang_from_name("en-zh.tsv") == "zh"
    assert lang_from_name("pairs.tsv") is None


def test_read_plain_and_gz(tmp_path):
    text = "Hello .\tHallo .\r\nA dog.\tEin Hund.\n\n"
    plain = read_parallel(write(tmp_path / "a.en-de.tsv", text))
    gz = read_parallel(write(tmp_path / "b.en-de.tsv.gz", text))
    assert plain == gz == [ParallelPair("Hello .", "Hallo .", "de"), ParallelPair("A dog.", "Ein Hund.", "de")]
    assert read_parallel(tmp_path / "a.en-de.tsv", lang="xx")[0].lang == "xx"
    assert len(read_parallel(tmp_path / "a.en-de.tsv", limit=1)) == 1


def test_read_header_format(tmp_path):
    text = "dialogue_idx\tturn\tenglish\ttranslation\n0\t0\tHi !\tHallo!\n0\t1\tBye .\tTschüss.\n"
    pairs = read_parallel(write(tmp_path / "dev.en-de.tsv.gz", text))
    assert pairs == [ParallelPair("Hi !", "Hallo!", "de"), ParallelPair("Bye .", "Tschüss.", "de")]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ok\tgut\nonly one column\n", r"x\.en-de\.tsv line 2: expected english<TAB>translation, got 1"),
        ("ok\tgut\na\tb\tc\n", r"line 2: expected english<TAB>translation, got 3"),
        ("ok\tgut\n \tleer\n", r"line 2: empty english sentence"),
        ("ok\t  \n", r"line 1: empty translation sentence"),
        ("h\tenglish\ttranslation\n1\ta\n", r"line 2: expected 3 tab-separated columns"),
    ],
)
def test_malformed_rows_name_file_and_line(tmp_path, text, message):
    path = write(tmp_path / "x.en-de.tsv", text)
    with pytest.raises(DeltakdError, match=message):
        read_parallel(path)


def test_bad_utf8_and_unknown_language(tmp_path):
    bad = tmp_path / "y.en-de.tsv"
    bad.write_bytes(b"ok\tgut\n\xff\tx\n")
    with pytest.raises(DeltakdError, match=r"y\.en-de\.tsv line 2: not valid UTF-8"):
        read_parallel(bad)
    with pytest.raises(DeltakdError, match="cannot tell the language"):
        read_parallel(write(tmp_path / "pairs.tsv", "a\tb\n"))
    with pytest.raises(DeltakdError, match="not found"):
        read_parallel(tmp_path / "missing.en-de.tsv")


def test_mixed_languages(tmp_path):
    de = write(tmp_path / "a.en-de.tsv", "One.\tEins.\nTwo.\tZwei.\n")
    fr = write(tmp_path / "pairs.tsv.gz", "One.\tUn.\n")
    pairs = read_parallel_files([de, (fr, "fr")])
    assert [p.lang for p in pairs] == ["de", "de", "fr"]
    assert list(by_language(pairs)) == ["de", "fr"]
    assert [p.translation for p in by_language(pairs)["de"]] == ["Eins.", "Zwei."]


def test_heldout_split_seeded_unique_and_leak_free():
    pairs = [ParallelPair(f"en {i}", f"de {i}", "de") for i in range(30)]
    pairs += [ParallelPair(f"en {i}", f"fr {i}", "fr") for i in range(30)]  # English shared, as Multi30k
    pairs += [ParallelPair("dup", "dup de", "de"), ParallelPair("dup", "dup de 2", "de")]
    a = heldout_split(pairs, 5, seed=1)
    assert a == heldout_split(pairs, 5, seed=1)
    assert a.heldout != heldout_split(pairs, 5, seed=2).heldout
    assert {lang: len(v) for lang, v in by_language(a.heldout).items()} == {"de": 5, "fr": 5}
    assert all(p.english != "dup" for p in a.heldout)  # duplicates are ambiguous for retrieval
    held_en = {p.english for p in a.heldout}
    assert not any(p.english in held_en for p in a.train)
    assert len(a.train) + len(a.heldout) + len(a.dropped) == len(pairs)
    only_de = heldout_split([p for p in pairs if p.lang == "de"], 5, seed=1)
    assert only_de.heldout == by_language(a.heldout)["de"]  # independent of the other languages
    frac = heldout_split(pairs, 0.1, seed=0)
    assert len(by_language(frac.heldout)["fr"]) == 3
    with pytest.raises(DeltakdError, match="31 pairs asked for 'de'"):
        heldout_split(pairs, 31)


def test_collator(tokenizer):
    pairs = [ParallelPair(*p) for p in PAIRS]
    batch = ParallelCollator(tokenizer, max_length=16)(pairs)
    assert batch["english"]["input_ids"].shape[0] == batch["translation"]["input_ids"].shape[0] == len(PAIRS)
    assert batch["english"]["input_ids"].shape[1] <= 16
    assert batch["lang"] == ["de", "de", "de", "fr", "fr"]


def test_read_sts_crosslingual_and_checks(tmp_path):
    write(tmp_path / "stsb-en-test.csv", '"A man, happy.",A man.,4.0\r\n"He said ""hi""",Bye,0.5\r\n')
    write(tmp_path / "stsb-de-test.csv", "Ein Mann.,Ein Mann.,4.0\r\nEr,Tschüss,0.5\r\n")
    sts = read_sts(tmp_path, "en", "de", "test")
    assert sts.name == "en-de"
    assert sts.sentences1 == ["A man, happy.", 'He said "hi"']
    assert sts.sentences2 == ["Ein Mann.", "Tschüss"]
    assert sts.scores == [4.0, 0.5] and len(sts) == 2
    write(tmp_path / "stsb-fr-test.csv", "Un homme.,Un homme.,3.0\r\nIl,Salut,0.5\r\n")
    with pytest.raises(DeltakdError, match=r"row 1: score 3.0 differs"):
        read_sts(tmp_path, "en", "fr", "test")
    write(tmp_path / "stsb-es-test.csv", "a,b,0.5\r\nc,d\r\n")
    with pytest.raises(DeltakdError, match=r"stsb-es-test\.csv line 2: expected 3 columns"):
        read_sts_file(tmp_path / "stsb-es-test.csv")
    write(tmp_path / "stsb-it-test.csv", "a,b,high\r\n")
    with pytest.raises(DeltakdError, match="line 1: score 'high' is not a number"):
        read_sts_file(tmp_path / "stsb-it-test.csv")


@pytest.mark.skipif(not PARALLEL.exists(), reason="shared parallel data not present")
def test_real_files():
    de = read_parallel(PARALLEL / "multi30k" / "val.en-de.tsv")
    assert len(de) == 1014 and de[0].lang == "de"
    xdd = read_parallel(PARALLEL / "xdailydialog" / "test.en-it.tsv.gz", limit=50)
    assert len(xdd) == 50 and xdd[0].lang == "it"
    sts = read_sts(PARALLEL / "stsb_multi_mt", "en", "de", "test")
    assert len(sts) == 1379
    assert sts.sentences1[0] == "A girl is styling her hair."
    assert sts.sentences2[0] == "Ein Mädchen bürstet sich die Haare."
    assert sts.scores[0] == 2.5
    extra = sts_parallel_pairs(PARALLEL / "stsb_multi_mt", "de", "test")
    assert extra[0] == ParallelPair("A girl is styling her hair.", "Ein Mädchen frisiert ihr Haar.", "de")
