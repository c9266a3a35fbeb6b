"""Losses on classification / regression head outputs: logits (B, C), or (B, 1) for regression."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .common import check_same_shape, check_temperature

__all__ = ["ce_loss", "kd_kl", "logits_mse"]


def ce_loss(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Hard-label task loss.

    ``logits`` (B, C) with ``labels`` (B,) int -> cross-entropy (mean over non-ignored rows).
    ``logits`` (B, 1) with ``labels`` (B,) float -> MSE (regression, e.g. STS-B).
    """
    if logits.shape[-1] == 1:
        return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))  # (B,) vs (B,)
    return F.cross_entropy(logits, labels.long(), ignore_index=ignore_index)


def kd_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Soft-target distillation loss (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network").

    ``T^2 * KL(softmax(t/T) || softmax(s/T))`` with ``batchmean`` reduction: the KL summed over
    classes, averaged over rows. Logits (B, C); extra leading dims are flattened into rows.
    The ``T^2`` factor keeps gradient magnitudes comparable across temperatures.
    """
    check_temperature(temperature)
    check_same_shape("kd_kl", student_logits, teacher_logits)
    n_classes = student_logits.shape[-1]
    if n_classes == 1:
        raise ValueError("kd_kl: logits have 1 column (regression); use logits_mse instead")
    s = student_logits.reshape(-1, n_classes)  # (N, C)
    t = teacher_logits.reshape(-1, n_classes)  # (N, C)
    s_logp = F.log_softmax(s / temperature, dim=-1)  # (N, C)
    t_logp = F.log_softmax(t / temperature, dim=-1)  # (N, C)
    kl = F.kl_div(s_logp, t_logp, reduction="batchmean", log_target=True)
    return kl * temperature**2


def logits_mse(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """MSE between raw logits (Ba et al. 2014 logit matching); mean over all elements. (B, C)."""
    check_same_shape("logits_mse", student_logits, teacher_logits)
    return F.mse_loss(student_logits, teacher_logits)
