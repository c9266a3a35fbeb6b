"""Preparing one multistage stage, before any run directory exists, and measuring its models.

A stage: read pairs (held-out pairs cut per language), load the teacher and its cached English
embeddings, build the student (teacher copy / ``student.model`` / the ``init_from`` run's model;
a student of another width gets a learned projection to the teacher's, a student with its own
tokenizer keeps it; then this stage's bottleneck and recurrence). Everything that can fail on bad input (recipe,
files, init run, models, structure) fails here.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from torch import nn
from transformers import AutoTokenizer, set_seed

from ..errors import DeltakdError
from ..models.hub import model_dir
from ..models.student import every_other, layer_count
from ..runs import RunDir, finished_runs
from ..utils import cpu_only
from .bottleneck import bottleneck_student
from .data import HeldoutSplit, ParallelPair, StsSet, heldout_split, read_parallel, read_sts
from .evaluate import encode_speed, evaluate_multilingual, hf_encoder, mse_to_teacher, st_encoder
from .recipe import MultistageRecipe
from .recurrence import recurrence_pattern, recurrent_student, search_keep
from .saving import load_student, sentence_transformers, transformer_parts, uses_normalize
from .structure import (
    BottleneckEmbedding,
    add_projection,
    count_parameters,
    embedding_dim,
    layer_pattern,
    projection_of,
)
from .teacher import TeacherEmbeddings, load_teacher, teacher_embeddings

__all__ = ["MAX_SEARCH", "Stage", "eval_saved", "measure", "prepare_stage", "read_pairs", "read_sts_sets",
           "resolve_init", "teacher_metrics"]


def resolve_init(ref: str, output_dir: Path) -> tuple[Path, RunDir | None]:
    """``(model folder, run)`` for ``init_from``: a run directory, a ``runs/<name>`` folder (its
    newest finished run), a model folder (config.json), or a stage name under ``output_dir``."""
    p = Path(ref).expanduser()
    candidates: list[RunDir] = []
    if p.is_dir():
        if (p / "config.json").is_file():
            return p, None
        if (p / "recipe.yaml").is_file():
            run = RunDir(p)
            if not run.finished:
                raise DeltakdError(f"init_from '{ref}': that run has not finished (no results.json)")
            candidates = [run]
        else:
            candidates = finished_runs(p)
    elif "/" not in ref and "\\" not in ref:
        candidates = finished_runs(Path(output_dir) / ref)
    else:
        raise DeltakdError(f"init_from '{ref}': no such run or model folder")
    if not candidates:
        raise DeltakdError(f"init_from '{ref}': no finished run of it under '{output_dir}' "
                           f"(train that stage first, e.g. deltakd pipeline STAGE1.yaml THIS.yaml)")
    run = candidates[-1]
    if not (run.model_dir / "config.json").is_file():
        raise DeltakdError(f"init_from '{ref}': run '{run.path}' has no model/ folder")
    return run.model_dir, run


# --------------------------------------------------------------------------------------------
# preparing a stage (no writes)
# --------------------------------------------------------------------------------------------


@dataclass
class Stage:
    """Everything a stage needs, validated, before any run directory exists."""

    recipe: MultistageRecipe
    teacher: Any  # SentenceTransformer, frozen
    tokenizer: Any
    student: Any  # PreTrainedModel, maybe with bottleneck / shared layers
    normalize: bool
    split: HeldoutSplit
    eval_pairs: list[ParallelPair]
    sts: list[StsSet]
    targets: TeacherEmbeddings
    init_model: Path | None = None
    init_run: RunDir | None = None
    built: list[str] = field(default_factory=list)  # what this stage did to the student's structure
    before: dict[str, Any] | None = None  # the student measured before training (eval.before)


def read_pairs(recipe: MultistageRecipe) -> tuple[HeldoutSplit, list[ParallelPair]]:
    d = recipe.data
    pairs: list[ParallelPair] = []
    for f in d.train:
        pairs.extend(read_parallel(f.path, lang=f.lang, limit=d.limit_per_file))
    split = heldout_split(pairs, d.heldout, seed=d.heldout_seed)
    if not split.train:
        raise DeltakdError(f"data: only {len(split.train)} training pair(s) left after holding out {d.heldout}")
    extra: list[ParallelPair] = []
    for f in d.eval_files:
        extra.extend(read_parallel(f.path, lang=f.lang, limit=d.eval_limit))
    return split, extra


def read_sts_sets(recipe: MultistageRecipe) -> list[StsSet]:
    cfg = recipe.eval.sts
    if cfg is None:
        return []
    out = []
    for name in cfg.pairs:
        a, b = name.split("-")
        s = read_sts(cfg.data_dir, a, b, cfg.split)
        if cfg.limit is not None:
            s = StsSet(s.name, s.sentences1[:cfg.limit], s.sentences2[:cfg.limit], s.scores[:cfg.limit])
        out.append(s)
    return out


def _start_model(recipe: MultistageRecipe, teacher: Any, init: Path | None) -> tuple[Any, Any]:
    """(student HF model, tokenizer) before this stage's structure is applied."""
    if init is not None or recipe.student.model is not None:
        path = init if init is not None else model_dir(recipe.student.model, recipe.student.revision, "student.model")
        if not Path(path).is_dir():
            raise DeltakdError(f"student.model '{recipe.student.model}': must be a local model folder here")
        model = load_student(path)
        try:
            tok = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError):
            raise DeltakdError(f"student '{path}': no tokenizer there") from None
        return model, tok
    hf, tok = transformer_parts(teacher)
    return copy.deepcopy(hf), tok


def _apply_structure(model: Any, recipe: MultistageRecipe,
                     score: Callable[[Any], float] | None = None) -> tuple[Any, list[str]]:
    """This stage's bottleneck and recurrence, where the model does not have them yet.
    ``score`` (lower is better) ranks candidate kept layers when ``recurrence.search`` is on."""
    built: list[str] = []
    b = recipe.student.bottleneck
    emb = model.get_input_embeddings()
    if b is not None:
        if isinstance(emb, BottleneckEmbedding):
            if emb.bottleneck_dim != b.dim:
                raise DeltakdError(f"student.bottleneck.dim: {b.dim}, but the starting model already has a "
                                   f"{emb.bottleneck_dim}-dim bottleneck")
        else:
            if layer_pattern(model) is not None:
                raise DeltakdError("student.bottleneck: the starting model already shares layers; add the "
                                   "bottleneck before the recurrence")
            model = bottleneck_student(model, b.dim, align=b.align, bias=b.bias)
            built.append(f"bottleneck {b.dim}" + (" (SVD-aligned)" if b.align else ""))
    r = recipe.student.recurrence
    if r is not None:
        current = layer_pattern(model)
        n = len(model.encoder.layer) if hasattr(model, "encoder") else layer_count(model)
        depth = r.depth or n
        k = len(r.keep) if r.keep is not None else r.k
        if current is not None:
            if len(current) != depth or max(current) + 1 != k:  # the order it has is kept
                raise DeltakdError(f"student.recurrence: k={k}, depth={depth}, but the starting model already "
                                   f"shares layers as {current}")
        else:
            if k > n:
                raise DeltakdError(f"student.recurrence: k={k} distinct layers but the model has {n}")
            if r.search:
                if score is None:
                    raise DeltakdError("student.recurrence.search: no training sentences to score layer subsets on")
                n_subsets = math.comb(n, k)
                if n_subsets > MAX_SEARCH:
                    raise DeltakdError(f"student.recurrence.search: {n_subsets} subsets of {k} among {n} layers "
                                       f"(more than {MAX_SEARCH}); give keep instead")
                keep, scored = search_keep(model, k, depth, r.order, score)
                ranked = ", ".join(f"{c}: {v:.4g}" for c, v in sorted(scored, key=lambda kv: kv[1])[:3])
                built.append(f"recurrence search over {len(scored)} subsets by MSE to the teacher (best {ranked})")
            else:
                keep = list(r.keep) if r.keep is not None else every_other(n, k)
            if r.order == "nearest":  # the nearest order reads the kept layers by depth
                keep = sorted(keep)
            pattern = recurrence_pattern(r.order, keep, depth, n)
            model = recurrent_student(model, keep, depth, pattern)
            built.append(f"recurrence layers {keep} as {pattern} (depth {depth})")
    return model, built


MAX_SEARCH = 256  # k-subsets the recurrence search scores at most (6 layers: at most 20)


def _search_score(tokenizer: Any, sentences: list[str], targets: Any, normalize: bool,
                  batch_size: int) -> Callable[[Any], float]:
    """MSE of an untrained candidate's English embeddings to the teacher's (cached) ones."""
    want = targets.lookup(sentences)

    def score(student: Any) -> float:
        return mse_to_teacher(hf_encoder(student, tokenizer, batch_size, normalize=normalize)(sentences), want)

    return score


def _fit_width(student: Any, teacher: Any) -> list[str]:
    """A student of another width than the teacher's embeddings gets a learned projection to it
    (saved as the sentence-transformers pipeline's Dense); what was built, for ``Stage.built``."""
    t_dim = teacher.get_embedding_dimension() if hasattr(teacher, "get_embedding_dimension") \
        else teacher.get_sentence_embedding_dimension()
    s_dim = embedding_dim(student)
    if s_dim == t_dim:
        return []
    if projection_of(student) is not None:
        raise DeltakdError(f"student: its projection embeds to {s_dim} dims, the teacher to {t_dim}")
    add_projection(student, t_dim)
    return [f"projection {s_dim} -> {t_dim} (the teacher's width)"]


def prepare_stage(recipe: MultistageRecipe, cache: bool = True) -> Stage:
    """Data, teacher (+ cached English targets), student; raises DeltakdError on bad input."""
    set_seed(recipe.train.seed)
    split, eval_pairs = read_pairs(recipe)
    sts = read_sts_sets(recipe)
    init_model, init_run = resolve_init(recipe.init_from, recipe.output_dir) if recipe.init_from else (None, None)
    teacher = load_teacher(recipe.teacher.model, recipe.teacher.max_seq_length, revision=recipe.teacher.revision)
    student, tokenizer = _start_model(recipe, teacher, init_model)
    projected = _fit_width(student, teacher)
    norm = recipe.student.normalize
    normalize = uses_normalize(teacher) if norm == "auto" else norm == "yes"
    english = [p.english for p in (*split.train, *split.heldout, *eval_pairs)]
    targets = teacher_embeddings(teacher, english, batch_size=recipe.eval.batch_size, cache=cache)
    r = recipe.student.recurrence
    score = None
    if r is not None and r.search:
        sample = list(dict.fromkeys(p.english for p in split.train))[:r.search_sentences]
        score = _search_score(tokenizer, sample, targets, normalize, recipe.eval.batch_size)
    student, built = _apply_structure(student, recipe, score)
    built = [*projected, *built]
    student.train()
    for p in student.parameters():  # a copy of the frozen teacher arrives without gradients
        p.requires_grad_(True)
    pooler = getattr(student, "pooler", None)  # BERT's [CLS] pooler: mean pooling never uses it
    if isinstance(pooler, nn.Module):
        pooler.requires_grad_(False)
    return Stage(recipe, teacher, tokenizer, student, normalize, split, eval_pairs, sts, targets,
                 init_model, init_run, built)


# --------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------


def _teacher_encoder(targets: TeacherEmbeddings):
    return lambda sentences: targets.lookup(list(sentences))


def measure(encoder: Any, stage: Stage, speed: bool = True) -> dict[str, Any]:
    """``heldout`` / ``test`` metric dicts (per language, per STS set) and sentences/s."""
    teacher = _teacher_encoder(stage.targets)
    out: dict[str, Any] = {"heldout": evaluate_multilingual(encoder, stage.split.heldout, teacher, speed=False)}
    if stage.eval_pairs or stage.sts:
        out["test"] = evaluate_multilingual(encoder, stage.eval_pairs, teacher, stage.sts, speed=False)
    if speed:
        pool = [p.english for p in (*stage.split.heldout, *stage.eval_pairs, *stage.split.train)]
        out["speed_sent_per_s"] = encode_speed(encoder, pool[:stage.recipe.eval.speed_sentences])
    return out


def eval_saved(model_dir: Path, stage: Stage) -> dict[str, Any]:
    """The saved ``model/`` folder, loaded as sentence-transformers loads it, measured on the stage's sets."""
    st = sentence_transformers().SentenceTransformer(str(model_dir), device="cpu" if cpu_only() else None)
    return measure(st_encoder(st, stage.recipe.eval.batch_size), stage)


def teacher_metrics(stage: Stage) -> dict[str, Any]:
    out = measure(st_encoder(stage.teacher, stage.recipe.eval.batch_size), stage)
    out["params"] = count_parameters(stage.teacher)
    return out
