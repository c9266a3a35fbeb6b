"""Causal-LM text: read documents, train or load a byte-level BPE tokenizer, cut token blocks.

Documents are tokenised, each followed by the EOS token, concatenated into one stream and cut
into contiguous blocks of ``block_size`` tokens (the GPT-2 / nanoGPT recipe; Radford et al.
2019). ``labels`` equal ``input_ids``: causal-LM heads shift them internally.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterable, Sequence
from pathlib import Path

import datasets
import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from ..errors import DeltakdError
from ..models.hub import not_found
from ..utils import cache_root, cached_dir, text_digest
from .tokenize import tokenizer_fingerprint

EOS = "<|endoftext|>"
_BYTE_ALPHABET = 256  # byte-level BPE always holds every byte as a token


def read_texts(paths: Sequence[Path], doc_separator: str | None = EOS) -> list[str]:
    """Documents from UTF-8 text files (``.gz`` read through gzip), in file order.

    A file containing ``doc_separator`` is split on it; otherwise the whole file is one
    document. Each document is stripped of surrounding whitespace; empty ones are dropped.
    """
    docs: list[str] = []
    for p in map(Path, paths):
        if not p.is_file():
            raise DeltakdError(f"lm data file '{p}' does not exist")
        try:
            if p.suffix == ".gz":
                with gzip.open(p, "rt", encoding="utf-8") as f:
                    text = f.read()
            else:
                text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, gzip.BadGzipFile, EOFError) as e:
            raise DeltakdError(f"lm data file '{p}' is not readable UTF-8 text: {type(e).__name__}") from e
        parts = text.split(doc_separator) if doc_separator and doc_separator in text else [text]
        docs.extend(d for d in (part.strip() for part in parts) if d)
    return docs


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: Path,
                        min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Train a GPT-2-style byte-level BPE (``<|endoftext|>`` is bos/eos/unk/pad) and save it.

    Deterministic for the same texts and settings; ``AutoTokenizer.from_pretrained(out_dir)``
    reloads it. The vocabulary holds at most ``vocab_size`` tokens (fewer on little text).
    """
    if vocab_size < _BYTE_ALPHABET + 1:
        raise DeltakdError(f"tokenizer vocab_size {vocab_size} is too small: byte-level BPE needs "
                           f"at least {_BYTE_ALPHABET + 1} (256 bytes + {EOS})")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS,
                                   pad_token=EOS, clean_up_tokenization_spaces=False)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return fast


def _load_tokenizer(name_or_path: str, revision: str | None = None) -> PreTrainedTokenizerBase:
    local = Path(name_or_path).expanduser()
    if name_or_path.startswith(("/", ".", "~")) and not local.is_dir():
        raise DeltakdError(f"tokenizer directory '{name_or_path}' does not exist")
    kw = {"revision": revision} if revision and not local.is_dir() else {}  # a folder has no revisions
    try:
        tok = AutoTokenizer.from_pretrained(str(local) if local.is_dir() else name_or_path, **kw)
    except OSError as e:  # not found: offline, unknown repository or revision (what is cached, named)
        raise not_found("cannot load tokenizer", name_or_path, revision, e) from None
    except ValueError as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DeltakdError(f"cannot load tokenizer '{name_or_path}': {msg}") from None
    if tok.eos_token is None:
        raise DeltakdError(f"tokenizer '{name_or_path}' has no eos token; causal-LM blocks need one")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def get_or_train_tokenizer(name_or_path: str | None, texts: Iterable[str], vocab_size: int,
                           cache_dir: Path | None = None, min_frequency: int = 2,
                           revision: str | None = None) -> PreTrainedTokenizerBase:
    """Load ``name_or_path`` (local dir, or hub id at ``revision``), or train a BPE on ``texts`` once and cache it.

    Trained tokenizers live in ``<cache_dir or cache_root()>/tokenizers/<sha256>``, keyed by
    the texts, ``vocab_size`` and ``min_frequency``; a later call with the same inputs loads it.
    """
    if name_or_path:
        return _load_tokenizer(str(name_or_path), revision)
    texts = list(texts)
    key = text_digest("bpe-v1", vocab_size, min_frequency, texts)
    path = cached_dir((cache_dir or cache_root()) / "tokenizers", key,
                      lambda tmp: train_bpe_tokenizer(texts, vocab_size, tmp, min_frequency=min_frequency),
                      ready="tokenizer.json")
    return _load_tokenizer(str(path))


def make_blocks(texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, block_size: int,
                name: str = "lm data") -> datasets.Dataset:
    """``input_ids``/``labels`` blocks of exactly ``block_size`` tokens from EOS-joined documents.

    Each document is tokenised without special tokens and followed by EOS; the stream is cut
    into non-overlapping blocks and the tail shorter than a block is dropped. ``name`` names
    the data in errors.
    """
    if block_size < 1:
        raise DeltakdError(f"block_size must be >= 1, got {block_size}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DeltakdError("the tokenizer has no eos token; causal-LM blocks need one")
    stream: list[int] = []
    step = 1000
    for i in range(0, len(texts), step):
        enc = tokenizer(list(texts[i:i + step]), add_special_tokens=False, verbose=False)["input_ids"]
        for ids in enc:
            stream.extend(ids)
            stream.append(eos)
    n = len(stream) // block_size
    if n == 0:
        raise DeltakdError(f"{name} has {len(stream)} tokens, fewer than one block of {block_size}")
    blocks = np.asarray(stream[: n * block_size], dtype=np.int64).reshape(n, block_size)  # (N, L)
    ids = datasets.Sequence(datasets.Value("int64"))
    return datasets.Dataset.from_dict({"input_ids": blocks, "labels": blocks.copy()},
                                      features=datasets.Features({"input_ids": ids, "labels": ids}))


def lm_blocks_cached(texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, block_size: int,
                     cache_dir: Path | None = None, name: str = "lm data") -> datasets.Dataset:
    """:func:`make_blocks`, saved under ``<cache_dir or cache_root()>/lm_blocks/<sha256>``.

    The key covers the tokenizer's content, every text and ``block_size``.
    """
    key = text_digest("lm-blocks-v1", tokenizer_fingerprint(tokenizer), block_size, list(texts))
    path = cached_dir((cache_dir or cache_root()) / "lm_blocks", key,
                      lambda tmp: make_blocks(texts, tokenizer, block_size, name=name).save_to_disk(str(tmp)),
                      ready="dataset_info.json")
    return datasets.load_from_disk(str(path))
