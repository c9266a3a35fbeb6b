"""The task registry: GLUE presets and how a recipe's task section becomes a concrete TaskSpec."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DeltakdError
from ..recipe.schema import TaskConfig


@dataclass(frozen=True)
class Layout:
    """Where one copy of a dataset keeps its files and columns."""

    train_file: str
    valid_file: str | None
    text_columns: tuple[str | int, ...]
    label_column: str | int
    format: str = "tsv"
    header: bool = True
    test_file: str | None = None


@dataclass(frozen=True)
class Preset:
    kind: str  # classification | regression
    labels: tuple[str, ...] | None
    metrics: tuple[str, ...]  # the first is the model-selection metric
    layouts: tuple[Layout, ...]
    names: dict[str, str] | None = None  # what the label values mean, where the files hold numbers


# GLUE tasks (Wang et al. 2019) with the column names of the GLUE release files.
PRESETS: dict[str, Preset] = {
    "sst2": Preset("classification", ("0", "1"), ("accuracy",),
                   (Layout("train.tsv", "dev.tsv", ("sentence",), "label"),), {"0": "negative", "1": "positive"}),
    "cola": Preset("classification", ("0", "1"), ("matthews", "accuracy"),
                   (Layout("train.tsv", "dev.tsv", (3,), 1, header=False),), {"0": "unacceptable", "1": "acceptable"}),
    "rte": Preset("classification", ("entailment", "not_entailment"), ("accuracy",),
                  (Layout("train.tsv", "dev.tsv", ("sentence1", "sentence2"), "label"),)),
    "mrpc": Preset("classification", ("0", "1"), ("f1", "accuracy"),
                   (Layout("train.tsv", "dev.tsv", ("#1 String", "#2 String"), "Quality"),),
                   {"0": "not_equivalent", "1": "equivalent"}),
    "stsb": Preset("regression", None, ("pearson", "spearman"), (
        Layout("train.tsv", "dev.tsv", ("sentence1", "sentence2"), "score"),
        # the original STS Benchmark release: tab-separated despite the .csv name, no header
        Layout("sts-train.csv", "sts-dev.csv", (5, 6), 4, header=False, test_file="sts-test.csv"),
    )),
    "qnli": Preset("classification", ("entailment", "not_entailment"), ("accuracy",),
                   (Layout("train.tsv", "dev.tsv", ("question", "sentence"), "label"),)),
    "qqp": Preset("classification", ("0", "1"), ("f1", "accuracy"),
                  (Layout("train.tsv", "dev.tsv", ("question1", "question2"), "is_duplicate"),),
                  {"0": "not_duplicate", "1": "duplicate"}),
    "mnli": Preset("classification", ("contradiction", "entailment", "neutral"), ("accuracy",),
                   (Layout("train.tsv", "dev_matched.tsv", ("sentence1", "sentence2"), "gold_label"),)),
}

METRICS_BY_KIND = {"classification": ("accuracy",), "regression": ("pearson", "spearman")}


@dataclass(frozen=True)
class TaskSpec:
    """Everything the readers need, with presets and defaults filled in."""

    name: str
    kind: str
    labels: tuple[str, ...] | None  # None: inferred from the training data (classification)
    metrics: tuple[str, ...]
    text_columns: tuple[str | int, ...]
    label_column: str | int
    files: dict[str, Path] = field(default_factory=dict)  # split -> file
    format: str = "auto"
    header: bool = True
    extra_cells: str = "error"  # a tsv/csv row with more cells than the header: error | ignore
    label_names: dict[str, str] | None = None  # label value -> the name a saved model answers with

    def names_of(self, labels: tuple[str, ...] | None) -> tuple[str, ...] | None:
        """The names a model answers with for ``labels`` (class values in id order): each value's
        entry in ``label_names``, else the value itself; None for regression."""
        if not labels:
            return None
        return tuple(str((self.label_names or {}).get(v, v)) for v in labels)

    @property
    def main_metric(self) -> str:
        return self.metrics[0]


def _pick_layout(preset: Preset, data_dir: Path | None) -> Layout:
    if data_dir is not None:
        for lay in preset.layouts:
            if (data_dir / lay.train_file).is_file():
                return lay
    return preset.layouts[0]


def resolve_task(cfg: TaskConfig) -> TaskSpec:
    """Fill a recipe's task section from its preset; check that a custom task is complete."""
    preset = PRESETS.get(cfg.name)
    lay = _pick_layout(preset, cfg.data_dir) if preset else None
    kind = cfg.kind or (preset.kind if preset else "classification")
    text_columns = tuple(cfg.text_columns) if cfg.text_columns else (lay.text_columns if lay else None)
    label_column = cfg.label_column if cfg.label_column is not None else (lay.label_column if lay else None)
    if text_columns is None or label_column is None:
        raise DeltakdError(
            f"task.name: '{cfg.name}' is not a preset ({', '.join(sorted(PRESETS))}); "
            "a custom task needs task.text_columns and task.label_column")
    labels = tuple(cfg.labels) if cfg.labels else (preset.labels if preset else None)
    label_names = dict(cfg.label_names) if cfg.label_names else \
        (preset.names if preset is not None and labels == preset.labels else None)
    if kind == "regression":
        labels = label_names = None
    metrics = tuple(cfg.metrics) if cfg.metrics else (preset.metrics if preset else METRICS_BY_KIND[kind])
    bad = [m for m in metrics if m not in _METRICS_FOR[kind]]
    if bad:
        raise DeltakdError(f"task.metrics: {bad} do not apply to a {kind} task; allowed: {_METRICS_FOR[kind]}")
    files: dict[str, Path] = {}
    base = cfg.data_dir or Path(".")
    names = {"train": cfg.train_file or (lay.train_file if lay else None),
             "valid": cfg.valid_file or (lay.valid_file if lay else None),
             "test": cfg.test_file or (lay.test_file if lay else None)}
    if cfg.hf is None:
        if preset is None and cfg.train_file is None:
            names.update(_guess_files(base))
        for split, name in names.items():
            given = getattr(cfg, f"{split}_file") is not None
            # files a preset only suggests (a test set) are used when present
            if name is not None and (given or split != "test" or (base / name).is_file()):
                files[split] = base / name
    fmt = cfg.format
    header = cfg.header
    if lay is not None and cfg.format == "auto":
        fmt, header = lay.format, lay.header
    return TaskSpec(cfg.name, kind, labels, metrics, text_columns, label_column, files, fmt, header,
                    cfg.extra_cells, label_names)


_METRICS_FOR = {"classification": ("accuracy", "f1", "matthews"), "regression": ("pearson", "spearman")}


def _guess_files(base: Path) -> dict[str, str | None]:
    """For a custom task given only data_dir: train/dev(valid)/test files with a known extension."""
    found: dict[str, str | None] = {}
    for split, stems in (("train", ("train",)), ("valid", ("dev", "valid", "validation")), ("test", ("test",))):
        for stem in stems:
            for ext in ("tsv", "csv", "jsonl"):
                if (base / f"{stem}.{ext}").is_file():
                    found.setdefault(split, f"{stem}.{ext}")
    return found
