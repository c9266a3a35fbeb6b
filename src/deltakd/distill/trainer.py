"""The distillation Trainer: wiring only (teacher outputs, losses, weights, logging).

No model surgery happens here: the student arrives built (``models/student.py``), the teacher
frozen, the projections built (``heads.py``), the layer map validated (``layer_map.py``). Each
loss term is the ``compute`` of its entry in the loss table (``deltakd.losses.table``), run for
every loss with a weight > 0 at the current epoch of the ``LossSchedule`` (curriculum); what the
active entries need decides which model outputs are requested; every term is logged on its own
as ``loss_<term>``.

Teacher outputs come from the on-disk cache (``cache.py``: logits and pooled layers) when every
active loss is ``cacheable``, else from a live forward of the frozen teacher.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..losses import table
from ..losses.lora import capture_lora_a_outputs
from ..losses.terms import LossInputs
from .cache import INDEX, TeacherCache
from .heads import DistillHeads
from .layer_map import LayerMap
from .schedule import LossSchedule

HEADS_FILE = "distill_heads.safetensors"


def freeze(teacher: nn.Module) -> nn.Module:
    """Eval mode (no dropout) and no gradients: the teacher never changes."""
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


class ZeroHeadGrads(TrainerCallback):
    """Clear the projections' gradients where the Trainer clears the model's (``model.zero_grad()`` at
    the start and after every optimizer step): the heads are not part of the model, so without this
    their gradients would add up over all steps, and a resumed run (fresh, zero gradients) would differ."""

    def __init__(self, heads: nn.Module) -> None:
        self.heads = heads

    def on_train_begin(self, args, state, control, **kwargs):
        self.heads.zero_grad(set_to_none=True)

    def on_step_end(self, args, state, control, **kwargs):
        self.heads.zero_grad(set_to_none=True)


class TermLoggingTrainer(Trainer):
    """A ``transformers.Trainer`` that logs each term of a weighted loss on its own: at every log,
    the mean of each term since the previous log, as ``loss_<term>`` (subclasses call ``record_terms``);
    ``last_terms``: the latest training step's terms (the divergence guard names a non-finite one).

    The terms add up on the device and are read (one host sync) only when a log line is written:
    no ``float()`` per step, which on a GPU would stall the queue every step. ``last_terms`` holds
    detached 0-d tensors; whoever reads it (the divergence guard, on a non-finite step) syncs then.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._term_sums: dict[str, torch.Tensor] = {}
        self._term_count = 0
        self.last_terms: dict[str, torch.Tensor] = {}  # the latest step's terms (a new dict each step)

    def record_terms(self, terms: dict[str, torch.Tensor]) -> None:
        values = {k: v.detach() for k, v in terms.items()}
        for k, v in values.items():
            total = self._term_sums.get(k)
            self._term_sums[k] = v.float() if total is None else total + v.float()  # on the device, no sync
        self._term_count += 1
        self.last_terms = values

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self._term_count and "loss" in logs:
            names = list(self._term_sums)
            means = (torch.stack([self._term_sums[k] for k in names]) / self._term_count).tolist()  # the one sync
            logs.update({f"loss_{k}": v for k, v in zip(names, means)})
            self._term_sums.clear()
            self._term_count = 0
        super().log(logs, *args, **kwargs)


class DistillTrainer(TermLoggingTrainer):
    """A ``transformers.Trainer`` whose training loss is a weighted sum of distillation terms.

    ``kind`` is ``"classification"`` (logits (B, C)) or ``"lm"`` (logits (B, L, V), next-token).
    Evaluation reports the student's own loss (cross-entropy), as a user of the student sees it.
    ``vocab``: the tokenizer's length; causal-LM logits of different widths (an embedding padded with
    extra rows over the same tokenizer) are compared on their first ``vocab`` entries.
    ``heads`` (projections) train with the student: they join the optimizer as one more param
    group and are saved in every checkpoint, so a resumed run continues them too.
    """

    def __init__(self, *args: Any, teacher: nn.Module, schedule: LossSchedule, kind: str, temperature: float = 2.0,
                 jsd_beta: float = 0.5, layer_map: LayerMap | None = None, heads: DistillHeads | None = None,
                 cache: TeacherCache | None = None, lora_modules: tuple[str, ...] = ("query", "key", "value"),
                 vocab: int | None = None, **kwargs: Any) -> None:
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
        self.vocab = vocab  # the shared tokenizer's length: lm logits of different widths compare up to it
        self.teacher_forwards = 0  # live teacher calls, for tests and benchmarks
        if self.heads is not None:
            self.add_callback(ZeroHeadGrads(self.heads))

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
        hidden = bool(table.needing(table.HIDDEN, weights))
        attentions = bool(table.needing(table.ATTENTIONS, weights))
        lora = bool(table.needing(table.LORA_A, weights))
        labels = inputs["labels"]
        feed = {k: v for k, v in inputs.items() if k != "labels"}
        with ExitStack() as stack:
            s_cap = stack.enter_context(capture_lora_a_outputs(model, self.lora_modules)) if lora else None
            student = model(**inputs, output_hidden_states=hidden, output_attentions=attentions)
        teacher, t_cap = None, None
        need_teacher = table.needs_teacher(weights)  # a student-only loss needs no teacher outputs
        live = need_teacher and (self.cache is None or idx is None or bool(table.live_only(weights)))
        if live:
            with torch.no_grad(), ExitStack() as stack:
                t_cap = stack.enter_context(capture_lora_a_outputs(self.teacher, self.lora_modules)) if lora else None
                teacher = self.teacher(**feed, output_hidden_states=hidden, output_attentions=attentions)
            self.teacher_forwards += 1
            t_logits = teacher.logits
            t_pooled = None
        elif need_teacher:
            t_logits, t_pooled = self.cache.lookup(idx, labels.device)  # (B, C), (B, n+1, H)
        else:
            t_logits, t_pooled = None, None
        terms = self._terms(weights, LossInputs(
            kind=self.kind, student=student, labels=labels, teacher=teacher, teacher_logits=t_logits,
            teacher_pooled=t_pooled, mask=inputs.get("attention_mask"), normalizer=num_items_in_batch,
            temperature=self.temperature, jsd_beta=self.jsd_beta, pairs=pairs, heads=self.heads,
            student_lora=s_cap, teacher_lora=t_cap, vocab=self.vocab))
        loss = sum(weights[k] * v for k, v in terms.items())
        self.record_terms(terms)
        return (loss, student) if return_outputs else loss

    def _pairs(self, weights: dict[str, float], epoch: float) -> list[tuple[int, list[int]]]:
        if not table.needing(table.LAYER_MAP, weights):
            return []
        if self.layer_map is None:
            raise ValueError("intermediate-layer losses need a layer map")
        return self.layer_map.select(step=self.state.global_step, epoch=int(epoch))

    def _terms(self, weights: dict[str, float], inputs: LossInputs) -> dict[str, Tensor]:
        """Every active loss of the table, in table order (the order the weighted sum adds them)."""
        return {spec.name: spec.compute(inputs) for spec in table.specs(weights)}
