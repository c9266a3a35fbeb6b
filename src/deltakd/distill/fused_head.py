"""Causal-LM distillation without full logits: the LM heads' inputs, and the chunked token terms.

When chunked (``distill.chunked``), the trainer runs both causal LMs with :func:`head_input` in
place: a forward pre-hook on the output embedding (the LM head) keeps its input, the final hidden
states (B, L, H), and hands the head an empty sequence, so the model returns logits (B, 0, V) and
never makes the full ones. :func:`chunked_terms` then computes the token terms of the loss table
that ``losses.lm_chunked`` covers (ce, kd, reverse_kl, jsd) from those hidden states and the heads'
weights, chunk by chunk. Other terms (hidden-state losses) read ``hidden_states`` as before.

A model whose logits are not ``hidden @ head.weight.T + bias`` (a LoRA-wrapped head, logit
soft-capping or scaling) cannot be fused: ``chunked: auto`` then stays off, ``true`` is an error.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn

from ..losses import lm_chunked
from ..losses.lm_chunked import LinearHead

AUTO_VOCAB = 32_768  # chunked: auto turns on at this vocabulary size
FUSABLE = frozenset(lm_chunked.TERMS)  # the loss-table names the chunked path computes
_LOGIT_CHANGES = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def linear_head(model: nn.Module) -> LinearHead | str:
    """The model's LM head as weight and bias, or why it cannot be fused (a line for errors)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not nn.Linear:
        return f"its output embedding is {type(head).__name__}, not a plain torch.nn.Linear"
    config = getattr(model, "config", None)
    changed = [a for a in _LOGIT_CHANGES if getattr(config, a, None) not in (None, 1, 1.0)]
    if changed:
        return f"its logits are changed after the head ({', '.join(changed)})"
    return LinearHead(head.weight, head.bias)


def use_chunked(setting: bool | str, student: nn.Module, teacher: nn.Module | None, vocab: int | None) -> bool:
    """Whether the causal-LM token terms run chunked: ``setting`` true / false / ``"auto"`` (on at a
    vocabulary of ``AUTO_VOCAB`` tokens or more, when both heads can be fused)."""
    if setting is False or setting == "false":
        return False
    reasons = [f"the {who} cannot be fused: {h}" for who, m in (("student", student), ("teacher", teacher))
               if m is not None and isinstance(h := linear_head(m), str)]
    if setting is True or setting == "true":
        if reasons:
            raise ValueError(f"distill.chunked: {'; '.join(reasons)}")
        return True
    if setting != "auto":
        raise ValueError(f"distill.chunked must be true, false or auto, got {setting!r}")
    head = linear_head(student)
    width = vocab or (head.weight.shape[0] if isinstance(head, LinearHead) else 0)
    return not reasons and width >= AUTO_VOCAB


class HeadInput:
    """What :func:`head_input` captured: the LM head's input (B, L, H), after the forward."""

    hidden: Tensor | None = None


@contextmanager
def head_input(model: nn.Module) -> Iterator[HeadInput]:
    """Keep the LM head's input and give the head an empty sequence instead, for the forwards inside."""
    captured = HeadInput()

    def pre_hook(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        captured.hidden = args[0]  # (B, L, H): the final hidden states
        return (args[0].narrow(-2, 0, 0), *args[1:])  # (B, 0, H): logits (B, 0, V)

    handle = model.get_output_embeddings().register_forward_pre_hook(pre_hook)
    try:
        yield captured
    finally:
        handle.remove()


def chunked_terms(weights: Mapping[str, float], labels: Tensor, student: nn.Module, student_hidden: Tensor,
                  teacher: nn.Module | None = None, teacher_hidden: Tensor | None = None, *, temperature: float,
                  beta: float, vocab: int | None, normalizer: Any, chunk_tokens: int | None) -> tuple[Tensor, dict[str, Tensor]]:
    """The weighted sum and each of the fusable terms in ``weights``, from the heads' inputs (B, L, H)."""
    s_head = linear_head(student)
    assert isinstance(s_head, LinearHead), s_head
    s_h, targets = lm_chunked.valid_tokens(student_hidden, labels)  # (N, Hs), (N,)
    t_h, t_head, width = None, None, None
    if teacher is not None and teacher_hidden is not None:
        t_head = linear_head(teacher)
        assert isinstance(t_head, LinearHead), t_head
        t_h, _ = lm_chunked.valid_tokens(teacher_hidden, labels)  # (N, Ht)
        width = lm_chunked.compared_width(s_head.weight.shape[0], t_head.weight.shape[0], vocab)
    return lm_chunked.fused_lm_losses(s_h, s_head, targets, weights, teacher_hidden=t_h, teacher_head=t_head,
                                      temperature=temperature, beta=beta, width=width, normalizer=normalizer,
                                      chunk_tokens=chunk_tokens)
