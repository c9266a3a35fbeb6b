"""Metrics on constructed embeddings; the per-language evaluation on a toy encoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deltakd.multistage.data import ParallelPair, StsSet
from deltakd.multistage.evaluate import (
    encode_speed,
    evaluate_multilingual,
    hf_encoder,
    mse_to_teacher,
    sts_spearman,
    translation_accuracy,
)

from .conftest import PAIRS


def test_mse_to_teacher_is_times_100():
    s = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    t = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    # squared errors 0, 4, 1, 1 -> mean 1.5 -> x100
    assert mse_to_teacher(s, t) == pytest.approx(150.0)
    assert mse_to_teacher(s.numpy(), t.numpy()) == pytest.approx(150.0)
    with pytest.raises(ValueError):
        mse_to_teacher(s, t[:1])


def test_translation_accuracy_both_directions():
    src = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    tgt = torch.tensor([[2.0, 0.1], [0.1, 3.0], [1.0, 0.9]])
    assert translation_accuracy(src, tgt) == {"src2tgt": 1.0, "tgt2src": 1.0, "mean": 1.0}
    # src 0 and src 2 both point at tgt 0; tgt 0 still retrieves src 0, tgt 2 retrieves src 2
    tgt = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.3]])
    src = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]])
    acc = translation_accuracy(src, tgt)
    assert acc["src2tgt"] == pytest.approx(2 / 3)
    assert acc["tgt2src"] == pytest.approx(1.0)
    assert acc["mean"] == pytest.approx(5 / 6)


def test_translation_accuracy_is_cosine_not_dot():
    src = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    tgt = torch.tensor([[1.0, 0.1], [10.0, 9.0]])  # a dot product would send src 0 to the long tgt 1
    assert translation_accuracy(src, tgt)["src2tgt"] == 1.0


def test_sts_spearman():
    a = torch.tensor([[1.0, 0.0]] * 4)
    b = torch.tensor([[1.0, 0.0], [1.0, 0.5], [1.0, 1.0], [0.0, 1.0]])  # decreasing cosine
    assert sts_spearman(a, b, [5.0, 3.0, 2.0, 0.0]) == pytest.approx(1.0)
    assert sts_spearman(a, b, [0.0, 2.0, 3.0, 5.0]) == pytest.approx(-1.0)
    with pytest.raises(ValueError):
        sts_spearman(a, b, [1.0])


def toy_encoder(sentences):
    """Bag of lower-cased first letters; deterministic, no model."""
    out = np.zeros((len(sentences), 26), dtype=np.float32)
    for i, s in enumerate(sentences):
        for w in s.lower().split():
            if w[0].isascii() and w[0].isalpha():
                out[i, ord(w[0]) - 97] += 1
    return torch.from_numpy(out) + 1e-3


def test_evaluate_multilingual_keys_and_values():
    pairs = [ParallelPair(*p) for p in PAIRS]
    sts = [StsSet("en-de", ["a b", "c d", "e"], ["a b", "x y", "e f"], [5.0, 0.0, 3.0])]
    m = evaluate_multilingual(toy_encoder, pairs, teacher=toy_encoder, sts=sts)
    for lang in ("de", "fr"):
        assert m[f"{lang}/mse_en"] == pytest.approx(0.0)
        assert m[f"{lang}/mse"] > 0
        assert 0.0 <= m[f"{lang}/acc_src2tgt"] <= 1.0
        assert m[f"{lang}/acc"] == pytest.approx((m[f"{lang}/acc_src2tgt"] + m[f"{lang}/acc_tgt2src"]) / 2)
    assert m["avg/acc"] == pytest.approx((m["de/acc"] + m["fr/acc"]) / 2)
    assert m["sts/en-de/spearman"] == pytest.approx(1.0)
    assert "avg/sts_spearman" not in m  # one STS set only
    assert m["speed_sent_per_s"] > 0
    no_teacher = evaluate_multilingual(toy_encoder, pairs, speed=False)
    assert "de/mse" not in no_teacher and "speed_sent_per_s" not in no_teacher


def test_hf_encoder_mean_pools_and_restores_mode(bert4_tok, tokenizer):
    bert4_tok.train()
    enc = hf_encoder(bert4_tok, tokenizer, batch_size=2, normalize=False)
    sents = [p[0] for p in PAIRS]
    emb = enc(sents)
    assert emb.shape == (len(sents), 32) and bert4_tok.training
    # batching and padding do not change a sentence's embedding
    assert torch.allclose(emb[0], enc(sents[:1])[0], atol=1e-5)
    assert encode_speed(enc, sents, warmup=1) > 0
