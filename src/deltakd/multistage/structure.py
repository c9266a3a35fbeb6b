"""Where the structure of a compressed student lives, and its spec in the model's config.

A multistage student (Ding et al. 2022, stages 2 and 3) is a plain ``transformers`` model with a
swapped sub-module: a ``BottleneckEmbedding`` as token embedding (``bottleneck``) and/or the same
layer objects at several positions of the transformer-layer list (``recurrence``). This module
finds those parts in a model and describes them (``multistage_spec``); the description is kept in
``model.config`` under ``SPEC_KEY`` so that a plain ``save_pretrained`` (Trainer checkpoint) still
says how to rebuild the model.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from transformers import PreTrainedModel

from ..errors import DeltakdError

__all__ = [
    "BottleneckEmbedding",
    "PROJECTION",
    "SPEC_KEY",
    "add_projection",
    "count_parameters",
    "embedding_dim",
    "input_embeddings",
    "layer_list",
    "layer_owner",
    "layer_pattern",
    "multistage_spec",
    "projection_of",
    "sync_spec",
]

# key in ``model.config`` describing the structure, so a plain ``save_pretrained`` (Trainer
# checkpoint) still says how to rebuild the model
SPEC_KEY = "deltakd_multistage"

# attribute of the student holding the learned projection of its mean-pooled embedding to the
# teacher's width (a student of another width); a sub-module, so the Trainer trains, checkpoints
# and resumes it with the rest of the model
PROJECTION = "deltakd_projection"

# attribute paths of the transformer-layer list, by model family
_LAYER_PATHS = (("encoder", "layer"), ("transformer", "layer"))


class BottleneckEmbedding(nn.Module):
    """Token embedding factorised as ``Embedding(V, d)`` -> ``Linear(d, H)`` (ALBERT, Lan et al. 2020).

    Drop-in for the ``nn.Embedding(V, H)`` of a transformer's input: ``(B, L)`` ids ->
    ``(B, L, H)``. ``num_embeddings``, ``embedding_dim`` (= H) and ``padding_idx`` mirror
    ``nn.Embedding``; there is no ``.weight`` (see ``full_weight``).
    """

    def __init__(
        self, num_embeddings: int, bottleneck_dim: int, hidden_size: int, padding_idx: int | None = None,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if bottleneck_dim < 1:
            raise DeltakdError(f"bottleneck dim: must be >= 1, got {bottleneck_dim}")
        self.num_embeddings = num_embeddings
        self.bottleneck_dim = bottleneck_dim
        self.embedding_dim = hidden_size
        self.padding_idx = padding_idx
        self.small = nn.Embedding(num_embeddings, bottleneck_dim, padding_idx=padding_idx)
        self.proj = nn.Linear(bottleneck_dim, hidden_size, bias=bias)

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.proj(self.small(input_ids))  # (B, L) -> (B, L, d) -> (B, L, H)

    def full_weight(self) -> Tensor:
        """The equivalent ``(V, H)`` embedding matrix ``small.weight @ proj.weight.T + proj.bias``."""
        return self.proj(self.small.weight)  # (V, d) -> (V, H)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.bottleneck_dim} -> {self.embedding_dim}"


def input_embeddings(model: PreTrainedModel) -> nn.Module:
    """The model's token-embedding module (``nn.Embedding`` or ``BottleneckEmbedding``)."""
    try:
        return model.get_input_embeddings()
    except (NotImplementedError, AttributeError):
        raise DeltakdError(f"{type(model).__name__}: has no input embeddings to factorise") from None


def layer_owner(model: nn.Module) -> tuple[PreTrainedModel | nn.Module, nn.Module, str, str]:
    """(base model, module holding the layer list, attribute name, dotted prefix within base)."""
    base = getattr(model, "base_model", model)
    for path in _LAYER_PATHS:
        holder: Any = base
        for part in path[:-1]:
            holder = getattr(holder, part, None)
        if holder is not None and isinstance(getattr(holder, path[-1], None), nn.ModuleList):
            return base, holder, path[-1], ".".join(path)
    raise DeltakdError(f"{type(model).__name__}: no transformer layer list found "
                       f"(looked for {', '.join('.'.join(p) for p in _LAYER_PATHS)})")


def layer_list(model: nn.Module) -> nn.ModuleList:
    """The model's transformer-layer list (``encoder.layer`` or ``transformer.layer``)."""
    _, holder, attr, _ = layer_owner(model)
    return getattr(holder, attr)


def layer_pattern(model: nn.Module) -> list[int] | None:
    """Which distinct layer each position runs (numbered by first appearance); None if no sharing."""
    seen: dict[int, int] = {}
    pattern = [seen.setdefault(id(layer), len(seen)) for layer in layer_list(model)]
    return pattern if len(seen) < len(pattern) else None


def projection_of(model: nn.Module) -> nn.Linear | None:
    """The student's projection of its pooled embedding to the teacher's width, if it has one
    (looked up through a DDP / accelerate wrapper's ``module``)."""
    model = getattr(model, "module", model)
    proj = getattr(model, PROJECTION, None)
    return proj if isinstance(proj, nn.Linear) else None


def add_projection(model: PreTrainedModel, out_features: int, bias: bool = True) -> nn.Linear:
    """Give a student of hidden size ``H_s`` a learned ``Linear(H_s, out_features)`` after mean
    pooling (sentence-transformers' ``Dense`` with identity activation), in place; returns it.
    Random init (``nn.Linear``'s, under the caller's seed)."""
    if projection_of(model) is not None:
        raise DeltakdError(f"{type(model).__name__}: already has a projection to "
                           f"{projection_of(model).out_features} dims")
    hidden = _hidden_size(model)
    ref = next(model.parameters())
    proj = nn.Linear(hidden, out_features, bias=bias).to(device=ref.device, dtype=ref.dtype)
    setattr(model, PROJECTION, proj)
    sync_spec(model)
    return proj


def _hidden_size(model: nn.Module) -> int:
    cfg = getattr(getattr(model, "module", model), "config", None)
    size = getattr(cfg, "hidden_size", None) or getattr(cfg, "dim", None)
    if not isinstance(size, int):
        raise DeltakdError(f"{type(model).__name__}: its config names no hidden size")
    return size


def embedding_dim(model: nn.Module) -> int:
    """Width of the student's sentence embedding: its projection's output, else its hidden size."""
    proj = projection_of(model)
    return proj.out_features if proj is not None else _hidden_size(model)


def multistage_spec(model: PreTrainedModel) -> dict[str, Any] | None:
    """The structure a plain architecture lacks: ``{"bottleneck_dim", "bottleneck_bias",
    "layer_pattern"}`` (+ ``"projection": [in, out, bias]`` for a student with a projection), or
    None for a plain model. Read from the modules, not the config."""
    emb = input_embeddings(model)
    bottleneck = isinstance(emb, BottleneckEmbedding)
    try:
        pattern = layer_pattern(model)
    except DeltakdError:
        pattern = None
    proj = projection_of(model)
    if not bottleneck and pattern is None and proj is None:
        return None
    spec: dict[str, Any] = {
        "bottleneck_dim": emb.bottleneck_dim if bottleneck else None,
        "bottleneck_bias": (emb.proj.bias is not None) if bottleneck else None,
        "layer_pattern": pattern,
    }
    if proj is not None:
        spec["projection"] = [proj.in_features, proj.out_features, proj.bias is not None]
    return spec


def sync_spec(model: PreTrainedModel) -> None:
    """Keep ``model.config``'s ``SPEC_KEY`` equal to ``multistage_spec(model)`` (absent for a plain model)."""
    spec = multistage_spec(model)
    if spec is None:
        if hasattr(model.config, SPEC_KEY):
            delattr(model.config, SPEC_KEY)
    else:
        setattr(model.config, SPEC_KEY, spec)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters, each shared tensor counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)

