"""Tokenisation with an on-disk cache keyed by tokenizer + data + settings."""

from __future__ import annotations

import json
from pathlib import Path

import datasets

from ..utils import cache_root, cached_dir, text_digest
from .readers import Example


def tokenizer_fingerprint(tokenizer) -> str:
    """Content hash of a tokenizer (its full serialisation when fast), not just its name."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # truncation/padding in the serialisation are per-call state, set by the last encode
        content = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
    else:
        content = sorted(tokenizer.get_vocab().items())
    return text_digest(type(tokenizer).__name__, content, tokenizer.model_max_length,
                       getattr(tokenizer, "padding_side", None))


def tokenize_examples(examples: list[Example], tokenizer, max_length: int,
                      cache_dir: Path | None = None) -> datasets.Dataset:
    """``input_ids``/``attention_mask``(/``token_type_ids``) + ``labels``; cached on disk.

    The cache key covers the tokenizer's content, every example (text and label) and
    ``max_length``, so a change to any of them tokenises afresh.
    """
    pairs = examples[0]["text_b"] is not None
    key = text_digest("cls-v1", tokenizer_fingerprint(tokenizer), max_length,
                      [(e["text_a"], e["text_b"], e["label"]) for e in examples])
    def encode(batch):
        args = (batch["text_a"], batch["text_b"]) if pairs else (batch["text_a"],)
        return tokenizer(*args, truncation=True, max_length=max_length)

    def build(tmp: Path) -> None:
        ds = datasets.Dataset.from_dict({
            "text_a": [e["text_a"] for e in examples],
            "text_b": [e["text_b"] for e in examples] if pairs else [""] * len(examples),
            "labels": [e["label"] for e in examples],
        })
        ds = ds.map(encode, batched=True, remove_columns=["text_a", "text_b"], desc="tokenizing",
                    load_from_cache_file=False)
        ds.save_to_disk(str(tmp))

    path = cached_dir((cache_dir or cache_root()) / "tokenized", key, build, ready="dataset_info.json")
    return datasets.load_from_disk(str(path))
