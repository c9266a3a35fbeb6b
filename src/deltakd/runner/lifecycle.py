"""The one run lifecycle, for every family.

resolved recipe -> (resume: the matching unfinished run) -> ``family.prepare`` (all bad input
fails here, nothing written yet) -> run directory + ``recipe.yaml`` (main process) -> Trainer
(``family.make_trainer``, trackers, metrics log, early stopping) -> train (from the newest complete
checkpoint on resume) -> ``best/`` and ``last/`` -> ``family.evaluate`` -> ``model/`` ->
``family.finish`` -> the model card (``model/README.md``, :mod:`deltakd.publish`) -> ``results.json``
(written last and atomically: its presence marks the run finished). Under torchrun every process
trains and evaluates; only the main one writes. The main process holds the run folder's lock
(``runs.lock``) from creation or resume selection until ``results.json``: a second process resuming
the same run gets one line.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from transformers import EarlyStoppingCallback

from ..errors import DeltakdError
from ..publish import write_card
from ..runs import RunDir, RunResults, new_run_dir
from ..runs.lock import FolderLock, in_use, lock_holder
from ..runs.rundir import runs_of
from ..trackers import RunTrackers, check_trackers
from ..utils import cpu_only
from .arguments import check_scale
from .batching import fast_batches
from .callbacks import MetricsLogCallback, compact_log_lines
from .checkpoints import (
    ManifestCallback,
    check_resumable,
    checkpoint_step,
    keep_best_and_last,
    last_complete_checkpoint,
)
from .divergence import DivergenceGuard, finish_diverged, nonfinite_metric_warnings
from .evaluation import merged_evaluation
from .family import Family, Prepared, read_recipe_data


def distributed_state():
    """accelerate's process state (initialises torch.distributed under torchrun)."""

    return PartialState(cpu=cpu_only())  # CPU-only: torchrun processes meet over gloo


def share(value: str, state) -> str:
    """The main process's value on every process (a run directory path)."""
    if state.num_processes == 1:
        return value

    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


def resumable_run(recipe: Any, family: Family) -> RunDir:
    """The newest unfinished run of ``recipe.name`` made from the same recipe and not in use by a live
    process (its lock held); one line if none."""
    unfinished = [r for r in reversed(runs_of(recipe.output_dir, recipe.name)) if not r.finished]
    if not unfinished:
        raise DeltakdError(f"--resume: no unfinished run of '{recipe.name}' under '{recipe.output_dir}'")
    busy: tuple[RunDir, int] | None = None
    for run in unfinished:
        if not family.differences(read_recipe_data(run), recipe):
            pid = lock_holder(run.path)
            if pid is None:
                return run
            busy = busy or (run, pid)
    if busy is not None:
        raise DeltakdError(in_use(busy[0].path, busy[1]))
    changed = family.differences(read_recipe_data(unfinished[0]), recipe)
    raise DeltakdError(f"--resume: the recipe differs from the one in '{unfinished[0].path}' at {', '.join(changed)}")


_ERROR = "\0error:"  # marks the main process's one-line error in what it shares


def claim(run: RunDir | None, recipe: Any, family: Family, state) -> tuple[RunDir, FolderLock | None]:
    """The run to continue (``run``, else the resumable one), locked by the main process, which alone
    chooses it and shares the choice (or its one-line error) with the others under torchrun."""
    answer, lock = "", None
    if state.is_main_process:
        try:
            run = run or resumable_run(recipe, family)
            lock = FolderLock(run.path).acquire()
            answer = str(run.path)
        except DeltakdError as e:
            answer = _ERROR + str(e)
    answer = share(answer, state)
    if answer.startswith(_ERROR):
        raise DeltakdError(answer[len(_ERROR):])
    return RunDir(Path(answer)), lock


def run(recipe: Any, family: Family, resume: bool = False, init: Callable[[Prepared], None] | None = None,
        test: bool = True, run_dir: RunDir | None = None) -> RunResults | None:
    """Train ``recipe`` as ``family`` from start to ``results.json``; the results (None off the main process).

    ``resume``: continue the newest unfinished run of the same recipe (or ``run_dir``) from its
    last complete checkpoint. ``init(prepared)`` runs after the model is built and before
    anything is written (a transfer target's fused start); skipped on resume. ``test``: the
    family's final evaluation (a multistage pipeline may leave it for later).
    """
    check_trackers(recipe.track)
    state = distributed_state()
    check_scale(recipe.train, state.is_main_process)  # fp16 without CUDA, a missing bitsandbytes / deepspeed
    run, lock = run_dir, None
    if resume or run is not None:  # held by the main process until results.json is written
        run, lock = claim(run, recipe, family, state)
    try:
        if resume:
            check_resumable(run, recipe)  # never train a trained run again from step 0, nor inexactly
        prep = family.prepare(recipe)  # bad data or model fails here, before anything is written
        if init is not None and not resume:
            init(prep)
        if run is None:
            path = str(new_run_dir(recipe.output_dir, recipe.name).path) if state.is_main_process else ""
            run = RunDir(Path(share(path, state)))
            if state.is_main_process:
                lock = FolderLock(run.path).acquire()  # before recipe.yaml: no resume picks the run up meanwhile
                run.write_recipe(recipe)
        return train(prep, family, run, resume=resume, is_main=state.is_main_process, test=test)
    finally:
        if lock is not None:
            lock.release()


def train(prep: Prepared, family: Family, run: RunDir, resume: bool = False, is_main: bool = True,
          test: bool = True) -> RunResults | None:
    """Train a prepared recipe in ``run``; keep best/last, evaluate, save ``model/``, write results."""
    recipe = prep.recipe
    started = time.time()
    family.before_training(prep)
    trackers = RunTrackers(recipe, run.path)  # one stream per run, closed by trackers.finish
    args = family.arguments(prep, run, trackers.report_to)
    guard = DivergenceGuard(recipe.train.nan_patience)
    cbs = [MetricsLogCallback(run), guard, ManifestCallback(), *trackers.callbacks]
    if recipe.train.early_stop and args.eval_strategy != "no":
        cbs.append(EarlyStoppingCallback(early_stopping_patience=recipe.train.early_stop))
    trainer = guard.attach(merged_evaluation(fast_batches(compact_log_lines(family.make_trainer(prep, args, cbs)))))
    checkpoint = last_complete_checkpoint(run.checkpoints, warn=is_main) if resume else None
    if resume and is_main:
        run.truncate_events(checkpoint_step(checkpoint) if checkpoint else 0)
    try:
        return _train_and_finish(prep, family, run, trainer, guard, trackers, checkpoint, started, is_main, test)
    except BaseException as exc:
        trackers.abort(interrupted=isinstance(exc, KeyboardInterrupt))
        raise


def _train_and_finish(prep: Prepared, family: Family, run: RunDir, trainer: Any, guard: DivergenceGuard,
                      trackers: RunTrackers, checkpoint: str | None, started: float, is_main: bool,
                      test: bool) -> RunResults | None:
    recipe = prep.recipe
    out = trainer.train(resume_from_checkpoint=checkpoint)
    if guard.diverged is not None:  # model/ from the newest finite checkpoint, results name the step
        diverged = finish_diverged(prep, family, trainer, run, guard.diverged, started, checkpoint, is_main)
        trackers.finish(diverged, [run.recipe_file, run.results_file])
        return diverged
    train_seconds = time.time() - started
    metrics, speed = family.evaluate(prep, trainer)  # every process takes part
    nonfinite_metric_warnings(metrics)
    if not is_main:
        return None
    ckpt_info = keep_best_and_last(run, trainer.state.best_model_checkpoint, recipe.train.keep_checkpoints)
    family.save_model(prep, trainer, run)
    results = RunResults(
        name=recipe.name, run_dir=str(run.path), family=family.name, metrics=metrics,
        train_steps=int(trainer.state.global_step),
        train_samples_per_second=float(out.metrics.get("train_samples_per_second", float("nan"))),
        train_wall_time_s=train_seconds, resumed_from=Path(checkpoint).name if checkpoint else None,
        best_step=ckpt_info.get("best_step"), last_step=ckpt_info.get("last_step"),
        extra={"train_runtime_s": float(out.metrics.get("train_runtime", float("nan"))),
               "train_loss": float(out.training_loss)})
    results = family.finish(prep, trainer, run, results, speed, test)
    results.wall_time_s = time.time() - started
    if run.model_dir.is_dir():
        write_card(run, results)  # model/README.md: what the model is, its metrics, how to load it
    run.write_results(results)
    trackers.finish(results, [run.recipe_file, run.results_file])  # then the tracker runs end
    return results
