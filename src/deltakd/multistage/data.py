"""Parallel sentence pairs and cross-lingual STS for multilingual sentence-embedding distillation.

Reimers & Gurevych 2020 ("Making Monolingual Sentence Embeddings Multilingual using Knowledge
Distillation") train a student on ``(english, translation)`` pairs so that both sides map to the
teacher's embedding of the English sentence; Ding et al. 2022 ("Multi-stage Distillation Framework
for Cross-Lingual Semantic Similarity Matching") use the same data through all stages.

Formats read here:

- pair files: UTF-8 ``english<TAB>translation`` per line, no header (Multi30k), or a TSV whose
  first line is a header naming the columns ``english`` and ``translation`` among others
  (XDailyDialog: ``dialogue_idx turn english translation``). ``.gz`` files are read transparently.
  The language tag of a file is given, or read from an ``en-XX`` part of its name
  (``train.en-de.tsv.gz`` -> ``de``). Blank lines are skipped; any other malformed line (wrong
  column count, empty side, bad UTF-8) stops with ``<file> line <n>: ...``.
- STS-B machine-translated (``stsb_multi_mt``, May 2021): ``stsb-<lang>-<split>.csv``, CSV without
  header, columns ``sentence1, sentence2, score`` (0-5); row *i* is the same pair in every
  language, so cross-lingual en-de pairs ``sentence1`` of the English file with ``sentence2`` of
  the German one.
"""

from __future__ import annotations

import csv
import gzip
import random
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DeltakdError

__all__ = [
    "HeldoutSplit",
    "ParallelCollator",
    "ParallelPair",
    "StsSet",
    "by_language",
    "heldout_split",
    "lang_from_name",
    "read_parallel",
    "read_parallel_files",
    "read_sts",
    "read_sts_file",
    "sts_parallel_pairs",
]

PathLike = str | Path

# ``en-de`` in ``train.en-de.tsv.gz``; the tag is the part after ``en-``.
_LANG_IN_NAME = re.compile(r"(?:^|[._-])en-([A-Za-z]{2,3}(?:_[A-Za-z]{2,4})?)(?=[._-]|$)")
_HEADER_COLUMNS = ("english", "translation")


@dataclass(frozen=True)
class ParallelPair:
    """One English sentence and its translation; ``lang`` tags the translation side (``de``)."""

    english: str
    translation: str
    lang: str


@dataclass(frozen=True)
class StsSet:
    """Sentence pairs with gold similarity (0-5), e.g. ``name='en-de'``: English s1, German s2."""

    name: str
    sentences1: list[str]
    sentences2: list[str]
    scores: list[float]

    def __len__(self) -> int:
        return len(self.scores)


@dataclass(frozen=True)
class HeldoutSplit:
    """``train`` and ``heldout`` pairs; ``dropped`` train pairs removed because they share a side
    with a held-out pair (so retrieval is not measured on sentences seen in training)."""

    train: list[ParallelPair]
    heldout: list[ParallelPair]
    dropped: list[ParallelPair] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# parallel pairs
# --------------------------------------------------------------------------------------------


def lang_from_name(path: PathLike) -> str | None:
    """``train.en-de.tsv.gz`` -> ``'de'``; None when the name holds no ``en-XX`` part."""
    m = _LANG_IN_NAME.search(Path(path).name)
    return m.group(1).lower() if m else None


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, text without the line ending); split on ``\\n`` only."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            for i, raw in enumerate(f, start=1):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DeltakdError(f"{path} line {i}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
                yield i, text.rstrip("\r\n")
    except FileNotFoundError:
        raise DeltakdError(f"{path}: parallel file not found") from None
    except (gzip.BadGzipFile, EOFError) as e:
        raise DeltakdError(f"{path}: not a readable gzip file ({e})") from None


def read_parallel(path: PathLike, lang: str | None = None, limit: int | None = None) -> list[ParallelPair]:
    """Pairs of one file (plain or ``.gz``); ``lang`` defaults to the ``en-XX`` tag of its name.

    Without a header every line must be ``english<TAB>translation``. A first line naming the
    columns ``english`` and ``translation`` (tab-separated, any others allowed) is a header and
    those two columns are read. ``limit`` keeps the first ``limit`` pairs.
    """
    path = Path(path)
    tag = lang or lang_from_name(path)
    if not tag:
        raise DeltakdError(f"{path}: cannot tell the language from the file name (expected an 'en-XX' part "
                           "like train.en-de.tsv); give the language explicitly")
    pairs: list[ParallelPair] = []
    columns: tuple[int, int] = (0, 1)
    width = 2
    first = True
    for i, line in _lines(path):
        if not line.strip():
            continue
        cells = line.split("\t")
        if first:
            first = False
            names = [c.strip().lower() for c in cells]
            if all(c in names for c in _HEADER_COLUMNS):
                columns = (names.index("english"), names.index("translation"))
                width = len(cells)
                continue
        if len(cells) != width:
            want = "english<TAB>translation" if width == 2 else f"{width} tab-separated columns like the header"
            raise DeltakdError(f"{path} line {i}: expected {want}, got {len(cells)} column(s)")
        english, translation = cells[columns[0]].strip(), cells[columns[1]].strip()
        if not english or not translation:
            side = "english" if not english else "translation"
            raise DeltakdError(f"{path} line {i}: empty {side} sentence")
        pairs.append(ParallelPair(english, translation, tag))
        if limit is not None and len(pairs) >= limit:
            break
    return pairs


def read_parallel_files(
    files: Iterable[PathLike | tuple[PathLike, str]], limit_per_file: int | None = None
) -> list[ParallelPair]:
    """Pairs of several files, in order; each item is a path (language from its name) or
    ``(path, lang)``. Languages may be mixed; every pair keeps its file's tag."""
    pairs: list[ParallelPair] = []
    for item in files:
        path, lang = (item if isinstance(item, tuple) else (item, None))
        pairs.extend(read_parallel(path, lang=lang, limit=limit_per_file))
    return pairs


def by_language(pairs: Iterable[ParallelPair]) -> dict[str, list[ParallelPair]]:
    """Pairs grouped by language tag, languages sorted, order within a language kept."""
    groups: dict[str, list[ParallelPair]] = defaultdict(list)
    for p in pairs:
        groups[p.lang].append(p)
    return {lang: groups[lang] for lang in sorted(groups)}


def heldout_split(
    pairs: Sequence[ParallelPair],
    size: int | float,
    seed: int = 0,
    unique: bool = True,
    guard_leaks: bool = True,
) -> HeldoutSplit:
    """Seeded held-out pairs per language for translation retrieval; the rest for training.

    ``size``: pairs per language (int) or a fraction of each language's pairs (float in (0, 1)).
    ``unique``: held-out pairs are drawn only from pairs whose English and translation each occur
    once in that language, so the nearest-neighbour target is unambiguous. ``guard_leaks``: training
    drops every pair (any language) whose English is a held-out English sentence, and every pair of
    the same language whose translation is held out (Multi30k shares English across en-de/fr/cs).
    Held-out and train lists keep the input order. Same input and seed -> same split, and a
    language's held-out pairs do not change when other languages are added.
    """
    if isinstance(size, float) and not 0.0 < size < 1.0:
        raise DeltakdError(f"heldout size: a fraction must be in (0, 1), got {size}")
    if isinstance(size, int) and size < 1:
        raise DeltakdError(f"heldout size: must be >= 1 pair per language, got {size}")
    index_by_lang: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(pairs):
        index_by_lang[p.lang].append(i)
    chosen: set[int] = set()
    for lang in sorted(index_by_lang):
        idx = index_by_lang[lang]
        n = size if isinstance(size, int) else max(1, round(size * len(idx)))
        pool = idx
        if unique:
            en_count: dict[str, int] = defaultdict(int)
            tr_count: dict[str, int] = defaultdict(int)
            for i in idx:
                en_count[pairs[i].english] += 1
                tr_count[pairs[i].translation] += 1
            pool = [i for i in idx if en_count[pairs[i].english] == 1 and tr_count[pairs[i].translation] == 1]
        if n > len(pool):
            what = "unique pairs" if unique else "pairs"
            raise DeltakdError(f"heldout size: {n} pairs asked for '{lang}', it has {len(pool)} {what}")
        # one generator per language: a language's held-out set does not depend on the others
        chosen.update(random.Random(f"{seed}:{lang}").sample(pool, n))
    heldout = [pairs[i] for i in sorted(chosen)]
    held_en = {p.english for p in heldout}
    held_tr = {(p.lang, p.translation) for p in heldout}
    train: list[ParallelPair] = []
    dropped: list[ParallelPair] = []
    for i, p in enumerate(pairs):
        if i in chosen:
            continue
        if guard_leaks and (p.english in held_en or (p.lang, p.translation) in held_tr):
            dropped.append(p)
        else:
            train.append(p)
    return HeldoutSplit(train=train, heldout=heldout, dropped=dropped)


# --------------------------------------------------------------------------------------------
# cross-lingual STS (stsb_multi_mt)
# --------------------------------------------------------------------------------------------


def read_sts_file(path: PathLike) -> list[tuple[str, str, float]]:
    """Rows ``(sentence1, sentence2, score)`` of one ``stsb_multi_mt`` CSV (no header)."""
    path = Path(path)
    if not path.exists():
        raise DeltakdError(f"{path}: STS file not found")
    rows: list[tuple[str, str, float]] = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        try:
            for cells in reader:
                line = reader.line_num
                if not cells or all(not c.strip() for c in cells):
                    continue
                if len(cells) != 3:
                    raise DeltakdError(f"{path} line {line}: expected 3 columns (sentence1, sentence2, score), "
                                       f"got {len(cells)}")
                s1, s2, raw = cells[0].strip(), cells[1].strip(), cells[2].strip()
                if not s1 or not s2:
                    raise DeltakdError(f"{path} line {line}: empty sentence{'1' if not s1 else '2'}")
                try:
                    score = float(raw)
                except ValueError:
                    raise DeltakdError(f"{path} line {line}: score {raw!r} is not a number") from None
                if not 0.0 <= score <= 5.0:
                    raise DeltakdError(f"{path} line {line}: score {score} is outside 0..5")
                rows.append((s1, s2, score))
        except (csv.Error, UnicodeDecodeError) as e:
            raise DeltakdError(f"{path} line {reader.line_num}: malformed CSV ({e})") from None
    return rows


def _sts_path(data_dir: Path, lang: str, split: str) -> Path:
    return data_dir / f"stsb-{lang}-{split}.csv"


def read_sts(data_dir: PathLike, lang1: str = "en", lang2: str = "de", split: str = "test") -> StsSet:
    """Cross-lingual STS: ``sentence1`` from ``stsb-<lang1>-<split>.csv`` paired with ``sentence2``
    from ``stsb-<lang2>-<split>.csv`` (row by row), gold score shared. ``lang1 == lang2`` gives the
    monolingual set. The two files must have the same length and identical scores row by row."""
    data_dir = Path(data_dir)
    p1, p2 = _sts_path(data_dir, lang1, split), _sts_path(data_dir, lang2, split)
    rows1 = read_sts_file(p1)
    rows2 = rows1 if p2 == p1 else read_sts_file(p2)
    if len(rows1) != len(rows2):
        raise DeltakdError(f"{p1} has {len(rows1)} rows but {p2} has {len(rows2)}; rows must align")
    for i, (a, b) in enumerate(zip(rows1, rows2), start=1):
        if abs(a[2] - b[2]) > 1e-6:
            raise DeltakdError(f"{p2} row {i}: score {b[2]} differs from {a[2]} in {p1}; rows do not align")
    return StsSet(
        name=f"{lang1}-{lang2}",
        sentences1=[r[0] for r in rows1],
        sentences2=[r[1] for r in rows2],
        scores=[r[2] for r in rows1],
    )


def sts_parallel_pairs(data_dir: PathLike, lang: str, split: str = "train") -> list[ParallelPair]:
    """Extra en-``lang`` translation pairs from STS-B: both sentence columns of the aligned English
    and ``lang`` files, exact duplicate pairs removed (first kept)."""
    data_dir = Path(data_dir)
    en, xx = read_sts_file(_sts_path(data_dir, "en", split)), read_sts_file(_sts_path(data_dir, lang, split))
    if len(en) != len(xx):
        raise DeltakdError(f"stsb {split}: en has {len(en)} rows, {lang} has {len(xx)}; rows must align")
    seen: set[tuple[str, str]] = set()
    pairs: list[ParallelPair] = []
    for col in (0, 1):
        for a, b in zip(en, xx):
            key = (a[col], b[col])
            if key not in seen:
                seen.add(key)
                pairs.append(ParallelPair(a[col], b[col], lang))
    return pairs


# --------------------------------------------------------------------------------------------
# batching
# --------------------------------------------------------------------------------------------


class ParallelCollator:
    """Tokenises a batch of pairs into two padded batches: ``english`` and ``translation``
    (each a dict of ``input_ids`` / ``attention_mask`` ..., (B, L)), plus ``lang`` (list of tags).
    Row *i* of both batches is the same pair, which the in-batch losses rely on."""

    def __init__(self, tokenizer: Any, max_length: int = 128) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    def _encode(self, texts: list[str]) -> dict[str, Any]:
        return dict(self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                   return_tensors="pt"))

    def __call__(self, pairs: Sequence[ParallelPair]) -> dict[str, Any]:
        return {
            "english": self._encode([p.english for p in pairs]),
            "translation": self._encode([p.translation for p in pairs]),
            "lang": [p.lang for p in pairs],
        }
