"""The transfer recipe: a module library on source tasks, k-shot targets, estimators, fusion, seeds.

A transfer recipe is not an ordinary training recipe (it describes many runs), so it has its own
pydantic model and loader; ``extends:`` and dotted overrides work as for ordinary recipes. A recipe
is told apart by its top-level ``transfer:`` section::

    name: transfer-minilm-lora
    description: ...
    transfer:
      backbone: minilm-l6
      peft: {method: lora, r: 8, alpha: 16}
      tasks: {sst2: {name: sst2, data_dir: ..., resplit_valid: 0.1}, mr: {...}, ...}
      sources: [sst2, mr, ...]
      targets: [mr, ...]                   # leave-one-out: a target's own module never takes part
      groups: {sentiment: [sst2, mr, cr]}  # for the task_groups estimator
      library: {dir: runs/transfer-library, grid: {lr: [...], batch_size: [...]}, train: {...}}
      target: {k: 64, seeds: [1, 2, 3], train: {...}}
      estimate: {estimators: [uniform, cosine, loss, ...], temperature: 1.0, steps: 20}
      fusion: {lora: svd, combine: average}
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Iterable, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from ..errors import DeltakdError
from ..recipe.kinds import TRANSFER, recipe_kind
from ..recipe.load import apply_overrides, format_validation_error, load_raw
from ..recipe.schema import BottleneckPeft, LoraPeft, PrefixPeft, Strict, TaskConfig, TrainConfig
from .estimator_names import ESTIMATOR_NAMES

TransferPeft = Annotated[LoraPeft | BottleneckPeft | PrefixPeft, Field(discriminator="method")]

#: Estimators the orchestration knows how to feed (``kl_shift`` too: the prediction shift of tuning).
RUNNABLE_ESTIMATORS = ESTIMATOR_NAMES

_TASK_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class Grid(Strict):
    """The learning-rate x batch-size grid of every source module; the best cell by validation wins."""

    lr: list[Annotated[float, Field(gt=0, lt=1)]] = Field(default_factory=lambda: [5e-4], min_length=1)
    batch_size: list[Annotated[int, Field(gt=0)]] = Field(default_factory=lambda: [32], min_length=1)


class LibraryConfig(Strict):
    """Where source modules live and how they are trained (``train.eval_every`` steps, ``early_stop``)."""

    dir: Path = Path("runs/transfer-library")
    grid: Grid = Field(default_factory=Grid)
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=3, eval_every=200, early_stop=3))
    max_train_samples: int | None = Field(default=None, gt=0, description="cap on each source's training split")
    max_eval_samples: int | None = Field(default=None, gt=0, description="cap on each source's valid/test split")


class TargetConfig(Strict):
    """k-shot training of every target from every start, once per seed (seed = k-shot draw and init)."""

    k: int = Field(default=64, gt=0, description="training examples drawn from the target's train split")
    per_class: bool = Field(default=False, description="k per class instead of k in total")
    seeds: list[int] = Field(default_factory=lambda: [1, 2, 3], min_length=1)
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=20, lr=5e-4, batch_size=16, eval_every=8,
                                                                   early_stop=5))
    max_eval_samples: int | None = Field(default=None, gt=0, description="cap on the target's valid/test split")
    init_from: Path | None = Field(
        default=None, description="an extra start 'init_from': every target also trains from this delta module "
        "(a library module folder, a .safetensors file, or a finished run / its model folder); head fresh")

    @field_validator("seeds")
    @classmethod
    def _unique(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError(f"target.seeds: duplicate seeds in {v}")
        return v


class EstimateConfig(Strict):
    """Similarity estimators and how their scores become weights.

    Every estimator works from the target's k-shot data and the source modules: a linear head is fitted
    on each source-adapted model's features (cross-validated logits -> loss, kl, el2n, logits_labels;
    gradient norms with that head -> grand); ``steps`` of tuning on the k-shot data from each source ->
    euclidean, dev_change, kl_shift (and ``dev_after`` for the best single source); a fresh module tuned
    ``steps`` on the target -> cosine, and with the sources' logits on the dev subset -> kl_original (the
    original's KL: target tuned from random init vs each source; ``kl`` is this project's label-marginal KL,
    see :mod:`deltakd.transfer.estimators`). Scores are z-scored per target (``normalize``) so one
    ``temperature`` means the same for every estimator, then ``softmax(score / temperature)``.
    """

    estimators: list[str] = Field(default_factory=lambda: ["task_groups", "cosine", "euclidean", "dev_change", "loss",
                                                           "kl", "el2n", "grand", "logits_labels"])
    temperature: float | dict[str, Annotated[float, Field(ge=0)]] = Field(default=1.0)
    normalize: Literal["zscore", "none"] = "zscore"
    steps: int = Field(default=20, gt=0, description="tuning steps of the tuning-based estimators")
    lr: float = Field(default=1e-3, gt=0, lt=1)
    batch_size: int = Field(default=16, gt=0)
    dev_samples: int = Field(default=256, gt=0, description="target valid examples for dev_change / dev_after")
    folds: int = Field(default=4, ge=2, description="cross-validation folds of the fitted head's logits")
    best_single_by: str = Field(default="dev_after", description="estimator (or dev_after) picking the best source")

    @field_validator("estimators")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        bad = [e for e in v if e not in RUNNABLE_ESTIMATORS]
        if bad:
            raise ValueError(f"estimate.estimators: unknown {bad}; valid: {', '.join(RUNNABLE_ESTIMATORS)}")
        if len(set(v)) != len(v):
            raise ValueError(f"estimate.estimators: duplicates in {v}")
        return v

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v: Any) -> Any:
        if isinstance(v, float) and v < 0:
            raise ValueError(f"estimate.temperature: {v} must be >= 0")
        return v

    @model_validator(mode="after")
    def _best_single(self) -> "EstimateConfig":
        allowed = ["dev_after", *self.estimators]
        if self.best_single_by not in allowed:
            raise ValueError(f"estimate.best_single_by: '{self.best_single_by}' is not one of {allowed}")
        if isinstance(self.temperature, dict):
            bad = sorted(set(self.temperature) - set(self.estimators))
            if bad:
                raise ValueError(f"estimate.temperature: {bad} are not among estimate.estimators")
        return self

    def temperature_of(self, estimator: str) -> float:
        if isinstance(self.temperature, dict):
            return float(self.temperature.get(estimator, 1.0))
        return float(self.temperature)


class FusionConfig(Strict):
    """How source modules become one start. LoRA: exact ``dW = sum w_i B_i A_i`` re-factored by SVD
    (``svd``) or the naive factor average (``factors``); other methods: parameter averaging.
    ``combine``: plain weighted sum, TIES or DARE on the task vectors.
    ``factor_baseline``: also train from the uniform *factor-wise* LoRA average, for comparison."""

    lora: Literal["svd", "factors"] = "svd"
    combine: Literal["average", "ties", "dare"] = "average"
    density: float = Field(default=0.2, gt=0, le=1, description="TIES: kept fraction")
    drop_rate: float = Field(default=0.5, ge=0, lt=1, description="DARE: drop probability")
    factor_baseline: bool = False
    heads: Literal["fresh", "same_labels"] = Field(
        default="fresh", description="target heads start fresh; same_labels averages source heads only when "
        "every source has the target's exact label set (labels like 0/1 may still mean different things)")


class TransferSpec(Strict):
    backbone: str = "minilm-l6"
    backbone_revision: str | None = Field(default=None, description="the hub revision of backbone "
                                          "(branch, tag or commit)")
    peft: TransferPeft = Field(default_factory=lambda: LoraPeft(method="lora"))
    tasks: dict[Annotated[str, Field(pattern=_TASK_NAME)], TaskConfig] = Field(min_length=2)
    sources: list[str] = Field(min_length=1)
    targets: list[str] = Field(min_length=1)
    groups: dict[str, list[str]] | None = None
    library: LibraryConfig = Field(default_factory=LibraryConfig)
    target: TargetConfig = Field(default_factory=TargetConfig)
    estimate: EstimateConfig = Field(default_factory=EstimateConfig)
    fusion: FusionConfig = Field(default_factory=FusionConfig)
    max_length: int | None = Field(default=None, ge=8, le=8192, description="overrides every task's max_length")

    @model_validator(mode="after")
    def _names(self) -> "TransferSpec":
        for where, names in (("sources", self.sources), ("targets", self.targets)):
            unknown = [n for n in names if n not in self.tasks]
            if unknown:
                raise ValueError(f"transfer.{where}: {unknown} are not in transfer.tasks ({', '.join(self.tasks)})")
            if len(set(names)) != len(names):
                raise ValueError(f"transfer.{where}: duplicates in {names}")
        for t in self.targets:
            if not [s for s in self.sources if s != t]:
                raise ValueError(f"transfer.targets: '{t}' has no source left once its own module is left out")
            if self.tasks[t].kind not in (None, "classification"):
                raise ValueError(f"transfer.targets: '{t}' is a {self.tasks[t].kind} task; targets are classification")
        if "task_groups" in self.estimate.estimators:
            if not self.groups:
                raise ValueError("transfer.groups: the task_groups estimator needs groups: {group: [tasks...]}")
            grouped = {t for tasks in self.groups.values() for t in tasks}
            missing = [t for t in self.targets if t not in grouped]
            if missing:
                raise ValueError(f"transfer.groups: targets {missing} are in no group")
        if self.fusion.lora == "factors" and self.fusion.combine != "average" and self.peft.method == "lora":
            raise ValueError("transfer.fusion: TIES / DARE act on dW; use lora: svd with them")
        return self


class TransferRecipe(Strict):
    """A whole transfer experiment (see the module docstring)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    transfer: TransferSpec
    output_dir: Path = Path("runs")


def is_transfer_recipe(raw: dict[str, Any]) -> bool:
    """Whether a raw recipe dict (``extends:`` merged) is a transfer recipe."""
    return recipe_kind(raw) == TRANSFER


def validate_transfer(data: dict[str, Any], source: str = "recipe", check_files: bool = True) -> TransferRecipe:
    try:
        return TransferRecipe.model_validate(data, context={"check_files": check_files})
    except ValidationError as err:
        raise DeltakdError(format_validation_error(err, source, root=TransferRecipe)) from None


def load_transfer_recipe(path: str | Path, overrides: Iterable[str] = (), check_files: bool = True) -> TransferRecipe:
    """Load, merge ``extends:``, apply dotted overrides, validate; one-line DeltakdError on bad input."""
    data = apply_overrides(load_raw(path), overrides)
    if not is_transfer_recipe(data):
        raise DeltakdError(f"{path}: not a transfer recipe (no top-level 'transfer:' section)")
    return validate_transfer(data, source=str(path), check_files=check_files)
