"""Losses for multilingual sentence-embedding distillation, as pure functions of tensors.

Shapes: ``B`` batch of parallel pairs, ``H`` embedding width. Row *i* of every argument belongs
to pair *i* (English sentence *i* and its translation), so the in-batch objectives use the other
rows as negatives. Nothing here detaches the teacher side: compute teacher embeddings under
``torch.no_grad()`` (they are fixed targets, typically precomputed once per English sentence).

``loss_terms``: the recipe's active terms (``LossConfig``), the in-batch ones over every
process's rows under torchrun (``gather``).

Objectives (the ``multistage`` family's ``mse`` / ``ce`` / ``bool`` variants and MCL):

- ``reimers_mse``: Reimers & Gurevych 2020, student(en) and student(translation) regressed onto
  teacher(en). The baseline.
- ``info_nce``: InfoNCE (van den Oord et al. 2018) over in-batch translation pairs with
  temperature, optionally symmetric (both directions averaged, as CLIP, Radford et al. 2021).
  Multilingual contrastive learning (MCL, Ding et al. 2022) is this loss on translation pairs,
  e.g. ``info_nce(student(translation), teacher(en), symmetric=True)``.
- ``in_batch_ce``: the cross-entropy variant: classify, for each query row, which in-batch
  candidate is its translation (one direction only, no symmetric term). Equals
  ``info_nce(..., symmetric=False)`` and sentence-transformers' MultipleNegativesRankingLoss
  with ``scale = 1 / temperature``.
- ``in_batch_bce``: the binary ("bool") variant: every in-batch (query, candidate) cell is an
  independent yes/no "is this the translation?" decision, BCE on ``cos / temperature + bias``
  (the pairwise sigmoid loss of SigLIP, Zhai et al. 2023, averaged over cells).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from .recipe import LossConfig

__all__ = [
    "cosine_logits",
    "in_batch_bce",
    "in_batch_ce",
    "info_nce",
    "loss_terms",
    "mcl_loss",
    "reimers_mse",
]


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _check_pairs(name: str, a: Tensor, b: Tensor) -> None:
    if a.dim() != 2 or a.shape != b.shape:
        raise ValueError(f"{name}: expected two (B, H) tensors of the same shape, got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")


def reimers_mse(student_en: Tensor, student_tr: Tensor, teacher_en: Tensor) -> Tensor:
    """Multilingual knowledge distillation (Reimers & Gurevych 2020, EMNLP).

    ``0.5 * (MSE(student_en, teacher_en) + MSE(student_tr, teacher_en))``, each MSE averaged over
    the batch and the embedding dimensions; all inputs (B, H). This is exactly what
    sentence-transformers' ``MSELoss`` computes for an (english, translation) dataset labelled
    with teacher(english) (mean of the per-column MSEs). The paper writes the sum of the two terms,
    i.e. twice this value (same optimum; halve the learning rate to match a sum).
    """
    _check_pairs("reimers_mse", student_en, teacher_en)
    _check_pairs("reimers_mse", student_tr, teacher_en)
    return 0.5 * (F.mse_loss(student_en, teacher_en) + F.mse_loss(student_tr, teacher_en))


def cosine_logits(queries: Tensor, keys: Tensor, temperature: float = 0.05) -> Tensor:
    """Cosine-similarity matrix divided by the temperature: (B, H), (B, H) -> (B, B);
    cell ``[i, j] = cos(queries_i, keys_j) / temperature``."""
    _check_temperature(temperature)
    q = F.normalize(queries, p=2, dim=-1, eps=1e-8)  # (B, H)
    k = F.normalize(keys, p=2, dim=-1, eps=1e-8)  # (B, H)
    return q @ k.transpose(0, 1) / temperature  # (B, B)


def info_nce(queries: Tensor, keys: Tensor, temperature: float = 0.05, symmetric: bool = False) -> Tensor:
    """InfoNCE over in-batch pairs (van den Oord et al. 2018): ``queries_i`` should pick ``keys_i``
    among all ``keys_j`` of the batch.

    ``logits = cos(queries, keys) / temperature`` (B, B); loss = mean over rows of
    ``-log softmax(logits_i)[i]``. ``symmetric=True`` averages that with the same loss over
    columns (``keys_j`` picking ``queries_j``). Inputs (B, H); the default temperature 0.05
    equals sentence-transformers' scale 20.
    """
    _check_pairs("info_nce", queries, keys)
    logits = cosine_logits(queries, keys, temperature)  # (B, B)
    target = torch.arange(logits.shape[0], device=logits.device)  # (B,)
    loss = F.cross_entropy(logits, target)
    if symmetric:
        loss = 0.5 * (loss + F.cross_entropy(logits.transpose(0, 1), target))
    return loss


def mcl_loss(student_tr: Tensor, teacher_en: Tensor, temperature: float = 0.05, symmetric: bool = True) -> Tensor:
    """Multilingual contrastive learning (MCL, Ding et al. 2022): symmetric InfoNCE between the
    student's translations and the teacher's English embeddings, (B, H) each. Pull each
    translation onto its own English sentence in teacher space, push it away from the other
    English sentences of the batch. Usually added to ``reimers_mse`` with a weight."""
    return info_nce(student_tr, teacher_en, temperature=temperature, symmetric=symmetric)


def in_batch_ce(queries: Tensor, keys: Tensor, temperature: float = 0.05) -> Tensor:
    """Cross-entropy variant: for each query row, classify the index of its translation among the
    B in-batch keys; ``CE(cos(queries, keys) / temperature, arange(B))``, rows only. (B, H) inputs."""
    return info_nce(queries, keys, temperature=temperature, symmetric=False)


def in_batch_bce(
    queries: Tensor, keys: Tensor, temperature: float = 0.05, bias: float | Tensor = 0.0
) -> Tensor:
    """Binary ("bool") variant: BCE on every in-batch cell, target 1 on the diagonal (the
    translation), 0 elsewhere, logits ``cos(queries_i, keys_j) / temperature + bias`` (B, B).

    Mean over all B*B cells (SigLIP, Zhai et al. 2023, sums over cells and averages over rows:
    B times this value). With ``bias = 0`` a negative cell has loss ``log 2`` at cos = 0, so
    negatives push towards negative cosine; a negative ``bias`` (SigLIP starts at -10 with
    temperature 0.1) lets orthogonal pairs count as "no". ``bias`` may be a learnable scalar.
    """
    _check_pairs("in_batch_bce", queries, keys)
    logits = cosine_logits(queries, keys, temperature) + bias  # (B, B)
    target = torch.eye(logits.shape[0], device=logits.device, dtype=logits.dtype)  # (B, B)
    return F.binary_cross_entropy_with_logits(logits, target)


IN_BATCH = ("mcl", "ce", "bool")  # the terms whose negatives are the other rows of the batch


def loss_terms(s_en: Tensor, s_tr: Tensor, t_en: Tensor, cfg: LossConfig,
               gather: Callable[[Tensor], Tensor] | None = None) -> dict[str, Tensor]:
    """The active terms, each (): student English / translation (B, H), teacher English (B, H).

    ``gather`` (``processes.gather_rows`` under torchrun) turns this process's rows into the
    global batch's for the in-batch terms, so their negatives are every process's rows and their
    value is the one-process value of the global batch; the MSE stays per process (its mean over
    processes, as DDP averages gradients, is the global batch's MSE)."""
    w = cfg.weights()
    out: dict[str, Tensor] = {}
    if w["mse"] > 0:
        out["mse"] = reimers_mse(s_en, s_tr, t_en)
    if any(w[k] > 0 for k in IN_BATCH):
        q, keys = (gather(s_tr), gather(t_en)) if gather is not None else (s_tr, t_en)  # (B_global, H)
        if w["mcl"] > 0:
            out["mcl"] = mcl_loss(q, keys, temperature=cfg.temperature)
        if w["ce"] > 0:
            out["ce"] = in_batch_ce(q, keys, temperature=cfg.temperature)
        if w["bool"] > 0:
            out["bool"] = in_batch_bce(q, keys, temperature=cfg.temperature, bias=cfg.bool_bias)
    return out
