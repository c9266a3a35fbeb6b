"""Where each token of a causal-LM stream ends in the text: bytes per block (bits per byte) and the
positions of two tokenizers' streams that end at the same text offset (cross-tokenizer distillation).

The stream is the one :func:`deltakd.data.lm.make_blocks` cuts into blocks: every document tokenised
without special tokens, each followed by EOS. Offsets are counted in UTF-8 bytes of that text,
with each EOS standing for **one byte** (the document boundary, as a newline would in a plain-text
file; the 13 characters of ``<|endoftext|>`` are never counted). Token ``k`` of a document ends at
the byte where the character its offset mapping ends at ends (a running maximum, so a token the
mapping places before its predecessor's end covers zero bytes); the last token of a document ends at
the document's end. Consecutive ends therefore telescope: the tokens of a document cover each of its
bytes exactly once, whatever the tokenizer, and a token that holds half of a multi-byte character
(byte-level BPE) is credited with the whole character or with none of it.

Needs a fast tokenizer (offset mappings).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from ..errors import DeltakdError
from ..utils import cache_root, cached_dir, text_digest
from .tokenize import tokenizer_fingerprint

TEACHER_IDS = "teacher_input_ids"  # per student block: the teacher's tokens of the same text (variable length)
TEACHER_POSITIONS = "teacher_positions"  # per student position: the teacher position ending at the same byte, or -1


def _char_to_byte(doc: str) -> np.ndarray:
    """(len(doc) + 1,): the UTF-8 byte offset of every character offset."""
    sizes = np.fromiter((len(ch.encode("utf-8")) for ch in doc), dtype=np.int64, count=len(doc))
    return np.concatenate([[0], np.cumsum(sizes)])


def token_stream(texts: Sequence[str], tokenizer: Any) -> tuple[np.ndarray, np.ndarray]:
    """The EOS-joined stream of :func:`make_blocks` (ids (N,)) and each token's end in bytes of the
    stream's text (ends (N,), non-decreasing; EOS = one byte; see the module docstring)."""
    if not getattr(tokenizer, "is_fast", False):
        raise DeltakdError(f"tokenizer '{getattr(tokenizer, 'name_or_path', '')}' is not a fast tokenizer: "
                           "text offsets need one")
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    ends: list[np.ndarray] = []
    base = 0
    step = 1000
    for i in range(0, len(texts), step):
        chunk = list(texts[i:i + step])
        enc = tokenizer(chunk, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        for doc, doc_ids, offsets in zip(chunk, enc["input_ids"], enc["offset_mapping"]):
            nbytes = len(doc.encode("utf-8"))
            if doc_ids:
                char_end = np.maximum.accumulate(np.asarray([e for _, e in offsets], dtype=np.int64))
                char_end[-1] = len(doc)
                byte_end = char_end if nbytes == len(doc) else _char_to_byte(doc)[char_end]
                ends.append(base + byte_end)
                ids.extend(doc_ids)
            base += nbytes + 1
            ids.append(eos)
            ends.append(np.asarray([base], dtype=np.int64))
    return np.asarray(ids, dtype=np.int64), (np.concatenate(ends) if ends else np.zeros(0, dtype=np.int64))


def block_bytes(texts: Sequence[str], tokenizer: Any, block_size: int) -> np.ndarray:
    """(n_blocks,): the bytes each block's predicted tokens cover.

    A block's loss predicts its tokens 1 .. block_size - 1 (the first token is context only), so
    block ``b`` counts the bytes from the end of its first token to the end of its last:
    ``ends[(b + 1) * L - 1] - ends[b * L]``. The tail shorter than a block is dropped, as in
    :func:`make_blocks`.
    """
    _, ends = token_stream(texts, tokenizer)
    n = len(ends) // block_size
    blocks = ends[: n * block_size].reshape(n, block_size)  # (n, L)
    return blocks[:, -1] - blocks[:, 0]


def block_bytes_cached(texts: Sequence[str], tokenizer: Any, block_size: int, cache_dir: Path | None = None
                       ) -> np.ndarray:
    """:func:`block_bytes`, saved under ``<cache_dir or cache_root()>/lm_bytes/<sha256>``."""
    key = text_digest("lm-bytes-v1", tokenizer_fingerprint(tokenizer), block_size, list(texts))
    path = cached_dir((cache_dir or cache_root()) / "lm_bytes", key,
                      lambda tmp: np.save(tmp / "bytes.npy", block_bytes(texts, tokenizer, block_size)),
                      ready="bytes.npy")
    return np.load(path / "bytes.npy")


def bits_per_byte(loss: float, n_tokens: int, n_bytes: int) -> float:
    """Mean next-token NLL ``loss`` (nats) over ``n_tokens`` tokens covering ``n_bytes`` bytes, in
    bits per byte: ``loss * n_tokens / ln 2 / n_bytes``."""
    return float(loss) * int(n_tokens) / math.log(2.0) / int(n_bytes)


def align_blocks(student: tuple[np.ndarray, np.ndarray], teacher: tuple[np.ndarray, np.ndarray], block_size: int,
                 max_teacher_len: int) -> tuple[list[list[int]], np.ndarray]:
    """For every student block of the stream ``student`` (ids, ends), the teacher's tokens of the
    same text and the alignment.

    The teacher's tokens of block ``b`` run from the one holding the block's first byte (it may
    start earlier: a little more context) to the last one ending at or before the block's end; when
    longer than ``max_teacher_len`` the earliest are dropped. ``positions[b, i]`` is the index among
    them of the teacher token ending at the same byte as student token ``i`` (both distributions
    then predict what follows the same text), or -1 when no teacher token ends there, or when
    student token ``i`` ends at the same byte as the next one (half of a multi-byte character).
    """
    s_ids, s_ends = student
    t_ids, t_ends = teacher
    n = len(s_ids) // block_size
    unique = np.ones(len(s_ends), dtype=bool)
    unique[:-1] = s_ends[:-1] < s_ends[1:]
    teacher_ids: list[list[int]] = []
    positions = np.full((n, block_size), -1, dtype=np.int64)  # (n, L)
    for b in range(n):
        lo, hi = b * block_size, (b + 1) * block_size
        start = s_ends[lo - 1] if lo > 0 else 0  # the block's first byte is start (0-based, exclusive end)
        m0 = int(np.searchsorted(t_ends, start, side="right"))  # first teacher token ending after it
        m1 = int(np.searchsorted(t_ends, s_ends[hi - 1], side="right")) - 1  # last ending within the block
        m0 = max(m0, m1 - max_teacher_len + 1)
        teacher_ids.append(t_ids[m0:m1 + 1].tolist())
        ends = s_ends[lo:hi]
        j = np.searchsorted(t_ends, ends, side="right") - 1  # last teacher token ending at or before
        ok = (j >= m0) & (j <= m1) & (t_ends[np.clip(j, 0, None)] == ends) & unique[lo:hi]
        positions[b, ok] = j[ok] - m0
    return teacher_ids, positions


def cross_tokenizer_columns(texts: Sequence[str], student_tokenizer: Any, teacher_tokenizer: Any, block_size: int,
                            max_teacher_len: int) -> dict[str, Any]:
    """``{TEACHER_IDS: [...], TEACHER_POSITIONS: (n, L)}`` for the blocks of ``make_blocks(texts, student)``."""
    if max_teacher_len < 1:
        raise DeltakdError(f"the teacher takes {max_teacher_len} positions; cross-tokenizer blocks need at least 1")
    ids, pos = align_blocks(token_stream(texts, student_tokenizer), token_stream(texts, teacher_tokenizer),
                            block_size, max_teacher_len)
    return {TEACHER_IDS: ids, TEACHER_POSITIONS: pos}


def with_teacher_tokens(blocks: datasets.Dataset, texts: Sequence[str], student_tokenizer: Any,
                        teacher_tokenizer: Any, block_size: int, max_teacher_len: int,
                        cache_dir: Path | None = None) -> datasets.Dataset:
    """``blocks`` (student token blocks of ``texts``) with the teacher's tokens and the alignment
    (:func:`align_blocks`) as two more columns; saved under ``<cache>/lm_xtok/<sha256>``."""
    key = text_digest("lm-xtok-v1", tokenizer_fingerprint(student_tokenizer), tokenizer_fingerprint(teacher_tokenizer),
                      block_size, max_teacher_len, list(texts))

    def build(tmp: Path) -> None:
        cols = cross_tokenizer_columns(texts, student_tokenizer, teacher_tokenizer, block_size, max_teacher_len)
        if len(cols[TEACHER_IDS]) != len(blocks):
            raise DeltakdError(f"cross-tokenizer alignment: {len(cols[TEACHER_IDS])} blocks vs {len(blocks)}")
        seq = datasets.Sequence(datasets.Value("int64"))
        extra = datasets.Dataset.from_dict({TEACHER_IDS: cols[TEACHER_IDS], TEACHER_POSITIONS: cols[TEACHER_POSITIONS]},
                                           features=datasets.Features({TEACHER_IDS: seq, TEACHER_POSITIONS: seq}))
        extra.save_to_disk(str(tmp))

    path = cached_dir((cache_dir or cache_root()) / "lm_xtok", key, build, ready="dataset_info.json")
    extra = datasets.load_from_disk(str(path))
    return datasets.concatenate_datasets([blocks, extra], axis=1)
