"""Students on disk: both forms written by ``save_student``, ``load_student``, ``export_plain``,
and the SentenceTransformer wrapping of a student.

Bottleneck and recurrent students are plain ``transformers`` models with a swapped sub-module, so
they train with the HF Trainer and ``save_pretrained`` works (shared layers are declared as tied
weights, so safetensors stores them once). What a plain loader (``AutoModel`` /
``SentenceTransformer(path)``) cannot do is rebuild the structure: it would load such a checkpoint
with random embeddings / layers (a warning only). Hence two forms on disk, written together by
``save_student``:

- the portable form, ``config.json`` + ``model.safetensors`` (+ sentence-transformers files): the
  bottleneck multiplied out into a plain ``nn.Embedding`` (``materialize``) and shared layers
  copied (``unroll``); any loader gives the same embeddings (float rounding aside). Costs the full
  model's bytes on disk, and further training of that form no longer shares anything.
- the compact form, ``multistage_config.json`` + ``multistage.safetensors``: the factorised
  embedding and the ``k`` distinct layers only; ``load_student`` rebuilds the trainable student.

A custom ``PreTrainedModel`` subclass with its own ``model_type`` would keep one form but needs
``trust_remote_code`` (or an import-time registration) wherever it is loaded; the two-form
directory needs nothing but ``transformers``.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import transformers
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import AutoConfig, PreTrainedModel

from ..errors import DeltakdError, optional_import
from .bottleneck import add_embedding_bottleneck, materialize
from .recurrence import apply_recurrence, unroll
from .structure import (
    PROJECTION,
    SPEC_KEY,
    add_projection,
    count_parameters,
    layer_list,
    layer_owner,
    multistage_spec,
    projection_of,
    sync_spec,
)

__all__ = [
    "MULTISTAGE_CONFIG",
    "MULTISTAGE_WEIGHTS",
    "compact_state_dict",
    "export_plain",
    "load_student",
    "portable_parameters",
    "save_student",
    "to_sentence_transformer",
    "transformer_parts",
    "uses_normalize",
]

MULTISTAGE_CONFIG = "multistage_config.json"
MULTISTAGE_WEIGHTS = "multistage.safetensors"
FORMAT = "deltakd.multistage"
FORMAT_VERSION = 1


def compact_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``state_dict`` with every shared tensor once (first name kept), contiguous, detached."""
    seen: set[tuple[Any, int, int]] = set()
    out: dict[str, Tensor] = {}
    for name, t in model.state_dict().items():
        key = (t.device, t.data_ptr(), t.numel()) if t.numel() else (t.device, id(t), 0)
        if key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().contiguous()
    return out


def export_plain(model: PreTrainedModel) -> PreTrainedModel:
    """A copy of ``model`` as its plain architecture (bottleneck materialised, layers unrolled,
    no projection: that becomes the sentence-transformers pipeline's ``Dense``): loads anywhere
    with ``from_pretrained``, same hidden states."""
    plain = copy.deepcopy(model)
    materialize(plain)
    unroll(plain)
    if projection_of(plain) is not None:
        delattr(plain, PROJECTION)
    if hasattr(plain.config, SPEC_KEY):
        delattr(plain.config, SPEC_KEY)
    return plain


def portable_parameters(model: PreTrainedModel) -> int:
    """Parameters of the saved sentence-transformers form: the plain architecture plus the projection."""
    proj = projection_of(model)
    return count_parameters(export_plain(model)) + (count_parameters(proj) if proj is not None else 0)


def _apply_spec(model: PreTrainedModel, spec: dict[str, Any]) -> None:
    if spec.get("bottleneck_dim"):
        add_embedding_bottleneck(model, int(spec["bottleneck_dim"]), bias=bool(spec.get("bottleneck_bias", True)))
    if spec.get("layer_pattern"):
        pattern = [int(j) for j in spec["layer_pattern"]]
        layers = layer_list(model)
        k = max(pattern) + 1
        if len(layers) != len(pattern):
            raise DeltakdError(f"multistage spec: layer pattern of length {len(pattern)} but the config has "
                               f"{len(layers)} layers")
        # keep the first k layers (positions 0..k-1 are distinct layers 0..k-1), then share
        _, holder, attr, _ = layer_owner(model)
        setattr(holder, attr, nn.ModuleList(list(layers)[:k]))
        apply_recurrence(model, pattern)
    if spec.get("projection"):
        _, out_features, bias = spec["projection"]
        add_projection(model, int(out_features), bias=bool(bias))
    sync_spec(model)


def save_student(
    model: PreTrainedModel,
    path: str | os.PathLike[str],
    tokenizer: Any | None = None,
    normalize: bool = False,
    max_seq_length: int | None = None,
) -> Path:
    """Write both forms of a student into ``path``.

    Portable: ``export_plain(model)``, as a sentence-transformers folder (Transformer + mean
    Pooling [+ Dense: the projection to the teacher's width] [+ Normalize]) when a ``tokenizer`` is
    given, else ``save_pretrained`` output. Compact (only for a bottleneck / recurrent / projected
    model): ``multistage.safetensors`` (shared tensors once) and ``multistage_config.json`` for
    ``load_student``.
    """
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    plain = export_plain(model)
    if tokenizer is not None:
        st = to_sentence_transformer(plain, tokenizer, normalize=normalize, max_seq_length=max_seq_length,
                                     projection=projection_of(model))
        st.save(str(out))
    else:
        plain.save_pretrained(out)
    del plain
    spec = multistage_spec(model)
    for name in (MULTISTAGE_CONFIG, MULTISTAGE_WEIGHTS):
        (out / name).unlink(missing_ok=True)
    if spec is not None:
        save_file(compact_state_dict(model), str(out / MULTISTAGE_WEIGHTS), metadata={"format": "pt"})
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "architecture": type(model).__name__, **spec,
                "parameters": count_parameters(model)}
        (out / MULTISTAGE_CONFIG).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return out


def _model_class(config: Any, architecture: str | None) -> Any:
    """The saved architecture's class (``BertModel``), else ``AutoModel``."""

    names = [architecture] if architecture else list(getattr(config, "architectures", None) or [])
    for name in names:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, PreTrainedModel):
            return cls
    return transformers.AutoModel


def _build(config: Any, architecture: str | None) -> PreTrainedModel:
    cls = _model_class(config, architecture)
    return cls.from_config(config) if cls.__name__ == "AutoModel" else cls(config)


def load_student(path: str | os.PathLike[str]) -> PreTrainedModel:
    """Load a student saved by ``save_student`` (compact form: structure rebuilt, shared layers
    shared again), a Trainer / ``save_pretrained`` checkpoint of a structured student (spec in
    ``config.json``), or any plain model folder."""

    root = Path(path)
    if not (root / "config.json").exists():
        raise DeltakdError(f"student '{root}': no config.json there")
    config = AutoConfig.from_pretrained(root)
    meta_path = root / MULTISTAGE_CONFIG
    if meta_path.exists():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT:
            raise DeltakdError(f"{meta_path}: not a {FORMAT} file")
        if int(meta.get("version", 0)) > FORMAT_VERSION:
            raise DeltakdError(f"{meta_path}: format version {meta['version']} is newer than this deltakd "
                               f"({FORMAT_VERSION})")
        spec, weights, arch = meta, root / MULTISTAGE_WEIGHTS, meta.get("architecture")
    elif isinstance(getattr(config, SPEC_KEY, None), dict):
        spec, weights, arch = getattr(config, SPEC_KEY), root / "model.safetensors", None
        delattr(config, SPEC_KEY)
    else:
        return _model_class(config, None).from_pretrained(root)
    if not weights.exists():
        raise DeltakdError(f"student '{root}': {weights.name} missing")
    if hasattr(config, SPEC_KEY):
        delattr(config, SPEC_KEY)
    if spec.get("layer_pattern"):
        for key in ("num_hidden_layers", "n_layers", "n_layer", "num_layers"):
            if isinstance(getattr(config, key, None), int):
                setattr(config, key, len(spec["layer_pattern"]))
                break
    model = _build(config, arch)
    _apply_spec(model, spec)
    state = load_file(str(weights))
    missing, unexpected = model.load_state_dict(state, strict=False)
    aliases = set(getattr(getattr(model, "base_model", model), "_tied_weights_keys", None) or {})
    prefix = getattr(model, "base_model_prefix", "")
    aliases |= {f"{prefix}.{k}" for k in aliases} if prefix and model.base_model is not model else set()
    missing = [k for k in missing if k not in aliases and not k.endswith("position_ids")]
    if missing or unexpected:
        raise DeltakdError(f"student '{root}': weights do not match the structure (missing {missing[:3]}, "
                           f"unexpected {list(unexpected)[:3]})")
    model.eval()
    return model


# --------------------------------------------------------------------------------------------
# sentence-transformers
# --------------------------------------------------------------------------------------------


def sentence_transformers() -> Any:
    """The sentence-transformers package (the ``embeddings`` extra), imported on first use: the family
    table imports this family for every run, and only multistage needs it."""
    return optional_import("sentence_transformers", "multistage")


def _st_modules() -> tuple[Any, Any, Any]:
    sentence_transformers()
    try:  # sentence-transformers >= 5.4
        from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    except ImportError:  # older layout
        from sentence_transformers.models import Normalize, Pooling, Transformer
    return Transformer, Pooling, Normalize


def _dense_cls() -> Any:
    sentence_transformers()
    try:  # sentence-transformers >= 5.4
        from sentence_transformers.sentence_transformer.modules import Dense
    except ImportError:  # older layout
        from sentence_transformers.models import Dense
    return Dense


def uses_normalize(st_model: Any) -> bool:
    """Whether a SentenceTransformer ends in L2 normalisation (all-MiniLM-L6-v2 does)."""
    _, _, normalize_cls = _st_modules()
    return any(isinstance(m, normalize_cls) for m in st_model)


def transformer_parts(st_model: Any) -> tuple[PreTrainedModel, Any]:
    """The HF model and tokenizer inside a SentenceTransformer (its first module)."""
    first = st_model[0]
    return first.auto_model, first.tokenizer


def to_sentence_transformer(
    model: PreTrainedModel,
    tokenizer: Any,
    normalize: bool = False,
    max_seq_length: int | None = None,
    projection: nn.Linear | None = None,
) -> Any:
    """A SentenceTransformer running ``model`` itself (same object: training it trains ``model``)
    with mean pooling, then ``Dense`` (identity activation) running ``projection`` (default: the
    model's own, ``projection_of``; the same ``nn.Linear`` object) when there is one, plus L2
    ``Normalize`` when ``normalize`` (match the teacher: ``uses_normalize``).

    Do not ``.save()`` the result of a bottleneck / recurrent model: sentence-transformers would
    write the compact weights under a plain config; ``save_student`` writes a loadable folder.
    """

    transformer_cls, pooling_cls, normalize_cls = _st_modules()
    projection = projection if projection is not None else projection_of(model)
    hidden = getattr(model.config, "hidden_size", None) or getattr(model.config, "dim", None)
    device = next(model.parameters()).device
    with tempfile.TemporaryDirectory(prefix="deltakd-st-") as tmp:
        # sentence-transformers' Transformer loads from a folder; build it from a plain copy of
        # the config, weights and tokenizer, then swap in the live model
        source = export_plain(model) if multistage_spec(model) is not None else model
        source.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        kwargs = {"max_seq_length": max_seq_length} if max_seq_length is not None else {}
        transformer = transformer_cls(tmp, **kwargs)
    if isinstance(getattr(type(transformer), "auto_model", None), property):
        transformer.model = model
    else:  # sentence-transformers < 5.4 stores it as ``auto_model``
        transformer.auto_model = model
    modules = [transformer, pooling_cls(hidden, pooling_mode="mean")]
    if projection is not None:
        dense = _dense_cls()(projection.in_features, projection.out_features, bias=projection.bias is not None,
                             activation_function=nn.Identity())
        dense.linear = projection
        modules.append(dense)
    if normalize:
        modules.append(normalize_cls())
    return sentence_transformers().SentenceTransformer(modules=modules, device=str(device))
