"""Fixtures for the multistage tests: tiny random BERTs (hidden 32) with MiniLM's tokenizer."""

from __future__ import annotations

import pytest
import torch

PAIRS = [
    ("A man is playing a guitar.", "Ein Mann spielt Gitarre.", "de"),
    ("Two dogs run on the beach.", "Zwei Hunde laufen am Strand.", "de"),
    ("A child is eating an apple.", "Ein Kind isst einen Apfel.", "de"),
    ("A woman rides a bicycle.", "Une femme fait du vélo.", "fr"),
    ("The cat sleeps on the sofa.", "Le chat dort sur le canapé.", "fr"),
]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread. On a busy shared 2-core machine two spinning threads make
    a hidden-32 forward ~100x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tokenizer(tiny_bert):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_bert)


def make_bert(vocab_size: int, layers: int = 4, hidden: int = 32, seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    return BertModel(cfg).eval()


SMALL_VOCAB = 120


@pytest.fixture()
def bert4():
    """4-layer hidden-32 random BERT over a 120-token vocabulary, eval mode."""
    return make_bert(SMALL_VOCAB, layers=4)


@pytest.fixture()
def bert4_tok(tokenizer):
    """4-layer hidden-32 random BERT over MiniLM's vocabulary (for sentence-transformers tests)."""
    return make_bert(tokenizer.vocab_size, layers=4)


@pytest.fixture()
def batch():
    """Random ids (4, 9) over the small vocabulary, the last two rows padded."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, SMALL_VOCAB, (4, 9), generator=g)
    mask = torch.ones(4, 9, dtype=torch.long)
    mask[2, 6:] = 0
    mask[3, 4:] = 0
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask}
