"""Tokenizer preflight for distillation: the student's data goes to the teacher as token ids, so
both must read the same ids the same way.

Tokenizers are compared, not the models' ``config.vocab_size``: a model whose embedding has extra
(padding) rows over the same tokenizer passes. Different tokenizers are refused with one line before
any work: logit losses would compare distributions over different vocabularies, hidden-state and
attention losses token positions that do not align, and the teacher comparison would feed the
teacher the student's ids. A causal-LM recipe with ``distill.cross_tokenizer: true`` takes the
other road (``cross_tokenizer.py``): the teacher reads its own tokens, positions are paired by
text offset, and only losses that need no shared vocabulary (``uld``, ``ce``) are allowed.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..errors import DeltakdError
from ..losses import table

# Probe texts for the normalisation a vocabulary does not show: case, accents, Unicode forms,
# whitespace, punctuation, digits and non-Latin scripts.
PROBES = ("Hello World, THIS is a Test.", "Café naïve résumé Ångström", "e\u0301 ﬁne ＡＢＣ ½",
          "  tabs\tand   spaces\nnew line", "don't stop-me now!? (3.14) #1 $20 @user", "东京 Москва عربى")
SPECIAL_IDS = ("pad_token_id", "eos_token_id", "bos_token_id", "cls_token_id", "sep_token_id", "unk_token_id")
FIX = "use a student with the teacher's tokenizer (student.from_teacher, or a model.name that shares it)"
CROSS_FIX = ", or distill.cross_tokenizer: true with distill.losses uld or kd_mapped (+ ce)"


def describe(tokenizer: Any) -> str:
    """``'name_or_path' (N tokens)``, for error lines."""
    return f"'{getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__}' ({len(tokenizer)} tokens)"


def tokenizer_difference(a: Any, b: Any) -> str | None:
    """None when both map every token to the same id, use the same special tokens and tokenise the
    probe texts (:data:`PROBES`) identically, else what differs (``a``'s value first)."""
    if a is b:
        return None
    a_vocab, b_vocab = a.get_vocab(), b.get_vocab()
    if a_vocab != b_vocab:
        if len(a_vocab) != len(b_vocab):
            return f"{len(a_vocab)} vs {len(b_vocab)} tokens"
        token = next(t for t in sorted(a_vocab) if a_vocab[t] != b_vocab.get(t))
        return f"token {token!r} is id {a_vocab[token]} vs {b_vocab.get(token)}"
    for attr in SPECIAL_IDS:
        a_id, b_id = getattr(a, attr, None), getattr(b, attr, None)
        if a_id != b_id:
            return f"{attr} {a_id} vs {b_id}"
    for text in PROBES:  # same vocabulary, different normalisation (e.g. one lowercases)
        a_ids, b_ids = _ids(a, text), _ids(b, text)
        if a_ids != b_ids:
            return f"same vocabulary but {text!r} tokenises as {_show(a, a_ids)} vs {_show(b, b_ids)}"
    return None


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _show(tokenizer: Any, ids: list[int], limit: int = 6) -> str:
    tokens = tokenizer.convert_ids_to_tokens(ids[:limit])
    return "[" + " ".join(map(str, tokens)) + (" ..." if len(ids) > limit else "") + "]"


def check_tokenizers(student: Any, teacher: Any, losses: Iterable[str], cross_tokenizer: bool = False,
                     cross_possible: bool = False) -> bool:
    """Whether the tokenizers differ. Different ones are refused (one line, naming both and the fix;
    with ``cross_possible``, a causal LM, the fix names ``distill.cross_tokenizer`` too) unless
    ``cross_tokenizer`` asks for distillation across tokenizers and every loss works across them
    (``table.across_tokenizers``)."""
    diff = tokenizer_difference(teacher, student)
    if diff is None:
        return False
    names = set(losses)
    head = (f"teacher: its tokenizer {describe(teacher)} differs from the student's {describe(student)} "
            f"({diff}, teacher vs student)")
    if cross_tokenizer:
        if bad := tuple(n for n in table.LOSSES if n in names and n not in table.across_tokenizers(names)):
            ok = tuple(n for n in table.names_for(table.LM) if n in table.across_tokenizers(table.LOSSES))
            raise DeltakdError(f"{head}; distill.cross_tokenizer pairs positions by text offset, but distill.losses "
                               f"{', '.join(bad)} need a shared vocabulary or layer positions: use {', '.join(ok)}")
        return True
    if logit := table.needing(table.TEACHER_LOGITS, names):
        why = f"distill.losses {', '.join(logit)} compare distributions over the teacher's vocabulary"
    elif positions := tuple(n for n in table.LOSSES if n in names and table.LOSSES[n].needs):
        why = f"distill.losses {', '.join(positions)} compare token positions, which do not align across tokenizers"
    else:
        why = "the teacher would read the student's token ids"
    raise DeltakdError(f"{head}; {why}: {FIX}{CROSS_FIX if cross_possible else ''}")

