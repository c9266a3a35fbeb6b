"""The distillation Trainer: wiring only (teacher outputs, losses, weights, logging).

No model surgery happens here: the student arrives built (``models/student.py``), the teacher
frozen, the projections built (``heads.py``), the layer map validated (``layer_map.py``). Each
loss term is a pure function from ``deltakd.losses``; the weights come from the ``LossSchedule``
(curriculum) at the current epoch; every term is logged on its own as ``loss_<term>``.

Teacher outputs come from the on-disk cache (``cache.py``: logits and pooled layers) when every
active loss can use it, else from a live forward of the frozen teacher.
"""

from __future__ import annotations

import os
from collections import defaultdict
from contextlib import ExitStack
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..losses import hidden as H
from ..losses import lm as LM
from ..losses import logits as LG
from ..losses import lora as LR
from .cache import INDEX, TeacherCache
from .heads import DistillHeads
from .layer_map import LayerMap
from .schedule import LossSchedule

HIDDEN_LOSSES = ("hidden_mse", "hidden_cos", "rail_c", "rail_l")  # need hidden states
LIVE_ONLY = ("hidden_mse", "hidden_cos", "attention_kl", "lora_ild")  # token-level teacher states
LAYER_LOSSES = ("hidden_mse", "hidden_cos", "attention_kl", "rail_c", "rail_l", "lora_ild")
HEADS_FILE = "distill_heads.safetensors"


def freeze(teacher: nn.Module) -> nn.Module:
    """Eval mode (no dropout) and no gradients: the teacher never changes."""
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


class TermLoggingTrainer(Trainer):
    """A ``transformers.Trainer`` that logs each term of a weighted loss on its own: at every log,
    the mean of each term since the previous log, as ``loss_<term>`` (subclasses call ``record_terms``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._term_sums: dict[str, float] = defaultdict(float)
        self._term_count = 0

    def record_terms(self, terms: dict[str, torch.Tensor]) -> None:
        for k, v in terms.items():
            self._term_sums[k] += float(v.detach())
        self._term_count += 1

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self._term_count and "loss" in logs:
            for k, v in self._term_sums.items():
                logs[f"loss_{k}"] = v / self._term_count
            self._term_sums.clear()
            self._term_count = 0
        super().log(logs, *args, **kwargs)


class DistillTrainer(TermLoggingTrainer):
    """A ``transformers.Trainer`` whose training loss is a weighted sum of distillation terms.

    ``kind`` is ``"classification"`` (logits (B, C)) or ``"lm"`` (logits (B, L, V), next-token).
    Evaluation reports the student's own loss (cross-entropy), as a user of the student sees it.
    ``heads`` (projections) train with the student: they join the optimizer as one more param
    group and are saved in every checkpoint, so a resumed run continues them too.
    """

    def __init__(self, *args: Any, teacher: nn.Module, schedule: LossSchedule, kind: str, temperature: float = 2.0,
                 jsd_beta: float = 0.5, layer_map: LayerMap | None = None, heads: DistillHeads | None = None,
                 cache: TeacherCache | None = None, lora_modules: tuple[str, ...] = ("query", "key", "value"),
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.teacher = freeze(teacher).to(self.args.device)
        self.schedule = schedule
        self.kind = kind
        self.temperature = temperature
        self.jsd_beta = jsd_beta
        self.layer_map = layer_map
        self.heads = heads.to(self.args.device) if heads is not None and not heads.empty else None
        self.cache = cache
        self.lora_modules = tuple(lora_modules)
        self.teacher_forwards = 0  # live teacher calls, for tests and benchmarks

    # --- optimizer and checkpoints: the heads train and resume with the student ---------------

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if self.heads is not None and not any(g.get("deltakd_heads") for g in optimizer.param_groups):
            optimizer.add_param_group({"params": list(self.heads.parameters()), "weight_decay": 0.0,
                                       "lr": self.args.learning_rate, "deltakd_heads": True})
        return optimizer

    def _save_checkpoint(self, model, trial) -> None:
        if self.heads is not None and self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            os.makedirs(folder, exist_ok=True)  # written before trainer_state.json marks the checkpoint complete
            save_file({k: v.detach().cpu().contiguous() for k, v in self.heads.state_dict().items()},
                      os.path.join(folder, HEADS_FILE))
        super()._save_checkpoint(model, trial)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, HEADS_FILE)
        if self.heads is not None and model is None and os.path.isfile(path):
            self.heads.load_state_dict(load_file(path))

    # --- the loss -----------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        idx = inputs.pop(INDEX, None)
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        epoch = float(self.state.epoch or 0.0)
        weights = {k: w for k, w in self.schedule.weights(epoch).items() if w > 0}
        pairs = self._pairs(weights, epoch)
        hidden = any(k in weights for k in HIDDEN_LOSSES)
        attentions = "attention_kl" in weights
        labels = inputs["labels"]
        feed = {k: v for k, v in inputs.items() if k != "labels"}
        with ExitStack() as stack:
            s_cap = stack.enter_context(LR.capture_lora_a_outputs(model, self.lora_modules)) \
                if "lora_ild" in weights else None
            student = model(**inputs, output_hidden_states=hidden, output_attentions=attentions)
        teacher, t_cap = None, None
        need_teacher = bool(set(weights) - {"ce"})  # a student-only loss needs no teacher outputs
        live = need_teacher and (self.cache is None or idx is None or any(k in weights for k in LIVE_ONLY))
        if live:
            with torch.no_grad(), ExitStack() as stack:
                t_cap = stack.enter_context(LR.capture_lora_a_outputs(self.teacher, self.lora_modules)) \
                    if "lora_ild" in weights else None
                teacher = self.teacher(**feed, output_hidden_states=hidden, output_attentions=attentions)
            self.teacher_forwards += 1
            t_logits = teacher.logits
            t_pooled = None
        elif need_teacher:
            t_logits, t_pooled = self.cache.lookup(idx, labels.device)  # (B, C), (B, n+1, H)
        else:
            t_logits, t_pooled = None, None
        terms = self._terms(weights, student, teacher, t_logits, t_pooled, labels, inputs.get("attention_mask"),
                            num_items_in_batch, pairs, s_cap, t_cap)
        loss = sum(weights[k] * v for k, v in terms.items())
        self.record_terms(terms)
        return (loss, student) if return_outputs else loss

    def _pairs(self, weights: dict[str, float], epoch: float) -> list[tuple[int, list[int]]]:
        if not any(k in weights for k in LAYER_LOSSES):
            return []
        if self.layer_map is None:
            raise ValueError("intermediate-layer losses need a layer map")
        return self.layer_map.select(step=self.state.global_step, epoch=int(epoch))

    def _terms(self, weights: dict[str, float], s: Any, t: Any, t_logits: Tensor | None, t_pooled: Tensor | None,
               labels: Tensor, mask: Tensor | None, num_items: Any, pairs: list[tuple[int, list[int]]],
               s_cap: LR.LoraACapture | None, t_cap: LR.LoraACapture | None) -> dict[str, Tensor]:
        T = self.temperature
        out: dict[str, Tensor] = {}
        if self.kind == "lm":
            tok_mask = LM.next_token_mask(labels)  # (B, L): positions whose next token is a target
            norm = num_items if num_items is not None else None
            if "ce" in weights:
                out["ce"] = LM.lm_ce(s.logits, labels, normalizer=norm)
            if "kd" in weights:
                out["kd"] = LM.token_kl(s.logits, t_logits, T, tok_mask, normalizer=norm)
            if "reverse_kl" in weights:
                out["reverse_kl"] = LM.token_kl(s.logits, t_logits, T, tok_mask, reverse=True, normalizer=norm)
            if "jsd" in weights:
                out["jsd"] = LM.generalized_jsd(s.logits, t_logits, self.jsd_beta, T, tok_mask, normalizer=norm)
        else:
            if "ce" in weights:
                out["ce"] = LG.ce_loss(s.logits, labels)
            if "kd" in weights:
                out["kd"] = LG.kd_kl(s.logits, t_logits, T)
            if "logits_mse" in weights:
                out["logits_mse"] = LG.logits_mse(s.logits, t_logits)
        # layer i is hidden_states[i + 1]; index 0 holds the embeddings. Groups (average maps) are averaged.
        if "hidden_mse" in weights or "hidden_cos" in weights:
            tok = [(i, s.hidden_states[i + 1], torch.stack([t.hidden_states[j + 1] for j in js]).mean(0))
                   for i, js in pairs]
            proj = self.heads.hidden_proj if self.heads is not None else (lambda _i: None)
            if "hidden_mse" in weights:
                out["hidden_mse"] = torch.stack([H.hidden_mse(a, b, proj(i), mask) for i, a, b in tok]).mean()
            if "hidden_cos" in weights:
                out["hidden_cos"] = torch.stack([H.hidden_cosine(a, b, proj(i), mask) for i, a, b in tok]).mean()
        if "attention_kl" in weights:
            out["attention_kl"] = torch.stack([
                H.attention_kl(s.attentions[i], torch.stack([t.attentions[j] for j in js]).mean(0), mask)
                for i, js in pairs]).mean()
        if "rail_c" in weights or "rail_l" in weights:
            s_pool = [H.mean_pool(s.hidden_states[i + 1], mask) for i, _ in pairs]  # k x (B, Hs)
            if t_pooled is None:  # live teacher
                t_pool = [torch.stack([H.mean_pool(t.hidden_states[j + 1], mask) for j in js]).mean(0)
                          for _, js in pairs]
            else:
                t_pool = [t_pooled[:, [j + 1 for j in js]].mean(1) for _, js in pairs]  # k x (B, Ht)
            if "rail_c" in weights:
                out["rail_c"] = H.rail_kd_concat(s_pool, t_pool, self.heads.rail_c, nn.Identity())
            if "rail_l" in weights:
                out["rail_l"] = H.rail_kd_layerwise(s_pool, t_pool, list(self.heads.rail_l), [None] * len(pairs))
        if "lora_ild" in weights:
            s_by, t_by = s_cap.by_layer(), t_cap.by_layer()
            feats_s = [f for i, _ in pairs for f in s_by.get(i, [])]
            feats_t = [f for _, js in pairs for f in t_by.get(js[0], [])]
            out["lora_ild"] = LR.lora_feature_mse(feats_s, feats_t, mask)
        return out

