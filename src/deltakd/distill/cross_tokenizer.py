"""Causal-LM distillation across tokenizers (``distill.cross_tokenizer: true``).

The teacher reads its own tokens of the text, and the student's positions are paired with the
teacher's by **text offset**: student token i with the teacher token ending at the same byte of the
text (``data.lm_offsets.align_blocks``). Both next-token distributions then condition on the same
text and predict what follows it, so comparing them is meaningful even though the tokens differ.
Pairing by index (token i with token i) would compare predictions after different amounts of text
as soon as one tokenizer splits a word the other keeps whole, and the drift grows along the block.
Positions where only one tokenizer has a boundary (inside a word the other keeps whole) get no
teacher term; the student's own cross-entropy still covers them.

Two losses need no shared vocabulary. ``kd_mapped`` maps the teacher's distribution onto the
student's tokens (:func:`first_token_map`: each teacher token's probability goes to the first student
token of that token's text, the token the student would emit to start the same text) and takes the
token KL to it: it keeps which text the teacher expects, and is exact when every student token is
no longer than the teacher token it starts (e.g. two byte-level BPEs trained on the same text, the
smaller one's merges a prefix of the larger one's); where a student token would run past the
teacher token, that mass lands on the student's shorter token instead. ``uld`` (Boizard et al. 2024, Universal Logit
Distillation) compares the two distributions sorted by probability, zero-padded to the larger
vocabulary (L1 = Wasserstein-1 over ranks). Alternatives that map vocabularies onto each other
(exact-match token pairs, learned or minimum-edit-distance maps as in MinED / DSKD) need a
vocabulary map per tokenizer pair and lose the mass of unmatched tokens; ULD needs nothing beyond
the alignment and applies to any pair of tokenizers, at the price of ignoring token identity.

How it runs: the student's train blocks carry the teacher's tokens of the same text and the
alignment as two more columns (``data.lm_offsets.with_teacher_tokens``); :class:`TeacherTokensCollator`
pads the teacher's tokens per batch; the ``DistillTrainer`` takes them out of the student's inputs
(:func:`pop_teacher_inputs`), runs the teacher on them and hands the losses the teacher's logits
gathered at the paired positions (:func:`align_teacher`); ``hidden_mse`` / ``hidden_cos`` compare
the mapped layers' hidden states at those positions too (through the learned projection when the
widths differ, ``heads.py``).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor
from transformers import default_data_collator

from ..data.lm_offsets import TEACHER_IDS, TEACHER_POSITIONS

TEACHER_MASK = "teacher_attention_mask"


class TeacherTokensCollator:
    """Student blocks stacked as they are; the teacher's tokens (when present) right-padded with
    ``pad_id`` to the batch's longest, with ``teacher_attention_mask``."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = int(pad_id)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Tensor]:
        if TEACHER_IDS not in features[0]:
            return default_data_collator(features)
        rest = [{k: v for k, v in f.items() if k != TEACHER_IDS} for f in features]
        batch = default_data_collator(rest)
        seqs = [list(f[TEACHER_IDS]) for f in features]
        width = max(1, max(len(s) for s in seqs))
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)  # (B, Lt)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)  # (B, Lt)
        for row, s in enumerate(seqs):
            ids[row, :len(s)] = torch.as_tensor(s, dtype=torch.long)
            mask[row, :len(s)] = 1
        batch[TEACHER_IDS], batch[TEACHER_MASK] = ids, mask
        return batch


def first_token_map(teacher_tokenizer: Any, student_tokenizer: Any) -> Tensor:
    """(len(teacher_tokenizer),): for each teacher token, the first student token of its text; the
    teacher's EOS maps to the student's EOS; -1 for other special tokens and for tokens whose text
    is not whole characters (a piece of a multi-byte character)."""
    n = len(teacher_tokenizer)
    special = set(teacher_tokenizer.all_special_ids)
    texts = [teacher_tokenizer.convert_tokens_to_string([t]) for t in teacher_tokenizer.convert_ids_to_tokens(range(n))]
    firsts = student_tokenizer(texts, add_special_tokens=False)["input_ids"]
    out = torch.full((n,), -1, dtype=torch.long)
    for i, (text, ids) in enumerate(zip(texts, firsts)):
        if i not in special and ids and "\ufffd" not in text:
            out[i] = ids[0]
    if teacher_tokenizer.eos_token_id is not None and student_tokenizer.eos_token_id is not None:
        out[teacher_tokenizer.eos_token_id] = student_tokenizer.eos_token_id
    return out


def pop_teacher_inputs(inputs: dict[str, Any]) -> dict[str, Tensor] | None:
    """Take the teacher's tokens, mask and the alignment out of a batch (the student must not see
    them); None when the batch has none (same tokenizer, or an evaluation batch)."""
    if TEACHER_IDS not in inputs:
        return None
    return {"input_ids": inputs.pop(TEACHER_IDS), "attention_mask": inputs.pop(TEACHER_MASK),
            "positions": inputs.pop(TEACHER_POSITIONS)}


def gather_aligned(teacher: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
    """Teacher states (B, Lt, D) at the positions paired with each student position (B, L) (-1: none):
    (B, L, D), zeros where unpaired, and the pairing mask (B, L)."""
    aligned = positions >= 0  # (B, L)
    index = positions.clamp_min(0).unsqueeze(-1).expand(-1, -1, teacher.shape[-1])  # (B, L, D)
    picked = teacher.gather(1, index)  # (B, L, D)
    return picked * aligned.unsqueeze(-1).to(picked.dtype), aligned


def align_teacher(output: Any, positions: Tensor, hidden: bool) -> tuple[Any, Tensor]:
    """The teacher's output at the positions paired with the student's (B, L): ``.logits`` (B, L, Vt)
    and, with ``hidden``, ``.hidden_states`` (each (B, L, Ht)), zeros where unpaired; and the pairing
    mask (B, L), which the position losses (``hidden_mse``, ``hidden_cos``) then average over."""
    logits, aligned = gather_aligned(output.logits, positions)
    states = tuple(gather_aligned(h, positions)[0] for h in output.hidden_states) if hidden else None
    return SimpleNamespace(logits=logits, hidden_states=states), aligned
