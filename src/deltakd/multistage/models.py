"""Compressed sentence-encoder students: embedding bottleneck, parameter recurrence, export.

Stages 2 and 3 of Ding et al. 2022 ("Multi-stage Distillation Framework for Cross-Lingual
Semantic Similarity Matching"):

- **Bottleneck** (factorised embedding, ALBERT, Lan et al. 2020): the token embedding ``(V, H)``
  becomes ``Embedding(V, d)`` followed by ``Linear(d, H)``; ``V*H`` parameters -> ``V*d + d*H + H``
  (MiniLM-L6: 11.7M -> 3.96M at d = 128). ``align_bottleneck`` initialises it from a pretrained
  embedding matrix by truncated SVD of the mean-centred matrix (PCA): the bias is the mean row and
  the rank-d product is the best rank-d approximation in Frobenius norm (Eckart-Young), so the
  initial ``proj(small(ids))`` is the best affine rank-d fit of the pretrained rows; exact when
  ``d >= rank(W - mean)``.
- **Parameter recurrence** (cross-layer sharing, ALBERT; "recurrent" layers as in Dehghani et al.
  2019, Universal Transformers): the student keeps ``k`` distinct transformer layers and runs them
  in a cycle up to depth ``N``, position ``i`` using distinct layer ``i % k`` (or any pattern). It
  is built by putting the same module objects several times into ``encoder.layer``; parameters
  are counted once (``model.parameters()`` de-duplicates).

Both are plain ``transformers`` models with a swapped sub-module, so they train with the HF
Trainer and ``save_pretrained`` works (shared layers are declared as tied weights, so safetensors
stores them once). What a plain loader (``AutoModel`` / ``SentenceTransformer(path)``) cannot do is
rebuild the structure: it would load such a checkpoint with random embeddings / layers (a warning
only). Hence two forms on disk, written together by ``save_student``:

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
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import PreTrainedModel

from ..errors import DeltakdError
from ..models.student import layer_count

__all__ = [
    "BottleneckEmbedding",
    "MULTISTAGE_CONFIG",
    "MULTISTAGE_WEIGHTS",
    "SPEC_KEY",
    "add_embedding_bottleneck",
    "align_bottleneck",
    "apply_recurrence",
    "bottleneck_student",
    "compact_state_dict",
    "count_parameters",
    "block_pattern",
    "nearest_pattern",
    "recurrence_pattern",
    "search_keep",
    "cycle_pattern",
    "export_plain",
    "layer_pattern",
    "load_student",
    "materialize",
    "multistage_spec",
    "recurrent_student",
    "save_student",
    "to_sentence_transformer",
    "transformer_parts",
    "unroll",
    "uses_normalize",
]

MULTISTAGE_CONFIG = "multistage_config.json"
MULTISTAGE_WEIGHTS = "multistage.safetensors"
FORMAT = "deltakd.multistage"
FORMAT_VERSION = 1
# key in ``model.config`` describing the structure, so a plain ``save_pretrained`` (Trainer
# checkpoint) still says how to rebuild the model
SPEC_KEY = "deltakd_multistage"

# attribute paths of the transformer-layer list, by model family
_LAYER_PATHS = (("encoder", "layer"), ("transformer", "layer"))


# --------------------------------------------------------------------------------------------
# bottleneck (factorised) embedding
# --------------------------------------------------------------------------------------------


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


def _input_embeddings(model: PreTrainedModel) -> nn.Module:
    try:
        return model.get_input_embeddings()
    except (NotImplementedError, AttributeError):
        raise DeltakdError(f"{type(model).__name__}: has no input embeddings to factorise") from None


def add_embedding_bottleneck(model: PreTrainedModel, dim: int, bias: bool = True) -> BottleneckEmbedding:
    """Replace ``model``'s token embedding (V, H) by a random ``BottleneckEmbedding`` (V, d -> H),
    in place; returns the new module (initialise it with ``align_bottleneck``)."""
    emb = _input_embeddings(model)
    if isinstance(emb, BottleneckEmbedding):
        raise DeltakdError(f"{type(model).__name__}: the token embedding is already a bottleneck")
    if not isinstance(emb, nn.Embedding):
        raise DeltakdError(f"{type(model).__name__}: input embeddings are {type(emb).__name__}, not nn.Embedding")
    if model.get_output_embeddings() is not None:
        raise DeltakdError(f"{type(model).__name__}: has an output embedding (LM head) tied to the input one; "
                           "use the bare encoder (e.g. BertModel) for a bottleneck student")
    new = BottleneckEmbedding(emb.num_embeddings, dim, emb.embedding_dim, padding_idx=emb.padding_idx, bias=bias)
    new.to(device=emb.weight.device, dtype=emb.weight.dtype)
    model.set_input_embeddings(new)
    _sync_spec(model)
    return new


@torch.no_grad()
def align_bottleneck(student: PreTrainedModel | BottleneckEmbedding, pretrained: PreTrainedModel | Tensor) -> float:
    """Initialise the student's bottleneck so that ``proj(small(ids))`` best approximates the
    pretrained embedding matrix ``W`` (V, H); returns the relative error ``||W - W_hat||_F / ||W||_F``.

    Truncated SVD of the centred matrix ``W - 1 mu^T = U S V^T``: ``small.weight = U_d S_d``
    (V, d), ``proj.weight = V_d`` (H, d), ``proj.bias = mu`` (H); computed in float64, with
    ``V_d`` from the eigenvectors of the (H, H) Gram matrix and ``U_d S_d = (W - mu) V_d``.
    This is the best rank-d affine fit (PCA; Eckart-Young on the centred rows), exact when
    ``d >= rank(W - mu)``; extra columns beyond ``min(V, H)`` are zero. Without a projection bias
    the uncentred SVD is used (best rank-d linear fit).
    """
    bottleneck = student if isinstance(student, BottleneckEmbedding) else _input_embeddings(student)
    if not isinstance(bottleneck, BottleneckEmbedding):
        raise DeltakdError("align_bottleneck: the student has no bottleneck embedding (add_embedding_bottleneck)")
    if isinstance(pretrained, Tensor):
        weight = pretrained
    else:
        emb = _input_embeddings(pretrained)
        weight = emb.full_weight() if isinstance(emb, BottleneckEmbedding) else emb.weight
    w = weight.detach().to(torch.float64)  # (V, H)
    v, h = bottleneck.num_embeddings, bottleneck.embedding_dim
    if tuple(w.shape) != (v, h):
        raise DeltakdError(f"align_bottleneck: pretrained embedding is {tuple(w.shape)}, the student's is ({v}, {h})")
    has_bias = bottleneck.proj.bias is not None
    mu = w.mean(dim=0) if has_bias else torch.zeros(h, dtype=w.dtype, device=w.device)  # (H,)
    x = w - mu  # (V, H)
    # right singular vectors from the (H, H) Gram matrix: same subspace as the SVD, much faster
    # than an SVD of the tall (V, H) matrix; U_k S_k = x V_k
    _, vecs = torch.linalg.eigh(x.transpose(0, 1) @ x)  # ascending eigenvalues
    d = bottleneck.bottleneck_dim
    k = min(d, h)
    top = vecs[:, -k:].flip(1) if k else vecs[:, :0]  # (H, k), largest first
    small = torch.zeros(v, d, dtype=w.dtype, device=w.device)
    small[:, :k] = x @ top  # (V, k) = U_k S_k
    proj = torch.zeros(h, d, dtype=w.dtype, device=w.device)
    proj[:, :k] = top  # (H, k)
    target = bottleneck.small.weight
    bottleneck.small.weight.copy_(small.to(device=target.device, dtype=target.dtype))
    bottleneck.proj.weight.copy_(proj.to(device=target.device, dtype=target.dtype))
    if has_bias:
        bottleneck.proj.bias.copy_(mu.to(device=target.device, dtype=target.dtype))
    approx = small @ proj.transpose(0, 1) + mu  # (V, H)
    return float(torch.linalg.norm(w - approx) / torch.linalg.norm(w).clamp_min(1e-30))


def bottleneck_student(pretrained: PreTrainedModel, dim: int, align: bool = True, bias: bool = True) -> PreTrainedModel:
    """A copy of ``pretrained`` whose token embedding is a d-dim bottleneck, SVD-aligned to the
    pretrained embedding when ``align`` (else random). Everything else is copied."""
    student = copy.deepcopy(pretrained)
    add_embedding_bottleneck(student, dim, bias=bias)
    if align:
        align_bottleneck(student, pretrained)
    return student


@torch.no_grad()
def materialize(model: PreTrainedModel) -> PreTrainedModel:
    """Multiply a bottleneck out into a plain ``nn.Embedding(V, H)`` (weight ``proj(small.weight)``),
    in place; a model without bottleneck is returned unchanged. Same outputs, plain architecture."""
    emb = _input_embeddings(model)
    if isinstance(emb, BottleneckEmbedding):
        full = emb.full_weight()  # (V, H)
        plain = nn.Embedding(emb.num_embeddings, emb.embedding_dim, padding_idx=emb.padding_idx)
        plain.to(device=full.device, dtype=full.dtype)
        plain.weight.copy_(full)
        model.set_input_embeddings(plain)
        _sync_spec(model)
    return model


# --------------------------------------------------------------------------------------------
# parameter recurrence (shared layers)
# --------------------------------------------------------------------------------------------


def _layer_owner(model: nn.Module) -> tuple[PreTrainedModel | nn.Module, nn.Module, str, str]:
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


def _layer_list(model: nn.Module) -> nn.ModuleList:
    _, holder, attr, _ = _layer_owner(model)
    return getattr(holder, attr)


def cycle_pattern(depth: int, k: int) -> list[int]:
    """``[0, 1, ..., k-1, 0, 1, ...]`` of length ``depth``: position i uses distinct layer ``i % k``."""
    if not 1 <= k <= depth:
        raise DeltakdError(f"recurrence: need 1 <= distinct layers ({k}) <= depth ({depth})")
    return [i % k for i in range(depth)]


def block_pattern(depth: int, k: int) -> list[int]:
    """``[0, 0, 1, 1, 2, 2]`` for depth 6, k 3: each distinct layer runs a contiguous block of
    positions (the first blocks one longer when ``k`` does not divide ``depth``), so a kept layer
    stands in for its neighbours instead of for a layer far from it."""
    if not 1 <= k <= depth:
        raise DeltakdError(f"recurrence: need 1 <= distinct layers ({k}) <= depth ({depth})")
    size, extra = divmod(depth, k)
    return [j for j in range(k) for _ in range(size + (j < extra))]


def nearest_pattern(keep: Sequence[int], depth: int, n_layers: int) -> list[int]:
    """Position ``i`` of a depth-``depth`` student runs the kept layer closest to where position
    ``i`` sits in the ``n_layers``-deep original (ties go to the lower layer): keep [0, 3, 5] of 6
    gives [0, 0, 1, 1, 1, 2], i.e. layers 0 0 3 3 3 5. ``keep`` must be sorted."""
    keep = list(keep)
    if keep != sorted(keep) or len(set(keep)) != len(keep):
        raise DeltakdError(f"recurrence keep {keep}: the nearest order needs distinct layers in increasing order")
    if not 1 <= len(keep) <= depth:
        raise DeltakdError(f"recurrence: need 1 <= distinct layers ({len(keep)}) <= depth ({depth})")
    scale = (n_layers - 1) / (depth - 1) if depth > 1 else 0.0
    return [min(range(len(keep)), key=lambda j: (abs(keep[j] - i * scale), j)) for i in range(depth)]


def recurrence_pattern(order: str, keep: Sequence[int], depth: int, n_layers: int) -> list[int]:
    """The layer pattern of ``order`` (``cycle`` / ``block`` / ``nearest``) for these kept layers."""
    k = len(keep)
    if order == "nearest":
        return nearest_pattern(keep, depth, n_layers)
    if order == "block":
        return block_pattern(depth, k)
    if order == "cycle":
        return cycle_pattern(depth, k)
    raise DeltakdError(f"recurrence order '{order}' is unknown; valid: cycle, block, nearest")


def search_keep(
    pretrained: PreTrainedModel,
    k: int,
    depth: int,
    order: str,
    score: Callable[[PreTrainedModel], float],
    candidates: Iterable[Sequence[int]] | None = None,
    progress: bool = True,
) -> tuple[list[int], list[tuple[list[int], float]]]:
    """Try every ``k``-subset of the layers (or ``candidates``) as the kept layers of a recurrent
    student, untrained, and return the one of lowest ``score`` with all (keep, score) pairs.

    ``score`` is the caller's criterion on a student, e.g. the MSE of its English embeddings to the
    teacher's on a sample of *training* sentences (never test data)."""
    from itertools import combinations

    from rich.progress import track

    n = len(_layer_list(pretrained))
    pool = [sorted(c) for c in (candidates if candidates is not None else combinations(range(n), k))]
    if not pool:
        raise DeltakdError(f"recurrence search: no candidate layer subsets (k={k}, {n} layers)")
    scored = []
    for keep in track(pool, description=f"recurrence: scoring {len(pool)} layer subsets", disable=not progress):
        student = recurrent_student(pretrained, keep, depth, recurrence_pattern(order, keep, depth, n))
        scored.append((list(keep), float(score(student))))
        del student
    best = min(scored, key=lambda kv: kv[1])[0]
    return best, scored


def layer_pattern(model: nn.Module) -> list[int] | None:
    """Which distinct layer each position runs (numbered by first appearance); None if no sharing."""
    seen: dict[int, int] = {}
    pattern = [seen.setdefault(id(layer), len(seen)) for layer in _layer_list(model)]
    return pattern if len(seen) < len(pattern) else None


def _set_tied_keys(model: nn.Module) -> None:
    """Declare shared layers as tied weights on the base model, so ``save_pretrained`` stores each
    shared tensor once (safetensors refuses aliased tensors) instead of raising."""
    base, _, _, prefix = _layer_owner(model)
    layers = _layer_list(model)
    first: dict[int, int] = {}
    tied: dict[str, str] = {}
    for i, layer in enumerate(layers):
        j = first.setdefault(id(layer), i)
        if j != i:
            for name, _ in layer.named_parameters():
                tied[f"{prefix}.{i}.{name}"] = f"{prefix}.{j}.{name}"
    if tied:
        base._tied_weights_keys = tied
    elif "_tied_weights_keys" in vars(base):
        del base._tied_weights_keys


def apply_recurrence(model: PreTrainedModel, pattern: Sequence[int]) -> PreTrainedModel:
    """Rebuild the layer list in place so that position ``i`` runs the model's current layer
    ``pattern[i]`` (the same module object, parameters shared). The model must have no shared
    layers yet, and every current layer must be used."""
    layers = _layer_list(model)
    if layer_pattern(model) is not None:
        raise DeltakdError("recurrence: the model already shares layers; apply it to a plain model")
    k = len(layers)
    pattern = list(pattern)
    if not pattern or any(not 0 <= j < k for j in pattern):
        raise DeltakdError(f"recurrence pattern {pattern}: entries must index the {k} distinct layers (0..{k - 1})")
    unused = sorted(set(range(k)) - set(pattern))
    if unused:
        raise DeltakdError(f"recurrence pattern {pattern}: distinct layer(s) {unused} never used")
    # first appearance order must be 0, 1, 2, ... so the saved compact form reads back the same
    order = list(dict.fromkeys(pattern))
    if order != list(range(k)):
        raise DeltakdError(f"recurrence pattern {pattern}: distinct layers must first appear in order 0..{k - 1}")
    _, holder, attr, _ = _layer_owner(model)
    setattr(holder, attr, nn.ModuleList([layers[j] for j in pattern]))
    for key in ("num_hidden_layers", "n_layers", "n_layer", "num_layers"):
        if isinstance(getattr(model.config, key, None), int):
            setattr(model.config, key, len(pattern))
            break
    _set_tied_keys(model)
    _sync_spec(model)
    return model


def recurrent_student(
    pretrained: PreTrainedModel,
    keep: Sequence[int],
    depth: int | None = None,
    pattern: Sequence[int] | None = None,
) -> PreTrainedModel:
    """Student with ``k = len(keep)`` distinct layers copied from ``pretrained`` (its layers
    ``keep``, in that order) reused up to ``depth`` (default: the pretrained depth); position ``i``
    runs distinct layer ``i % k`` unless ``pattern`` says otherwise. Embeddings etc. copied."""
    depth = layer_count(pretrained) if depth is None else depth
    keep = list(keep)
    n = len(_layer_list(pretrained))
    if not keep or len(set(keep)) != len(keep) or any(not 0 <= i < n for i in keep):
        raise DeltakdError(f"recurrence keep {keep}: must be distinct layer indices in 0..{n - 1}")
    if layer_pattern(pretrained) is not None:
        raise DeltakdError("recurrence: the pretrained model already shares layers")
    student = copy.deepcopy(pretrained)  # works for bottleneck students too
    _, holder, attr, _ = _layer_owner(student)
    layers = getattr(holder, attr)
    setattr(holder, attr, nn.ModuleList([layers[i] for i in keep]))
    return apply_recurrence(student, cycle_pattern(depth, len(keep)) if pattern is None else pattern)


def unroll(model: PreTrainedModel) -> PreTrainedModel:
    """Give every position its own copy of its layer (same values), in place: a plain model with
    the same outputs, no shared parameters. A model without sharing is returned unchanged."""
    if layer_pattern(model) is None:
        return model
    _, holder, attr, _ = _layer_owner(model)
    seen: set[int] = set()
    new = []
    for layer in getattr(holder, attr):
        new.append(copy.deepcopy(layer) if id(layer) in seen else layer)
        seen.add(id(layer))
    setattr(holder, attr, nn.ModuleList(new))
    _set_tied_keys(model)
    _sync_spec(model)
    return model


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters, each shared tensor counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# --------------------------------------------------------------------------------------------
# structure spec, save / load
# --------------------------------------------------------------------------------------------


def multistage_spec(model: PreTrainedModel) -> dict[str, Any] | None:
    """The structure a plain architecture lacks: ``{"bottleneck_dim", "bottleneck_bias",
    "layer_pattern"}``, or None for a plain model. Read from the modules, not the config."""
    emb = _input_embeddings(model)
    bottleneck = isinstance(emb, BottleneckEmbedding)
    try:
        pattern = layer_pattern(model)
    except DeltakdError:
        pattern = None
    if not bottleneck and pattern is None:
        return None
    return {
        "bottleneck_dim": emb.bottleneck_dim if bottleneck else None,
        "bottleneck_bias": (emb.proj.bias is not None) if bottleneck else None,
        "layer_pattern": pattern,
    }


def _sync_spec(model: PreTrainedModel) -> None:
    spec = multistage_spec(model)
    if spec is None:
        if hasattr(model.config, SPEC_KEY):
            delattr(model.config, SPEC_KEY)
    else:
        setattr(model.config, SPEC_KEY, spec)


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
    """A copy of ``model`` as its plain architecture (bottleneck materialised, layers unrolled):
    loads anywhere with ``from_pretrained`` / ``SentenceTransformer(path)``, same outputs."""
    plain = copy.deepcopy(model)
    materialize(plain)
    unroll(plain)
    if hasattr(plain.config, SPEC_KEY):
        delattr(plain.config, SPEC_KEY)
    return plain


def _apply_spec(model: PreTrainedModel, spec: dict[str, Any]) -> None:
    if spec.get("bottleneck_dim"):
        add_embedding_bottleneck(model, int(spec["bottleneck_dim"]), bias=bool(spec.get("bottleneck_bias", True)))
    if spec.get("layer_pattern"):
        pattern = [int(j) for j in spec["layer_pattern"]]
        layers = _layer_list(model)
        k = max(pattern) + 1
        if len(layers) != len(pattern):
            raise DeltakdError(f"multistage spec: layer pattern of length {len(pattern)} but the config has "
                               f"{len(layers)} layers")
        # keep the first k layers (positions 0..k-1 are distinct layers 0..k-1), then share
        _, holder, attr, _ = _layer_owner(model)
        setattr(holder, attr, nn.ModuleList(list(layers)[:k]))
        apply_recurrence(model, pattern)


def save_student(
    model: PreTrainedModel,
    path: str | os.PathLike[str],
    tokenizer: Any | None = None,
    normalize: bool = False,
    max_seq_length: int | None = None,
) -> Path:
    """Write both forms of a student into ``path``.

    Portable: ``export_plain(model)``, as a sentence-transformers folder (Transformer + mean
    Pooling [+ Normalize]) when a ``tokenizer`` is given, else ``save_pretrained`` output.
    Compact (only for a bottleneck / recurrent model): ``multistage.safetensors`` (shared tensors
    once) and ``multistage_config.json`` for ``load_student``.
    """
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    plain = export_plain(model)
    if tokenizer is not None:
        st = to_sentence_transformer(plain, tokenizer, normalize=normalize, max_seq_length=max_seq_length)
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
    import transformers

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
    from transformers import AutoConfig

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


def _st_modules() -> tuple[Any, Any, Any]:
    try:  # sentence-transformers >= 5.4
        from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    except ImportError:  # older layout
        from sentence_transformers.models import Normalize, Pooling, Transformer
    return Transformer, Pooling, Normalize


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
) -> Any:
    """A SentenceTransformer running ``model`` itself (same object: training it trains ``model``)
    with mean pooling, plus L2 ``Normalize`` when ``normalize`` (match the teacher: ``uses_normalize``).

    Do not ``.save()`` the result of a bottleneck / recurrent model: sentence-transformers would
    write the compact weights under a plain config; ``save_student`` writes a loadable folder.
    """
    from sentence_transformers import SentenceTransformer

    transformer_cls, pooling_cls, normalize_cls = _st_modules()
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
    if normalize:
        modules.append(normalize_cls())
    return SentenceTransformer(modules=modules, device=str(device))
