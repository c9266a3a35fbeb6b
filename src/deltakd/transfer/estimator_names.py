"""The names of the task-similarity estimators, importable without torch.

The transfer recipe (:mod:`deltakd.transfer.recipe`) checks ``estimate.estimators`` against this
tuple while a recipe is validated, before torch is imported; :data:`deltakd.transfer.estimators.ESTIMATORS`
maps the same names, in the same order, to their functions (checked when that module loads).
"""

ESTIMATOR_NAMES = ("uniform", "task_groups", "cosine", "euclidean", "dev_change", "loss", "kl", "kl_shift",
                   "kl_original", "el2n", "grand", "logits_labels")
