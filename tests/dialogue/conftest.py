"""Fixtures for the dialogue tests: the shipped DailyDialog sample and a small BPE trained on it."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from deltakd.data.lm import train_bpe_tokenizer
from deltakd.data.dailydialog import Dialogue, read_dailydialog

from ..conftest import ROOT

SAMPLE = ROOT / "data" / "dailydialog_sample"


@pytest.fixture(scope="session")
def sample_train() -> list[Dialogue]:
    return read_dailydialog(SAMPLE, "train")


@pytest.fixture(scope="session")
def dd_tokenizer(sample_train, tmp_path_factory) -> PreTrainedTokenizerFast:
    """Byte-level BPE (vocab 400) trained on the sample's utterances; eos = pad = <|endoftext|>."""
    texts = [t.text for d in sample_train for t in d]
    return train_bpe_tokenizer(texts, 400, Path(tmp_path_factory.mktemp("dd-bpe")))
