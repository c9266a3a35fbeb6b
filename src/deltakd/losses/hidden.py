"""Losses on intermediate layers: hidden states (B, L, H), attention maps (B, A, L, L), pooled layers (B, H)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .common import check_same_shape, masked_token_mean

__all__ = [
    "hidden_mse",
    "hidden_cosine",
    "attention_kl",
    "mean_pool",
    "rail_kd_concat",
    "rail_kd_layerwise",
    "RailKDConcatHead",
    "RailKDLayerwiseHead",
]


def hidden_mse(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    proj: nn.Module | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """MSE between hidden states (FitNets, Romero et al. 2015; TinyBERT, Jiao et al. 2020).

    ``student_hidden`` (B, L, Hs), ``teacher_hidden`` (B, L, Ht); ``proj`` maps Hs -> Ht when the
    widths differ. Mean over hidden units and unmasked tokens. Also accepts (B, H) inputs
    (pooled vectors) when ``mask`` is None.
    """
    s = proj(student_hidden) if proj is not None else student_hidden  # (B, L, Ht)
    check_same_shape("hidden_mse", s, teacher_hidden)
    sq = (s - teacher_hidden).pow(2)  # (B, L, H)
    if mask is None:
        return sq.mean()
    return masked_token_mean(sq.mean(dim=-1), mask)


def hidden_cosine(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    proj: nn.Module | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """Cosine-embedding loss ``1 - cos(s_i, t_i)`` per token, mean over unmasked tokens.

    As used for hidden states in DistilBERT (Sanh et al. 2019). Shapes (B, L, Hs) / (B, L, Ht).
    """
    s = proj(student_hidden) if proj is not None else student_hidden  # (B, L, Ht)
    check_same_shape("hidden_cosine", s, teacher_hidden)
    cos = F.cosine_similarity(s, teacher_hidden, dim=-1, eps=1e-8)  # (B, L)
    return masked_token_mean(1.0 - cos, mask)


def attention_kl(
    student_attn: Tensor,
    teacher_attn: Tensor,
    mask: Tensor | None = None,
    eps: float = 1e-12,
) -> Tensor:
    """KL(teacher || student) between self-attention distributions (MiniLM, Wang et al. 2020).

    Inputs are attention *probabilities* (B, A, L, L) as returned with ``output_attentions=True``
    (rows over keys sum to 1). The KL is summed over keys and averaged over heads and valid
    query positions (``mask`` (B, L) selects the queries; padded keys already carry ~0
    probability in the teacher). Student and teacher need the same number of heads.
    """
    check_same_shape("attention_kl", student_attn, teacher_attn)
    t = teacher_attn.float()
    s = student_attn.float()
    kl = (torch.xlogy(t, t) - t * torch.log(s.clamp_min(eps))).sum(dim=-1)  # (B, A, L)
    if mask is None:
        return kl.mean()
    n_heads = kl.shape[1]
    qm = mask.to(kl.dtype)[:, None, :]  # (B, 1, L)
    return (kl * qm).sum() / (qm.sum() * n_heads).clamp_min(1.0)


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean of token vectors over unmasked positions: (B, L, H), (B, L) -> (B, H)."""
    m = mask.to(hidden.dtype).unsqueeze(-1)  # (B, L, 1)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)  # (B, H)


# --------------------------------------------------------------------------------------------
# RAIL-KD (Haidar et al. 2022, "RAIL-KD: RAndom Intermediate Layer Mapping for Knowledge
# Distillation", Findings of NAACL 2022)
# --------------------------------------------------------------------------------------------


def _check_layer_lists(name: str, student: Sequence[Tensor], teacher: Sequence[Tensor]) -> None:
    if len(student) == 0 or len(student) != len(teacher):
        raise ValueError(
            f"{name}: need the same non-zero number of layers, got {len(student)} student / {len(teacher)} teacher"
        )


def rail_kd_concat(
    student_pooled: Sequence[Tensor],
    teacher_pooled: Sequence[Tensor],
    proj_s: nn.Module,
    proj_t: nn.Module,
) -> Tensor:
    """RAIL-KD, concatenated variant (RAIL-KD_c).

    Exactly: for each selected layer the pooled vector (B, Hs) / (B, Ht) is L2-normalised;
    the k student vectors are concatenated to (B, k*Hs) and the k teacher vectors to (B, k*Ht);
    ``proj_s`` maps the student concat and ``proj_t`` the teacher concat to a common width D;
    the loss is ``mse_loss(proj_s(cat_s), proj_t(cat_t))``, the mean over B*D elements.
    Layers are paired by position in the lists (the i-th selected student layer with the i-th
    sorted random teacher layer).
    """
    _check_layer_lists("rail_kd_concat", student_pooled, teacher_pooled)
    cat_s = torch.cat([F.normalize(x, dim=-1) for x in student_pooled], dim=-1)  # (B, k*Hs)
    cat_t = torch.cat([F.normalize(x, dim=-1) for x in teacher_pooled], dim=-1)  # (B, k*Ht)
    return F.mse_loss(proj_s(cat_s), proj_t(cat_t))  # (B, D) vs (B, D)


def rail_kd_layerwise(
    student_pooled: Sequence[Tensor],
    teacher_pooled: Sequence[Tensor],
    projs_s: Sequence[nn.Module | None],
    projs_t: Sequence[nn.Module | None],
) -> Tensor:
    """RAIL-KD, layer-wise variant (RAIL-KD_l).

    Exactly: for each layer pair i, ``u = normalize(projs_s[i](s_i))`` and
    ``v = normalize(projs_t[i](t_i))`` (projections to a common width D; ``None`` = identity),
    loss_i = ``mse_loss(u, v)`` (mean over B*D), and the result is the mean of loss_i over pairs.
    Pooled inputs (B, Hs) / (B, Ht).
    """
    _check_layer_lists("rail_kd_layerwise", student_pooled, teacher_pooled)
    if len(projs_s) != len(student_pooled) or len(projs_t) != len(teacher_pooled):
        raise ValueError(
            f"rail_kd_layerwise: {len(student_pooled)} layer pairs but {len(projs_s)} student / "
            f"{len(projs_t)} teacher projections"
        )
    losses = []
    for s, t, ps, pt in zip(student_pooled, teacher_pooled, projs_s, projs_t):
        u = F.normalize(ps(s) if ps is not None else s, dim=-1)  # (B, D)
        v = F.normalize(pt(t) if pt is not None else t, dim=-1)  # (B, D)
        losses.append(F.mse_loss(u, v))
    return torch.stack(losses).mean()


class RailKDConcatHead(nn.Module):
    """Owns the two projections of :func:`rail_kd_concat` for ``n_layers`` selected layers."""

    def __init__(self, n_layers: int, hidden_student: int, hidden_teacher: int, dim: int) -> None:
        super().__init__()
        self.n_layers = n_layers
        self.proj_s = nn.Linear(n_layers * hidden_student, dim)
        self.proj_t = nn.Linear(n_layers * hidden_teacher, dim)

    def forward(self, student_pooled: Sequence[Tensor], teacher_pooled: Sequence[Tensor]) -> Tensor:
        if len(student_pooled) != self.n_layers:
            raise ValueError(f"RailKDConcatHead built for {self.n_layers} layers, got {len(student_pooled)}")
        return rail_kd_concat(student_pooled, teacher_pooled, self.proj_s, self.proj_t)


class RailKDLayerwiseHead(nn.Module):
    """Owns one student and one teacher projection per layer pair for :func:`rail_kd_layerwise`.

    Projection i serves the i-th pair of the selection (position, not teacher layer index).
    """

    def __init__(self, n_layers: int, hidden_student: int, hidden_teacher: int, dim: int) -> None:
        super().__init__()
        self.n_layers = n_layers
        self.projs_s = nn.ModuleList(nn.Linear(hidden_student, dim) for _ in range(n_layers))
        self.projs_t = nn.ModuleList(nn.Linear(hidden_teacher, dim) for _ in range(n_layers))

    def forward(self, student_pooled: Sequence[Tensor], teacher_pooled: Sequence[Tensor]) -> Tensor:
        if len(student_pooled) != self.n_layers:
            raise ValueError(f"RailKDLayerwiseHead built for {self.n_layers} layers, got {len(student_pooled)}")
        return rail_kd_layerwise(student_pooled, teacher_pooled, list(self.projs_s), list(self.projs_t))
