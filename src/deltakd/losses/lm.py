"""Causal-LM token losses: logits (B, L, V), next-token targets, normalised per valid token."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import check_same_shape, check_temperature, normalised_token_sum

__all__ = ["next_token_mask", "token_kl", "generalized_jsd", "lm_ce", "uld", "mapped_kl"]


def next_token_mask(labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Mask (B, L) aligned with logits positions for next-token prediction.

    ``mask[:, i]`` is True when position i predicts a real label ``labels[:, i + 1]``; the last
    position is False. Same tokens as :func:`lm_ce` with ``shift=True`` counts.
    """
    mask = torch.zeros_like(labels, dtype=torch.bool)  # (B, L)
    mask[:, :-1] = labels[:, 1:] != ignore_index
    return mask


def token_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    reverse: bool = False,
    normalizer: float | Tensor | None = None,
) -> Tensor:
    """Per-token KL between next-token distributions, logits (B, L, V).

    Forward ``KL(p_T || p_S)`` (Hinton et al. 2015, per token) or, with ``reverse=True``,
    ``KL(p_S || p_T)`` (MiniLLM, Gu et al. 2024), on ``softmax(logits / T)``, scaled by ``T^2``
    like :func:`kd_kl`. Summed over V, summed over valid tokens (``mask`` (B, L)), divided by
    ``normalizer`` (default: the number of valid tokens). Computed in float32.
    """
    check_temperature(temperature)
    check_same_shape("token_kl", student_logits, teacher_logits)
    s_logp = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (B, L, V)
    t_logp = F.log_softmax(teacher_logits.float() / temperature, dim=-1)  # (B, L, V)
    if reverse:
        per_token = F.kl_div(t_logp, s_logp, reduction="none", log_target=True).sum(-1)  # (B, L)
    else:
        per_token = F.kl_div(s_logp, t_logp, reduction="none", log_target=True).sum(-1)  # (B, L)
    return normalised_token_sum(per_token, mask, normalizer) * temperature**2


def generalized_jsd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    normalizer: float | Tensor | None = None,
) -> Tensor:
    """Generalized Jensen-Shannon divergence per token (GKD, Agarwal et al. 2024).

    With P = teacher, Q = student (softmax of logits / T) and M = beta*P + (1-beta)*Q:
    ``JSD_beta = beta * KL(P || M) + (1 - beta) * KL(Q || M)``. The endpoints, where this is
    identically 0, are taken as the limits the family interpolates between: ``beta=0`` ->
    forward ``KL(P || Q)``, ``beta=1`` -> reverse ``KL(Q || P)``. No ``T^2`` factor.
    Logits (B, L, V); normalised per valid token like :func:`token_kl`.
    """
    check_temperature(temperature)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"generalized_jsd: beta must be in [0, 1], got {beta}")
    check_same_shape("generalized_jsd", student_logits, teacher_logits)
    s_logp = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (B, L, V)
    t_logp = F.log_softmax(teacher_logits.float() / temperature, dim=-1)  # (B, L, V)
    if beta == 0.0:
        per_token = F.kl_div(s_logp, t_logp, reduction="none", log_target=True).sum(-1)  # (B, L)
    elif beta == 1.0:
        per_token = F.kl_div(t_logp, s_logp, reduction="none", log_target=True).sum(-1)  # (B, L)
    else:
        m_logp = torch.logsumexp(
            torch.stack([t_logp + math.log(beta), s_logp + math.log(1.0 - beta)]), dim=0
        )  # (B, L, V)
        kl_p = F.kl_div(m_logp, t_logp, reduction="none", log_target=True).sum(-1)  # KL(P||M) (B, L)
        kl_q = F.kl_div(m_logp, s_logp, reduction="none", log_target=True).sum(-1)  # KL(Q||M) (B, L)
        per_token = beta * kl_p + (1.0 - beta) * kl_q
    return normalised_token_sum(per_token, mask, normalizer)


def lm_ce(
    logits: Tensor,
    labels: Tensor,
    ignore_index: int = -100,
    shift: bool = True,
    normalizer: float | Tensor | None = None,
) -> Tensor:
    """Language-modelling cross-entropy, logits (B, L, V), labels (B, L).

    With ``shift=True`` (HF convention: labels are the input ids, -100 where no loss) position i
    predicts ``labels[:, i + 1]``. Summed over non-ignored tokens and divided by ``normalizer``
    (default: their number).
    """
    if shift:
        logits = logits[:, :-1, :]  # (B, L-1, V)
        labels = labels[:, 1:]  # (B, L-1)
    n_vocab = logits.shape[-1]
    total = F.cross_entropy(
        logits.reshape(-1, n_vocab).float(), labels.reshape(-1), ignore_index=ignore_index, reduction="sum"
    )
    if normalizer is None:
        return total / (labels != ignore_index).sum().clamp_min(1)
    return total / normalizer


def uld(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    normalizer: float | Tensor | None = None,
) -> Tensor:
    """Universal Logit Distillation (Boizard et al. 2024): per token, the L1 distance between the
    student's and the teacher's next-token probabilities each sorted in decreasing order, the shorter
    vector zero-padded to the longer vocabulary. It needs no shared vocabulary: it compares the
    shapes of the two distributions (the Wasserstein-1 distance between them when tokens are placed
    by rank, one unit apart), not which token gets which mass.

    Logits (B, L, Vs) and (B, L, Vt), already paired position by position; ``softmax(logits / T)``;
    no ``T^2`` factor. Summed over valid tokens (``mask`` (B, L)), divided by ``normalizer``
    (default: the number of valid tokens). Computed in float32.
    """
    check_temperature(temperature)
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(f"uld: student positions {tuple(student_logits.shape[:-1])} != teacher positions "
                         f"{tuple(teacher_logits.shape[:-1])}")
    p_s = F.softmax(student_logits.float() / temperature, dim=-1).sort(dim=-1, descending=True).values  # (B, L, Vs)
    p_t = F.softmax(teacher_logits.float() / temperature, dim=-1).sort(dim=-1, descending=True).values  # (B, L, Vt)
    width = max(p_s.shape[-1], p_t.shape[-1])
    p_s = F.pad(p_s, (0, width - p_s.shape[-1]))  # (B, L, V)
    p_t = F.pad(p_t, (0, width - p_t.shape[-1]))  # (B, L, V)
    per_token = (p_s - p_t).abs().sum(-1)  # (B, L)
    return normalised_token_sum(per_token, mask, normalizer)


def mapped_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    vocab_map: Tensor,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    normalizer: float | Tensor | None = None,
) -> Tensor:
    """Token KL to a teacher over another vocabulary, its distribution mapped onto the student's.

    ``vocab_map`` (Vt',) gives for each teacher token the student token that receives its
    probability (-1: none; a map shorter than the teacher's logits leaves the extra rows out). The
    mapped teacher distribution (B, L, Vs), renormalised over the mass that found a student token,
    is the target of ``T^2 KL(target || p_S)`` (:func:`token_kl` with the teacher mapped).
    Logits (B, L, Vs) and (B, L, Vt) paired position by position; normalised per valid token.
    """
    check_temperature(temperature)
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(f"mapped_kl: student positions {tuple(student_logits.shape[:-1])} != teacher positions "
                         f"{tuple(teacher_logits.shape[:-1])}")
    n_t = min(teacher_logits.shape[-1], vocab_map.shape[0])
    p_t = F.softmax(teacher_logits.float() / temperature, dim=-1)[..., :n_t]  # (B, L, Vt)
    keep = vocab_map[:n_t] >= 0  # (Vt,)
    target = p_t.new_zeros(student_logits.shape)  # (B, L, Vs)
    target.index_add_(-1, vocab_map[:n_t][keep], p_t[..., keep])
    target = target / target.sum(-1, keepdim=True).clamp_min(1e-12)  # (B, L, Vs)
    s_logp = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (B, L, Vs)
    per_token = (torch.xlogy(target, target) - target * s_logp).sum(-1)  # KL(target || p_S) (B, L)
    return normalised_token_sum(per_token, mask, normalizer) * temperature**2
