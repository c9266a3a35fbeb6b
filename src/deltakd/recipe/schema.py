"""Pydantic models of a recipe: validated at the edge, plain typed objects inside."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from ..losses.table import LOSS_NAMES, LOSSES


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


class DialogueOptions(Strict):
    """DailyDialog read from ``task.data_dir`` (original layout); what ``task.kind`` builds from it.

    ``dialogue``: one causal-LM example per response turn, ``act <eos> context <eos> response <eos>``
    (or the act just before the response), loss on the response only; ``lm``: every turn
    eos-separated as pre-training text; ``classification``: utterances labelled with their act.
    With ``control: emotion`` the response turn's emotion takes the act's place (and labels the utterances).
    """

    context_turns: int = Field(default=3, ge=1, description="previous turns kept as context (the last N)")
    act_position: Literal["first", "before_response", "opens_response"] = Field(
        default="first", description="first: act <eos> context; before_response: context act <eos> response; "
                                     "opens_response: context act response (no eos between act and response)")
    act_tokens: bool = Field(
        default=False, description="each act is one added token (<|inform|> ...) whose embedding trains with the "
                                   "delta module (initialised from the act word), instead of the act word's pieces")
    max_response_tokens: int = Field(default=48, ge=1, description="responses cut to this many tokens (+ eos)")
    max_dialogues: int | None = Field(default=None, gt=0, description="use the first N train dialogues")
    max_eval_dialogues: int | None = Field(default=None, gt=0, description="the first N valid/test dialogues")
    short_labels: Literal["drop_dialogue", "drop_last_turn"] = "drop_dialogue"
    control: Literal["act", "emotion"] = Field(
        default="act", description="the control signal: the response turn's dialogue act or its emotion (dialogue "
                                   "kind: prompt and generation; classification kind: the label of each utterance)")
    long_examples: Literal["truncate", "drop"] = Field(
        default="truncate", description="dialogue kind, train split: a response example longer than task.max_length "
                                        "tokens (whole context, whole response) has its context cut from the left "
                                        "(truncate) or is left out (drop); valid and test are always truncated")
    only_acts: list[Literal["inform", "question", "directive", "commissive"]] | None = Field(
        default=None, min_length=1,
        description="dialogue kind: keep only response turns with these acts (every split); one run per act "
                    "gives per-act prompts / prefixes, evaluated together by dialogue_eval with a run per act")


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
    extra_cells: Literal["error", "ignore"] = Field(
        default="error", description="a tsv/csv row with more cells than its header: stop at it (error) "
        "or read only the named columns (ignore)")
    text_columns: list[str | int] | None = Field(default=None, min_length=1, max_length=2)
    label_column: str | int | None = None
    labels: list[str] | None = Field(default=None, min_length=2)
    label_names: dict[str, str] | None = Field(
        default=None, description="what the label values mean, e.g. {0: negative, 1: positive}: the names a saved "
        "model answers with (id2label); GLUE presets with numeric labels name theirs")
    kind: Literal["classification", "regression", "lm", "dialogue"] | None = None
    metrics: list[Literal["accuracy", "f1", "matthews", "pearson", "spearman", "perplexity"]] | None = None
    hf: HFSource | None = None
    resplit_valid: float | None = Field(default=None, gt=0.0, lt=1.0)
    split_seed: int | None = Field(default=None, description="seed of resplit_valid and max_train_samples; "
                                   "default train.seed. Fix it to keep one split across a seed sweep")
    k_shot: KShot | None = None
    max_train_samples: int | None = Field(default=None, gt=0)
    max_eval_samples: int | None = Field(default=None, gt=0)
    max_length: int = Field(default=128, ge=8, le=8192)
    block_size: int = Field(default=128, ge=8, le=8192, description="lm: tokens per training block")
    dialogue: DialogueOptions | None = Field(default=None, description="read DailyDialog from data_dir")

    @field_validator("label_names", mode="before")
    @classmethod
    def _label_keys(cls, v: Any) -> Any:
        """YAML reads ``{0: negative}`` with a number for a key; labels are text (as the readers make them)."""
        if isinstance(v, dict):
            return {str(int(k)) if isinstance(k, bool) or (isinstance(k, float) and k.is_integer()) else str(k): val
                    for k, val in v.items()}
        return v

    @model_validator(mode="after")
    def _sources(self, info: ValidationInfo) -> "TaskConfig":
        if self.hf is None and self.data_dir is None and self.train_file is None:
            raise ValueError("give task.data_dir (a folder of files), task.train_file, or task.hf")
        if self.hf is not None and (self.data_dir is not None or self.train_file is not None):
            raise ValueError("task.hf cannot be combined with task.data_dir / task.train_file")
        if self.kind == "dialogue" and self.dialogue is None:
            self.dialogue = DialogueOptions()
        if self.dialogue is not None and (self.data_dir is None or self.hf is not None or self.train_file):
            raise ValueError("task.dialogue: give task.data_dir, a DailyDialog folder (no train_file / hf)")
        if _check_files(info) and self.data_dir is not None and not self.data_dir.is_dir():
            raise ValueError(f"task.data_dir: folder '{self.data_dir}' does not exist")
        return self


class ModelConfig(Strict):
    """A local path, a hub id, or a packaged alias (``minilm-l6``); or a config to train from scratch."""

    name: str = "minilm-l6"
    revision: str | None = None
    trust_remote_code: bool = False
    config: dict[str, Any] | None = Field(
        default=None, description="from scratch: a transformers config, e.g. {model_type: gpt2, n_layer: 4}")
    tokenizer: str | None = Field(default=None, description="tokenizer path or hub id (default: the model's)")
    vocab_size: int = Field(default=8192, ge=256, description="from scratch: BPE vocabulary trained on the data")

    @field_validator("config")
    @classmethod
    def _model_type(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None and "model_type" not in v:
            raise ValueError("model.config: needs model_type (e.g. gpt2)")
        return v


class FromTeacher(Strict):
    """Copy embeddings, head and some layers of the teacher (DistilBERT / distilgpt2 style)."""

    layers: list[Annotated[int, Field(ge=0)]] | None = Field(default=None, min_length=1)
    nb_layers: int | None = Field(default=None, gt=0, description="every other layer when layers is not given")

    @model_validator(mode="after")
    def _one(self) -> "FromTeacher":
        if (self.layers is None) == (self.nb_layers is None):
            raise ValueError("student.from_teacher: give exactly one of layers or nb_layers")
        return self


class HubConfig(Strict):
    """Push the finished run's ``model/`` (with its model card) to a Hugging Face Hub model repository."""

    repo: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$",
                      description="owner/name of the model repository (created if missing)")
    private: bool = Field(default=False, description="create the repository private")


class TeacherConfig(Strict):
    """A finished deltakd run (its model/), or any fine-tuned model by path or hub id."""

    run: Path | None = None
    model: str | None = None
    revision: str | None = Field(default=None, description="teacher.model's hub revision (branch, tag or commit)")
    merged: bool = Field(default=False, description="use the run's merged LoRA model instead of the adapter")

    @model_validator(mode="after")
    def _one(self) -> "TeacherConfig":
        # the run itself is looked up when the student's run starts (it may be trained just before)
        if (self.run is None) == (self.model is None):
            raise ValueError("teacher: give exactly one of teacher.run or teacher.model")
        if self.revision is not None and self.model is None:
            raise ValueError("teacher.revision: goes with teacher.model (a run's model names its own base)")
        return self


class StudentConfig(Strict):
    """The student: built from the teacher, or ``model`` (a path / hub id / scratch config) as usual."""

    from_teacher: FromTeacher | None = None
    scratch: bool = Field(default=False, description="fresh random init with the from_teacher shape")


LossName = Literal[LOSS_NAMES]  # the names of the loss table (deltakd.losses.table), in its order


class LayerMapSpec(Strict):
    """Which teacher layers each student layer learns from (0-based transformer blocks).

    ``fixed``: ``pairs`` {student: teacher}; ``average``: ``pairs`` {student: [teacher...]} or a
    list of groups; ``random`` / ``random_epoch``: ``k`` teacher layers drawn every step / epoch
    (RAIL-KD), paired in order with ``student_layers`` (default: every student layer).
    Without a layer map, a student copied from teacher layers maps to the layers it came from.
    """

    mode: Literal["fixed", "average", "random", "random_epoch"] = "fixed"
    pairs: dict[int, int | list[int]] | list[int | list[int]] | None = None
    k: int | None = Field(default=None, gt=0)
    student_layers: list[Annotated[int, Field(ge=0)]] | None = None

    @model_validator(mode="after")
    def _needs_pairs(self) -> "LayerMapSpec":
        if self.mode in ("fixed", "average") and self.pairs is None:
            raise ValueError(f"distill.layer_map: mode {self.mode} needs pairs")
        return self


class CurriculumConfig(Strict):
    at_epoch: float = Field(ge=0)
    losses: dict[LossName, Annotated[float, Field(ge=0)]] | None = None
    lr: float | None = Field(default=None, gt=0)
    ramp_epochs: float = Field(default=0, ge=0)


class DistillConfig(Strict):
    """Which losses, weighted how; the teacher is frozen and in eval mode."""

    losses: dict[LossName, Annotated[float, Field(ge=0)]] = Field(
        default_factory=lambda: {"ce": 0.5, "kd": 0.5},
        description="weight (>= 0) per loss; " + "; ".join(f"{name}: {spec.doc}" for name, spec in LOSSES.items()))
    temperature: float = Field(default=2.0, gt=0)
    jsd_beta: float = Field(default=0.5, ge=0, le=1)
    layer_map: LayerMapSpec | None = None
    curriculum: CurriculumConfig | None = None
    rail_dim: int | None = Field(default=None, gt=0, description="width RAIL-KD compares at: student and teacher "
                                 "vectors projected to it (the teacher's by a fixed random projection); "
                                 "default the teacher's width, the student's alone projected")
    lora_ild_modules: list[str] = Field(default_factory=lambda: ["query", "key", "value"], min_length=1,
                                        description="LoRA layers whose lora_A outputs lora_ild matches")
    cache_teacher: bool | None = Field(default=None, description="teacher outputs cached on disk, the teacher not "
                                       "run in training: classification (default on): logits and pooled layers, or "
                                       "with hidden_mse / hidden_cos / attention_kl the mapped layers' per-token "
                                       "states and attention maps; causal LM: the top_k next tokens per training "
                                       "token (opt in: true); lora_ild runs the teacher live")
    cache_max_gb: float = Field(default=20.0, gt=0, description="disk budget (10^9 bytes) of the per-token teacher "
                                "cache; a larger one is not built and the teacher runs live (one warning line)")
    top_k: int = Field(default=64, gt=0, description="causal LM with cache_teacher: the teacher's k most likely next "
                       "tokens cached per token, the rest as one tail bucket (k = 64: 258 bytes per token)")
    chunked: bool | Literal["auto"] = Field(
        default="auto", description="causal LM: ce / kd / reverse_kl / jsd computed from the LM heads' inputs, "
        "chunk_tokens tokens at a time, without full logits (same values); auto: on at a vocabulary of 32,768 or more")
    chunk_tokens: int | None = Field(default=None, gt=0, description="tokens per chunk when chunked; default about "
                                     "32M logits per chunk (1,024 tokens at a 32k vocabulary)")
    cross_tokenizer: bool = Field(default=False, description="causal LM: the teacher may use another tokenizer; "
                                  "it reads its own tokens of the text, positions paired by text offset, with "
                                  "losses that need no shared vocabulary (uld, ce)")

    @field_validator("layer_map", mode="before")
    @classmethod
    def _plain_map(cls, v: Any) -> Any:
        if isinstance(v, dict) and "mode" not in v and "pairs" not in v:
            return {"mode": "fixed", "pairs": v}  # shorthand {student: teacher}
        return v


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
    nan_patience: int = Field(default=0, ge=0, description="consecutive optimizer steps with a non-finite loss "
                              "(or gradient norm) tolerated before the run stops as diverged; 0: stop at the first")
    metric_for_best: str | None = None
    logging_steps: int = Field(default=10, gt=0)
    save_total_limit: int = Field(default=2, ge=1)
    keep_checkpoints: Literal["best_last", "all"] | Annotated[int, Field(gt=0)] = Field(
        default="best_last", description="checkpoints kept: best_last (during training the Trainer keeps "
        "train.save_total_limit; at the end only the best and the last), all (every saved one), N (the N newest "
        "plus the best, during training and after); checkpoints/best and checkpoints/last name them")
    save_optimizer: bool = Field(default=True, description="false: checkpoints hold the weights only (transformers' "
                                 "save_only_model), no optimizer, scheduler or RNG state: smaller, but --resume is "
                                 "refused (training could not continue exactly)")
    bf16: bool | Literal["force"] = Field(default=False, description="bf16 mixed precision (student under autocast, "
                                          "teacher cast to bf16); where the device has no native bf16 (a CPU without "
                                          "AVX512-BF16/AMX, an old GPU) it says so and runs fp32; 'force': bf16 anyway")
    fp16: bool = Field(default=False, description="fp16 mixed precision (CUDA only; the teacher cast to fp16)")
    gradient_checkpointing: bool = Field(default=False, description="recompute activations in the backward pass "
                                         "(less memory, about a third more compute); the student only")
    optim: Literal["adamw_torch", "adamw_torch_fused", "adamw_bnb_8bit"] | None = Field(
        default=None, description="the Trainer's optimizer; unset: its default (adamw_torch_fused with torch >= 2.8); "
        "adamw_bnb_8bit needs bitsandbytes")
    torch_compile: bool = Field(default=False, description="torch.compile the student (the Trainer's torch_compile)")
    fsdp: bool = Field(default=False, description="shard the student with FSDP (under torchrun; settings in "
                       "train.fsdp_config); the frozen teacher is not wrapped: replicated on each process, half precision with bf16/fp16")
    fsdp_config: Path | None = Field(default=None, description="a JSON file of FSDP settings (the Trainer's fsdp_config)")
    deepspeed: Path | None = Field(default=None, description="a DeepSpeed JSON config file (needs deepspeed); the "
                                   "student goes to the engine, the frozen teacher stays outside it, replicated on each process")
    num_workers: int = Field(default=0, ge=0)
    group_by_length: bool = Field(
        default=False, description="training batches of similar lengths (random mega-batches, each sorted by "
        "length): less padding, about 2-3x faster on SST-2, but it changes what is learned (1.8 points lower "
        "dev accuracy on the issue-19 KD job at 1,600 sentences), so off by default; false: plain random batches")

    @model_validator(mode="after")
    def _save_matches_eval(self) -> "TrainConfig":
        if self.save_every != "eval":
            if self.eval_every == "epoch":
                raise ValueError("train.save_every: a step count needs train.eval_every in steps too")
            if self.save_every % self.eval_every:
                raise ValueError(f"train.save_every ({self.save_every}) must be a multiple of "
                                 f"train.eval_every ({self.eval_every}) so the best model is among the checkpoints")
        if self.bf16 and self.fp16:
            raise ValueError("train.bf16 and train.fp16: set one")
        if self.fsdp_config is not None and not self.fsdp:
            raise ValueError("train.fsdp_config: given without train.fsdp: true")
        if self.deepspeed is not None and self.fsdp:
            raise ValueError("train.deepspeed and train.fsdp: set one")
        if self.keep_checkpoints != "best_last" and "save_total_limit" in self.model_fields_set:
            raise ValueError(f"train.save_total_limit and train.keep_checkpoints: {self.keep_checkpoints} both say how "
                             "many checkpoints to keep; set one")
        return self

    @model_validator(mode="after")
    def _scale_files(self, info: ValidationInfo) -> "TrainConfig":
        for key in ("fsdp_config", "deepspeed"):
            path = getattr(self, key)
            if _check_files(info) and path is not None and not path.is_file():
                raise ValueError(f"train.{key}: file '{path}' does not exist")
        return self


Tracker = Literal["tensorboard", "mlflow", "wandb", "neptune"]


class NeptuneOptions(Strict):
    """``track_options.neptune``: where and how a run appears in Neptune (the token: ``NEPTUNE_API_TOKEN``)."""

    project: str | None = Field(default=None, pattern=r"^[^/\s]+/[^/\s]+$",
                                description="workspace/project; unset: the NEPTUNE_PROJECT environment variable")
    tags: list[str] = Field(default_factory=list, description="tags of the Neptune run, e.g. [lora, kd]")
    name: str | None = Field(default=None, min_length=1,
                             description="the Neptune run's name (e.g. the method); unset: <name>/<stamp>")


class TrackOptions(Strict):
    """``track_options``: per-tracker settings (the trackers themselves are listed in ``track``)."""

    neptune: NeptuneOptions | None = None


def check_track_options(track: list[str], options: TrackOptions | None) -> None:
    """Options for a tracker that ``track`` does not list are a mistake, not a no-op."""
    for name in ("neptune",):
        if options is not None and getattr(options, name) is not None and name not in track:
            raise ValueError(f"track_options.{name}: given but '{name}' is not in track ({track})")


class Recipe(Strict):
    """One experiment."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    task: TaskConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    peft: PeftConfig = Field(default_factory=lambda: FullFT(method="full"))
    train: TrainConfig = Field(default_factory=TrainConfig)
    teacher: TeacherConfig | None = None
    student: StudentConfig | None = None
    distill: DistillConfig | None = None
    track: list[Tracker] = Field(default_factory=lambda: ["tensorboard"])
    track_options: TrackOptions | None = None
    output_dir: Path = Path("runs")
    hub: HubConfig | None = Field(default=None, description="push model/ to the Hub after a successful run "
                                  "(deltakd train; the token from HF_TOKEN or `hf auth login`)")
    sweep: dict[str, Annotated[list[Any], Field(min_length=1)]] | None = Field(
        default=None, description="grid for `deltakd sweep`: {dotted.key: [values...]}, e.g. {train.lr: [1e-5, 2e-5]}")

    @model_validator(mode="after")
    def _distill_needs_teacher(self) -> "Recipe":
        if self.teacher is None and (self.distill is not None or
                                     (self.student is not None and self.student.from_teacher is not None)):
            raise ValueError("distill / student.from_teacher need a teacher: section")
        if self.teacher is not None and self.distill is None:
            self.distill = DistillConfig()
        cur = self.distill.curriculum if self.distill is not None else None
        if cur is not None and not self.train.max_steps and cur.at_epoch >= self.train.epochs:
            raise ValueError(f"distill.curriculum.at_epoch: {cur.at_epoch:g} is not before the end of training "
                             f"(train.epochs {self.train.epochs:g}); the curriculum would never start")
        return self

    @model_validator(mode="after")
    def _act_tokens(self) -> "Recipe":
        dlg = self.task.dialogue
        if dlg is None or not dlg.act_tokens or self.task.kind != "dialogue":
            return self
        if isinstance(self.peft, BottleneckPeft):
            raise ValueError("task.dialogue.act_tokens: not available with peft.method bottleneck "
                             "(full, lora, prefix, prompt, ptuning, ia3)")
        if not isinstance(self.peft, FullFT) and self.train.weight_decay > 0:
            raise ValueError(f"train.weight_decay: {self.train.weight_decay:g} with task.dialogue.act_tokens and "
                             f"peft.method {self.peft.method} would shrink the frozen embedding rows next to the act "
                             "tokens' trained ones; set it to 0")
        return self

    @field_validator("track")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"track: duplicate trackers in {v}")
        return v

    @model_validator(mode="after")
    def _track_options(self) -> "Recipe":
        check_track_options(self.track, self.track_options)
        return self
