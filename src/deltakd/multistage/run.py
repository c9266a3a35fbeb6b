"""Running multistage recipes: one stage (``train_stage``), a chain (``run_pipeline``), a re-test.

A stage: read pairs (held-out pairs cut per language), load the teacher and its cached English
embeddings, build the student (teacher copy / ``student.model`` / the ``init_from`` run's model,
then this stage's bottleneck and recurrence), train with ``MultistageTrainer`` (checkpoints,
resume, metrics.jsonl), save ``model/`` (``save_student``: a plain sentence-transformers folder
plus the compact form the next stage rebuilds from), evaluate the *saved* folder loaded by
``SentenceTransformer(path)`` and write ``results.json`` last. Everything that can fail on bad
input (recipe, files, init run, models, structure) fails before the run directory exists.

``run_pipeline`` runs stage recipes in order. A stage is skipped when a finished run of it has
the same resolved recipe and was initialised from the run ``init_from`` resolves to now (so
re-training an earlier stage re-trains what follows); an unfinished run of the same recipe is
resumed from its last complete checkpoint.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml
from transformers import TrainingArguments, set_seed

from ..engine import training_arguments
from ..errors import DeltakdError
from ..models.hub import resolve_model_path
from ..models.student import every_other, layer_count
from ..runs import RunDir, new_run_dir
from ..runs.rundir import PROVENANCE_KEY
from ..utils import atomic_write_json, cpu_only
from .bottleneck import bottleneck_student
from .data import HeldoutSplit, ParallelPair, StsSet, heldout_split, read_parallel, read_sts
from .evaluate import encode_speed, evaluate_multilingual, hf_encoder, mse_to_teacher, st_encoder
from .recipe import MultistageRecipe, load_multistage_recipe, validate
from .recurrence import recurrence_pattern, recurrent_student, search_keep
from .saving import load_student, save_student, uses_normalize
from .structure import BottleneckEmbedding, count_parameters, layer_pattern, multistage_spec
from .teacher import TeacherEmbeddings, load_teacher, teacher_embeddings

__all__ = ["Stage", "StageOutcome", "evaluate_run", "prepare_stage", "resolve_init", "run_pipeline",
           "train_stage", "train_recipe"]


# --------------------------------------------------------------------------------------------
# init_from: an earlier stage's run
# --------------------------------------------------------------------------------------------


def _finished_runs(folder: Path) -> list[RunDir]:
    if not folder.is_dir():
        return []
    return [RunDir(p) for p in sorted(folder.iterdir()) if (p / "results.json").is_file()]


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
            candidates = _finished_runs(p)
    elif "/" not in ref and "\\" not in ref:
        candidates = _finished_runs(Path(output_dir) / ref)
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


def _read_pairs(recipe: MultistageRecipe) -> tuple[HeldoutSplit, list[ParallelPair]]:
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


def _read_sts(recipe: MultistageRecipe) -> list[StsSet]:
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
    from transformers import AutoTokenizer

    from .saving import transformer_parts

    if init is not None or recipe.student.model is not None:
        path = init if init is not None else Path(resolve_model_path(recipe.student.model))
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


def prepare_stage(recipe: MultistageRecipe, cache: bool = True) -> Stage:
    """Data, teacher (+ cached English targets), student; raises DeltakdError on bad input."""
    set_seed(recipe.train.seed)
    split, eval_pairs = _read_pairs(recipe)
    sts = _read_sts(recipe)
    init_model, init_run = resolve_init(recipe.init_from, recipe.output_dir) if recipe.init_from else (None, None)
    teacher = load_teacher(recipe.teacher.model, recipe.teacher.max_seq_length)
    student, tokenizer = _start_model(recipe, teacher, init_model)
    t_dim = teacher.get_embedding_dimension() if hasattr(teacher, "get_embedding_dimension") \
        else teacher.get_sentence_embedding_dimension()
    if student.config.hidden_size != t_dim:
        raise DeltakdError(f"student: embeds to {student.config.hidden_size} dims, the teacher to {t_dim}; "
                           "MSE needs equal widths")
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
    student.train()
    for p in student.parameters():  # a copy of the frozen teacher arrives without gradients
        p.requires_grad_(True)
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


def _eval_saved(model_dir: Path, stage: Stage) -> dict[str, Any]:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(model_dir), device="cpu" if cpu_only() else None)
    return measure(st_encoder(st, stage.recipe.eval.batch_size), stage)


def _teacher_metrics(stage: Stage) -> dict[str, Any]:
    out = measure(st_encoder(stage.teacher, stage.recipe.eval.batch_size), stage)
    out["params"] = count_parameters(stage.teacher)
    return out


# --------------------------------------------------------------------------------------------
# training one stage
# --------------------------------------------------------------------------------------------


def _args(recipe: MultistageRecipe, run: RunDir, has_eval: bool) -> TrainingArguments:
    return training_arguments(recipe.train, run, list(recipe.track), recipe.train.metric_for_best or "loss", has_eval,
                              label_names=["teacher_en"], prediction_loss_only=True,
                              train_sampling_strategy="random")


def train_stage(stage: Stage, run: RunDir, resume: bool = False, test: bool = True) -> dict[str, Any]:
    """Train, save ``model/``, evaluate the saved folder, write ``results.json`` (last)."""
    from transformers import EarlyStoppingCallback

    from ..engine import MetricsLogCallback, _checkpoint_step, _keep_best_and_last, last_complete_checkpoint
    from .trainer import MultistageTrainer, PairBatchCollator

    recipe = stage.recipe
    started = time.time()
    before = measure(hf_encoder(stage.student, stage.tokenizer, recipe.eval.batch_size, recipe.data.max_length,
                                stage.normalize), stage, speed=False) if recipe.eval.before else None
    heldout = stage.split.heldout
    teacher_enc = _teacher_encoder(stage.targets)

    def extra_eval(model: Any) -> dict[str, float]:
        enc = hf_encoder(model, stage.tokenizer, recipe.eval.batch_size, recipe.data.max_length, stage.normalize)
        m = evaluate_multilingual(enc, heldout, teacher_enc, speed=False)
        return {k: v for k, v in m.items() if k.endswith(("/acc", "/mse"))}

    has_eval = bool(heldout)
    callbacks: list[Any] = [MetricsLogCallback(run)]
    if recipe.train.early_stop and has_eval:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=recipe.train.early_stop))
    trainer = MultistageTrainer(
        model=stage.student, args=_args(recipe, run, has_eval), train_dataset=stage.split.train,
        eval_dataset=heldout if has_eval else None,
        data_collator=PairBatchCollator(stage.tokenizer, stage.targets, recipe.data.max_length),
        callbacks=callbacks, loss=recipe.loss, normalize=stage.normalize, extra_eval=extra_eval)
    checkpoint = last_complete_checkpoint(run.checkpoints) if resume else None
    if checkpoint:
        run.truncate_events(_checkpoint_step(checkpoint))
    out = trainer.train(resume_from_checkpoint=checkpoint)
    train_seconds = time.time() - started
    ckpt_info = _keep_best_and_last(run, trainer.state.best_model_checkpoint)
    model = trainer.model
    model.eval()
    tmp = run.path / ".model-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_student(model, tmp, tokenizer=stage.tokenizer, normalize=stage.normalize,
                 max_seq_length=recipe.data.max_length)
    shutil.rmtree(run.model_dir, ignore_errors=True)
    tmp.rename(run.model_dir)
    from .saving import export_plain

    teacher_params = count_parameters(stage.teacher)
    params = count_parameters(model)
    results: dict[str, Any] = {
        "family": "multistage",
        "name": recipe.name,
        "run_dir": str(run.path),
        "init_from": str(stage.init_run.path if stage.init_run else stage.init_model) if recipe.init_from else None,
        "structure": multistage_spec(model),
        "built": stage.built,
        "normalize": stage.normalize,
        "losses": {k: v for k, v in recipe.loss.weights().items() if v > 0},
        "params": {"total": params, "trainable": count_parameters(model, trainable_only=True), "trainable_pct": 100.0,
                   "portable": count_parameters(export_plain(model)), "teacher": teacher_params,
                   "ratio_to_teacher": params / teacher_params},
        "examples": {"train": len(stage.split.train), "heldout": len(heldout), "dropped": len(stage.split.dropped),
                     "test_pairs": len(stage.eval_pairs), "sts": {s.name: len(s) for s in stage.sts}},
        "teacher_cache": str(stage.targets.path) if stage.targets.path else None,
        "train_steps": int(trainer.state.global_step),
        "train_loss": float(out.training_loss),
        "train_samples_per_second": float(out.metrics.get("train_samples_per_second", float("nan"))),
        "train_wall_time_s": train_seconds,
        "resumed_from": Path(checkpoint).name if checkpoint else None,
        **ckpt_info,
        "tested": False,
        "metrics": {},
    }
    if before is not None:
        results["before"] = before
    if test:
        _add_test(results, run.model_dir, stage)
    results["wall_time_s"] = time.time() - started
    run.write_results(results)
    return results


def _add_test(results: dict[str, Any], model_dir: Path, stage: Stage) -> None:
    measured = _eval_saved(model_dir, stage)
    results["speed_sent_per_s"] = measured.pop("speed_sent_per_s")
    results["metrics"] = measured
    if stage.recipe.eval.teacher:
        results["teacher"] = _teacher_metrics(stage)
    results["tested"] = True


# --------------------------------------------------------------------------------------------
# entry points: one recipe, a pipeline, a re-test
# --------------------------------------------------------------------------------------------


def _dump(recipe: MultistageRecipe) -> dict[str, Any]:
    return recipe.model_dump(mode="json")


def _same_settings(saved: dict[str, Any] | None, want: dict[str, Any]) -> bool:
    """Whether a saved recipe would train the same stage: equal except the free-text description."""
    if saved is None:
        return False
    return {k: v for k, v in saved.items() if k != "description"} == \
        {k: v for k, v in want.items() if k != "description"}


def _saved_recipe(run: RunDir) -> dict[str, Any] | None:
    try:
        data = yaml.safe_load(run.recipe_file.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return None
    data.pop(PROVENANCE_KEY, None)
    return data


def _runs(recipe: MultistageRecipe) -> list[RunDir]:
    base = Path(recipe.output_dir) / recipe.name
    if not base.is_dir():
        return []
    return [RunDir(p) for p in sorted(base.iterdir()) if (p / "recipe.yaml").is_file()]


def _init_key(stage_or_recipe: MultistageRecipe) -> str | None:
    if not stage_or_recipe.init_from:
        return None
    model, run = resolve_init(stage_or_recipe.init_from, stage_or_recipe.output_dir)
    return str(run.path if run is not None else model)


@dataclass
class StageOutcome:
    name: str
    status: str  # trained | resumed | skipped | tested
    run_dir: Path
    results: dict[str, Any]


def train_recipe(recipe: str | Path | MultistageRecipe, overrides: Iterable[str] = (), resume: bool = False,
                 test: bool = True) -> StageOutcome:
    """One stage: a new run (or, with ``resume``, the newest unfinished run of the same recipe)."""
    if not isinstance(recipe, MultistageRecipe):
        recipe = load_multistage_recipe(recipe, overrides)
    run: RunDir | None = None
    if resume:
        same = [r for r in _runs(recipe) if not r.finished and _same_settings(_saved_recipe(r), _dump(recipe))]
        if not same:
            raise DeltakdError(f"--resume: no unfinished run of '{recipe.name}' with this recipe under "
                               f"'{recipe.output_dir}'")
        run = same[-1]
    stage = prepare_stage(recipe)  # bad input fails here, before anything is written
    if run is None:
        run = new_run_dir(recipe.output_dir, recipe.name)
        run.write_recipe(recipe)
    results = train_stage(stage, run, resume=resume, test=test)
    return StageOutcome(recipe.name, "resumed" if resume else "trained", run.path, results)


def evaluate_run(run_dir: str | Path) -> dict[str, Any]:
    """Re-test a finished (or trained-without-test) run's saved model on its recipe's eval sets;
    writes ``eval.json`` and fills ``results.json``'s metrics when they were not measured."""
    run = RunDir(Path(run_dir))
    data = _saved_recipe(run)
    if data is None:
        raise DeltakdError(f"'{run.path}' is not a deltakd run directory (no readable recipe.yaml)")
    recipe = validate(data, source=str(run.recipe_file), check_files=False)
    if not (run.model_dir / "config.json").is_file():
        raise DeltakdError(f"run '{run.path}' has no model/ (did it finish?)")
    split, eval_pairs = _read_pairs(recipe)
    teacher = load_teacher(recipe.teacher.model, recipe.teacher.max_seq_length)
    english = [p.english for p in (*split.train, *split.heldout, *eval_pairs)]
    targets = teacher_embeddings(teacher, english, batch_size=recipe.eval.batch_size)
    stage = Stage(recipe, teacher, None, None, False, split, eval_pairs, _read_sts(recipe), targets)
    results: dict[str, Any] = {}
    _add_test(results, run.model_dir, stage)
    atomic_write_json(run.path / "eval.json", results)
    if run.finished:
        saved = json.loads(run.results_file.read_text())
        if not saved.get("tested"):
            saved.update(results)
            run.write_results(saved)
    return results


def flat_metrics(results: dict[str, Any]) -> dict[str, float]:
    """``{'heldout/de/acc': ..., 'test/sts/en-de/spearman': ..., 'speed_sent_per_s': ...}`` of a test result."""
    out = {f"{split}/{k}": float(v) for split, m in results.get("metrics", {}).items() for k, v in m.items()}
    if "speed_sent_per_s" in results:
        out["speed_sent_per_s"] = float(results["speed_sent_per_s"])
    return out


def run_pipeline(recipes: Iterable[str | Path], overrides: Iterable[str] = (), init_from: str | None = None,
                 test: bool = True, output_dir: str | Path | None = None, force: bool = False) -> list[StageOutcome]:
    """Run stage recipes in order, skipping finished ones (same recipe, same upstream run).

    ``overrides`` apply to every stage; ``init_from`` (a run or model folder) to the first one;
    ``output_dir`` replaces every recipe's (where runs go and where ``init_from`` names resolve).
    All recipes are validated before the first stage starts.
    """
    paths = list(recipes)
    if not paths:
        raise DeltakdError("pipeline: give at least one recipe")
    common = list(overrides) + ([f"output_dir={output_dir}"] if output_dir is not None else [])
    loaded: list[MultistageRecipe] = []
    for i, path in enumerate(paths):
        extra = [f"init_from={init_from}"] if i == 0 and init_from else []
        # later stages' init runs may not exist yet: their files are checked, their init_from when they start
        loaded.append(load_multistage_recipe(path, [*common, *extra]))
    names = [r.name for r in loaded]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DeltakdError(f"pipeline: stage name(s) {', '.join(dup)} given twice")
    outcomes: list[StageOutcome] = []
    for recipe in loaded:
        outcomes.append(_pipeline_stage(recipe, test, force))
    return outcomes


def _pipeline_stage(recipe: MultistageRecipe, test: bool, force: bool) -> StageOutcome:
    want = _dump(recipe)
    upstream = _init_key(recipe)
    same = [r for r in _runs(recipe) if _same_settings(_saved_recipe(r), want)]
    if not force:
        for run in reversed(same):
            if not run.finished:
                continue
            results = run.read_results()
            if results.get("init_from") != upstream:
                continue
            if test and not results.get("tested"):
                evaluate_run(run.path)
                return StageOutcome(recipe.name, "tested", run.path, run.read_results())
            return StageOutcome(recipe.name, "skipped", run.path, results)
        unfinished = [r for r in same if not r.finished]
        if unfinished:
            stage = prepare_stage(recipe)
            results = train_stage(stage, unfinished[-1], resume=True, test=test)
            return StageOutcome(recipe.name, "resumed", unfinished[-1].path, results)
    return train_recipe(recipe, test=test)
