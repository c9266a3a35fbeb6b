"""Transfer of trained delta modules between tasks: task-similarity estimators and weighted fusion.

Source modules (LoRA, bottleneck adapters, prefixes) trained on source tasks are fused, weighted by
a task-similarity estimate, into the initial module of a (few-shot) target task:

    scores = estimators.el2n(logits, labels)                 # (S,), higher = more similar
    weights = estimators.softmax_weights(scores, temperature=0.5)
    delta, head = fuse.fuse_modules(states, weights, method="lora_svd", rank=8,
                                    source_scaling=2.0, target_scaling=2.0)
"""

from .estimators import ESTIMATORS, UnknownEstimatorError, get_estimator, leave_one_out, softmax_weights
from .fuse import fuse_heads, fuse_modules
from .merging import Combine
from .state_dicts import TransferError, split_head

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
