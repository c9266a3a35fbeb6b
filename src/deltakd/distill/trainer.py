"""The distillation Trainer: wiring only (teacher outputs, losses, weights, logging).

No model surgery happens here: the student arrives built (``models/student.py``), the teacher
frozen. Each loss term is a pure function from ``losses.py``; the weights come from the
``LossSchedule`` (curriculum) at the current epoch; every term is logged on its own.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch import Tensor, nn
from transformers import Trainer

from . import losses as L
from .schedule import LossSchedule

HIDDEN_LOSSES = ("hidden_mse", "hidden_cos")


def freeze(teacher: nn.Module) -> nn.Module:
    """Eval mode (no dropout) and no gradients: the teacher never changes."""
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


class DistillTrainer(Trainer):
    """A ``transformers.Trainer`` whose training loss is a weighted sum of distillation terms.

    ``kind`` is ``"classification"`` (logits (B, C)) or ``"lm"`` (logits (B, L, V), next-token).
    Evaluation reports the student's own loss (cross-entropy), as a user of the student sees it.
    """

    def __init__(self, *args: Any, teacher: nn.Module, schedule: LossSchedule, kind: str, temperature: float = 2.0,
                 jsd_beta: float = 0.5, layer_map: dict[int, int] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.teacher = freeze(teacher).to(self.args.device)
        self.schedule = schedule
        self.kind = kind
        self.temperature = temperature
        self.jsd_beta = jsd_beta
        self.layer_map = layer_map or {}
        self._term_sums: dict[str, float] = defaultdict(float)
        self._term_count = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        weights = {k: w for k, w in self.schedule.weights(float(self.state.epoch or 0.0)).items() if w > 0}
        hidden = any(k in weights for k in HIDDEN_LOSSES)
        labels = inputs["labels"]
        student = model(**inputs, output_hidden_states=hidden)
        teacher = None
        if set(weights) - {"ce"}:  # a student-only loss needs no teacher forward
            with torch.no_grad():
                feed = {k: v for k, v in inputs.items() if k != "labels"}
                teacher = self.teacher(**feed, output_hidden_states=hidden)
        terms = self._terms(weights, student, teacher, labels, inputs.get("attention_mask"), num_items_in_batch)
        loss = sum(weights[k] * v for k, v in terms.items())
        for k, v in terms.items():
            self._term_sums[k] += float(v.detach())
        self._term_count += 1
        return (loss, student) if return_outputs else loss

    def _terms(self, weights: dict[str, float], s: Any, t: Any, labels: Tensor, mask: Tensor | None,
               num_items: Any) -> dict[str, Tensor]:
        T = self.temperature
        out: dict[str, Tensor] = {}
        if self.kind == "lm":
            tok_mask = L.next_token_mask(labels)  # (B, L): positions whose next token is a target
            norm = num_items if num_items is not None else None
            if "ce" in weights:
                out["ce"] = L.lm_ce(s.logits, labels, normalizer=norm)
            if "kd" in weights:
                out["kd"] = L.token_kl(s.logits, t.logits, T, tok_mask, normalizer=norm)
            if "reverse_kl" in weights:
                out["reverse_kl"] = L.token_kl(s.logits, t.logits, T, tok_mask, reverse=True, normalizer=norm)
            if "jsd" in weights:
                out["jsd"] = L.generalized_jsd(s.logits, t.logits, self.jsd_beta, T, tok_mask, normalizer=norm)
        else:
            if "ce" in weights:
                out["ce"] = L.ce_loss(s.logits, labels)
            if "kd" in weights:
                out["kd"] = L.kd_kl(s.logits, t.logits, T)
            if "logits_mse" in weights:
                out["logits_mse"] = L.logits_mse(s.logits, t.logits)
        if "hidden_mse" in weights or "hidden_cos" in weights:
            # layer i is hidden_states[i + 1]; index 0 holds the embeddings
            pairs = [(s.hidden_states[i + 1], t.hidden_states[j + 1]) for i, j in self.layer_map.items()]
            if "hidden_mse" in weights:
                out["hidden_mse"] = torch.stack([L.hidden_mse(a, b, mask=mask) for a, b in pairs]).mean()
            if "hidden_cos" in weights:
                out["hidden_cos"] = torch.stack([L.hidden_cosine(a, b, mask=mask) for a, b in pairs]).mean()
        return out

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add the mean of every loss term since the last log to the training logs."""
        if self._term_count and "loss" in logs:
            for k, v in self._term_sums.items():
                logs[f"loss_{k}"] = v / self._term_count
            self._term_sums.clear()
            self._term_count = 0
        super().log(logs, *args, **kwargs)
