"""The distillation Trainer: wiring only (teacher outputs, losses, weights, logging).

No model surgery happens here: the student arrives built (``models/student.py``), the teacher
frozen, the projections built (``heads.py``), the layer map validated (``layer_map.py``). Each
loss term is the ``compute`` of its entry in the loss table (``deltakd.losses.table``), run for
every loss with a weight > 0 at the current epoch of the ``LossSchedule`` (curriculum); what the
active entries need decides which model outputs are requested; every term is logged on its own
as ``loss_<term>``.

Teacher outputs come from the on-disk cache (``cache.py``: logits and pooled layers; ``token_cache.py``:
logits, per-token hidden states and attention maps of the mapped layers; causal LM: ``lm_cache.py``,
the teacher's top-k per token) when it serves every active loss, else from a live forward of the
frozen teacher.
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
from .fused_head import FUSABLE, chunked_terms, head_input, use_chunked
from .cross_tokenizer import align_teacher, pop_teacher_inputs
from .heads import DistillHeads
from .layer_map import LayerMap
from .lm_cache import LMTeacherCache
from .schedule import LossSchedule
from .token_cache import TokenTeacherCache

HEADS_FILE = "distill_heads.safetensors"


def freeze(teacher: nn.Module) -> nn.Module:
    """Eval mode (no dropout) and no gradients: the teacher never changes."""
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def half_dtype(args: Any) -> torch.dtype | None:
    """The dtype the frozen teacher runs in: bf16 / fp16 when the run is mixed precision (the student
    trains under autocast in fp32 weights; the teacher only infers, so its weights are cast), else None."""
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None


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
    ``chunked`` (lm; true / false / ``"auto"``, see ``fused_head.use_chunked``): the token terms
    (ce, kd, reverse_kl, jsd) are computed from the LM heads' inputs ``chunk_tokens`` tokens at a
    time (``fused_head``), without full logits of either model; same values and gradients.
    """

    def __init__(self, *args: Any, teacher: nn.Module, schedule: LossSchedule, kind: str, temperature: float = 2.0,
                 jsd_beta: float = 0.5, layer_map: LayerMap | None = None, heads: DistillHeads | None = None,
                 cache: TeacherCache | TokenTeacherCache | LMTeacherCache | None = None,
                 lora_modules: tuple[str, ...] = ("query", "key", "value"), vocab: int | None = None,
                 chunked: bool | str = False, chunk_tokens: int | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # on this process's device, in the run's half dtype: under DDP / FSDP / DeepSpeed a replica per process
        self.teacher = freeze(teacher).to(self.args.device, dtype=half_dtype(self.args))
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
        self.chunked = kind == "lm" and use_chunked(chunked, self.accelerator.unwrap_model(self.model),
                                                    self.teacher, vocab)
        self.chunk_tokens = chunk_tokens
        self.vocab_map: Tensor | None = None  # cross-tokenizer: teacher id -> student id (kd_mapped), set by the family
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
        own = pop_teacher_inputs(inputs)  # cross-tokenizer: the teacher's own tokens of the same text
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
        need_teacher = table.needs_teacher(weights)  # a student-only loss needs no teacher outputs
        live = need_teacher and (self.cache is None or idx is None or not self.cache.serves(weights))
        # fused LM-head losses read both models at the same positions: not across tokenizers
        fused = self._fused_names(weights, live or not need_teacher) if own is None else ()
        with ExitStack() as stack:
            s_cap = stack.enter_context(capture_lora_a_outputs(model, self.lora_modules)) if lora else None
            s_in = stack.enter_context(head_input(self.accelerator.unwrap_model(model))) if fused else None
            student = model(**(feed if fused else inputs), output_hidden_states=hidden, output_attentions=attentions)
        teacher, t_cap, t_in, t_topk = None, None, None, None
        if live:
            with torch.no_grad(), ExitStack() as stack:
                t_cap = stack.enter_context(capture_lora_a_outputs(self.teacher, self.lora_modules)) if lora else None
                t_in = stack.enter_context(head_input(self.teacher)) if fused else None
                t_feed = feed if own is None else {k: own[k] for k in ("input_ids", "attention_mask")}
                teacher = self.teacher(**t_feed, output_hidden_states=hidden, output_attentions=attentions)
            self.teacher_forwards += 1
            t_logits = None if fused else teacher.logits
            t_pooled = None
        elif need_teacher and isinstance(self.cache, TokenTeacherCache):  # logits, mapped layers' states / maps
            teacher = self.cache.lookup_tokens(idx, inputs.get("attention_mask"), labels.device, hidden, attentions)
            t_logits, t_pooled = teacher.logits, None
        elif need_teacher and isinstance(self.cache, LMTeacherCache):
            t_logits, t_pooled = None, None
            t_topk = self.cache.lookup(idx, labels.device)  # ids, log-probs (B, L, k), tail (B, L)
        elif need_teacher:
            t_logits, t_pooled = self.cache.lookup(idx, labels.device)  # (B, C), (B, n+1, H)
        else:
            t_logits, t_pooled = None, None
        aligned = None
        if own is not None and teacher is not None:  # (B, Lt, ...) -> (B, L, ...) at the paired positions
            teacher, aligned = align_teacher(teacher, own["positions"], hidden)
            t_logits = teacher.logits
        terms = self._terms({k: w for k, w in weights.items() if k not in fused}, LossInputs(
            kind=self.kind, student=student, labels=labels, teacher=teacher, teacher_logits=t_logits,
            teacher_pooled=t_pooled, mask=inputs.get("attention_mask") if aligned is None else aligned,
            normalizer=num_items_in_batch,
            temperature=self.temperature, jsd_beta=self.jsd_beta, pairs=pairs, heads=self.heads,
            student_lora=s_cap, teacher_lora=t_cap, vocab=self.vocab, teacher_topk=t_topk, aligned=aligned,
            vocab_map=None if self.vocab_map is None else self.vocab_map.to(labels.device)))
        loss = sum(weights[k] * v for k, v in terms.items())
        if fused:
            fused_loss, fused_terms = chunked_terms(
                {k: weights[k] for k in fused}, labels, self.accelerator.unwrap_model(model), s_in.hidden,
                self.teacher if t_in is not None else None, t_in.hidden if t_in is not None else None,
                temperature=self.temperature, beta=self.jsd_beta, vocab=self.vocab, normalizer=num_items_in_batch,
                chunk_tokens=self.chunk_tokens)
            loss = fused_loss + loss
            terms = {s.name: fused_terms.get(s.name, terms.get(s.name)) for s in table.specs(weights)}  # table order
        self.record_terms(terms)
        return (loss, student) if return_outputs else loss

    def _fused_names(self, weights: dict[str, float], teacher_outputs_live: bool) -> tuple[str, ...]:
        """The active token terms computed chunked this step (none unless chunked, and the teacher, if
        needed, runs live: a cache serves logits)."""
        if not (self.chunked and teacher_outputs_live):
            return ()
        return tuple(k for k in weights if k in FUSABLE)

    def _pairs(self, weights: dict[str, float], epoch: float) -> list[tuple[int, list[int]]]:
        if not table.needing(table.LAYER_MAP, weights):
            return []
        if self.layer_map is None:
            raise ValueError("intermediate-layer losses need a layer map")
        return self.layer_map.select(step=self.state.global_step, epoch=int(epoch))

    def _terms(self, weights: dict[str, float], inputs: LossInputs) -> dict[str, Tensor]:
        """Every active loss of the table, in table order (the order the weighted sum adds them)."""
        return {spec.name: spec.compute(inputs) for spec in table.specs(weights)}
