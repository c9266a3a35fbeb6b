"""The table of distillation losses: every loss a recipe can name, what it applies to, what it reads.

Adding a loss: its function of tensors (``logits``, ``lm``, ``hidden``, ``lora``), its compute
function in ``terms`` (``LossInputs`` -> scalar), one ``LossSpec`` below, and its tests. The
recipe's allowed names, the trainer's loop over terms, which model outputs it requests, whether
the teacher runs live or from the cache, and the setup's kind checks all read this table.

This module imports neither torch nor ``terms``: the recipe schema reads the names without
loading torch, and ``compute`` imports ``terms`` on its first call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor

    from .terms import LossInputs

CLASSIFICATION = "classification"  # logits (B, C); (B, 1) for a regression head
LM = "lm"  # causal LM: logits (B, L, V), next-token targets
KINDS = frozenset({CLASSIFICATION, LM})

# What a loss reads beyond the student's logits and the labels (each need asks for teacher outputs):
TEACHER_LOGITS = "teacher_logits"  # teacher logits, live or cached
HIDDEN = "hidden"  # hidden states of both models (output_hidden_states)
ATTENTIONS = "attentions"  # attention maps of both models (output_attentions, eager kernel)
LORA_A = "lora_a"  # lora_A outputs of both models (an unmerged LoRA teacher)
LAYER_MAP = "layer_map"  # student layer <- teacher layer pairs
HIDDEN_PROJ = "hidden_proj"  # an Hs -> Ht projection per mapped student layer when the widths differ
NEEDS = frozenset({TEACHER_LOGITS, HIDDEN, ATTENTIONS, LORA_A, LAYER_MAP, HIDDEN_PROJ})
_NOT_CACHED = frozenset({ATTENTIONS, LORA_A})  # the cache holds logits and mean-pooled layers only
_TOKEN_CACHED = frozenset({TEACHER_LOGITS, HIDDEN, ATTENTIONS, LAYER_MAP, HIDDEN_PROJ})  # logits, mapped layers


@dataclass(frozen=True)
class LossSpec:
    """One distillation loss.

    ``kinds``: the tasks it applies to. ``needs``: what it reads beyond the student's logits and
    the labels (empty: a student-only loss, no teacher outputs). ``cacheable``: what it reads of
    the teacher is in the teacher cache (classification: logits and mean-pooled layers; causal LM:
    the top-k next tokens and tail per token, served to the sparse forms in ``lm_sparse``), so the
    teacher need not run. ``token_cache``: what it reads of the teacher is in the classification
    token cache (logits, per-token hidden states and attention maps of the mapped layers,
    ``distill/token_cache.py``); the ``cacheable`` entries are served by it too (pooled layers are
    pooled from its tokens). ``distribution``: it compares class distributions, so a one-output
    regression head cannot use it. ``compute``: ``LossInputs`` -> scalar tensor. ``doc``: one line
    for the recipe schema and error messages. ``any_vocab``: it needs no shared vocabulary, only
    positions paired by text offset, so it works across tokenizers (``distill.cross_tokenizer``).
    """

    name: str
    kinds: frozenset[str]
    needs: frozenset[str]
    cacheable: bool
    compute: Callable[[LossInputs], Tensor]
    doc: str
    distribution: bool = False
    token_cache: bool = False
    any_vocab: bool = False

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"loss {self.name!r}: the name must be an identifier")
        if not self.kinds or not self.kinds <= KINDS:
            raise ValueError(f"loss {self.name}: kinds {sorted(self.kinds)} must be a non-empty subset of "
                             f"{sorted(KINDS)}")
        if not self.needs <= NEEDS:
            raise ValueError(f"loss {self.name}: unknown needs {sorted(self.needs - NEEDS)}")
        if self.cacheable and self.needs & _NOT_CACHED:
            raise ValueError(f"loss {self.name}: {sorted(self.needs & _NOT_CACHED)} are not in the teacher cache")
        if self.token_cache and not self.needs <= _TOKEN_CACHED:
            raise ValueError(f"loss {self.name}: {sorted(self.needs - _TOKEN_CACHED)} are not in the token cache")
        if self.distribution and TEACHER_LOGITS not in self.needs:
            raise ValueError(f"loss {self.name}: a distribution loss reads the teacher logits")


def _term(name: str) -> Callable[[LossInputs], Tensor]:
    """``terms.<name>``, imported on the first call (keeps this module free of torch)."""

    def compute(inputs: LossInputs) -> Tensor:
        from . import terms

        return getattr(terms, name)(inputs)

    compute.__name__ = compute.__qualname__ = name
    return compute


def _table(*entries: LossSpec) -> dict[str, LossSpec]:
    by_name = {spec.name: spec for spec in entries}
    if len(by_name) != len(entries):
        raise ValueError("the loss table names a loss twice")
    return by_name


BOTH = frozenset({CLASSIFICATION, LM})
CLS_ONLY = frozenset({CLASSIFICATION})
LM_ONLY = frozenset({LM})
_LOGITS = frozenset({TEACHER_LOGITS})
_TOKENS = frozenset({HIDDEN, LAYER_MAP, HIDDEN_PROJ})
_POOLED = frozenset({HIDDEN, LAYER_MAP})

LOSSES: dict[str, LossSpec] = _table(
    #        name            kinds     needs                               cache  compute
    #        doc
    LossSpec("ce",           BOTH,     frozenset(),                        True,  _term("ce"),
             "hard labels: cross-entropy (MSE on a 1-output regression head, next-token CE on a causal LM)"),
    LossSpec("kd",           BOTH,     _LOGITS,                            True,  _term("kd"),
             "soft targets: T^2 KL(teacher || student) at the temperature (per token on a causal LM)",
             distribution=True),
    LossSpec("reverse_kl",   LM_ONLY,  _LOGITS,                            True,  _term("reverse_kl"),
             "T^2 KL(student || teacher) per token (MiniLLM)", distribution=True),
    LossSpec("jsd",          LM_ONLY,  _LOGITS,                            True,  _term("jsd"),
             "generalized Jensen-Shannon divergence per token at jsd_beta (GKD)", distribution=True),
    LossSpec("logits_mse",   CLS_ONLY, _LOGITS,                            True,  _term("logits_mse"),
             "MSE between raw logits (regression heads too)"),
    LossSpec("hidden_mse",   BOTH,     _TOKENS,                            False, _term("hidden_mse"),
             "MSE between mapped hidden states per token (per aligned token across tokenizers)",
             any_vocab=True, token_cache=True),
    LossSpec("hidden_cos",   BOTH,     _TOKENS,                            False, _term("hidden_cos"),
             "1 - cosine between mapped hidden states per token (per aligned token across tokenizers)",
             any_vocab=True, token_cache=True),
    LossSpec("attention_kl", BOTH,     frozenset({ATTENTIONS, LAYER_MAP}), False, _term("attention_kl"),
             "KL(teacher || student) between mapped attention maps (same head count)", token_cache=True),
    LossSpec("rail_c",       CLS_ONLY, _POOLED,                            True,  _term("rail_c"),
             "RAIL-KD: concatenated L2-normalised mean-pooled layers, projected"),
    LossSpec("rail_l",       CLS_ONLY, _POOLED,                            True,  _term("rail_l"),
             "RAIL-KD: layer-wise L2-normalised mean-pooled layers, projected"),
    LossSpec("lora_ild",     BOTH,     frozenset({LORA_A, LAYER_MAP}),     False, _term("lora_ild"),
             "MSE between lora_A outputs of mapped layers (LoRA student and unmerged LoRA teacher, same rank)"),
    LossSpec("uld",          LM_ONLY,  _LOGITS,                            False, _term("uld"),
             "ULD: L1 between sorted next-token probabilities per aligned token (any two tokenizers)",
             distribution=True, any_vocab=True),
    LossSpec("kd_mapped",    LM_ONLY,  _LOGITS,                            False, _term("kd_mapped"),
             "T^2 KL(teacher mapped onto the student's tokens || student) per aligned token (any two tokenizers)",
             distribution=True, any_vocab=True),
)

LOSS_NAMES: tuple[str, ...] = tuple(LOSSES)  # what a recipe may name, in table order


# --- derived from the table (each reads LOSSES at call time) ---------------------------------


def specs(names: Iterable[str]) -> list[LossSpec]:
    """The entries of ``names``, in table order; an unknown name is an error."""
    wanted = set(names)
    unknown = wanted - set(LOSSES)
    if unknown:
        raise ValueError(f"unknown losses {sorted(unknown)}; known: {', '.join(LOSSES)}")
    return [spec for name, spec in LOSSES.items() if name in wanted]


def names_for(kind: str) -> tuple[str, ...]:
    """The losses that apply to ``kind``."""
    if kind not in KINDS:
        raise ValueError(f"unknown task kind {kind!r}; known: {sorted(KINDS)}")
    return tuple(name for name, spec in LOSSES.items() if kind in spec.kinds)


def unsupported(names: Iterable[str], kind: str) -> tuple[str, ...]:
    """Those of ``names`` that do not apply to ``kind``."""
    allowed = names_for(kind)
    return tuple(spec.name for spec in specs(names) if spec.name not in allowed)


def needing(need: str, names: Iterable[str]) -> tuple[str, ...]:
    """Those of ``names`` that need ``need`` (one of ``NEEDS``)."""
    if need not in NEEDS:
        raise ValueError(f"unknown need {need!r}; known: {sorted(NEEDS)}")
    return tuple(spec.name for spec in specs(names) if need in spec.needs)


def across_tokenizers(names: Iterable[str]) -> tuple[str, ...]:
    """Those of ``names`` that work across tokenizers: student-only losses and ``any_vocab`` ones."""
    return tuple(spec.name for spec in specs(names) if not spec.needs or spec.any_vocab)


def needs_teacher(names: Iterable[str]) -> bool:
    """Whether any of ``names`` reads teacher outputs (every need does)."""
    return any(spec.needs for spec in specs(names))


def live_only(names: Iterable[str]) -> tuple[str, ...]:
    """Those of ``names`` that need the teacher to run (what they read is not in the cache)."""
    return tuple(spec.name for spec in specs(names) if spec.needs and not spec.cacheable)


def token_live_only(names: Iterable[str]) -> tuple[str, ...]:
    """Those of ``names`` that need the teacher to run even with the token cache."""
    return tuple(spec.name for spec in specs(names) if spec.needs and not (spec.cacheable or spec.token_cache))


def cache_served(names: Iterable[str]) -> tuple[str, ...]:
    """Those of ``names`` that read teacher outputs the cache can serve."""
    return tuple(spec.name for spec in specs(names) if spec.needs and spec.cacheable)


def alternatives(names: Iterable[str], kind: str) -> tuple[str, ...]:
    """Losses of ``kind`` reading the same kind of teacher outputs as ``names`` (suggestions in errors).

    The layer map is shared by every layer loss, so it does not make two losses alike.
    """
    wanted = frozenset().union(*(spec.needs for spec in specs(names))) - {LAYER_MAP}
    return tuple(name for name in names_for(kind) if LOSSES[name].needs & wanted)
