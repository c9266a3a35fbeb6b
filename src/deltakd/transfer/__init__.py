"""Transfer of trained delta modules between tasks: task-similarity estimators and weighted fusion.

Source modules (LoRA, bottleneck adapters, prefixes) trained on source tasks are fused, weighted by
a task-similarity estimate, into the initial module of a (few-shot) target task:

    scores = estimators.el2n(logits, labels)                 # (S,), higher = more similar
    weights = estimators.softmax_weights(scores, temperature=0.5)
    delta, head = fuse.fuse_modules(states, weights, method="lora_svd", rank=8,
                                    source_scaling=2.0, target_scaling=2.0)
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> submodule; loaded on first use (PEP 562) so that ``deltakd.transfer.recipe`` validates a
# recipe without importing torch (the CLI refuses a bad recipe before the heavy imports)
_LAZY = {"ESTIMATORS": "estimators", "UnknownEstimatorError": "estimators", "get_estimator": "estimators",
         "leave_one_out": "estimators", "softmax_weights": "estimators", "fuse_heads": "fuse",
         "fuse_modules": "fuse", "Combine": "merging", "TransferError": "state_dicts", "split_head": "state_dicts"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ESTIMATORS",
    "Combine",
    "TransferError",
    "UnknownEstimatorError",
    "fuse_heads",
    "fuse_modules",
    "get_estimator",
    "leave_one_out",
    "softmax_weights",
    "split_head",
]
