"""Tasks and data: registry, readers, splits, tokenisation with an on-disk cache."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import DeltakdError
from ..recipe.schema import TaskConfig
from .dailydialog_tasks import read_act_task
from .readers import Example, read_file, read_hf
from .splits import k_shot, resplit, subset
from .tasks import PRESETS, TaskSpec, resolve_task


@dataclass
class TaskData:
    spec: TaskSpec
    labels: tuple[str, ...] | None  # class names in id order; None for regression
    splits: dict[str, list[Example]]  # train / valid / test, label already an id (or a float)

    @property
    def num_labels(self) -> int:
        return len(self.labels) if self.labels else 1

    @property
    def label_names(self) -> tuple[str, ...] | None:
        """What a saved model calls each class (``id2label``): ``task.label_names`` or the preset's
        names of numeric labels (SST-2: negative, positive), else the label values themselves."""
        return self.spec.names_of(self.labels)


def load_task(cfg: TaskConfig, seed: int) -> TaskData:
    """Read, validate, split and sample a task as its recipe section says."""
    if cfg.dialogue is not None:  # DailyDialog utterances labelled with their dialogue act
        spec, raw = read_act_task(cfg)
    elif cfg.hf is not None:
        spec = resolve_task(cfg)
        raw = read_hf(cfg.hf, spec)
    else:
        spec = resolve_task(cfg)
        if "train" not in spec.files:
            raise DeltakdError(f"task: no training file found in '{cfg.data_dir}'; set task.train_file")
        raw = {"train": read_file(spec.files["train"], spec)}
        # a label of an eval file that training never shows stops at its line
        known = (spec.labels or _label_names(raw["train"])) if spec.kind == "classification" else None
        raw.update({split: read_file(path, spec, known) for split, path in spec.files.items() if split != "train"})
    train = raw["train"]
    valid = raw.get("valid")
    seed = seed if cfg.split_seed is None else cfg.split_seed
    test = raw.get("test")
    if cfg.resplit_valid:
        # the old valid split becomes the test split (GLUE dev); without one, a test file stays the test split
        train, valid, test = (*resplit(train, cfg.resplit_valid, seed, spec.kind == "classification"),
                              valid if valid is not None else test)
    if valid is None:
        raise DeltakdError("task: no validation data; give task.valid_file or task.resplit_valid: 0.1")
    if cfg.k_shot is not None:
        train = k_shot(train, cfg.k_shot.k, cfg.k_shot.per_class, cfg.k_shot.seed)
    if cfg.max_train_samples:
        train = subset(train, cfg.max_train_samples, seed)
    splits = {"train": train, "valid": valid}
    if test is not None:
        splits["test"] = test
    if cfg.max_eval_samples:
        for name in ("valid", "test"):
            if name in splits:
                splits[name] = subset(splits[name], cfg.max_eval_samples, seed)
    labels = spec.labels
    if spec.kind == "classification":
        if labels is None:
            labels = _label_names(raw["train"])
        index = {name: i for i, name in enumerate(labels)}
        for name, examples in splits.items():
            for ex in examples:
                if ex["label"] not in index:
                    raise DeltakdError(f"task: {name} split has label {ex['label']!r}, "
                                       f"not in the training labels {list(labels)}")
        splits = {name: [{**ex, "label": index[ex["label"]]} for ex in exs] for name, exs in splits.items()}
        _check_label_names(spec, labels)
    return TaskData(spec, labels, splits)


def _check_label_names(spec: TaskSpec, labels: tuple[str, ...]) -> None:
    unknown = sorted(set(spec.label_names or {}) - set(labels))
    if unknown:
        raise DeltakdError(f"task.label_names: {unknown} are not labels of this task; its labels are {list(labels)}")
    names = spec.names_of(labels) or ()
    if len(set(names)) < len(names):
        raise DeltakdError(f"task.label_names: two labels get the same name ({list(names)})")


def _label_names(train: list[Example]) -> tuple[str, ...]:
    return tuple(sorted({ex["label"] for ex in train}, key=_natural))


def _natural(label: str) -> tuple[int, float | str]:
    try:
        return (0, float(label))
    except ValueError:
        return (1, label)


__all__ = ["PRESETS", "Example", "TaskData", "TaskSpec", "load_task", "resolve_task"]
