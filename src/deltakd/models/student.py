"""Students built from their teacher: embeddings, head and a chosen subset of layers copied.

DistilBERT (Sanh et al. 2019) initialises its student from every other teacher layer; the same
works for causal LMs (distilgpt2). The student is a plain ``transformers`` model of the
teacher's class with fewer layers.
"""

from __future__ import annotations

import copy
import re
from typing import Sequence

from transformers import PreTrainedModel

from ..errors import DeltakdError

# config attribute holding the layer count, and the state-dict pattern of a layer index
_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
_LAYER_KEY = re.compile(r"^(.*?\.(?:layer|layers|h|block))\.(\d+)\.(.*)$")


def layer_count(model: PreTrainedModel) -> int:
    for key in _LAYER_COUNT_KEYS:
        n = getattr(model.config, key, None)
        if isinstance(n, int):
            return n
    raise DeltakdError(f"cannot tell the layer count of {type(model).__name__}")


def every_other(n_teacher: int, n_student: int) -> list[int]:
    """Evenly spread teacher layers for a student of ``n_student`` layers (0, 2, 4 of 6)."""
    if not 0 < n_student <= n_teacher:
        raise DeltakdError(f"student.nb_layers: {n_student} must be between 1 and the teacher's {n_teacher}")
    step = n_teacher / n_student
    return [int(i * step) for i in range(n_student)]


def student_from_teacher(teacher: PreTrainedModel, layers: Sequence[int]) -> PreTrainedModel:
    """A copy of ``teacher`` keeping only ``layers`` (in the given order), everything else copied."""
    n = layer_count(teacher)
    bad = [i for i in layers if not 0 <= i < n]
    if bad or not layers:
        raise DeltakdError(f"student.layers: {list(layers)} must be non-empty indices in 0..{n - 1}")
    config = copy.deepcopy(teacher.config)
    for key in _LAYER_COUNT_KEYS:
        if isinstance(getattr(config, key, None), int):
            setattr(config, key, len(layers))
    student = type(teacher)(config)
    source = {i_t: i_s for i_s, i_t in enumerate(layers)}
    state = {}
    for key, value in teacher.state_dict().items():
        m = _LAYER_KEY.match(key)
        if m is None:
            state[key] = value.clone()
            continue
        prefix, idx, rest = m.group(1), int(m.group(2)), m.group(3)
        if idx in source:
            state[f"{prefix}.{source[idx]}.{rest}"] = value.clone()
    missing, unexpected = student.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise DeltakdError(f"student from teacher: layer copy failed (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]})")
    return student
