"""LoRA-feature intermediate-layer distillation (LoRAILD): outputs of matching ``lora_A`` modules (B, L, r)."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .hidden import hidden_mse

__all__ = ["lora_feature_mse", "LoraACapture", "capture_lora_a_outputs"]


def lora_feature_mse(
    student_feats: Sequence[Tensor],
    teacher_feats: Sequence[Tensor],
    mask: Tensor | None = None,
) -> Tensor:
    """LoRAILD: MSE between outputs of matching ``lora_A`` modules of student and teacher.

    Each pair is (B, L, r) with the same rank r, so no projection is needed. Per pair: mean over
    r and unmasked tokens; result: mean over pairs.
    """
    if len(student_feats) == 0 or len(student_feats) != len(teacher_feats):
        raise ValueError(
            f"lora_feature_mse: need the same non-zero number of features, got "
            f"{len(student_feats)} student / {len(teacher_feats)} teacher"
        )
    losses = [hidden_mse(s, t, mask=mask) for s, t in zip(student_feats, teacher_feats)]
    return torch.stack(losses).mean()


_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


class LoraACapture:
    """Outputs of hooked ``lora_A`` linears, filled by :func:`capture_lora_a_outputs`.

    ``names`` lists the hooked modules (``<lora layer>.lora_A.<adapter>``) in model order, which
    is layer order. ``outputs[name]`` holds every output of that module since the last
    :meth:`clear`, in call order (more than one when a layer is reused, e.g. recurrence).
    """

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.outputs: dict[str, list[Tensor]] = {}

    def clear(self) -> None:
        self.outputs.clear()

    def features(self) -> list[Tensor]:
        """Captured outputs (B, L, r) in model (layer) order; modules that did not run are skipped."""
        return [t for name in self.names for t in self.outputs.get(name, [])]

    def by_layer(self) -> dict[int, list[Tensor]]:
        """Captured outputs grouped by transformer layer index (first integer in the module name)."""
        grouped: dict[int, list[Tensor]] = {}
        for name in self.names:
            match = _LAYER_INDEX.search(name)
            if match is None:
                continue
            grouped.setdefault(int(match.group(1)), []).extend(self.outputs.get(name, []))
        return {k: v for k, v in grouped.items() if v}


@contextmanager
def capture_lora_a_outputs(
    model: nn.Module,
    module_names_filter: Sequence[str] | None = ("query", "key", "value"),
    adapter_name: str | None = None,
) -> Iterator[LoraACapture]:
    """Register forward hooks on peft LoRA ``lora_A`` linears and collect their outputs.

    A peft ``LoraLayer`` keeps ``lora_A`` as an ``nn.ModuleDict`` keyed by adapter name. Layers
    are selected by the last component of their module name (``"query"`` in
    ``...attention.self.query``); ``None`` hooks every LoRA layer. ``adapter_name=None`` hooks
    every adapter (only active ones run). Outputs keep their autograd graph (for the student);
    peft applies LoRA dropout *before* ``lora_A``, so these are post-dropout features in train
    mode. Hooks are removed when the block exits. Usage::

        with capture_lora_a_outputs(student) as cap:
            out = student(**batch)
        feats = cap.features()  # list of (B, L, r)
    """
    wanted = None if module_names_filter is None else set(module_names_filter)
    handles = []
    names: list[str] = []
    capture = LoraACapture(names)

    def make_hook(key: str):
        def hook(_module: nn.Module, _inputs: tuple, output: Tensor) -> None:
            capture.outputs.setdefault(key, []).append(output)  # (B, L, r)

        return hook

    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if not isinstance(lora_a, nn.ModuleDict):
            continue
        if wanted is not None and name.rsplit(".", 1)[-1] not in wanted:
            continue
        for adapter, linear in lora_a.items():
            if adapter_name is not None and adapter != adapter_name:
                continue
            key = f"{name}.lora_A.{adapter}"
            names.append(key)
            handles.append(linear.register_forward_hook(make_hook(key)))
    if not handles:
        raise ValueError(
            f"capture_lora_a_outputs: no LoRA lora_A modules matching {sorted(wanted) if wanted else 'any'}"
            f" (adapter {adapter_name or 'any'}) in {type(model).__name__}"
        )
    try:
        yield capture
    finally:
        for handle in handles:
            handle.remove()
