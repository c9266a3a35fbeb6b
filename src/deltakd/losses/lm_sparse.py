"""Causal-LM token losses against a sparse teacher: its top-k next tokens and the mass outside them.

The teacher's next-token distribution at temperature ``T`` is given, per position, by the ids of
its ``k`` most likely tokens, their log-probabilities ``log p_i`` and the log of the remaining
mass ``log p_tail = log(1 - sum_i p_i)`` (what ``deltakd.distill.lm_cache`` stores). Each loss
compares two distributions over ``k + 1`` buckets: the ``k`` teacher top-k ids, and one tail
bucket holding everything else. The student's buckets are its probabilities at the same ids,
``q_i = softmax(z / T)[id_i]``, and its own mass outside those ids, ``q_tail = 1 - sum_i q_i``,
computed as ``1 - sum_i q_i`` (float64) where that is at least 1e-3, else as a logsumexp over the
other ``V - k`` logits (exact however small); its gradient flows to every logit outside the top-k. Then, per token,

- forward ``KL(P || Q) = sum_i p_i (log p_i - log q_i) + p_tail (log p_tail - log q_tail)``,
- reverse ``KL(Q || P) = sum_i q_i (log q_i - log p_i) + q_tail (log q_tail - log p_tail)``,
- ``JSD_beta`` of the same two (k+1)-bucket distributions (GKD; endpoints as in ``lm.generalized_jsd``).

Merging the tail into one bucket can only lower a divergence (data processing): the loss equals the
dense one (``losses.lm``) when the tail is empty (``k = V``) and, for ``k < V``, whenever the student
spreads its tail mass like the teacher; it ignores only how each spreads its tail. The teacher's
``k + 1`` values are renormalised to sum to 1 (they were stored in half precision).

Temperature: the teacher's values are its log-probabilities *at the loss's temperature* (the cache
stores ``log_softmax(z_t / T)`` and has ``T`` in its key): the tail mass at ``T`` cannot be recovered
from the tail mass at ``T = 1`` (it depends on how the tail is spread), so rescaling stored T=1
values would be wrong for ``k < V``. ``temperature`` here scales the student's logits and the
``T^2`` factor (forward and reverse KL, as in ``lm.token_kl``; JSD has none). Normalisation:
summed over valid tokens (``mask`` (B, L)) and divided by ``normalizer`` (default: their number).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .common import check_temperature, normalised_token_sum

__all__ = ["bucket_logprobs", "sparse_generalized_jsd", "sparse_token_kl"]

_FLOOR = -1.0e4  # log of an empty bucket: exp() is exactly 0 in float32, products with it stay finite
_EMPTY = -1.0e30  # the student's tail when the top-k ids cover the whole vocabulary
_EXACT_BELOW = 1.0e-3  # a student tail mass below this is summed over its V - k logits, not as 1 - sum(top-k)


def bucket_logprobs(student_logits: Tensor, top_ids: Tensor, top_logp: Tensor, tail_logp: Tensor,
                    temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Student and teacher log-probabilities over the ``k + 1`` buckets, float32 (B, L, k + 1) each.

    ``student_logits`` (B, L, V); ``top_ids`` (B, L, k) int; ``top_logp`` (B, L, k) and ``tail_logp``
    (B, L): the teacher's log-probabilities at ``temperature``. Bucket ``k`` is the tail.
    """
    check_temperature(temperature)
    if top_ids.shape != top_logp.shape or top_ids.shape[:-1] != student_logits.shape[:-1] \
            or tail_logp.shape != top_ids.shape[:-1]:
        raise ValueError(f"sparse KD: student logits {tuple(student_logits.shape)}, top-k ids "
                         f"{tuple(top_ids.shape)}, log-probs {tuple(top_logp.shape)}, tail {tuple(tail_logp.shape)}")
    ids = top_ids.long()
    z = student_logits.float()  # (B, L, V)
    z = z / temperature if temperature != 1.0 else z
    log_z = z.logsumexp(-1, keepdim=True)  # (B, L, 1)
    s_top = z.gather(-1, ids) - log_z  # (B, L, k)
    s_tail = _student_tail(z, log_z, ids, s_top).unsqueeze(-1)  # (B, L, 1): mass off the top-k ids
    t = torch.cat([top_logp.float(), tail_logp.float().unsqueeze(-1)], dim=-1).clamp_min(_FLOOR)  # (B, L, k+1)
    t = t - t.logsumexp(-1, keepdim=True)  # renormalised: half-precision values sum to 1 again
    s = torch.cat([s_top, s_tail], dim=-1).clamp_min(_FLOOR)  # (B, L, k+1)
    return s, t


def _student_tail(z: Tensor, log_z: Tensor, ids: Tensor, s_top: Tensor) -> Tensor:
    """log of the student's mass off the top-k ids (B, L): ``log(1 - sum_i q_i)`` where that is accurate
    (the rest >= ``_EXACT_BELOW``; float32 log-probs put it within ~1e-6), else, for those positions
    only, a logsumexp over the other ``V - k`` logits (exact however small; -1e30 when k = V). One
    pass over V fewer than masking every position, the same values."""
    rest = 1.0 - s_top.double().logsumexp(-1).exp()  # (B, L)
    exact = rest < _EXACT_BELOW
    tail = rest.clamp_min(_EXACT_BELOW).log().float()  # (B, L); positions under the threshold replaced below
    if bool(exact.any()):
        zz = z[exact].scatter(-1, ids[exact], _EMPTY)  # (n, V), the top-k ids masked out
        tail = tail.index_put((exact,), zz.logsumexp(-1) - log_z[exact].squeeze(-1))
    return tail


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """sum_b p_b (log p_b - log q_b) over the last dim; empty buckets (log at the floor) add 0."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def sparse_token_kl(student_logits: Tensor, top_ids: Tensor, top_logp: Tensor, tail_logp: Tensor,
                    temperature: float = 1.0, mask: Tensor | None = None, reverse: bool = False,
                    normalizer: float | Tensor | None = None) -> Tensor:
    """Per-token forward ``KL(P || Q)`` (or reverse ``KL(Q || P)``) over the k+1 buckets, ``T^2``-scaled,
    summed over valid tokens and divided by ``normalizer``: the sparse form of ``lm.token_kl``."""
    s, t = bucket_logprobs(student_logits, top_ids, top_logp, tail_logp, temperature)
    per_token = _kl(s, t) if reverse else _kl(t, s)  # (B, L)
    return normalised_token_sum(per_token, mask, normalizer) * temperature**2


def sparse_generalized_jsd(student_logits: Tensor, top_ids: Tensor, top_logp: Tensor, tail_logp: Tensor,
                           beta: float = 0.5, temperature: float = 1.0, mask: Tensor | None = None,
                           normalizer: float | Tensor | None = None) -> Tensor:
    """``JSD_beta`` over the k+1 buckets (no ``T^2``): the sparse form of ``lm.generalized_jsd``."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"generalized_jsd: beta must be in [0, 1], got {beta}")
    s, t = bucket_logprobs(student_logits, top_ids, top_logp, tail_logp, temperature)
    if beta == 0.0:
        per_token = _kl(t, s)
    elif beta == 1.0:
        per_token = _kl(s, t)
    else:
        m = torch.logsumexp(torch.stack([t + math.log(beta), s + math.log(1.0 - beta)]), dim=0)  # (B, L, k+1)
        per_token = beta * _kl(t, m) + (1.0 - beta) * _kl(s, m)
    return normalised_token_sum(per_token, mask, normalizer)
