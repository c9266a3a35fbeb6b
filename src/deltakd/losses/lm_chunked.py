"""Causal-LM token losses fused with the LM heads, over chunks of tokens.

The same values and gradients as :mod:`.lm` (``lm_ce``, ``token_kl`` forward / reverse,
``generalized_jsd``), without a full (tokens, vocab) float32 tensor of either model: the inputs
are the models' final hidden states at the valid positions (N, H) and their linear LM heads
(weight (V, H), bias (V,)); logits are made ``chunk_tokens`` rows at a time (the teacher's
without gradients), reduced to per-term sums, and dropped.

Two ways to get the gradients, same numbers:

- ``method="fused"`` (default): per chunk, the gradient of the weighted sum of terms with respect
  to the student's logits is written down in closed form and pushed through the head at once
  (hidden states (N, H), weight (V, H), bias (V,) gradients), inside one
  ``torch.autograd.Function``; backward only scales them by the incoming gradient. No logits are
  made twice.
- ``method="checkpoint"``: each chunk runs the functions of :mod:`.lm` under
  ``torch.utils.checkpoint``; backward makes the chunk's logits again and differentiates them.

Tokens: :func:`valid_tokens` gathers the positions whose next token is a target (the mask of
:func:`.lm.next_token_mask`, the tokens ``lm_ce`` counts). Every term is a sum over those tokens
divided by ``normalizer`` (default: their number), like :mod:`.lm`. The distribution terms compare
the first ``width`` vocabulary entries of both heads (:func:`compared_width`); the cross-entropy
uses the student's full head, like ``lm_ce`` on the full logits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from . import lm
from .common import check_temperature

__all__ = ["CE", "KD", "REVERSE_KL", "JSD", "TERMS", "LinearHead", "valid_tokens", "compared_width",
           "default_chunk_tokens", "fused_lm_losses"]

CE, KD, REVERSE_KL, JSD = "ce", "kd", "reverse_kl", "jsd"  # the loss-table names these terms compute
TERMS = (CE, KD, REVERSE_KL, JSD)
METHODS = ("fused", "checkpoint")
CHUNK_ELEMENTS = 2**25  # default chunk: about 32M logits (128 MiB of float32) per model


@dataclass(frozen=True)
class LinearHead:
    """An LM head ``logits = hidden @ weight.T + bias``."""

    weight: Tensor  # (V, H)
    bias: Tensor | None = None  # (V,)

    def logits(self, hidden: Tensor) -> Tensor:
        return F.linear(hidden, self.weight, self.bias)  # (c, V)


def valid_tokens(hidden: Tensor, labels: Tensor, ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """Hidden states (B, L, H) and labels (B, L) -> hidden states (N, H) at the positions that predict
    a target and those targets (N,) (``labels[:, i + 1]`` for position i), in row-major order."""
    mask = lm.next_token_mask(labels, ignore_index)  # (B, L)
    return hidden[mask], labels[:, 1:][mask[:, :-1]]


def compared_width(student_vocab: int, teacher_vocab: int, vocab: int | None) -> int:
    """Vocabulary entries the distribution terms compare: all when both heads are as wide, else the
    tokenizer's length, at most the narrower head (``terms.LossInputs.token_logits``)."""
    if student_vocab == teacher_vocab:
        return student_vocab
    return min(student_vocab, teacher_vocab, vocab or student_vocab)


def default_chunk_tokens(vocab: int) -> int:
    """Tokens per chunk: about ``CHUNK_ELEMENTS`` logits (1,024 tokens at a 32k vocabulary)."""
    return max(16, CHUNK_ELEMENTS // max(vocab, 1))


@dataclass(frozen=True)
class _Spec:
    names: tuple[str, ...]  # the active terms, in TERMS order
    weights: tuple[float, ...]
    temperature: float
    beta: float
    width: int
    norm: float  # every term is divided by it
    chunk: int


def fused_lm_losses(
    student_hidden: Tensor,
    student_head: LinearHead,
    targets: Tensor,
    weights: Mapping[str, float],
    *,
    teacher_hidden: Tensor | None = None,
    teacher_head: LinearHead | None = None,
    temperature: float = 1.0,
    beta: float = 0.5,
    width: int | None = None,
    normalizer: float | Tensor | None = None,
    chunk_tokens: int | None = None,
    method: str = "fused",
) -> tuple[Tensor, dict[str, Tensor]]:
    """The weighted sum of the named token terms and each term (detached), over N valid tokens.

    ``student_hidden`` (N, Hs) and ``teacher_hidden`` (N, Ht): final hidden states at the valid
    positions (:func:`valid_tokens`); ``targets`` (N,). ``weights``: term name (``TERMS``) ->
    weight. Terms as in :mod:`.lm`: ``ce`` = ``lm_ce``; ``kd`` / ``reverse_kl`` = ``token_kl``
    (``T^2``-scaled) forward / reverse; ``jsd`` = ``generalized_jsd`` at ``beta``. Gradients reach
    ``student_hidden`` and the student head's weight and bias; the teacher gets none.
    """
    unknown = set(weights) - set(TERMS)
    if unknown:
        raise ValueError(f"fused_lm_losses: unknown terms {sorted(unknown)}; known: {', '.join(TERMS)}")
    if method not in METHODS:
        raise ValueError(f"fused_lm_losses: method must be one of {METHODS}, got {method!r}")
    check_temperature(temperature)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"fused_lm_losses: beta must be in [0, 1], got {beta}")
    names = tuple(n for n in TERMS if n in weights)
    n_tok, vs = student_hidden.shape[0], student_head.weight.shape[0]
    if targets.shape != (n_tok,):
        raise ValueError(f"fused_lm_losses: targets {tuple(targets.shape)} for {n_tok} hidden states")
    if any(n != CE for n in names):
        if teacher_hidden is None or teacher_head is None:
            raise ValueError(f"fused_lm_losses: {[n for n in names if n != CE]} need the teacher's hidden states and head")
        if teacher_hidden.shape[0] != n_tok:
            raise ValueError(f"fused_lm_losses: {teacher_hidden.shape[0]} teacher tokens != {n_tok} student tokens")
        width = width or compared_width(vs, teacher_head.weight.shape[0], None)
    norm = float(normalizer) if normalizer is not None else float(max(n_tok, 1))
    spec = _Spec(names, tuple(float(weights[n]) for n in names), temperature, beta, width or vs, norm,
                 chunk_tokens or default_chunk_tokens(vs))
    if spec.chunk < 1:
        raise ValueError(f"fused_lm_losses: chunk_tokens must be >= 1, got {chunk_tokens}")
    if teacher_hidden is None or teacher_head is None:
        teacher_hidden, teacher_head = student_hidden.new_zeros(n_tok, 0), LinearHead(student_hidden.new_zeros(0, 0))
    args = (student_hidden, student_head.weight, student_head.bias, teacher_hidden.detach(),
            teacher_head.weight.detach(), None if teacher_head.bias is None else teacher_head.bias.detach(), targets)
    if method == "fused":
        total, values = _FusedHeadLosses.apply(*args, spec)
    else:
        values = _checkpointed(*args, spec)
        total = sum(w * v for w, v in zip(spec.weights, values))
    return total, {n: values[k].detach() for k, n in enumerate(names)}


# --- method "checkpoint": the functions of .lm per chunk, recomputed in backward ---------------


def _chunk_sums(h: Tensor, w: Tensor, b: Tensor | None, th: Tensor, tw: Tensor, tb: Tensor | None, y: Tensor,
                spec: _Spec) -> Tensor:
    """Per-term sums over one chunk (K,), through the functions of :mod:`.lm` on (1, c, V) logits."""
    z = F.linear(h, w, b)[None]  # (1, c, Vs)
    with torch.no_grad():
        zt = F.linear(th, tw, tb)[None, :, : spec.width] if spec.names != (CE,) else None  # (1, c, width)
    zs, out = z[..., : spec.width], []
    for name in spec.names:
        if name == CE:
            out.append(lm.lm_ce(z, y[None], shift=False, normalizer=1.0))
        elif name == KD:
            out.append(lm.token_kl(zs, zt, spec.temperature, normalizer=1.0))
        elif name == REVERSE_KL:
            out.append(lm.token_kl(zs, zt, spec.temperature, reverse=True, normalizer=1.0))
        else:
            out.append(lm.generalized_jsd(zs, zt, spec.beta, spec.temperature, normalizer=1.0))
    return torch.stack(out)  # (K,)


def _checkpointed(h: Tensor, w: Tensor, b: Tensor | None, th: Tensor, tw: Tensor, tb: Tensor | None, y: Tensor,
                  spec: _Spec) -> Tensor:
    sums = []
    for i in range(0, h.shape[0], spec.chunk):
        j = i + spec.chunk
        sums.append(checkpoint(partial(_chunk_sums, spec=spec), h[i:j], w, b, th[i:j], tw, tb, y[i:j],
                               use_reentrant=False))
    if not sums:
        tied = h.sum() + w.sum() + (0.0 if b is None else b.sum())  # zero gradients, like the reference
        return h.new_zeros(len(spec.names), dtype=torch.float32) + 0.0 * tied
    return torch.stack(sums).sum(0) / spec.norm  # (K,)


# --- method "fused": closed-form gradients, computed in the forward pass --------------------------


def _chunk_values_and_grad(hc: Tensor, w: Tensor, b: Tensor | None, thc: Tensor, tw: Tensor, tb: Tensor | None,
                           y: Tensor, spec: _Spec) -> tuple[list[Tensor], Tensor]:
    """Per-term sums over one chunk and the gradient of ``sum_k weight_k * sum_k / norm`` with respect
    to the student's float32 logits z (c, Vs), made here from the chunk's hidden states. Closed forms,
    with q = softmax(z / T) (student), p = softmax(zt / T) (teacher), m = beta p + (1 - beta) q, per row:
    d CE / dz = softmax(z) - onehot(y); d KL(p||q) / dz = (q - p) / T;
    d KL(q||p) / dz = q (log q - log p - KL(q||p)) / T; d JSD_beta / dz = (1 - beta) q (log q - log m - KL(q||m)) / T.
    The KL terms of ``kd`` / ``reverse_kl`` carry T^2 (value and gradient). Buffers are reused in place:
    about six (c, V) float32 tensors live at once."""
    t, beta = spec.temperature, spec.beta
    coef = {n: w_ / spec.norm for n, w_ in zip(spec.names, spec.weights)}
    z = F.linear(hc, w, b).float()  # (c, Vs), owned here
    grad = torch.zeros_like(z)  # (c, Vs)
    values: dict[str, Tensor] = {}
    if CE in coef:
        logq1 = z.log_softmax(-1)  # (c, Vs)
        values[CE] = -logq1.gather(1, y[:, None]).sum()
        q1 = logq1.exp_()
        q1.scatter_add_(1, y[:, None], torch.full_like(q1[:, :1], -1.0))  # softmax - onehot
        grad.add_(q1, alpha=coef[CE])
        del logq1, q1
    if spec.names == (CE,):
        return [values[CE]], grad
    zs = z[:, : spec.width]
    logq = (zs.div_(t) if t != 1.0 else zs).log_softmax(-1)  # (c, W); z is not needed any more
    del z, zs
    zt = F.linear(thc, tw, tb).float()[:, : spec.width]  # (c, W)
    logp = (zt.div_(t) if t != 1.0 else zt).log_softmax(-1)  # (c, W)
    del zt
    p, q = logp.exp(), logq.exp()
    tmp = torch.empty_like(logq)  # (c, W) scratch
    g = grad[:, : spec.width]  # a view: updates land in grad
    if KD in coef or (JSD in coef and beta == 0.0):
        fwd = torch.sub(logp, logq, out=tmp).mul_(p).sum()  # KL(p||q)
        torch.sub(q, p, out=tmp)  # T * d KL(p||q) / dz
        if KD in coef:
            values[KD] = fwd * t * t
            g.add_(tmp, alpha=coef[KD] * t)
        if JSD in coef and beta == 0.0:
            values[JSD] = fwd
            g.add_(tmp, alpha=coef[JSD] / t)
    if REVERSE_KL in coef or (JSD in coef and beta == 1.0):
        torch.sub(logq, logp, out=tmp)  # log q - log p
        rev = torch.einsum("cv,cv->c", q, tmp)[:, None]  # (c, 1) KL(q||p) per token
        tmp.sub_(rev).mul_(q)  # T * d KL(q||p) / dz
        if REVERSE_KL in coef:
            values[REVERSE_KL] = rev.sum() * t * t
            g.add_(tmp, alpha=coef[REVERSE_KL] * t)
        if JSD in coef and beta == 1.0:
            values[JSD] = rev.sum()
            g.add_(tmp, alpha=coef[JSD] / t)
    if JSD in coef and 0.0 < beta < 1.0:
        logm = torch.logaddexp(torch.add(logp, math.log(beta), out=tmp), logq + math.log(1.0 - beta))  # (c, W)
        kl_p = torch.sub(logp, logm, out=tmp).mul_(p).sum()  # KL(p||m)
        torch.sub(logq, logm, out=tmp)  # log q - log m
        del logm
        kl_q = torch.einsum("cv,cv->c", q, tmp)[:, None]  # (c, 1) KL(q||m) per token
        values[JSD] = beta * kl_p + (1.0 - beta) * kl_q.sum()
        g.add_(tmp.sub_(kl_q).mul_(q), alpha=coef[JSD] * (1.0 - beta) / t)
    return [values[n] for n in spec.names], grad


class _FusedHeadLosses(torch.autograd.Function):
    """(weighted total, per-term values (K,)); the gradients are made in forward, chunk by chunk."""

    @staticmethod
    def forward(ctx, h, w, b, th, tw, tb, y, spec: _Spec):  # noqa: D102
        needs_h, needs_w, needs_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros_like(h) if needs_h else None  # (N, Hs)
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if needs_w else None  # (Vs, Hs)
        grad_b = torch.zeros(w.shape[0], dtype=torch.float32, device=w.device) if needs_b else None  # (Vs,)
        sums = torch.zeros(len(spec.names), dtype=torch.float32, device=h.device)
        for i in range(0, h.shape[0], spec.chunk):
            hc = h[i : i + spec.chunk]  # (c, Hs)
            values, g = _chunk_values_and_grad(hc, w, b, th[i : i + spec.chunk], tw, tb, y[i : i + spec.chunk], spec)
            sums += torch.stack(values)
            if needs_h:
                grad_h[i : i + spec.chunk] = (g.to(w.dtype) @ w).to(h.dtype)
            if needs_w:
                if w.dtype == torch.float32:
                    grad_w.addmm_(g.t(), hc.float())  # (Vs, Hs)
                else:
                    grad_w.add_(g.to(w.dtype).t() @ hc)
            if needs_b:
                grad_b += g.sum(0)
            del g
        values = sums / spec.norm
        total = (values * torch.tensor(spec.weights, dtype=values.dtype, device=values.device)).sum()
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (w.dtype, None if b is None else b.dtype)
        ctx.mark_non_differentiable(values)
        return total, values

    @staticmethod
    def backward(ctx, grad_total, _grad_values):  # noqa: D102
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        scale = lambda g, dtype: None if g is None else (g * grad_total).to(dtype)  # noqa: E731
        return (scale(grad_h, grad_h.dtype if grad_h is not None else None), scale(grad_w, w_dtype),
                scale(grad_b, b_dtype), None, None, None, None, None)
