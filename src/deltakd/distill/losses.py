"""Distillation and task losses as pure functions of tensors.

Conventions:

- Shapes: ``B`` batch, ``L`` sequence length, ``H`` hidden width, ``C`` classes, ``V`` vocabulary,
  ``A`` attention heads, ``r`` LoRA rank.
- ``mask`` is ``(B, L)``, 1/True for real tokens, 0/False for padding; masked means average over
  the unmasked tokens only.
- Nothing here detaches the teacher side: compute teacher outputs under ``torch.no_grad()`` (or
  load them from the cache). Projections that must learn (RAIL-KD heads, width projections) are
  ordinary ``nn.Module`` s passed in or held by the small heads at the end of the classification
  section.
- Causal-LM token losses return ``sum over valid tokens / normalizer``; with the default
  normalizer (the number of valid tokens in this call) the result is the per-token mean, and the
  token-count-weighted mean of micro-batch values equals the full-batch value. Pass
  ``normalizer=num_items_in_batch`` (what the HF Trainer hands to ``compute_loss``) to make
  gradient accumulation exact.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ce_loss",
    "kd_kl",
    "logits_mse",
    "hidden_mse",
    "hidden_cosine",
    "attention_kl",
    "mean_pool",
    "rail_kd_concat",
    "rail_kd_layerwise",
    "RailKDConcatHead",
    "RailKDLayerwiseHead",
    "lora_feature_mse",
    "LoraACapture",
    "capture_lora_a_outputs",
    "next_token_mask",
    "token_kl",
    "generalized_jsd",
    "lm_ce",
]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _check_same_shape(name: str, a: Tensor, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name}: student shape {tuple(a.shape)} != teacher shape {tuple(b.shape)}")


def _masked_token_mean(per_token: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``per_token`` (B, L) over positions where ``mask`` (B, L) is set."""
    if mask is None:
        return per_token.mean()
    m = mask.to(per_token.dtype)  # (B, L)
    return (per_token * m).sum() / m.sum().clamp_min(1.0)


def _normalised_token_sum(per_token: Tensor, mask: Tensor | None, normalizer: float | Tensor | None) -> Tensor:
    """``sum(per_token * mask) / normalizer``; default normalizer = number of valid tokens."""
    if mask is None:
        total = per_token.sum()
        count = per_token.new_tensor(float(per_token.numel()))
    else:
        m = mask.to(per_token.dtype)  # (B, L)
        total = (per_token * m).sum()
        count = m.sum()
    if normalizer is None:
        return total / count.clamp_min(1.0)
    return total / normalizer


# --------------------------------------------------------------------------------------------
# classification / regression heads
# --------------------------------------------------------------------------------------------


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
    _check_temperature(temperature)
    _check_same_shape("kd_kl", student_logits, teacher_logits)
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
    _check_same_shape("logits_mse", student_logits, teacher_logits)
    return F.mse_loss(student_logits, teacher_logits)


# --------------------------------------------------------------------------------------------
# intermediate layers
# --------------------------------------------------------------------------------------------


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
    _check_same_shape("hidden_mse", s, teacher_hidden)
    sq = (s - teacher_hidden).pow(2)  # (B, L, H)
    if mask is None:
        return sq.mean()
    return _masked_token_mean(sq.mean(dim=-1), mask)


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
    _check_same_shape("hidden_cosine", s, teacher_hidden)
    cos = F.cosine_similarity(s, teacher_hidden, dim=-1, eps=1e-8)  # (B, L)
    return _masked_token_mean(1.0 - cos, mask)


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
    _check_same_shape("attention_kl", student_attn, teacher_attn)
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


# --------------------------------------------------------------------------------------------
# LoRA-feature intermediate-layer distillation (LoRAILD)
# --------------------------------------------------------------------------------------------


def lora_feature_mse(
    student_feats: Sequence[Tensor],
    teacher_feats: Sequence[Tensor],
    mask: Tensor | None = None,
) -> Tensor:
    """LoRAILD: MSE between outputs of matching ``lora_A`` modules of student and teacher.

    Each pair is (B, L, r) with the same rank r, so no projection is needed. Per pair: mean over
    r and unmasked tokens; result: mean over pairs.
    """
    if len(student_feats) == 0 or len(student_feats) != len(teacher_feats):
        raise ValueError(
            f"lora_feature_mse: need the same non-zero number of features, got "
            f"{len(student_feats)} student / {len(teacher_feats)} teacher"
        )
    losses = [hidden_mse(s, t, mask=mask) for s, t in zip(student_feats, teacher_feats)]
    return torch.stack(losses).mean()


_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


class LoraACapture:
    """Outputs of hooked ``lora_A`` linears, filled by :func:`capture_lora_a_outputs`.

    ``names`` lists the hooked modules (``<lora layer>.lora_A.<adapter>``) in model order, which
    is layer order. ``outputs[name]`` holds every output of that module since the last
    :meth:`clear`, in call order (more than one when a layer is reused, e.g. recurrence).
    """

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.outputs: dict[str, list[Tensor]] = {}

    def clear(self) -> None:
        self.outputs.clear()

    def features(self) -> list[Tensor]:
        """Captured outputs (B, L, r) in model (layer) order; modules that did not run are skipped."""
        return [t for name in self.names for t in self.outputs.get(name, [])]

    def by_layer(self) -> dict[int, list[Tensor]]:
        """Captured outputs grouped by transformer layer index (first integer in the module name)."""
        grouped: dict[int, list[Tensor]] = {}
        for name in self.names:
            match = _LAYER_INDEX.search(name)
            if match is None:
                continue
            grouped.setdefault(int(match.group(1)), []).extend(self.outputs.get(name, []))
        return {k: v for k, v in grouped.items() if v}


@contextmanager
def capture_lora_a_outputs(
    model: nn.Module,
    module_names_filter: Sequence[str] | None = ("query", "key", "value"),
    adapter_name: str | None = None,
) -> Iterator[LoraACapture]:
    """Register forward hooks on peft LoRA ``lora_A`` linears and collect their outputs.

    A peft ``LoraLayer`` keeps ``lora_A`` as an ``nn.ModuleDict`` keyed by adapter name. Layers
    are selected by the last component of their module name (``"query"`` in
    ``...attention.self.query``); ``None`` hooks every LoRA layer. ``adapter_name=None`` hooks
    every adapter (only active ones run). Outputs keep their autograd graph (for the student);
    peft applies LoRA dropout *before* ``lora_A``, so these are post-dropout features in train
    mode. Hooks are removed when the block exits. Usage::

        with capture_lora_a_outputs(student) as cap:
            out = student(**batch)
        feats = cap.features()  # list of (B, L, r)
    """
    wanted = None if module_names_filter is None else set(module_names_filter)
    handles = []
    names: list[str] = []
    capture = LoraACapture(names)

    def make_hook(key: str):
        def hook(_module: nn.Module, _inputs: tuple, output: Tensor) -> None:
            capture.outputs.setdefault(key, []).append(output)  # (B, L, r)

        return hook

    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if not isinstance(lora_a, nn.ModuleDict):
            continue
        if wanted is not None and name.rsplit(".", 1)[-1] not in wanted:
            continue
        for adapter, linear in lora_a.items():
            if adapter_name is not None and adapter != adapter_name:
                continue
            key = f"{name}.lora_A.{adapter}"
            names.append(key)
            handles.append(linear.register_forward_hook(make_hook(key)))
    if not handles:
        raise ValueError(
            f"capture_lora_a_outputs: no LoRA lora_A modules matching {sorted(wanted) if wanted else 'any'}"
            f" (adapter {adapter_name or 'any'}) in {type(model).__name__}"
        )
    try:
        yield capture
    finally:
        for handle in handles:
            handle.remove()


# --------------------------------------------------------------------------------------------
# causal-LM token losses
# --------------------------------------------------------------------------------------------


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
    _check_temperature(temperature)
    _check_same_shape("token_kl", student_logits, teacher_logits)
    s_logp = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (B, L, V)
    t_logp = F.log_softmax(teacher_logits.float() / temperature, dim=-1)  # (B, L, V)
    if reverse:
        per_token = F.kl_div(t_logp, s_logp, reduction="none", log_target=True).sum(-1)  # (B, L)
    else:
        per_token = F.kl_div(s_logp, t_logp, reduction="none", log_target=True).sum(-1)  # (B, L)
    return _normalised_token_sum(per_token, mask, normalizer) * temperature**2


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
    _check_temperature(temperature)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"generalized_jsd: beta must be in [0, 1], got {beta}")
    _check_same_shape("generalized_jsd", student_logits, teacher_logits)
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
    return _normalised_token_sum(per_token, mask, normalizer)


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
