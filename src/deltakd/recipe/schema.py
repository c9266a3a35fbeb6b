"""Pydantic models of a recipe: validated at the edge, plain typed objects inside."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator


class Strict(BaseModel):
    """Unknown keys are errors; assignment is validated too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _check_files(info: ValidationInfo) -> bool:
    return bool(info.context and info.context.get("check_files"))


class KShot(Strict):
    """Few-shot sampling of the training split (seeded)."""

    k: int = Field(gt=0, description="examples per class (per_class) or in total")
    per_class: bool = True
    seed: int = 0


class HFSource(Strict):
    """A task read through ``datasets.load_dataset`` (hub name, builder or local folder)."""

    path: str
    name: str | None = None
    data_files: dict[str, str | list[str]] | None = None
    revision: str | None = None
    options: dict[str, Any] = Field(default_factory=dict, description="more load_dataset keywords, e.g. sep")
    splits: dict[Literal["train", "valid", "test"], str] = Field(
        default_factory=lambda: {"train": "train", "valid": "validation"})


class TaskConfig(Strict):
    """Which data, which columns, which metric.

    ``name`` is a GLUE preset (sst2, cola, rte, mrpc, stsb, qnli, qqp, mnli) that fills in
    files, columns, labels and metrics, or any other name for a custom task that states them.
    """

    name: str = Field(min_length=1)
    data_dir: Path | None = None
    train_file: str | None = None
    valid_file: str | None = None
    test_file: str | None = None
    format: Literal["auto", "tsv", "csv", "jsonl"] = "auto"
    header: bool = True
    text_columns: list[str | int] | None = Field(default=None, min_length=1, max_length=2)
    label_column: str | int | None = None
    labels: list[str] | None = Field(default=None, min_length=2)
    kind: Literal["classification", "regression"] | None = None
    metrics: list[Literal["accuracy", "f1", "matthews", "pearson", "spearman"]] | None = None
    hf: HFSource | None = None
    resplit_valid: float | None = Field(default=None, gt=0.0, lt=1.0)
    k_shot: KShot | None = None
    max_train_samples: int | None = Field(default=None, gt=0)
    max_eval_samples: int | None = Field(default=None, gt=0)
    max_length: int = Field(default=128, ge=8, le=8192)

    @model_validator(mode="after")
    def _sources(self, info: ValidationInfo) -> "TaskConfig":
        if self.hf is None and self.data_dir is None and self.train_file is None:
            raise ValueError("give task.data_dir (a folder of files), task.train_file, or task.hf")
        if self.hf is not None and (self.data_dir is not None or self.train_file is not None):
            raise ValueError("task.hf cannot be combined with task.data_dir / task.train_file")
        if _check_files(info) and self.data_dir is not None and not self.data_dir.is_dir():
            raise ValueError(f"task.data_dir: folder '{self.data_dir}' does not exist")
        return self


class ModelConfig(Strict):
    """A local path, a hub id, or a packaged alias (``minilm-l6``)."""

    name: str = "minilm-l6"
    revision: str | None = None
    trust_remote_code: bool = False


class FullFT(Strict):
    """Full fine-tuning: every weight trains."""

    method: Literal["full"]


class LoraPeft(Strict):
    """LoRA (Hu et al. 2021) through ``peft``; ``full: true`` also trains every base weight."""

    method: Literal["lora"]
    r: int = Field(default=8, gt=0)
    alpha: float = Field(default=16, gt=0)
    dropout: float = Field(default=0.1, ge=0, lt=1)
    target: list[str] = Field(default_factory=lambda: ["query", "value"], min_length=1)
    full: bool = False
    merge: bool = False


class PrefixPeft(Strict):
    """Prefix tuning (Li & Liang 2021) through ``peft``."""

    method: Literal["prefix"]
    num_virtual_tokens: int = Field(default=20, gt=0)
    projection: bool = False
    hidden: int = Field(default=128, gt=0, description="width of the prefix projection MLP")


class PromptPeft(Strict):
    """Prompt tuning (Lester et al. 2021) through ``peft``; ``init_text`` for text initialisation."""

    method: Literal["prompt"]
    num_virtual_tokens: int = Field(default=20, gt=0)
    init_text: str | None = None


class PTuningPeft(Strict):
    """P-tuning (Liu et al. 2021): virtual tokens from a prompt encoder, through ``peft``."""

    method: Literal["ptuning"]
    num_virtual_tokens: int = Field(default=20, gt=0)
    encoder: Literal["MLP", "LSTM"] = "MLP"
    hidden: int = Field(default=128, gt=0)


class IA3Peft(Strict):
    """(IA)^3 (Liu et al. 2022) through ``peft``; default targets fit BERT-style models."""

    method: Literal["ia3"]
    target: list[str] = Field(default_factory=lambda: ["key", "value", "output.dense"], min_length=1)
    feedforward: list[str] = Field(default_factory=lambda: ["output.dense"])


class BottleneckPeft(Strict):
    """Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021), written in deltakd."""

    method: Literal["bottleneck"]
    placement: Literal["houlsby", "pfeiffer"] = "pfeiffer"
    reduction_factor: int = Field(default=16, gt=0)
    non_linearity: Literal["relu", "gelu", "swish", "tanh"] = "relu"


PeftConfig = Annotated[
    Union[FullFT, LoraPeft, PrefixPeft, PromptPeft, PTuningPeft, IA3Peft, BottleneckPeft],
    Field(discriminator="method"),
]


class TrainConfig(Strict):
    epochs: float = Field(default=3, gt=0)
    max_steps: int | None = Field(default=None, gt=0, description="overrides epochs when set")
    lr: float = Field(default=2e-5, gt=0, lt=1)
    batch_size: int = Field(default=32, gt=0)
    eval_batch_size: int = Field(default=64, gt=0)
    grad_accum: int = Field(default=1, gt=0)
    seed: int = 42
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_ratio: float = Field(default=0.0, ge=0, lt=1)
    scheduler: Literal["linear", "constant", "cosine", "constant_with_warmup"] = "linear"
    max_grad_norm: float = Field(default=1.0, gt=0)
    eval_every: Literal["epoch"] | Annotated[int, Field(gt=0)] = "epoch"
    save_every: Literal["eval"] | Annotated[int, Field(gt=0)] = "eval"
    early_stop: int | None = Field(default=None, gt=0, description="patience, in evaluations")
    metric_for_best: str | None = None
    logging_steps: int = Field(default=10, gt=0)
    save_total_limit: int = Field(default=2, ge=1)
    bf16: bool = False
    fp16: bool = False
    num_workers: int = Field(default=0, ge=0)
    group_by_length: bool = Field(default=False, description="batch similar lengths together: less padding")

    @model_validator(mode="after")
    def _save_matches_eval(self) -> "TrainConfig":
        if self.save_every != "eval":
            if self.eval_every == "epoch":
                raise ValueError("train.save_every: a step count needs train.eval_every in steps too")
            if self.save_every % self.eval_every:
                raise ValueError(f"train.save_every ({self.save_every}) must be a multiple of "
                                 f"train.eval_every ({self.eval_every}) so the best model is among the checkpoints")
        return self


Tracker = Literal["tensorboard", "mlflow", "wandb", "neptune"]


class Recipe(Strict):
    """One experiment."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    task: TaskConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    peft: PeftConfig = Field(default_factory=lambda: FullFT(method="full"))
    train: TrainConfig = Field(default_factory=TrainConfig)
    track: list[Tracker] = Field(default_factory=lambda: ["tensorboard"])
    output_dir: Path = Path("runs")

    @field_validator("track")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"track: duplicate trackers in {v}")
        return v
