"""Causal-LM configurations built from a recipe (``model.config``: a model trained from scratch)."""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig

from ..errors import DeltakdError


def lm_config(config: dict[str, Any], tokenizer: Any, pad_token_id: int | None) -> Any:
    """A from-scratch causal-LM config (recipe ``model.config``) sized to the tokenizer, eos as bos/eos."""
    conf = dict(config)
    conf.update(vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_token_id)
    try:
        return AutoConfig.for_model(**conf)
    except (ValueError, TypeError) as e:
        raise DeltakdError(f"model.config: {str(e).splitlines()[0]}") from None
