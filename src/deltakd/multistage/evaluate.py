"""Evaluation of multilingual sentence encoders (Reimers & Gurevych 2020; Ding et al. 2022).

- MSE to the teacher: ``mean((student(translation) - teacher(english))^2) * 100``, as
  sentence-transformers' ``MSEEvaluator`` reports it (lower is better).
- Translation retrieval accuracy: for each source embedding, is the cosine nearest neighbour
  among all target embeddings its own translation (``TranslationEvaluator``)? Both directions.
- Cross-lingual STS: Spearman correlation between ``cos(emb(s1), emb(s2))`` and the gold score
  (``EmbeddingSimilarityEvaluator``; here a fraction in [-1, 1], papers print it x100).
- Encode speed: sentences per second.

Metric functions take embeddings ``(N, H)`` (tensors or arrays); ``evaluate_multilingual`` takes
an *encoder*, any callable ``list[str] -> (N, H)`` such as ``hf_encoder`` / ``st_encoder``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import Tensor

from ..losses.hidden import mean_pool
from .data import ParallelPair, StsSet, by_language
from .structure import embedding_dim, projection_of

__all__ = [
    "Encoder",
    "encode_speed",
    "evaluate_multilingual",
    "hf_encoder",
    "mse_to_teacher",
    "sentence_embedding",
    "st_encoder",
    "sts_spearman",
    "translation_accuracy",
]

Encoder = Callable[[Sequence[str]], Tensor]  # sentences -> (N, H) float tensor on CPU


def _as_tensor(x: Tensor | np.ndarray | Sequence[Sequence[float]]) -> Tensor:
    t = x.detach() if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))
    return t.to(device="cpu", dtype=torch.float64)


def mse_to_teacher(student: Tensor | np.ndarray, teacher: Tensor | np.ndarray) -> float:
    """``mean((student - teacher)^2) * 100`` over rows and dimensions; (N, H) each."""
    s, t = _as_tensor(student), _as_tensor(teacher)
    if s.shape != t.shape:
        raise ValueError(f"mse_to_teacher: student {tuple(s.shape)} vs teacher {tuple(t.shape)}")
    return float(((s - t) ** 2).mean() * 100.0)


def translation_accuracy(source: Tensor | np.ndarray, target: Tensor | np.ndarray) -> dict[str, float]:
    """Cosine nearest-neighbour retrieval between aligned rows: ``src2tgt`` is the fraction of
    source rows whose most similar target row is their own; ``tgt2src`` the reverse; ``mean`` of both.
    Ties go to the lowest index (``argmax``). (N, H) each, row i of both = one translation pair."""
    s, t = _as_tensor(source), _as_tensor(target)
    if s.shape != t.shape or s.dim() != 2:
        raise ValueError(f"translation_accuracy: source {tuple(s.shape)} vs target {tuple(t.shape)}")
    sim = F.normalize(s, dim=-1, eps=1e-12) @ F.normalize(t, dim=-1, eps=1e-12).T  # (N, N)
    gold = torch.arange(sim.shape[0])
    src2tgt = float((sim.argmax(dim=1) == gold).double().mean())
    tgt2src = float((sim.argmax(dim=0) == gold).double().mean())
    return {"src2tgt": src2tgt, "tgt2src": tgt2src, "mean": 0.5 * (src2tgt + tgt2src)}


def sts_spearman(emb1: Tensor | np.ndarray, emb2: Tensor | np.ndarray, gold: Sequence[float]) -> float:
    """Spearman rank correlation of ``cos(emb1_i, emb2_i)`` with ``gold_i`` (scipy); (N, H) each."""
    a, b = _as_tensor(emb1), _as_tensor(emb2)
    if a.shape != b.shape or a.shape[0] != len(gold):
        raise ValueError(f"sts_spearman: {tuple(a.shape)}, {tuple(b.shape)} and {len(gold)} gold scores")
    cos = F.cosine_similarity(a, b, dim=-1, eps=1e-12).numpy()  # (N,)
    return float(spearmanr(cos, np.asarray(gold, dtype=np.float64)).statistic)


# --------------------------------------------------------------------------------------------
# encoders
# --------------------------------------------------------------------------------------------


def sentence_embedding(model: Any, encoded: dict[str, Tensor], normalize: bool) -> Tensor:
    """A student's sentence embeddings, as its saved sentence-transformers pipeline computes them:
    mean pooling of ``last_hidden_state`` over real tokens (Pooling 'mean'), the learned projection
    to the teacher's width when the student has one (Dense, identity activation), L2 when
    ``normalize`` (Normalize). ``encoded``: the tokenizer's batch, (B, L) each; returns (B, H)."""
    hidden = model(**encoded).last_hidden_state  # (B, L, H_s)
    emb = mean_pool(hidden, encoded["attention_mask"])  # (B, H_s)
    proj = projection_of(model)
    if proj is not None:
        emb = proj(emb)  # (B, H)
    return F.normalize(emb, p=2, dim=-1) if normalize else emb


def hf_encoder(
    model: Any,
    tokenizer: Any,
    batch_size: int = 64,
    max_length: int = 128,
    normalize: bool = False,
) -> Encoder:
    """Encoder from a HF model: ``sentence_embedding`` (mean pooling, the student's projection if
    any, optional L2 normalisation) in batches; eval mode, no grad."""
    def encode(sentences: Sequence[str]) -> Tensor:
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        out = []
        try:
            with torch.no_grad():
                for i in range(0, len(sentences), batch_size):
                    batch = tokenizer(list(sentences[i:i + batch_size]), padding=True, truncation=True,
                                      max_length=max_length, return_tensors="pt").to(device)
                    out.append(sentence_embedding(model, dict(batch), normalize).float().cpu())  # (B, H)
        finally:
            model.train(was_training)
        if not out:
            return torch.zeros(0, embedding_dim(model))
        return torch.cat(out)  # (N, H)

    return encode


def st_encoder(st_model: Any, batch_size: int = 64) -> Encoder:
    """Encoder from a SentenceTransformer (its own pooling / normalisation)."""

    def encode(sentences: Sequence[str]) -> Tensor:
        emb = st_model.encode(list(sentences), batch_size=batch_size, convert_to_tensor=True,
                              show_progress_bar=False)
        return emb.float().cpu()

    return encode


def encode_speed(encoder: Encoder, sentences: Sequence[str], warmup: int = 8) -> float:
    """Sentences per second of ``encoder`` over ``sentences`` (after encoding ``warmup`` of them once)."""
    if not sentences:
        raise ValueError("encode_speed: no sentences")
    if warmup:
        encoder(list(sentences[:warmup]))
    start = time.perf_counter()
    encoder(list(sentences))
    return len(sentences) / max(time.perf_counter() - start, 1e-9)


# --------------------------------------------------------------------------------------------
# everything, per language
# --------------------------------------------------------------------------------------------


def evaluate_multilingual(
    student: Encoder,
    pairs: Sequence[ParallelPair] = (),
    teacher: Encoder | None = None,
    sts: Sequence[StsSet] = (),
    speed: bool = True,
) -> dict[str, float]:
    """Flat metrics per language (keys ``<lang>/...``) and per STS set (``sts/<name>/spearman``):
    - ``<lang>/mse``: MSE x100 of student(translation) to teacher(english) (the paper's MSE),
      ``<lang>/mse_en``: student(english) to teacher(english) — both only with a ``teacher``;
    - ``<lang>/acc_src2tgt``, ``<lang>/acc_tgt2src``, ``<lang>/acc``: translation retrieval
      english -> translation, translation -> english, mean (student embeddings);
    - ``avg/<metric>``: unweighted mean over languages (``avg/sts_spearman`` over STS sets) when
      there are several;
    - ``speed_sent_per_s``: student encode speed over all English sentences of ``pairs``.
    """
    metrics: dict[str, float] = {}
    groups = by_language(pairs)
    per_metric: dict[str, list[float]] = {}
    for lang, group in groups.items():
        english = [p.english for p in group]
        s_en = student(english)  # (N, H)
        s_tr = student([p.translation for p in group])  # (N, H)
        acc = translation_accuracy(s_en, s_tr)
        row = {"acc_src2tgt": acc["src2tgt"], "acc_tgt2src": acc["tgt2src"], "acc": acc["mean"]}
        if teacher is not None:
            t_en = teacher(english)  # (N, H)
            row["mse"] = mse_to_teacher(s_tr, t_en)
            row["mse_en"] = mse_to_teacher(s_en, t_en)
        for key, value in row.items():
            metrics[f"{lang}/{key}"] = value
            per_metric.setdefault(key, []).append(value)
    for s in sts:
        value = sts_spearman(student(s.sentences1), student(s.sentences2), s.scores)
        metrics[f"sts/{s.name}/spearman"] = value
        per_metric.setdefault("sts_spearman", []).append(value)
    for key, values in per_metric.items():
        if len(values) > 1:
            metrics[f"avg/{key}"] = float(np.mean(values))
    if speed and pairs:
        metrics["speed_sent_per_s"] = encode_speed(student, [p.english for p in pairs])
    return metrics
