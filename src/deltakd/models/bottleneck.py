"""Bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP";
Pfeiffer et al. 2021, "AdapterFusion").

An adapter is a small residual MLP ``x + up(act(down(x)))`` (hidden -> hidden // reduction_factor
-> hidden) applied to the output of a sub-layer's output projection, before that sub-layer's
residual connection and LayerNorm:

- ``houlsby``: one adapter after the attention output projection and one after the feed-forward
  output projection of every transformer layer;
- ``pfeiffer``: only the one after the feed-forward output projection.

The base model is left untouched: each adapter is registered as a child of the projection's parent
module (``<parent>.adapter_attn`` / ``<parent>.adapter_ffn``) and a forward hook on the projection
returns ``adapter(output)``. Base ``state_dict`` keys therefore do not change and base weights load
as before; adapter keys are the extra ``...adapter_attn.*`` / ``...adapter_ffn.*`` entries.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

from safetensors.torch import load_file, save
from torch import Tensor, nn
from transformers import PreTrainedModel

from ..utils import atomic_write_bytes, atomic_write_text

__all__ = [
    "ARCHITECTURES",
    "Bottleneck",
    "BottleneckSpec",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "adapter_state_dict",
    "add_bottleneck_adapters",
    "bottleneck_modules",
    "load_bottleneck",
    "read_bottleneck_config",
    "save_bottleneck",
]

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "bottleneck_config.json"
FORMAT = "deltakd.bottleneck"
FORMAT_VERSION = 1

ATTN_ADAPTER = "adapter_attn"
FFN_ADAPTER = "adapter_ffn"

PLACEMENTS = ("houlsby", "pfeiffer")
NON_LINEARITIES: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "swish": nn.SiLU,
    "tanh": nn.Tanh,
}


@dataclass(frozen=True)
class BottleneckSpec:
    """What adapters to insert.

    ``init_scale`` is the std of the up-projection's initial weights (down-projection: default
    ``nn.Linear`` init; both biases zero). ``0.0`` makes every adapter an exact identity at init, so
    the model starts as the base model; the default ``1e-3`` starts it within a tiny perturbation.
    """

    placement: Literal["houlsby", "pfeiffer"] = "pfeiffer"
    reduction_factor: int = 16
    non_linearity: Literal["relu", "gelu", "swish", "tanh"] = "relu"
    init_scale: float = 1e-3

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement={self.placement!r}: expected one of {list(PLACEMENTS)}")
        if isinstance(self.reduction_factor, bool) or not isinstance(self.reduction_factor, int) \
                or self.reduction_factor < 1:
            raise ValueError(f"reduction_factor={self.reduction_factor!r}: expected an int >= 1")
        if self.non_linearity not in NON_LINEARITIES:
            raise ValueError(
                f"non_linearity={self.non_linearity!r}: expected one of {list(NON_LINEARITIES)}"
            )
        if isinstance(self.init_scale, bool) or not isinstance(self.init_scale, (int, float)) \
                or not math.isfinite(self.init_scale) or self.init_scale < 0:
            raise ValueError(f"init_scale={self.init_scale!r}: expected a finite float >= 0")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BottleneckSpec:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown bottleneck spec keys {unknown}; allowed: {sorted(known)}")
        return cls(**data)


class Bottleneck(nn.Module):
    """Residual bottleneck MLP ``x + up(act(down(x)))``: hidden -> hidden // rf -> hidden."""

    def __init__(
        self,
        hidden_size: int,
        reduction_factor: int = 16,
        non_linearity: str = "relu",
        init_scale: float = 1e-3,
    ) -> None:
        super().__init__()
        if non_linearity not in NON_LINEARITIES:
            raise ValueError(
                f"non_linearity={non_linearity!r}: expected one of {list(NON_LINEARITIES)}"
            )
        self.hidden_size = hidden_size
        self.bottleneck_size = self.size_for(hidden_size, reduction_factor)
        self.down = nn.Linear(hidden_size, self.bottleneck_size)
        self.act = NON_LINEARITIES[non_linearity]()
        self.up = nn.Linear(self.bottleneck_size, hidden_size)
        self.reset_parameters(init_scale)

    @staticmethod
    def size_for(hidden_size: int, reduction_factor: int) -> int:
        """Bottleneck width: ``hidden_size // reduction_factor``, at least 1."""
        return max(1, hidden_size // reduction_factor)

    def reset_parameters(self, init_scale: float = 1e-3) -> None:
        """Near-identity init: ``up`` ~ N(0, init_scale²) (zero when ``init_scale == 0``)."""
        self.down.reset_parameters()
        nn.init.zeros_(self.down.bias)
        if init_scale > 0:
            nn.init.normal_(self.up.weight, mean=0.0, std=init_scale)
        else:
            nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:  # (B, L, H) -> (B, L, H)
        return x + self.up(self.act(self.down(x)))


class _ApplyAdapter:
    """Forward hook ``output -> adapter(output)``.

    A plain object rather than a closure so that ``copy.deepcopy`` of the model points the copy's
    hook at the copy's adapter, and so that the model stays picklable.
    """

    def __init__(self, adapter: Bottleneck) -> None:
        self.adapter = adapter

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        if isinstance(output, Tensor):
            return self.adapter(output)
        if isinstance(output, tuple) and output and isinstance(output[0], Tensor):
            return (self.adapter(output[0]), *output[1:])
        raise TypeError(
            f"bottleneck adapter hook on {type(module).__name__}: unexpected output type "
            f"{type(output).__name__}"
        )


@dataclass(frozen=True)
class _Architecture:
    """Module-name patterns of one family of architectures (matched on full module names)."""

    attn_output: re.Pattern[str]
    ffn_output: re.Pattern[str]
    model_types: tuple[str, ...]


# Explicit registry: family -> name patterns of the attention-output and FFN-output projections.
ARCHITECTURES: dict[str, _Architecture] = {
    "bert": _Architecture(  # BERT, RoBERTa, XLM-R, ELECTRA, MiniLM, ... (post-LN encoders)
        re.compile(r"(^|\.)layer\.\d+\.attention\.output\.dense$"),
        re.compile(r"(^|\.)layer\.\d+\.output\.dense$"),
        ("bert", "roberta", "xlm-roberta", "camembert", "electra", "minilm"),
    ),
    "distilbert": _Architecture(
        re.compile(r"(^|\.)layer\.\d+\.attention\.out_lin$"),
        re.compile(r"(^|\.)layer\.\d+\.ffn\.lin2$"),
        ("distilbert",),
    ),
    "gpt2": _Architecture(
        re.compile(r"(^|\.)h\.\d+\.attn\.c_proj$"),
        re.compile(r"(^|\.)h\.\d+\.mlp\.c_proj$"),
        ("gpt2",),
    ),
    "llama": _Architecture(  # Llama, Mistral, Qwen2, ... (pre-norm decoders)
        re.compile(r"(^|\.)layers\.\d+\.self_attn\.o_proj$"),
        re.compile(r"(^|\.)layers\.\d+\.mlp\.down_proj$"),
        ("llama", "mistral", "qwen2"),
    ),
}


def _supported() -> str:
    return "; ".join(f"{fam} ({', '.join(a.model_types)})" for fam, a in ARCHITECTURES.items())


def _model_label(model: nn.Module) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return f"{model_type!r} ({type(model).__name__})" if model_type else type(model).__name__


def _out_features(module: nn.Module, name: str) -> int:
    for attr in ("out_features", "nf"):  # nn.Linear, transformers Conv1D
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"cannot tell the output size of {name} ({type(module).__name__})")


def _find_sites(model: nn.Module, placement: str) -> list[tuple[str, str]]:
    """``(module name, adapter attribute)`` for every projection that gets an adapter."""
    names = [n for n, _ in model.named_modules()]
    for arch in ARCHITECTURES.values():
        ffn = [n for n in names if arch.ffn_output.search(n)]
        if not ffn:
            continue
        attn = [n for n in names if arch.attn_output.search(n)]
        if placement == "houlsby" and len(attn) != len(ffn):
            raise ValueError(
                f"houlsby placement on {_model_label(model)}: found {len(attn)} attention-output "
                f"and {len(ffn)} feed-forward-output projections; expected one of each per layer"
            )
        sites = [(n, FFN_ADAPTER) for n in ffn]
        if placement == "houlsby":
            sites += [(n, ATTN_ADAPTER) for n in attn]
        order = {n: i for i, n in enumerate(names)}
        return sorted(sites, key=lambda s: order[s[0]])
    raise ValueError(
        f"bottleneck adapters do not support architecture {_model_label(model)}: no known "
        f"feed-forward output projection found. Supported: {_supported()}"
    )


def _adapter_shapes(model: nn.Module, spec: BottleneckSpec) -> dict[str, tuple[int, ...]]:
    """State-dict keys and shapes that ``add_bottleneck_adapters(model, spec)`` would add."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name, attr in _find_sites(model, spec.placement):
        hidden = _out_features(model.get_submodule(name), name)
        size = Bottleneck.size_for(hidden, spec.reduction_factor)
        parent = name.rpartition(".")[0]
        prefix = f"{parent}.{attr}" if parent else attr
        shapes[f"{prefix}.down.weight"] = (size, hidden)
        shapes[f"{prefix}.down.bias"] = (size,)
        shapes[f"{prefix}.up.weight"] = (hidden, size)
        shapes[f"{prefix}.up.bias"] = (hidden,)
    return shapes


def bottleneck_modules(model: nn.Module) -> dict[str, Bottleneck]:
    """Every adapter in ``model``, by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, Bottleneck)}


def _is_adapter_key(name: str) -> bool:
    parts = name.split(".")
    return ATTN_ADAPTER in parts or FFN_ADAPTER in parts


def _head_param_names(model: nn.Module, trainable_extra: Sequence[str]) -> list[str]:
    return [
        n for n, _ in model.named_parameters()
        if not _is_adapter_key(n) and any(extra in n for extra in trainable_extra)
    ]


def add_bottleneck_adapters(
    model: PreTrainedModel,
    spec: BottleneckSpec,
    trainable_extra: Sequence[str] = ("classifier", "score"),
) -> PreTrainedModel:
    """Freeze every base parameter and insert adapters in place (returns ``model``).

    Parameters whose name contains any string in ``trainable_extra`` (the task head) stay
    trainable. Raises ``ValueError`` for an architecture with no known projection names, or when
    ``model`` already has adapters.
    """
    if isinstance(trainable_extra, str):
        trainable_extra = (trainable_extra,)
    if bottleneck_modules(model):
        raise ValueError(f"{_model_label(model)} already has bottleneck adapters")
    sites = _find_sites(model, spec.placement)

    for p in model.parameters():
        p.requires_grad_(False)
    head_names = _head_param_names(model, trainable_extra)
    params = dict(model.named_parameters())
    for n in head_names:
        params[n].requires_grad_(True)

    for name, attr in sites:
        dense = model.get_submodule(name)
        parent_name = name.rpartition(".")[0]
        parent = model.get_submodule(parent_name) if parent_name else model
        if hasattr(parent, attr):
            raise ValueError(f"{parent_name or 'model'} already has an attribute {attr!r}")
        adapter = Bottleneck(
            _out_features(dense, name), spec.reduction_factor, spec.non_linearity, spec.init_scale
        )
        ref = next(dense.parameters(), None)
        if ref is not None:
            adapter.to(device=ref.device, dtype=ref.dtype)
        parent.add_module(attr, adapter)
        dense.register_forward_hook(_ApplyAdapter(adapter))

    model.bottleneck_spec = spec
    model.bottleneck_head_names = tuple(head_names)
    model.bottleneck_trainable_extra = tuple(trainable_extra)
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Adapter weights plus the trainable task-head weights (detached, not copied)."""
    if not bottleneck_modules(model):
        raise ValueError(f"{_model_label(model)} has no bottleneck adapters")
    head = set(getattr(model, "bottleneck_head_names", ()))
    return {
        k: v.detach() for k, v in model.state_dict().items() if _is_adapter_key(k) or k in head
    }


def save_bottleneck(
    model: nn.Module,
    directory: str | os.PathLike[str],
    spec: BottleneckSpec,
    base_model_name_or_path: str,
) -> None:
    """Write ``adapter_model.safetensors`` and ``bottleneck_config.json`` to ``directory``.

    Each file is written to a temporary name in ``directory`` then moved into place.
    """
    model_spec = getattr(model, "bottleneck_spec", None)
    if model_spec is not None and model_spec != spec:
        raise ValueError(f"spec {spec} differs from the model's adapters {model_spec}")
    state = adapter_state_dict(model)
    head = sorted(k for k in getattr(model, "bottleneck_head_names", ()) if k in state)
    tensors = {k: v.contiguous().cpu().clone() for k, v in state.items()}
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "spec": asdict(spec),
        "base_model_name_or_path": base_model_name_or_path,
        "model_type": getattr(getattr(model, "config", None), "model_type", None),
        "head_param_names": head,
        "trainable_extra": list(getattr(model, "bottleneck_trainable_extra", ())),
        "num_adapters": len(bottleneck_modules(model)),
    }

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / WEIGHTS_NAME, save(tensors, metadata={"format": "pt"}))
    atomic_write_text(out / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")


def read_bottleneck_config(
    directory: str | os.PathLike[str],
) -> tuple[BottleneckSpec, dict[str, Any]]:
    """``(spec, rest of the config)`` from ``directory/bottleneck_config.json``."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"no {CONFIG_NAME} in {directory}: not a directory written by save_bottleneck"
        )
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    if not isinstance(config, dict) or config.get("format") != FORMAT or "spec" not in config:
        raise ValueError(f"{path} is not a deltakd bottleneck config")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version {config['format_version']}; this deltakd reads up to "
            f"{FORMAT_VERSION}"
        )
    rest = dict(config)
    spec = BottleneckSpec.from_dict(rest.pop("spec"))
    return spec, rest


def _preview(keys: list[str], n: int = 5) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_bottleneck(
    model: PreTrainedModel,
    directory: str | os.PathLike[str],
    *,
    load_head: bool = True,
) -> PreTrainedModel:
    """Insert the adapters described in ``directory`` into a base ``model`` and load their weights.

    Strict: every adapter weight must be in the file, with the right shape, and every saved key
    must exist in the model. With ``load_head=False`` the saved task head is ignored (the model's
    own head is kept, still trainable), e.g. to transfer adapters to a task with another label set.
    """
    spec, meta = read_bottleneck_config(directory)
    weights_path = Path(directory) / WEIGHTS_NAME
    if not weights_path.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory} (found {CONFIG_NAME} only)")

    extra = tuple(meta.get("trainable_extra", ("classifier", "score")))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if bottleneck_modules(model):
        existing = getattr(model, "bottleneck_spec", None)
        if existing != spec:
            raise ValueError(
                f"model already has bottleneck adapters {existing}, checkpoint has {spec}"
            )
        extra = tuple(getattr(model, "bottleneck_trainable_extra", extra))
        adapter_shapes = {k: v for k, v in shapes.items() if _is_adapter_key(k)}
        to_add = False
    else:
        adapter_shapes = _adapter_shapes(model, spec)
        shapes.update(adapter_shapes)
        to_add = True

    # Validate everything before touching the model, so a failed load leaves it as it was.
    saved = load_file(str(weights_path))
    missing = set(adapter_shapes) - set(saved)
    if missing:
        raise ValueError(
            f"{weights_path} lacks {len(missing)} adapter weight(s) this model needs "
            f"(placement {spec.placement!r}, {meta.get('model_type')!r} checkpoint): "
            f"{_preview(list(missing))}"
        )
    unexpected = set(saved) - set(shapes)
    if unexpected:
        raise ValueError(
            f"{weights_path} has weight(s) this model does not: {_preview(list(unexpected))}"
        )
    head_names = set(_head_param_names(model, extra))
    allowed = set(adapter_shapes) | head_names | set(meta.get("head_param_names", []))
    not_delta = set(saved) - allowed
    if not_delta:  # never overwrite frozen base weights from an adapter file
        raise ValueError(
            f"{weights_path} has weight(s) that are neither adapter nor head weights: "
            f"{_preview(list(not_delta))}"
        )
    if not load_head:
        saved = {k: v for k, v in saved.items() if k in adapter_shapes}
    else:
        head_missing = [k for k in meta.get("head_param_names", []) if k not in saved]
        head_missing += [k for k in head_names if k not in saved]
        if head_missing:
            raise ValueError(
                f"{weights_path} lacks head weight(s) {_preview(sorted(set(head_missing)))}; "
                "load_head=False keeps the model's own head"
            )
    mismatched = [
        f"{k} has shape {tuple(v.shape)}, the model expects {shapes[k]}"
        for k, v in sorted(saved.items()) if tuple(v.shape) != shapes[k]
    ]
    if mismatched:
        hint = "" if all(k in adapter_shapes for k in saved) else \
            " (a different task head? load_head=False keeps the model's own head)"
        raise ValueError(f"{weights_path}: " + "; ".join(mismatched) + hint)

    if to_add:
        add_bottleneck_adapters(model, spec, trainable_extra=extra)
    result = model.load_state_dict(saved, strict=False)
    if result.unexpected_keys:  # cannot happen after the checks above
        raise RuntimeError(f"unexpected keys while loading: {result.unexpected_keys}")
    return model
