"""``deltakd pipeline``: multistage stage recipes run in order, each on the shared run lifecycle.

A stage is skipped when a finished run of it has the same resolved recipe (the description
aside) and was initialised from the run ``init_from`` resolves to now (so re-training an earlier
stage re-trains what follows); a finished but untested run is tested; an unfinished run of the
same recipe is resumed from its last complete checkpoint. A stage whose training diverged (its
run, new or found) stops the pipeline with :class:`DivergedError`: no later stage starts from it.
Under torchrun every process takes the same decisions and goes on with the main process's results.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from .errors import DeltakdError, DivergedError
from .multistage.family import MultistageFamily, evaluate_run
from .multistage.processes import from_main, wait_for_everyone
from .multistage.recipe import MultistageRecipe
from .multistage.stage import resolve_init
from .runner import lifecycle
from .runs import RunDir, RunResults, read_recipe_data
from .runs.rundir import runs_of

__all__ = ["StageOutcome", "run_pipeline", "train_stage_recipe"]

FAMILY = MultistageFamily()


@dataclass
class StageOutcome:
    name: str
    status: str  # trained | resumed | skipped | tested
    run_dir: Path
    results: RunResults


def _init_key(recipe: MultistageRecipe) -> str | None:
    if not recipe.init_from:
        return None
    model, run = resolve_init(recipe.init_from, recipe.output_dir)
    return str(run.path if run is not None else model)


def _run(recipe: MultistageRecipe, **kwargs) -> RunResults:
    """``lifecycle.run``'s results on every process: under torchrun the others wait for the main
    process's results.json and read it (the lifecycle returns results on the main process only)."""
    results = lifecycle.run(recipe, FAMILY, **kwargs)
    path = from_main(results.run_dir if results is not None else None)
    return results if results is not None else RunDir(Path(path)).read_results()


def train_stage_recipe(recipe: MultistageRecipe, resume: bool = False, test: bool = True) -> StageOutcome:
    """One stage: a new run (or, with ``resume``, the newest unfinished run of the same recipe)."""
    results = _not_diverged(_run(recipe, resume=resume, test=test))
    return StageOutcome(recipe.name, "resumed" if resume else "trained", Path(results.run_dir), results)


def _not_diverged(results: RunResults) -> RunResults:
    if results.get("diverged"):
        raise DivergedError(f"pipeline stage '{results.name}' ({results.run_dir}): {results['diverged']['message']}")
    return results


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
        recipe = FAMILY.load_recipe(path, [*common, *extra])
        loaded.append(recipe)
    names = [r.name for r in loaded]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DeltakdError(f"pipeline: stage name(s) {', '.join(dup)} given twice")
    return [_pipeline_stage(recipe, test, force) for recipe in loaded]


def _pipeline_stage(recipe: MultistageRecipe, test: bool, force: bool) -> StageOutcome:
    upstream = _init_key(recipe)
    same = [r for r in runs_of(recipe.output_dir, recipe.name)
            if not FAMILY.differences(read_recipe_data(r), recipe)]
    wait_for_everyone()  # under torchrun: every process decides on the same runs, before any is written
    if not force:
        for run in reversed(same):
            if not run.finished:
                continue
            results = run.read_results()
            if results.get("init_from") != upstream:
                continue
            _not_diverged(results)  # a rerun names it again (--force trains it anew)
            if test and not results.get("tested"):
                evaluate_run(run, FAMILY)
                wait_for_everyone()  # the main process has written the tested results
                return StageOutcome(recipe.name, "tested", run.path, run.read_results())
            return StageOutcome(recipe.name, "skipped", run.path, results)
        unfinished = [r for r in same if not r.finished]
        if unfinished:
            results = _not_diverged(_run(recipe, resume=True, test=test, run_dir=unfinished[-1]))
            return StageOutcome(recipe.name, "resumed", unfinished[-1].path, results)
    return train_stage_recipe(recipe, test=test)
