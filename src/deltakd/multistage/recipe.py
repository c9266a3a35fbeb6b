"""The ``multistage`` recipe: one stage of multilingual sentence-embedding distillation.

Why a recipe model of its own rather than more optional fields on ``deltakd.recipe.Recipe``: a
stage is described by parallel pair files per language, held-out and STS evaluation sets, a
sentence-transformers teacher, a student *structure* (bottleneck, recurrence) and embedding losses
(MSE / MCL / bool / CE). None of the generic recipe's task (labels, columns, GLUE presets), peft
or logit-distillation sections apply, and adding these sections there would make every other
family's "allowed keys" list longer and its validation weaker. What is shared is reused: the
``train:`` section (``TrainConfig``), trackers, ``extends:`` / dotted overrides (``recipe.load``),
the one-line error formatting and the run directory. The top-level key ``family: multistage``
tells a multistage recipe file from a generic one (``is_multistage``).

```yaml
family: multistage
name: rec_bottle_mcl
init_from: rec_bottle_distill        # earlier stage: run dir, runs/<name> folder or a recipe name
teacher: {model: minilm-l6}
data: {train: [multi30k/train.en-de.tsv.gz, ...], limit_per_file: 2000, heldout: 200}
eval: {sts: {data_dir: .../stsb_multi_mt, pairs: [en-de]}}
student: {bottleneck: {dim: 128}, recurrence: {k: 2}}
loss: {mse: 1.0, mcl: 1.0, temperature: 0.05}
train: {epochs: 1, lr: 5.0e-5, batch_size: 32}
```
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Iterable, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from ..errors import DeltakdError
from ..recipe.kinds import recipe_kind
from ..recipe.load import apply_overrides, format_validation_error, load_raw
from ..recipe.schema import Strict, Tracker, TrackOptions, TrainConfig, check_track_options

__all__ = [
    "FAMILY",
    "EvalConfig",
    "LossConfig",
    "MultistageRecipe",
    "ParallelData",
    "StudentSpec",
    "is_multistage",
    "load_multistage_recipe",
    "validate",
]

FAMILY = "multistage"


def _check_files(info: ValidationInfo) -> bool:
    return bool(info.context and info.context.get("check_files"))


class PairFile(Strict):
    """One ``english<TAB>translation`` file; ``lang`` defaults to the ``en-XX`` part of its name."""

    path: Path
    lang: str | None = Field(default=None, pattern=r"^[A-Za-z]{2,3}(_[A-Za-z]{2,4})?$")


def _pair_files(v: Any) -> Any:
    if isinstance(v, list):
        return [{"path": x} if isinstance(x, str) else x for x in v]
    return v


class ParallelData(Strict):
    """Training pairs (several languages may be mixed) and the held-out pairs cut from them."""

    train: list[PairFile] = Field(min_length=1, description="pair files, or {path, lang}")
    limit_per_file: int | None = Field(default=None, gt=0, description="first N pairs of each file")
    heldout: int | float = Field(default=200, description="held-out pairs per language (int) or fraction")
    heldout_seed: int = 0
    eval_files: list[PairFile] = Field(default_factory=list,
                                       description="extra held-out pair files (e.g. test2016), not trained on")
    eval_limit: int | None = Field(default=None, gt=0, description="first N pairs of each eval file")
    max_length: int = Field(default=128, ge=8, le=8192)

    _files = field_validator("train", "eval_files", mode="before")(_pair_files)

    @field_validator("heldout")
    @classmethod
    def _heldout(cls, v: int | float) -> int | float:
        if isinstance(v, float) and not 0.0 < v < 1.0:
            raise ValueError("a fraction must be in (0, 1)")
        if isinstance(v, int) and v < 1:
            raise ValueError("must be >= 1 pair per language")
        return v

    @model_validator(mode="after")
    def _exist(self, info: ValidationInfo) -> "ParallelData":
        if _check_files(info):
            for f in [*self.train, *self.eval_files]:
                if not f.path.is_file():
                    raise ValueError(f"data: pair file '{f.path}' does not exist")
        return self


class StsEval(Strict):
    """Cross-lingual STS (stsb_multi_mt): ``pairs`` like ``en-de`` = English s1 with German s2."""

    data_dir: Path
    pairs: list[Annotated[str, Field(pattern=r"^[a-z]{2}-[a-z]{2}$")]] = Field(default_factory=lambda: ["en-de"],
                                                                                min_length=1)
    split: Literal["dev", "test", "train"] = "test"
    limit: int | None = Field(default=None, gt=1, description="first N rows (quick runs)")

    @model_validator(mode="after")
    def _exist(self, info: ValidationInfo) -> "StsEval":
        if _check_files(info) and not self.data_dir.is_dir():
            raise ValueError(f"eval.sts.data_dir: folder '{self.data_dir}' does not exist")
        return self


class EvalConfig(Strict):
    """What is measured after training (``results.json``): per language and per STS set."""

    sts: StsEval | None = None
    before: bool = Field(default=False, description="also measure the initial student (before this stage)")
    teacher: bool = Field(default=False, description="also measure the teacher on the same sets")
    speed_sentences: int = Field(default=256, gt=0, description="English sentences timed for sentences/s")
    batch_size: int = Field(default=64, gt=0)


class TeacherSpec(Strict):
    """Any sentence-transformers model (path, hub id or packaged alias); a plain HF encoder gets mean pooling."""

    model: str = "minilm-l6"
    revision: str | None = Field(default=None, description="the hub revision of model (branch, tag or commit)")
    max_seq_length: int | None = Field(default=None, ge=8, le=8192)


class BottleneckSpec(Strict):
    """Stage 2: token embedding ``(V, H)`` -> ``Embedding(V, dim)`` + ``Linear(dim, H)``."""

    dim: int = Field(gt=0)
    align: bool = Field(default=True, description="SVD-align to the pretrained embedding (else random)")
    bias: bool = True


class RecurrenceSpec(Strict):
    """Stage 3: ``k`` distinct layers (``keep``, ``k`` evenly spread ones, or the best ``k`` by
    ``search``) reused up to ``depth``: in a cycle (0 1 2 0 1 2), in blocks (0 0 1 1 2 2), or each
    position running the kept layer nearest its depth (keep 0 3 5 -> layers 0 0 3 3 3 5)."""

    keep: list[Annotated[int, Field(ge=0)]] | None = Field(default=None, min_length=1)
    k: int | None = Field(default=None, gt=0)
    depth: int | None = Field(default=None, gt=0, description="default: the model's depth")
    order: Literal["cycle", "block", "nearest"] = Field(
        default="cycle", description="cycle: position i runs layer i % k; block: each layer runs a contiguous "
                                     "block; nearest: position i runs the kept layer closest to depth i")
    search: bool = Field(default=False, description="with k: choose the kept layers among all k-subsets by the "
                                                    "untrained student's MSE to the teacher on training sentences")
    search_sentences: int = Field(default=256, gt=0, description="training sentences the search scores on")

    @model_validator(mode="after")
    def _one(self) -> "RecurrenceSpec":
        if (self.keep is None) == (self.k is None):
            raise ValueError("student.recurrence: give exactly one of keep or k")
        if self.keep is not None and len(set(self.keep)) != len(self.keep):
            raise ValueError(f"student.recurrence.keep: {self.keep} has repeated layers")
        if self.search and self.keep is not None:
            raise ValueError("student.recurrence.search: chooses keep itself; give k, not keep")
        if self.depth is not None and self.depth < len(self.keep or [0] * (self.k or 0)):
            raise ValueError("student.recurrence.depth: must be >= the number of distinct layers")
        return self


class StudentSpec(Strict):
    """The student: the teacher's transformer (default), ``model``, or ``init_from``'s; then this
    stage's structure. A structure the starting model already has (same dim / pattern) is kept."""

    model: str | None = Field(default=None, description="path / hub id of the student's start (default: teacher)")
    revision: str | None = Field(default=None, description="the hub revision of student.model")
    bottleneck: BottleneckSpec | None = None
    recurrence: RecurrenceSpec | None = None
    normalize: Literal["auto", "yes", "no"] = Field(default="auto", description="L2 at the end; auto: as the teacher")


class LossConfig(Strict):
    """Weighted sum of embedding objectives (``multistage.losses``); at least one weight > 0.

    ``mse``: Reimers & Gurevych (student(en), student(tr) -> teacher(en)); ``mcl``: symmetric InfoNCE
    student(tr) vs teacher(en) (Ding et al. 2022); ``ce``: one-direction in-batch cross-entropy;
    ``bool``: in-batch binary cross-entropy with ``bool_bias``.
    """

    mse: float = Field(default=1.0, ge=0)
    mcl: float = Field(default=0.0, ge=0)
    ce: float = Field(default=0.0, ge=0)
    bool: float = Field(default=0.0, ge=0)
    temperature: float = Field(default=0.05, gt=0)
    bool_bias: float = 0.0

    @model_validator(mode="after")
    def _some(self) -> "LossConfig":
        if not any(w > 0 for w in self.weights().values()):
            raise ValueError("loss: every weight is 0; give mse, mcl, ce or bool a positive weight")
        return self

    def weights(self) -> dict[str, float]:
        return {"mse": self.mse, "mcl": self.mcl, "ce": self.ce, "bool": self.bool}


class MultistageRecipe(Strict):
    """One stage of the multistage family (see the module docstring)."""

    family: Literal["multistage"]
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    init_from: str | None = Field(default=None, description="earlier stage: run dir, runs/<name> or recipe name")
    teacher: TeacherSpec = Field(default_factory=TeacherSpec)
    data: ParallelData
    eval: EvalConfig = Field(default_factory=EvalConfig)
    student: StudentSpec = Field(default_factory=StudentSpec)
    loss: LossConfig = Field(default_factory=LossConfig)
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=1, lr=5e-5))
    track: list[Tracker] = Field(default_factory=list)
    track_options: TrackOptions | None = None
    output_dir: Path = Path("runs")
    sweep: dict[str, Annotated[list[Any], Field(min_length=1)]] | None = Field(
        default=None, description="grid for `deltakd sweep`: {dotted.key: [values...]}, e.g. {train.lr: [1e-5, 2e-5]}")

    @field_validator("init_from")
    @classmethod
    def _init(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("must name a run directory or a stage")
        return v

    @model_validator(mode="after")
    def _student_source(self) -> "MultistageRecipe":
        if self.init_from is not None and self.student.model is not None:
            raise ValueError("give at most one of init_from and student.model")
        return self

    @model_validator(mode="after")
    def _track_options(self) -> "MultistageRecipe":
        check_track_options(self.track, self.track_options)
        return self


def is_multistage(raw: dict[str, Any]) -> bool:
    """Whether a raw (merged) recipe dict belongs to this family."""
    return recipe_kind(raw) == FAMILY


def is_multistage_file(path: str | Path) -> bool:
    """Whether a recipe file (after ``extends:``) is a multistage recipe; False on unreadable files."""
    try:
        return is_multistage(load_raw(path))
    except DeltakdError:
        return False


def validate(data: dict[str, Any], source: str = "recipe", check_files: bool = True) -> MultistageRecipe:
    try:
        return MultistageRecipe.model_validate(data, context={"check_files": check_files})
    except ValidationError as err:
        raise DeltakdError(format_validation_error(err, source, root=MultistageRecipe)) from None


def load_multistage_recipe(path: str | Path, overrides: Iterable[str] = (), check_files: bool = True
                           ) -> MultistageRecipe:
    """Load (``extends:`` merged, overrides applied) and validate; one-line DeltakdError on bad input."""
    data = apply_overrides(load_raw(path), overrides)
    if not is_multistage(data):
        raise DeltakdError(f"{path}: not a multistage recipe (needs 'family: multistage')")
    return validate(data, source=str(path), check_files=check_files)

