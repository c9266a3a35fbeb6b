"""One compute function per entry of the loss table: ``LossInputs`` -> scalar tensor.

Each function reads what its entry declares (``table.LossSpec.needs``) from ``LossInputs`` and
calls the pure loss functions; the per-layer views that several terms share (mapped hidden
states, pooled layers, the next-token mask) are computed once per step, on first use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from torch import Tensor, nn

from . import hidden, lm, lm_sparse, logits, lora


@dataclass
class LossInputs:
    """Everything a compute function may read, for one training step.

    Layer ``i`` of a model is ``hidden_states[i + 1]`` (index 0 holds the embeddings);
    ``pairs`` maps student layer ``i`` to teacher layers ``js`` (a group is averaged).
    """

    kind: str  # "classification" or "lm"
    student: Any  # model output: .logits (B, C) / (B, L, V); .hidden_states, .attentions when requested
    labels: Tensor  # (B,) class ids or floats (regression); (B, L) token ids, -100 where no loss (lm)
    teacher: Any = None  # live teacher output, the token cache's (.logits, .hidden_states), or None (pooled cache)
    teacher_logits: Tensor | None = None  # (B, C) / (B, L, V), live or cached
    teacher_pooled: Tensor | None = None  # (B, n_layers + 1, Ht) cached mean-pooled layers
    mask: Tensor | None = None  # (B, L) attention mask
    normalizer: Any = None  # lm token losses: num_items_in_batch; None: per valid token in this call
    temperature: float = 1.0
    jsd_beta: float = 0.5
    pairs: list[tuple[int, list[int]]] = field(default_factory=list)
    heads: Any = None  # DistillHeads: .hidden_proj(i), .rail_c / .rail_c_target(), .rail_l / .rail_l_targets()
    student_lora: lora.LoraACapture | None = None
    teacher_lora: lora.LoraACapture | None = None
    vocab: int | None = None  # lm: the shared tokenizer's length (logits of different widths compare up to it)
    teacher_topk: Any = None  # lm: the cached sparse teacher (.ids, .logp (B, L, k), .tail (B, L), .width), or None
    aligned: Tensor | None = None  # lm (B, L) bool: a teacher position ends at the same text offset (cross-tokenizer)
    vocab_map: Tensor | None = None  # cross-tokenizer (Vt,): the student token each teacher token maps to, -1: none

    @cached_property
    def token_mask(self) -> Tensor:
        """(B, L): positions whose next token is a target (lm)."""
        return lm.next_token_mask(self.labels)

    @cached_property
    def token_logits(self) -> tuple[Tensor, Tensor]:
        """lm: student and teacher logits (B, L, V) over the same tokens. Of different widths (one
        embedding padded with extra rows over the same tokenizer), both are cut to the tokenizer's
        length (at most the narrower width); extra rows are never a target."""
        s, t = self.student.logits, self.teacher_logits
        if s.shape[-1] == t.shape[-1]:
            return s, t
        width = min(s.shape[-1], t.shape[-1], self.vocab or s.shape[-1])
        return s[..., :width], t[..., :width]

    @property
    def sparse(self) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
        """lm from the top-k cache: student logits cut to the cached width, teacher ids, log-probs, tail."""
        c = self.teacher_topk
        return None if c is None else (self.student.logits[..., :c.width], c.ids, c.logp, c.tail)

    @cached_property
    def mapped_hidden(self) -> list[tuple[int, Tensor, Tensor]]:
        """Per pair: student layer i, its hidden states (B, L, Hs), the teacher group's mean (B, L, Ht)."""
        s, t = self.student, self.teacher
        return [(i, s.hidden_states[i + 1], torch.stack([t.hidden_states[j + 1] for j in js]).mean(0))
                for i, js in self.pairs]

    @cached_property
    def mapped_pooled(self) -> tuple[list[Tensor], list[Tensor]]:
        """Mean-pooled student layers k x (B, Hs) and teacher groups k x (B, Ht), from the cache if it served."""
        s_pool = [hidden.mean_pool(self.student.hidden_states[i + 1], self.mask) for i, _ in self.pairs]
        if self.teacher_pooled is None:  # live teacher
            t_pool = [torch.stack([hidden.mean_pool(self.teacher.hidden_states[j + 1], self.mask) for j in js]).mean(0)
                      for _, js in self.pairs]
        else:
            t_pool = [self.teacher_pooled[:, [j + 1 for j in js]].mean(1) for _, js in self.pairs]
        return s_pool, t_pool

    def hidden_proj(self, student_layer: int) -> nn.Module | None:
        return self.heads.hidden_proj(student_layer) if self.heads is not None else None


# --- logits ----------------------------------------------------------------------------------


def ce(x: LossInputs) -> Tensor:
    if x.kind == "lm":
        return lm.lm_ce(x.student.logits, x.labels, normalizer=x.normalizer)
    return logits.ce_loss(x.student.logits, x.labels)


def kd(x: LossInputs) -> Tensor:
    if x.kind == "lm" and x.sparse is not None:
        return lm_sparse.sparse_token_kl(*x.sparse, x.temperature, x.token_mask, normalizer=x.normalizer)
    if x.kind == "lm":
        return lm.token_kl(*x.token_logits, x.temperature, x.token_mask, normalizer=x.normalizer)
    return logits.kd_kl(x.student.logits, x.teacher_logits, x.temperature)


def reverse_kl(x: LossInputs) -> Tensor:
    if x.sparse is not None:
        return lm_sparse.sparse_token_kl(*x.sparse, x.temperature, x.token_mask, reverse=True,
                                         normalizer=x.normalizer)
    return lm.token_kl(*x.token_logits, x.temperature, x.token_mask, reverse=True,
                       normalizer=x.normalizer)


def jsd(x: LossInputs) -> Tensor:
    if x.sparse is not None:
        return lm_sparse.sparse_generalized_jsd(*x.sparse, x.jsd_beta, x.temperature, x.token_mask,
                                                normalizer=x.normalizer)
    return lm.generalized_jsd(*x.token_logits, x.jsd_beta, x.temperature, x.token_mask,
                              normalizer=x.normalizer)


def uld(x: LossInputs) -> Tensor:
    """Across tokenizers ``teacher_logits`` (B, L, Vt) hold the teacher position paired with each
    student position; only positions with a pair (``aligned``) count."""
    mask = x.token_mask if x.aligned is None else x.token_mask & x.aligned
    return lm.uld(x.student.logits, x.teacher_logits, x.temperature, mask, normalizer=x.normalizer)


def kd_mapped(x: LossInputs) -> Tensor:
    """Like ``uld`` on the paired positions; the teacher's distribution mapped onto the student's
    vocabulary by ``vocab_map`` (none: the same tokenizer, token i to token i)."""
    mask = x.token_mask if x.aligned is None else x.token_mask & x.aligned
    s, t = (x.student.logits, x.teacher_logits) if x.aligned is not None else x.token_logits
    vocab_map = x.vocab_map if x.vocab_map is not None else torch.arange(t.shape[-1], device=t.device)
    return lm.mapped_kl(s, t, vocab_map, x.temperature, mask, normalizer=x.normalizer)


def logits_mse(x: LossInputs) -> Tensor:
    return logits.logits_mse(x.student.logits, x.teacher_logits)


# --- layers: mean over the mapped pairs --------------------------------------------------------


def hidden_mse(x: LossInputs) -> Tensor:
    return torch.stack([hidden.hidden_mse(a, b, x.hidden_proj(i), x.mask) for i, a, b in x.mapped_hidden]).mean()


def hidden_cos(x: LossInputs) -> Tensor:
    return torch.stack([hidden.hidden_cosine(a, b, x.hidden_proj(i), x.mask) for i, a, b in x.mapped_hidden]).mean()


def attention_kl(x: LossInputs) -> Tensor:
    s, t = x.student, x.teacher
    return torch.stack([
        hidden.attention_kl(s.attentions[i], torch.stack([t.attentions[j] for j in js]).mean(0), x.mask)  # (B, A, L, L)
        for i, js in x.pairs]).mean()


def rail_c(x: LossInputs) -> Tensor:
    s_pool, t_pool = x.mapped_pooled
    return hidden.rail_kd_concat(s_pool, t_pool, x.heads.rail_c, x.heads.rail_c_target())


def rail_l(x: LossInputs) -> Tensor:
    s_pool, t_pool = x.mapped_pooled
    return hidden.rail_kd_layerwise(s_pool, t_pool, list(x.heads.rail_l), x.heads.rail_l_targets())


def lora_ild(x: LossInputs) -> Tensor:
    """Student layer i's lora_A outputs against the mean of its teacher group's (LoRAILD averages a
    group; ``fixed`` and the random maps give groups of one). Module m of student layer i is matched
    with the mean of module m over the group's layers: the same modules run in every layer, in order."""
    s_by, t_by = x.student_lora.by_layer(), x.teacher_lora.by_layer()
    feats_s: list[Tensor] = []
    feats_t: list[Tensor] = []
    for i, js in x.pairs:
        group = [t_by.get(j, []) for j in js]  # per teacher layer: n_modules x (B, L, r)
        if len({len(g) for g in group}) != 1:
            raise ValueError(f"lora_ild: teacher layers {js} have different numbers of lora_A outputs "
                             f"({[len(g) for g in group]})")
        feats_s.extend(s_by.get(i, []))  # (B, L, r) each
        feats_t.extend(torch.stack(fs).mean(0) for fs in zip(*group))  # (B, L, r): the group's mean per module
    return lora.lora_feature_mse(feats_s, feats_t, x.mask)
